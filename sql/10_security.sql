--
-- 10_security: G7.  Each group role can do its job and nothing else;
-- nobody writes the extension's tables directly; PUBLIC has nothing;
-- SECURITY DEFINER functions pin their search_path.
--
CREATE ROLE regress_eb_pub LOGIN IN ROLE eventbox_publisher;
CREATE ROLE regress_eb_con LOGIN IN ROLE eventbox_consumer;
CREATE ROLE regress_eb_rdr LOGIN IN ROLE eventbox_reader;
CREATE ROLE regress_eb_adm LOGIN IN ROLE eventbox_admin;
CREATE ROLE regress_eb_none LOGIN;
SELECT eventbox.subscribe('t10', event_types => '{t10.*}', max_attempts => 1);
SELECT test.last_id() AS base \gset
-- a dead letter for the readers to look at
SELECT eventbox.publish('t10.dead', '{"secret": 1}') - :base AS id;
SELECT eventbox.nack(id, 'boom', subscription => 't10') FROM eventbox.claim_batch(1, 't10');
GRANT USAGE ON SCHEMA test TO PUBLIC;

-- the publisher: publish, publish_batch, capture; nothing else
SET ROLE regress_eb_pub;
SELECT eventbox.publish('t10.by_publisher') - :base AS id;
SELECT count(*) FROM eventbox.publish_batch('[{"event_type": "t10.by_publisher"}]');
SELECT test.sqlstate($$SELECT * FROM eventbox.claim_batch(1, 't10')$$) AS claim,
	   test.sqlstate($$SELECT eventbox.ack(1::bigint, 't10')$$) AS ack,
	   test.sqlstate($$SELECT eventbox.nack(1, subscription => 't10')$$) AS nack,
	   test.sqlstate($$SELECT eventbox.event(1)$$) AS event,
	   test.sqlstate($$SELECT * FROM eventbox.stats$$) AS stats,
	   test.sqlstate($$SELECT * FROM eventbox.outbox()$$) AS outbox,
	   test.sqlstate($$SELECT * FROM eventbox.dead_letters$$) AS dead_letters,
	   test.sqlstate($$SELECT eventbox.subscribe('t10_x')$$) AS subscribe,
	   test.sqlstate($$SELECT * FROM eventbox.log$$) AS read_log;
RESET ROLE;

-- a publisher's table with a capture trigger: the insert publishes
CREATE TABLE t10_orders (id int PRIMARY KEY);
CREATE TRIGGER t10_orders_capture AFTER INSERT ON t10_orders
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t10');
GRANT INSERT ON t10_orders TO regress_eb_pub, regress_eb_none;
SET ROLE regress_eb_pub;
INSERT INTO t10_orders VALUES (1);
RESET ROLE;
-- ... the trigger fires for any role the table owner lets write the table:
-- EXECUTE on capture() is checked when the trigger is created (PostgreSQL
-- semantics), so the owner of the table decides who publishes through it
SET ROLE regress_eb_none;
SELECT test.sqlstate($$INSERT INTO t10_orders VALUES (2)$$) AS insert_without_publisher;
RESET ROLE;
SELECT count(*) FROM t10_orders;

-- the consumer: claim, ack, nack, extend_lease, event, timeline; it cannot
-- publish, manage subscriptions or read dead-letter payloads
SET ROLE regress_eb_con;
SELECT event_type FROM eventbox.claim_batch(10, 't10') ORDER BY id;
SELECT eventbox.ack(array_agg(id), 't10') FROM (SELECT :base + 2 AS id UNION ALL SELECT :base + 3 UNION ALL SELECT :base + 4) s;
SELECT (eventbox.event(:base + 2)).event_type;
SELECT count(*) FROM eventbox.timeline('t10', '1');
SELECT test.sqlstate($$SELECT eventbox.publish('t10.by_consumer')$$) AS publish,
	   test.sqlstate($$SELECT eventbox.publish_batch('[]')$$) AS publish_batch,
	   test.sqlstate($$SELECT * FROM eventbox.dead_letter_events$$) AS dead_letter_events,
	   test.sqlstate($$SELECT * FROM eventbox.dead_letters$$) AS dead_letters,
	   test.sqlstate($$SELECT eventbox.replay_dead_letters('t10')$$) AS replay,
	   test.sqlstate($$SELECT eventbox.purge_dead_letters('t10')$$) AS purge,
	   test.sqlstate($$SELECT eventbox.subscribe('t10_x')$$) AS subscribe,
	   test.sqlstate($$SELECT eventbox.unsubscribe('t10')$$) AS unsubscribe,
	   test.sqlstate($$SELECT eventbox.pause('t10')$$) AS pause,
	   test.sqlstate($$SELECT * FROM eventbox.dead_letter_store$$) AS read_store;
RESET ROLE;

-- the reader: stats, outbox, dead_letters; no payloads, no claiming
SET ROLE regress_eb_rdr;
SELECT subscription, dead FROM eventbox.stats WHERE subscription = 't10';
SELECT status, id - :base AS id FROM eventbox.outbox('dead', 10, 't10');
SELECT id - :base AS id, last_error FROM eventbox.dead_letters WHERE subscription = 't10';
SELECT test.sqlstate($$SELECT * FROM eventbox.dead_letter_events$$) AS dead_letter_events,
	   test.sqlstate($$SELECT * FROM eventbox.claim_batch(1, 't10')$$) AS claim,
	   test.sqlstate($$SELECT eventbox.event(1)$$) AS event,
	   test.sqlstate($$SELECT * FROM eventbox.timeline('t10', '1')$$) AS timeline,
	   test.sqlstate($$SELECT eventbox.publish('t10.by_reader')$$) AS publish,
	   test.sqlstate($$SELECT eventbox.replay_dead_letters('t10')$$) AS replay,
	   test.sqlstate($$SELECT * FROM eventbox.log$$) AS read_log;
RESET ROLE;

-- the admin: subscriptions, replay, purge, dead-letter payloads
SET ROLE regress_eb_adm;
SELECT eventbox.subscribe('t10_adm', event_types => '{t10.adm}');
SELECT eventbox.alter_subscription('t10_adm', lease => '1 minute');
SELECT id - :base AS id, payload FROM eventbox.dead_letter_events WHERE subscription = 't10';
SELECT eventbox.replay_dead_letters('t10');
SELECT eventbox.purge_dead_letters('t10');
SELECT eventbox.unsubscribe('t10_adm');
SELECT test.sqlstate($$SELECT * FROM eventbox.log$$) AS read_log;
RESET ROLE;

-- a role with no eventbox role: nothing at all, not even the schema
SET ROLE regress_eb_none;
SELECT test.sqlstate($$SELECT eventbox.publish('t10.none')$$) AS publish,
	   test.sqlstate($$SELECT * FROM eventbox.claim_batch(1, 't10')$$) AS claim,
	   test.sqlstate($$SELECT * FROM eventbox.stats$$) AS stats,
	   test.sqlstate($$SELECT * FROM eventbox.outbox()$$) AS outbox;
RESET ROLE;

-- nobody writes the tables directly: every role, every table, every
-- kind of write
SELECT r.rolname, c.relname,
	   has_table_privilege(r.rolname, c.oid, 'SELECT') AS sel,
	   has_table_privilege(r.rolname, c.oid, 'INSERT') AS ins,
	   has_table_privilege(r.rolname, c.oid, 'UPDATE') AS upd,
	   has_table_privilege(r.rolname, c.oid, 'DELETE') AS del,
	   has_table_privilege(r.rolname, c.oid, 'TRUNCATE') AS trunc
FROM pg_class c
	 CROSS JOIN (VALUES ('eventbox_publisher'), ('eventbox_consumer'),
						('eventbox_reader'), ('eventbox_admin')) r(rolname)
WHERE c.relnamespace = 'eventbox'::regnamespace AND c.relkind = 'r'
  AND (has_table_privilege(r.rolname, c.oid, 'SELECT')
	   OR has_table_privilege(r.rolname, c.oid, 'INSERT')
	   OR has_table_privilege(r.rolname, c.oid, 'UPDATE')
	   OR has_table_privilege(r.rolname, c.oid, 'DELETE')
	   OR has_table_privilege(r.rolname, c.oid, 'TRUNCATE'))
ORDER BY 1, 2;
SET ROLE regress_eb_adm;
SELECT test.sqlstate($$INSERT INTO eventbox.log (id, txid, event_id, event_type, payload, headers, occurred_at)
	VALUES (-1, '1', gen_random_uuid(), 'x', '{}', '{}', now())$$) AS insert_log,
	   test.sqlstate($$UPDATE eventbox.log SET payload = '{}'$$) AS update_log,
	   test.sqlstate($$DELETE FROM eventbox.log$$) AS delete_log,
	   test.sqlstate($$TRUNCATE eventbox.log$$) AS truncate_log,
	   test.sqlstate($$UPDATE eventbox.subscriptions SET paused = true$$) AS update_subs,
	   test.sqlstate($$DELETE FROM eventbox.batches$$) AS delete_batches,
	   test.sqlstate($$SELECT nextval('eventbox.log_id_seq')$$) AS nextval;
RESET ROLE;
SET ROLE regress_eb_pub;
SELECT test.sqlstate($$INSERT INTO eventbox.log (id, txid, event_id, event_type, payload, headers, occurred_at)
	VALUES (-1, '1', gen_random_uuid(), 'x', '{}', '{}', now())$$) AS insert_log,
	   test.sqlstate($$DELETE FROM eventbox.retries$$) AS delete_retries;
RESET ROLE;
-- ... nor the internal helper functions: only the API is granted
SELECT p.proname, r.rolname
FROM pg_proc p
	 CROSS JOIN (VALUES ('eventbox_publisher'), ('eventbox_consumer'),
						('eventbox_reader'), ('eventbox_admin')) r(rolname)
WHERE p.pronamespace = 'eventbox'::regnamespace AND p.proname ~ '^_'
  AND has_function_privilege(r.rolname, p.oid, 'EXECUTE')
ORDER BY 1, 2;
-- which role may execute which API function
SELECT p.proname,
	   string_agg(DISTINCT replace(r.rolname, 'eventbox_', ''), ','
			  ORDER BY replace(r.rolname, 'eventbox_', '')) AS roles
FROM pg_proc p
	 CROSS JOIN (VALUES ('eventbox_publisher'), ('eventbox_consumer'),
						('eventbox_reader'), ('eventbox_admin')) r(rolname)
WHERE p.pronamespace = 'eventbox'::regnamespace AND p.proname !~ '^_'
  AND has_function_privilege(r.rolname, p.oid, 'EXECUTE')
GROUP BY p.proname ORDER BY 1;

-- PUBLIC has nothing: no ACL entry for PUBLIC (grantee 0) on the schema,
-- its tables, views, sequences or functions, and no function left with the
-- default ACL (which would let PUBLIC execute it)
SELECT 'schema' AS kind, count(*) FROM pg_namespace n, aclexplode(n.nspacl) a
WHERE n.nspname = 'eventbox' AND a.grantee = 0
UNION ALL
SELECT 'relation', count(*) FROM pg_class c, aclexplode(c.relacl) a
WHERE c.relnamespace = 'eventbox'::regnamespace AND a.grantee = 0
UNION ALL
SELECT 'function', count(*) FROM pg_proc p, aclexplode(p.proacl) a
WHERE p.pronamespace = 'eventbox'::regnamespace AND a.grantee = 0;
SELECT count(*) AS functions_with_default_acl FROM pg_proc
WHERE pronamespace = 'eventbox'::regnamespace AND proacl IS NULL;

-- every SECURITY DEFINER function, and every SQL or PL/pgSQL function,
-- pins its search_path to pg_catalog, pg_temp, with two kinds of
-- exceptions: _pending must stay inlinable (a SET clause prevents
-- inlining; it is granted to nobody, is not SECURITY DEFINER, and is only
-- called from functions that pin search_path themselves), and the hot-path
-- C functions (publish, publish_batch, claim_batch, ack) pin name lookup
-- to pg_catalog alone inside, for every statement they run (cheaper than
-- a SET clause; the hostile search_path test below checks it)
SELECT p.proname, p.prosecdef, l.lanname, p.proconfig
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
WHERE p.pronamespace = 'eventbox'::regnamespace
  AND (p.prosecdef OR l.lanname <> 'c')
  AND (p.proconfig IS NULL OR NOT 'search_path=pg_catalog, pg_temp' = ANY (p.proconfig))
ORDER BY 1;
SELECT proname, prosecdef, proacl FROM pg_proc
WHERE pronamespace = 'eventbox'::regnamespace AND proconfig IS NULL
  AND prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c');
SELECT count(*) AS security_definer_functions,
	   count(*) FILTER (WHERE 'search_path=pg_catalog, pg_temp' = ANY (proconfig)) AS with_search_path
FROM pg_proc WHERE pronamespace = 'eventbox'::regnamespace AND prosecdef;
-- a malicious object in the caller's search_path is not used by publish
CREATE SCHEMA t10_evil;
CREATE FUNCTION t10_evil.nextval(regclass) RETURNS bigint LANGUAGE sql AS 'SELECT -42::bigint';
SET search_path = t10_evil, public;
SELECT eventbox.publish('t10.path') > 0 AS real_id;
RESET search_path;
-- nor when the attacker's schema comes before pg_catalog, in a fresh
-- session (so the statements are first prepared under that path): a
-- hostile nextval(), now() and text "=" operator (which would make every
-- dedupe key match) change nothing in publish, dedupe, claim or ack
CREATE FUNCTION t10_evil.now() RETURNS timestamptz LANGUAGE sql
	AS $$SELECT '2000-01-01'::pg_catalog.timestamptz$$;
CREATE FUNCTION t10_evil.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR t10_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = t10_evil.always);
SELECT eventbox.subscribe('t10_path', event_types => '{t10p.*}');
\c
SET search_path = t10_evil, pg_catalog;
SELECT eventbox.publish('t10p.a', dedupe_key => 't10-key-a') > 0 AS real_id;
SELECT eventbox.publish('t10p.b', dedupe_key => 't10-key-b')
	<> eventbox.publish('t10p.a', dedupe_key => 't10-key-a') AS different_keys_stay_different;
SELECT count(*) AS claimed, bool_and(occurred_at > '2001-01-01') AS real_clock,
	   pg_catalog.sum(eventbox.ack(id, 't10_path')::int) AS acked
FROM eventbox.claim_batch(10, 't10_path');
RESET search_path;
SELECT eventbox.unsubscribe('t10_path');
DROP SCHEMA t10_evil CASCADE;

-- clean up
DROP TABLE t10_orders;
REVOKE USAGE ON SCHEMA test FROM PUBLIC;
SELECT eventbox.unsubscribe('t10');
DROP ROLE regress_eb_pub, regress_eb_con, regress_eb_rdr, regress_eb_adm, regress_eb_none;
