/*-------------------------------------------------------------------------
 *
 * publish.c
 *	  The producer side: publish, publish_batch and UUIDv7 event ids.
 *
 * Publishing is one insert into the current partition of the append-only
 * log inside the caller's transaction, stamped with the transaction's
 * top-level xid so that
 * consumers can order and split the log by snapshots (see consume.c).
 * Nothing is notified here: NOTIFY would serialize publishers at commit.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/time.h>

#include "access/genam.h"
#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "common/hashfn.h"
#include "eventbox.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "optimizer/optimizer.h"
#include "storage/lock.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/xid8.h"

PG_FUNCTION_INFO_V1(publish);
PG_FUNCTION_INFO_V1(publish_batch);

/* publish_batch writes this many rows with one heap_multi_insert */
#define PUBLISH_MULTI_INSERT 1000

/* field4 of our advisory lock tags: SQL's advisory locks use 1 and 2 */
#define EVENTBOX_DEDUPE_LOCK_FIELD4 0x4542

/* One event to publish, validated. */
typedef struct PublishEvent
{
	text	   *event_type;
	Jsonb	   *payload;
	Jsonb	   *headers;
	text	   *aggregate_type; /* NULL if none */
	text	   *aggregate_id;	/* NULL if none */
	text	   *dedupe_key;		/* NULL if none */
	bool		has_deliver_at;
	TimestampTz deliver_at;
} PublishEvent;

static SPIPlanPtr publish_dedupe_plan = NULL;

/*
 * EventboxGenerateUuidV7 makes an RFC 9562 version 7 UUID: 48 bits of Unix
 * milliseconds, then a 12-bit counter (method 1 of the RFC) so that the ids
 * a backend makes are strictly increasing even within one millisecond, then
 * 62 random bits.
 */
void
EventboxGenerateUuidV7(pg_uuid_t *uuid)
{
	static uint64 last_ms = 0;
	static uint16 counter = 0;
	struct timeval tv;
	uint64		ms;
	uint8		rnd[10];

	gettimeofday(&tv, NULL);
	ms = (uint64) tv.tv_sec * 1000 + tv.tv_usec / 1000;
	EventboxRandomBytes(rnd, sizeof(rnd));

	if (ms > last_ms)
	{
		/* a fresh millisecond: start the counter low, leaving room to count */
		counter = ((rnd[0] << 8) | rnd[1]) & 0x07FF;
		last_ms = ms;
	}
	else
	{
		/* same (or a stepped back) millisecond: count on, borrowing a ms */
		counter++;
		if (counter > 0x0FFF)
		{
			counter = 0;
			last_ms++;
		}
	}
	ms = last_ms;

	uuid->data[0] = (uint8) (ms >> 40);
	uuid->data[1] = (uint8) (ms >> 32);
	uuid->data[2] = (uint8) (ms >> 24);
	uuid->data[3] = (uint8) (ms >> 16);
	uuid->data[4] = (uint8) (ms >> 8);
	uuid->data[5] = (uint8) ms;
	uuid->data[6] = 0x70 | ((counter >> 8) & 0x0F);
	uuid->data[7] = (uint8) counter;
	uuid->data[8] = 0x80 | (rnd[2] & 0x3F);
	memcpy(&uuid->data[9], &rnd[3], 7);
}

/*
 * publish_check_object raises the error for a payload or headers value that
 * is not a JSON object.
 */
static void
publish_check_object(Jsonb *jb, const char *what)
{
	if (!JB_ROOT_IS_OBJECT(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a JSON object", what),
				 errhint("Wrap the value in an object, for example '{\"value\": ...}'.")));
}

/* publish_check_length raises the error for a text field over max bytes */
static void
publish_check_length(text *value, const char *what, int max)
{
	int			len;

	if (value == NULL)
		return;
	len = VARSIZE_ANY_EXHDR(value);
	if (len > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long", what),
				 errdetail("%s has at most %d bytes, this one has %d.", what, max, len)));
}

/*
 * publish_check validates one event against the publishing contract
 * (SPEC section 7).  Raising here leaves nothing written.
 */
static void
publish_check(PublishEvent *ev)
{
	Size		payload_size;

	EventboxCheckEventType(VARDATA_ANY(ev->event_type),
						   VARSIZE_ANY_EXHDR(ev->event_type));

	if ((ev->aggregate_type == NULL) != (ev->aggregate_id == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("aggregate_type and aggregate_id must be given together"),
				 errdetail("Got %s but no %s.",
						   ev->aggregate_type ? "aggregate_type" : "aggregate_id",
						   ev->aggregate_type ? "aggregate_id" : "aggregate_type")));
	if (ev->aggregate_type != NULL &&
		(VARSIZE_ANY_EXHDR(ev->aggregate_type) == 0 ||
		 VARSIZE_ANY_EXHDR(ev->aggregate_id) == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("aggregate_type and aggregate_id must not be empty")));
	if (ev->dedupe_key != NULL && VARSIZE_ANY_EXHDR(ev->dedupe_key) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("dedupe_key must not be empty"),
				 errhint("Pass NULL to publish without deduplication.")));

	/*
	 * The three are index keys of the log (the aggregate index, the dedupe
	 * index); past about 2.7 kB after compression the insert failed with
	 * the btree's "index row size exceeds maximum" and its hint to change
	 * the index.
	 */
	publish_check_length(ev->aggregate_type, "aggregate_type", EVENTBOX_MAX_TYPE_LEN);
	publish_check_length(ev->aggregate_id, "aggregate_id", EVENTBOX_MAX_KEY_LEN);
	publish_check_length(ev->dedupe_key, "dedupe_key", EVENTBOX_MAX_KEY_LEN);

	/*
	 * 'infinity' would make a delayed row that never comes due and looks
	 * leased (section 5 of docs/design.md): the event would be neither
	 * pending nor scheduled, and its partition could never be rotated away.
	 */
	if (ev->has_deliver_at && TIMESTAMP_NOT_FINITE(ev->deliver_at))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("deliver_at must be a finite timestamp"),
				 errhint("Pass NULL to deliver the event at once.")));

	publish_check_object(ev->payload, "payload");
	publish_check_object(ev->headers, "headers");

	payload_size = VARSIZE(ev->payload) - VARHDRSZ;
	if (payload_size > (Size) eventbox_max_payload_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large"),
				 errdetail("The payload has %zu bytes; eventbox.max_payload_size is %d bytes.",
						   payload_size, eventbox_max_payload_size),
				 errhint("Store large documents elsewhere and publish a reference to them.")));
}

/*
 * publish_context returns the request context settings (eventbox.actor,
 * eventbox.correlation_id, eventbox.causation_id) as a jsonb object, or
 * NULL when none is set.
 */
static Jsonb *
publish_context(void)
{
	const char *names[] = {"actor", "correlation_id", "causation_id"};
	const char *values[] = {eventbox_actor, eventbox_correlation_id,
	eventbox_causation_id};
	StringInfoData buf;
	bool		any = false;
	int			i;

	for (i = 0; i < (int) lengthof(names); i++)
	{
		if (values[i] == NULL || values[i][0] == '\0')
			continue;
		if (!any)
		{
			initStringInfo(&buf);
			appendStringInfoChar(&buf, '{');
		}
		else
			appendStringInfoChar(&buf, ',');
		escape_json(&buf, names[i]);
		appendStringInfoChar(&buf, ':');
		escape_json(&buf, values[i]);
		any = true;
	}
	if (!any)
		return NULL;
	appendStringInfoChar(&buf, '}');
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

/*
 * publish_with_context merges the context (from publish_context, may be
 * NULL) into the headers.  Headers the caller passed explicitly win.
 */
static Jsonb *
publish_with_context(Jsonb *context, Jsonb *headers)
{
	if (context == NULL)
		return headers;
	return DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(context),
											  JsonbPGetDatum(headers)));
}

/*
 * publish_empty_object returns an empty jsonb object, made once per call
 * of the caller's choosing (pass the same pointer for a whole batch).
 */
static Jsonb *
publish_empty_object(Jsonb **cache)
{
	if (*cache == NULL)
		*cache = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	return *cache;
}

/*
 * Dedupe locks.  A publish with a dedupe key holds, until its transaction
 * ends, an exclusive lock on the key (its 32-bit hash) and the lock of all
 * keys in RowExclusiveLock mode, which such publishes share.  A
 * publish_batch with more than PUBLISH_DEDUPE_MANY distinct keys takes the
 * lock of all keys in ExclusiveLock mode instead, and no lock per key: it
 * waits for every dedupe publish in progress and holds off new ones until
 * it ends.  One lock per key ran out of the shared lock table (about
 * max_locks_per_transaction times max_connections entries, 6,400 with the
 * defaults) for batches of some thousands of keys, failing them with "out
 * of shared memory".  field4 of the tags differs from the 1 and 2 that
 * SQL's advisory locks use; field3 tells the lock of all keys (1) from a
 * key's (0).
 */
#define PUBLISH_DEDUPE_MANY 64

static void
publish_dedupe_lock_all(LOCKMODE mode)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, 0, 1, EVENTBOX_DEDUPE_LOCK_FIELD4);
	(void) LockAcquire(&tag, mode, false, false);
}

/*
 * publish_dedupe returns the id of an event published with key inside the
 * dedupe window, or 0.  Unless the caller holds the lock of all keys
 * exclusively (all_locked), it first takes the key's locks (above), which
 * make a concurrent publisher of the same key wait until we commit or roll
 * back; it then sees our event, whatever its isolation level.
 */
static int64
publish_dedupe(text *key, bool all_locked)
{
	Datum		values[2];
	int			rc;
	int			level;
	int64		found = 0;

	if (!all_locked)
	{
		LOCKTAG		tag;

		publish_dedupe_lock_all(RowExclusiveLock);
		SET_LOCKTAG_ADVISORY(tag, MyDatabaseId,
							 hash_bytes((unsigned char *) VARDATA_ANY(key),
										VARSIZE_ANY_EXHDR(key)),
							 0, EVENTBOX_DEDUPE_LOCK_FIELD4);
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	}

	if (publish_dedupe_plan == NULL)
	{
		Oid			types[2] = {TEXTOID, INT4OID};

		/*
		 * The first event with the key: all of them (there is one, or a
		 * few) through the dedupe index, then the lowest id.  Not "ORDER BY
		 * id LIMIT 1": without statistics on a partition (a fresh one, or
		 * one filled faster than autovacuum analyzes it) the planner walked
		 * its id index from the lowest id and filtered every event, and
		 * the plan is kept for the backend's life.  OFFSET 0 keeps min()
		 * from being turned back into that.
		 */
		publish_dedupe_plan = EventboxPreparePlan(
												  "SELECT pg_catalog.min(d.id) FROM"
												  " (SELECT id FROM eventbox.log"
												  "  WHERE dedupe_key = $1 COLLATE \"C\""
												  "  AND occurred_at >= pg_catalog.now() - pg_catalog.make_interval(secs => $2)"
												  "  OFFSET 0) d",
												  2, types);
	}
	values[0] = PointerGetDatum(key);
	values[1] = Int32GetDatum(eventbox_dedupe_window);

	/*
	 * Look with the latest snapshot, not the transaction's: under REPEATABLE
	 * READ the transaction snapshot predates the commit we waited for.
	 */
	CommandCounterIncrement();
	level = EventboxIndexPlansBegin();
	rc = SPI_execute_snapshot(publish_dedupe_plan, values, NULL,
							  GetLatestSnapshot(), InvalidSnapshot,
							  false, false, 1);
	EventboxIndexPlansEnd(level);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "eventbox: dedupe lookup failed: %s", SPI_result_code_string(rc));
	if (SPI_processed > 0)
	{
		bool		isnull;

		Datum		first = SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			found = DatumGetInt64(first);
	}
	return found;
}


static Oid
publish_relid(Oid nsp, const char *name)
{
	Oid			relid = get_relname_relid(name, nsp);

	if (!OidIsValid(relid))
		elog(ERROR, "eventbox: relation eventbox.%s is missing", name);
	return relid;
}

/*
 * Where publish writes, kept across calls: the relations it looks up by
 * name, and the current partition (eventbox.rotation.cur).  Reading the
 * rotation row took a sequential scan per publish (its setup alone, with
 * the relation size lookup, was a tenth of a one-event publish) and the
 * name lookups another few percent.
 *
 * Both are dropped by a relcache invalidation of any of these relations
 * (or of all).  A trigger on eventbox.rotation invalidates the table's
 * entry whenever the row changes (eventbox._table_changed), and
 * PostgreSQL sends that at the changing transaction's commit, after the
 * change became visible, and publish takes in pending invalidations first,
 * so it sees every change committed before it starts.  One that commits
 * while a publish is under way is seen by the next (as when every publish
 * read the row): writing to the partition that was current until a moment
 * ago is harmless, since rotation truncates a partition only under an
 * exclusive lock, which waits for the publisher, and after checking again
 * that every event in it has been consumed.
 */
typedef struct PublishRelations
{
	bool		valid;
	Oid			rotation;
	Oid			seq;			/* eventbox.log_id_seq */
	Oid			log[3];			/* eventbox.log_0 .. log_2 */
	int			cur;			/* the current partition */
} PublishRelations;

static PublishRelations publish_rels = {false};
static uint64 publish_rels_invalidated = 0;

static void
publish_relations_invalidate(Oid relid)
{
	int			k;
	bool		ours = !OidIsValid(relid) || relid == publish_rels.rotation ||
		relid == publish_rels.seq;

	for (k = 0; k < 3; k++)
		ours = ours || relid == publish_rels.log[k];
	if (ours)
	{
		publish_rels.valid = false;
		publish_rels_invalidated++;
	}
}

/*
 * publish_relations returns the relations publish writes to, with the
 * current partition in ->cur.
 */
static PublishRelations *
publish_relations(void)
{
	PublishRelations *r = &publish_rels;
	uint64		invalidated;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	int			attnum;
	bool		isnull = true;
	int			cur = -1;
	int			k;

	/* see every change committed before this call, as a new statement would */
	AcceptInvalidationMessages();
	if (r->valid)
		return r;

	/*
	 * Look up the names, open the rotation table (which takes in pending
	 * invalidations) and find its column, all before reading the row: an
	 * invalidation taken in after this point means the row read below may
	 * be stale, and then it is not kept.
	 */
	{
		Oid			nsp = get_namespace_oid("eventbox", false);

		r->rotation = publish_relid(nsp, "rotation");
		r->seq = publish_relid(nsp, "log_id_seq");
		for (k = 0; k < 3; k++)
		{
			char		relname[NAMEDATALEN];

			snprintf(relname, sizeof(relname), "log_%d", k);
			r->log[k] = publish_relid(nsp, relname);
		}
	}
	rel = table_open(r->rotation, AccessShareLock);
	attnum = get_attnum(RelationGetRelid(rel), "cur");
	invalidated = publish_rels_invalidated;

	/* the latest committed row: the transaction's snapshot may predate it */
	scan = table_beginscan(rel, GetLatestSnapshot(), 0, NULL);
	tuple = heap_getnext(scan, ForwardScanDirection);
	if (tuple != NULL && attnum != InvalidAttrNumber)
		cur = DatumGetInt16(heap_getattr(tuple, attnum, RelationGetDescr(rel), &isnull));
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	if (isnull || cur < 0 || cur > 2)
		elog(ERROR, "eventbox: eventbox.rotation has no current partition");
	r->cur = cur;
	r->valid = (publish_rels_invalidated == invalidated);
	return r;
}

/*
 * What publish keeps about the indexes of each log partition, across
 * calls: their descriptions (IndexInfo) and compiled predicates and key
 * expressions.  Building them per call (ExecOpenIndices, and the three
 * partial indexes' predicates compiled on first use in each executor
 * state) cost about a quarter of a one-event publish.  An entry is dropped
 * when a relcache invalidation names the partition or one of its indexes
 * (creating, dropping or readying an index invalidates the table's entry)
 * and rebuilt by the next publish into that partition, right after it has
 * locked the partition, as ExecOpenIndices would read them then.
 */
#define PUBLISH_MAX_INDEXES 16

typedef struct PublishIndex
{
	Oid			indexoid;
	IndexInfo  *info;
	ExprState  *predicate;		/* NULL: not a partial index */
	List	   *expressions;	/* ExprStates of expression keys, in order */
} PublishIndex;

typedef struct PublishIndexes
{
	Oid			relid;			/* the partition; InvalidOid: not known */
	MemoryContext cxt;			/* holds the entry; reset when rebuilt */
	int			nindexes;
	PublishIndex indexes[PUBLISH_MAX_INDEXES];
} PublishIndexes;

static PublishIndexes publish_indexes[3];
static ExprContext *publish_econtext = NULL;

static void
publish_invalidate(Datum arg, Oid relid)
{
	int			k;
	int			i;

	publish_relations_invalidate(relid);
	for (k = 0; k < (int) lengthof(publish_indexes); k++)
	{
		PublishIndexes *pi = &publish_indexes[k];

		if (!OidIsValid(pi->relid))
			continue;
		if (!OidIsValid(relid) || relid == pi->relid)
			pi->relid = InvalidOid;
		for (i = 0; i < pi->nindexes && OidIsValid(pi->relid); i++)
			if (pi->indexes[i].indexoid == relid)
				pi->relid = InvalidOid;
	}
}

/* publish_indexes_current: does pi describe rel's n indexes, indexrels? */
static bool
publish_indexes_current(PublishIndexes *pi, Relation rel, Relation *indexrels, int n)
{
	int			i;

	if (pi->relid != RelationGetRelid(rel) || pi->nindexes != n)
		return false;
	for (i = 0; i < n; i++)
		if (pi->indexes[i].indexoid != RelationGetRelid(indexrels[i]))
			return false;
	return true;
}

/*
 * publish_describe_indexes fills pi for the partition rel from its index
 * relations, opened and locked, in indexrels.
 */
static void
publish_describe_indexes(PublishIndexes *pi, Relation rel, Relation *indexrels, int n)
{
	MemoryContext old;
	int			i;

	if (pi->cxt == NULL)
		pi->cxt = AllocSetContextCreate(TopMemoryContext, "eventbox publish indexes",
										ALLOCSET_SMALL_SIZES);
	MemoryContextReset(pi->cxt);
	old = MemoryContextSwitchTo(pi->cxt);
	for (i = 0; i < n; i++)
	{
		PublishIndex *ix = &pi->indexes[i];
		ListCell   *lc;

		ix->indexoid = RelationGetRelid(indexrels[i]);
		ix->info = BuildIndexInfo(indexrels[i]);
		if (ix->info->ii_ExclusionOps != NULL ||
			(ix->info->ii_Unique && !indexrels[i]->rd_index->indimmediate))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("eventbox cannot publish into eventbox.%s: index \"%s\" is an exclusion or deferrable constraint",
							RelationGetRelationName(rel),
							RelationGetRelationName(indexrels[i])),
					 errhint("Drop that index; the log needs no constraints.")));
		ix->predicate = NULL;
		if (ix->info->ii_Predicate != NIL)
			ix->predicate = ExecInitQual((List *) expression_planner((Expr *) ix->info->ii_Predicate),
										 NULL);
		ix->expressions = NIL;
		foreach(lc, ix->info->ii_Expressions)
			ix->expressions = lappend(ix->expressions,
									  ExecInitExpr(expression_planner((Expr *) lfirst(lc)), NULL));
	}
	pi->nindexes = n;
	pi->relid = RelationGetRelid(rel);
	MemoryContextSwitchTo(old);
}

/*
 * The current log partition, opened for inserts.  Events are written by
 * inserting the heap tuples and their index entries directly instead of
 * running an INSERT: routing a row through the partitioned table means
 * setting up an executor, a partition router and the partition's five
 * indexes for every statement, which cost more than the insert itself.
 * Locks are those an INSERT takes on the partition and its indexes; the
 * log has no triggers, and its partition constraint (part = cur) holds by
 * construction.
 */
typedef struct PublishTarget
{
	Relation	rel;
	int			part;
	Oid			seq;			/* eventbox.log_id_seq */
	PublishIndexes *ix;
	int			nindexrels;
	Relation	indexrels[PUBLISH_MAX_INDEXES];
} PublishTarget;

static void
publish_open(PublishTarget *t)
{
	PublishRelations *r;
	List	   *indexes;
	ListCell   *lc;
	int			n = 0;

	if (publish_econtext == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		CacheRegisterRelcacheCallback(publish_invalidate, (Datum) 0);
		publish_econtext = CreateStandaloneExprContext();
		MemoryContextSwitchTo(old);
	}

	r = publish_relations();
	t->part = r->cur;
	t->seq = r->seq;
	t->rel = table_open(r->log[t->part], RowExclusiveLock);
	EventboxCheckLogColumns(t->rel);

	/* the index list as of the partition's lock, as ExecOpenIndices reads it */
	t->ix = &publish_indexes[t->part];
	indexes = RelationGetIndexList(t->rel);
	if (list_length(indexes) > PUBLISH_MAX_INDEXES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("eventbox.%s has %d indexes, more than publish supports (%d)",
						RelationGetRelationName(t->rel), list_length(indexes),
						PUBLISH_MAX_INDEXES)));
	foreach(lc, indexes)
		t->indexrels[n++] = index_open(lfirst_oid(lc), RowExclusiveLock);
	list_free(indexes);
	t->nindexrels = n;
	if (!publish_indexes_current(t->ix, t->rel, t->indexrels, n))
		publish_describe_indexes(t->ix, t->rel, t->indexrels, n);
}

/*
 * publish_slot makes a slot for rows of the log, with the descriptor desc
 * (the relation's, or for many slots an unpinned copy of it: each slot
 * pins a pinnable descriptor in the resource owner, which for the 1,000
 * slots of a batch cost as much as an index).
 */
static TupleTableSlot *
publish_slot(PublishTarget *t, TupleDesc desc)
{
	return MakeSingleTupleTableSlot(desc, table_slot_callbacks(t->rel));
}

/*
 * publish_fill stores event ev, with a new id (returned), as a log row in
 * slot.
 */
static int64
publish_fill(PublishTarget *t, PublishEvent *ev, pg_uuid_t *uuid, TupleTableSlot *slot)
{
	Datum	   *values;
	bool	   *nulls;
	int64		id = nextval_internal(t->seq, true);
	TupleDesc	desc = slot->tts_tupleDescriptor;
	int			i;

	ExecClearTuple(slot);
	values = slot->tts_values;
	nulls = slot->tts_isnull;
	memset(nulls, false, sizeof(bool) * EVENTBOX_LOG_NATTS);
	values[0] = Int16GetDatum(t->part);
	values[1] = Int64GetDatum(id);
	values[2] = FullTransactionIdGetDatum(GetTopFullTransactionId());
	values[3] = UUIDPGetDatum(uuid);
	values[4] = PointerGetDatum(ev->event_type);
	values[5] = PointerGetDatum(ev->aggregate_type);
	nulls[5] = (ev->aggregate_type == NULL);
	values[6] = PointerGetDatum(ev->aggregate_id);
	nulls[6] = (ev->aggregate_id == NULL);
	values[7] = JsonbPGetDatum(ev->payload);
	values[8] = JsonbPGetDatum(ev->headers);
	values[9] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	values[10] = TimestampTzGetDatum(ev->deliver_at);
	nulls[10] = !ev->has_deliver_at;
	values[11] = PointerGetDatum(ev->dedupe_key);
	nulls[11] = (ev->dedupe_key == NULL);
	/* the NOT NULL constraints (the log has no others) */
	for (i = 0; i < EVENTBOX_LOG_NATTS; i++)
		if (nulls[i] && TupleDescAttr(desc, i)->attnotnull)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of relation \"%s\" violates not-null constraint",
							NameStr(TupleDescAttr(desc, i)->attname),
							RelationGetRelationName(t->rel))));
	ExecStoreVirtualTuple(slot);
	return id;
}

/*
 * publish_index_row inserts the index entries of one stored row, as
 * ExecInsertIndexTuples does: an index whose predicate the row fails gets
 * none, one that is not ready for inserts yet (being built concurrently)
 * is left out.
 */
static void
publish_index_row(PublishTarget *t, TupleTableSlot *slot)
{
	ExprContext *econtext = publish_econtext;
	int			i;

	econtext->ecxt_scantuple = slot;
	for (i = 0; i < t->ix->nindexes; i++)
	{
		PublishIndex *ix = &t->ix->indexes[i];
		IndexInfo  *info = ix->info;
		Datum		values[INDEX_MAX_KEYS];
		bool		isnull[INDEX_MAX_KEYS];
		ListCell   *expr = list_head(ix->expressions);
		int			k;

		if (!info->ii_ReadyForInserts)
			continue;
		if (ix->predicate != NULL && !ExecQual(ix->predicate, econtext))
			continue;
		for (k = 0; k < info->ii_NumIndexAttrs; k++)
		{
			AttrNumber	att = info->ii_IndexAttrNumbers[k];

			if (att != 0)
				values[k] = slot_getattr(slot, att, &isnull[k]);
			else
			{
				values[k] = ExecEvalExprSwitchContext(lfirst(expr), econtext, &isnull[k]);
				expr = lnext(ix->expressions, expr);
			}
		}
		(void) index_insert(t->indexrels[i], values, isnull, &slot->tts_tid, t->rel,
							info->ii_Unique ? UNIQUE_CHECK_YES : UNIQUE_CHECK_NO,
							false, info);
	}
	ResetExprContext(econtext);
}

/*
 * publish_write inserts the rows of n filled slots and their index entries:
 * one heap_multi_insert (as COPY does; it logs one WAL record per page, not
 * one per row) and then the index entries of each.
 */
static void
publish_write(PublishTarget *t, TupleTableSlot **slots, int n)
{
	int			i;

	if (n == 1)
		simple_table_tuple_insert(t->rel, slots[0]);
	else
		table_multi_insert(t->rel, slots, n, GetCurrentCommandId(true), 0, NULL);
	for (i = 0; i < n; i++)
		publish_index_row(t, slots[i]);
}

static void
publish_close(PublishTarget *t)
{
	int			i;

	for (i = 0; i < t->nindexrels; i++)
		index_close(t->indexrels[i], NoLock);
	table_close(t->rel, NoLock);

	/* later commands of the transaction see the events, as after an INSERT */
	CommandCounterIncrement();
}

/*
 * publish_insert writes one event into the current log partition and
 * returns its id.
 */
static int64
publish_insert(PublishEvent *ev, pg_uuid_t *uuid)
{
	PublishTarget t;
	TupleTableSlot *slot;
	int64		id;

	publish_open(&t);
	slot = publish_slot(&t, RelationGetDescr(t.rel));
	id = publish_fill(&t, ev, uuid, slot);
	publish_write(&t, &slot, 1);
	ExecDropSingleTupleTableSlot(slot);
	publish_close(&t);
	return id;
}

/*
 * publish(event_type, payload, aggregate_type, aggregate_id, headers,
 *		   dedupe_key, deliver_at) returns the new event's id.
 */
Datum
publish(PG_FUNCTION_ARGS)
{
	PublishEvent ev;
	pg_uuid_t  *uuid;
	int64		id = 0;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("event_type must not be null")));
	memset(&ev, 0, sizeof(ev));
	ev.event_type = PG_GETARG_TEXT_PP(0);
	ev.payload = PG_ARGISNULL(1) ? NULL : PG_GETARG_JSONB_P(1);
	ev.aggregate_type = PG_ARGISNULL(2) ? NULL : PG_GETARG_TEXT_PP(2);
	ev.aggregate_id = PG_ARGISNULL(3) ? NULL : PG_GETARG_TEXT_PP(3);
	ev.headers = PG_ARGISNULL(4) ? NULL : PG_GETARG_JSONB_P(4);
	ev.dedupe_key = PG_ARGISNULL(5) ? NULL : PG_GETARG_TEXT_PP(5);
	ev.has_deliver_at = !PG_ARGISNULL(6);
	if (ev.has_deliver_at)
		ev.deliver_at = PG_GETARG_TIMESTAMPTZ(6);
	if (ev.payload == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("payload must not be null"),
				 errhint("Pass '{}' for an event without payload.")));
	if (ev.headers == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("headers must not be null"),
				 errhint("Pass '{}' for an event without headers.")));
	publish_check(&ev);
	ev.headers = publish_with_context(publish_context(), ev.headers);

	if (ev.dedupe_key != NULL)
	{
		EventboxPushSearchPath();
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "eventbox: SPI_connect failed");
		id = publish_dedupe(ev.dedupe_key, false);
		SPI_finish();
		EventboxPopSearchPath();
	}

	if (id == 0)
	{
		uuid = palloc(sizeof(pg_uuid_t));
		EventboxGenerateUuidV7(uuid);
		id = publish_insert(&ev, uuid);
	}

	EventboxNotePublished();
	PG_RETURN_INT64(id);
}

/*
 * publish_batch_text returns the text of a string member of an event
 * object, or NULL when the member is JSON null; other JSON types raise.
 */
static text *
publish_batch_text(JsonbValue *v, const char *key, int index)
{
	if (v->type == jbvNull)
		return NULL;
	if (v->type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" of event %d must be a string", key, index)));
	return cstring_to_text_with_len(v->val.string.val, v->val.string.len);
}

/*
 * publish_batch_object returns a JSON object member of an event object as
 * jsonb (NULL for JSON null); other JSON types raise.
 */
static Jsonb *
publish_batch_object(JsonbValue *v, const char *key, int index)
{
	if (v->type == jbvNull)
		return NULL;
	if (v->type != jbvBinary || !JsonContainerIsObject(v->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" of event %d must be a JSON object", key, index),
				 errhint("Wrap the value in an object, for example '{\"value\": ...}'.")));
	return JsonbValueToJsonb(v);
}

/*
 * publish_batch_parse turns one element of the events array into a
 * PublishEvent.  Members: event_type (required), payload, aggregate_type,
 * aggregate_id, headers, dedupe_key, deliver_at; others are errors so that
 * typos do not silently drop data.
 */
static void
publish_batch_parse(JsonbValue *elem, int index, PublishEvent *ev,
					Jsonb **empty)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	char	   *key = NULL;

	if (elem->type != jbvBinary || !JsonContainerIsObject(elem->val.binary.data))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event %d of the batch is not a JSON object", index),
				 errhint("Pass an array of objects like '[{\"event_type\": \"order.created\", \"payload\": {}}]'.")));

	memset(ev, 0, sizeof(*ev));
	it = JsonbIteratorInit(elem->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			key = pnstrdup(v.val.string.val, v.val.string.len);
			continue;
		}
		if (tok != WJB_VALUE)
			continue;

		if (strcmp(key, "event_type") == 0)
			ev->event_type = publish_batch_text(&v, key, index);
		else if (strcmp(key, "payload") == 0)
			ev->payload = publish_batch_object(&v, key, index);
		else if (strcmp(key, "headers") == 0)
			ev->headers = publish_batch_object(&v, key, index);
		else if (strcmp(key, "aggregate_type") == 0)
			ev->aggregate_type = publish_batch_text(&v, key, index);
		else if (strcmp(key, "aggregate_id") == 0)
			ev->aggregate_id = publish_batch_text(&v, key, index);
		else if (strcmp(key, "dedupe_key") == 0)
			ev->dedupe_key = publish_batch_text(&v, key, index);
		else if (strcmp(key, "deliver_at") == 0)
		{
			text	   *t = publish_batch_text(&v, key, index);

			if (t != NULL)
			{
				ev->has_deliver_at = true;
				ev->deliver_at = DatumGetTimestampTz(
													 DirectFunctionCall3(timestamptz_in,
																		 CStringGetDatum(text_to_cstring(t)),
																		 ObjectIdGetDatum(InvalidOid),
																		 Int32GetDatum(-1)));
			}
		}
		else
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown member \"%s\" in event %d of the batch", key, index),
					 errhint("Valid members are event_type, payload, aggregate_type, aggregate_id, headers, dedupe_key and deliver_at.")));
	}

	if (ev->event_type == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("event %d of the batch has no event_type", index)));
	if (ev->payload == NULL)
		ev->payload = publish_empty_object(empty);
	if (ev->headers == NULL)
		ev->headers = publish_empty_object(empty);
}

/* publish_key_compare orders elements a and b of evs by their dedupe keys' bytes */
static int
publish_key_compare(const PublishEvent *evs, int a, int b)
{
	text	   *ka = evs[a].dedupe_key;
	text	   *kb = evs[b].dedupe_key;
	int			la = VARSIZE_ANY_EXHDR(ka);
	int			lb = VARSIZE_ANY_EXHDR(kb);
	int			c = memcmp(VARDATA_ANY(ka), VARDATA_ANY(kb), Min(la, lb));

	if (c != 0)
		return c;
	return (la > lb) - (la < lb);
}

/* qsort_arg comparator of element numbers of evs: by dedupe key, then input order */
static int
publish_key_cmp(const void *a, const void *b, void *evs)
{
	int			ia = *(const int *) a;
	int			ib = *(const int *) b;
	int			c = publish_key_compare(evs, ia, ib);

	if (c != 0)
		return c;
	return (ia > ib) - (ia < ib);
}

/* names the batch element whose check failed (publish_check's errors) */
static void
publish_batch_error_context(void *arg)
{
	errcontext("event %d of the batch", *(int *) arg);
}

/*
 * publish_batch_work does the work of publish_batch (below), allocating in
 * the current memory context.
 */
static void
publish_batch_work(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Jsonb	   *events;
	Jsonb	   *context;
	Jsonb	   *empty = NULL;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n;
	int			i;
	int			nnew = 0;
	PublishEvent *evs;
	int64	   *ids;
	pg_uuid_t  *uuids;
	int		   *keyed;			/* elements with a dedupe key */
	int			nkeyed = 0;
	int			nkeys = 0;		/* distinct keys */
	int			first = 0;		/* the first element with the current key */
	int			element = 0;
	ErrorContextCallback errcallback;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("events must not be null")));
	events = PG_GETARG_JSONB_P(0);
	if (!JB_ROOT_IS_ARRAY(events) || JB_ROOT_IS_SCALAR(events))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("events must be a JSON array of event objects")));

	n = JB_ROOT_COUNT(events);
	if (n == 0)
		return;

	evs = palloc0(sizeof(PublishEvent) * n);
	context = publish_context();
	ids = palloc0(sizeof(int64) * n);
	uuids = palloc0(sizeof(pg_uuid_t) * n);

	/* parse and check everything before writing anything */
	errcallback.callback = publish_batch_error_context;
	errcallback.previous = error_context_stack;
	i = 0;
	it = JsonbIteratorInit(&events->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok != WJB_ELEM)
			continue;
		publish_batch_parse(&v, i + 1, &evs[i], &empty);
		element = i + 1;
		errcallback.arg = &element;
		error_context_stack = &errcallback;
		publish_check(&evs[i]);
		error_context_stack = errcallback.previous;
		evs[i].headers = publish_with_context(context, evs[i].headers);
		i++;
	}

	EventboxPushSearchPath();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "eventbox: SPI_connect failed");

	/*
	 * Dedupe keys: sorted, so that an element whose key an earlier element
	 * of the batch has takes that element's id (resolved after the insert),
	 * and the first of each key is looked up.
	 */
	keyed = palloc(sizeof(int) * n);
	for (i = 0; i < n; i++)
		if (evs[i].dedupe_key != NULL)
			keyed[nkeyed++] = i;
	qsort_arg(keyed, nkeyed, sizeof(int), publish_key_cmp, evs);
	for (i = 0; i < nkeyed; i++)
		if (i == 0 || publish_key_compare(evs, keyed[i - 1], keyed[i]) != 0)
			nkeys++;
	if (nkeys > PUBLISH_DEDUPE_MANY)
		publish_dedupe_lock_all(ExclusiveLock);
	for (i = 0; i < nkeyed; i++)
	{
		int			k = keyed[i];

		CHECK_FOR_INTERRUPTS();
		if (i > 0 && publish_key_compare(evs, keyed[i - 1], k) == 0)
			ids[k] = -(first + 1);
		else
		{
			first = k;
			ids[k] = publish_dedupe(evs[k].dedupe_key, nkeys > PUBLISH_DEDUPE_MANY);
		}
	}
	for (i = 0; i < n; i++)
		if (ids[i] == 0)
			nnew++;
	SPI_finish();
	EventboxPopSearchPath();

	if (nnew > 0)
	{
		PublishTarget t;
		int			nslots = Min(nnew, PUBLISH_MULTI_INSERT);
		TupleTableSlot **slots = palloc(sizeof(TupleTableSlot *) * nslots);
		int			used = 0;
		TupleDesc	desc;

		publish_open(&t);
		desc = CreateTupleDescCopy(RelationGetDescr(t.rel));
		for (i = 0; i < nslots; i++)
			slots[i] = publish_slot(&t, desc);
		for (i = 0; i < n; i++)
		{
			if (ids[i] != 0)
				continue;
			CHECK_FOR_INTERRUPTS();
			EventboxGenerateUuidV7(&uuids[i]);
			ids[i] = publish_fill(&t, &evs[i], &uuids[i], slots[used++]);
			if (used == nslots)
			{
				publish_write(&t, slots, used);
				used = 0;
			}
		}
		if (used > 0)
			publish_write(&t, slots, used);
		for (i = 0; i < nslots; i++)
			ExecDropSingleTupleTableSlot(slots[i]);
		publish_close(&t);
	}
	EventboxNotePublished();

	for (i = 0; i < n; i++)
	{
		Datum		value;
		bool		isnull = false;

		if (ids[i] < 0)
			ids[i] = ids[-ids[i] - 1];
		value = Int64GetDatum(ids[i]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &value, &isnull);
	}
}

/*
 * The working memory of publish_batch: the parsed events, the slots and
 * the rows of each heap_multi_insert, about 4 MB for 1,000 events.  In the
 * statement's memory it was given back to the kernel at every statement
 * end and faulted in again by the next call (a thousand page faults per
 * call of 1,000 events, against PgQ's sixty).  This context lives as long
 * as the backend and keeps its first block over resets; a nested call (not
 * expected: nothing publish_batch runs calls it) uses its caller's memory.
 */
#define PUBLISH_BATCH_MEMORY (4 * 1024 * 1024)

static MemoryContext publish_batch_cxt = NULL;
static bool publish_batch_busy = false;

/*
 * publish_batch(events jsonb) publishes an array of events, written
 * PUBLISH_MULTI_INSERT rows at a time, and returns their ids in input
 * order.  A member with a dedupe_key seen inside the window (or earlier in
 * the same batch) returns the first event's id instead.
 */
Datum
publish_batch(PG_FUNCTION_ARGS)
{
	MemoryContext caller;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	if (publish_batch_busy)
	{
		publish_batch_work(fcinfo);
		PG_RETURN_NULL();
	}
	if (publish_batch_cxt == NULL)
		publish_batch_cxt = AllocSetContextCreate(TopMemoryContext,
												  "eventbox publish_batch",
												  PUBLISH_BATCH_MEMORY,
												  ALLOCSET_DEFAULT_INITSIZE,
												  ALLOCSET_DEFAULT_MAXSIZE);
	caller = MemoryContextSwitchTo(publish_batch_cxt);
	publish_batch_busy = true;
	PG_TRY();
	{
		publish_batch_work(fcinfo);
	}
	PG_FINALLY();
	{
		publish_batch_busy = false;
		MemoryContextSwitchTo(caller);
		MemoryContextReset(publish_batch_cxt);
	}
	PG_END_TRY();
	PG_RETURN_NULL();
}
