/*-------------------------------------------------------------------------
 *
 * deliver.c
 *	  One delivery cycle of the database worker.
 *
 * A cycle, run by the worker in its own transaction:
 *
 *	1. gives the events of ran-out leases back (eventbox._expire_leases);
 *	2. for each push and push_once subscription, takes up to
 *	   eventbox.batch_size events with eventbox._claim_push and queues one
 *	   notification per event on the subscription's channel ("event" and
 *	   "envelope"), or one per cycle ("wakeup");
 *	3. queues one wake-up for each pull subscription that has due events;
 *	4. tells the worker when a retry, a delayed event or a lease comes due
 *	   next.
 *
 * The notifications go out when the worker commits, together with the
 * cursor moves that they report.  This runs once per committed publishing
 * transaction when publishers are slow and once per batch when they are
 * fast, so it is written in C with cached generic plans: a PL/pgSQL cycle
 * spent most of its time planning and starting executors, on the cores the
 * publishers need.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "eventbox.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/jsonb.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* How often the timers run while the worker is busy (see EventboxDeliver). */
#define DELIVER_TIMER_MS	5

/* Notifications must stay below PostgreSQL's 8000-byte payload limit. */
#define DELIVER_MAX_MESSAGE 8000

/* Parts of a notification (see deliver_message). */
#define DM_ENVELOPE			0x01	/* aggregate_type, aggregate_id,
									 * occurred_at */
#define DM_LEASE			0x02	/* lease, leased_until */
#define DM_BODY				0x04	/* headers, payload */
#define DM_HEADERS			0x08	/* headers alone, payload_omitted */
#define DM_OMITTED			0x10	/* payload_omitted, headers_omitted */
#define DM_MINIMAL			0x20	/* payload_omitted, envelope_omitted */

/* Columns of eventbox.delivery, as EventboxClaimPush returns them. */
enum
{
	DC_ID = 1, DC_EVENT_ID, DC_TYPE, DC_ATYPE, DC_AID, DC_PAYLOAD, DC_HEADERS,
	DC_OCCURRED, DC_SUBSCRIPTION, DC_ATTEMPT, DC_LEASE, DC_LEASED_UNTIL
};

static SPIPlanPtr plan_expire = NULL;
static SPIPlanPtr plan_subs = NULL;
static TupleDesc delivery_desc = NULL;
static SPIPlanPtr plan_pull_wake = NULL;
static SPIPlanPtr plan_cursor_key = NULL;
static SPIPlanPtr plan_next_due = NULL;
static SPIPlanPtr plan_lease_min = NULL;
static SPIPlanPtr plan_prepared = NULL;

static void
deliver_prepare_plans(void)
{
	Oid			t_ts[1] = {TIMESTAMPTZOID};
	Oid			t_wake[2] = {TIMESTAMPTZOID, TIDARRAYOID};
	Oid			t_subs[1] = {INT4ARRAYOID};

	if (plan_next_due != NULL)
		return;

	/* eventbox.delivery, for the claims' results */
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		static const struct
		{
			const char *name;
			Oid			type;
		}			cols[DC_LEASED_UNTIL] = {
			{"id", INT8OID}, {"event_id", UUIDOID}, {"event_type", TEXTOID},
			{"aggregate_type", TEXTOID}, {"aggregate_id", TEXTOID},
			{"payload", JSONBOID}, {"headers", JSONBOID},
			{"occurred_at", TIMESTAMPTZOID}, {"subscription", TEXTOID},
			{"attempt", INT4OID}, {"lease", UUIDOID},
			{"leased_until", TIMESTAMPTZOID}
		};
		int			i;

		delivery_desc = CreateTemplateTupleDesc(DC_LEASED_UNTIL);
		for (i = 0; i < DC_LEASED_UNTIL; i++)
			TupleDescInitEntry(delivery_desc, (AttrNumber) (i + 1), cols[i].name,
							   cols[i].type, -1, 0);
		MemoryContextSwitchTo(old);
	}

	plan_expire = EventboxPreparePlan(
									  "SELECT eventbox._expire_leases(b.sub_id, $1)"
									  " FROM (SELECT DISTINCT sub_id FROM eventbox.batches"
									  "       WHERE leased_until < $1) b",
									  1, t_ts);
	plan_subs = EventboxPreparePlan(
									"SELECT name, mode, notify, channel, sub_id, lanes"
									" FROM eventbox.subscriptions"
									" WHERE NOT paused ORDER BY sub_id",
									0, NULL);

	/*
	 * Pull subscriptions with due events, and their wake-up text.  Each
	 * cursor is probed for its first claimable event in (txid, id) order, so
	 * that the probe is an index scan that stops at the first match; the
	 * set-returning eventbox._pending() (which the stats view counts with)
	 * was planned as a scan of the whole log, every DELIVER_TIMER_MS.  The
	 * events not yet in the cursor's snapshot are those from its xmax on
	 * and those of the transactions it lists as in progress; each of those
	 * is probed by its own txid, and only once it has ended.  Reading from
	 * the snapshot's xmin on instead read everything published since the
	 * oldest open transaction began, on every check (30,002 rows filtered,
	 * 4.5 ms, after 10,000 claims of 30,000 events beside one open writing
	 * transaction; now 4 rows, 0.46 ms).  The cursors are read by the ctids
	 * in $2 (see deliver_pull_cursors).
	 */
#define DELIVER_WAKE_DUE \
	"   AND NOT (c.target IS NOT NULL" \
	"            AND pg_visible_in_snapshot(l.txid, c.target)" \
	"            AND CASE WHEN s.lanes > 1 THEN l.id <= c.pos_id" \
	"                ELSE (l.txid, l.id) <= (c.pos_txid, c.pos_id) END)" \
	"   AND (s.type_regex IS NULL OR eventbox._type_matches(l.event_type, s.type_regex))" \
	"   AND (s.lanes = 1 OR eventbox._lane(l.aggregate_type," \
	"        l.aggregate_id, l.id, s.lanes) = c.lane)" \
	"   AND (l.deliver_at IS NULL OR l.deliver_at <= $1)"
	plan_pull_wake = EventboxPreparePlan(
										 "SELECT s.channel, CASE s.notify"
										 "  WHEN 'wakeup' THEN jsonb_build_object('subscription', s.name,"
										 "                                        'wakeup', true)::text"
										 "  ELSE jsonb_build_object('subscription', s.name, 'wakeup', true,"
										 "                          'notify', s.notify)::text END"
										 " FROM eventbox.subscriptions s"
										 " WHERE s.mode = 'pull' AND s.notify <> 'none' AND NOT s.paused"
										 " AND (EXISTS (SELECT FROM eventbox.retries r"
										 "              WHERE r.sub_id = s.sub_id AND r.next_attempt_at <= $1)"
										 "      OR EXISTS (SELECT FROM (SELECT * FROM eventbox.cursors"
										 "                    WHERE ctid = ANY ($2) OFFSET 0) c"
										 "        WHERE c.sub_id = s.sub_id"
										 "        AND (EXISTS (SELECT FROM eventbox.log l"
										 "              WHERE l.txid >= pg_snapshot_xmax(c.snap)"
										 DELIVER_WAKE_DUE
										 "              ORDER BY l.txid LIMIT 1)"
										 "          OR EXISTS (SELECT FROM pg_snapshot_xip(c.snap) x(txid)"
										 "              JOIN eventbox.log l ON l.txid = x.txid"
										 "              WHERE pg_visible_in_snapshot(x.txid, pg_current_snapshot())"
										 DELIVER_WAKE_DUE "))))"
										 " ORDER BY s.sub_id",
										 2, t_wake);
#undef DELIVER_WAKE_DUE
	plan_cursor_key = EventboxPreparePlan("SELECT sub_id, lane, ctid FROM eventbox.cursors"
										  " WHERE sub_id = ANY ($1)",
										  1, t_subs);
	plan_next_due = EventboxPreparePlan(
										"SELECT LEAST("
										" (SELECT min(next_attempt_at) FROM eventbox.retries"
										"  WHERE next_attempt_at > $1 AND next_attempt_at <> 'infinity'),"
										" (SELECT min(deliver_at) FROM eventbox.log WHERE deliver_at > $1))",
										1, t_ts);
	plan_lease_min = EventboxPreparePlan("SELECT min(leased_until) FROM eventbox.batches",
										 0, NULL);
	plan_prepared = EventboxPreparePlan("SELECT EXISTS (SELECT FROM pg_catalog.pg_prepared_xacts p"
										" WHERE p.database = pg_catalog.current_database())",
										0, NULL);
}

/* ---- building notification texts ---------------------------------------- */

/*
 * A notification is the text that jsonb_build_object(...)::text would give
 * for the same keys and values.  It is written directly, in jsonb's order
 * of keys (shorter keys first, then bytewise), with jsonb's separators:
 * building a jsonb value first, as jsonb_build_object does, copied each
 * payload three times and cost more than the rest of the delivery.
 */

/* A delivery row, deformed once. */
typedef struct DeliverRow
{
	Datum		values[DC_LEASED_UNTIL];
	bool		nulls[DC_LEASED_UNTIL];
	TupleDesc	desc;
} DeliverRow;

/*
 * dm_string appends len bytes of s as a JSON string, escaped as
 * escape_json escapes (the text jsonb gives), but copying each run of
 * characters that need no escape at once: escape_json appends character by
 * character, and a notification is mostly such runs.
 */
static void
dm_string(StringInfo buf, const char *s, int len)
{
	const char *end = s + len;
	const char *run = s;

	appendStringInfoChar(buf, '"');
	for (; s < end; s++)
	{
		unsigned char c = (unsigned char) *s;
		const char *esc;

		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		if (s > run)
			appendBinaryStringInfo(buf, run, s - run);
		run = s + 1;
		switch (c)
		{
			case '\b':
				esc = "\\b";
				break;
			case '\f':
				esc = "\\f";
				break;
			case '\n':
				esc = "\\n";
				break;
			case '\r':
				esc = "\\r";
				break;
			case '\t':
				esc = "\\t";
				break;
			case '"':
				esc = "\\\"";
				break;
			case '\\':
				esc = "\\\\";
				break;
			default:
				appendStringInfo(buf, "\\u%04x", c);
				continue;
		}
		appendBinaryStringInfo(buf, esc, 2);
	}
	if (s > run)
		appendBinaryStringInfo(buf, run, s - run);
	appendStringInfoChar(buf, '"');
}

/* keys are our own constants, which need no escaping */
static void
dm_key(StringInfo buf, const char *key)
{
	if (buf->len > 1)
		appendBinaryStringInfo(buf, ", ", 2);
	appendStringInfoChar(buf, '"');
	appendBinaryStringInfo(buf, key, strlen(key));
	appendBinaryStringInfo(buf, "\": ", 3);
}

/* a uuid as uuid_out writes it, quoted */
static void
dm_uuid(StringInfo buf, const pg_uuid_t *uuid)
{
	static const char hex[] = "0123456789abcdef";
	char	   *p;
	int			i;

	enlargeStringInfo(buf, 2 * UUID_LEN + 6);
	p = buf->data + buf->len;
	*p++ = '"';
	for (i = 0; i < UUID_LEN; i++)
	{
		if (i == 4 || i == 6 || i == 8 || i == 10)
			*p++ = '-';
		*p++ = hex[uuid->data[i] >> 4];
		*p++ = hex[uuid->data[i] & 0x0F];
	}
	*p++ = '"';
	*p = '\0';
	buf->len = p - buf->data;
}

/* a column of the delivery row as the jsonb value of its SQL value */
static void
dm_column(StringInfo buf, const char *key, DeliverRow *row, int col)
{
	Datum		value = row->values[col - 1];
	char		num[MAXINT8LEN + 1];

	dm_key(buf, key);
	if (row->nulls[col - 1])
	{
		appendBinaryStringInfo(buf, "null", 4);
		return;
	}
	switch (TupleDescAttr(row->desc, col - 1)->atttypid)
	{
		case TEXTOID:
			{
				text	   *t = DatumGetTextPP(value);

				dm_string(buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
				break;
			}
		case UUIDOID:
			dm_uuid(buf, DatumGetUUIDP(value));
			break;
		case TIMESTAMPTZOID:
			{
				char		ts[MAXDATELEN + 1];

				JsonEncodeDateTime(ts, value, TIMESTAMPTZOID, NULL);
				dm_string(buf, ts, strlen(ts));
				break;
			}
		case INT8OID:
			appendBinaryStringInfo(buf, num, pg_lltoa(DatumGetInt64(value), num));
			break;
		case INT4OID:
			appendBinaryStringInfo(buf, num, pg_ltoa(DatumGetInt32(value), num));
			break;
		case JSONBOID:
			{
				Jsonb	   *j = DatumGetJsonbP(value);

				(void) JsonbToCString(buf, &j->root, VARSIZE(j));
				break;
			}
		default:
			elog(ERROR, "eventbox: unexpected type %u in a delivery",
				 TupleDescAttr(row->desc, col - 1)->atttypid);
	}
}

static void
dm_true(StringInfo buf, const char *key)
{
	dm_key(buf, key);
	appendBinaryStringInfo(buf, "true", 4);
}

/*
 * deliver_message writes the text of one notification from the given parts
 * of a delivery row into buf (reset first).
 */
static void
deliver_message(StringInfo buf, DeliverRow *row, int parts)
{
	resetStringInfo(buf);
	appendStringInfoChar(buf, '{');
	dm_column(buf, "id", row, DC_ID);
	if (parts & DM_LEASE)
		dm_column(buf, "lease", row, DC_LEASE);
	dm_column(buf, "attempt", row, DC_ATTEMPT);
	if (parts & (DM_BODY | DM_HEADERS))
		dm_column(buf, "headers", row, DC_HEADERS);
	if (parts & DM_BODY)
		dm_column(buf, "payload", row, DC_PAYLOAD);
	dm_column(buf, "event_id", row, DC_EVENT_ID);
	dm_column(buf, "event_type", row, DC_TYPE);
	if (parts & DM_ENVELOPE)
	{
		dm_column(buf, "occurred_at", row, DC_OCCURRED);
		dm_column(buf, "aggregate_id", row, DC_AID);
	}
	if (parts & DM_LEASE)
		dm_column(buf, "leased_until", row, DC_LEASED_UNTIL);
	dm_column(buf, "subscription", row, DC_SUBSCRIPTION);
	if (parts & DM_ENVELOPE)
		dm_column(buf, "aggregate_type", row, DC_ATYPE);
	if (parts & DM_OMITTED)
		dm_true(buf, "headers_omitted");
	if (parts & (DM_HEADERS | DM_OMITTED | DM_MINIMAL))
		dm_true(buf, "payload_omitted");
	if (parts & DM_MINIMAL)
		dm_true(buf, "envelope_omitted");
	appendStringInfoChar(buf, '}');
}

/*
 * deliver_notification writes into buf the text the worker sends for one
 * event: the whole event for notify = 'event', the envelope for
 * 'envelope'.  What does not fit in a notification is left out and marked
 * so (the consumer reads it with eventbox.event(id)); nothing is ever
 * truncated.
 */
static void
deliver_notification(StringInfo buf, TupleTableSlot *slot, bool whole,
					 bool with_lease)
{
	int			base = DM_ENVELOPE | (with_lease ? DM_LEASE : 0);
	int			tries[3];
	int			ntries = 0;
	int			i;
	DeliverRow	row;

	row.desc = slot->tts_tupleDescriptor;
	slot_getallattrs(slot);
	memcpy(row.values, slot->tts_values, sizeof(row.values));
	memcpy(row.nulls, slot->tts_isnull, sizeof(row.nulls));

	if (whole)
	{
		tries[ntries++] = base | DM_BODY;
		tries[ntries++] = base | DM_HEADERS;
		tries[ntries++] = base | DM_OMITTED;
	}
	else
		tries[ntries++] = base;

	for (i = 0; i < ntries; i++)
	{
		deliver_message(buf, &row, tries[i]);
		if (buf->len < DELIVER_MAX_MESSAGE)
			return;
	}
	/* only an enormous aggregate id gets here */
	deliver_message(buf, &row, DM_MINIMAL | (with_lease ? DM_LEASE : 0));
}

static char *
deliver_wakeup(const char *subscription)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"wakeup\": true, \"subscription\": ");
	escape_json(&buf, subscription);
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/* ---- the subscriptions ----------------------------------------------------- */

/*
 * The subscriptions that are not paused, in creation order, as the worker
 * read them last.  They are read again only when the table changed (see
 * EventboxSubscriptionsGeneration): a statement per cycle for a list that
 * hardly ever changes.
 */
typedef struct DeliverSub
{
	text	   *name;
	char	   *mode;
	char	   *notify;
	char	   *channel;
	int32		sub_id;
	int32		lanes;
	ItemPointerData *tids;		/* pull: newest cursor version seen, per lane */
} DeliverSub;

static DeliverSub *subs = NULL;
static int	nsubs = 0;
static uint64 subs_generation = 0;
static MemoryContext subs_ctx = NULL;

static void
deliver_load_subs(void)
{
	uint64		generation = EventboxSubscriptionsGeneration();
	MemoryContext old;
	int			i;
	bool		isnull;

	if (subs_ctx != NULL && generation == subs_generation)
		return;
	if (subs_ctx == NULL)
		subs_ctx = AllocSetContextCreate(TopMemoryContext, "eventbox worker subscriptions",
										 ALLOCSET_SMALL_SIZES);
	MemoryContextReset(subs_ctx);
	EventboxExecPlan(plan_subs, NULL, NULL, SPI_OK_SELECT, "subscription list");
	old = MemoryContextSwitchTo(subs_ctx);
	nsubs = (int) SPI_processed;
	subs = palloc0(sizeof(DeliverSub) * Max(nsubs, 1));
	for (i = 0; i < nsubs; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;

		subs[i].name = DatumGetTextPCopy(SPI_getbinval(t, d, 1, &isnull));
		subs[i].mode = TextDatumGetCString(SPI_getbinval(t, d, 2, &isnull));
		subs[i].notify = TextDatumGetCString(SPI_getbinval(t, d, 3, &isnull));
		subs[i].channel = TextDatumGetCString(SPI_getbinval(t, d, 4, &isnull));
		subs[i].sub_id = DatumGetInt32(SPI_getbinval(t, d, 5, &isnull));
		subs[i].lanes = DatumGetInt32(SPI_getbinval(t, d, 6, &isnull));
		/* zeroed: invalid, so the first wake-up check looks them up by key */
		subs[i].tids = palloc0(sizeof(ItemPointerData) * subs[i].lanes);
	}
	MemoryContextSwitchTo(old);
	subs_generation = generation;
}

/*
 * The pull wake-up check reads every pull cursor of the subscriptions that
 * want wake-ups, and a consumer updates its cursor on every claim.  While a
 * transaction holds the xmin horizon none of the old versions can be
 * pruned, and a lookup through the index on (sub_id, lane) walks all of
 * them: one per claim since the horizon was pinned (0.77 ms per check after
 * 10,000 claims, and the worker spent most of its time there in the
 * steady-state benchmark).  So the worker remembers, per lane, the version
 * it found last and follows the update chain from there to the version
 * `snap` sees, which visits only the versions written since the last
 * check.  The lanes whose version is gone (pruned, its slot reused, the
 * row moved by compaction or deleted) or leads to another row are looked up
 * through the key, together.
 *
 * There is one row per (sub_id, lane) (see eventbox.cursors), so a snapshot
 * sees one version of it: a visible version with the right key is the one
 * the key would have found.  deliver_pull_cursors returns the versions
 * found as a tid[]; the check then runs with the same snapshot.
 */
static bool
deliver_cursor_follow(TableScanDesc scan, TupleTableSlot *slot, Snapshot snap,
					  int32 sub_id, int32 lane, ItemPointer tid)
{
	bool		isnull;

	if (!ItemPointerIsValid(tid) || !table_tuple_tid_valid(scan, tid))
		return false;
	table_tuple_get_latest_tid(scan, tid);
	if (!table_tuple_fetch_row_version(scan->rs_rd, tid, snap, slot))
		return false;
	return DatumGetInt32(slot_getattr(slot, 1, &isnull)) == sub_id &&
		DatumGetInt32(slot_getattr(slot, 2, &isnull)) == lane;
}

static bool
deliver_wants_wakeup(const DeliverSub *sub)
{
	return strcmp(sub->mode, "pull") == 0 && strcmp(sub->notify, "none") != 0;
}

/* deliver_select runs a kept SELECT with snap, read-only */
static void
deliver_select(SPIPlanPtr plan, Datum *values, Snapshot snap, const char *what)
{
	int			rc = SPI_execute_snapshot(plan, values, NULL, snap, InvalidSnapshot,
										  true, false, 0);

	if (rc != SPI_OK_SELECT)
		elog(ERROR, "eventbox: %s failed: %s", what, SPI_result_code_string(rc));
}

static Datum
deliver_pull_cursors(Snapshot snap)
{
	Relation	rel;
	TableScanDesc scan;
	TupleTableSlot *slot;
	Datum	   *found;
	Datum	   *missed;
	int			nmissed = 0;
	int			n = 0;
	int			max = 0;
	int			i;
	int32		lane;

	for (i = 0; i < nsubs; i++)
		max += subs[i].lanes;
	found = palloc(sizeof(Datum) * Max(max, 1));
	missed = palloc(sizeof(Datum) * Max(nsubs, 1));
	rel = table_open(get_relname_relid("cursors", get_namespace_oid("eventbox", false)),
					 AccessShareLock);
	scan = table_beginscan_tid(rel, snap);
	slot = table_slot_create(rel, NULL);
	for (i = 0; i < nsubs; i++)
	{
		DeliverSub *sub = &subs[i];
		bool		miss = false;

		if (!deliver_wants_wakeup(sub))
			continue;
		for (lane = 0; lane < sub->lanes; lane++)
		{
			CHECK_FOR_INTERRUPTS();
			if (!deliver_cursor_follow(scan, slot, snap, sub->sub_id, lane, &sub->tids[lane]))
			{
				ItemPointerSetInvalid(&sub->tids[lane]);
				miss = true;
			}
		}
		if (miss)
			missed[nmissed++] = Int32GetDatum(sub->sub_id);
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	table_close(rel, AccessShareLock);

	/*
	 * The lanes not found by their last version, through the key, in one
	 * statement: without a held horizon pruning often removes the version
	 * seen last, and a subscription with 16 lanes would otherwise cost 16
	 * statements.
	 */
	if (nmissed > 0)
	{
		Datum		arg = PointerGetDatum(construct_array(missed, nmissed, INT4OID,
														  sizeof(int32), true, TYPALIGN_INT));
		uint64		r;

		deliver_select(plan_cursor_key, &arg, snap, "cursor lookup");
		for (r = 0; r < SPI_processed; r++)
		{
			HeapTuple	t = SPI_tuptable->vals[r];
			TupleDesc	d = SPI_tuptable->tupdesc;
			bool		isnull;
			int32		sub_id = DatumGetInt32(SPI_getbinval(t, d, 1, &isnull));

			lane = DatumGetInt32(SPI_getbinval(t, d, 2, &isnull));
			for (i = 0; i < nsubs; i++)
			{
				if (subs[i].sub_id == sub_id && lane >= 0 && lane < subs[i].lanes &&
					!ItemPointerIsValid(&subs[i].tids[lane]))
					ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(t, d, 3, &isnull)),
									&subs[i].tids[lane]);
			}
		}
	}

	for (i = 0; i < nsubs; i++)
	{
		if (!deliver_wants_wakeup(&subs[i]))
			continue;
		for (lane = 0; lane < subs[i].lanes; lane++)
			if (ItemPointerIsValid(&subs[i].tids[lane]))
				found[n++] = PointerGetDatum(&subs[i].tids[lane]);
	}
	return PointerGetDatum(construct_array(found, n, TIDOID, sizeof(ItemPointerData),
										   false, TYPALIGN_SHORT));
}

/* ---- the cycle ------------------------------------------------------------ */

/*
 * EventboxDeliver runs steps 1-4 above inside the caller's transaction and
 * SPI connection.  Returns when the worker should run again at the latest:
 * now if a subscription had a full batch (a backlog), else the next due
 * time, or 0 if nothing is due.  *forwarded is set to the number of events
 * forwarded to push subscriptions.
 *
 * Steps 1, 3 and 4 (the timers) run at most every DELIVER_TIMER_MS: when
 * publishers commit thousands of times a second, each commit wakes the
 * worker, and the timers would cost more than the forwarding.  A cycle
 * that skips them asks to run again when they are next due, so a timer is
 * never more than DELIVER_TIMER_MS late.
 */
TimestampTz
EventboxDeliver(int batch, uint64 *forwarded)
{
	static TimestampTz timers_at = 0;
	static TimestampTz pull_wake_next = 0;
	TimestampTz now = GetCurrentTimestamp();
	bool		timers = (now < timers_at ||	/* the clock went back */
						  now - timers_at >= DELIVER_TIMER_MS * (TimestampTz) 1000);
	Datum		arg = TimestampTzGetDatum(now);
	int			i;
	bool		more = false;
	bool		pull_wake = false;
	bool		isnull;
	Datum		due;

	deliver_prepare_plans();
	*forwarded = 0;

	/* leases, only when one can have run out (see EventboxLeaseBound) */
	if (timers)
	{
		timers_at = now;
		if (now >= EventboxLeaseBound())
		{
			bool		prepared;

			/*
			 * A prepared transaction's batches show only when it commits,
			 * in a backend that does not lower the bound: while one
			 * exists, the bound stays unknown (a claim that prepares
			 * sets it so; this looks after raising it, so no prepare
			 * falls between).
			 */
			EventboxRaiseLeaseBound();
			EventboxExecPlan(plan_prepared, NULL, NULL, SPI_OK_SELECT, "prepared transactions");
			prepared = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
												  SPI_tuptable->tupdesc, 1, &isnull));
			if (prepared)
				EventboxLowerLeaseBound(0);
			EventboxExecPlan(plan_expire, &arg, NULL, SPI_OK_SELECT, "lease expiry");
			EventboxExecPlan(plan_lease_min, NULL, NULL, SPI_OK_SELECT, "lease bound");
			due = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			if (!isnull)
				EventboxLowerLeaseBound(DatumGetTimestampTz(due));
		}
	}

	deliver_load_subs();
	for (i = 0; i < nsubs; i++)
	{
		DeliverSub *sub = &subs[i];
		const char *mode = sub->mode;
		const char *notify = sub->notify;
		const char *channel = sub->channel;
		bool		whole = (strcmp(notify, "event") == 0);
		bool		with_lease = (strcmp(mode, "push") == 0);
		Tuplestorestate *rows;
		TupleTableSlot *slot;
		uint64		n = 0;

		CHECK_FOR_INTERRUPTS();
		if (strcmp(mode, "pull") == 0)
		{
			pull_wake = pull_wake || deliver_wants_wakeup(sub);
			continue;
		}
		rows = tuplestore_begin_heap(false, false, work_mem);
		EventboxClaimPush(sub->name, batch, rows, delivery_desc);
		slot = MakeSingleTupleTableSlot(delivery_desc, &TTSOpsMinimalTuple);
		if (whole || strcmp(notify, "envelope") == 0)
		{
			StringInfoData buf;

			initStringInfo(&buf);
			while (tuplestore_gettupleslot(rows, true, false, slot))
			{
				deliver_notification(&buf, slot, whole, with_lease);
				Async_Notify(channel, buf.data);
				n++;
			}
			pfree(buf.data);
		}
		else
		{
			while (tuplestore_gettupleslot(rows, true, false, slot))
				n++;
			if (n > 0 && strcmp(notify, "wakeup") == 0)
				Async_Notify(channel, deliver_wakeup(text_to_cstring(sub->name)));
		}
		*forwarded += n;
		if (n >= (uint64) batch)
			more = true;		/* a backlog: come back at once */
		ExecDropSingleTupleTableSlot(slot);
		tuplestore_end(rows);
	}

	/*
	 * The wake-up check runs no more than a tenth of the time: under a
	 * long transaction holding the xmin horizon, its probes of the log can
	 * still pass over rows (of in-progress transactions, for one).
	 */
	if (timers && pull_wake && now >= pull_wake_next)
	{
		TimestampTz end;
		Snapshot	snap = RegisterSnapshot(GetTransactionSnapshot());
		Datum		wake[2] = {arg, deliver_pull_cursors(snap)};

		deliver_select(plan_pull_wake, wake, snap, "wake-up check");
		UnregisterSnapshot(snap);
		end = GetCurrentTimestamp();
		pull_wake_next = end + 9 * (end - now);
		for (i = 0; i < (int) SPI_processed; i++)
		{
			HeapTuple	w = SPI_tuptable->vals[i];

			Async_Notify(TextDatumGetCString(SPI_getbinval(w, SPI_tuptable->tupdesc, 1, &isnull)),
						 TextDatumGetCString(SPI_getbinval(w, SPI_tuptable->tupdesc, 2, &isnull)));
		}
	}

	if (more)
		return now;
	if (!timers)
		return TimestampTzPlusMilliseconds(timers_at, DELIVER_TIMER_MS);
	EventboxExecPlan(plan_next_due, &arg, NULL, SPI_OK_SELECT, "next due time");
	due = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	{
		TimestampTz bound = EventboxLeaseBound();
		TimestampTz next = isnull ? DT_NOEND : DatumGetTimestampTz(due);

		if (bound == 0)
		{
			/* unknown (a prepared transaction exists): look */
			EventboxExecPlan(plan_lease_min, NULL, NULL, SPI_OK_SELECT, "lease bound");
			due = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			bound = isnull ? DT_NOEND : DatumGetTimestampTz(due);
		}

		/* the earliest lease deadline */
		if (bound < next)
			next = bound;
		return next == DT_NOEND ? 0 : next;
	}
}
