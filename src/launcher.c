/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The eventbox launcher: one background worker that starts a database
 *	  worker for every database that has the extension.
 *
 * The launcher connects to no database; it reads pg_database (a shared
 * catalog) and starts a short-lived probe in each connectable, non-template
 * database it knows nothing about.  A probe that finds the extension stays
 * on as that database's worker (worker.c); one that does not marks the
 * database ABSENT and exits.  CREATE EXTENSION registers its database and
 * wakes the launcher, so a new database gets its worker without a restart;
 * ABSENT databases are probed again every few minutes in case that wake-up
 * was missed.  Template databases are never connected to.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "eventbox.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

/* how often an ABSENT database is probed again, in milliseconds */
#define LAUNCHER_REPROBE_MS (5 * 60 * 1000)
/* how often the launcher looks at pg_database without being woken */
#define LAUNCHER_NAPTIME_MS (10 * 1000)

typedef struct LauncherDb
{
	Oid			oid;
	char		name[NAMEDATALEN];
} LauncherDb;

/* worker handles, by slot index; the launcher's private memory */
static BackgroundWorkerHandle **launcher_handles = NULL;

/*
 * EventboxRegisterLauncher registers the launcher with the postmaster.  It
 * starts once recovery has finished, so on a hot standby nothing runs until
 * promotion; after a crash it comes back within seconds.
 */
void
EventboxRegisterLauncher(void)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 5;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "eventbox");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "EventboxLauncherMain");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "eventbox launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "eventbox launcher");
	RegisterBackgroundWorker(&bgw);
}

static void
launcher_detach(int code, Datum arg)
{
	SpinLockAcquire(&EventboxShared->mutex);
	EventboxShared->launcher_pid = 0;
	EventboxShared->launcher_procno = -1;
	SpinLockRelease(&EventboxShared->mutex);
}

/*
 * launcher_databases returns the connectable, non-template databases,
 * restricted to eventbox.databases when that is set.
 */
static List *
launcher_databases(void)
{
	List	   *result = NIL;
	List	   *only = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	MemoryContext outer = CurrentMemoryContext;

	StartTransactionCommand();
	if (eventbox_databases != NULL && eventbox_databases[0] != '\0')
	{
		char	   *copy = pstrdup(eventbox_databases);

		if (!SplitIdentifierString(copy, ',', &only))
		{
			ereport(LOG,
					(errmsg("eventbox.databases is not a valid list of database names: \"%s\"",
							eventbox_databases)));
			only = NIL;
		}
	}

	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tup = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);
		LauncherDb *entry;
		ListCell   *lc;
		bool		listed = (only == NIL);

		if (!db->datallowconn || db->datistemplate)
			continue;
		foreach(lc, only)
		{
			if (strcmp((char *) lfirst(lc), NameStr(db->datname)) == 0)
				listed = true;
		}
		if (!listed)
			continue;

		{
			MemoryContext txnctx = MemoryContextSwitchTo(outer);

			entry = palloc(sizeof(LauncherDb));
			entry->oid = db->oid;
			strlcpy(entry->name, NameStr(db->datname), NAMEDATALEN);
			result = lappend(result, entry);
			MemoryContextSwitchTo(txnctx);
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	MemoryContextSwitchTo(outer);
	return result;
}

/*
 * launcher_start_worker starts the worker (or probe) of one database.
 */
static void
launcher_start_worker(int slotno, LauncherDb *db)
{
	BackgroundWorker bgw;
	MemoryContext old;
	bool		registered;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "eventbox");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "EventboxWorkerMain");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "eventbox worker for database %s", db->name);
	snprintf(bgw.bgw_type, BGW_MAXLEN, "eventbox worker");
	bgw.bgw_main_arg = ObjectIdGetDatum(db->oid);
	bgw.bgw_notify_pid = MyProcPid;

	if (launcher_handles[slotno] != NULL)
	{
		pfree(launcher_handles[slotno]);
		launcher_handles[slotno] = NULL;
	}

	/*
	 * The handle is allocated in the current memory context; it must live
	 * as long as the launcher, not just this pass.
	 */
	old = MemoryContextSwitchTo(TopMemoryContext);
	registered = RegisterDynamicBackgroundWorker(&bgw, &launcher_handles[slotno]);
	MemoryContextSwitchTo(old);
	if (!registered)
		ereport(LOG,
				(errmsg("eventbox: could not start a worker for database \"%s\"", db->name),
				 errhint("Raise max_worker_processes; the launcher tries again.")));
}

/*
 * launcher_pass looks at every database once: forgets slots of databases
 * that are gone and starts workers where one is wanted and none runs.
 */
static void
launcher_pass(void)
{
	List	   *dbs = launcher_databases();
	ListCell   *lc;
	TimestampTz now = GetCurrentTimestamp();
	int			i;

	/* forget databases that no longer exist (or are no longer served) */
	SpinLockAcquire(&EventboxShared->mutex);
	for (i = 0; i < EventboxShared->nslots; i++)
	{
		EventboxDbSlot *slot = &EventboxShared->slots[i];
		bool		present = false;

		if (slot->dboid == InvalidOid || slot->worker_pid != 0)
			continue;
		foreach(lc, dbs)
		{
			if (((LauncherDb *) lfirst(lc))->oid == slot->dboid)
				present = true;
		}
		if (!present)
			slot->dboid = InvalidOid;
	}
	SpinLockRelease(&EventboxShared->mutex);

	foreach(lc, dbs)
	{
		LauncherDb *db = lfirst(lc);
		EventboxDbSlot *slot;
		int			slotno;
		bool		start;
		pid_t		pid;

		SpinLockAcquire(&EventboxShared->mutex);
		slot = EventboxSlot(db->oid, true);
		if (slot == NULL)
		{
			SpinLockRelease(&EventboxShared->mutex);
			ereport(LOG,
					(errmsg("eventbox: no slot left for database \"%s\"", db->name),
					 errhint("Raise eventbox.max_databases.")));
			continue;
		}
		slotno = slot - EventboxShared->slots;
		switch (slot->state)
		{
			case EB_SLOT_UNKNOWN:
			case EB_SLOT_WANTED:
				start = true;
				break;
			case EB_SLOT_ABSENT:
				start = TimestampDifferenceExceeds(slot->probed_at, now,
												   LAUNCHER_REPROBE_MS);
				break;
			default:
				start = false;
				break;
		}
		SpinLockRelease(&EventboxShared->mutex);

		if (!start)
			continue;
		if (launcher_handles[slotno] != NULL &&
			GetBackgroundWorkerPid(launcher_handles[slotno], &pid) != BGWH_STOPPED)
			continue;			/* running or starting */
		launcher_start_worker(slotno, db);
	}
}

/*
 * EventboxLauncherMain is the launcher's main loop: a pass over pg_database
 * whenever it is woken (CREATE EXTENSION, a worker exiting) and every ten
 * seconds otherwise.  SIGTERM ends it; SIGHUP reloads the settings.
 */
void
EventboxLauncherMain(Datum main_arg)
{
	MemoryContext passctx;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	/* first, while the first transactions after a crash are starting */
	EventboxCrashBoundary();

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("eventbox launcher");

	SpinLockAcquire(&EventboxShared->mutex);
	if (EventboxShared->launcher_pid != 0)
	{
		pid_t		other = EventboxShared->launcher_pid;

		SpinLockRelease(&EventboxShared->mutex);
		ereport(LOG, (errmsg("eventbox launcher already running under PID %d", (int) other)));
		proc_exit(0);
	}
	EventboxShared->launcher_pid = MyProcPid;
	EventboxShared->launcher_procno = MyProc->pgprocno;
	SpinLockRelease(&EventboxShared->mutex);
	before_shmem_exit(launcher_detach, 0);

	launcher_handles = MemoryContextAllocZero(TopMemoryContext,
											  sizeof(BackgroundWorkerHandle *) * EventboxShared->nslots);
	passctx = AllocSetContextCreate(TopMemoryContext, "eventbox launcher pass",
									ALLOCSET_DEFAULT_SIZES);
	ereport(LOG, (errmsg("eventbox launcher started")));

	while (!ShutdownRequestPending)
	{
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (eventbox_enabled)
		{
			old = MemoryContextSwitchTo(passctx);
			pgstat_report_activity(STATE_RUNNING, "looking for databases");
			launcher_pass();
			pgstat_report_activity(STATE_IDLE, NULL);
			MemoryContextSwitchTo(old);
			MemoryContextReset(passctx);
		}

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 LAUNCHER_NAPTIME_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	/*
	 * Exit code 1 so that the postmaster starts the launcher again after
	 * bgw_restart_time when it was terminated on its own; at shutdown
	 * nothing is restarted anyway.  (Code 0 would unregister it for good.)
	 */
	proc_exit(1);
}
