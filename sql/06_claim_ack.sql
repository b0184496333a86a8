--
-- 06_claim_ack: claim_batch, ack (single and array, idempotent, lease
-- tokens), the eventbox.subscription default, paused subscriptions,
-- fan-out, bad input.
--
SELECT eventbox.subscribe('t06_a', event_types => '{t06.*}');
SELECT eventbox.subscribe('t06_b', event_types => '{t06.*}');
SELECT test.last_id() AS base \gset
SELECT count(*) FROM eventbox.publish_batch(
	(SELECT jsonb_agg(jsonb_build_object('event_type', 't06.e', 'payload',
										 jsonb_build_object('i', i)) ORDER BY i)
	 FROM generate_series(1, 5) i));

-- claim takes up to n events in log order, one lease for the batch
SELECT id - :base AS id, payload->>'i' AS i, subscription, attempt,
	   leased_until > now() AS leased,
	   leased_until <= now() + interval '31 seconds' AS default_lease_30s
FROM eventbox.claim_batch(2, 't06_a');


-- the next claim gets the next events, under another lease token; an
-- explicit lease interval sets the deadline
SELECT id - :base AS id, attempt,
	   leased_until > now() + interval '9 minutes' AS leased_10min
FROM eventbox.claim_batch(2, 't06_a', lease => '10 minutes');
-- what is leased, what is pending
SELECT status, id - :base AS id, attempts FROM eventbox.outbox('leased', 100, 't06_a') ORDER BY id;
SELECT status, id - :base AS id FROM eventbox.outbox('pending', 100, 't06_a') ORDER BY id;

-- ack one: true; again: false (idempotent); never claimed: false
SELECT eventbox.ack(:base + 1, 't06_a') AS first_ack;
SELECT eventbox.ack(:base + 1, 't06_a') AS second_ack;
SELECT eventbox.ack(:base + 5, 't06_a') AS never_claimed;
SELECT eventbox.ack(-1, 't06_a') AS no_such_event;
-- ack an array: counts only what was leased; duplicates and NULLs count once
SELECT eventbox.ack(ARRAY[:base + 1, :base + 2, :base + 2, NULL, :base + 5, :base + 99]::bigint[],
					't06_a') AS acked;
SELECT eventbox.ack('{}'::bigint[], 't06_a') AS acked_none;
SELECT eventbox.ack(ARRAY[NULL]::bigint[], 't06_a') AS acked_null;
SELECT status, id - :base AS id FROM eventbox.outbox('leased', 100, 't06_a') ORDER BY id;
SELECT eventbox.ack(ARRAY[:base + 3, :base + 4]::bigint[], 't06_a') AS acked;
-- an acked event is never delivered again (G3)
SELECT id - :base AS id FROM eventbox.claim_batch(100, 't06_a');
SELECT eventbox.ack(:base + 5, 't06_a');
SELECT count(*) FROM eventbox.claim_batch(100, 't06_a');

-- fan-out: the other subscription gets every event too, independently
SELECT array_agg(id - :base ORDER BY id) AS ids FROM eventbox.claim_batch(100, 't06_b');
-- acking in one subscription does not ack in the other
SELECT eventbox.ack(:base + 1, 't06_a') AS a, eventbox.ack(:base + 1, 't06_b') AS b;
-- a subscription's claim never sees another's leased or acked events
SELECT count(*) FROM eventbox.claim_batch(100, 't06_b');

-- lease tokens: an ack with the current token works, with another token
-- it is rejected like an ack of an unleased event
SELECT eventbox.publish('t06.tok') - :base AS id;
SELECT id AS tok_id, lease AS tok_lease FROM eventbox.claim_batch(1, 't06_a') \gset
SELECT eventbox.ack(:tok_id, 't06_a', gen_random_uuid()) AS wrong_token;
SELECT eventbox.ack(ARRAY[:tok_id], 't06_a', gen_random_uuid()) AS wrong_token_array;
SELECT eventbox.ack(:tok_id, 't06_a', :'tok_lease') AS right_token;
SELECT eventbox.ack(:tok_id, 't06_a', :'tok_lease') AS right_token_again;
-- a stale token: the lease expired and the event went to a new claim;
-- the old token is rejected, the new one works (G3)
SELECT eventbox.alter_subscription('t06_a', backoff_base => '0');
SELECT eventbox.publish('t06.stale') - :base AS id;
SELECT id AS st_id, lease AS old_lease FROM eventbox.claim_batch(1, 't06_a', lease => '50 ms') \gset
SELECT pg_sleep(0.1);
SELECT id = :st_id AS same_event, attempt AS st_attempt, lease <> :'old_lease' AS new_token,
	   lease AS new_lease
FROM eventbox.claim_batch(1, 't06_a') \gset
SELECT :'same_event' AS same_event, :st_attempt AS attempt, :'new_token' AS new_token;
SELECT eventbox.ack(:st_id, 't06_a', :'old_lease') AS stale_token;
SELECT eventbox.ack(ARRAY[:st_id], 't06_a', :'old_lease') AS stale_token_array;
SELECT status, id = :st_id AS same_event FROM eventbox.outbox('leased', 100, 't06_a');
SELECT eventbox.ack(:st_id, 't06_a', :'new_lease') AS new_token;
SELECT count(*) FROM eventbox.outbox('leased', 100, 't06_a');

-- acking inside the consumer's transaction: a rolled-back ack is undone
SELECT eventbox.publish('t06.tx') - :base AS id;
SELECT id AS tx_id FROM eventbox.claim_batch(1, 't06_a') \gset
BEGIN;
SELECT eventbox.ack(:tx_id, 't06_a');
ROLLBACK;
SELECT eventbox.ack(:tx_id, 't06_a') AS still_leased;

-- the subscription argument defaults to eventbox.subscription
SELECT eventbox.publish('t06.default_sub') - :base AS id;
SET eventbox.subscription = 't06_b';
SELECT event_type, subscription FROM eventbox.claim_batch(10);
SELECT eventbox.ack(id) FROM eventbox.log WHERE id > :base AND event_type = 't06.default_sub';
-- explicit wins over the setting
SELECT event_type, subscription FROM eventbox.claim_batch(10, 't06_a');
RESET eventbox.subscription;
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(10)$$);
SELECT test.expect_error($$SELECT eventbox.ack(1::bigint)$$);
SET eventbox.subscription = 't06_nope';
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(10)$$);
RESET eventbox.subscription;

-- a paused subscription returns nothing; resume gives the events
SELECT eventbox.publish('t06.paused') - :base AS id;
SELECT eventbox.pause('t06_b');
SELECT count(*) AS while_paused FROM eventbox.claim_batch(10, 't06_b');
SELECT eventbox.resume('t06_b');
SELECT event_type FROM eventbox.claim_batch(10, 't06_b');

-- a claim inside a transaction that rolls back gives nothing away
SELECT eventbox.publish('t06.rollback_claim') - :base AS id;
BEGIN;
SELECT event_type FROM eventbox.claim_batch(10, 't06_b');
ROLLBACK;
SELECT event_type, attempt FROM eventbox.claim_batch(10, 't06_b');

-- bad input
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(0, 't06_a')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(-1, 't06_a')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(NULL, 't06_a')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(10001, 't06_a')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(10000, 't06_a')$$);
SET eventbox.max_claim_size = 5;
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(6, 't06_a')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(5, 't06_a')$$);
RESET eventbox.max_claim_size;
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 't06_nope')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 't06_a', lease => '0')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 't06_a', lease => '-1 s')$$);
SELECT eventbox.subscribe('t06_push', mode => 'push');
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 't06_push')$$);
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 'default')$$);
SELECT test.expect_error($$SELECT eventbox.ack(NULL::bigint, 't06_a')$$);
SELECT test.expect_error($$SELECT eventbox.ack(NULL::bigint[], 't06_a')$$);
SELECT test.expect_error($$SELECT eventbox.ack(1::bigint, 't06_nope')$$);
SELECT test.expect_error($$SELECT eventbox.ack(ARRAY[1]::bigint[], 't06_nope')$$);

-- claims and acks plan through the indexes (enable_seqscan and
-- enable_bitmapscan off for the call) and leave the session's planner
-- settings as they were, also when they fail
SELECT eventbox.publish('t06.settings') - :base AS id;
SELECT count(*) FROM eventbox.claim_batch(10, 't06_b');
SELECT current_setting('enable_seqscan') AS seqscan,
	   current_setting('enable_bitmapscan') AS bitmapscan;
SELECT eventbox.ack(ARRAY[1]::bigint[], 't06_b');
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 't06_nope')$$);
SET enable_bitmapscan = off;
SELECT count(*) FROM eventbox.claim_batch(10, 't06_b');
SELECT current_setting('enable_seqscan') AS seqscan,
	   current_setting('enable_bitmapscan') AS bitmapscan;
RESET enable_bitmapscan;

-- an idle subscription: once a claim found nothing, the next claims that
-- can find nothing return without locking the cursor, so they take no
-- transaction id (and write no WAL); anything that might be claimable
-- sends them down the locked path
-- one claim in a transaction of its own, and whether it took an xid
CREATE FUNCTION test.idle_claim(sub text, OUT claimed bigint, OUT no_xid boolean)
LANGUAGE plpgsql AS $$
BEGIN
	SELECT count(*) INTO claimed FROM eventbox.claim_batch(10, sub);
	no_xid := pg_current_xact_id_if_assigned() IS NULL;
END
$$;
SELECT eventbox.subscribe('t06_idle', '{t06idle.*}');
SELECT count(*) FROM eventbox.claim_batch(10, 't06_idle');
SELECT * FROM test.idle_claim('t06_idle');
SELECT eventbox.publish('t06idle.a') - :base AS id \gset idle_
SELECT id - :base = :idle_id AS is_it FROM eventbox.claim_batch(10, 't06_idle');
SELECT eventbox.ack(:base + :idle_id, 't06_idle');
-- the claim after a batch locks (it does not know yet that nothing came)
SELECT count(*) FROM eventbox.claim_batch(10, 't06_idle');
SELECT * FROM test.idle_claim('t06_idle');
-- an event of a type the subscription does not take is a log row after
-- the cursor all the same: the claim locks and finds nothing
SELECT eventbox.publish('t06other.a') > 0 AS published;
SELECT * FROM test.idle_claim('t06_idle');
-- a retry that came due is found by an idle claimer
SELECT eventbox.publish('t06idle.b') - :base AS id \gset idle_
SELECT id - :base = :idle_id AS is_it FROM eventbox.claim_batch(10, 't06_idle');
SELECT count(*) FROM eventbox.claim_batch(10, 't06_idle');
SELECT eventbox.nack(:base + :idle_id, 'again', retry_in => '0', subscription => 't06_idle');
SELECT id - :base = :idle_id AS is_it, attempt FROM eventbox.claim_batch(10, 't06_idle');
SELECT eventbox.ack(:base + :idle_id, 't06_idle');
SELECT count(*) FROM eventbox.claim_batch(10, 't06_idle');
-- and so is an event published while the claimer was idle
SELECT * FROM test.idle_claim('t06_idle');
SELECT eventbox.publish('t06idle.c') - :base AS id \gset idle_
SELECT id - :base = :idle_id AS is_it FROM eventbox.claim_batch(10, 't06_idle');
SELECT eventbox.ack(:base + :idle_id, 't06_idle');
SELECT eventbox.unsubscribe('t06_idle');
DROP FUNCTION test.idle_claim(text);

SELECT eventbox.unsubscribe('t06_a');
SELECT eventbox.unsubscribe('t06_b');
SELECT eventbox.unsubscribe('t06_push');
