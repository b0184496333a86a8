--
-- 09_inspection: the stats view, outbox(), timeline(), event().
--
SELECT eventbox.subscribe('t09', event_types => '{t09.*}', max_attempts => 2,
						  backoff_base => '0', backoff_max => '0');
SELECT test.last_id() AS base \gset
SELECT published_total AS published_before FROM eventbox.stats WHERE subscription = 't09' \gset

-- the columns of the stats view
SELECT array_agg(attname ORDER BY attnum) AS stats_columns
FROM pg_attribute WHERE attrelid = 'eventbox.stats'::regclass AND attnum > 0;
-- a fresh subscription: all zero
SELECT subscription, mode, paused, pending, leased, scheduled_retries, dead,
	   oldest_pending_age, lag_events, lag_seconds, delivered_total, acked_total,
	   retried_total, dead_lettered_total
FROM eventbox.stats WHERE subscription = 't09';

-- a known sequence: 6 events; claim 4; ack 1; nack 1 (retry, due at once);
-- nack 1 with retry_in 1 hour; 1 stays leased; a rolled-back publish
SELECT count(*) FROM eventbox.publish_batch(
	(SELECT jsonb_agg(jsonb_build_object('event_type', 't09.e', 'aggregate_type', 'acct',
										 'aggregate_id', 'x' || (i % 2), 'payload',
										 jsonb_build_object('i', i)) ORDER BY i)
	 FROM generate_series(1, 6) i));
BEGIN;
SELECT eventbox.publish('t09.rolled_back') > 0 AS published;
ROLLBACK;
SELECT pg_sleep(0.05);
-- published_total counts events that were published (committed): the
-- rolled-back one is not an event (G1)
SELECT subscription, pending, leased, scheduled_retries, dead, lag_events,
	   oldest_pending_age > '0' AS has_age, lag_seconds > 0 AS has_lag,
	   published_total - :published_before AS published, delivered_total
FROM eventbox.stats WHERE subscription = 't09';
SELECT id - :base AS id FROM eventbox.claim_batch(4, 't09');
SELECT eventbox.ack(:base + 1, 't09');
SELECT eventbox.nack(:base + 2, 'soon', retry_in => '0', subscription => 't09');
SELECT eventbox.nack(:base + 3, 'later', retry_in => '1 hour', subscription => 't09');
SELECT subscription, pending, leased, scheduled_retries, dead, lag_events,
	   delivered_total, acked_total, retried_total, dead_lettered_total,
	   last_activity <= now() AS has_activity
FROM eventbox.stats WHERE subscription = 't09';
-- claim the due retry and one new event; ack both; the retry fails again
-- and dies (max_attempts 2)
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(2, 't09');
SELECT eventbox.ack(:base + 5, 't09');
SELECT eventbox.nack(:base + 2, 'dead now', subscription => 't09');
SELECT subscription, pending, leased, scheduled_retries, dead, lag_events,
	   delivered_total, acked_total, retried_total, dead_lettered_total
FROM eventbox.stats WHERE subscription = 't09';

-- outbox: one row per waiting event and status, no payloads
SELECT array_agg(attname ORDER BY attnum) AS outbox_columns
FROM pg_attribute WHERE attrelid = 'eventbox.outbox_entry'::regclass AND attnum > 0;
SELECT status, id - :base AS id, event_type, aggregate_id, attempts,
	   due_at IS NOT NULL AS has_due, last_error
FROM eventbox.outbox('pending', 100, 't09') ORDER BY id;
SELECT status, id - :base AS id, attempts, due_at > now() AS due_later, last_error
FROM eventbox.outbox('leased', 100, 't09') ORDER BY id;
SELECT status, id - :base AS id, attempts, due_at > now() + interval '59 minutes' AS in_an_hour,
	   last_error
FROM eventbox.outbox('retrying', 100, 't09') ORDER BY id;
SELECT status, id - :base AS id, attempts, last_error
FROM eventbox.outbox('dead', 100, 't09') ORDER BY id;
-- lim limits; the default status is pending
SELECT status, id - :base AS id FROM eventbox.outbox(lim => 1, subscription => 't09');
-- bad input
SELECT test.expect_error($$SELECT * FROM eventbox.outbox('done')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.outbox(NULL)$$);
SELECT test.expect_error($$SELECT * FROM eventbox.outbox('pending', 0)$$);
SELECT test.expect_error($$SELECT * FROM eventbox.outbox('pending', NULL)$$);
SELECT test.expect_error($$SELECT * FROM eventbox.outbox('pending', 10, 't09_nope')$$);

-- event(id): one event with payload and headers; NULL for an unknown id
SELECT id - :base AS id, event_type, aggregate_type, aggregate_id, payload, headers,
	   event_id = (SELECT event_id FROM eventbox.log WHERE id = :base + 3) AS same_event_id
FROM eventbox.event(:base + 3);
SELECT (eventbox.event(-1)).id IS NULL AS unknown_is_null;
SELECT (eventbox.event(NULL)).id IS NULL AS null_is_null;

-- timeline: one aggregate's history in id order, keyset pagination
SELECT id - :base AS id, payload->>'i' AS i FROM eventbox.timeline('acct', 'x1');
SELECT id - :base AS id, payload->>'i' AS i FROM eventbox.timeline('acct', 'x0', lim => 2);
SELECT id - :base AS id, payload->>'i' AS i FROM eventbox.timeline('acct', 'x0', after_id => :base + 4, lim => 2);
SELECT id - :base AS id, payload->>'i' AS i FROM eventbox.timeline('acct', 'x0', after_id => :base + 6, lim => 2);
SELECT count(*) FROM eventbox.timeline('acct', 'nobody');
SELECT test.expect_error($$SELECT * FROM eventbox.timeline(NULL, 'x0')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.timeline('acct', NULL)$$);
SELECT test.expect_error($$SELECT * FROM eventbox.timeline('acct', 'x0', lim => 0)$$);
-- timeline reads the aggregate index, whose keys compare bytewise: its
-- query has to say COLLATE "C", or the planner could only scan the log.
-- A new session, so that no plan of the calls above is reused.
\c
SET enable_seqscan = off;
SELECT pg_stat_force_next_flush();
SELECT sum(idx_scan) AS agg_scans_before FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_aggregate_type_' \gset
SELECT count(*) FROM eventbox.timeline('acct', 'x0');
SELECT pg_stat_force_next_flush();
SELECT sum(idx_scan) > :agg_scans_before AS timeline_read_the_index FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_aggregate_type_';
RESET enable_seqscan;

SELECT eventbox.unsubscribe('t09');

-- pending beside a transaction that stays open: the cursor's snapshot
-- lists it as in progress (its xmin stays there), yet counting reads only
-- what came after the cursor's last move, and the open transaction's
-- events once it has committed.  (eventbox._pending, what stats counts
-- with, for this subscription alone, and by index scans as on a large
-- log, so that the index statistics show what it read.)
SELECT eventbox.subscribe('t09_open', event_types => '{t09o.*}');
BEGIN;
SELECT eventbox.publish('t09o.late', '{"n": 1}') > 0 AS published;
PREPARE TRANSACTION 't09_open';
SELECT count(*) FROM eventbox.publish_batch((
	SELECT jsonb_agg(jsonb_build_object('event_type', 't09o.bulk')) FROM generate_series(1, 500)));
SELECT count(*) AS claimed FROM eventbox.claim_batch(1000, 't09_open');
SELECT eventbox.ack(array_agg(id), 't09_open') AS acked
FROM eventbox.log WHERE event_type = 't09o.bulk';
SELECT pg_stat_force_next_flush();
SELECT sum(idx_tup_read) AS txid_read_before FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_txid_id_idx$' \gset
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT count(*) AS pending
FROM eventbox.subscriptions s CROSS JOIN LATERAL eventbox._pending(s) p
WHERE s.name = 't09_open';
RESET enable_seqscan;
RESET enable_bitmapscan;
SELECT pg_stat_force_next_flush();
SELECT sum(idx_tup_read) - :txid_read_before < 100 AS read_only_what_is_new
FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_txid_id_idx$';
COMMIT PREPARED 't09_open';
SELECT pending FROM eventbox.stats WHERE subscription = 't09_open';
SELECT event_type FROM eventbox.claim_batch(10, 't09_open');
SELECT eventbox.unsubscribe('t09_open');
