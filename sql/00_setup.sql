--
-- 00_setup: install the extension, check what CREATE EXTENSION made, and
-- create the helpers the other files use.
--
CREATE EXTENSION eventbox;

-- the extension, its version and schema
SELECT extname, extversion, extnamespace::regnamespace AS schema, extrelocatable
FROM pg_extension WHERE extname = 'eventbox';
\dx eventbox

-- helpers for the other files, in their own schema
CREATE SCHEMA test;

-- Run a statement and report its SQLSTATE, message and hint (or 'no error'),
-- so that every bad input shows its SQLSTATE without VERBOSITY output.
-- Event ids and lease tokens in messages are masked: they depend on what
-- other files did.
CREATE FUNCTION test.expect_error(sql text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	st text;
	msg text;
	hint text;
BEGIN
	EXECUTE sql;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
							hint = PG_EXCEPTION_HINT;
	msg := regexp_replace(msg, 'event [0-9]+:', 'event N:', 'g');
	msg := regexp_replace(msg, '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
						  '<uuid>', 'g');
	RETURN st || ': ' || msg ||
		CASE WHEN hint IS NOT NULL AND hint <> '' THEN ' (hint: ' || hint || ')' ELSE '' END;
END
$$;

-- Only the SQLSTATE (or 'no error'): for statements whose message text is
-- not the point of the test.
CREATE FUNCTION test.sqlstate(sql text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	st text;
BEGIN
	EXECUTE sql;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE;
	RETURN st;
END
$$;

-- The last id the log sequence handed out (0 before the first publish):
-- files print ids relative to it so that their output does not depend on
-- what the files before them published.
CREATE FUNCTION test.last_id() RETURNS bigint
LANGUAGE sql AS $$
	SELECT COALESCE(pg_sequence_last_value('eventbox.log_id_seq'::regclass), 0)
$$;

SELECT test.expect_error('SELECT 1');
SELECT test.expect_error('SELECT 1/0');
SELECT test.sqlstate('SELECT 1'), test.sqlstate('SELECT 1/0');
SELECT test.last_id();

-- every relation, function and type in the schema belongs to the extension
SELECT x.kind, count(*) > 0 AS has_objects,
	   count(*) FILTER (WHERE NOT EXISTS (
		   SELECT FROM pg_depend d
		   WHERE d.classid = x.catalog AND d.objid = x.oid AND d.deptype = 'e'
			 AND d.refclassid = 'pg_extension'::regclass
			 AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'eventbox'))) AS not_members
FROM (SELECT 'relation' AS kind, 'pg_class'::regclass AS catalog, c.oid
	  FROM pg_class c WHERE c.relnamespace = 'eventbox'::regnamespace
		AND c.relkind IN ('r', 'v', 'S')
	  UNION ALL
	  SELECT 'function', 'pg_proc'::regclass, p.oid
	  FROM pg_proc p WHERE p.pronamespace = 'eventbox'::regnamespace
	  UNION ALL
	  SELECT 'type', 'pg_type'::regclass, t.oid
	  FROM pg_type t WHERE t.typnamespace = 'eventbox'::regnamespace AND t.typtype = 'c'
		AND NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
	 ) x
GROUP BY x.kind ORDER BY x.kind;

-- tables, views, sequences and types
SELECT c.relname, c.relkind
FROM pg_class c
WHERE c.relnamespace = 'eventbox'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'p')
ORDER BY c.relname;
SELECT t.typname
FROM pg_type t
WHERE t.typnamespace = 'eventbox'::regnamespace AND t.typtype = 'c'
  AND NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
ORDER BY 1;

-- the public functions (internal helpers start with _): argument names and
-- defaults are part of the API (SPEC section 3)
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
	   p.pronargdefaults AS defaults, pg_get_function_result(p.oid) AS returns,
	   p.prosecdef AS security_definer
FROM pg_proc p
WHERE p.pronamespace = 'eventbox'::regnamespace AND p.proname !~ '^_'
ORDER BY p.proname, 2;
-- the defaults of subscribe, as SPEC section 3 gives them
SELECT pg_get_expr(proargdefaults, 0) FROM pg_proc
WHERE oid = 'eventbox.subscribe(text,text[],text,text,text,text,interval,int,interval,interval,text)'::regprocedure;

-- the default subscription: every event, push_once on channel eventbox
SELECT name, event_types, mode, channel, notify, ordering, paused
FROM eventbox.subscriptions;
SELECT subscription, mode, paused FROM eventbox.stats;

-- the four group roles: NOLOGIN, no special powers
SELECT rolname, rolcanlogin, rolsuper, rolinherit, rolcreaterole, rolcreatedb
FROM pg_roles WHERE rolname LIKE 'eventbox\_%' ORDER BY 1;

-- the settings the SQL API uses, with their defaults
SELECT name, setting, unit, context
FROM pg_settings
WHERE name IN ('eventbox.subscription', 'eventbox.actor', 'eventbox.correlation_id',
			   'eventbox.causation_id', 'eventbox.dedupe_window',
			   'eventbox.max_payload_size', 'eventbox.max_claim_size')
ORDER BY 1;

-- the default subscription cannot be claimed from: it is push_once
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 'default')$$);
