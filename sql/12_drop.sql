--
-- 12_drop: DROP EXTENSION removes every object of the extension; CREATE
-- EXTENSION works again afterwards, in the same session.
--
-- The group roles are shared by all databases of the cluster, so DROP
-- EXTENSION leaves them in place (other databases may use them, and roles
-- may have members).  CREATE EXTENSION reuses them when they exist.
--
SELECT oid AS ext_oid FROM pg_extension WHERE extname = 'eventbox' \gset
SELECT count(*) > 0 AS has_members FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND refobjid = :ext_oid;

-- a table that uses capture() keeps the extension from being dropped
CREATE TABLE t12_orders (id int PRIMARY KEY);
CREATE TRIGGER t12_orders_capture AFTER INSERT ON t12_orders
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t12');
SELECT test.expect_error($$DROP EXTENSION eventbox$$);
DROP TABLE t12_orders;
DROP EXTENSION eventbox;

-- nothing is left: the schema (with its grants to the group roles), its
-- relations, functions and types, and every dependency record of the
-- extension
SELECT count(*) AS extensions FROM pg_extension WHERE extname = 'eventbox';
SELECT count(*) AS schemas FROM pg_namespace WHERE nspname = 'eventbox';
SELECT count(*) AS relations FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'eventbox';
SELECT count(*) AS functions FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'eventbox';
SELECT count(*) AS types FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = 'eventbox';
SELECT count(*) AS dependencies FROM pg_depend
WHERE (refclassid = 'pg_extension'::regclass AND refobjid = :ext_oid)
   OR (classid = 'pg_extension'::regclass AND objid = :ext_oid);
SELECT count(*) AS functions_anywhere FROM pg_proc
WHERE probin LIKE '%eventbox%';
-- the roles remain (see above)
SELECT rolname FROM pg_roles WHERE rolname LIKE 'eventbox\_%' ORDER BY 1;

-- CREATE again works: a fresh log and the default subscription; the
-- session's cached plans follow the new tables
CREATE EXTENSION eventbox;
SELECT name, mode, channel FROM eventbox.subscriptions;
SELECT eventbox.subscribe('t12', start_at => 'now');
SELECT eventbox.publish('t12.again', '{"n": 1}', 't12', '1', dedupe_key => 'k') AS id;
SELECT eventbox.publish('t12.again', '{"n": 2}', dedupe_key => 'k') AS deduped_id;
SELECT id, event_type, payload, attempt FROM eventbox.claim_batch(10, 't12');
SELECT eventbox.ack(1::bigint, 't12');
SELECT eventbox.ack(ARRAY[1]::bigint[], 't12');
SELECT id FROM eventbox.publish_batch('[{"event_type": "t12.batch"}]') id;
SELECT id, event_type FROM eventbox.log ORDER BY id;
SELECT subscription, pending, delivered_total, acked_total FROM eventbox.stats
WHERE subscription = 't12';
-- the roles were reused, with their grants
SELECT has_function_privilege('eventbox_publisher', 'eventbox.publish(text,jsonb,text,text,jsonb,text,timestamptz)', 'EXECUTE') AS publisher_can_publish,
	   has_function_privilege('eventbox_consumer', 'eventbox.claim_batch(int,text,interval)', 'EXECUTE') AS consumer_can_claim;
