/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The database worker: forwards events of push subscriptions as
 *	  notifications, wakes pull consumers and runs the lease and retry timers.
 *
 * One worker serves one database.  It sleeps on its latch, which a
 * publishing transaction sets when it commits, and on a timer for due
 * retries, delayed events and lease expiry (eventbox.naptime at most).  Each
 * cycle is one transaction running EventboxDeliver (deliver.c); once a
 * second a separate transaction calls eventbox._rotate() to reclaim log
 * storage.  Notifications are sent at its commit, together with the cursor
 * moves that they report, so a cycle that fails (a full notification
 * queue, a lock timeout) rolls back whole, is logged once and is retried
 * with backoff: nothing is lost.
 *
 * The worker exits when the extension is dropped, on SIGTERM, and while its
 * database is being dropped (see EventboxStopWorker); a crash brings the
 * launcher back, which starts the worker again.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "storage/procarray.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "eventbox.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

/* the longest backoff after failed cycles, in milliseconds */
#define WORKER_MAX_BACKOFF_MS 10000

static SPIPlanPtr rotate_plan = NULL;
static Oid	worker_dboid = InvalidOid;
static TransactionId worker_settled_xid = InvalidTransactionId;
static char *worker_dbname = NULL;
static bool worker_reset_done = false;	/* see worker_reset_push_once */
static Oid	worker_extension = InvalidOid;	/* the extension it serves */

/* true in a database worker: it holds push_once cursors (consume.c) */
bool		EventboxIsWorker = false;

/* What a worker transaction does. */
typedef enum WorkerCycle
{
	CYCLE_DELIVER,				/* forward events, run the timers */
	CYCLE_ROTATE,				/* write back held cursors, rotate the log */
	CYCLE_COMPACT,				/* move cursor rows back to the table's start */
	CYCLE_WRITE_BACK			/* write back held cursors and let go */
} WorkerCycle;

static void
worker_detach(int code, Datum arg)
{
	EventboxDbSlot *slot;

	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(worker_dboid, false);
	if (slot != NULL && slot->worker_pid == MyProcPid)
	{
		slot->worker_pid = 0;
		slot->worker_procno = -1;
	}
	SpinLockRelease(&EventboxShared->mutex);
	EventboxWakeLauncher();
}

/*
 * worker_give_up decides, for a worker that found no extension, whether to
 * record the database as without it and exit (true), or to look again.
 * CREATE EXTENSION registers its database before it commits, so a probe
 * can look too early.  While the registering transaction is in progress
 * the worker waits; once it has ended, the worker looks once more with a
 * fresh snapshot.  The state is set under the same lock that the
 * registration takes, and only if no registration came in since the worker
 * read the slot: else a registration between the look and the write would
 * be overwritten, and the database left without a worker.
 */
static bool
worker_give_up(void)
{
	EventboxDbSlot *slot;
	TransactionId xid = InvalidTransactionId;
	bool		gave_up = false;
	TimestampTz now;

	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(worker_dboid, false);
	if (slot != NULL)
		xid = slot->registering_xid;
	SpinLockRelease(&EventboxShared->mutex);

	if (TransactionIdIsValid(xid) && !TransactionIdEquals(xid, worker_settled_xid))
	{
		if (!TransactionIdIsInProgress(xid))
			worker_settled_xid = xid;	/* one more look, then settle */
		return false;
	}

	now = GetCurrentTimestamp();
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(worker_dboid, false);
	if (slot != NULL && TransactionIdEquals(slot->registering_xid, xid))
	{
		if (slot->state != EB_SLOT_DROPPING)
		{
			slot->state = EB_SLOT_ABSENT;
			slot->probed_at = now;
		}
		gave_up = true;
	}
	else if (slot == NULL)
		gave_up = true;
	SpinLockRelease(&EventboxShared->mutex);
	return gave_up;
}

/*
 * worker_set_state records what this worker learned about its database.
 */
static void
worker_set_state(EventboxSlotState state)
{
	EventboxDbSlot *slot;

	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(worker_dboid, false);
	if (slot != NULL && slot->state != EB_SLOT_DROPPING)
	{
		slot->state = state;
		slot->probed_at = GetCurrentTimestamp();
	}
	SpinLockRelease(&EventboxShared->mutex);
}

/*
 * After a crash, the first cycle of a database's worker moves the cursors
 * of its push_once subscriptions past every event committed before the
 * crash (the transactions below EventboxCrashBoundary), and drops their
 * retry rows (delayed events) that were due by then.  Returns false if the
 * boundary is not known yet.
 *
 * A cursor counts as from before the crash if it was last moved before the
 * shared state was initialized: a worker that runs this again (after it
 * restarted) finds the cursors it already moved, and the cursors of
 * subscriptions and databases created since, newer, and leaves them alone.
 *
 * push_once promises at most once, and the worker commits without waiting
 * for its WAL flush (see EventboxWorkerMain).  Listeners read a
 * notification as soon as the sending transaction shows as committed,
 * which for an asynchronous commit is before its WAL is flushed, so a crash
 * can undo the cursor move of a cycle whose notifications were already
 * read; sent again, they would arrive twice.  Which events the lost cycles
 * covered is not known, so all events committed before the crash count as
 * delivered.  What this gives up is events that were committed but not yet
 * forwarded when the server crashed.  No listener can tell the difference:
 * a crash disconnects every listener and empties the notification queue
 * (whatever was queued and not yet read is lost with it), so a listener
 * must catch up with eventbox.timeline() after a crash in any case.
 *
 * The alternative, a cycle that waits for its flush, put one more fsync in
 * the queue that synchronously committing publishers wait in, per cycle:
 * with one publishing client that halved its rate.
 */
static bool
worker_reset_push_once(void)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[2];
	FullTransactionId boundary;
	bool		isnull;
	int64		subs;
	int64		delayed;

	SpinLockAcquire(&EventboxShared->mutex);
	boundary = EventboxShared->crash_boundary;
	SpinLockRelease(&EventboxShared->mutex);
	if (!FullTransactionIdIsValid(boundary))
		return false;			/* the launcher has not recorded it yet */

	if (plan == NULL)
	{
		Oid			types[2] = {TIMESTAMPTZOID, INT8OID};

		/*
		 * The new cursor sees every transaction below the boundary that is
		 * not in progress now (a prepared one can be): all that committed
		 * before the crash, none that started after it.
		 */
		plan = EventboxPreparePlan(
								   "WITH b AS (SELECT $2::text::pg_catalog.xid8 AS b),"
								   " x AS (SELECT pg_catalog.string_agg(x::text, ',' ORDER BY x) AS xip,"
								   "              pg_catalog.min(x) AS lo"
								   "       FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot()) x, b"
								   "       WHERE x < b.b),"
								   " n AS (SELECT (COALESCE(x.lo, b.b)::text || ':' || b.b::text || ':'"
								   "               || COALESCE(x.xip, ''))::pg_catalog.pg_snapshot AS snap"
								   "       FROM x, b),"
								   " s AS (SELECT sub_id FROM eventbox.subscriptions"
								   "       WHERE mode = 'push_once'),"
								   " c AS (UPDATE eventbox.cursors c"
								   "       SET snap = n.snap, target = NULL, pos_txid = '0', pos_id = 0,"
								   "           updated_at = pg_catalog.now()"
								   "       FROM s, n WHERE c.sub_id = s.sub_id AND c.updated_at < $1"
								   "       RETURNING c.sub_id),"
								   " r AS (DELETE FROM eventbox.retries r USING s"
								   "       WHERE r.sub_id = s.sub_id AND r.next_attempt_at < $1"
								   "       RETURNING r.id)"
								   " SELECT (SELECT pg_catalog.count(DISTINCT sub_id) FROM c),"
								   "        (SELECT pg_catalog.count(*) FROM r)",
								   2, types);
	}
	args[0] = TimestampTzGetDatum(EventboxShared->started_at);
	args[1] = Int64GetDatum((int64) U64FromFullTransactionId(boundary));
	pgstat_report_activity(STATE_RUNNING, "moving push_once cursors past the crash");
	EventboxExecPlan(plan, args, NULL, SPI_OK_SELECT, "push_once reset");
	subs = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	delayed = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (subs > 0)
		ereport(LOG,
				(errmsg("eventbox worker: push_once delivery in database \"%s\" resumes after the events committed before the crash",
						worker_dbname),
				 errdetail("Subscriptions moved: %lld; due delayed events dropped: %lld. Events that were not yet forwarded when the server crashed count as delivered, so that none is sent twice.",
						   (long long) subs, (long long) delayed),
				 errhint("Listeners catch up with eventbox.timeline().")));
	return true;
}

/*
 * worker_cycle runs one delivery cycle, one log rotation step, one cursor
 * compaction or one write-back of held cursors (see WorkerCycle) in its
 * own transaction.  Returns false if it failed (the transaction was
 * rolled back); *installed tells whether the extension
 * exists; *next_due is when a retry, a delayed event or a lease expiry
 * comes due next (0 if none).
 */
static bool
worker_cycle(WorkerCycle kind, bool *installed, TimestampTz *next_due,
			 uint64 *forwarded, int failures)
{
	MemoryContext outer = CurrentMemoryContext;
	volatile bool ok = true;
	volatile bool reset = (kind == CYCLE_DELIVER && EventboxShared->after_crash &&
						   !worker_reset_done);
	Oid			extension;

	*next_due = 0;
	*forwarded = 0;
	*installed = true;
	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());

		extension = get_extension_oid("eventbox", true);

		/* a new extension: what the worker held belongs to the old one */
		if (extension != worker_extension)
		{
			EventboxForgetHeld();
			worker_extension = extension;
		}
		if (!OidIsValid(extension))
			*installed = false;
		else
		{
			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "eventbox: SPI_connect failed");
			if (kind == CYCLE_WRITE_BACK)
			{
				pgstat_report_activity(STATE_RUNNING, "writing back push_once cursors");
				EventboxWriteHeld(true);
			}
			else if (kind == CYCLE_COMPACT)
			{
				pgstat_report_activity(STATE_RUNNING, "compacting cursors");
				EventboxCompactCursors();
			}
			else if (kind == CYCLE_ROTATE)
			{
				Datum		args[2];

				if (rotate_plan == NULL)
				{
					Oid			types[2] = {INT4OID, INT4OID};

					rotate_plan = EventboxPreparePlan(
													  "SELECT eventbox._rotate("
													  "pg_catalog.make_interval(secs => $1),"
													  " pg_catalog.make_interval(secs => $2))",
													  2, types);
				}
				args[0] = Int32GetDatum(eventbox_retention);
				args[1] = Int32GetDatum(eventbox_rotation_period);

				/* the rotation check reads the positions */
				pgstat_report_activity(STATE_RUNNING, "rotating the log");
				EventboxWriteHeld(false);
				if (SPI_execute_plan(rotate_plan, args, NULL, false, 1) != SPI_OK_SELECT)
					elog(ERROR, "eventbox: rotation failed");
			}
			else
			{
				if (reset && !worker_reset_push_once())
					reset = false;	/* look again next cycle */
				pgstat_report_activity(STATE_RUNNING, "delivering events");
				EventboxPushSearchPath();
				*next_due = EventboxDeliver(eventbox_batch_size, forwarded);
				EventboxPopSearchPath();
			}
			SPI_finish();
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
		if (reset)
			worker_reset_done = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(outer);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		/* the cycle may have raised the lease bound: no longer known */
		EventboxLowerLeaseBound(0);
		if (failures == 0)
			ereport(LOG,
					(errmsg("eventbox worker cycle failed: %s", edata->message),
					 errdetail("The cycle was rolled back and is retried with backoff; no event is lost.")));
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();

	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return ok;
}

/*
 * worker_write_back answers EventboxRequestWriteBack: when a request is
 * pending, a transaction writes back every push_once position the worker
 * holds and stops holding it.  Returns whether it ran one.
 */
static bool
worker_write_back(MemoryContext cyclectx, int failures)
{
	EventboxDbSlot *slot;
	uint64		requested = 0;
	uint64		done = 0;
	bool		installed;
	TimestampTz ignored;
	uint64		forwarded;
	MemoryContext old;

	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(worker_dboid, false);
	if (slot != NULL)
	{
		requested = slot->writeback_requested;
		done = slot->writeback_done;
	}
	SpinLockRelease(&EventboxShared->mutex);
	if (requested == done)
		return false;

	old = MemoryContextSwitchTo(cyclectx);
	if (worker_cycle(CYCLE_WRITE_BACK, &installed, &ignored, &forwarded, failures))
	{
		SpinLockAcquire(&EventboxShared->mutex);
		slot = EventboxSlot(worker_dboid, false);
		if (slot != NULL && slot->writeback_done < requested)
			slot->writeback_done = requested;
		SpinLockRelease(&EventboxShared->mutex);
	}
	MemoryContextSwitchTo(old);
	MemoryContextReset(cyclectx);
	return true;
}

/*
 * EventboxRequestWriteBack asks the worker of the current database to
 * write back the push_once positions it holds and waits until it has, for
 * up to ten seconds.  Without a worker there is nothing to wait for: only
 * a running worker holds positions, and it writes them back when it exits.
 */
void
EventboxRequestWriteBack(void)
{
	EventboxDbSlot *slot;
	pid_t		pid = 0;
	uint64		ticket = 0;
	int			i;

	if (EventboxShared == NULL)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(MyDatabaseId, false);
	if (slot != NULL && slot->worker_pid != 0)
	{
		pid = slot->worker_pid;
		ticket = ++slot->writeback_requested;
	}
	SpinLockRelease(&EventboxShared->mutex);
	if (pid == 0)
		return;
	EventboxWakeWorker(MyDatabaseId);

	for (i = 0; i < 1000; i++)
	{
		bool		done;

		CHECK_FOR_INTERRUPTS();
		SpinLockAcquire(&EventboxShared->mutex);
		slot = EventboxSlot(MyDatabaseId, false);
		done = (slot == NULL || slot->worker_pid != pid || slot->writeback_done >= ticket);
		SpinLockRelease(&EventboxShared->mutex);
		if (done)
			return;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("the eventbox worker did not write back its push_once positions"),
			 errdetail("A push_once subscription's position is kept by the worker, which did not answer within 10 seconds."),
			 errhint("Try again. If it keeps failing, see the server log for what the worker is doing.")));
}

/* The pacing interval grows to at most this many times cycle_delay. */
#define PACE_MAX_FACTOR 4

/*
 * worker_pace returns the pacing interval in microseconds for a stream of
 * `events` forwarded in `elapsed` microseconds, or 0 when the stream is not
 * faster than one event per eventbox.cycle_delay.  The interval is
 * cycle_delay times the events that arrive per cycle_delay, capped at
 * PACE_MAX_FACTOR.  At the default cycle_delay of 500 microseconds that is
 * 0.5 ms at 2,000 events/s, 1 ms at 4,000 and 2 ms from 8,000 on.
 */
static int64
worker_pace(uint64 events, int64 elapsed)
{
	double		per_delay;

	if (eventbox_cycle_delay <= 0 || elapsed <= 0)
		return 0;
	per_delay = (double) events * eventbox_cycle_delay / elapsed;
	if (per_delay <= 1.0)
		return 0;
	return (int64) (eventbox_cycle_delay * Min(per_delay, (double) PACE_MAX_FACTOR));
}

/*
 * EventboxWorkerMain is a database worker's main loop.
 */
void
EventboxWorkerMain(Datum main_arg)
{
	EventboxDbSlot *slot;
	MemoryContext cyclectx;
	int			failures = 0;
	bool		served = false;
	TimestampTz last_rotation = 0;
	int			compact_failures = 0;
	TimestampTz cycle_started = 0;
	bool		backlog = false;
	int64		pace = 0;		/* pacing interval (microseconds), 0: none */
	TimestampTz window_start = 0;
	uint64		window_events = 0;
	uint64		forwarded;
	TimestampTz ignored;

	worker_dboid = DatumGetObjectId(main_arg);
	EventboxIsWorker = true;
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(worker_dboid, InvalidOid, 0);
	pgstat_report_appname("eventbox worker");

	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(worker_dboid, true);
	if (slot == NULL || slot->state == EB_SLOT_DROPPING ||
		(slot->worker_pid != 0 && slot->worker_pid != MyProcPid &&
		 kill(slot->worker_pid, 0) == 0))
	{
		SpinLockRelease(&EventboxShared->mutex);
		proc_exit(0);
	}
	slot->worker_pid = MyProcPid;
	slot->worker_procno = MyProc->pgprocno;
	SpinLockRelease(&EventboxShared->mutex);
	before_shmem_exit(worker_detach, 0);

	StartTransactionCommand();
	{
		char	   *name = get_database_name(worker_dboid);

		worker_dbname = MemoryContextStrdup(TopMemoryContext, name ? name : "?");
	}
	CommitTransactionCommand();

	/* never wait long behind a consumer's lock */
	SetConfigOption("lock_timeout", "5s", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * The cycle's statements are short, but their generic plans can be
	 * estimated above jit_above_cost, and JIT compiles again on every
	 * execution: hundreds of milliseconds per cycle.
	 */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/* plans through the indexes only: see EventboxIndexPlansBegin */
	SetConfigOption("enable_seqscan", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("enable_bitmapscan", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * The worker's transactions do not wait for their WAL flush.  Events
	 * are durable in the publishers' own commits; what a crash can undo
	 * here is only cursor moves, lease expiries and truncations, which are
	 * then done again: a push notification or a wake-up may be sent twice,
	 * nothing is lost (push_once cursors move past the crash instead, see
	 * worker_reset_push_once).  Waiting would put one more flush per delivery
	 * cycle in the queue that the publishers' commits wait in.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	cyclectx = AllocSetContextCreate(TopMemoryContext, "eventbox worker cycle",
									 ALLOCSET_DEFAULT_SIZES);

#ifdef __GLIBC__

	/*
	 * Keep freed memory for the next cycle instead of giving it back to the
	 * kernel.  Each cycle's transaction frees what it allocated (SPI and
	 * executor state, notification texts); with glibc's defaults the top
	 * of the heap was trimmed at every commit and the next cycle faulted
	 * its pages in again, about a fifth of the worker's time when
	 * forwarding batches.  The worker's footprint stays at its largest
	 * cycle, plus at most M_TRIM_THRESHOLD of free memory.
	 */
	mallopt(M_MMAP_THRESHOLD, 8 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024);
#endif

	while (!ShutdownRequestPending)
	{
		MemoryContext old;
		bool		installed;
		bool		ok;
		TimestampTz next_due;
		long		timeout;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (!eventbox_enabled)
			break;

		cycle_started = GetCurrentTimestamp();

		old = MemoryContextSwitchTo(cyclectx);
		ok = worker_cycle(CYCLE_DELIVER, &installed, &next_due, &forwarded, failures);
		backlog = (ok && next_due != 0 && next_due <= GetCurrentTimestamp());
		window_events += forwarded;
		if (cycle_started - window_start >= USECS_PER_SEC)
		{
			pace = worker_pace(window_events, cycle_started - window_start);
			window_start = cycle_started;
			window_events = 0;
		}
		MemoryContextSwitchTo(old);
		MemoryContextReset(cyclectx);

		/*
		 * Rotation runs once a second, after the delivery transaction has
		 * committed, so that it never delays a notification.  It writes
		 * back the push_once positions first.
		 */
		if (ok && installed &&
			TimestampDifferenceExceeds(last_rotation, GetCurrentTimestamp(), 1000))
		{
			old = MemoryContextSwitchTo(cyclectx);
			ok = worker_cycle(CYCLE_ROTATE, &installed, &ignored, &forwarded, failures);
			MemoryContextSwitchTo(old);
			MemoryContextReset(cyclectx);
			last_rotation = GetCurrentTimestamp();

			/*
			 * Then, in a transaction of its own, the cursor compaction
			 * (EventboxCompactCursors).  It is housekeeping: when it fails,
			 * it says so once and does not slow delivery down.
			 */
			if (ok && installed)
			{
				old = MemoryContextSwitchTo(cyclectx);
				if (worker_cycle(CYCLE_COMPACT, &installed, &ignored, &forwarded,
								 compact_failures))
					compact_failures = 0;
				else
					compact_failures++;
				MemoryContextSwitchTo(old);
				MemoryContextReset(cyclectx);
			}
		}

		/* alter_subscription waits for the push_once positions */
		if (installed && worker_write_back(cyclectx, failures))
			continue;

		if (!installed)
		{
			if (worker_give_up())
				break;
			/* a CREATE EXTENSION may be committing: look again shortly */
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 50L, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			continue;
		}
		if (!served)
		{
			worker_set_state(EB_SLOT_WANTED);
			ereport(LOG, (errmsg("eventbox worker serving database \"%s\"",
								 worker_dbname)));
			served = true;
		}

		/*
		 * Pacing: while events arrive faster than one per
		 * eventbox.cycle_delay on average (over the last second), a cycle
		 * starts no sooner than the pacing interval after the previous one
		 * started, so that the commits arriving in between are forwarded
		 * together.  The interval is cycle_delay at that rate and grows with
		 * the rate, up to PACE_MAX_FACTOR times cycle_delay: the cycles per
		 * second, and so the worker's CPU spent on them, stop growing with
		 * the commit rate.  Slower streams are forwarded at once, and a
		 * backlog (full batches) is worked off without pause.
		 *
		 * The worker sleeps out the interval before it waits on its latch,
		 * not in the wait: a commit that sets the latch of a worker waiting
		 * on it signals the process (kill(), in the publisher's commit),
		 * while one that sets the latch of a worker that is not waiting only
		 * writes a flag.  Sleeping first, the commits of the interval find
		 * the worker not waiting, and the wait below returns at once (its
		 * timeout is reckoned from the end of the sleep).  Measured with one
		 * publishing client and synchronous_commit on (about 2,400 commits
		 * a second): kill() calls of the publisher and the worker went from
		 * about 400 to about 110 a second.
		 */
		if (ok && pace > 0 && !backlog)
		{
			int64		wait = cycle_started + pace - GetCurrentTimestamp();

			if (wait > 0 && wait <= pace)
				pg_usleep((long) wait);
		}

		if (ok)
		{
			if (failures > 0)
				ereport(LOG,
						(errmsg("eventbox worker cycle succeeded again after %d failed attempts",
								failures)));
			failures = 0;
			timeout = eventbox_naptime;
			if (next_due != 0)
			{
				long		secs;
				int			usecs;

				TimestampDifference(GetCurrentTimestamp(), next_due, &secs, &usecs);
				timeout = Min(timeout, secs * 1000 + usecs / 1000 + 1);
			}
			/* held positions reach their rows within about a second */
			if (EventboxHeldDirty())
			{
				long		secs;
				int			usecs;

				TimestampDifference(GetCurrentTimestamp(),
									TimestampTzPlusMilliseconds(last_rotation, 1000),
									&secs, &usecs);
				timeout = Min(timeout, secs * 1000 + usecs / 1000 + 1);
			}
		}
		else
		{
			failures++;
			timeout = Min((long) WORKER_MAX_BACKOFF_MS, 50L << Min(failures, 10));
		}

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(timeout, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	/* leaving: what the worker holds goes to the rows */
	if (EventboxHeldDirty())
	{
		bool		installed;

		(void) worker_cycle(CYCLE_WRITE_BACK, &installed, &ignored, &forwarded, 0);
	}
	proc_exit(0);
}

/*
 * EventboxStopWorker makes the worker of a database leave it and keeps it
 * away until EventboxReleaseDatabase; used around DROP DATABASE and other
 * commands that need the database to themselves.  Waits up to five seconds
 * for the worker to exit.
 */
void
EventboxStopWorker(Oid dboid)
{
	EventboxDbSlot *slot;
	pid_t		pid = 0;
	int			i;

	if (EventboxShared == NULL)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(dboid, true);
	if (slot != NULL)
	{
		slot->state = EB_SLOT_DROPPING;
		pid = slot->worker_pid;
	}
	SpinLockRelease(&EventboxShared->mutex);
	if (pid == 0)
		return;

	kill(pid, SIGTERM);
	for (i = 0; i < 500; i++)
	{
		bool		gone;

		CHECK_FOR_INTERRUPTS();
		SpinLockAcquire(&EventboxShared->mutex);
		slot = EventboxSlot(dboid, false);
		gone = (slot == NULL || slot->worker_pid != pid);
		SpinLockRelease(&EventboxShared->mutex);
		if (gone)
			return;
		pg_usleep(10 * 1000L);
	}
}

/*
 * EventboxReleaseDatabase lets the launcher serve a database again after
 * EventboxStopWorker (for example when DROP DATABASE failed).
 */
void
EventboxReleaseDatabase(Oid dboid)
{
	EventboxDbSlot *slot;

	if (EventboxShared == NULL)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(dboid, false);
	if (slot != NULL && slot->state == EB_SLOT_DROPPING)
		slot->state = EB_SLOT_UNKNOWN;
	SpinLockRelease(&EventboxShared->mutex);
	EventboxWakeLauncher();
}

/*
 * EventboxRegisterDatabase marks the current database as having the
 * extension and wakes the launcher; CREATE EXTENSION calls it through
 * eventbox._register().
 */
void
EventboxRegisterDatabase(void)
{
	EventboxDbSlot *slot;
	TransactionId xid;

	if (EventboxShared == NULL)
		return;
	xid = GetTopTransactionId();
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(MyDatabaseId, true);
	if (slot != NULL && slot->state != EB_SLOT_DROPPING)
	{
		slot->state = EB_SLOT_WANTED;
		slot->registering_xid = xid;
	}
	SpinLockRelease(&EventboxShared->mutex);
	EventboxWakeLauncher();
}
