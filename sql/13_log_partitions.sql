--
-- 13_log_partitions: claims read windows whose events lie in several log
-- partitions, including a transaction that spans a partition switch, and
-- continue inside such a transaction from one claim to the next.
-- Unordered subscriptions hand events out in (txid, id) order, ordered
-- ones in id order; a transaction that commits late (prepared here) is
-- found through the cursor snapshot's in-progress list.
--
-- Runs on the extension that 12_drop created anew: publishers write to
-- partition 0, and the other two partitions are empty.
--
SELECT eventbox.subscribe('t13', event_types => '{t13.*}');
SELECT eventbox.subscribe('t13_ord', event_types => '{t13.*}', ordering => 'aggregate');
SELECT cur FROM eventbox.rotation;

-- n = 1: published first, committed last
BEGIN;
SELECT eventbox.publish('t13.late', '{"n": 1}', 'acct', 'one') > 0 AS published;
PREPARE TRANSACTION 't13_late';

SELECT eventbox.publish('t13.a', '{"n": 2}', 'acct', 'one') > 0 AS published;
-- one transaction, two partitions: rotation moves publishers on inside it
BEGIN;
SELECT eventbox.publish('t13.b', '{"n": 3}', 'acct', 'one') > 0 AS published;
SELECT eventbox._rotate('1 hour', '0');
SELECT eventbox.publish('t13.b', '{"n": 4}', 'acct', 'one') > 0 AS published;
COMMIT;
-- another type in between, which neither subscription takes
SELECT eventbox.publish('u13.skip', '{"n": 0}', 'acct', 'one') > 0 AS published;
SELECT eventbox.publish('t13.c', '{"n": 5}', 'acct', 'one') > 0 AS published;
SELECT eventbox._rotate('1 hour', '0');
SELECT eventbox.publish('t13.d', '{"n": 6}', 'acct', 'one') > 0 AS published;
SELECT cur FROM eventbox.rotation;

-- the committed events lie in all three partitions
SELECT tableoid::regclass AS partition, event_type, payload ->> 'n' AS n
FROM eventbox.log WHERE event_type LIKE '_13.%' ORDER BY id;

-- unordered: one or two at a time, in (txid, id) order, across partitions
-- and inside the transaction that spans two of them
SELECT payload ->> 'n' AS n FROM eventbox.claim_batch(1, 't13');
SELECT payload ->> 'n' AS n FROM eventbox.claim_batch(1, 't13');
SELECT payload ->> 'n' AS n FROM eventbox.claim_batch(1, 't13');
SELECT payload ->> 'n' AS n FROM eventbox.claim_batch(2, 't13');
SELECT count(*) AS nothing_more FROM eventbox.claim_batch(10, 't13');

-- ordered: one aggregate, so one lane; a lane has one batch in flight, so
-- each claim acks what it took
SELECT string_agg(c.payload ->> 'n', ',' ORDER BY c.ordinality) AS n,
	   eventbox.ack(array_agg(c.id), 't13_ord') AS acked
FROM eventbox.claim_batch(2, 't13_ord') WITH ORDINALITY AS c;
SELECT string_agg(c.payload ->> 'n', ',' ORDER BY c.ordinality) AS n,
	   eventbox.ack(array_agg(c.id), 't13_ord') AS acked
FROM eventbox.claim_batch(2, 't13_ord') WITH ORDINALITY AS c;
SELECT string_agg(c.payload ->> 'n', ',' ORDER BY c.ordinality) AS n,
	   eventbox.ack(array_agg(c.id), 't13_ord') AS acked
FROM eventbox.claim_batch(10, 't13_ord') WITH ORDINALITY AS c;

-- the late commit: both subscriptions find it, nothing is handed out twice
COMMIT PREPARED 't13_late';
SELECT payload ->> 'n' AS n, attempt FROM eventbox.claim_batch(10, 't13');
SELECT string_agg(c.payload ->> 'n', ',' ORDER BY c.ordinality) AS n,
	   eventbox.ack(array_agg(c.id), 't13_ord') AS acked
FROM eventbox.claim_batch(10, 't13_ord') WITH ORDINALITY AS c;
SELECT count(*) AS nothing_more FROM eventbox.claim_batch(10, 't13');
SELECT count(*) AS nothing_more FROM eventbox.claim_batch(10, 't13_ord');

SELECT eventbox.unsubscribe('t13');
SELECT eventbox.unsubscribe('t13_ord');

-- A new window of an ordered lane starts at its lowest id, found through
-- the window's own index entries: the claim reads the (id) indexes from
-- there, not from the log's first event (500 older events here).  Each of
-- the 16 lanes opens its window and reads its one entry: 16 entries; from
-- the log's first event it would be 16 times more than 500.
SELECT count(*) FROM eventbox.publish_batch(
	(SELECT jsonb_agg(jsonb_build_object('event_type', 'v13.old', 'aggregate_type', 'acct',
										 'aggregate_id', 'one'))
	 FROM generate_series(1, 500)));
SELECT eventbox.subscribe('t13_win', event_types => '{t13.*}', ordering => 'aggregate');
SELECT eventbox.publish('t13.new', '{"n": 7}', 'acct', 'one') > 0 AS published;
SELECT pg_stat_force_next_flush();
SELECT sum(idx_tup_read) AS id_read_before FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_id_idx$' \gset
SELECT payload ->> 'n' AS n FROM eventbox.claim_batch(10, 't13_win');
SELECT pg_stat_force_next_flush();
SELECT sum(idx_tup_read) - :id_read_before < 100 AS read_only_the_window
FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_id_idx$';
SELECT eventbox.unsubscribe('t13_win');
