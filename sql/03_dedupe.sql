--
-- 03_dedupe: dedupe_key returns the first event's id inside
-- eventbox.dedupe_window; a rolled-back first publish does not dedupe.
--
SELECT eventbox.subscribe('t03', event_types => '{t03.*}', start_at => 'now');
SELECT test.last_id() AS base \gset
SHOW eventbox.dedupe_window;

-- the same key returns the first id and writes nothing, also with a
-- different payload and type; another key is a new event
SELECT eventbox.publish('t03.a', '{"v": 1}', dedupe_key => 'k1') - :base AS id;
SELECT eventbox.publish('t03.a', '{"v": 2}', dedupe_key => 'k1') - :base AS id;
SELECT eventbox.publish('t03.b', '{"v": 3}', dedupe_key => 'k1') - :base AS id;
SELECT eventbox.publish('t03.a', '{"v": 4}', dedupe_key => 'k2') - :base AS id;
-- no key: never deduplicated
SELECT eventbox.publish('t03.a', '{"v": 5}') - :base AS id;
SELECT eventbox.publish('t03.a', '{"v": 5}') - :base AS id;
-- twice in one transaction
BEGIN;
SELECT eventbox.publish('t03.a', '{"v": 6}', dedupe_key => 'k3') - :base AS id;
SELECT eventbox.publish('t03.a', '{"v": 7}', dedupe_key => 'k3') - :base AS id;
COMMIT;
SELECT id - :base AS id, event_type, payload, dedupe_key
FROM eventbox.log WHERE id > :base ORDER BY id;
-- an empty key is an error (NULL means no deduplication)
SELECT test.expect_error($$SELECT eventbox.publish('t03.a', dedupe_key => '')$$);

-- a rolled-back first publish does not dedupe: the key is free again
SELECT test.last_id() AS base2 \gset
BEGIN;
SELECT eventbox.publish('t03.rb', '{"v": "rolled back"}', dedupe_key => 'k4') - :base2 AS id;
ROLLBACK;
SELECT eventbox.publish('t03.rb', '{"v": "kept"}', dedupe_key => 'k4') - :base2 AS id;
SELECT eventbox.publish('t03.rb', '{"v": "dup"}', dedupe_key => 'k4') - :base2 AS id;
-- same for a rolled-back savepoint
BEGIN;
SAVEPOINT s;
SELECT eventbox.publish('t03.rb', '{"v": "savepoint"}', dedupe_key => 'k5') - :base2 AS id;
ROLLBACK TO SAVEPOINT s;
SELECT eventbox.publish('t03.rb', '{"v": "after savepoint"}', dedupe_key => 'k5') - :base2 AS id;
COMMIT;
SELECT id - :base2 AS id, payload->>'v' AS v, dedupe_key
FROM eventbox.log WHERE id > :base2 ORDER BY id;

-- the window: with a 1 second window, a key published more than a second
-- ago (by transaction start) no longer dedupes
SET eventbox.dedupe_window = '1s';
SHOW eventbox.dedupe_window;
SELECT test.last_id() AS base3 \gset
SELECT eventbox.publish('t03.w', '{"v": 1}', dedupe_key => 'k6') - :base3 AS id;
SELECT eventbox.publish('t03.w', '{"v": 2}', dedupe_key => 'k6') - :base3 AS id;
SELECT pg_sleep(1.2);
SELECT eventbox.publish('t03.w', '{"v": 3}', dedupe_key => 'k6') - :base3 AS id;
-- inside the window again: the newest event with the key is in the window
SELECT eventbox.publish('t03.w', '{"v": 4}', dedupe_key => 'k6') - :base3 AS id;
-- a window of 0 still dedupes inside one transaction, not across
SET eventbox.dedupe_window = 0;
BEGIN;
SELECT eventbox.publish('t03.w0', '{"v": 1}', dedupe_key => 'k7') - :base3 AS id;
SELECT eventbox.publish('t03.w0', '{"v": 2}', dedupe_key => 'k7') - :base3 AS id;
COMMIT;
SELECT pg_sleep(0.01);
SELECT eventbox.publish('t03.w0', '{"v": 3}', dedupe_key => 'k7') - :base3 AS id;
RESET eventbox.dedupe_window;
-- with the default window (1 day) the old keys dedupe again
SELECT eventbox.publish('t03.a', dedupe_key => 'k1') - :base AS id;
-- bad window values
SELECT test.expect_error($$SET eventbox.dedupe_window = -1$$);
SELECT test.expect_error($$SET eventbox.dedupe_window = 'soon'$$);
SELECT id - :base3 AS id, payload->>'v' AS v FROM eventbox.log WHERE id > :base3 ORDER BY id;

-- the lookup reads the dedupe index, whose keys compare bytewise: its
-- statement has to say COLLATE "C", or it could only walk the log by id.
-- A new session, so that its plan is made anew.
\c
SELECT pg_stat_force_next_flush();
SELECT sum(idx_scan) AS dedupe_scans_before FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_dedupe_key_' \gset
SELECT eventbox.publish('t03.a', dedupe_key => 'k1') - :base AS id;
SELECT pg_stat_force_next_flush();
SELECT sum(idx_scan) > :dedupe_scans_before AS lookup_read_the_index FROM pg_stat_user_indexes
WHERE schemaname = 'eventbox' AND indexrelname ~ '^log_[0-9]+_dedupe_key_';

-- the subscription sees each stored event once
SELECT event_type, count(*) FROM eventbox.claim_batch(100, 't03') GROUP BY 1 ORDER BY 1;
SELECT eventbox.unsubscribe('t03');
