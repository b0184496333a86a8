--
-- 15_publication: a database with a publication of all tables (logical
-- replication, or a change-data-capture tool such as Debezium) refuses
-- UPDATE and DELETE on a table that has no replica identity.  Every table
-- eventbox updates or deletes from has one: a primary key, or REPLICA
-- IDENTITY FULL where there is no key (eventbox.cursors, whose index on
-- (sub_id, lane) is not unique on purpose; eventbox.counters).  The log is
-- only inserted into and truncated, which need none.
--
SELECT c.relname
FROM pg_catalog.pg_class c
WHERE c.relnamespace = 'eventbox'::regnamespace AND c.relkind = 'r'
  AND c.relreplident = 'd'
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_index i
				  WHERE i.indrelid = c.oid AND i.indisprimary)
ORDER BY 1;
SET client_min_messages = error;	-- no WARNING about wal_level
CREATE PUBLICATION t15_all FOR ALL TABLES;
RESET client_min_messages;
SELECT eventbox.subscribe('t15', '{t15.*}', max_attempts => 1) IS NOT NULL AS subscribed;
SELECT eventbox.publish('t15.a', '{"n": 1}') IS NOT NULL AS published;
SELECT eventbox.publish('t15.b', '{"n": 2}') IS NOT NULL AS published;
-- a claim updates the cursor and inserts a batch; the ack deletes it
SELECT count(*) AS acked
FROM eventbox.claim_batch(1, 't15') c, eventbox.ack(c.id, 't15', c.lease) a WHERE a;
-- a nack with max_attempts 1 moves the event to the dead letters and
-- counts it (eventbox.counters)
SELECT eventbox.nack(c.id, 'failed', subscription => 't15', lease => c.lease) AS nacked
FROM eventbox.claim_batch(1, 't15') c;
SELECT count(*) AS dead_letters FROM eventbox.dead_letters WHERE subscription = 't15';
-- dropping the subscription deletes its cursors, counters and dead letters
SELECT eventbox.unsubscribe('t15');
SELECT (SELECT count(*) FROM eventbox.cursors c
		WHERE NOT EXISTS (SELECT FROM eventbox.subscriptions s WHERE s.sub_id = c.sub_id))
	 + (SELECT count(*) FROM eventbox.counters c
		WHERE NOT EXISTS (SELECT FROM eventbox.subscriptions s WHERE s.sub_id = c.sub_id))
	   AS rows_left;
DROP PUBLICATION t15_all;
