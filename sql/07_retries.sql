--
-- 07_retries: nack, backoff, retry_in, max_attempts and dead letters,
-- replay, purge, lease expiry, extend_lease (G3, G4).
--
SELECT eventbox.subscribe('t07', event_types => '{t07.*}', max_attempts => 3,
						  backoff_base => '10 seconds', backoff_max => '15 seconds');
SELECT test.last_id() AS base \gset
SELECT eventbox.publish('t07.a', '{"n": 1}', 'acct', '1') - :base AS id;
SELECT eventbox.publish('t07.b', '{"n": 2}') - :base AS id;

-- nack after the first attempt: retry after backoff_base (10 s) plus at
-- most 20% jitter, never earlier
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(1, 't07');
BEGIN;
SELECT eventbox.nack(:base + 1, 'first failure', subscription => 't07');
SELECT id - :base AS id, attempts, last_error,
	   due_at >= now() + interval '10 seconds' AS not_before_backoff,
	   due_at <= clock_timestamp() + interval '12 seconds' AS at_most_20pct_jitter
FROM eventbox.outbox('retrying', 100, 't07');
COMMIT;
-- not due yet: the next claim skips it and takes the next new event
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(10, 't07');
SELECT eventbox.ack(:base + 2, 't07');
SELECT count(*) FROM eventbox.claim_batch(10, 't07');
-- nack with retry_in overrides the backoff; 0 makes it due at once
SELECT eventbox.publish('t07.c') - :base AS id;
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(1, 't07');
SELECT eventbox.nack(:base + 3, 'later', retry_in => '1 hour', subscription => 't07');
SELECT id - :base AS id, due_at > now() + interval '59 minutes' AS in_an_hour
FROM eventbox.outbox('retrying', 100, 't07') ORDER BY id;
-- the stats count scheduled retries and the retried total
SELECT pending, leased, scheduled_retries, dead, retried_total
FROM eventbox.stats WHERE subscription = 't07';

-- max_attempts: a fresh subscription with no backoff, to step through it
SELECT eventbox.subscribe('t07_max', event_types => '{t07m.*}', max_attempts => 3,
						  backoff_base => '0', backoff_max => '0');
SELECT eventbox.publish('t07m.x', '{"secret": "payload"}', 'acct', '9',
						headers => '{"h": 1}') - :base AS id;
-- attempt 1 fails, due at once
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(10, 't07_max');
SELECT eventbox.nack(:base + 4, 'attempt 1 failed', subscription => 't07_max');
SELECT status, attempts, last_error FROM eventbox.outbox('retrying', 100, 't07_max');
-- retries come first, before new events, with the attempt number
SELECT eventbox.publish('t07m.y') - :base AS id;
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(10, 't07_max');
SELECT eventbox.ack(:base + 5, 't07_max');
-- while leased, the retry shows as leased with its attempts and last error
SELECT status, attempts, last_error FROM eventbox.outbox('leased', 100, 't07_max');
SELECT eventbox.nack(:base + 4, 'attempt 2 failed', retry_in => '0', subscription => 't07_max');
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(10, 't07_max');
-- the last attempt fails: dead
SELECT eventbox.nack(:base + 4, 'attempt 3 failed', subscription => 't07_max');
SELECT count(*) FROM eventbox.claim_batch(10, 't07_max');
-- the dead letter: no payload in dead_letters, payload in dead_letter_events
SELECT subscription, id - :base AS id, event_type, aggregate_type, aggregate_id,
	   attempts, last_error, event_id IS NOT NULL AS has_event_id,
	   dead_at <= now() AS dead_at_ok
FROM eventbox.dead_letters WHERE subscription = 't07_max';
SELECT id - :base AS id, payload, headers, attempts
FROM eventbox.dead_letter_events WHERE subscription = 't07_max';
SELECT array_agg(attname ORDER BY attnum) AS dead_letters_columns
FROM pg_attribute WHERE attrelid = 'eventbox.dead_letters'::regclass AND attnum > 0;
SELECT status, id - :base AS id, attempts, last_error FROM eventbox.outbox('dead', 100, 't07_max');
SELECT pending, leased, scheduled_retries, dead, delivered_total, acked_total,
	   retried_total, dead_lettered_total
FROM eventbox.stats WHERE subscription = 't07_max';
-- nack of a dead event: it is not leased
SELECT test.expect_error(format($$SELECT eventbox.nack(%s, 'x', subscription => 't07_max')$$, :base + 4));

-- replay: the dead letter becomes claimable again with fresh attempts
SELECT eventbox.replay_dead_letters('t07_max');
SELECT count(*) FROM eventbox.dead_letters WHERE subscription = 't07_max';
SELECT id - :base AS id, attempt, payload FROM eventbox.claim_batch(10, 't07_max');
SELECT eventbox.ack(:base + 4, 't07_max');
-- replay of selected ids, of nothing, of an unknown subscription
SELECT eventbox.subscribe('t07_one', event_types => '{t07o.*}', max_attempts => 1);
SELECT count(*) FROM eventbox.publish_batch('[{"event_type": "t07o.a"}, {"event_type": "t07o.b"}, {"event_type": "t07o.c"}]');
SELECT eventbox.nack(id, 'fatal', subscription => 't07_one') FROM eventbox.claim_batch(10, 't07_one') ORDER BY id;
SELECT id - :base AS id, attempts, last_error FROM eventbox.dead_letters WHERE subscription = 't07_one' ORDER BY id;
SELECT eventbox.replay_dead_letters('t07_one', ARRAY[:base + 7, :base + 999]::bigint[]) AS replayed;
SELECT eventbox.replay_dead_letters('t07_one', '{}') AS replayed_none;
SELECT id - :base AS id FROM eventbox.dead_letters WHERE subscription = 't07_one' ORDER BY id;
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(10, 't07_one');
SELECT eventbox.ack(:base + 7, 't07_one');
SELECT test.expect_error($$SELECT eventbox.replay_dead_letters('t07_nope')$$);
SELECT test.expect_error($$SELECT eventbox.replay_dead_letters(NULL)$$);

-- purge: older_than keeps recent dead letters; without it all go
SELECT eventbox.purge_dead_letters('t07_one', older_than => '1 hour') AS purged_old;
SELECT eventbox.purge_dead_letters('t07_one', older_than => '0') AS purged_all_older_than_now;
SELECT eventbox.purge_dead_letters('t07_one') AS purged;
SELECT count(*) FROM eventbox.dead_letters WHERE subscription = 't07_one';
SELECT eventbox.purge_dead_letters('t07_one') AS purged_again;
-- the log is untouched by purge
SELECT count(*) FROM eventbox.log WHERE id > :base AND event_type LIKE 't07o.%';
SELECT test.expect_error($$SELECT eventbox.purge_dead_letters('t07_nope')$$);
SELECT test.expect_error($$SELECT eventbox.purge_dead_letters(NULL)$$);
SELECT test.expect_error($$SELECT eventbox.purge_dead_letters('t07_one', '-1 day')$$);

-- backoff grows exponentially and is capped (base 10 s, cap 15 s):
-- attempt 1 -> 10..12 s, attempt 2 -> min(15, 20) = 15..18 s
SELECT eventbox.publish('t07.exp') - :base AS id;
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(1, 't07');
SELECT eventbox.nack(:base + 9, 'once', retry_in => '0', subscription => 't07');
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(1, 't07');
BEGIN;
SELECT eventbox.nack(:base + 9, 'twice', subscription => 't07');
SELECT due_at >= now() + interval '15 seconds' AS capped_not_before,
	   due_at <= clock_timestamp() + interval '18 seconds' AS capped_at_most
FROM eventbox.outbox('retrying', 100, 't07') WHERE id = :base + 9;
COMMIT;

-- lease expiry: a short lease runs out; the next claim counts a failed
-- attempt ('lease expired') and, with no backoff, hands the event out again
SELECT eventbox.subscribe('t07_lease', event_types => '{t07l.*}', max_attempts => 2,
						  backoff_base => '0', backoff_max => '0');
SELECT eventbox.publish('t07l.a') - :base AS id;
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(1, 't07_lease', lease => '50 ms');
SELECT pg_sleep(0.2);
SELECT id - :base AS id, attempt FROM eventbox.claim_batch(1, 't07_lease', lease => '50 ms');
SELECT status, attempts, last_error FROM eventbox.outbox('leased', 100, 't07_lease');
-- an expired lease cannot be nacked, extended or acked
SELECT pg_sleep(0.2);
SELECT test.expect_error(format($$SELECT eventbox.nack(%s, 'late', subscription => 't07_lease')$$, :base + 10));
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, '1 minute', subscription => 't07_lease')$$, :base + 10));
SELECT eventbox.ack(:base + 10, 't07_lease') AS late_ack;
-- the second expiry exhausts max_attempts: dead letter on the next claim
SELECT count(*) FROM eventbox.claim_batch(1, 't07_lease');
SELECT id - :base AS id, attempts, last_error FROM eventbox.dead_letters WHERE subscription = 't07_lease';

-- extend_lease: moves the deadline of the whole batch
SELECT count(*) FROM eventbox.publish_batch('[{"event_type": "t07l.b"}, {"event_type": "t07l.c"}]');
SELECT id - :base AS id FROM eventbox.claim_batch(10, 't07_lease', lease => '1 second') ORDER BY id;
SELECT eventbox.extend_lease(:base + 11, '1 hour', 't07_lease') > now() + interval '59 minutes' AS extended;
SELECT id - :base AS id, due_at > now() + interval '59 minutes' AS leased_an_hour
FROM eventbox.outbox('leased', 100, 't07_lease') ORDER BY id;
SELECT pg_sleep(1.1);
-- still leased after the original lease would have run out
SELECT count(*) FROM eventbox.claim_batch(10, 't07_lease');
SELECT eventbox.ack(ARRAY[:base + 11, :base + 12]::bigint[], 't07_lease');
-- extend_lease with a token: the right one works, another is refused
SELECT eventbox.publish('t07l.d') - :base AS id;
SELECT lease AS tok FROM eventbox.claim_batch(1, 't07_lease') \gset
SELECT eventbox.extend_lease(:base + 13, '1 minute', 't07_lease', :'tok') > now() AS extended;
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, '1 minute', 't07_lease', gen_random_uuid())$$, :base + 13));
SELECT test.expect_error(format($$SELECT eventbox.nack(%s, 'x', subscription => 't07_lease', lease => gen_random_uuid())$$, :base + 13));
SELECT eventbox.nack(:base + 13, 'with token', retry_in => '1 hour', subscription => 't07_lease', lease => :'tok');

-- nack and extend_lease of an id that is not leased: 55000
SELECT test.expect_error(format($$SELECT eventbox.nack(%s, subscription => 't07')$$, :base + 2));
SELECT test.expect_error($$SELECT eventbox.nack(-1, subscription => 't07')$$);
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, '1 minute', 't07')$$, :base + 2));
-- other bad input
SELECT eventbox.publish('t07.bad') - :base AS id;
SELECT id - :base AS id FROM eventbox.claim_batch(1, 't07');
SELECT test.expect_error(format($$SELECT eventbox.nack(%s, retry_in => '-1 s', subscription => 't07')$$, :base + 14));
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, '-1 s', 't07')$$, :base + 14));
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, '0', 't07')$$, :base + 14));
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, NULL, 't07')$$, :base + 14));
SELECT test.expect_error($$SELECT eventbox.nack(NULL, subscription => 't07')$$);
SELECT test.expect_error($$SELECT eventbox.extend_lease(NULL, '1 s', 't07')$$);
SELECT test.expect_error(format($$SELECT eventbox.nack(%s, subscription => 't07_nope')$$, :base + 14));
SELECT test.expect_error(format($$SELECT eventbox.extend_lease(%s, '1 s', 't07_nope')$$, :base + 14));
-- the event is still leased after all those errors
SELECT id - :base AS id, status FROM eventbox.outbox('leased', 100, 't07');

SELECT eventbox.unsubscribe(name) FROM eventbox.subscriptions WHERE name LIKE 't07%' ORDER BY name;

-- The backoff is the capped exponential with up to 20% on top, however
-- many attempts were made: base * 2^(attempt - 1) for a base of 10 s went
-- past the interval range at attempt 41 and every retry failed from then on.
SELECT a.attempt, a.base, a.cap,
	   EXTRACT(epoch FROM b) BETWEEN EXTRACT(epoch FROM a.low)
								 AND EXTRACT(epoch FROM a.low) * 1.2 AS within_jitter
FROM (VALUES
	(1, interval '1 second', interval '1 hour', interval '1 second'),
	(3, interval '1 second', interval '1 hour', interval '4 seconds'),
	(41, interval '10 seconds', interval '1 minute', interval '1 minute'),
	(1000, interval '1 day', interval '2 days', interval '2 days'),
	(1000, interval '100 years', interval '100 years', interval '100 years'),
	(5, interval '0', interval '0', interval '0')
) a(attempt, base, cap, low)
CROSS JOIN LATERAL eventbox._backoff(a.attempt, a.base, a.cap) b;

-- A claim finds and leases due retries through plans that stay good
-- whatever the statistics were when the backend settled on its generic
-- plans.  With 10,000 retries not yet due and one due, a claim read all of
-- them: as one UPDATE joined with the query picking the due rows, the
-- generic plan hashed every retry row of the subscription against them.
-- Counted in rows read, not timed.
SELECT eventbox.subscribe('t07_many', '{t07m.*}', max_attempts => 100,
						  backoff_base => '1 hour', backoff_max => '1 hour') IS NOT NULL AS subscribed;
SELECT count(*) FROM eventbox.publish_batch((SELECT jsonb_agg(jsonb_build_object('event_type', 't07m.x'))
											FROM generate_series(1, 10001)));
SELECT count(*) FROM eventbox.claim_batch(10000, 't07_many', '1 millisecond');
SELECT pg_sleep(0.01);
-- this claim expires that lease (10,000 retries, due in an hour) and takes
-- the last event, which is failed to be retried at once
SELECT eventbox.nack(id, 'boom', '0', 't07_many') FROM eventbox.claim_batch(1, 't07_many');
SELECT count(*) AS retries, count(*) FILTER (WHERE next_attempt_at <= now()) AS due
FROM eventbox.retries r JOIN eventbox.subscriptions s USING (sub_id) WHERE s.name = 't07_many';
ANALYZE eventbox.retries;
-- the plans a backend settles on after a few claims, whatever their sizes
SET plan_cache_mode = force_generic_plan;
BEGIN;
-- what this backend read before (counts not yet sent to the statistics
-- system, from earlier transactions too)
SELECT seq_tup_read + idx_tup_fetch AS read_before
FROM pg_stat_xact_user_tables WHERE relid = 'eventbox.retries'::regclass \gset
SELECT eventbox.ack(id, 't07_many') FROM eventbox.claim_batch(10, 't07_many');
SELECT seq_tup_read + idx_tup_fetch - :read_before < 100 AS read_few
FROM pg_stat_xact_user_tables WHERE relid = 'eventbox.retries'::regclass;
COMMIT;
RESET plan_cache_mode;
SELECT eventbox.unsubscribe('t07_many');
