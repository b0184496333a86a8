--
-- 08_ordered: ordering => 'aggregate' (G5): one aggregate is never leased
-- to two claims at once, delivery in commit order, other aggregates flow,
-- nack gives the later events of the batch back.
--
SELECT eventbox.subscribe('t08', event_types => '{t08.*}', ordering => 'aggregate',
						  backoff_base => '0', backoff_max => '0', max_attempts => 5);
-- the test uses aggregates A, B and C of type 'acct'; they fall into
-- different lanes, so they can be claimed independently
SELECT count(DISTINCT eventbox._lane('acct', x, 0, 16)) AS distinct_lanes
FROM unnest('{A,B,C}'::text[]) x;
SELECT test.last_id() AS base \gset

-- three events of A
SELECT eventbox.publish('t08.e', jsonb_build_object('seq', i), 'acct', 'A') - :base AS id
FROM generate_series(1, 3) i;
-- the first claim takes all of A, in order
SELECT id - :base AS id, aggregate_id, payload->>'seq' AS seq, attempt
FROM eventbox.claim_batch(10, 't08');
-- more events: A4, then B1, C1, B2 in one transaction
SELECT eventbox.publish('t08.e', '{"seq": 4}', 'acct', 'A') - :base AS id;
BEGIN;
SELECT eventbox.publish('t08.e', '{"seq": 1}', 'acct', 'B') - :base AS id;
SELECT eventbox.publish('t08.e', '{"seq": 1}', 'acct', 'C') - :base AS id;
SELECT eventbox.publish('t08.e', '{"seq": 2}', 'acct', 'B') - :base AS id;
COMMIT;
-- a second claim in the same session while A's batch is leased: nothing
-- of A, but B and C flow (in order per aggregate)
SELECT aggregate_id, array_agg(payload->>'seq' ORDER BY id) AS seqs,
	   array_agg(id - :base ORDER BY id) AS ids
FROM eventbox.claim_batch(10, 't08') GROUP BY 1 ORDER BY 1;
-- and again: nothing at all (A, B and C all have a batch in flight)
SELECT count(*) FROM eventbox.claim_batch(10, 't08');
-- ack A's batch: A4 comes next
SELECT eventbox.ack(ARRAY[:base + 1, :base + 2, :base + 3]::bigint[], 't08');
SELECT id - :base AS id, aggregate_id, payload->>'seq' AS seq FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(ARRAY[:base + 4, :base + 5, :base + 6, :base + 7]::bigint[], 't08');
-- acking part of a batch keeps the lane busy until the rest is acked
SELECT count(*) FROM eventbox.publish_batch('[
	{"event_type": "t08.e", "aggregate_type": "acct", "aggregate_id": "B", "payload": {"seq": 3}},
	{"event_type": "t08.e", "aggregate_type": "acct", "aggregate_id": "B", "payload": {"seq": 4}}]');
SELECT id - :base AS id, payload->>'seq' AS seq FROM eventbox.claim_batch(1, 't08');
SELECT eventbox.ack(:base + 8, 't08');
SELECT id - :base AS id, payload->>'seq' AS seq FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(:base + 9, 't08');
SELECT count(*) FROM eventbox.outbox('leased', 100, 't08');

-- nack in an ordered subscription: the failed event and the events behind
-- it in the batch go back together; the events before it stay leased
SELECT test.last_id() AS base2 \gset
SELECT eventbox.publish('t08.e', jsonb_build_object('seq', i), 'acct', 'C') - :base2 AS id
FROM generate_series(2, 5) i;
SELECT id - :base2 AS id, payload->>'seq' AS seq, attempt FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.nack(:base2 + 2, 'C3 failed', retry_in => '0', subscription => 't08');
SELECT status, id - :base2 AS id FROM eventbox.outbox('leased', 100, 't08') ORDER BY id;
SELECT status, id - :base2 AS id, attempts, last_error
FROM eventbox.outbox('retrying', 100, 't08') ORDER BY id;
-- the lane still has C2 in flight: nothing of C comes out
SELECT count(*) FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(:base2 + 1, 't08');
-- now C3 (second attempt), C4 and C5 (first attempt: a give-back is not a
-- failed attempt), in order
SELECT id - :base2 AS id, payload->>'seq' AS seq, attempt FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(ARRAY[:base2 + 2, :base2 + 3, :base2 + 4]::bigint[], 't08');
-- stats: nothing leased, nothing waiting.  16 deliveries: 13 events acked
-- once each, C3 retried once, and C4, C5 given back (not acked, not
-- retried) and delivered again.  acked_total must count only the 13 acks.
SELECT pending, leased, scheduled_retries, dead, delivered_total, acked_total,
	   retried_total, dead_lettered_total
FROM eventbox.stats WHERE subscription = 't08';

-- a lane with a retry waiting (not due yet) delivers nothing new until it
-- passes, while other aggregates still flow
SELECT test.last_id() AS base3 \gset
SELECT eventbox.publish('t08.e', '{"seq": 10}', 'acct', 'A') - :base3 AS id;
SELECT id - :base3 AS id FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.nack(:base3 + 1, 'A10 failed', retry_in => '1 hour', subscription => 't08');
SELECT eventbox.publish('t08.e', '{"seq": 11}', 'acct', 'A') - :base3 AS id;
SELECT eventbox.publish('t08.e', '{"seq": 5}', 'acct', 'B') - :base3 AS id;
SELECT aggregate_id, payload->>'seq' AS seq FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(:base3 + 3, 't08');
SELECT count(*) FROM eventbox.claim_batch(10, 't08');
-- A11 waits behind A10
SELECT status, id - :base3 AS id FROM eventbox.outbox('pending', 100, 't08') ORDER BY id;
SELECT status, id - :base3 AS id FROM eventbox.outbox('retrying', 100, 't08') ORDER BY id;

-- an event of A published with deliver_at ahead holds A's later events
-- back until it is due (nothing may overtake it), while B flows; then
-- it comes first, the others after it
SELECT test.last_id() AS base4 \gset
SELECT eventbox.publish('t08.e', '{"seq": 20}', 'acct', 'C') - :base4 AS id;
SELECT id - :base4 AS id FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(:base4 + 1, 't08');
SELECT eventbox.publish('t08.e', '{"seq": 21}', 'acct', 'C',
						deliver_at => clock_timestamp() + interval '1 second') - :base4 AS id;
SELECT eventbox.publish('t08.e', '{"seq": 22}', 'acct', 'C') - :base4 AS id;
SELECT eventbox.publish('t08.e', '{"seq": 6}', 'acct', 'B') - :base4 AS id;
SELECT aggregate_id, payload->>'seq' AS seq FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(:base4 + 4, 't08');
SELECT count(*) FROM eventbox.claim_batch(10, 't08');
SELECT pg_sleep(1.1);
SELECT payload->>'seq' AS seq, attempt FROM eventbox.claim_batch(10, 't08');
SELECT eventbox.ack(ARRAY[:base4 + 2, :base4 + 3]::bigint[], 't08');
SELECT count(*) FROM eventbox.claim_batch(10, 't08');

SELECT eventbox.unsubscribe('t08');

-- events without an aggregate are spread over lanes by id and flow freely
SELECT eventbox.subscribe('t08_free', event_types => '{t08.free}', ordering => 'aggregate');
SELECT count(*) FROM eventbox.publish_batch('[{"event_type": "t08.free"}, {"event_type": "t08.free"}]');
SELECT event_type, aggregate_id FROM eventbox.claim_batch(10, 't08_free');
SELECT eventbox.unsubscribe('t08_free');
