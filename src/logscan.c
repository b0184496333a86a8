/*-------------------------------------------------------------------------
 *
 * logscan.c
 *	  Direct index scans of the event log in (txid, id) order.
 *
 * The window scans of unordered lanes read the log through each
 * partition's (txid, id) index, between a lower bound (txid, id) > (lo_txid,
 * lo_id) and an upper bound txid < hi_txid, and merge the partitions in
 * (txid, id) order; those of ordered lanes read it through each
 * partition's (id) index from an id on, merged in id order.  As SQL statements (through SPI) every claim started
 * executors for a MergeAppend over three partitions with five indexes each,
 * and every row went through the scan's qualifiers, a projection and a
 * function call per filter; here a claim opens the partitions, starts one
 * btree scan per partition and range, and hands each row to its caller as
 * the partition's own deformed values.
 *
 * The caller filters the rows (the window's visibility, the type pattern)
 * and stops the scan when it has enough.
 *
 * Copyright (c) 2026, the eventbox authors
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/nbtree.h"
#include "access/relscan.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "partitioning/partdesc.h"
#include "storage/bufmgr.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "eventbox.h"

/* The log's columns, in the order of its (and every partition's) rows. */
static const char *const log_columns[] = {
	"part", "id", "txid", "event_id", "event_type", "aggregate_type",
	"aggregate_id", "payload", "headers", "occurred_at", "deliver_at",
	"dedupe_key"
};

StaticAssertDecl(lengthof(log_columns) == EVENTBOX_LOG_NATTS,
				 "log_columns does not match EVENTBOX_LOG_NATTS");

/* attribute numbers of the log's columns */
#define LOG_ATT_ID			2
#define LOG_ATT_TXID		3
#define LOG_ATT_FIRST_OUT	2	/* id: the first column handed out */
#define LOG_ATT_LAST_OUT	11	/* deliver_at: the last one */

StaticAssertDecl(LOG_ATT_LAST_OUT - LOG_ATT_FIRST_OUT + 1 == EVENTBOX_LOGSCAN_NATTS,
				 "LOG_ATT_* do not match EVENTBOX_LOGSCAN_NATTS");

#define LOGSCAN_MAX_PARTS 16

typedef struct LogScanPart
{
	Relation	heap;
	Relation	index;
	TupleTableSlot *slot;
	IndexScanDesc scan;			/* of the current range, or NULL */
	ScanKeyData keys[2];		/* (txid, id) > lower, txid < upper; or id > lower */
	ScanKeyData row[2];			/* the members of keys[0] */
	bool		has_row;		/* slot holds the partition's next row */
	uint64		txid;			/* of that row */
	int64		id;
} LogScanPart;

struct EventboxLogScan
{
	Relation	parent;
	Snapshot	snapshot;
	bool		by_id;			/* through (id) instead of (txid, id) */
	int			nparts;
	LogScanPart parts[LOGSCAN_MAX_PARTS];
};

/*
 * EventboxCheckLogColumns makes sure that a log partition's rows have the
 * columns that publish writes and the scans hand out, where they expect
 * them.
 */
void
EventboxCheckLogColumns(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			i;

	if (desc->natts != EVENTBOX_LOG_NATTS)
		elog(ERROR, "eventbox: unexpected columns in eventbox.%s",
			 RelationGetRelationName(rel));
	for (i = 0; i < EVENTBOX_LOG_NATTS; i++)
		if (strcmp(NameStr(TupleDescAttr(desc, i)->attname), log_columns[i]) != 0)
			elog(ERROR, "eventbox: unexpected columns in eventbox.%s",
				 RelationGetRelationName(rel));
}

/*
 * logscan_open_index opens the partition's valid btree index on exactly
 * (txid, id) or (id), its part of eventbox.log_txid_id_idx or log_id_idx.
 */
static Relation
logscan_open_index(Relation heap, bool by_id)
{
	List	   *indexes = RelationGetIndexList(heap);
	ListCell   *lc;

	foreach(lc, indexes)
	{
		Oid			indexoid = lfirst_oid(lc);
		HeapTuple	tup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(indexoid));
		Form_pg_index idx;
		bool		match;

		if (!HeapTupleIsValid(tup))
			elog(ERROR, "cache lookup failed for index %u", indexoid);
		idx = (Form_pg_index) GETSTRUCT(tup);
		match = idx->indisvalid &&
			(by_id ? idx->indnkeyatts == 1 && idx->indkey.values[0] == LOG_ATT_ID
			 : idx->indnkeyatts == 2 && idx->indkey.values[0] == LOG_ATT_TXID &&
			 idx->indkey.values[1] == LOG_ATT_ID) &&
			heap_attisnull(tup, Anum_pg_index_indexprs, NULL) &&
			heap_attisnull(tup, Anum_pg_index_indpred, NULL);
		/* as the planner does: not yet usable by snapshots this old */
		if (match && idx->indcheckxmin &&
			!TransactionIdPrecedes(HeapTupleHeaderGetXmin(tup->t_data), TransactionXmin))
			match = false;
		ReleaseSysCache(tup);
		if (match)
		{
			Relation	index = index_open(indexoid, AccessShareLock);

			if (index->rd_rel->relam != BTREE_AM_OID)
			{
				index_close(index, AccessShareLock);
				continue;
			}
			list_free(indexes);
			return index;
		}
	}
	elog(ERROR, "eventbox: relation \"%s\" has no btree index on %s",
		 RelationGetRelationName(heap), by_id ? "(id)" : "(txid, id)");
	return NULL;				/* keep compiler quiet */
}

/*
 * EventboxLogScanBegin opens the log and its partitions for reading, with
 * the locks a SELECT takes (held to the end of the transaction), under a
 * snapshot taken after the locks were granted, for range scans in (txid,
 * id) order (EventboxLogScanRange) or, with by_id, in id order
 * (EventboxLogScanIds).  In READ COMMITTED that is a new snapshot, as each
 * statement of a claim got one: it sees every transaction that a window
 * target taken before this call sees.
 */
EventboxLogScan *
EventboxLogScanBegin(bool by_id)
{
	EventboxLogScan *ls = palloc0(sizeof(EventboxLogScan));
	Oid			nsp = get_namespace_oid("eventbox", false);
	Oid			relid = get_relname_relid("log", nsp);
	PartitionDesc pd;
	int			i;

	if (!OidIsValid(relid))
		elog(ERROR, "eventbox: relation eventbox.log is missing");
	ls->parent = table_open(relid, AccessShareLock);
	if (ls->parent->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
		elog(ERROR, "eventbox: eventbox.log is not partitioned");
	ls->by_id = by_id;
	pd = RelationGetPartitionDesc(ls->parent, true);
	if (pd->nparts > LOGSCAN_MAX_PARTS)
		elog(ERROR, "eventbox: eventbox.log has %d partitions, at most %d are supported",
			 pd->nparts, LOGSCAN_MAX_PARTS);

	for (i = 0; i < pd->nparts; i++)
	{
		LogScanPart *p = &ls->parts[ls->nparts++];

		p->heap = table_open(pd->oids[i], AccessShareLock);
		EventboxCheckLogColumns(p->heap);
		p->index = logscan_open_index(p->heap, by_id);
		p->slot = table_slot_create(p->heap, NULL);
	}
	ls->snapshot = RegisterSnapshot(GetTransactionSnapshot());
	return ls;
}

void
EventboxLogScanEnd(EventboxLogScan *ls)
{
	int			i;

	for (i = 0; i < ls->nparts; i++)
	{
		LogScanPart *p = &ls->parts[i];

		if (p->scan != NULL)
			index_endscan(p->scan);
		ExecDropSingleTupleTableSlot(p->slot);
		index_close(p->index, NoLock);
		table_close(p->heap, NoLock);
	}
	UnregisterSnapshot(ls->snapshot);
	table_close(ls->parent, NoLock);
	pfree(ls);
}

/* logscan_next reads the partition's next row of the range into its slot */
static void
logscan_next(LogScanPart *p)
{
	p->has_row = index_getnext_slot(p->scan, ForwardScanDirection, p->slot);
	if (p->has_row)
	{
		slot_getsomeattrs(p->slot, LOG_ATT_TXID);
		p->id = DatumGetInt64(p->slot->tts_values[LOG_ATT_ID - 1]);
		p->txid = DatumGetUInt64(p->slot->tts_values[LOG_ATT_TXID - 1]);
	}
}

/*
 * logscan_run starts each partition's scan with its keys (set up by the
 * caller) and hands the rows to `receive` in the scan's order, merging the
 * partitions, until it returns false or every partition is used up.
 */
static void
logscan_run(EventboxLogScan *ls, int nkeys, EventboxLogReceive receive, void *arg)
{
	int			i;

	for (i = 0; i < ls->nparts; i++)
	{
		LogScanPart *p = &ls->parts[i];

		if (p->scan == NULL)
			p->scan = index_beginscan(p->heap, p->index, ls->snapshot, nkeys, 0);
		index_rescan(p->scan, p->keys, nkeys, NULL, 0);
		logscan_next(p);
	}

	for (;;)
	{
		LogScanPart *best = NULL;

		CHECK_FOR_INTERRUPTS();
		for (i = 0; i < ls->nparts; i++)
		{
			LogScanPart *p = &ls->parts[i];

			if (!p->has_row)
				continue;
			if (best == NULL ||
				(ls->by_id ? p->id < best->id :
				 p->txid < best->txid || (p->txid == best->txid && p->id < best->id)))
				best = p;
		}
		if (best == NULL)
			break;
		slot_getsomeattrs(best->slot, LOG_ATT_LAST_OUT);
		if (!receive(arg, &best->slot->tts_values[LOG_ATT_FIRST_OUT - 1],
					 &best->slot->tts_isnull[LOG_ATT_FIRST_OUT - 1]))
			break;
		logscan_next(best);
	}

	/* give back the buffer pins of rows read ahead */
	for (i = 0; i < ls->nparts; i++)
	{
		ExecClearTuple(ls->parts[i].slot);
		ls->parts[i].has_row = false;
	}
}

/*
 * EventboxLogScanRange hands the log rows with (txid, id) > (lo_txid,
 * lo_id) and txid < hi_txid that the scan's snapshot sees to `receive`, in
 * (txid, id) order, until it returns false or the range is used up.  The
 * values (EVENTBOX_LOGSCAN_NATTS of them: log_columns from id on) are
 * valid until receive returns.
 */
void
EventboxLogScanRange(EventboxLogScan *ls, uint64 lo_txid, int64 lo_id,
					 uint64 hi_txid, EventboxLogReceive receive, void *arg)
{
	int			i;

	Assert(!ls->by_id);
	if (hi_txid <= lo_txid)
		return;

	for (i = 0; i < ls->nparts; i++)
	{
		LogScanPart *p = &ls->parts[i];

		/* sk_func of row members: the btree comparison support functions */
		ScanKeyEntryInitialize(&p->row[0], SK_ROW_MEMBER, 1, BTGreaterStrategyNumber,
							   XID8OID, InvalidOid, F_XID8CMP, UInt64GetDatum(lo_txid));
		ScanKeyEntryInitialize(&p->row[1], SK_ROW_MEMBER | SK_ROW_END, 2,
							   BTGreaterStrategyNumber, INT8OID, InvalidOid,
							   F_BTINT8CMP, Int64GetDatum(lo_id));
		MemSet(&p->keys[0], 0, sizeof(ScanKeyData));
		p->keys[0].sk_flags = SK_ROW_HEADER;
		p->keys[0].sk_attno = 1;
		p->keys[0].sk_strategy = BTGreaterStrategyNumber;
		p->keys[0].sk_argument = PointerGetDatum(p->row);
		ScanKeyEntryInitialize(&p->keys[1], 0, 1, BTLessStrategyNumber,
							   XID8OID, InvalidOid, F_XID8LT, UInt64GetDatum(hi_txid));
	}
	logscan_run(ls, 2, receive, arg);
}

/*
 * EventboxLogScanIds hands the log rows with id > lo_id that the scan's
 * snapshot sees to `receive`, in id order, like EventboxLogScanRange.
 */
void
EventboxLogScanIds(EventboxLogScan *ls, int64 lo_id, EventboxLogReceive receive,
				   void *arg)
{
	int			i;

	Assert(ls->by_id);
	for (i = 0; i < ls->nparts; i++)
		ScanKeyEntryInitialize(&ls->parts[i].keys[0], 0, 1, BTGreaterStrategyNumber,
							   INT8OID, InvalidOid, F_INT8GT, Int64GetDatum(lo_id));
	logscan_run(ls, 1, receive, arg);
}
