/* eventbox--0.1.sql: the transactional outbox as a PostgreSQL primitive */

\echo Use "CREATE EXTENSION eventbox" to load this file. \quit

/*
 * Glossary (see docs/design.md for the whole story)
 *
 * event        one row of the append-only log (eventbox.log).  Never updated.
 * subscription a named consumer group; it sees every matching event once.
 * lane         a subscription's independent stream: unordered subscriptions
 *              have one lane, ordered ones split aggregates over several by
 *              hash.  Each lane has a cursor (eventbox.cursors).
 * cursor       a lane's position in the log: a snapshot S_c (everything
 *              visible in it is consumed), an optional target snapshot S_t
 *              and a position inside the window S_t - S_c.
 * batch        what one claim took from one lane: one row (eventbox.batches)
 *              holding the leased event ids, a lease token and a deadline.
 * delivery     one event handed to a consumer, with its attempt number.
 * retry        a per-event exception row (eventbox.retries): nacked,
 *              expired, delayed (deliver_at) or replayed events.
 * dead letter  an event that used up max_attempts (eventbox.dead_letter_store).
 */

-- Group roles, created if absent.  Roles are shared by all databases of the
-- cluster, so DROP EXTENSION leaves them in place.
DO $roles$
DECLARE
	r text;
BEGIN
	FOREACH r IN ARRAY ARRAY['eventbox_publisher', 'eventbox_consumer',
							 'eventbox_reader', 'eventbox_admin']
	LOOP
		IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
			EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
		END IF;
	END LOOP;
END
$roles$;

REVOKE ALL ON SCHEMA eventbox FROM PUBLIC;
GRANT USAGE ON SCHEMA eventbox TO eventbox_publisher, eventbox_consumer,
	eventbox_reader, eventbox_admin;

-- ---------------------------------------------------------------------------
-- Storage
-- ---------------------------------------------------------------------------

CREATE SEQUENCE eventbox.log_id_seq AS bigint;

-- The log.  Rows are inserted by publish and never updated.  txid is the
-- publishing transaction's top-level xid: consumers decide what they see by
-- snapshot difference on it, never by "id > last id".
--
-- The log is a ring of three partitions.  Publishers insert into the
-- current one (eventbox.rotation.cur); the worker moves "current" on and
-- reclaims a partition by TRUNCATE once every subscription has consumed
-- everything in it and retention allows (see eventbox._rotate), so storage
-- is never reclaimed by DELETE and VACUUM.
CREATE TABLE eventbox.log (
	part			smallint NOT NULL,
	id				bigint NOT NULL,
	txid			xid8 NOT NULL,
	event_id		uuid NOT NULL,
	event_type		text NOT NULL,
	aggregate_type	text,
	aggregate_id	text,
	payload			jsonb NOT NULL,
	headers			jsonb NOT NULL,
	occurred_at		timestamptz NOT NULL,
	deliver_at		timestamptz,
	dedupe_key		text
) PARTITION BY LIST (part);
CREATE TABLE eventbox.log_0 PARTITION OF eventbox.log FOR VALUES IN (0);
CREATE TABLE eventbox.log_1 PARTITION OF eventbox.log FOR VALUES IN (1);
CREATE TABLE eventbox.log_2 PARTITION OF eventbox.log FOR VALUES IN (2);
-- The keys of these three include id, so no two entries are equal and
-- deduplication could never merge any: off, so that a full leaf page is
-- split at once instead of first being searched for duplicates.
CREATE INDEX log_txid_id_idx ON eventbox.log (txid, id)
	WITH (deduplicate_items = off);
-- ids come from a sequence, so they are unique without a unique index
-- (which a partitioned table could only have together with part)
CREATE INDEX log_id_idx ON eventbox.log (id)
	WITH (deduplicate_items = off);
-- An aggregate's history (timeline).  Keyed by the names themselves, not a
-- hash of them: aggregate ids that grow (order numbers) then insert next to
-- each other, while a hash would scatter every insert over the whole index
-- and, after each checkpoint, write a full-page image for nearly every one.
-- Only equality is ever asked of the names, so they are compared bytewise
-- (COLLATE "C", the same equality as any deterministic collation) instead
-- of with the database's collation: under ICU or a glibc locale every
-- comparison of an insert's descent would otherwise be a strcoll() call.
-- Queries must say COLLATE "C" to use it (see timeline).
CREATE INDEX log_aggregate_idx ON eventbox.log
	(aggregate_type COLLATE "C", aggregate_id COLLATE "C", id)
	WITH (deduplicate_items = off)
	WHERE aggregate_id IS NOT NULL;
-- Bytewise too; the dedupe lookup in publish says COLLATE "C".
CREATE INDEX log_dedupe_idx ON eventbox.log (dedupe_key COLLATE "C")
	WHERE dedupe_key IS NOT NULL;
-- Lets the worker find when the next delayed event comes due.
CREATE INDEX log_deliver_at_idx ON eventbox.log (deliver_at)
	WHERE deliver_at IS NOT NULL;

-- Which partition publishers write to, and when it became current.  It is
-- written only when the current partition changes.  Publishers keep what
-- they read (src/publish.c) until the trigger below tells them that the row
-- changed: the invalidation reaches every backend when the change commits.
CREATE TABLE eventbox.rotation (
	one				boolean PRIMARY KEY DEFAULT true CHECK (one),
	cur				smallint NOT NULL DEFAULT 0 CHECK (cur BETWEEN 0 AND 2),
	switched_at		timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO eventbox.rotation DEFAULT VALUES;
-- A statement trigger for the tables whose contents backends keep in
-- memory (this one and eventbox.subscriptions): it sends a relcache
-- invalidation of the table, which every backend takes in after the change
-- has committed, and then reads the table again.
CREATE FUNCTION eventbox._table_changed()
RETURNS trigger
AS 'MODULE_PATHNAME', 'table_changed'
LANGUAGE C;
CREATE TRIGGER rotation_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON eventbox.rotation
	FOR EACH STATEMENT EXECUTE FUNCTION eventbox._table_changed();

CREATE TABLE eventbox.subscriptions (
	sub_id			int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	name			text NOT NULL UNIQUE,
	event_types		text[] NOT NULL,
	type_regex		text,			-- NULL: every type
	mode			text NOT NULL,
	channel			text NOT NULL,
	notify			text NOT NULL,
	ordering		text NOT NULL,
	lanes			int NOT NULL,
	lease			interval NOT NULL,
	max_attempts	int NOT NULL,
	backoff_base	interval NOT NULL,
	backoff_max		interval NOT NULL,
	paused			boolean NOT NULL DEFAULT false,
	created_at		timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- One cursor per lane.  Updated once per claim (HOT: no indexed column
-- changes), which also holds the delivery counter.
CREATE TABLE eventbox.cursors (
	sub_id			int NOT NULL REFERENCES eventbox.subscriptions ON DELETE CASCADE,
	lane			int NOT NULL,
	snap			pg_snapshot NOT NULL,
	target			pg_snapshot,
	pos_txid		xid8 NOT NULL DEFAULT '0',
	pos_id			bigint NOT NULL DEFAULT 0,
	delivered		bigint NOT NULL DEFAULT 0,
	updated_at		timestamptz NOT NULL DEFAULT pg_catalog.now()
) WITH (fillfactor = 50);
-- Not unique, on purpose.  While a long transaction holds the xmin horizon
-- no old cursor version can be pruned, so once its page is full an update
-- cannot be HOT and adds an index entry; a unique index then checks that
-- entry against every earlier one of the key, walking each one's chain of
-- versions: every few dozen claims one claim visited every version left
-- since the horizon was pinned (claim p99 0.78 -> 1.59 ms over 30,000
-- claims; flat with this index).  There is one row per (sub_id, lane) all
-- the same: subscribe inserts a new subscription's lanes in one statement,
-- rows are then only updated, moved within a statement (compaction) and
-- deleted with their subscription.
CREATE INDEX cursors_sub_lane_idx ON eventbox.cursors (sub_id, lane);
-- Without a key, a publication of all tables (logical replication, change
-- data capture) would refuse every claim's UPDATE: the whole row, then, is
-- the replica identity (it costs WAL only with wal_level = logical).
ALTER TABLE eventbox.cursors REPLICA IDENTITY FULL;

-- In-flight batches: one row per claim and lane, not per event.
CREATE TABLE eventbox.batches (
	batch_id		bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	sub_id			int NOT NULL REFERENCES eventbox.subscriptions ON DELETE CASCADE,
	lane			int NOT NULL,
	lease			uuid NOT NULL,
	ids				bigint[] NOT NULL,
	retry_count		int NOT NULL,	-- how many of ids have a retries row
	claimed_at		timestamptz NOT NULL,
	leased_until	timestamptz NOT NULL
) WITH (toast_tuple_target = 8160);
-- toast_tuple_target: a batch of up to about 1,000 events (8 bytes an id)
-- stays in the row as it is.  At the default (about 2 kB) every claim of
-- 1,000 compressed its id list with pglz into the TOAST table, and every ack
-- read it back: 13% of a draining consumer's CPU.
CREATE INDEX batches_sub_idx ON eventbox.batches (sub_id, lane);

-- Per-event exceptions.  attempts counts attempts made so far, including an
-- attempt in flight; next_attempt_at is 'infinity' while leased.
CREATE TABLE eventbox.retries (
	sub_id			int NOT NULL REFERENCES eventbox.subscriptions ON DELETE CASCADE,
	id				bigint NOT NULL,
	txid			xid8 NOT NULL,
	lane			int NOT NULL,
	attempts		int NOT NULL,
	next_attempt_at	timestamptz NOT NULL,
	reason			text NOT NULL,	-- nack, expired, delayed, released, replay
	last_error		text,
	updated_at		timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	PRIMARY KEY (sub_id, id)
);
CREATE INDEX retries_due_idx ON eventbox.retries (sub_id, next_attempt_at);
CREATE INDEX retries_lane_idx ON eventbox.retries (sub_id, lane, id);

-- Dead letters keep a copy of the event so they outlive log rotation.
CREATE TABLE eventbox.dead_letter_store (
	sub_id			int NOT NULL REFERENCES eventbox.subscriptions ON DELETE CASCADE,
	id				bigint NOT NULL,
	txid			xid8 NOT NULL,
	lane			int NOT NULL,
	event_id		uuid NOT NULL,
	event_type		text NOT NULL,
	aggregate_type	text,
	aggregate_id	text,
	payload			jsonb NOT NULL,
	headers			jsonb NOT NULL,
	occurred_at		timestamptz NOT NULL,
	attempts		int NOT NULL,
	last_error		text,
	dead_at			timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	PRIMARY KEY (sub_id, id)
);

-- Totals of the exception paths (the happy path counts in
-- cursors.delivered; acked is derived, see the stats view).  Insert-only
-- deltas rather than one row per subscription, so that a nack never waits
-- for another consumer's lock on a shared counter row.
CREATE TABLE eventbox.counters (
	sub_id			int NOT NULL REFERENCES eventbox.subscriptions ON DELETE CASCADE,
	retried			bigint NOT NULL DEFAULT 0,
	dead			bigint NOT NULL DEFAULT 0,
	released		bigint NOT NULL DEFAULT 0,	-- given back unprocessed
	at				timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
CREATE INDEX counters_sub_idx ON eventbox.counters (sub_id);
-- no key: see eventbox.cursors (unsubscribe deletes a subscription's rows)
ALTER TABLE eventbox.counters REPLICA IDENTITY FULL;

REVOKE ALL ON ALL TABLES IN SCHEMA eventbox FROM PUBLIC;
REVOKE ALL ON SEQUENCE eventbox.log_id_seq FROM PUBLIC;

CREATE TYPE eventbox.delivery AS (
	id				bigint,
	event_id		uuid,
	event_type		text,
	aggregate_type	text,
	aggregate_id	text,
	payload			jsonb,
	headers			jsonb,
	occurred_at		timestamptz,
	subscription	text,
	attempt			int,
	lease			uuid,
	leased_until	timestamptz
);

CREATE TYPE eventbox.event AS (
	id				bigint,
	event_id		uuid,
	event_type		text,
	aggregate_type	text,
	aggregate_id	text,
	payload			jsonb,
	headers			jsonb,
	occurred_at		timestamptz
);

-- ---------------------------------------------------------------------------
-- Internal helpers (not granted to anyone)
-- ---------------------------------------------------------------------------

-- Lane of an event for a subscription with the given number of lanes.
CREATE FUNCTION eventbox._lane(aggregate_type text, aggregate_id text, id bigint, lanes int)
RETURNS int
AS 'MODULE_PATHNAME', 'eventbox_lane'
LANGUAGE C IMMUTABLE PARALLEL SAFE;

-- Translate event type globs into one anchored regular expression; NULL
-- when some pattern is "*".  Raises the bad-pattern errors.
CREATE FUNCTION eventbox._glob_regex(patterns text[])
RETURNS text
AS 'MODULE_PATHNAME', 'eventbox_glob_regex'
LANGUAGE C IMMUTABLE;

-- event_type ~ type_regex, remembering the answer for the last few types:
-- the window scans test every event they read.
CREATE FUNCTION eventbox._type_matches(event_type text, type_regex text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventbox_type_matches'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Delay before the attempt after `attempt` failed ones, with up to 20% of
-- positive jitter: never earlier than the capped exponential backoff.
-- Reckoned in seconds (float8), where base * 2^40 cannot overflow: as an
-- interval it did for any base from about 8.4 s on, and every retry of
-- such a subscription after its 40th attempt failed, in the worker too.
CREATE FUNCTION eventbox._backoff(attempt int, base interval, cap interval)
RETURNS interval
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_catalog.make_interval(secs => LEAST(
			   EXTRACT(epoch FROM cap)::float8,
			   EXTRACT(epoch FROM base)::float8 * power(2::float8, LEAST(attempt - 1, 40)))
		   * (1 + 0.2 * random()))
$$;

-- Look up a subscription.  Consumer functions (fallback => true) take NULL
-- to mean the setting eventbox.subscription; management functions never
-- do, so that a session's consumer default cannot drop or change a
-- subscription by accident.
CREATE FUNCTION eventbox._sub(name text, fallback boolean DEFAULT true)
RETURNS eventbox.subscriptions
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
BEGIN
	IF name IS NULL AND NOT fallback THEN
		RAISE EXCEPTION 'name must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF name IS NULL THEN
		name := pg_catalog.current_setting('eventbox.subscription', true);
		IF name IS NULL OR name = '' THEN
			RAISE EXCEPTION 'no subscription given'
				USING ERRCODE = 'invalid_parameter_value',
					  HINT = 'Pass the subscription argument or SET eventbox.subscription.';
		END IF;
	END IF;
	SELECT * INTO s FROM eventbox.subscriptions WHERE subscriptions.name = _sub.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', name
			USING ERRCODE = 'undefined_object';
	END IF;
	RETURN s;
END
$$;

-- Raises the error for an interval argument that is NULL, has a negative
-- part, is zero where that is not allowed or is over 100 years (see
-- EventboxCheckInterval in src/eventbox.c).
CREATE FUNCTION eventbox._check_interval(what text, val interval, allow_zero boolean)
RETURNS void
AS 'MODULE_PATHNAME', 'check_interval'
LANGUAGE C IMMUTABLE;

-- Fail delivered events: schedule their retries or move them to the dead
-- letters.  The caller has already taken them out of their batches.
-- Returns each event's outcome, 'retry' or 'dead'.  Set-based, so that
-- the leases of a batch of 1,000 that ran out cost a few statements, not
-- a few thousand.
CREATE FUNCTION eventbox._fail_many(s eventbox.subscriptions, events bigint[], err text,
									retry_in interval, why text)
RETURNS TABLE (event bigint, outcome text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	dead bigint[];
	retry bigint[];
BEGIN
	PERFORM FROM eventbox.retries r
	WHERE r.sub_id = s.sub_id AND r.id = ANY(events) ORDER BY r.id FOR UPDATE;
	-- the attempts made so far: the retry row's, or 1 (the happy path's)
	SELECT array_agg(e.id) FILTER (WHERE COALESCE(r.attempts, 1) >= s.max_attempts),
		   array_agg(e.id) FILTER (WHERE COALESCE(r.attempts, 1) < s.max_attempts)
	INTO dead, retry
	FROM (SELECT DISTINCT u.id FROM unnest(events) u(id)) e
	LEFT JOIN eventbox.retries r ON r.sub_id = s.sub_id AND r.id = e.id;

	IF dead IS NOT NULL THEN
		INSERT INTO eventbox.dead_letter_store
			(sub_id, id, txid, lane, event_id, event_type, aggregate_type,
			 aggregate_id, payload, headers, occurred_at, attempts, last_error)
		SELECT s.sub_id, l.id, l.txid,
			   eventbox._lane(l.aggregate_type, l.aggregate_id, l.id, s.lanes),
			   l.event_id, l.event_type, l.aggregate_type, l.aggregate_id,
			   l.payload, l.headers, l.occurred_at, COALESCE(r.attempts, 1), err
		FROM eventbox.log l
		LEFT JOIN eventbox.retries r ON r.sub_id = s.sub_id AND r.id = l.id
		WHERE l.id = ANY(dead)
		ON CONFLICT (sub_id, id) DO UPDATE
			SET attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
				dead_at = EXCLUDED.dead_at;
		DELETE FROM eventbox.retries r WHERE r.sub_id = s.sub_id AND r.id = ANY(dead);
		INSERT INTO eventbox.counters (sub_id, dead) VALUES (s.sub_id, cardinality(dead));
	END IF;

	IF retry IS NOT NULL THEN
		UPDATE eventbox.retries r
		SET next_attempt_at = clock_timestamp() + COALESCE(retry_in,
								eventbox._backoff(r.attempts, s.backoff_base, s.backoff_max)),
			reason = why, last_error = err, updated_at = clock_timestamp()
		WHERE r.sub_id = s.sub_id AND r.id = ANY(retry);
		INSERT INTO eventbox.retries (sub_id, id, txid, lane, attempts, next_attempt_at,
									  reason, last_error)
		SELECT s.sub_id, l.id, l.txid,
			   eventbox._lane(l.aggregate_type, l.aggregate_id, l.id, s.lanes),
			   1,
			   clock_timestamp() + COALESCE(retry_in, eventbox._backoff(1, s.backoff_base, s.backoff_max)),
			   why, err
		FROM eventbox.log l
		WHERE l.id = ANY(retry)
		  AND NOT EXISTS (SELECT FROM eventbox.retries r
						  WHERE r.sub_id = s.sub_id AND r.id = l.id);
		INSERT INTO eventbox.counters (sub_id, retried) VALUES (s.sub_id, cardinality(retry));
	END IF;

	RETURN QUERY
		SELECT d.id, 'dead'::text FROM unnest(dead) d(id)
		UNION ALL
		SELECT t.id, 'retry'::text FROM unnest(retry) t(id);
END
$$;

-- Fail one delivered event (see _fail_many).  Returns 'retry' or 'dead'.
CREATE FUNCTION eventbox._fail(s eventbox.subscriptions, event bigint, err text,
							   retry_in interval, why text)
RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT f.outcome FROM eventbox._fail_many(s, ARRAY[event], err, retry_in, why) f
$$;

-- Give events of a batch back without counting an attempt: used by nack on
-- ordered subscriptions for the events behind the failed one, so that they
-- wait behind it instead of overtaking it.
CREATE FUNCTION eventbox._release(s eventbox.subscriptions, events bigint[], due timestamptz)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	UPDATE eventbox.retries
	SET attempts = attempts - 1, next_attempt_at = due, reason = 'released',
		updated_at = now()
	WHERE sub_id = s.sub_id AND id = ANY(events);

	INSERT INTO eventbox.retries (sub_id, id, txid, lane, attempts, next_attempt_at, reason)
	SELECT s.sub_id, l.id, l.txid,
		   eventbox._lane(l.aggregate_type, l.aggregate_id, l.id, s.lanes),
		   0, due, 'released'
	FROM eventbox.log l
	WHERE l.id = ANY(events)
	ON CONFLICT (sub_id, id) DO NOTHING;

	INSERT INTO eventbox.counters (sub_id, released)
	VALUES (s.sub_id, cardinality(events));
END
$$;

-- Expire the batches of a subscription whose lease ran out: every event
-- still in them counts one failed attempt.  Batches locked by a concurrent
-- ack or nack are skipped; they are not stale for long.  Called by
-- claim_batch (and by the worker).  Returns how many events expired.
CREATE FUNCTION eventbox._expire_leases(sub int, t timestamptz)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
	b record;
	expired bigint[] := '{}';
BEGIN
	SELECT * INTO s FROM eventbox.subscriptions WHERE sub_id = sub;
	FOR b IN
		SELECT batch_id, ids FROM eventbox.batches
		WHERE sub_id = sub AND leased_until < t
		ORDER BY batch_id
		FOR UPDATE SKIP LOCKED
	LOOP
		DELETE FROM eventbox.batches WHERE batch_id = b.batch_id;
		expired := expired || b.ids;
	END LOOP;
	IF cardinality(expired) > 0 THEN
		PERFORM eventbox._fail_many(s, expired, 'lease expired', NULL, 'expired');
	END IF;
	RETURN cardinality(expired);
END
$$;

-- ---------------------------------------------------------------------------
-- Publishing (C)
--
-- The SECURITY DEFINER C functions (publish, publish_batch, claim_batch,
-- ack) have no SET search_path clause: they pin name lookup to pg_catalog
-- themselves for every statement they run (EventboxPushSearchPath in
-- src/eventbox.c), which is stricter and much cheaper per call.
-- ---------------------------------------------------------------------------

CREATE FUNCTION eventbox.publish(
	event_type text,
	payload jsonb DEFAULT '{}',
	aggregate_type text DEFAULT NULL,
	aggregate_id text DEFAULT NULL,
	headers jsonb DEFAULT '{}',
	dedupe_key text DEFAULT NULL,
	deliver_at timestamptz DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'publish'
LANGUAGE C VOLATILE SECURITY DEFINER;

CREATE FUNCTION eventbox.publish_batch(events jsonb)
RETURNS SETOF bigint
AS 'MODULE_PATHNAME', 'publish_batch'
LANGUAGE C VOLATILE SECURITY DEFINER;

-- Row trigger: AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE
-- FUNCTION eventbox.capture('order' [, 'id_column']).
CREATE FUNCTION eventbox.capture()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	agg_type text;
	agg_col text;
	agg_id text;
	verb text;
	newj jsonb;
	oldj jsonb;
	src jsonb;
	keycols text[];
BEGIN
	IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
		RAISE EXCEPTION 'eventbox.capture() must be fired AFTER ... FOR EACH ROW'
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ON tbl FOR EACH ROW EXECUTE FUNCTION eventbox.capture(''aggregate_type'').';
	END IF;
	IF TG_NARGS < 1 OR TG_NARGS > 2 THEN
		RAISE EXCEPTION 'eventbox.capture() takes one or two arguments, got %', TG_NARGS
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Pass the aggregate type and, optionally, the column that holds the aggregate id.';
	END IF;
	agg_type := TG_ARGV[0];
	verb := CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'UPDATE' THEN 'updated'
					   WHEN 'DELETE' THEN 'deleted' END;
	IF verb IS NULL THEN
		RAISE EXCEPTION 'eventbox.capture() does not handle %', TG_OP
			USING ERRCODE = 'feature_not_supported';
	END IF;
	IF TG_OP <> 'DELETE' THEN newj := to_jsonb(NEW); END IF;
	IF TG_OP <> 'INSERT' THEN oldj := to_jsonb(OLD); END IF;
	src := COALESCE(newj, oldj);

	IF TG_NARGS = 2 THEN
		agg_col := TG_ARGV[1];
		IF NOT src ? agg_col THEN
			RAISE EXCEPTION 'column "%" does not exist in table %', agg_col,
				TG_RELID::regclass
				USING ERRCODE = 'undefined_column';
		END IF;
		agg_id := src ->> agg_col;
	ELSE
		SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keycols
		FROM pg_index i
			 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
			 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = TG_RELID AND i.indisprimary;
		IF keycols IS NULL THEN
			RAISE EXCEPTION 'table % has no primary key', TG_RELID::regclass
				USING ERRCODE = 'invalid_table_definition',
					  HINT = 'Add a primary key or name the aggregate id column: eventbox.capture(''type'', ''column'').';
		END IF;
		SELECT string_agg(src ->> c, ':' ORDER BY o) INTO agg_id
		FROM unnest(keycols) WITH ORDINALITY AS u(c, o);
	END IF;

	PERFORM eventbox.publish(
		event_type => agg_type || '.' || verb,
		payload => jsonb_build_object('new', newj, 'old', oldj,
									  'table', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME),
		aggregate_type => agg_type,
		aggregate_id => agg_id);
	RETURN NULL;
END
$$;

-- ---------------------------------------------------------------------------
-- Subscriptions (SQL: management, not hot paths)
-- ---------------------------------------------------------------------------

-- Validate and normalize subscription settings; raises the §7 errors.
CREATE FUNCTION eventbox._check_subscription(s eventbox.subscriptions)
RETURNS eventbox.subscriptions
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF s.name IS NULL OR s.mode IS NULL OR s.ordering IS NULL
		OR s.event_types IS NULL OR s.max_attempts IS NULL THEN
		RAISE EXCEPTION '% must not be null',
			CASE WHEN s.name IS NULL THEN 'name' WHEN s.mode IS NULL THEN 'mode'
				 WHEN s.ordering IS NULL THEN 'ordering'
				 WHEN s.event_types IS NULL THEN 'event_types'
				 ELSE 'max_attempts' END
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF s.name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$' THEN
		RAISE EXCEPTION 'invalid subscription name "%"', s.name
			USING ERRCODE = 'invalid_name',
				  DETAIL = 'A subscription name has 1 to 63 letters, digits, "_", ".", ":" or "-" and does not start with a punctuation mark.';
	END IF;
	IF s.mode IS NULL OR s.mode NOT IN ('pull', 'push', 'push_once') THEN
		RAISE EXCEPTION 'invalid mode "%"', s.mode
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Valid modes are "pull", "push" and "push_once".';
	END IF;
	IF s.notify IS NULL THEN
		s.notify := CASE s.mode WHEN 'pull' THEN 'wakeup' ELSE 'event' END;
	ELSIF s.notify NOT IN ('event', 'envelope', 'wakeup', 'none') THEN
		RAISE EXCEPTION 'invalid notify "%"', s.notify
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Valid values are "event", "envelope", "wakeup" and "none".';
	END IF;
	IF s.ordering IS NULL OR s.ordering NOT IN ('none', 'aggregate') THEN
		RAISE EXCEPTION 'invalid ordering "%"', s.ordering
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Valid values are "none" and "aggregate".';
	END IF;
	s.channel := COALESCE(s.channel, s.name);
	IF s.channel !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$' THEN
		RAISE EXCEPTION 'invalid channel name "%"', s.channel
			USING ERRCODE = 'invalid_name',
				  DETAIL = 'A channel name has 1 to 63 letters, digits, "_", ".", ":" or "-" and does not start with a punctuation mark.';
	END IF;
	IF s.event_types IS NULL OR cardinality(s.event_types) = 0 THEN
		RAISE EXCEPTION 'event_types must contain at least one pattern'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use ''{*}'' for every event type.';
	END IF;
	s.type_regex := eventbox._glob_regex(s.event_types);
	PERFORM eventbox._check_interval('lease', s.lease, false);
	PERFORM eventbox._check_interval('backoff_base', s.backoff_base, true);
	PERFORM eventbox._check_interval('backoff_max', s.backoff_max, true);
	IF s.backoff_max < s.backoff_base THEN
		RAISE EXCEPTION 'backoff_max (%) must not be less than backoff_base (%)',
			s.backoff_max, s.backoff_base
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF s.max_attempts IS NULL OR s.max_attempts < 1 THEN
		RAISE EXCEPTION 'max_attempts must be at least 1, got %', s.max_attempts
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	s.lanes := CASE s.ordering WHEN 'aggregate' THEN 16 ELSE 1 END;
	RETURN s;
END
$$;

CREATE FUNCTION eventbox.subscribe(
	name text,
	event_types text[] DEFAULT '{*}',
	mode text DEFAULT 'pull',
	channel text DEFAULT NULL,
	notify text DEFAULT NULL,
	ordering text DEFAULT 'none',
	lease interval DEFAULT '30 seconds',
	max_attempts int DEFAULT 10,
	backoff_base interval DEFAULT '1 second',
	backoff_max interval DEFAULT '1 hour',
	start_at text DEFAULT 'now')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
	start pg_snapshot;
BEGIN
	s.name := name; s.event_types := event_types; s.mode := mode;
	s.channel := channel; s.notify := notify; s.ordering := ordering;
	s.lease := lease; s.max_attempts := max_attempts;
	s.backoff_base := backoff_base; s.backoff_max := backoff_max;
	s := eventbox._check_subscription(s);
	IF start_at IS NULL THEN
		RAISE EXCEPTION 'start_at must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF start_at NOT IN ('now', 'beginning') THEN
		RAISE EXCEPTION 'invalid start_at "%"', start_at
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Valid values are "now" and "beginning".';
	END IF;
	IF EXISTS (SELECT FROM eventbox.subscriptions x WHERE x.name = s.name) THEN
		RAISE EXCEPTION 'subscription "%" already exists', s.name
			USING ERRCODE = 'duplicate_object',
				  HINT = 'Use eventbox.alter_subscription() to change it.';
	END IF;

	INSERT INTO eventbox.subscriptions
		(name, event_types, type_regex, mode, channel, notify, ordering, lanes,
		 lease, max_attempts, backoff_base, backoff_max)
	VALUES (s.name, s.event_types, s.type_regex, s.mode, s.channel, s.notify,
			s.ordering, s.lanes, s.lease, s.max_attempts, s.backoff_base,
			s.backoff_max)
	RETURNING sub_id INTO s.sub_id;

	-- 'now': everything visible at this moment counts as consumed;
	-- 'beginning': nothing does (the empty snapshot sees no transaction).
	start := CASE start_at WHEN 'now' THEN pg_current_snapshot()
						   ELSE '1:1:'::pg_snapshot END;
	INSERT INTO eventbox.cursors (sub_id, lane, snap)
	SELECT s.sub_id, g, start FROM generate_series(0, s.lanes - 1) g;
END
$$;

CREATE FUNCTION eventbox.alter_subscription(
	name text,
	event_types text[] DEFAULT NULL,
	mode text DEFAULT NULL,
	channel text DEFAULT NULL,
	notify text DEFAULT NULL,
	ordering text DEFAULT NULL,
	lease interval DEFAULT NULL,
	max_attempts int DEFAULT NULL,
	backoff_base interval DEFAULT NULL,
	backoff_max interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
BEGIN
	s := eventbox._sub(name, false);
	PERFORM FROM eventbox.subscriptions WHERE sub_id = s.sub_id FOR UPDATE;
	IF ordering IS NOT NULL AND ordering IS DISTINCT FROM s.ordering THEN
		RAISE EXCEPTION 'cannot change the ordering of subscription "%"', s.name
			USING ERRCODE = 'feature_not_supported',
				  HINT = 'Create a new subscription with the ordering you need.';
	END IF;
	IF mode IS NOT NULL AND mode IS DISTINCT FROM s.mode AND notify IS NULL THEN
		s.notify := NULL;		-- back to the new mode's default
	END IF;
	-- The worker keeps a push_once subscription's position in memory and
	-- writes it to the cursor about once a second: have it written now, so
	-- that the new mode starts where push_once delivery stopped.
	IF s.mode = 'push_once' AND mode IS DISTINCT FROM 'push_once' AND mode IS NOT NULL THEN
		PERFORM eventbox._push_once_handover(s.name);
	END IF;
	s.event_types := COALESCE(event_types, s.event_types);
	s.mode := COALESCE(mode, s.mode);
	s.channel := COALESCE(channel, s.channel);
	s.notify := COALESCE(notify, s.notify);
	s.lease := COALESCE(lease, s.lease);
	s.max_attempts := COALESCE(max_attempts, s.max_attempts);
	s.backoff_base := COALESCE(backoff_base, s.backoff_base);
	s.backoff_max := COALESCE(backoff_max, s.backoff_max);
	s := eventbox._check_subscription(s);
	UPDATE eventbox.subscriptions x
	SET event_types = s.event_types, type_regex = s.type_regex, mode = s.mode,
		channel = s.channel, notify = s.notify, lease = s.lease,
		max_attempts = s.max_attempts, backoff_base = s.backoff_base,
		backoff_max = s.backoff_max
	WHERE x.sub_id = s.sub_id;
END
$$;

CREATE FUNCTION eventbox.unsubscribe(name text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
BEGIN
	s := eventbox._sub(name, false);
	DELETE FROM eventbox.subscriptions WHERE sub_id = s.sub_id;
END
$$;

CREATE FUNCTION eventbox.pause(name text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	UPDATE eventbox.subscriptions SET paused = true
	WHERE sub_id = (eventbox._sub(pause.name, false)).sub_id;
END
$$;

CREATE FUNCTION eventbox.resume(name text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	UPDATE eventbox.subscriptions SET paused = false
	WHERE sub_id = (eventbox._sub(resume.name, false)).sub_id;
END
$$;

-- ---------------------------------------------------------------------------
-- Consuming
-- ---------------------------------------------------------------------------

CREATE FUNCTION eventbox.claim_batch(n int, subscription text DEFAULT NULL,
									 lease interval DEFAULT NULL)
RETURNS SETOF eventbox.delivery
AS 'MODULE_PATHNAME', 'claim_batch'
LANGUAGE C VOLATILE CALLED ON NULL INPUT SECURITY DEFINER ROWS 100;

CREATE FUNCTION eventbox.ack(id bigint, subscription text DEFAULT NULL,
							 lease uuid DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'ack'
LANGUAGE C VOLATILE CALLED ON NULL INPUT SECURITY DEFINER;

CREATE FUNCTION eventbox.ack(ids bigint[], subscription text DEFAULT NULL,
							 lease uuid DEFAULT NULL)
RETURNS int
AS 'MODULE_PATHNAME', 'ack_array'
LANGUAGE C VOLATILE CALLED ON NULL INPUT SECURITY DEFINER;

-- Find and lock the batch that holds a leased event; raise the "not leased"
-- error when there is none.
CREATE FUNCTION eventbox._leased_batch(s eventbox.subscriptions, event bigint,
									   tok uuid, what text)
RETURNS eventbox.batches
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	b eventbox.batches;
BEGIN
	IF event IS NULL THEN
		RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	SELECT * INTO b FROM eventbox.batches
	WHERE sub_id = s.sub_id AND event = ANY(ids) AND (tok IS NULL OR lease = tok)
	FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'cannot % event %: it is not leased%', what, event,
			CASE WHEN tok IS NULL THEN '' ELSE ' under lease ' || tok END
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = pg_catalog.format('Subscription "%s" holds no live lease on event %s%s.',
									  s.name, event,
									  CASE WHEN tok IS NULL THEN '' ELSE ' with that token' END),
				  HINT = 'The lease may have expired and the event been given to another consumer, or it was already acked.';
	END IF;
	RETURN b;
END
$$;

CREATE FUNCTION eventbox.nack(id bigint, error text DEFAULT NULL,
							  retry_in interval DEFAULT NULL,
							  subscription text DEFAULT NULL,
							  lease uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql CALLED ON NULL INPUT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
	b eventbox.batches;
	pos int;
	behind bigint[] := '{}';
	rest bigint[];
	outcome text;
	due timestamptz;
BEGIN
	s := eventbox._sub(subscription);
	IF retry_in IS NOT NULL THEN
		PERFORM eventbox._check_interval('retry_in', retry_in, true);
	END IF;
	b := eventbox._leased_batch(s, nack.id, lease, 'nack');
	pos := array_position(b.ids, nack.id);
	rest := b.ids[1:pos - 1];
	-- In an ordered subscription the events behind the failed one (same
	-- lane) go back with it, so they cannot overtake it.
	IF s.ordering = 'aggregate' THEN
		behind := b.ids[pos + 1:];
	ELSE
		rest := rest || b.ids[pos + 1:];
	END IF;
	IF cardinality(rest) = 0 THEN
		DELETE FROM eventbox.batches WHERE batch_id = b.batch_id;
	ELSE
		UPDATE eventbox.batches SET ids = rest WHERE batch_id = b.batch_id;
	END IF;
	outcome := eventbox._fail(s, nack.id, error, retry_in, 'nack');
	IF cardinality(behind) > 0 THEN
		SELECT next_attempt_at INTO due FROM eventbox.retries
		WHERE sub_id = s.sub_id AND retries.id = nack.id;
		PERFORM eventbox._release(s, behind, COALESCE(due, clock_timestamp()));
	END IF;
	RETURN outcome;
END
$$;

CREATE FUNCTION eventbox.extend_lease(id bigint, "by" interval,
									  subscription text DEFAULT NULL,
									  lease uuid DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql CALLED ON NULL INPUT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
	b eventbox.batches;
	until timestamptz;
BEGIN
	s := eventbox._sub(subscription);
	PERFORM eventbox._check_interval('by', "by", false);
	b := eventbox._leased_batch(s, extend_lease.id, lease, 'extend the lease of');
	UPDATE eventbox.batches SET leased_until = greatest(leased_until, clock_timestamp()) + "by"
	WHERE batch_id = b.batch_id
	RETURNING leased_until INTO until;
	RETURN until;
END
$$;

-- ---------------------------------------------------------------------------
-- Dead letters
-- ---------------------------------------------------------------------------

-- Without payloads: granted to readers.
CREATE VIEW eventbox.dead_letters AS
SELECT s.name AS subscription, d.id, d.event_id, d.event_type, d.aggregate_type,
	   d.aggregate_id, d.occurred_at, d.attempts, d.last_error, d.dead_at
FROM eventbox.dead_letter_store d JOIN eventbox.subscriptions s USING (sub_id);

-- With payloads and headers: admins only.
CREATE VIEW eventbox.dead_letter_events AS
SELECT s.name AS subscription, d.id, d.event_id, d.event_type, d.aggregate_type,
	   d.aggregate_id, d.payload, d.headers, d.occurred_at, d.attempts,
	   d.last_error, d.dead_at
FROM eventbox.dead_letter_store d JOIN eventbox.subscriptions s USING (sub_id);

CREATE FUNCTION eventbox.replay_dead_letters(subscription text, ids bigint[] DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql CALLED ON NULL INPUT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
	n int;
BEGIN
	IF subscription IS NULL THEN
		RAISE EXCEPTION 'subscription must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	s := eventbox._sub(subscription);

	-- "IN (SELECT unnest(ids))", not "= ANY(ids)": once PL/pgSQL keeps the
	-- generic plan, ANY over the parameter is a filter that compares every
	-- dead letter of the subscription with the whole array (10,000 ids: 300
	-- instead of 120 ms, growing with the square); the subquery is hashed.
	--
	-- An event whose log partition was reclaimed since it died comes back
	-- into the current partition from the dead letter's copy, with its id,
	-- event_id and txid.  Every cursor had consumed that txid (or the
	-- partition would not have been reclaimed), so no other subscription
	-- sees it again.
	INSERT INTO eventbox.log (part, id, txid, event_id, event_type, aggregate_type,
							  aggregate_id, payload, headers, occurred_at)
	SELECT (SELECT cur FROM eventbox.rotation), d.id, d.txid, d.event_id, d.event_type,
		   d.aggregate_type, d.aggregate_id, d.payload, d.headers, d.occurred_at
	FROM eventbox.dead_letter_store d
	WHERE d.sub_id = s.sub_id AND (ids IS NULL OR d.id IN (SELECT unnest(ids)))
	  AND NOT EXISTS (SELECT FROM eventbox.log l WHERE l.id = d.id);

	WITH d AS (
		DELETE FROM eventbox.dead_letter_store d
		WHERE d.sub_id = s.sub_id AND (ids IS NULL OR d.id IN (SELECT unnest(ids)))
		RETURNING d.id, d.txid, d.lane
	)
	INSERT INTO eventbox.retries (sub_id, id, txid, lane, attempts, next_attempt_at, reason)
	SELECT s.sub_id, d.id, d.txid, d.lane, 0, clock_timestamp(), 'replay' FROM d;
	GET DIAGNOSTICS n = ROW_COUNT;
	RETURN n;
END
$$;

CREATE FUNCTION eventbox.purge_dead_letters(subscription text, older_than interval DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql CALLED ON NULL INPUT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s eventbox.subscriptions;
	n int;
BEGIN
	IF subscription IS NULL THEN
		RAISE EXCEPTION 'subscription must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	s := eventbox._sub(subscription);
	IF older_than IS NOT NULL THEN
		PERFORM eventbox._check_interval('older_than', older_than, true);
	END IF;
	DELETE FROM eventbox.dead_letter_store d
	WHERE d.sub_id = s.sub_id
	  AND (older_than IS NULL OR d.dead_at < now() - older_than);
	GET DIAGNOSTICS n = ROW_COUNT;
	RETURN n;
END
$$;

-- ---------------------------------------------------------------------------
-- Inspection
-- ---------------------------------------------------------------------------

-- Events of a lane not yet handed out by its cursor: visible now, not
-- visible in the cursor snapshot, and not behind the position in the
-- current window (an id for ordered lanes, (txid, id) otherwise).
-- No SET clause, so that the planner can inline it (an EXISTS over it stops
-- at the first row); it is only called from functions that fix
-- search_path themselves.
CREATE FUNCTION eventbox._pending(s eventbox.subscriptions)
RETURNS SETOF eventbox.log
LANGUAGE sql STABLE
AS $$
	-- Not in the cursor's snapshot: the events from its xmax on, and those
	-- of the transactions it lists as in progress, each read by its txid
	-- once it has ended.  Not "from its xmin on", which read everything
	-- published since the oldest open transaction began.
	SELECT l.*
	FROM eventbox.cursors c
		 CROSS JOIN LATERAL (
			SELECT b.* FROM eventbox.log b
			WHERE b.txid >= pg_snapshot_xmax(c.snap)
			UNION ALL
			SELECT i.* FROM pg_snapshot_xip(c.snap) x(txid)
				 JOIN eventbox.log i ON i.txid = x.txid
			WHERE pg_visible_in_snapshot(x.txid, pg_current_snapshot())) l
	WHERE c.sub_id = s.sub_id
	  AND NOT (c.target IS NOT NULL
			   AND pg_visible_in_snapshot(l.txid, c.target)
			   AND CASE WHEN s.lanes > 1 THEN l.id <= c.pos_id
						ELSE (l.txid, l.id) <= (c.pos_txid, c.pos_id) END)
	  AND (s.type_regex IS NULL OR eventbox._type_matches(l.event_type, s.type_regex))
	  AND (s.lanes = 1 OR eventbox._lane(l.aggregate_type, l.aggregate_id, l.id, s.lanes) = c.lane)
	UNION ALL
	SELECT l.*
	FROM eventbox.retries r JOIN eventbox.log l USING (id)
	WHERE r.sub_id = s.sub_id AND r.next_attempt_at <> 'infinity'
$$;

CREATE TYPE eventbox.outbox_entry AS (
	subscription	text,
	status			text,
	id				bigint,
	event_id		uuid,
	event_type		text,
	aggregate_type	text,
	aggregate_id	text,
	occurred_at		timestamptz,
	attempts		int,
	due_at			timestamptz,	-- leased: lease deadline; retrying: next attempt
	last_error		text
);

CREATE FUNCTION eventbox.outbox(status text DEFAULT 'pending', lim int DEFAULT 100,
								subscription text DEFAULT NULL)
RETURNS SETOF eventbox.outbox_entry
LANGUAGE plpgsql STABLE CALLED ON NULL INPUT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	st text := outbox.status;
	sub text := outbox.subscription;
BEGIN
	IF st IS NULL OR lim IS NULL THEN
		RAISE EXCEPTION '% must not be null', CASE WHEN st IS NULL THEN 'status' ELSE 'lim' END
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF st NOT IN ('pending', 'leased', 'retrying', 'dead') THEN
		RAISE EXCEPTION 'invalid status "%"', st
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Valid statuses are "pending", "leased", "retrying" and "dead".';
	END IF;
	IF lim < 1 THEN
		RAISE EXCEPTION 'lim must be at least 1, got %', lim
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF sub IS NOT NULL THEN
		PERFORM eventbox._sub(sub);		-- raises for an unknown name
	END IF;
	RETURN QUERY
	SELECT q.* FROM (
		SELECT s.name, 'pending'::text, p.id, p.event_id, p.event_type, p.aggregate_type,
			   p.aggregate_id, p.occurred_at, 0, NULL::timestamptz, NULL::text
		FROM eventbox.subscriptions s CROSS JOIN LATERAL eventbox._pending(s) p
		WHERE st = 'pending' AND s.mode = 'pull' AND (sub IS NULL OR s.name = sub)
		  AND NOT EXISTS (SELECT FROM eventbox.retries r
						  WHERE r.sub_id = s.sub_id AND r.id = p.id)
		UNION ALL
		SELECT s.name, 'leased', l.id, l.event_id, l.event_type, l.aggregate_type,
			   l.aggregate_id, l.occurred_at,
			   COALESCE(r.attempts, 1), b.leased_until, r.last_error
		FROM eventbox.batches b
			 JOIN eventbox.subscriptions s USING (sub_id)
			 CROSS JOIN LATERAL unnest(b.ids) AS u(id)
			 JOIN eventbox.log l ON l.id = u.id
			 LEFT JOIN eventbox.retries r ON r.sub_id = b.sub_id AND r.id = u.id
		WHERE st = 'leased' AND (sub IS NULL OR s.name = sub)
		UNION ALL
		SELECT s.name, 'retrying', l.id, l.event_id, l.event_type, l.aggregate_type,
			   l.aggregate_id, l.occurred_at, r.attempts, r.next_attempt_at, r.last_error
		FROM eventbox.retries r
			 JOIN eventbox.subscriptions s USING (sub_id)
			 JOIN eventbox.log l ON l.id = r.id
		WHERE st = 'retrying' AND r.next_attempt_at <> 'infinity'
		  AND (sub IS NULL OR s.name = sub)
		UNION ALL
		SELECT d.subscription, 'dead', d.id, d.event_id, d.event_type, d.aggregate_type,
			   d.aggregate_id, d.occurred_at, d.attempts, NULL, d.last_error
		FROM eventbox.dead_letters d
		WHERE st = 'dead' AND (sub IS NULL OR d.subscription = sub)
	) q
	ORDER BY 1, 3
	LIMIT lim;
END
$$;

-- The numbers behind the stats view.  SECURITY DEFINER so that readers,
-- who may not read the tables, can see counts (never payloads).
CREATE FUNCTION eventbox._stats()
RETURNS TABLE (subscription text, mode text, paused boolean, pending bigint,
			   leased bigint, scheduled_retries bigint, dead bigint,
			   oldest_pending_age interval, lag_events bigint, lag_seconds float8,
			   published_total bigint, delivered_total bigint, acked_total bigint,
			   retried_total bigint, dead_lettered_total bigint,
			   last_activity timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- The log's events by type, counted in one pass for all subscriptions
-- (a count per subscription read the whole log once for each: 455 against
-- 121 ms with 1,000,000 events and four subscriptions).
WITH types AS MATERIALIZED (
	SELECT l.event_type, count(*) AS n FROM eventbox.log l GROUP BY l.event_type
)
SELECT s.name,
	   s.mode,
	   s.paused,
	   p.pending,
	   COALESCE(b.leased, 0),
	   r.scheduled,
	   d.dead,
	   now() - p.oldest,
	   p.pending,
	   COALESCE(EXTRACT(epoch FROM now() - p.oldest), 0)::float8,
	   pub.published,
	   cur.delivered,
	   cur.delivered - k.retried - k.dead - k.released - COALESCE(b.leased, 0),
	   k.retried,
	   k.dead,
	   GREATEST(cur.updated_at, k.updated_at, b.last_claim)
FROM eventbox.subscriptions s
	 CROSS JOIN LATERAL (SELECT COALESCE(sum(kk.retried), 0)::bigint AS retried,
								COALESCE(sum(kk.dead), 0)::bigint AS dead,
								COALESCE(sum(kk.released), 0)::bigint AS released,
								max(kk.at) AS updated_at
						 FROM eventbox.counters kk WHERE kk.sub_id = s.sub_id) k
	 CROSS JOIN LATERAL (SELECT sum(c.delivered)::bigint AS delivered,
								max(c.updated_at) AS updated_at
						 FROM eventbox.cursors c WHERE c.sub_id = s.sub_id) cur
	 CROSS JOIN LATERAL (SELECT COALESCE(sum(t.n), 0)::bigint AS published FROM types t
						 WHERE s.type_regex IS NULL OR eventbox._type_matches(t.event_type, s.type_regex)) pub
	 CROSS JOIN LATERAL (SELECT count(*) AS pending, min(x.occurred_at) AS oldest
						 FROM eventbox._pending(s) x) p
	 CROSS JOIN LATERAL (SELECT sum(cardinality(bb.ids))::bigint AS leased,
								max(bb.claimed_at) AS last_claim
						 FROM eventbox.batches bb WHERE bb.sub_id = s.sub_id) b
	 CROSS JOIN LATERAL (SELECT count(*) AS scheduled FROM eventbox.retries rr
						 WHERE rr.sub_id = s.sub_id AND rr.next_attempt_at <> 'infinity') r
	 CROSS JOIN LATERAL (SELECT count(*) AS dead FROM eventbox.dead_letter_store dd
						 WHERE dd.sub_id = s.sub_id) d
ORDER BY s.name
$$;

-- One row per subscription.  pending counts events not yet handed out plus
-- scheduled retries; published_total counts the committed events in the
-- log that match the subscription's event types; acked_total is
-- delivered - retried - dead-lettered - released - still leased, since
-- every delivery ends in exactly one of those.
CREATE VIEW eventbox.stats AS SELECT * FROM eventbox._stats();

CREATE FUNCTION eventbox.event(id bigint)
RETURNS eventbox.event
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT l.id, l.event_id, l.event_type, l.aggregate_type, l.aggregate_id,
		   l.payload, l.headers, l.occurred_at
	FROM eventbox.log l WHERE l.id = event.id
$$;

CREATE FUNCTION eventbox.timeline(aggregate_type text, aggregate_id text,
								  after_id bigint DEFAULT NULL, lim int DEFAULT 100)
RETURNS SETOF eventbox.event
LANGUAGE plpgsql STABLE CALLED ON NULL INPUT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF aggregate_type IS NULL OR aggregate_id IS NULL OR lim IS NULL THEN
		RAISE EXCEPTION '% must not be null',
			CASE WHEN lim IS NULL THEN 'lim' ELSE 'aggregate_type and aggregate_id' END
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF lim < 1 THEN
		RAISE EXCEPTION 'lim must be at least 1, got %', lim
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	RETURN QUERY
	SELECT l.id, l.event_id, l.event_type, l.aggregate_type, l.aggregate_id,
		   l.payload, l.headers, l.occurred_at
	FROM eventbox.log l
	-- COLLATE "C": the collation of log_aggregate_idx
	WHERE l.aggregate_type = timeline.aggregate_type COLLATE "C"
	  AND l.aggregate_id = timeline.aggregate_id COLLATE "C"
	  AND l.id > COALESCE(after_id, 0)
	ORDER BY l.id
	LIMIT lim;
END
$$;

-- ---------------------------------------------------------------------------
-- The background worker's side (see src/worker.c)
-- ---------------------------------------------------------------------------

-- What the worker forwards next for a push or push_once subscription.
CREATE FUNCTION eventbox._claim_push(n int, subscription text)
RETURNS SETOF eventbox.delivery
AS 'MODULE_PATHNAME', 'claim_push'
LANGUAGE C VOLATILE STRICT;

-- Every change to the subscriptions tells the backends that cache them
-- (claims, acks and the worker's cycle read them from memory).
CREATE TRIGGER subscriptions_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON eventbox.subscriptions
	FOR EACH STATEMENT EXECUTE FUNCTION eventbox._table_changed();

-- Called by alter_subscription before a push_once subscription changes its
-- mode: waits for the worker to write back the position it holds.
CREATE FUNCTION eventbox._push_once_handover(subscription text)
RETURNS void
AS 'MODULE_PATHNAME', 'push_once_handover'
LANGUAGE C VOLATILE STRICT;

-- Tell the launcher that this database has the extension.
CREATE FUNCTION eventbox._register()
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventbox_register'
LANGUAGE C VOLATILE;

-- Whether partition k holds events and none of them is still needed.  The
-- newest event's age is read from its highest id, an index probe.
-- PL/pgSQL rather than SQL so that its statements' plans are kept.
CREATE FUNCTION eventbox._part_reclaimable(k int, retention interval)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	rel text := 'eventbox.log_' || k;
	newest timestamptz;
	needed boolean;
BEGIN
	-- Each query names the partition itself: a generic plan over the
	-- parent with "part = k" may scan the other partitions too.
	EXECUTE 'SELECT occurred_at FROM ' || rel || ' ORDER BY id DESC LIMIT 1' INTO newest;
	IF newest IS NULL OR newest > clock_timestamp() - retention THEN
		RETURN false;
	END IF;
	EXECUTE 'SELECT EXISTS (SELECT FROM eventbox.cursors c'
		|| ' WHERE EXISTS (SELECT FROM ' || rel || ' l'
		|| '  WHERE l.txid >= pg_snapshot_xmin(c.snap)'
		|| '  AND NOT pg_visible_in_snapshot(l.txid, c.snap)))'
		|| ' OR EXISTS (SELECT FROM eventbox.retries r JOIN ' || rel || ' l ON l.id = r.id)'
		|| ' OR EXISTS (SELECT FROM eventbox.batches b CROSS JOIN LATERAL unnest(b.ids) AS u(id)'
		|| '  JOIN ' || rel || ' l ON l.id = u.id)'
		INTO needed;
	RETURN NOT needed;
END
$$;

-- Storage rotation, run by the worker at most once a second.  A partition
-- other than the current one is truncated when
--   * every lane cursor of every subscription has consumed every
--     transaction in it (each txid is visible in the cursor's snapshot),
--   * no in-flight batch and no retry still refers to one of its events
--     (dead letters keep their own copy), and
--   * its newest event is older than eventbox.retention.
-- The partition is locked first, under a short lock timeout and in a
-- subtransaction, and the conditions are checked again under the lock, so
-- no insert can slip in between; if the lock is not granted at once the
-- partition simply waits for the next round and publishers, who only write
-- to the current partition, never wait behind it.  The current partition
-- moves on when it has been current for eventbox.rotation_period and the
-- next one is empty.  Returns what it did, for the log and the tests.
CREATE FUNCTION eventbox._rotate(retention interval, period interval)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r eventbox.rotation;
	k int;
	nxt int;
	rel text;
	done text := '';
BEGIN
	SELECT * INTO r FROM eventbox.rotation FOR UPDATE;
	FOR k IN SELECT g FROM generate_series(0, 2) g WHERE g <> r.cur LOOP
		rel := 'eventbox.log_' || k;
		CONTINUE WHEN NOT eventbox._part_reclaimable(k, retention);
		BEGIN
			SET LOCAL lock_timeout = '20ms';
			EXECUTE 'LOCK TABLE ' || rel || ' IN ACCESS EXCLUSIVE MODE';
			-- again under the lock: now no insert can be in progress
			IF eventbox._part_reclaimable(k, retention) THEN
				EXECUTE 'TRUNCATE ' || rel;
				done := done || ' truncated ' || rel;
			END IF;
		EXCEPTION WHEN lock_not_available THEN
			done := done || ' busy ' || rel;
		END;
		SET LOCAL lock_timeout = '5s';
	END LOOP;

	nxt := (r.cur + 1) % 3;
	IF r.switched_at <= clock_timestamp() - period
	   AND NOT EXISTS (SELECT FROM eventbox.log l WHERE l.part = nxt) THEN
		UPDATE eventbox.rotation SET cur = nxt, switched_at = clock_timestamp();
		done := done || ' current log_' || nxt;
	END IF;
	RETURN ltrim(done);
END
$$;


-- ---------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC, each group role its own functions.
-- ---------------------------------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA eventbox FROM PUBLIC;
REVOKE ALL ON eventbox.stats, eventbox.dead_letters, eventbox.dead_letter_events FROM PUBLIC;

GRANT EXECUTE ON FUNCTION eventbox.publish(text, jsonb, text, text, jsonb, text, timestamptz),
	eventbox.publish_batch(jsonb),
	eventbox.capture()
	TO eventbox_publisher, eventbox_admin;

GRANT EXECUTE ON FUNCTION eventbox.claim_batch(int, text, interval),
	eventbox.ack(bigint, text, uuid),
	eventbox.ack(bigint[], text, uuid),
	eventbox.nack(bigint, text, interval, text, uuid),
	eventbox.extend_lease(bigint, interval, text, uuid),
	eventbox.event(bigint),
	eventbox.timeline(text, text, bigint, int)
	TO eventbox_consumer, eventbox_admin;

GRANT EXECUTE ON FUNCTION eventbox.outbox(text, int, text) TO eventbox_reader;
GRANT EXECUTE ON FUNCTION eventbox._stats() TO eventbox_reader, eventbox_admin;
GRANT SELECT ON eventbox.stats, eventbox.dead_letters TO eventbox_reader, eventbox_admin;

GRANT EXECUTE ON FUNCTION eventbox.subscribe(text, text[], text, text, text, text, interval, int, interval, interval, text),
	eventbox.alter_subscription(text, text[], text, text, text, text, interval, int, interval, interval),
	eventbox.unsubscribe(text),
	eventbox.pause(text),
	eventbox.resume(text),
	eventbox.replay_dead_letters(text, bigint[]),
	eventbox.purge_dead_letters(text, interval)
	TO eventbox_admin;
GRANT SELECT ON eventbox.dead_letter_events TO eventbox_admin;

-- The default subscription: every event, forwarded to LISTEN eventbox by
-- the worker, counted as delivered once notified.
SELECT eventbox.subscribe('default', mode => 'push_once', channel => 'eventbox',
						  notify => 'event');

-- With eventbox in shared_preload_libraries, start this database's worker.
SELECT eventbox._register();
