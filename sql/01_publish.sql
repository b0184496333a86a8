--
-- 01_publish: publish with every argument, ids, UUIDv7 event ids,
-- atomicity (G1), request context headers, deliver_at, integrity (G6).
--
-- A subscription that only sees what this file publishes.
SELECT eventbox.subscribe('t01', event_types => '{t01.*}', start_at => 'now');
-- ids are printed relative to the last id before this file
SELECT test.last_id() AS base \gset

-- the minimal call: only the event type
SELECT eventbox.publish('t01.minimal') - :base AS id;
-- every argument, positional
SELECT eventbox.publish('t01.full', '{"n": 1}', 'order', '42', '{"h": "v"}',
						't01-key', now() - interval '1 minute') - :base AS id;
-- every argument, by name
SELECT eventbox.publish(event_type => 't01.named', payload => '{"n": 2}',
						aggregate_type => 'order', aggregate_id => '43',
						headers => '{"h": "w"}', dedupe_key => NULL,
						deliver_at => NULL) - :base AS id;
-- ids increase inside a transaction and across transactions
BEGIN;
SELECT eventbox.publish('t01.seq', '{"i": 1}') - :base AS id;
SELECT eventbox.publish('t01.seq', '{"i": 2}') - :base AS id;
COMMIT;
SELECT eventbox.publish('t01.seq', '{"i": 3}') - :base AS id;

-- what the log holds: one row per event
SELECT id - :base AS id, event_type, aggregate_type, aggregate_id, payload,
	   headers, dedupe_key, deliver_at IS NOT NULL AS has_deliver_at
FROM eventbox.log WHERE id > :base ORDER BY id;
-- event_id is a UUIDv7 (version nibble 7, RFC variant), unique, and
-- increases with id for events of one backend
SELECT bool_and(event_id::text ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$') AS uuidv7,
	   count(DISTINCT event_id) = count(*) AS unique_ids,
	   array_agg(id ORDER BY id) = array_agg(id ORDER BY event_id) AS same_order
FROM eventbox.log WHERE id > :base;
-- occurred_at is the publishing transaction's start: one value for the two
-- events of the first transaction, and never in the future
SELECT count(DISTINCT occurred_at) AS distinct_times,
	   bool_and(occurred_at <= now()) AS not_in_future
FROM eventbox.log WHERE id > :base AND payload->>'i' IN ('1', '2');

-- G1: a rolled-back transaction publishes nothing
BEGIN;
SELECT eventbox.publish('t01.rolled_back') > :base AS got_an_id;
ROLLBACK;
-- G1: a rolled-back savepoint publishes nothing; a released one does
BEGIN;
SELECT eventbox.publish('t01.kept') > :base AS got_an_id;
SAVEPOINT s1;
SELECT eventbox.publish('t01.savepoint_rolled_back') > :base AS got_an_id;
SAVEPOINT s2;
SELECT eventbox.publish('t01.nested_rolled_back') > :base AS got_an_id;
ROLLBACK TO SAVEPOINT s1;
SAVEPOINT s3;
SELECT eventbox.publish('t01.savepoint_released') > :base AS got_an_id;
RELEASE SAVEPOINT s3;
COMMIT;
-- a savepoint rolled back after an error, then the transaction commits
BEGIN;
SAVEPOINT s1;
SELECT eventbox.publish('t01.before_error') > :base AS got_an_id;
SELECT 1/0;
ROLLBACK TO SAVEPOINT s1;
COMMIT;
-- no trace of any of them in the log
SELECT event_type FROM eventbox.log
WHERE id > :base AND event_type IN ('t01.rolled_back', 't01.savepoint_rolled_back',
									't01.nested_rolled_back', 't01.before_error');

-- G6: the consumer receives exactly what was published, in log order;
-- nothing that rolled back
SELECT id - :base AS id, event_type, aggregate_type, aggregate_id, payload,
	   headers, subscription, attempt, lease IS NOT NULL AS has_lease,
	   leased_until > now() AS leased, occurred_at IS NOT NULL AS has_time
FROM eventbox.claim_batch(100, 't01') ORDER BY id;
-- the delivered event_id is the logged one
SELECT count(*) FROM eventbox.log l
WHERE l.id > :base AND l.event_type = 't01.minimal'
  AND l.event_id = (eventbox.event(l.id)).event_id;
SELECT eventbox.ack(array_agg(id), 't01') FROM eventbox.log WHERE id > :base;

-- G6 for unusual content: unicode, escapes, big and exact numbers, nesting
SELECT eventbox.publish('t01.content',
	'{"s": "grüße € 😀 \"q\" \\ \n", "n": 1.50, "big": 123456789012345678901234567890,
	  "neg": -0.000001, "a": [1, {"b": null}, [], {}], "t": true, "e": ""}',
	headers => '{"k": "ü", "nested": {"x": [1]}}') - :base AS id;
SELECT payload = '{"s": "grüße € 😀 \"q\" \\ \n", "n": 1.50, "big": 123456789012345678901234567890,
	  "neg": -0.000001, "a": [1, {"b": null}, [], {}], "t": true, "e": ""}'::jsonb AS same_payload,
	   payload->>'n' AS n, payload->>'big' AS big, headers
FROM eventbox.claim_batch(10, 't01');
SELECT eventbox.ack(array_agg(id), 't01') FROM eventbox.log WHERE id > :base;

-- request context: SET LOCAL settings are merged into the headers
BEGIN;
SET LOCAL eventbox.actor = 'alice';
SET LOCAL eventbox.correlation_id = 'corr-1';
SET LOCAL eventbox.causation_id = 'cause-1';
SELECT eventbox.publish('t01.ctx', headers => '{"x": 1}') - :base AS id;
-- explicit headers win over the context
SELECT eventbox.publish('t01.ctx_explicit',
						headers => '{"actor": "bob", "correlation_id": "corr-2"}') - :base AS id;
COMMIT;
-- SET LOCAL ended with the transaction
SELECT eventbox.publish('t01.ctx_after') - :base AS id;
-- a session-level SET applies until RESET; an empty value adds nothing
SET eventbox.actor = 'carol';
SET eventbox.correlation_id = '';
SELECT eventbox.publish('t01.ctx_session') - :base AS id;
RESET eventbox.actor;
RESET eventbox.correlation_id;
-- batch members get the context too
BEGIN;
SET LOCAL eventbox.actor = 'dave';
SELECT id - :base AS id FROM eventbox.publish_batch(
	'[{"event_type": "t01.ctx_batch"}, {"event_type": "t01.ctx_batch", "headers": {"actor": "erin"}}]') id;
COMMIT;
SELECT event_type, headers FROM eventbox.claim_batch(10, 't01') ORDER BY id;
SELECT eventbox.ack(array_agg(id), 't01') FROM eventbox.log WHERE id > :base;

-- deliver_at: not delivered before that time.  An event due in an hour
-- waits; one due in a moment comes after the moment.
SELECT eventbox.publish('t01.later', deliver_at => clock_timestamp() + interval '1 hour') - :base AS id;
SELECT eventbox.publish('t01.soon', deliver_at => clock_timestamp() + interval '1 second') - :base AS id;
SELECT eventbox.publish('t01.now', deliver_at => clock_timestamp() - interval '1 second') - :base AS id;
SELECT event_type, attempt FROM eventbox.claim_batch(10, 't01') ORDER BY id;
SELECT event_type, due_at > now() + interval '59 minutes' AS due_in_an_hour
FROM eventbox.outbox('retrying', 100, 't01') ORDER BY id;
SELECT pg_sleep(1.1);
SELECT event_type, attempt FROM eventbox.claim_batch(10, 't01') ORDER BY id;
SELECT event_type, due_at > now() + interval '59 minutes' AS due_in_an_hour
FROM eventbox.outbox('retrying', 100, 't01') ORDER BY id;
SELECT eventbox.ack(array_agg(id), 't01') FROM eventbox.log WHERE id > :base;

-- payload and headers must be JSON objects (SQL NULL is a missing value)
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', '[]')$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', '42')$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', '"text"')$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', 'null')$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', NULL)$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', headers => '[1]')$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', headers => 'true')$$);
SELECT test.expect_error($$SELECT eventbox.publish('t01.bad', headers => NULL)$$);
SELECT test.expect_error($$SELECT eventbox.publish(NULL)$$);
-- nothing of them reached the log
SELECT count(*) FROM eventbox.log WHERE id > :base AND event_type = 't01.bad';

-- nothing left for the subscription but the event due in an hour
SELECT pending, leased, scheduled_retries, dead FROM eventbox.stats WHERE subscription = 't01';
SELECT eventbox.unsubscribe('t01');
