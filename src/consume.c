/*-------------------------------------------------------------------------
 *
 * consume.c
 *	  The consumer side: claim_batch and ack.
 *
 * A lane's cursor is a snapshot S_c (everything visible in it is consumed),
 * an optional target snapshot S_t and a position (txid, id) inside the
 * window S_t - S_c.  The window holds the events of transactions visible in
 * S_t but not in S_c: those in S_c's in-progress list plus those in the xid
 * band [xmax(S_c), xmax(S_t)).  Inside a window, unordered subscriptions
 * take events in (txid, id) order, which follows the index; ordered ones
 * take them in id order, because ids are drawn at publish time and so
 * follow commit order for writers that serialize on the aggregate (xids
 * may not: a transaction can take its xid before it waits for a row lock).
 * When a window is used up, S_t becomes the new S_c.  So a
 * transaction that took a low xid and commits late is found through S_c's
 * in-progress list instead of being skipped, and a long open transaction
 * only costs one index probe per claim.
 *
 * A claim writes one batch row per lane it took events from and updates
 * the lane's cursor: a constant number of rows whatever the batch size.
 * Failed, expired and delayed events get per-event rows in
 * eventbox.retries; they are served before new events.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "catalog/namespace.h"
#include "common/hashfn.h"
#include "storage/bufmgr.h"
#include "storage/itemptr.h"
#include "storage/lock.h"
#include "eventbox.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/params.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgrprotos.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/xid8.h"

PG_FUNCTION_INFO_V1(claim_batch);
PG_FUNCTION_INFO_V1(claim_push);
PG_FUNCTION_INFO_V1(ack);
PG_FUNCTION_INFO_V1(ack_array);
PG_FUNCTION_INFO_V1(push_once_handover);

/* A subscription as the consumer functions need it. */
typedef struct ConsumeSub
{
	int32		sub_id;
	char	   *name;
	char	   *mode;
	Datum		type_regex;		/* text, or 0 when every type matches */
	int32		lanes;
	bool		ordered;
	Interval   *lease;
	bool		paused;
} ConsumeSub;

/* The state of one claim_batch call. */
typedef struct ClaimState
{
	ConsumeSub *sub;
	Datum		sub_name;		/* sub->name as text, for each delivery */
	bool		no_lease;		/* push_once: delivery needs no lease */
	int			want;			/* events still wanted */
	Tuplestorestate *out;		/* the deliveries */
	TupleDesc	desc;
	pg_uuid_t	lease;
	TimestampTz now;
	TimestampTz leased_until;
	MemoryContext ctx;			/* outlives SPI: the caller's context */
	/* the current lane's batch */
	int64	   *ids;
	int			nids;
	int			retry_count;
	int			read;			/* log rows its window scans returned */
} ClaimState;

/* A lane's cursor: its snapshot, window target and position. */
typedef struct CursorPos
{
	Datum		snap;
	Datum		target;			/* unless target_null */
	bool		target_null;
	Datum		pos_txid;
	Datum		pos_id;
} CursorPos;

/*
 * The cursor reads (locked or not, by key or by remembered TID): the
 * columns in this order.
 */
#define CURSOR_SELECT \
	"SELECT snap, target, pos_txid, pos_id, ctid, updated_at FROM eventbox.cursors"

/* Columns of the log queries, in this order. */
#define LOG_COLUMNS \
	"id, txid, event_id, event_type, aggregate_type, aggregate_id, payload," \
	" headers, occurred_at, deliver_at"
enum
{
	LC_ID = 1, LC_TXID, LC_EVENT_ID, LC_TYPE, LC_ATYPE, LC_AID, LC_PAYLOAD,
	LC_HEADERS, LC_OCCURRED, LC_DELIVER
};

/* the direct log scans hand out rows in the same order */
StaticAssertDecl(LC_DELIVER == EVENTBOX_LOGSCAN_NATTS,
				 "LOG_COLUMNS does not match logscan.c");

static SPIPlanPtr plan_sub = NULL;
static SPIPlanPtr plan_expire = NULL;
static SPIPlanPtr plan_lock = NULL;
static SPIPlanPtr plan_lock_skip = NULL;
static SPIPlanPtr plan_lock_tid = NULL;
static SPIPlanPtr plan_lock_tid_skip = NULL;
static SPIPlanPtr plan_peek = NULL;
static SPIPlanPtr plan_peek_tid = NULL;
static SPIPlanPtr plan_idle = NULL;
static SPIPlanPtr plan_busy = NULL;
static SPIPlanPtr plan_retry_pick = NULL;
static SPIPlanPtr plan_retry_due = NULL;
static SPIPlanPtr plan_retry_lane = NULL;
static SPIPlanPtr plan_retry_take = NULL;
static SPIPlanPtr plan_events = NULL;
static SPIPlanPtr plan_delay = NULL;
static SPIPlanPtr plan_batch = NULL;
static SPIPlanPtr plan_cursor = NULL;
static SPIPlanPtr plan_retry_done = NULL;
static SPIPlanPtr plan_retry_orphans = NULL;
static SPIPlanPtr plan_ack_find = NULL;
static SPIPlanPtr plan_ack_find_tid = NULL;
static SPIPlanPtr plan_ack_delete = NULL;
static SPIPlanPtr plan_ack_update = NULL;

static void cursor_tid_remember(int32 sub_id, int32 lane, Datum tid);
static void claim_run(text *name, int32 n, Interval *lease, bool for_worker,
					  Tuplestorestate *out, TupleDesc desc);

static Datum
consume_col(int row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

/*
 * consume_int8_array makes an int8[] datum of n ids.
 */
static Datum
consume_int8_array(const int64 *ids, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	int			i;

	for (i = 0; i < n; i++)
		elems[i] = Int64GetDatum(ids[i]);
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
}

/*
 * Subscriptions read by this backend, by name.  A claim or ack needs its
 * subscription's settings; reading them with a statement each time was a
 * fifth of a worker cycle.  Every change to eventbox.subscriptions sends a
 * relcache invalidation for the table when it commits (the statement
 * trigger eventbox._table_changed), before its locks are released;
 * consume_sub and the worker's list of subscriptions (deliver.c) accept
 * pending invalidations first, so they see every change committed before
 * them, as a new statement would.
 */
static List *sub_cache = NIL;
static MemoryContext sub_cache_ctx = NULL;
static uint64 sub_cache_generation = 0;	/* the generation sub_cache is of */
static uint64 sub_generation = 1;
static Oid	sub_relid = InvalidOid;

static void
sub_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == sub_relid)
		sub_generation++;
}

/*
 * EventboxSubscriptionsGeneration returns a number that changes whenever a
 * change to eventbox.subscriptions may have committed since the last call:
 * what was read of the table at an equal number is still current.
 */
uint64
EventboxSubscriptionsGeneration(void)
{
	static bool registered = false;
	Oid			nsp;
	Oid			relid = InvalidOid;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(sub_invalidate, (Datum) 0);
		registered = true;
	}
	AcceptInvalidationMessages();
	nsp = get_namespace_oid("eventbox", true);
	if (OidIsValid(nsp))
		relid = get_relname_relid("subscriptions", nsp);
	if (relid != sub_relid)
	{
		sub_relid = relid;
		sub_generation++;
	}
	return sub_generation;
}

static ConsumeSub *
consume_sub_copy(const ConsumeSub *from, MemoryContext ctx)
{
	MemoryContext old = MemoryContextSwitchTo(ctx);
	ConsumeSub *sub = palloc(sizeof(ConsumeSub));

	*sub = *from;
	sub->name = pstrdup(from->name);
	sub->mode = pstrdup(from->mode);
	if (from->type_regex != (Datum) 0)
		sub->type_regex = datumCopy(from->type_regex, false, -1);
	sub->lease = palloc(sizeof(Interval));
	*sub->lease = *from->lease;
	MemoryContextSwitchTo(old);
	return sub;
}

/*
 * consume_sub looks up a subscription by name; NULL means the setting
 * eventbox.subscription.  The result is allocated in ctx.
 */
static ConsumeSub *
consume_sub(text *name, MemoryContext ctx)
{
	ConsumeSub	found;
	ListCell   *lc;
	char	   *cname;
	Datum		value;
	bool		isnull;
	uint64		generation;

	if (name == NULL)
	{
		if (eventbox_subscription == NULL || eventbox_subscription[0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("no subscription given"),
					 errhint("Pass the subscription argument or SET eventbox.subscription.")));
		name = cstring_to_text(eventbox_subscription);
	}
	cname = text_to_cstring(name);

	generation = EventboxSubscriptionsGeneration();
	if (sub_cache_ctx == NULL)
		sub_cache_ctx = AllocSetContextCreate(TopMemoryContext, "eventbox subscriptions",
											  ALLOCSET_SMALL_SIZES);
	if (generation != sub_cache_generation)
	{
		MemoryContextReset(sub_cache_ctx);
		sub_cache = NIL;
		sub_cache_generation = generation;
	}
	foreach(lc, sub_cache)
	{
		ConsumeSub *sub = (ConsumeSub *) lfirst(lc);

		if (strcmp(sub->name, cname) == 0)
			return consume_sub_copy(sub, ctx);
	}

	if (plan_sub == NULL)
	{
		Oid			types[1] = {TEXTOID};

		plan_sub = EventboxPreparePlan(
									   "SELECT sub_id, name, mode, type_regex, lanes,"
									   " ordering = 'aggregate', lease, paused"
									   " FROM eventbox.subscriptions WHERE name = $1",
									   1, types);
	}
	value = PointerGetDatum(name);
	EventboxExecPlan(plan_sub, &value, NULL, SPI_OK_SELECT, "subscription lookup");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("subscription \"%s\" does not exist", cname)));

	found.sub_id = DatumGetInt32(consume_col(0, 1, &isnull));
	found.name = TextDatumGetCString(consume_col(0, 2, &isnull));
	found.mode = TextDatumGetCString(consume_col(0, 3, &isnull));
	value = consume_col(0, 4, &isnull);
	found.type_regex = isnull ? (Datum) 0 : value;
	found.lanes = DatumGetInt32(consume_col(0, 5, &isnull));
	found.ordered = DatumGetBool(consume_col(0, 6, &isnull));
	found.lease = DatumGetIntervalP(consume_col(0, 7, &isnull));
	found.paused = DatumGetBool(consume_col(0, 8, &isnull));

	/* kept only if no invalidation arrived while it was read */
	if (sub_generation == sub_cache_generation)
	{
		MemoryContext old = MemoryContextSwitchTo(sub_cache_ctx);

		sub_cache = lappend(sub_cache, consume_sub_copy(&found, sub_cache_ctx));
		MemoryContextSwitchTo(old);
	}
	return consume_sub_copy(&found, ctx);
}

/*
 * claim_emit_values appends one delivery to the result and the event to
 * the lane's batch.  row_values and row_nulls hold a log row in LOG_COLUMNS
 * order.
 */
static void
claim_emit_values(ClaimState *st, Datum *row_values, bool *row_nulls, int attempt)
{
	Datum		values[12];
	bool		nulls[12];
	static const int cols[8] = {LC_ID, LC_EVENT_ID, LC_TYPE, LC_ATYPE, LC_AID,
	LC_PAYLOAD, LC_HEADERS, LC_OCCURRED};
	int			i;

	for (i = 0; i < 8; i++)
	{
		values[i] = row_values[cols[i] - 1];
		nulls[i] = row_nulls[cols[i] - 1];
	}
	values[8] = st->sub_name;
	nulls[8] = false;
	values[9] = Int32GetDatum(attempt);
	nulls[9] = false;
	values[10] = UUIDPGetDatum(&st->lease);
	nulls[10] = st->no_lease;
	values[11] = TimestampTzGetDatum(st->leased_until);
	nulls[11] = st->no_lease;
	tuplestore_putvalues(st->out, st->desc, values, nulls);

	st->ids[st->nids++] = DatumGetInt64(values[0]);
	st->want--;
}

/*
 * claim_emit is claim_emit_values for row `row` of the current SPI result.
 */
static void
claim_emit(ClaimState *st, int row, int attempt)
{
	Datum		row_values[LC_DELIVER];
	bool		row_nulls[LC_DELIVER];

	/* one pass over the row: most columns follow variable-length ones */
	Assert(SPI_tuptable->tupdesc->natts == LC_DELIVER);
	heap_deform_tuple(SPI_tuptable->vals[row], SPI_tuptable->tupdesc,
					  row_values, row_nulls);
	claim_emit_values(st, row_values, row_nulls, attempt);
}

/*
 * claim_drop_orphans removes retry rows whose event is no longer in the
 * log, which cannot happen through the API (rotation keeps every partition
 * a retry refers to, and replay restores truncated events); if it happens
 * anyway the row must not stay leased for ever, blocking an ordered lane.
 */
static void
claim_drop_orphans(ClaimState *st, Datum ids)
{
	Datum		values[2];
	uint64		i;

	values[0] = Int32GetDatum(st->sub->sub_id);
	values[1] = ids;
	EventboxExecPlan(plan_retry_orphans, values, NULL, SPI_OK_DELETE_RETURNING,
					 "orphan cleanup");
	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		ereport(WARNING,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("event %lld of subscription \"%s\" is no longer in the log; its retry was dropped",
						(long long) DatumGetInt64(consume_col((int) i, 1, &isnull)),
						st->sub->name)));
	}
}

/*
 * claim_fetch_events reads the events of leased retries (an int8[] of
 * `expected` ids) into the current SPI result, dropping retry rows whose
 * event is gone.
 */
static void
claim_fetch_events(ClaimState *st, Datum ids, int expected)
{
	EventboxExecPlan(plan_events, &ids, NULL, SPI_OK_SELECT, "event fetch");
	if ((int) SPI_processed < expected)
	{
		SPITupleTable *saved = SPI_tuptable;
		uint64		saved_n = SPI_processed;

		claim_drop_orphans(st, ids);
		SPI_tuptable = saved;
		SPI_processed = saved_n;
	}
}

/*
 * claim_take_retries leases the retries of the given event ids (an int8[]
 * of n ids the caller has picked: due, and not leased by anyone else), then
 * emits their events with the attempt each is on.
 */
static void
claim_take_retries(ClaimState *st, Datum *ids, int n)
{
	Datum		values[3];
	int64	   *rids;
	int32	   *attempts;
	Datum	   *elems;
	int			i;

	values[0] = Int32GetDatum(st->sub->sub_id);
	values[1] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, true,
												TYPALIGN_DOUBLE));
	values[2] = TimestampTzGetDatum(st->now);
	EventboxExecPlan(plan_retry_take, values, NULL, SPI_OK_UPDATE_RETURNING, "retry lease");
	n = (int) SPI_processed;
	if (n == 0)
		return;

	rids = palloc(sizeof(int64) * n);
	attempts = palloc(sizeof(int32) * n);
	elems = palloc(sizeof(Datum) * n);
	for (i = 0; i < n; i++)
	{
		bool		isnull;

		rids[i] = DatumGetInt64(consume_col(i, 1, &isnull));
		attempts[i] = DatumGetInt32(consume_col(i, 2, &isnull));
		elems[i] = Int64GetDatum(rids[i]);
	}

	claim_fetch_events(st,
					   PointerGetDatum(construct_array(elems, n, INT8OID, 8, true,
													   TYPALIGN_DOUBLE)),
					   n);
	for (i = 0; i < (int) SPI_processed; i++)
	{
		bool		isnull;
		int64		id = DatumGetInt64(consume_col(i, LC_ID, &isnull));
		int			j;

		for (j = 0; j < n; j++)
			if (rids[j] == id)
				break;
		claim_emit(st, i, j < n ? attempts[j] : 1);
		st->retry_count++;
	}
}

/*
 * claim_retries_unordered leases due retries of an unordered subscription,
 * oldest due first, skipping rows other claims hold.
 */
static void
claim_retries_unordered(ClaimState *st)
{
	Datum		values[3];
	int			n;
	int			i;
	Datum	   *elems;

	/*
	 * Three statements whose plans stay good whatever the table's
	 * statistics were when a backend settled on its generic plans: the
	 * subscription's earliest retry through (sub_id, next_attempt_at),
	 * which tells whether anything is due (usually nothing is, and one
	 * index probe is much cheaper to start than the locking statements);
	 * the due rows in that order, locked; then those rows by key.  Written
	 * as one UPDATE joined with the picking subquery, the generic plan
	 * guessed a tenth of the due rows for LIMIT $2 and hashed every retry
	 * row of the subscription against them: a claim of the one due retry
	 * among 90,000 retry rows spent 16-22 ms in that statement.
	 */
	if (plan_retry_due == NULL)
	{
		Oid			types[1] = {INT4OID};

		plan_retry_due = EventboxPreparePlan(
											 "SELECT next_attempt_at FROM eventbox.retries"
											 " WHERE sub_id = $1 ORDER BY next_attempt_at LIMIT 1",
											 1, types);
	}
	if (plan_retry_pick == NULL)
	{
		Oid			types[3] = {INT4OID, INT4OID, TIMESTAMPTZOID};

		plan_retry_pick = EventboxPreparePlan(
											  "SELECT id FROM eventbox.retries"
											  " WHERE sub_id = $1 AND next_attempt_at <= $3"
											  " ORDER BY next_attempt_at, id LIMIT $2"
											  " FOR UPDATE SKIP LOCKED",
											  3, types);
	}
	values[0] = Int32GetDatum(st->sub->sub_id);
	values[1] = Int32GetDatum(st->want);
	values[2] = TimestampTzGetDatum(st->now);

	EventboxExecPlan(plan_retry_due, values, NULL, SPI_OK_SELECT, "retry probe");
	if (SPI_processed == 0)
		return;
	{
		bool		isnull;

		if (DatumGetTimestampTz(consume_col(0, 1, &isnull)) > st->now)
			return;
	}

	EventboxExecPlan(plan_retry_pick, values, NULL, SPI_OK_SELECT, "retry pick");
	n = (int) SPI_processed;
	if (n == 0)
		return;
	elems = palloc(sizeof(Datum) * n);
	for (i = 0; i < n; i++)
	{
		bool		isnull;

		elems[i] = consume_col(i, 1, &isnull);
	}
	claim_take_retries(st, elems, n);
}

/*
 * claim_retries_lane leases the due head of an ordered lane's retries: the
 * retries in order up to the first one that is not yet due.  Returns true
 * if the lane still has retries waiting, in which case no new events may be
 * taken from it.
 */
static bool
claim_retries_lane(ClaimState *st, int lane)
{
	Datum		values[3];
	int			n;
	int			take = 0;
	Datum	   *elems;
	int			i;

	values[0] = Int32GetDatum(st->sub->sub_id);
	values[1] = Int32GetDatum(lane);
	values[2] = TimestampTzGetDatum(st->now);
	EventboxExecPlan(plan_retry_lane, values, NULL, SPI_OK_SELECT, "lane retries");
	n = (int) SPI_processed;
	if (n == 0)
		return false;

	elems = palloc(sizeof(Datum) * n);
	for (i = 0; i < n && take < st->want; i++)
	{
		bool		isnull;

		if (!DatumGetBool(consume_col(i, 2, &isnull)))
			break;
		elems[take++] = consume_col(i, 1, &isnull);
	}
	if (take == 0)
		return true;

	claim_take_retries(st, elems, take);
	return take < n;
}

/*
 * A window scan's rows go from the log straight to the claim's result
 * (logscan.c).  Events whose deliver_at lies ahead are only noted during the
 * scan; claim_window_done turns them into delayed retries.
 */
typedef struct WindowScan
{
	ClaimState *st;
	Datum		pos_txid;		/* the last row received */
	Datum		pos_id;
	int			rows;			/* rows received */
	int			limit;			/* stop after this many rows */
	struct ConsumeSnapshot *from;	/* the cursor snapshot (window start) */
	struct ConsumeSnapshot *target; /* the window's target */
	int			lane;
	bool		stopped;		/* an ordered lane met a delayed event */
	int			ndelayed;
	int			maxdelayed;
	Datum	   *delayed;		/* (id, txid, deliver_at) of each */
} WindowScan;

/* an int8, xid8 or timestamptz that outlives the scan */
static inline Datum
consume_keep8(Datum value, MemoryContext ctx)
{
#ifdef USE_FLOAT8_BYVAL
	return value;
#else
	MemoryContext old = MemoryContextSwitchTo(ctx);
	Datum		copy = datumCopy(value, false, 8);

	MemoryContextSwitchTo(old);
	return copy;
#endif
}

/*
 * window_scan_row takes one row of a window (values and nulls in
 * LOG_COLUMNS order), emitting it or noting it as delayed, and moves the
 * position to it.  Returns false when the scan has to stop.
 */
static bool
window_scan_row(WindowScan *ws, Datum *values, bool *nulls)
{
	ClaimState *st = ws->st;

	ws->rows++;
	ws->pos_txid = consume_keep8(values[LC_TXID - 1], st->ctx);
	ws->pos_id = consume_keep8(values[LC_ID - 1], st->ctx);

	if (!nulls[LC_DELIVER - 1] &&
		DatumGetTimestampTz(values[LC_DELIVER - 1]) > st->now)
	{
		if (ws->ndelayed == ws->maxdelayed)
		{
			ws->maxdelayed = Max(16, ws->maxdelayed * 2);
			ws->delayed = ws->delayed == NULL
				? MemoryContextAlloc(st->ctx, sizeof(Datum) * 3 * ws->maxdelayed)
				: repalloc(ws->delayed, sizeof(Datum) * 3 * ws->maxdelayed);
		}
		ws->delayed[ws->ndelayed * 3] = ws->pos_id;
		ws->delayed[ws->ndelayed * 3 + 1] = ws->pos_txid;
		ws->delayed[ws->ndelayed * 3 + 2] =
			consume_keep8(values[LC_DELIVER - 1], st->ctx);
		ws->ndelayed++;
		/* in an ordered lane nothing behind it may overtake it */
		if (st->sub->ordered)
		{
			ws->stopped = true;
			return false;
		}
		return true;
	}
	claim_emit_values(st, values, nulls, 1);
	return true;
}

/*
 * claim_window_done ends a window scan: the delayed events it met become
 * retry rows, and the position moves to the last row it received.
 * Returns the number of rows received.
 */
static int
claim_window_done(ClaimState *st, WindowScan *ws, int lane,
				  Datum *pos_txid, Datum *pos_id, bool *stopped)
{
	int			i;

	for (i = 0; i < ws->ndelayed; i++)
	{
		Datum		dvalues[5];

		dvalues[0] = Int32GetDatum(st->sub->sub_id);
		dvalues[1] = ws->delayed[i * 3];
		dvalues[2] = ws->delayed[i * 3 + 1];
		dvalues[3] = Int32GetDatum(lane);
		dvalues[4] = ws->delayed[i * 3 + 2];
		EventboxExecPlan(plan_delay, dvalues, NULL, SPI_OK_INSERT, "delayed event");
	}

	*pos_txid = ws->pos_txid;
	*pos_id = ws->pos_id;
	if (ws->stopped)
		*stopped = true;
	return ws->rows;
}

/*
 * The on-disk layout of pg_snapshot (utils/adt/xid8funcs.c, which does not
 * export it): the in-progress list is sorted ascending, as
 * pg_snapshot_xip() returns it.
 */
typedef struct ConsumeSnapshot
{
	int32		vl_len_;
	uint32		nxip;
	uint64		xmin;
	uint64		xmax;
	uint64		xip[FLEXIBLE_ARRAY_MEMBER];
} ConsumeSnapshot;

/* a pg_snapshot value, detoasted (a short varlena header becomes long) */
static ConsumeSnapshot *
consume_snapshot(Datum snap)
{
	ConsumeSnapshot *s = (ConsumeSnapshot *) PG_DETOAST_DATUM(snap);

	if (VARSIZE(s) != offsetof(ConsumeSnapshot, xip) + sizeof(uint64) * s->nxip)
		elog(ERROR, "eventbox: unexpected pg_snapshot layout");
	return s;
}

static int
consume_uint64_cmp(const void *a, const void *b)
{
	uint64		x = *(const uint64 *) a;
	uint64		y = *(const uint64 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* whether xid is in the snapshot's in-progress list */
static bool
consume_in_progress(const ConsumeSnapshot *s, uint64 xid)
{
	return bsearch(&xid, s->xip, s->nxip, sizeof(uint64), consume_uint64_cmp) != NULL;
}

/* pg_visible_in_snapshot(xid, snapshot), without a function call */
static bool
consume_visible(const ConsumeSnapshot *s, uint64 xid)
{
	if (xid < s->xmin)
		return true;
	if (xid >= s->xmax)
		return false;
	return !consume_in_progress(s, xid);
}

/*
 * consume_type_matches is eventbox._type_matches(event_type, regex), with
 * the function's memo of recent answers kept across claims.
 */
static bool
consume_type_matches(Datum type, Datum regex)
{
	static FmgrInfo flinfo;

	if (flinfo.fn_addr == NULL)
	{
		flinfo.fn_nargs = 2;
		flinfo.fn_strict = true;
		flinfo.fn_mcxt = TopMemoryContext;
		flinfo.fn_addr = eventbox_type_matches;
	}
	/* the collation of the log's event_type column */
	return DatumGetBool(FunctionCall2Coll(&flinfo, DEFAULT_COLLATION_OID, type, regex));
}

/*
 * window_take ends the filter of a direct scan's receiver: a row of the
 * window whose type the subscription takes goes to window_scan_row.
 * Returns whether the scan goes on.
 */
static bool
window_take(WindowScan *ws, Datum *values, bool *nulls)
{
	ClaimState *st = ws->st;

	if (st->sub->type_regex != (Datum) 0 &&
		!consume_type_matches(values[LC_TYPE - 1], st->sub->type_regex))
		return true;
	if (!window_scan_row(ws, values, nulls))
		return false;
	return ws->rows < ws->limit;
}

/*
 * window_scan_init sets up a direct scan of the window from snap to target
 * after the position, for up to `limit` rows.
 */
static void
window_scan_init(WindowScan *ws, ClaimState *st, Datum snap, Datum target,
				 int lane, int limit, Datum pos_txid, Datum pos_id)
{
	memset(ws, 0, sizeof(WindowScan));
	ws->st = st;
	ws->pos_txid = pos_txid;
	ws->pos_id = pos_id;
	ws->limit = limit;
	ws->from = consume_snapshot(snap);
	ws->target = consume_snapshot(target);
	ws->lane = lane;
}

/* the window filter of unordered lanes, for rows of a direct scan */
static bool
window_log_receive(void *arg, Datum *values, bool *nulls)
{
	WindowScan *ws = (WindowScan *) arg;

	if (!consume_visible(ws->target, DatumGetUInt64(values[LC_TXID - 1])))
		return true;
	return window_take(ws, values, nulls);
}

/*
 * claim_window_unordered reads up to `limit` events of an unordered lane's
 * window after the position, in (txid, id) order, with direct index scans
 * of the log (logscan.c), and moves the position.  The window's events are
 * those of transactions visible in the target and not in the cursor
 * snapshot: transactions in the cursor snapshot's in-progress list that
 * the target sees (read one transaction at a time, in xid order), then the
 * band of xids from the cursor snapshot's xmax to the target's.  Every xid
 * in the list is below the band, so one position covers both parts.
 * Returns the number of rows read (see claim_window_done).
 */
static int
claim_window_unordered(ClaimState *st, Datum snap, Datum target, int lane,
					   int limit, Datum *pos_txid, Datum *pos_id, bool *stopped)
{
	uint64		at_txid = DatumGetUInt64(*pos_txid);
	int64		at_id = DatumGetInt64(*pos_id);
	ConsumeSnapshot *from;
	EventboxLogScan *ls;
	WindowScan	ws;
	uint32		i;

	Assert(st->sub->lanes == 1);
	window_scan_init(&ws, st, snap, target, lane, limit, *pos_txid, *pos_id);
	from = ws.from;

	/* opened after the target was taken: its snapshot sees all the target does */
	ls = EventboxLogScanBegin(false);

	/*
	 * A transaction of the list that the target still sees in progress has
	 * nothing in this window; under many concurrent publishers that is most
	 * of the list, and it costs no scan.
	 */
	for (i = 0; i < from->nxip && ws.rows < limit && !ws.stopped; i++)
	{
		uint64		xid = from->xip[i];

		if (xid < at_txid || !consume_visible(ws.target, xid))
			continue;
		/* inside the position's own transaction, continue after it */
		EventboxLogScanRange(ls, xid, xid == at_txid ? at_id : PG_INT64_MIN, xid + 1,
							 window_log_receive, &ws);
	}

	if (ws.rows < limit && !ws.stopped)
	{
		uint64		txid = DatumGetUInt64(ws.pos_txid);

		if (txid < from->xmax)
			EventboxLogScanRange(ls, from->xmax, PG_INT64_MIN, ws.target->xmax,
								 window_log_receive, &ws);
		else
			EventboxLogScanRange(ls, txid, DatumGetInt64(ws.pos_id), ws.target->xmax,
								 window_log_receive, &ws);
	}
	EventboxLogScanEnd(ls);
	return claim_window_done(st, &ws, lane, pos_txid, pos_id, stopped);
}

/* the window filter of ordered lanes, for rows of an id-ordered scan */
static bool
window_ordered_receive(void *arg, Datum *values, bool *nulls)
{
	WindowScan *ws = (WindowScan *) arg;
	ClaimState *st = ws->st;
	uint64		txid = DatumGetUInt64(values[LC_TXID - 1]);

	/*
	 * In the window: in the cursor snapshot's in-progress list or in the
	 * band after it, and seen by the target.
	 */
	if (txid >= ws->from->xmax ? txid >= ws->target->xmax :
		!consume_in_progress(ws->from, txid))
		return true;
	if (!consume_visible(ws->target, txid))
		return true;
	if (EventboxLaneOfText(nulls[LC_ATYPE - 1] ? NULL : DatumGetTextPP(values[LC_ATYPE - 1]),
						   nulls[LC_AID - 1] ? NULL : DatumGetTextPP(values[LC_AID - 1]),
						   DatumGetInt64(values[LC_ID - 1]), st->sub->lanes) != ws->lane)
		return true;
	return window_take(ws, values, nulls);
}

/*
 * claim_window_ordered reads up to `limit` events of an ordered lane's
 * window after the position, in id order, through each partition's (id)
 * index, and moves the position.  The scan passes over the events of other
 * lanes and of later windows; a delayed event stops it (section 6 of
 * docs/design.md).  Returns the number of rows read, like
 * claim_window_unordered.
 */
static int
claim_window_ordered(ClaimState *st, Datum snap, Datum target, int lane,
					 int limit, Datum *pos_txid, Datum *pos_id, bool *stopped)
{
	EventboxLogScan *ls;
	WindowScan	ws;

	window_scan_init(&ws, st, snap, target, lane, limit, *pos_txid, *pos_id);

	/* opened after the target was taken: its snapshot sees all the target does */
	ls = EventboxLogScanBegin(true);
	EventboxLogScanIds(ls, DatumGetInt64(*pos_id), window_ordered_receive, &ws);
	EventboxLogScanEnd(ls);
	return claim_window_done(st, &ws, lane, pos_txid, pos_id, stopped);
}

/* the lowest id of a window (see claim_window_first) */
typedef struct WindowFirst
{
	ConsumeSnapshot *target;
	bool		found;
	int64		id;
	bool		one;			/* the first row of a transaction is enough */
} WindowFirst;

static bool
window_first_receive(void *arg, Datum *values, bool *nulls)
{
	WindowFirst *wf = (WindowFirst *) arg;
	int64		id = DatumGetInt64(values[LC_ID - 1]);

	if (!consume_visible(wf->target, DatumGetUInt64(values[LC_TXID - 1])))
		return true;
	if (!wf->found || id < wf->id)
	{
		wf->found = true;
		wf->id = id;
	}
	return !wf->one;
}

/*
 * claim_window_first finds the lowest id among the events of the window
 * from snap to target (of any type and lane), where an ordered lane's walk
 * in id order starts.  Returns false when the window has no events.  For a
 * transaction of the cursor snapshot's in-progress list that is its first
 * row in (txid, id) order; the band is read whole, since the lowest id may
 * belong to any of its transactions.  Either way only the window's own
 * index entries are read.  (The statement this replaced, min(id) with the
 * window as a filter, was planned as a walk of log_id_idx from the log's
 * lowest id: with 7.6 million events retained, 27 s for each new window.)
 */
static bool
claim_window_first(Datum snap, Datum target, int64 *first)
{
	ConsumeSnapshot *from = consume_snapshot(snap);
	EventboxLogScan *ls;
	WindowFirst wf;
	uint32		i;

	memset(&wf, 0, sizeof(wf));
	wf.target = consume_snapshot(target);
	ls = EventboxLogScanBegin(false);
	wf.one = true;
	for (i = 0; i < from->nxip; i++)
		if (consume_visible(wf.target, from->xip[i]))
			EventboxLogScanRange(ls, from->xip[i], PG_INT64_MIN, from->xip[i] + 1,
								 window_first_receive, &wf);
	wf.one = false;
	EventboxLogScanRange(ls, from->xmax, PG_INT64_MIN, wf.target->xmax,
						 window_first_receive, &wf);
	EventboxLogScanEnd(ls);
	*first = wf.id;
	return wf.found;
}

/*
 * consume_snapshot_equal compares two pg_snapshot values byte by byte, after
 * bringing both to the same (4-byte) varlena header.
 */
/*
 * consume_current_snapshot returns pg_current_snapshot() as a new statement
 * would see it (in READ COMMITTED a snapshot taken now: after the cursor
 * lock was granted), allocated in ctx, without the cost of a statement.
 */
static Datum
consume_current_snapshot(MemoryContext ctx)
{
	LOCAL_FCINFO(fcinfo, 0);
	MemoryContext old = MemoryContextSwitchTo(ctx);
	Datum		result;

	PushActiveSnapshot(GetTransactionSnapshot());
	InitFunctionCallInfoData(*fcinfo, NULL, 0, InvalidOid, NULL, NULL);
	result = pg_current_snapshot(fcinfo);
	PopActiveSnapshot();
	MemoryContextSwitchTo(old);
	return result;
}

static bool
consume_snapshot_equal(Datum a, Datum b)
{
	struct varlena *x = pg_detoast_datum((struct varlena *) DatumGetPointer(a));
	struct varlena *y = pg_detoast_datum((struct varlena *) DatumGetPointer(b));

	return VARSIZE(x) == VARSIZE(y) && memcmp(x, y, VARSIZE(x)) == 0;
}

/*
 * Where the batches this backend inserted last were.  Under a held xmin
 * horizon the batches table fills with dead versions (a batch is inserted
 * per claim and deleted by its ack), and the ack's lookup through
 * (sub_id, lane) walks every one of them.  A consumer usually acks in the
 * session that claimed, so an ack first looks at these row versions (a
 * TID scan) and goes through the index only when they do not hold every
 * event it acks.
 */
#define BATCH_TIDS 64

typedef struct BatchTid
{
	int32		sub_id;			/* 0: unused */
	ItemPointerData tid;
} BatchTid;

static BatchTid batch_tids[BATCH_TIDS];
static int	batch_tids_next = 0;

static void
batch_tid_remember(int32 sub_id, Datum tid)
{
	BatchTid   *b = &batch_tids[batch_tids_next];

	b->sub_id = sub_id;
	ItemPointerCopy((ItemPointer) DatumGetPointer(tid), &b->tid);
	batch_tids_next = (batch_tids_next + 1) % BATCH_TIDS;
}

/*
 * The earliest deadline of the leases this transaction took, for the
 * database's lease bound when it commits (see EventboxLeaseBound).
 */
static TimestampTz lease_taken = DT_NOEND;

static void
claim_lease_xact_callback(XactEvent event, void *arg)
{
	if (lease_taken == DT_NOEND)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
		EventboxLowerLeaseBound(lease_taken);
	else if (event == XACT_EVENT_PREPARE)
		EventboxLowerLeaseBound(0); /* see deliver.c */
	else if (event != XACT_EVENT_ABORT && event != XACT_EVENT_PARALLEL_ABORT)
		return;
	lease_taken = DT_NOEND;
}

static void
claim_lease_taken(TimestampTz leased_until)
{
	static bool registered = false;

	if (!registered)
	{
		RegisterXactCallback(claim_lease_xact_callback, NULL);
		registered = true;
	}
	if (leased_until < lease_taken)
		lease_taken = leased_until;
}

/*
 * claim_lane takes events from one lane: its due retries first, then new
 * events from its cursor's windows, and moves *cur on.  The caller holds
 * the cursor (its row lock, or the worker's memory for push_once) and
 * writes the cursor back; claim_lane returns whether it has to, because
 * the cursor moved or events were taken.  cur's values live in st->ctx or
 * longer.
 */
static bool
claim_lane(ClaimState *st, int lane, CursorPos *cur)
{
	Datum		snap = cur->snap;
	Datum		target = cur->target;
	Datum		pos_txid = cur->pos_txid;
	Datum		pos_id = cur->pos_id;
	bool		target_null = cur->target_null;
	bool		moved = false;
	bool		stopped = false;
	int			windows = 0;

	st->nids = 0;
	st->retry_count = 0;
	st->read = 0;

	if (st->sub->ordered)
		stopped = claim_retries_lane(st, lane);
	else
		claim_retries_unordered(st);

	while (!stopped && st->want > 0 && windows < 4)
	{
		int			limit;
		int			got;

		CHECK_FOR_INTERRUPTS();

		if (target_null)
		{
			target = consume_current_snapshot(st->ctx);
			target_null = false;
			if (consume_snapshot_equal(snap, target))
			{
				/* nothing has committed since the window began */
				target_null = true;
				break;
			}
			moved = true;

			/*
			 * Ordered lanes walk a window in id order, starting below its
			 * lowest id.  An empty window is used up at once.
			 */
			if (st->sub->ordered)
			{
				int64		first;

				pos_txid = FullTransactionIdGetDatum(FullTransactionIdFromU64(0));
				if (!claim_window_first(snap, target, &first))
				{
					snap = target;
					target_null = true;
					pos_id = Int64GetDatum(0);
					windows++;
					continue;
				}
				pos_id = Int64GetDatum(first - 1);
			}
		}

		limit = st->want;

		if (st->sub->ordered)
			got = claim_window_ordered(st, snap, target, lane, limit,
									   &pos_txid, &pos_id, &stopped);
		else
			got = claim_window_unordered(st, snap, target, lane, limit,
										 &pos_txid, &pos_id, &stopped);
		st->read += got;
		if (got > 0)
			moved = true;
		if (stopped || got == limit)
			continue;			/* the loop ends or re-reads this window */

		/* the window is used up: its target becomes the cursor snapshot */
		snap = target;
		target_null = true;
		pos_txid = FullTransactionIdGetDatum(FullTransactionIdFromU64(0));
		pos_id = Int64GetDatum(0);
		windows++;
	}

	/*
	 * push_once needs no lease: the retry rows (delayed events) it just
	 * delivered are done with.
	 */
	if (st->no_lease && st->retry_count > 0)
	{
		Datum		values[2];

		values[0] = Int32GetDatum(st->sub->sub_id);
		values[1] = consume_int8_array(st->ids, st->nids);
		EventboxExecPlan(plan_retry_done, values, NULL, SPI_OK_DELETE, "retry cleanup");
	}

	if (st->nids > 0 && !st->no_lease)
	{
		Datum		values[7];

		values[0] = Int32GetDatum(st->sub->sub_id);
		values[1] = Int32GetDatum(lane);
		values[2] = UUIDPGetDatum(&st->lease);
		values[3] = consume_int8_array(st->ids, st->nids);
		values[4] = Int32GetDatum(st->retry_count);
		values[5] = TimestampTzGetDatum(st->now);
		values[6] = TimestampTzGetDatum(st->leased_until);
		EventboxExecPlan(plan_batch, values, NULL, SPI_OK_INSERT_RETURNING, "batch insert");
		claim_lease_taken(st->leased_until);
		{
			bool		isnull;

			batch_tid_remember(st->sub->sub_id, consume_col(0, 1, &isnull));
		}
	}

	cur->snap = snap;
	cur->target = target;
	cur->target_null = target_null;
	cur->pos_txid = pos_txid;
	cur->pos_id = pos_id;
	return moved || st->nids > 0;
}

/*
 * consume_prepare_claim_plans prepares the statements of claim_batch once
 * per backend.
 */
static void
consume_prepare_claim_plans(void)
{
	Oid			t_sub_lane[2] = {INT4OID, INT4OID};

	if (plan_cursor != NULL)
		return;

	{
		Oid			types[2] = {INT4OID, TIMESTAMPTZOID};

		plan_expire = EventboxPreparePlan(
										  "SELECT eventbox._expire_leases($1, $2)"
										  " WHERE EXISTS (SELECT FROM eventbox.batches"
										  "               WHERE sub_id = $1 AND leased_until < $2)",
										  2, types);
	}
	plan_lock = EventboxPreparePlan(
									CURSOR_SELECT
									" WHERE sub_id = $1 AND lane = $2 FOR UPDATE",
									2, t_sub_lane);
	plan_lock_skip = EventboxPreparePlan(
										 CURSOR_SELECT
										 " WHERE sub_id = $1 AND lane = $2 FOR UPDATE SKIP LOCKED",
										 2, t_sub_lane);
	{
		Oid			types[3] = {INT4OID, INT4OID, TIDOID};

		/* see cursor_read */
		plan_lock_tid = EventboxPreparePlan(
											CURSOR_SELECT
											" WHERE ctid = $3 AND sub_id = $1 AND lane = $2 FOR UPDATE",
											3, types);
		plan_lock_tid_skip = EventboxPreparePlan(
												 CURSOR_SELECT
												 " WHERE ctid = $3 AND sub_id = $1 AND lane = $2"
												 " FOR UPDATE SKIP LOCKED",
												 3, types);
		/* unlocked, see claim_lane_idle */
		plan_peek_tid = EventboxPreparePlan(
											CURSOR_SELECT
											" WHERE ctid = $3 AND sub_id = $1 AND lane = $2",
											3, types);
	}
	plan_peek = EventboxPreparePlan(
									CURSOR_SELECT
									" WHERE sub_id = $1 AND lane = $2",
									2, t_sub_lane);
	{
		Oid			types[5] = {PG_SNAPSHOTOID, XID8OID, INT8OID, INT4OID, TIMESTAMPTZOID};

		/* see claim_lane_idle; every part is an index probe that stops at a row */
		plan_idle = EventboxPreparePlan(
										"SELECT EXISTS (SELECT FROM eventbox.log"
										"               WHERE txid >= pg_catalog.pg_snapshot_xmax($1))"
										" OR EXISTS (SELECT FROM eventbox.log"
										"            WHERE txid = ANY(ARRAY(SELECT pg_catalog.pg_snapshot_xip($1)))"
										"            AND (txid, id) > ($2, $3))"
										" OR EXISTS (SELECT FROM eventbox.retries"
										"            WHERE sub_id = $4 AND next_attempt_at <= $5)",
										5, types);
	}
	plan_busy = EventboxPreparePlan(
									"SELECT FROM eventbox.batches WHERE sub_id = $1 AND lane = $2 LIMIT 1",
									2, t_sub_lane);
	{
		Oid			types[3] = {INT4OID, INT4OID, TIMESTAMPTZOID};

		plan_retry_lane = EventboxPreparePlan(
											  "SELECT id, next_attempt_at <= $3 FROM eventbox.retries"
											  " WHERE sub_id = $1 AND lane = $2 ORDER BY id",
											  3, types);
	}
	{
		Oid			types[3] = {INT4OID, INT8ARRAYOID, TIMESTAMPTZOID};

		plan_retry_take = EventboxPreparePlan(
											  "UPDATE eventbox.retries SET next_attempt_at = 'infinity',"
											  " attempts = attempts + 1, updated_at = $3"
											  " WHERE sub_id = $1 AND id = ANY($2)"
											  " RETURNING id, attempts",
											  3, types);
	}
	{
		Oid			types[1] = {INT8ARRAYOID};

		plan_events = EventboxPreparePlan(
										  "SELECT " LOG_COLUMNS " FROM eventbox.log"
										  " WHERE id = ANY($1) ORDER BY txid, id",
										  1, types);
	}
	{
		Oid			types[2] = {INT4OID, INT8ARRAYOID};

		/*
		 * Leased is tested with isfinite(), not "= 'infinity'": with the
		 * equality the generic plan walked retries_due_idx over every leased
		 * row of the subscription and compared each with the whole id array,
		 * which grows with the square of the batch (acking 10,000 expired
		 * and claimed-again events took 175-300 ms in this statement).
		 * Through the primary key it is one probe per id.
		 */
		plan_retry_done = EventboxPreparePlan(
											  "DELETE FROM eventbox.retries"
											  " WHERE sub_id = $1 AND id = ANY($2)"
											  " AND NOT pg_catalog.isfinite(next_attempt_at)",
											  2, types);
		plan_retry_orphans = EventboxPreparePlan(
												 "DELETE FROM eventbox.retries r"
												 " WHERE r.sub_id = $1 AND r.id = ANY($2)"
												 " AND NOT EXISTS (SELECT FROM eventbox.log l WHERE l.id = r.id)"
												 " RETURNING r.id",
												 2, types);
	}
	{
		Oid			types[5] = {INT4OID, INT8OID, XID8OID, INT4OID, TIMESTAMPTZOID};

		plan_delay = EventboxPreparePlan(
										 "INSERT INTO eventbox.retries"
										 " (sub_id, id, txid, lane, attempts, next_attempt_at, reason)"
										 " VALUES ($1, $2, $3, $4, 0, $5, 'delayed')"
										 " ON CONFLICT (sub_id, id) DO NOTHING",
										 5, types);
	}
	{
		Oid			types[7] = {INT4OID, INT4OID, UUIDOID, INT8ARRAYOID, INT4OID,
		TIMESTAMPTZOID, TIMESTAMPTZOID};

		plan_batch = EventboxPreparePlan(
										 "INSERT INTO eventbox.batches"
										 " (sub_id, lane, lease, ids, retry_count, claimed_at, leased_until)"
										 " VALUES ($1, $2, $3, $4, $5, $6, $7)"
										 " RETURNING ctid",
										 7, types);
	}
	{
		Oid			types[9] = {INT4OID, INT4OID, PG_SNAPSHOTOID, PG_SNAPSHOTOID,
		XID8OID, INT8OID, INT8OID, TIMESTAMPTZOID, TIDOID};

		/* $9: the version claim_try_lane locked */
		plan_cursor = EventboxPreparePlan(
										  "UPDATE eventbox.cursors SET snap = $3, target = $4,"
										  " pos_txid = $5, pos_id = $6, delivered = delivered + $7,"
										  " updated_at = $8"
										  " WHERE ctid = $9 AND sub_id = $1 AND lane = $2"
										  " RETURNING ctid",
										  9, types);
	}
}

/*
 * What this backend knows of each lane's cursor row.
 *
 * Where the newest version of each cursor row was when this backend last
 * locked or wrote it.  A cursor row is updated on every claim, and while a
 * long transaction holds the xmin horizon none of its old versions can be
 * pruned: a lookup through the index then visits every one of them
 * (tens of thousands after a minute of claims).  The cursor is therefore
 * locked by its last known ctid first, a single tuple fetch; if that
 * version is no longer visible (another backend moved the cursor, or the
 * row is gone), the lookup goes through the key.  A version that was
 * updated after the statement's snapshot is followed to the newest one by
 * FOR UPDATE, as in any READ COMMITTED update.
 *
 * In the worker, also the position of each push_once lane ("held").  The
 * worker moves a push_once cursor in every cycle that forwards events; a
 * row lock and an UPDATE per cycle cost a fifth of the cycle's statements
 * and, under a held horizon, left a row version per cycle in the table for
 * as long as the horizon stayed (tens of megabytes in ten minutes).  A
 * push_once position need not be durable: after a crash the worker moves
 * the cursors past the crash anyway (worker_reset_push_once).  So the
 * worker keeps it in memory and writes it to the row (EventboxWriteHeld)
 * about once a second before the rotation check, which reads it; when it
 * exits; and when alter_subscription takes push_once away from a
 * subscription (push_once_handover).  Until then the row, and what
 * the stats view derives from it, lags behind by up to a second.
 *
 * No other backend moves a push_once cursor (claim_batch refuses push
 * subscriptions), so the memory copy cannot go stale while the
 * subscription stays push_once.  A transaction's changes to held positions
 * are staged and take effect when it commits (cursor_xact_callback): a
 * cycle that fails forwarded nothing, so its positions must not count.
 */
typedef struct CursorKey
{
	int32		sub_id;
	int32		lane;
} CursorKey;

typedef struct CursorHeld
{
	bool		held;			/* pos is the lane's position; the row may lag */
	bool		dirty;			/* pos moved since the row was written */
	CursorPos	pos;			/* values in cursor_ctx */
	int64		unwritten;		/* deliveries not yet added to the row */
	ItemPointerData tid;		/* the row version held or written */
} CursorHeld;

typedef struct CursorEntry
{
	CursorKey	key;
	ItemPointerData tid;		/* newest row version seen (not held) */
	CursorHeld	cur;			/* as committed */
	bool		staged;			/* next is what this transaction changed */
	CursorHeld	next;
	bool		idle;			/* this backend's last claim of it took nothing */
} CursorEntry;

static HTAB *cursor_entries = NULL;
static MemoryContext cursor_ctx = NULL;
static bool cursor_any_staged = false;

static void cursor_xact_callback(XactEvent event, void *arg);

static CursorEntry *
cursor_find(int32 sub_id, int32 lane, bool create)
{
	CursorKey	key;
	bool		found;
	CursorEntry *entry;

	if (cursor_entries == NULL)
	{
		HASHCTL		ctl;

		cursor_ctx = AllocSetContextCreate(TopMemoryContext, "eventbox cursors",
										   ALLOCSET_SMALL_SIZES);
		ctl.keysize = sizeof(CursorKey);
		ctl.entrysize = sizeof(CursorEntry);
		ctl.hcxt = cursor_ctx;
		cursor_entries = hash_create("eventbox cursors", 64, &ctl,
									 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		RegisterXactCallback(cursor_xact_callback, NULL);
	}
	memset(&key, 0, sizeof(key));
	key.sub_id = sub_id;
	key.lane = lane;
	entry = hash_search(cursor_entries, &key, create ? HASH_ENTER : HASH_FIND, &found);
	if (entry != NULL && !found)
	{
		ItemPointerSetInvalid(&entry->tid);
		memset(&entry->cur, 0, sizeof(CursorHeld));
		entry->staged = false;
		entry->idle = false;
	}
	return entry;
}

static void
cursor_tid_remember(int32 sub_id, int32 lane, Datum tid)
{
	CursorEntry *entry = cursor_find(sub_id, lane, true);

	ItemPointerCopy((ItemPointer) DatumGetPointer(tid), &entry->tid);
}

/* The held state as this transaction sees it. */
static CursorHeld *
cursor_held(CursorEntry *entry)
{
	return entry->staged ? &entry->next : &entry->cur;
}

static void
cursor_held_free(CursorHeld *h)
{
	if (h->held)
	{
		pfree(DatumGetPointer(h->pos.snap));
		if (!h->pos.target_null)
			pfree(DatumGetPointer(h->pos.target));
	}
	h->held = false;
}

/*
 * cursor_hold stages a held position for the lane: pos (copied), with
 * `unwritten` deliveries not yet added to the row, and tid the row version
 * to write it to.  dirty: pos is ahead of the row.
 */
static void
cursor_hold(CursorEntry *entry, const CursorPos *pos, int64 unwritten,
			ItemPointer tid, bool dirty)
{
	CursorPos	copy = *pos;
	ItemPointerData tidcopy;
	MemoryContext old = MemoryContextSwitchTo(cursor_ctx);

	/* copy first: pos and tid may point into what is replaced */
	copy.snap = datumCopy(pos->snap, false, -1);
	if (!pos->target_null)
		copy.target = datumCopy(pos->target, false, -1);
	ItemPointerCopy(tid, &tidcopy);
	MemoryContextSwitchTo(old);

	if (entry->staged)
		cursor_held_free(&entry->next);
	entry->next.held = true;
	entry->next.dirty = dirty;
	entry->next.pos = copy;
	entry->next.unwritten = unwritten;
	ItemPointerCopy(&tidcopy, &entry->next.tid);
	entry->staged = true;
	cursor_any_staged = true;
}

/* cursor_release stages that the lane is no longer held. */
static void
cursor_release(CursorEntry *entry)
{
	if (entry->staged)
		cursor_held_free(&entry->next);
	memset(&entry->next, 0, sizeof(CursorHeld));
	entry->staged = true;
	cursor_any_staged = true;
}

static void
cursor_xact_callback(XactEvent event, void *arg)
{
	HASH_SEQ_STATUS scan;
	CursorEntry *entry;
	bool		commit;

	if (!cursor_any_staged)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
		commit = true;
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		commit = false;
	else
		return;

	hash_seq_init(&scan, cursor_entries);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		if (!entry->staged)
			continue;
		if (commit)
		{
			cursor_held_free(&entry->cur);
			entry->cur = entry->next;
		}
		else
			cursor_held_free(&entry->next);
		entry->staged = false;
	}
	cursor_any_staged = false;
}

/*
 * cursor_write writes a lane's moved cursor to its row version tid and
 * returns whether the row was there; the new version becomes the known
 * one.  delivered is added to the row's delivery counter.
 */
static bool
cursor_write(int32 sub_id, int32 lane, const CursorPos *pos, int64 delivered,
			 ItemPointer tid, TimestampTz now, ItemPointer newtid)
{
	Datum		values[9];
	char		nulls[9] = "         ";
	bool		isnull;

	values[0] = Int32GetDatum(sub_id);
	values[1] = Int32GetDatum(lane);
	values[2] = pos->snap;
	values[3] = pos->target;
	nulls[3] = pos->target_null ? 'n' : ' ';
	values[4] = pos->pos_txid;
	values[5] = pos->pos_id;
	values[6] = Int64GetDatum(delivered);
	values[7] = TimestampTzGetDatum(now);
	values[8] = PointerGetDatum(tid);
	EventboxExecPlan(plan_cursor, values, nulls, SPI_OK_UPDATE_RETURNING, "cursor update");
	if (SPI_processed != 1)
	{
		ItemPointerSetInvalid(newtid);
		return false;
	}
	ItemPointerCopy((ItemPointer) DatumGetPointer(consume_col(0, 1, &isnull)), newtid);
	return true;
}

/*
 * cursor_write_held writes a held lane's position to its row.  With
 * release, the lane stops being held.  A row that is gone (the
 * subscription was dropped) just ends the hold.
 */
static void
cursor_write_held(CursorEntry *entry, bool release, TimestampTz now)
{
	CursorHeld *h = cursor_held(entry);
	ItemPointerData newtid;

	if (h->dirty || h->unwritten != 0)
	{
		if (!cursor_write(entry->key.sub_id, entry->key.lane, &h->pos, h->unwritten,
						  &h->tid, now, &newtid))
			release = true;		/* the subscription is gone */
		else
		{
			ItemPointerCopy(&newtid, &entry->tid);
			if (!release)
				cursor_hold(entry, &h->pos, 0, &newtid, false);
		}
	}
	if (release)
		cursor_release(entry);
}

/*
 * EventboxWriteHeld writes the positions the worker holds in memory to
 * their rows (see above), and with release stops holding them: the next
 * claim reads the row again.  Runs inside the caller's transaction and
 * SPI connection; the writes take effect with its commit.
 */
void
EventboxWriteHeld(bool release)
{
	HASH_SEQ_STATUS scan;
	CursorEntry *entry;
	TimestampTz now = GetCurrentTimestamp();

	if (cursor_entries == NULL)
		return;
	consume_prepare_claim_plans();
	EventboxPushSearchPath();
	hash_seq_init(&scan, cursor_entries);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		CHECK_FOR_INTERRUPTS();
		if (cursor_held(entry)->held)
			cursor_write_held(entry, release, now);
	}
	EventboxPopSearchPath();
}

/*
 * EventboxForgetHeld drops everything this backend knows of cursors,
 * without writing anything: the worker calls it when the extension was
 * dropped and created again, whose subscriptions reuse the old ids.
 */
void
EventboxForgetHeld(void)
{
	HASH_SEQ_STATUS scan;
	CursorEntry *entry;

	if (cursor_entries == NULL)
		return;
	Assert(!cursor_any_staged);
	hash_seq_init(&scan, cursor_entries);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		cursor_held_free(&entry->cur);
		(void) hash_search(cursor_entries, &entry->key, HASH_REMOVE, NULL);
	}
}

/*
 * Moving cursor rows back to the start of their table.
 *
 * While a long transaction holds the xmin horizon, every cursor update
 * leaves a version that cannot be pruned, and the newest version of each
 * row walks to the end of a table grown to megabytes (a polling consumer
 * leaves tens of thousands of versions in ten minutes).  When the horizon
 * moves on, VACUUM frees that space but cannot give it back: it truncates
 * only empty pages at the end of the table, and the live rows are there,
 * updated in place ever after.  So the worker looks about once a second
 * (after the rotation step) whether the table is longer than its rows
 * need.  If it is, and a page near the start has room once pruned, each
 * row found beyond those pages is moved there: deleted and inserted again,
 * the insert aimed at that page.  The next VACUUM (autovacuum soon, since
 * the table is then full of dead rows) truncates the rest.  While the
 * horizon is still held, nothing near the start can be pruned, nothing
 * moves, and the look costs reading those few pages.
 *
 * A moved row has a new ctid: backends that remembered the old one fall
 * back to the key (cursor_read), and the worker stages the new one for
 * the positions it holds.  A row some claim holds locked stays where it
 * is until the next look.  A REPEATABLE READ claim whose snapshot predates
 * the move fails with a serialization error, as it does when another
 * claim moved the cursor meanwhile.
 */
#define COMPACT_SLACK_PAGES 4	/* pages a few rows may use anyway */
#define COMPACT_ROWS_PER_PAGE 16	/* rows per page at fillfactor 50 */
#define COMPACT_ROW_ROOM 1024	/* room for one row, snapshot included */

static SPIPlanPtr plan_compact_rows = NULL;
static SPIPlanPtr plan_compact_beyond = NULL;
static SPIPlanPtr plan_compact_lock = NULL;
static SPIPlanPtr plan_compact_move = NULL;
static BlockNumber compact_clean_at = InvalidBlockNumber;	/* see below */
static TimestampTz compact_clean_time = 0;

/*
 * compact_room returns the first page below `zone` with room for a moved
 * row after pruning, or InvalidBlockNumber.  The fillfactor's reserve
 * counts as taken: the insert leaves it free.
 */
static BlockNumber
compact_room(Relation rel, BlockNumber zone)
{
	Size		needed = RelationGetTargetPageFreeSpace(rel, HEAP_DEFAULT_FILLFACTOR) +
		COMPACT_ROW_ROOM;
	BlockNumber blk;

	for (blk = 0; blk < zone; blk++)
	{
		Buffer		buf;
		Size		free;

		CHECK_FOR_INTERRUPTS();
		buf = ReadBuffer(rel, blk);
		heap_page_prune_opt(rel, buf);
		LockBuffer(buf, BUFFER_LOCK_SHARE);
		free = PageGetHeapFreeSpace(BufferGetPage(buf));
		UnlockReleaseBuffer(buf);
		if (free >= needed)
			return blk;
	}
	return InvalidBlockNumber;
}

/*
 * EventboxCompactCursors moves cursor rows that lie beyond the pages the
 * rows need back into those pages (see above).  Runs in the worker, in
 * its transaction and SPI connection.
 */
void
EventboxCompactCursors(void)
{
	Oid			nsp = get_namespace_oid("eventbox", true);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid("cursors", nsp) : InvalidOid;
	Relation	rel;
	BlockNumber nblocks;
	BlockNumber zone;
	BlockNumber room;
	ItemPointerData from;
	ItemPointerData *tids;
	Datum		arg;
	bool		isnull;
	uint64		i;
	uint64		n;

	if (!OidIsValid(relid))
		return;
	rel = table_open(relid, RowExclusiveLock);
	nblocks = RelationGetNumberOfBlocks(rel);

	/*
	 * Once a look found no row beyond the zone, the next one waits until
	 * the table's length changed (it grew, or VACUUM truncated it), or a
	 * minute: looking reads every page beyond the zone.
	 */
	if (nblocks <= COMPACT_SLACK_PAGES ||
		(nblocks == compact_clean_at &&
		 !TimestampDifferenceExceeds(compact_clean_time, GetCurrentTimestamp(), 60000)))
	{
		table_close(rel, NoLock);
		return;
	}

	if (plan_compact_rows == NULL)
	{
		Oid			t_tid[1] = {TIDOID};

		plan_compact_rows = EventboxPreparePlan(
												"SELECT pg_catalog.sum(lanes) FROM eventbox.subscriptions",
												0, NULL);
		plan_compact_beyond = EventboxPreparePlan(
												  "SELECT ctid FROM eventbox.cursors WHERE ctid >= $1",
												  1, t_tid);
		plan_compact_lock = EventboxPreparePlan(
												"SELECT FROM eventbox.cursors WHERE ctid = $1"
												" FOR UPDATE SKIP LOCKED",
												1, t_tid);
		plan_compact_move = EventboxPreparePlan(
												"WITH d AS (DELETE FROM eventbox.cursors WHERE ctid = $1 RETURNING *)"
												" INSERT INTO eventbox.cursors SELECT * FROM d"
												" RETURNING sub_id, lane, ctid",
												1, t_tid);
	}
	EventboxExecPlan(plan_compact_rows, NULL, NULL, SPI_OK_SELECT, "cursor count");
	zone = COMPACT_SLACK_PAGES;
	{
		Datum		lanes = consume_col(0, 1, &isnull);

		if (!isnull)
			zone += (BlockNumber) (DatumGetInt64(lanes) / COMPACT_ROWS_PER_PAGE);
	}
	if (nblocks <= zone)
	{
		table_close(rel, NoLock);
		return;
	}
	room = compact_room(rel, zone);
	if (room == InvalidBlockNumber)
	{
		table_close(rel, NoLock);
		return;
	}

	/* the rows beyond the zone */
	ItemPointerSet(&from, zone, 0);
	arg = PointerGetDatum(&from);
	EventboxExecPlan(plan_compact_beyond, &arg, NULL, SPI_OK_SELECT, "cursor compaction scan");
	n = SPI_processed;
	if (n == 0)
	{
		compact_clean_at = nblocks;
		compact_clean_time = GetCurrentTimestamp();
		table_close(rel, NoLock);
		return;
	}
	tids = palloc(sizeof(ItemPointerData) * n);
	for (i = 0; i < n; i++)
		ItemPointerCopy((ItemPointer) DatumGetPointer(consume_col(i, 1, &isnull)), &tids[i]);

	for (i = 0; i < n; i++)
	{
		CursorEntry *entry;
		ItemPointer newtid;

		CHECK_FOR_INTERRUPTS();
		arg = PointerGetDatum(&tids[i]);

		/* a row a claim holds (or moved meanwhile) waits for the next look */
		EventboxExecPlan(plan_compact_lock, &arg, NULL, SPI_OK_SELECT, "cursor compaction lock");
		if (SPI_processed != 1)
			continue;

		/* the insert goes to that page if it has room, else wherever */
		RelationSetTargetBlock(rel, room);
		EventboxExecPlan(plan_compact_move, &arg, NULL, SPI_OK_INSERT_RETURNING,
						 "cursor compaction move");
		if (SPI_processed != 1)
			elog(ERROR, "eventbox: the locked cursor row %u,%u is gone",
				 ItemPointerGetBlockNumber(&tids[i]), ItemPointerGetOffsetNumber(&tids[i]));
		newtid = (ItemPointer) DatumGetPointer(consume_col(0, 3, &isnull));
		entry = cursor_find(DatumGetInt32(consume_col(0, 1, &isnull)),
							DatumGetInt32(consume_col(0, 2, &isnull)), false);
		if (entry != NULL)
		{
			CursorHeld *h = cursor_held(entry);

			ItemPointerCopy(newtid, &entry->tid);
			if (h->held)
				cursor_hold(entry, &h->pos, h->unwritten, newtid, h->dirty);
		}
	}
	pfree(tids);
	table_close(rel, NoLock);
}

/*
 * EventboxHeldDirty: whether the worker holds positions its rows do not
 * show yet.
 */
bool
EventboxHeldDirty(void)
{
	HASH_SEQ_STATUS scan;
	CursorEntry *entry;
	bool		dirty = false;

	if (cursor_entries == NULL)
		return false;
	hash_seq_init(&scan, cursor_entries);
	while ((entry = hash_seq_search(&scan)) != NULL)
	{
		CursorHeld *h = cursor_held(entry);

		if (h->held && (h->dirty || h->unwritten != 0))
			dirty = true;
	}
	return dirty;
}

/*
 * The lock that hands a subscription over from push_once delivery.  The
 * worker takes it in share mode, without waiting, for each push claim and
 * before it reads the subscription; alter_subscription takes it in
 * exclusive mode before it gives a push_once subscription another mode
 * (push_once_handover).  So no worker cycle that read the old mode is
 * still claiming when the worker is asked to write back its positions, and
 * none starts before the change has committed.  Keyed by the name, which
 * the worker has before it reads the row: a hash collision only makes the
 * worker skip a subscription for one cycle.
 */
#define EVENTBOX_LOCKTAG_HANDOVER 0x4542	/* advisory locks use 1 and 2 */

static void
handover_locktag(LOCKTAG *tag, text *name)
{
	uint32		h = DatumGetUInt32(hash_any((unsigned char *) VARDATA_ANY(name),
											VARSIZE_ANY_EXHDR(name)));

	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, h, 0, EVENTBOX_LOCKTAG_HANDOVER);
}

/*
 * eventbox._push_once_handover(subscription), called by
 * alter_subscription before a push_once subscription gets another mode:
 * waits until no worker cycle claims from it and the worker has written
 * back the positions it holds, so that the new mode starts where push_once
 * delivery stopped.  The lock lasts until the transaction ends.
 */
Datum
push_once_handover(PG_FUNCTION_ARGS)
{
	LOCKTAG		tag;

	handover_locktag(&tag, PG_GETARG_TEXT_PP(0));
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
	EventboxRequestWriteBack();
	PG_RETURN_VOID();
}

/*
 * cursor_read runs a cursor read for (values[0], values[1]), sub_id and
 * lane: first `by_tid` at the row version this backend saw last (values[2]),
 * then, when that version is gone or unknown, `by_key`.  The row, if any,
 * is the current SPI result.
 */
static void
cursor_read(CursorEntry *known, SPIPlanPtr by_tid, SPIPlanPtr by_key,
			Datum *values, const char *what)
{
	SPI_processed = 0;
	if (known != NULL && ItemPointerIsValid(&known->tid))
	{
		values[2] = PointerGetDatum(&known->tid);
		EventboxExecPlan(by_tid, values, NULL, SPI_OK_SELECT, what);
	}
	if (SPI_processed == 0)
		EventboxExecPlan(by_key, values, NULL, SPI_OK_SELECT, what);
}

/*
 * A consumer that polls an idle subscription used to lock the cursor row on
 * every claim.  The lock takes a transaction id, so each empty poll wrote
 * WAL and, with synchronous_commit on, waited for a flush at commit (0.7 ms
 * on the development machine, a hundred flushes a second for a consumer
 * polling every 10 ms).  claim_lane_idle answers, without a lock, whether a
 * lane whose last claim in this backend took nothing can have anything
 * now; when it cannot, the claim returns nothing and writes nothing.
 *
 * The answer errs on the side of "maybe": any log row at or after the
 * cursor snapshot's xmax (committed, in progress or aborted, of any type),
 * any row of its in-progress transactions after the position, an open
 * window (a target), or any due retry of the subscription sends the claim
 * down the locked path.  What a locked claim could take is a subset of
 * that: so a claim that returns here returns what a locked claim would
 * have, nothing.  The read is not locked, so it may see a cursor version
 * older than the one another claim is writing; that claim's events are then
 * among the rows found, and this one waits for the lock as before.
 *
 * Once a second (CURSOR_IDLE_TOUCH_MS) the locked path runs anyway and
 * writes the row, so that the stats view's last_activity still shows a
 * polling consumer.
 *
 * The worker's claims for push subscriptions do not use this: it commits
 * without waiting for a flush anyway, runs a cycle when a commit published
 * (so there usually is something), and is where delivery latency is made.
 */
#define CURSOR_IDLE_TOUCH_MS 1000

static bool
claim_lane_idle(ClaimState *st, int lane, CursorEntry *known)
{
	Datum		values[5];
	bool		isnull;
	HeapTuple	row;
	TupleDesc	desc;

	values[0] = Int32GetDatum(st->sub->sub_id);
	values[1] = Int32GetDatum(lane);
	cursor_read(known, plan_peek_tid, plan_peek, values, "cursor read");
	if (SPI_processed == 0)
		return false;
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	(void) SPI_getbinval(row, desc, 2, &isnull);
	if (!isnull)
		return false;			/* a window is open */
	if (TimestampDifferenceExceeds(DatumGetTimestampTz(SPI_getbinval(row, desc, 6, &isnull)),
								   st->now, CURSOR_IDLE_TOUCH_MS))
		return false;

	/* the values stay valid while the tuple table does, to the next query */
	values[0] = SPI_getbinval(row, desc, 1, &isnull);
	values[1] = SPI_getbinval(row, desc, 3, &isnull);
	values[2] = SPI_getbinval(row, desc, 4, &isnull);
	values[3] = Int32GetDatum(st->sub->sub_id);
	values[4] = TimestampTzGetDatum(st->now);
	EventboxExecPlan(plan_idle, values, NULL, SPI_OK_SELECT, "idle check");
	return !DatumGetBool(consume_col(0, 1, &isnull));
}

/*
 * claim_try_lane locks a lane's cursor and claims from it.  An unordered
 * subscription has one cursor, and claims wait for it.  Ordered lanes are
 * skipped while another claim holds them or while a batch of theirs is in
 * flight: one batch per lane at a time.  The worker's push_once lanes are
 * held in its memory instead (see above).  Returns whether the lane gave
 * any events.
 */
/*
 * A claim that found nothing in its window leaves the cursor row as it
 * is, if the row was written in the last CURSOR_IDLE_WRITE_MS: the old
 * position stays right (the part of the log it skipped holds nothing this
 * lane takes), and the next claim looks through that part again.  A
 * consumer that polls finds nothing in about half its claims (the one
 * after each batch); a row version for each of those was half the cursor
 * table's growth while a long transaction held the horizon, with nothing
 * gained.  The interval bounds what the next claims look through again:
 * for a lane with a type filter or several lanes, the log rows of that
 * time that the lane does not take.
 */
#define CURSOR_IDLE_WRITE_MS 100

static bool
cursor_write_can_wait(ClaimState *st, TimestampTz written)
{
	return st->nids == 0 && st->read == 0 &&
		!TimestampDifferenceExceeds(written, st->now, CURSOR_IDLE_WRITE_MS);
}

static bool
claim_try_lane(ClaimState *st, int lane)
{
	Datum		values[3];
	HeapTuple	cursor;
	TupleDesc	cdesc;
	CursorEntry *known = cursor_find(st->sub->sub_id, lane, false);
	bool		hold = st->no_lease && EventboxIsWorker;
	bool		isnull;
	CursorPos	pos;
	ItemPointerData tid;
	TimestampTz written;
	MemoryContext old;

	if (known != NULL && cursor_held(known)->held)
	{
		if (hold)
		{
			CursorHeld *h = cursor_held(known);

			pos = h->pos;
			if (claim_lane(st, lane, &pos))
				cursor_hold(known, &pos, h->unwritten + st->nids, &h->tid, true);
			return st->nids > 0;
		}
		/* no longer push_once (now push): the row must be current */
		cursor_write_held(known, true, st->now);
	}
	else if (!EventboxIsWorker && known != NULL && known->idle &&
			 claim_lane_idle(st, lane, known))
		return false;

	values[0] = Int32GetDatum(st->sub->sub_id);
	values[1] = Int32GetDatum(lane);
	cursor_read(known, st->sub->ordered ? plan_lock_tid_skip : plan_lock_tid,
				st->sub->ordered ? plan_lock_skip : plan_lock, values, "cursor lock");
	if (SPI_processed == 0)
		return false;
	cursor = SPI_tuptable->vals[0];
	cdesc = SPI_tuptable->tupdesc;

	/* copy the cursor out of SPI's memory: later queries reuse it */
	old = MemoryContextSwitchTo(st->ctx);
	pos.snap = datumCopy(SPI_getbinval(cursor, cdesc, 1, &isnull), false, -1);
	pos.target = SPI_getbinval(cursor, cdesc, 2, &pos.target_null);
	if (!pos.target_null)
		pos.target = datumCopy(pos.target, false, -1);
	pos.pos_txid = SPI_getbinval(cursor, cdesc, 3, &isnull);
	pos.pos_id = SPI_getbinval(cursor, cdesc, 4, &isnull);
	ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(cursor, cdesc, 5, &isnull)),
					&tid);
	MemoryContextSwitchTo(old);
	written = DatumGetTimestampTz(SPI_getbinval(cursor, cdesc, 6, &isnull));
	cursor_tid_remember(st->sub->sub_id, lane, PointerGetDatum(&tid));

	if (st->sub->ordered)
	{
		EventboxExecPlan(plan_busy, values, NULL, SPI_OK_SELECT, "lane check");
		if (SPI_processed > 0)
			return false;
	}
	if (hold)
	{
		bool		moved = claim_lane(st, lane, &pos);

		cursor_hold(cursor_find(st->sub->sub_id, lane, true), &pos, st->nids, &tid,
					moved);
	}
	else if (claim_lane(st, lane, &pos) && !cursor_write_can_wait(st, written))
	{
		ItemPointerData newtid;

		if (!cursor_write(st->sub->sub_id, lane, &pos, st->nids, &tid, st->now, &newtid))
			elog(ERROR, "eventbox: the locked cursor of subscription %d, lane %d, is gone",
				 st->sub->sub_id, lane);
		cursor_tid_remember(st->sub->sub_id, lane, PointerGetDatum(&newtid));
	}
	cursor_find(st->sub->sub_id, lane, true)->idle = (st->nids == 0);
	return st->nids > 0;
}

/*
 * Where claim_batch's results live.  A result is a tuplestore the caller's
 * executor reads after the call, so it would normally be made in the
 * executor's per-query memory, which is freed with the statement.  At
 * 1,000 events per claim that is about 0.5 MB, and glibc gives such a
 * block back to the system when it is freed, so each claim wrote its
 * result into pages new to the process: the page faults were the largest
 * single cost of a drain after the index scan.  Results are therefore made
 * in a context of the backend's, where the executor's tuplestore_end
 * returns the memory for the next claim to reuse.
 *
 * A result whose statement ended without tuplestore_end (an error) is not
 * freed by anyone.  A callback on the statement's per-query memory counts
 * the statements whose result may still be read; when none is left, the
 * context is reset at the next claim if it holds more than
 * CLAIM_RESULTS_KEEP, which also bounds what a backend keeps.
 */
#define CLAIM_RESULTS_KEEP (4 * 1024 * 1024)

static MemoryContext claim_results_cxt = NULL;
static int	claim_results_live = 0;

static void
claim_results_released(void *arg)
{
	claim_results_live--;
}

/*
 * claim_init_result sets claim_batch's result up with InitMaterializedSRF
 * (its checks of the calling context, the result's descriptor), then puts
 * the tuplestore in claim_results_cxt instead of the per-query memory.
 */
static void
claim_init_result(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext per_query;
	MemoryContextCallback *cb;
	MemoryContext old;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	tuplestore_end(rsinfo->setResult);

	if (claim_results_cxt == NULL)
		claim_results_cxt = AllocSetContextCreate(TopMemoryContext,
												  "eventbox claim results",
												  ALLOCSET_DEFAULT_SIZES);
	else if (claim_results_live == 0 &&
			 MemoryContextMemAllocated(claim_results_cxt, false) > CLAIM_RESULTS_KEEP)
		MemoryContextReset(claim_results_cxt);

	per_query = rsinfo->econtext->ecxt_per_query_memory;
	cb = MemoryContextAlloc(per_query, sizeof(MemoryContextCallback));
	cb->func = claim_results_released;
	cb->arg = NULL;
	MemoryContextRegisterResetCallback(per_query, cb);
	claim_results_live++;

	old = MemoryContextSwitchTo(claim_results_cxt);
	rsinfo->setResult =
		tuplestore_begin_heap((rsinfo->allowedModes & SFRM_Materialize_Random) != 0,
							  false, work_mem);
	MemoryContextSwitchTo(old);
}

/*
 * claim_common leases up to n due events and returns them as
 * eventbox.delivery rows.  Consumers (claim_batch) may claim only from pull
 * subscriptions; the worker (claim_push) only from push ones, and a
 * push_once delivery takes no lease: the committed notification is the
 * delivery.
 */
static Datum
claim_common(FunctionCallInfo fcinfo, bool for_worker)
{
	int32		n;
	Interval   *lease = NULL;

	claim_init_result(fcinfo);

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("n must not be null")));
	n = PG_GETARG_INT32(0);
	if (n <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("n must be positive, got %d", n)));
	/* the worker's entry point has no lease argument */
	if (PG_NARGS() > 2 && !PG_ARGISNULL(2))
	{
		lease = PG_GETARG_INTERVAL_P(2);
		EventboxCheckInterval("lease", lease, false);
	}

	claim_run(PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1), n, lease, for_worker,
			  ((ReturnSetInfo *) fcinfo->resultinfo)->setResult,
			  ((ReturnSetInfo *) fcinfo->resultinfo)->setDesc);
	PG_RETURN_NULL();
}

/*
 * EventboxClaimPush is _claim_push for the worker's own cycle, without the
 * cost of a statement: up to n deliveries of push subscription `name` are
 * appended to out, in desc's shape (eventbox.delivery).
 */
void
EventboxClaimPush(text *name, int n, Tuplestorestate *out, TupleDesc desc)
{
	claim_run(name, n, NULL, true, out, desc);
}

/*
 * consume_begin opens what the statements of a claim or an ack run in:
 * name lookup pinned to pg_catalog (EventboxPushSearchPath), plans through
 * the indexes (EventboxIndexPlansBegin; the worker has that for all its
 * statements) and an SPI connection.  consume_end(its result) closes it.
 */
static int
consume_begin(void)
{
	int			level = EventboxIsWorker ? 0 : EventboxIndexPlansBegin();

	EventboxPushSearchPath();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "eventbox: SPI_connect failed");
	return level;
}

static void
consume_end(int level)
{
	SPI_finish();
	EventboxPopSearchPath();
	if (level > 0)
		EventboxIndexPlansEnd(level);
}

/*
 * claim_run is a claim: up to n deliveries of subscription `name` (NULL:
 * eventbox.subscription) leased for `lease` (NULL: the subscription's),
 * appended to out.  for_worker: a push claim by the worker.
 */
static void
claim_run(text *name, int32 n, Interval *lease, bool for_worker,
		  Tuplestorestate *out, TupleDesc desc)
{
	ClaimState	st;
	int			level;
	int			lane;
	int			first = 0;
	int			i;
	uint32		r;

	if (n > eventbox_max_claim_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("n must be at most %d, got %d", eventbox_max_claim_size, n),
				 errhint("Claim in smaller batches or raise eventbox.max_claim_size.")));

	memset(&st, 0, sizeof(st));
	st.ctx = CurrentMemoryContext;
	st.out = out;
	st.desc = desc;
	st.want = n;
	st.ids = palloc(sizeof(int64) * n);

	/* see handover_locktag */
	if (for_worker && name != NULL)
	{
		LOCKTAG		tag;

		handover_locktag(&tag, name);
		if (LockAcquire(&tag, ShareLock, false, true) == LOCKACQUIRE_NOT_AVAIL)
			return;				/* its mode is changing: next cycle */
	}

	level = consume_begin();
	consume_prepare_claim_plans();

	st.sub = consume_sub(name, st.ctx);
	{
		MemoryContext old = MemoryContextSwitchTo(st.ctx);

		st.sub_name = PointerGetDatum(cstring_to_text(st.sub->name));
		MemoryContextSwitchTo(old);
	}
	if (for_worker)
	{
		/* pull since the worker listed it (alter_subscription committed) */
		if (strcmp(st.sub->mode, "pull") == 0)
		{
			consume_end(level);
			return;
		}
		st.no_lease = (strcmp(st.sub->mode, "push_once") == 0);
	}
	else if (strcmp(st.sub->mode, "pull") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot claim from %s subscription \"%s\"",
						st.sub->mode, st.sub->name),
				 errdetail("The background worker delivers its events by notification."),
				 errhint("LISTEN on the subscription's channel, or create a pull subscription with eventbox.subscribe().")));
	if (st.sub->paused)
	{
		consume_end(level);
		return;
	}

	/*
	 * leases that ran out give their events back first (push_once has
	 * none); only when one can have (see EventboxLeaseBound)
	 */
	if (!st.no_lease && GetCurrentTimestamp() >= EventboxLeaseBound())
	{
		Datum		values[2];

		values[0] = Int32GetDatum(st.sub->sub_id);
		values[1] = TimestampTzGetDatum(GetCurrentTimestamp());
		EventboxExecPlan(plan_expire, values, NULL, SPI_OK_SELECT, "lease expiry");
	}

	/* taken after the expiry, so that retries it made due now are seen */
	st.now = GetCurrentTimestamp();
	st.leased_until = DatumGetTimestampTz(
										  DirectFunctionCall2(timestamptz_pl_interval,
															  TimestampTzGetDatum(st.now),
															  IntervalPGetDatum(lease ? lease : st.sub->lease)));
	EventboxRandomBytes(&st.lease, sizeof(st.lease));
	st.lease.data[6] = (st.lease.data[6] & 0x0F) | 0x40;	/* version 4 */
	st.lease.data[8] = (st.lease.data[8] & 0x3F) | 0x80;	/* variant */

	/* ordered subscriptions start at a random lane to spread consumers */
	if (st.sub->lanes > 1)
	{
		EventboxRandomBytes(&r, sizeof(r));
		first = (int) (r % (uint32) st.sub->lanes);
	}

	for (i = 0; i < st.sub->lanes && st.want > 0; i++)
	{
		CHECK_FOR_INTERRUPTS();
		lane = (first + i) % st.sub->lanes;

		/*
		 * Inside a transaction block the lane locks last until it ends, so
		 * an ordered claim tries each lane in a subtransaction and gives
		 * the lane back when it took nothing from it.  Other consumers can
		 * then claim those lanes while this transaction goes on.
		 */
		if (st.sub->ordered && IsTransactionBlock())
		{
			MemoryContext oldcontext = CurrentMemoryContext;
			ResourceOwner oldowner = CurrentResourceOwner;
			bool		took;

			BeginInternalSubTransaction(NULL);
			MemoryContextSwitchTo(oldcontext);
			took = claim_try_lane(&st, lane);
			if (took)
				ReleaseCurrentSubTransaction();
			else
				RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
		}
		else
			(void) claim_try_lane(&st, lane);
	}

	consume_end(level);
	return;
}

/*
 * claim_batch(n, subscription, lease) leases up to n due events of a pull
 * subscription.
 */
Datum
claim_batch(PG_FUNCTION_ARGS)
{
	return claim_common(fcinfo, false);
}

/*
 * eventbox._claim_push(n, subscription): what the worker forwards next for
 * a push or push_once subscription.
 */
Datum
claim_push(PG_FUNCTION_ARGS)
{
	return claim_common(fcinfo, true);
}

/* qsort/bsearch comparator for int64 */
static int
consume_int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/* how many of ids (sorted) a batch row (batch_id, ids, ...) holds */
static int
ack_count_in(HeapTuple batch, TupleDesc desc, int64 *ids, int nids)
{
	bool		isnull;
	ArrayType  *arr = DatumGetArrayTypeP(SPI_getbinval(batch, desc, 2, &isnull));
	Datum	   *bids;
	int			nb;
	int			j;
	int			n = 0;

	deconstruct_array(arr, INT8OID, 8, true, TYPALIGN_DOUBLE, &bids, NULL, &nb);
	for (j = 0; j < nb; j++)
	{
		int64		id = DatumGetInt64(bids[j]);

		if (bsearch(&id, ids, nids, sizeof(int64), consume_int64_cmp))
			n++;
	}
	return n;
}

/*
 * consume_ack removes the given event ids from the subscription's batches
 * (only those under `lease`, when given) and returns how many it removed.
 * A batch that becomes empty is deleted; retry rows of acked events go.
 */
static int
consume_ack(text *subname, int64 *ids, int nids, Datum lease, bool lease_null)
{
	ConsumeSub *sub;
	Datum		values[4];
	char		nulls[4] = "    ";
	int			i;
	int			nbatches;
	int			acked = 0;
	int			level;
	HeapTuple  *rows;
	TupleDesc	rdesc;
	int		   *from;			/* the batch_tids slot of each row, or NULL */
	MemoryContext ctx = CurrentMemoryContext;

	/* sort and drop duplicates, so each event counts once */
	qsort(ids, nids, sizeof(int64), consume_int64_cmp);
	if (nids > 1)
	{
		int			k = 1;

		for (i = 1; i < nids; i++)
			if (ids[i] != ids[k - 1])
				ids[k++] = ids[i];
		nids = k;
	}

	level = consume_begin();
	consume_prepare_claim_plans();	/* plan_retry_done */
	if (plan_ack_find == NULL)
	{
		Oid			types[3] = {INT4OID, INT8ARRAYOID, UUIDOID};
		Oid			t_upd[3] = {INT8OID, INT8ARRAYOID, INT4OID};
		Oid			t_del[1] = {INT8OID};

		plan_ack_find = EventboxPreparePlan(
											"SELECT batch_id, ids, retry_count FROM eventbox.batches"
											" WHERE sub_id = $1 AND ids OPERATOR(pg_catalog.&&) $2"
											" AND ($3::uuid IS NULL OR lease = $3)"
											" ORDER BY batch_id FOR UPDATE",
											3, types);
		{
			Oid			t_tid[4] = {INT4OID, INT8ARRAYOID, UUIDOID, TIDOID};

			/* see batch_tid_remember */
			plan_ack_find_tid = EventboxPreparePlan(
													"SELECT batch_id, ids, retry_count FROM eventbox.batches"
													" WHERE ctid = $4 AND sub_id = $1"
													" AND ids OPERATOR(pg_catalog.&&) $2"
													" AND ($3::uuid IS NULL OR lease = $3)"
													" FOR UPDATE",
													4, t_tid);
		}
		plan_ack_update = EventboxPreparePlan(
											  "UPDATE eventbox.batches SET ids = $2, retry_count = $3"
											  " WHERE batch_id = $1 RETURNING ctid",
											  3, t_upd);
		plan_ack_delete = EventboxPreparePlan(
											  "DELETE FROM eventbox.batches WHERE batch_id = $1",
											  1, t_del);
	}

	sub = consume_sub(subname, ctx);
	if (nids == 0)
	{
		consume_end(level);
		return 0;
	}

	values[0] = Int32GetDatum(sub->sub_id);
	values[1] = consume_int8_array(ids, nids);
	values[2] = lease;
	nulls[2] = lease_null ? 'n' : ' ';
	nbatches = 0;
	rows = NULL;
	rdesc = NULL;
	from = palloc(sizeof(int) * BATCH_TIDS);
	{
		/*
		 * This backend's own batches first (see batch_tid_remember), oldest
		 * first, as the index lookup orders them, so that concurrent acks
		 * lock batches in the same order.  A remembered version that no
		 * longer holds any of these ids (acked, expired, or updated since)
		 * is forgotten: every probe is a statement of its own, and a ring of
		 * stale entries cost a drain (claim 1,000, ack them) 63 of them per
		 * ack, a quarter of its time.  A batch forgotten while still live is
		 * found through the index.
		 */
		int			covered = 0;
		int			k;

		rows = palloc(sizeof(HeapTuple) * BATCH_TIDS);
		for (k = 0; k < BATCH_TIDS && covered < nids; k++)
		{
			int			slot = (batch_tids_next + k) % BATCH_TIDS;
			BatchTid   *b = &batch_tids[slot];

			if (b->sub_id != sub->sub_id)
				continue;
			values[3] = PointerGetDatum(&b->tid);
			EventboxExecPlan(plan_ack_find_tid, values, nulls, SPI_OK_SELECT, "batch lookup");
			if (SPI_processed == 0)
			{
				b->sub_id = 0;
				continue;
			}
			if (rdesc == NULL)
				rdesc = CreateTupleDescCopy(SPI_tuptable->tupdesc);
			from[nbatches] = slot;
			rows[nbatches++] = SPI_copytuple(SPI_tuptable->vals[0]);
			covered += ack_count_in(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, ids, nids);
		}
		if (covered < nids)
		{
			EventboxExecPlan(plan_ack_find, values, nulls, SPI_OK_SELECT, "batch lookup");
			rows = SPI_tuptable->vals;
			rdesc = SPI_tuptable->tupdesc;
			nbatches = (int) SPI_processed;
			from = NULL;
		}
	}

	for (i = 0; i < nbatches; i++)
	{
		bool		isnull;
		Datum		batch_id = SPI_getbinval(rows[i], rdesc, 1, &isnull);
		ArrayType  *arr = DatumGetArrayTypeP(SPI_getbinval(rows[i], rdesc, 2, &isnull));
		int32		retry_count = DatumGetInt32(SPI_getbinval(rows[i], rdesc, 3, &isnull));
		Datum	   *bids;
		int			nb;
		int			j;
		int			nkeep = 0;
		int			ngone = 0;
		Datum	   *keep;
		Datum	   *gone;

		deconstruct_array(arr, INT8OID, 8, true, TYPALIGN_DOUBLE, &bids, NULL, &nb);
		keep = palloc(sizeof(Datum) * nb);
		gone = palloc(sizeof(Datum) * nb);
		for (j = 0; j < nb; j++)
		{
			int64		id = DatumGetInt64(bids[j]);

			if (bsearch(&id, ids, nids, sizeof(int64), consume_int64_cmp))
				gone[ngone++] = bids[j];
			else
				keep[nkeep++] = bids[j];
		}
		if (ngone == 0)
			continue;
		acked += ngone;

		if (retry_count > 0)
		{
			Datum		rvalues[2];

			rvalues[0] = Int32GetDatum(sub->sub_id);
			rvalues[1] = PointerGetDatum(construct_array(gone, ngone, INT8OID, 8,
														 true, TYPALIGN_DOUBLE));
			EventboxExecPlan(plan_retry_done, rvalues, NULL, SPI_OK_DELETE, "retry cleanup");
			retry_count -= (int32) SPI_processed;
		}

		if (nkeep == 0)
		{
			EventboxExecPlan(plan_ack_delete, &batch_id, NULL, SPI_OK_DELETE, "batch delete");
			if (from != NULL)
				batch_tids[from[i]].sub_id = 0;
		}
		else
		{
			Datum		uvalues[3];

			uvalues[0] = batch_id;
			uvalues[1] = PointerGetDatum(construct_array(keep, nkeep, INT8OID, 8,
														 true, TYPALIGN_DOUBLE));
			uvalues[2] = Int32GetDatum(Max(retry_count, 0));
			EventboxExecPlan(plan_ack_update, uvalues, NULL, SPI_OK_UPDATE_RETURNING,
							 "batch update");
			/* the rest of the batch is acked later: remember its new version */
			if (from != NULL && SPI_processed == 1)
			{
				bool		tid_null;
				Datum		tid = SPI_getbinval(SPI_tuptable->vals[0],
												SPI_tuptable->tupdesc, 1, &tid_null);

				ItemPointerCopy((ItemPointer) DatumGetPointer(tid),
								&batch_tids[from[i]].tid);
			}
		}
	}

	consume_end(level);
	return acked;
}

/*
 * ack(id, subscription, lease) acknowledges one leased event.  Returns
 * false when the event is not leased (already acked, never claimed, or
 * leased under another token).
 */
Datum
ack(PG_FUNCTION_ARGS)
{
	int64		id;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("id must not be null")));
	id = PG_GETARG_INT64(0);
	PG_RETURN_BOOL(consume_ack(PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1),
							   &id, 1,
							   PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2),
							   PG_ARGISNULL(2)) == 1);
}

/*
 * ack(ids[], subscription, lease) acknowledges many leased events and
 * returns how many of them were leased.  NULL elements are ignored, and a
 * NULL array acks nothing.
 */
Datum
ack_array(PG_FUNCTION_ARGS)
{
	ArrayType  *arr;
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	int			i;
	int			k = 0;
	int64	   *ids;

	/*
	 * NULL acks nothing, like an empty array: it is what array_agg() gives
	 * over an empty claim, the idiom ack(array_agg(id)) FROM claim_batch().
	 */
	if (PG_ARGISNULL(0))
		PG_RETURN_INT32(0);
	arr = PG_GETARG_ARRAYTYPE_P(0);
	deconstruct_array(arr, INT8OID, 8, true, TYPALIGN_DOUBLE, &elems, &nulls, &n);
	ids = palloc(sizeof(int64) * Max(n, 1));
	for (i = 0; i < n; i++)
		if (!nulls[i])
			ids[k++] = DatumGetInt64(elems[i]);

	PG_RETURN_INT32(consume_ack(PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1),
								ids, k,
								PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2),
								PG_ARGISNULL(2)));
}
