--
-- 11_bad_input: every bad input of SPEC section 7 in one place, with its
-- SQLSTATE.  All of it runs inside one transaction that has already done
-- some work; each error is caught at a savepoint (test.expect_error runs
-- the statement in a subtransaction).  At the end the transaction's
-- earlier work is untouched and no event was half-written.
--
SELECT eventbox.subscribe('t11', event_types => '{t11.*}', backoff_base => '0', backoff_max => '0');
SELECT eventbox.subscribe('t11_push', mode => 'push', event_types => '{t11.*}');
SELECT eventbox.publish('t11.leased') > 0 AS published;
SELECT id AS leased_id FROM eventbox.claim_batch(1, 't11') \gset
SELECT eventbox.publish('t11.not_leased') AS not_leased_id \gset
SELECT test.last_id() AS base \gset
CREATE TABLE t11_work (n int);

BEGIN;
-- the transaction's earlier work: a business row and an event
INSERT INTO t11_work VALUES (1);
SELECT eventbox.publish('t11.good', '{"before": true}') - :base AS id;

-- event_type: empty, malformed, too long, bad characters, NULL
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('empty', $$SELECT eventbox.publish('')$$),
	('leading dot', $$SELECT eventbox.publish('.order.created')$$),
	('trailing dot', $$SELECT eventbox.publish('order.created.')$$),
	('only a dot', $$SELECT eventbox.publish('.')$$),
	('double dot', $$SELECT eventbox.publish('order..created')$$),
	('space', $$SELECT eventbox.publish('order created')$$),
	('slash', $$SELECT eventbox.publish('order/created')$$),
	('star', $$SELECT eventbox.publish('order.*')$$),
	('question mark', $$SELECT eventbox.publish('order.?')$$),
	('greater than', $$SELECT eventbox.publish('order.>')$$),
	('non-ASCII', $$SELECT eventbox.publish('bestellung.größe')$$),
	('tab', $$SELECT eventbox.publish(E'order\tcreated')$$),
	('newline', $$SELECT eventbox.publish(E'order\ncreated')$$),
	('256 bytes', $$SELECT eventbox.publish(repeat('a', 256))$$),
	('128 two-byte chars', $$SELECT eventbox.publish(repeat('é', 128))$$),
	('NULL', $$SELECT eventbox.publish(NULL)$$)
) a(label, sql);
-- the limits that are allowed: 255 bytes, every allowed character
SELECT eventbox.publish(repeat('a', 255)) - :base AS id;
SELECT eventbox.publish('Az09_.:-x') - :base AS id;
SELECT eventbox.publish('a:b-c_d') - :base AS id;

-- aggregate_type without aggregate_id, the reverse, and empty values
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('type only', $$SELECT eventbox.publish('t11.x', '{}', 'order', NULL)$$),
	('id only', $$SELECT eventbox.publish('t11.x', '{}', NULL, '42')$$),
	('empty type', $$SELECT eventbox.publish('t11.x', '{}', '', '42')$$),
	('empty id', $$SELECT eventbox.publish('t11.x', '{}', 'order', '')$$)
) a(label, sql);

-- payload and headers that are not JSON objects
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('payload array', $$SELECT eventbox.publish('t11.x', '[]')$$),
	('payload number', $$SELECT eventbox.publish('t11.x', '1')$$),
	('payload string', $$SELECT eventbox.publish('t11.x', '"s"')$$),
	('payload JSON null', $$SELECT eventbox.publish('t11.x', 'null')$$),
	('payload SQL NULL', $$SELECT eventbox.publish('t11.x', NULL)$$),
	('headers array', $$SELECT eventbox.publish('t11.x', headers => '[]')$$),
	('headers boolean', $$SELECT eventbox.publish('t11.x', headers => 'false')$$),
	('headers SQL NULL', $$SELECT eventbox.publish('t11.x', headers => NULL)$$),
	('batch payload', $$SELECT eventbox.publish_batch('[{"event_type": "t11.x", "payload": [1]}]')$$),
	('batch headers', $$SELECT eventbox.publish_batch('[{"event_type": "t11.x", "headers": "h"}]')$$)
) a(label, sql);

-- deliver_at that never comes (or is no time at all); the finite ones
-- beside them are accepted
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('deliver_at infinity', $$SELECT eventbox.publish('t11.x', deliver_at => 'infinity')$$),
	('deliver_at -infinity', $$SELECT eventbox.publish('t11.x', deliver_at => '-infinity')$$),
	('batch deliver_at infinity', $$SELECT eventbox.publish_batch('[{"event_type": "t11.x", "deliver_at": "infinity"}]')$$),
	('deliver_at far future', $$SELECT eventbox.publish('t11.later', deliver_at => '9999-12-31')$$),
	('deliver_at past', $$SELECT eventbox.publish('t11.now', deliver_at => '2000-01-01')$$)
) a(label, sql);

-- aggregate names and dedupe keys over their limits (index keys of the
-- log); at the limit they are accepted
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('aggregate_type 256 bytes', $$SELECT eventbox.publish('t11.x', '{}', repeat('t', 256), '1')$$),
	('aggregate_id 2049 bytes', $$SELECT eventbox.publish('t11.x', '{}', 'o', repeat('i', 2049))$$),
	('dedupe_key 2049 bytes', $$SELECT eventbox.publish('t11.x', dedupe_key => repeat('k', 2049))$$),
	('batch aggregate_id 2049 bytes', $$SELECT eventbox.publish_batch(jsonb_build_array(jsonb_build_object('event_type', 't11.x', 'aggregate_type', 'o', 'aggregate_id', repeat('i', 2049))))$$),
	-- hex digits do not compress: the index entries take the full size
	('at the limits', $$SELECT eventbox.publish('t11.limits', '{}', repeat('t', 255),
		(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 64) i),
		dedupe_key => (SELECT string_agg(md5((-i)::text), '') FROM generate_series(1, 64) i))$$)
) a(label, sql);

-- payload over eventbox.max_payload_size (lowered for the test)
SET LOCAL eventbox.max_payload_size = 100;
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('over the limit', $$SELECT eventbox.publish('t11.x', jsonb_build_object('s', repeat('x', 200)))$$),
	('batch over the limit', $$SELECT eventbox.publish_batch(jsonb_build_array(jsonb_build_object('event_type', 't11.x', 'payload', jsonb_build_object('s', repeat('x', 200)))))$$),
	('under the limit', $$SELECT eventbox.publish('t11.small', jsonb_build_object('s', repeat('x', 10)))$$)
) a(label, sql);
RESET eventbox.max_payload_size;
SELECT test.expect_error($$SET eventbox.max_payload_size = 0$$);

-- n <= 0, NULL, over the maximum claim size
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('n = 0', $$SELECT * FROM eventbox.claim_batch(0, 't11')$$),
	('n < 0', $$SELECT * FROM eventbox.claim_batch(-5, 't11')$$),
	('n NULL', $$SELECT * FROM eventbox.claim_batch(NULL, 't11')$$),
	('n > max', $$SELECT * FROM eventbox.claim_batch(10001, 't11')$$)
) a(label, sql);
SET LOCAL eventbox.max_claim_size = 2;
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(3, 't11')$$);
RESET eventbox.max_claim_size;

-- unknown subscription, claim on a push subscription
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('claim', $$SELECT * FROM eventbox.claim_batch(1, 't11_nope')$$),
	('ack', $$SELECT eventbox.ack(1::bigint, 't11_nope')$$),
	('nack', $$SELECT eventbox.nack(1, subscription => 't11_nope')$$),
	('extend_lease', $$SELECT eventbox.extend_lease(1, '1 s', 't11_nope')$$),
	('alter', $$SELECT eventbox.alter_subscription('t11_nope')$$),
	('unsubscribe', $$SELECT eventbox.unsubscribe('t11_nope')$$),
	('replay', $$SELECT eventbox.replay_dead_letters('t11_nope')$$),
	('purge', $$SELECT eventbox.purge_dead_letters('t11_nope')$$),
	('outbox', $$SELECT * FROM eventbox.outbox('pending', 1, 't11_nope')$$),
	('claim push', $$SELECT * FROM eventbox.claim_batch(1, 't11_push')$$),
	('claim push_once', $$SELECT * FROM eventbox.claim_batch(1, 'default')$$)
) a(label, sql);

-- nack or extend_lease of an id that is not leased
SELECT a.label, test.expect_error(format(a.sql, :not_leased_id)) FROM (VALUES
	('nack', $$SELECT eventbox.nack(%s, subscription => 't11')$$),
	('extend_lease', $$SELECT eventbox.extend_lease(%s, '1 s', 't11')$$)
) a(label, sql);
-- ... and of a leased one under a wrong lease token
SELECT a.label, test.expect_error(format(a.sql, :leased_id)) FROM (VALUES
	('nack', $$SELECT eventbox.nack(%s, subscription => 't11', lease => gen_random_uuid())$$),
	('extend_lease', $$SELECT eventbox.extend_lease(%s, '1 s', 't11', gen_random_uuid())$$)
) a(label, sql);

-- bad glob patterns
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('empty list', $$SELECT eventbox.subscribe('t11_bad', event_types => '{}')$$),
	('empty pattern', $$SELECT eventbox.subscribe('t11_bad', event_types => '{""}')$$),
	('NULL pattern', $$SELECT eventbox.subscribe('t11_bad', event_types => ARRAY[NULL]::text[])$$),
	('regex chars', $$SELECT eventbox.subscribe('t11_bad', event_types => '{"order.[a-z]+"}')$$),
	('space', $$SELECT eventbox.subscribe('t11_bad', event_types => '{"a b"}')$$),
	('backslash', $$SELECT eventbox.subscribe('t11_bad', event_types => '{"a\\\\.b"}')$$),
	('too long', $$SELECT eventbox.subscribe('t11_bad', event_types => ARRAY[repeat('*', 256)])$$),
	('leading dot', $$SELECT eventbox.subscribe('t11_bad', event_types => '{".order"}')$$),
	('trailing dot', $$SELECT eventbox.subscribe('t11_bad', event_types => '{"order.*", "order."}')$$),
	('two dots', $$SELECT eventbox.subscribe('t11_bad', event_types => '{"order..*"}')$$)
) a(label, sql);

-- invalid subscription and channel names
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('name with space', $$SELECT eventbox.subscribe('t11 bad')$$),
	('name too long', $$SELECT eventbox.subscribe(repeat('n', 64))$$),
	('channel with quote', $$SELECT eventbox.subscribe('t11_bad', channel => 'a"b')$$),
	('channel empty', $$SELECT eventbox.subscribe('t11_bad', channel => '')$$),
	('channel too long', $$SELECT eventbox.subscribe('t11_bad', channel => repeat('c', 64))$$)
) a(label, sql);

-- negative intervals; max_attempts < 1
SELECT a.label, test.expect_error(format(a.sql, :leased_id)) FROM (VALUES
	('lease', $$SELECT eventbox.subscribe('t11_bad', lease => '-1 s')$$),
	('backoff_base', $$SELECT eventbox.subscribe('t11_bad', backoff_base => '-1 s')$$),
	('backoff_max', $$SELECT eventbox.subscribe('t11_bad', backoff_max => '-1 s')$$),
	('claim lease', $$SELECT * FROM eventbox.claim_batch(1, 't11', lease => '-1 s')$$),
	('nack retry_in', $$SELECT eventbox.nack(%s, retry_in => '-1 s', subscription => 't11')$$),
	('extend_lease by', $$SELECT eventbox.extend_lease(%s, '-1 s', 't11')$$),
	('purge older_than', $$SELECT eventbox.purge_dead_letters('t11', '-1 s')$$),
	('max_attempts 0', $$SELECT eventbox.subscribe('t11_bad', max_attempts => 0)$$),
	('alter max_attempts 0', $$SELECT eventbox.alter_subscription('t11', max_attempts => 0)$$)
) a(label, sql);

-- intervals with a negative part (that compare as positive: months count
-- 30 days), and intervals over 100 years, which added to now() could leave
-- the timestamp range; 100 years itself is accepted
SELECT a.label, test.expect_error(format(a.sql, :leased_id)) FROM (VALUES
	('lease, negative part', $$SELECT eventbox.subscribe('t11_bad', lease => '-2 months 60 days 1 second')$$),
	('backoff_base, negative part', $$SELECT eventbox.subscribe('t11_bad', backoff_base => '1 day -1 second')$$),
	('claim lease, negative part', $$SELECT * FROM eventbox.claim_batch(1, 't11', lease => '1 month -1 day')$$),
	('nack retry_in, negative part', $$SELECT eventbox.nack(%s, retry_in => '1 mon -40 days', subscription => 't11')$$),
	('extend_lease by, negative part', $$SELECT eventbox.extend_lease(%s, '1 day -1 hour', 't11')$$),
	('lease over 100 years', $$SELECT eventbox.subscribe('t11_bad', lease => '1000000 years')$$),
	('alter backoff_max over 100 years', $$SELECT eventbox.alter_subscription('t11', backoff_max => '101 years')$$),
	('claim lease over 100 years', $$SELECT * FROM eventbox.claim_batch(1, 't11', lease => '250000 years')$$),
	('nack retry_in over 100 years', $$SELECT eventbox.nack(%s, retry_in => '200000 years', subscription => 't11')$$),
	('extend_lease by over 100 years', $$SELECT eventbox.extend_lease(%s, '36525 days 1 second', 't11')$$),
	('purge older_than over 100 years', $$SELECT eventbox.purge_dead_letters('t11', '10000 years')$$),
	('lease of 100 years', $$SELECT eventbox.subscribe('t11_long', lease => '100 years', backoff_base => '100 years', backoff_max => '100 years')$$)
) a(label, sql);
SELECT eventbox.unsubscribe('t11_long');

-- too many event_types patterns to match together: refused when the
-- subscription is made, not later by every claim and worker cycle
SELECT test.expect_error($$SELECT eventbox.subscribe('t11_bad',
	event_types => (SELECT array_agg('p' || i) FROM generate_series(1, 50000) i))$$);

-- NUL bytes anywhere: PostgreSQL itself refuses them in text and jsonb
SELECT a.label, test.expect_error(a.sql) FROM (VALUES
	('\u0000 in payload', $$SELECT eventbox.publish('t11.x', '{"s": "a\u0000b"}')$$),
	('\u0000 in a key', $$SELECT eventbox.publish('t11.x', '{"a\u0000": 1}')$$),
	('\u0000 in headers', $$SELECT eventbox.publish('t11.x', headers => '{"h": "\u0000"}')$$),
	('\u0000 in a batch', $$SELECT eventbox.publish_batch('[{"event_type": "t11.x\u0000"}]')$$),
	('chr(0) in event_type', $$SELECT eventbox.publish('t11.x' || chr(0))$$),
	('chr(0) in aggregate_id', $$SELECT eventbox.publish('t11.x', '{}', 'o', chr(0))$$),
	('chr(0) in dedupe_key', $$SELECT eventbox.publish('t11.x', dedupe_key => 'k' || chr(0))$$),
	('escaped NUL in text', $$SELECT eventbox.publish(E't11.x\000')$$),
	('json \u0000 cast', $$SELECT eventbox.publish('t11.x', '{"s": "\u0000"}'::json::jsonb)$$),
	('NUL in subscription name', $$SELECT eventbox.subscribe('t11' || chr(0))$$)
) a(label, sql);
-- an escaped backslash before u0000 is just text, and is fine
SELECT eventbox.publish('t11.backslash', '{"s": "\\u0000"}') - :base AS id;

-- the transaction's earlier work is untouched ...
SELECT count(*) AS business_rows FROM t11_work;
-- ... and its events are exactly the good ones: nothing half-written
SELECT id - :base AS id, left(event_type, 20) AS event_type, octet_length(event_type) AS len,
	   payload
FROM eventbox.log WHERE txid = pg_current_xact_id() ORDER BY id;
-- a plain SAVEPOINT around a failing publish, without the helper
SAVEPOINT before_bad;
SELECT eventbox.publish('t11..bad');
ROLLBACK TO SAVEPOINT before_bad;
SELECT count(*) AS events_in_transaction FROM eventbox.log WHERE txid = pg_current_xact_id();
COMMIT;

-- after commit the consumer gets the good events and nothing else
SELECT id - :base AS id, event_type, payload FROM eventbox.claim_batch(100, 't11')
WHERE id > :base ORDER BY id;
SELECT count(*) AS subscriptions_left_behind FROM eventbox.subscriptions WHERE name LIKE 't11_bad%';
SELECT count(*) AS rows FROM t11_work;

DROP TABLE t11_work;
SELECT eventbox.unsubscribe('t11');
SELECT eventbox.unsubscribe('t11_push');
