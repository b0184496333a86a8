/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Shared state between backends, the launcher and the database workers,
 *	  and the commit-time wake-up of a database's worker.
 *
 * The shared state is a small table of database slots.  A slot says that a
 * database has the extension (or was found not to have it), which process
 * serves it, and where to find that process's latch.  A transaction that
 * published sets its database worker's latch when it commits, so delivery
 * does not wait for a polling interval; it never NOTIFYs itself.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>

#include "access/transam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_control.h"
#include "common/controldata_utils.h"
#include "eventbox.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

EventboxSharedState *EventboxShared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* set by publish, read and cleared at the end of the transaction */
static bool shmem_published = false;

static Size
shmem_size(void)
{
	return add_size(offsetof(EventboxSharedState, slots),
					mul_size(sizeof(EventboxDbSlot), eventbox_max_databases));
}

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(shmem_size());
}

/*
 * shmem_after_crash tells whether the WAL of the server's last run may end
 * before what it had written: whether the run did not end with a shutdown
 * checkpoint.  The postmaster asks before the startup process has looked at
 * the control file, at the first start and again when it reinitializes
 * after a crash (the file then still says "in production").  A standby, or
 * a server recovering from an archive, is not counted: what it replays is
 * what another server committed.  Also records the last checkpoint, for
 * EventboxCrashBoundary.
 */
static bool
shmem_after_crash(XLogRecPtr *checkpoint)
{
	ControlFileData *control;
	bool		crc_ok;
	bool		clean;
	struct stat st;

	*checkpoint = InvalidXLogRecPtr;
	if (IsUnderPostmaster)
		return false;			/* EXEC_BACKEND: the postmaster has decided */
	control = get_controlfile(DataDir, &crc_ok);
	clean = crc_ok && (control->state == DB_SHUTDOWNED ||
					   control->state == DB_SHUTDOWNED_IN_RECOVERY);
	if (crc_ok)
		*checkpoint = control->checkPoint;
	pfree(control);
	if (stat(STANDBY_SIGNAL_FILE, &st) == 0 || stat(RECOVERY_SIGNAL_FILE, &st) == 0)
		return false;
	return !clean;
}

/*
 * EventboxCrashBoundary records, after a crash, the first transaction id
 * that the server assigns after its recovery.  The launcher calls it when
 * it starts, before any worker.  Crash recovery ends with a checkpoint
 * taken before any connection is let in, so its next transaction id is
 * that boundary; if the control file shows no checkpoint newer than the
 * one it had at startup, the next id now is used, which can only be later
 * (and then some events of the first transactions after the restart are
 * taken for events from before the crash, see worker_reset_push_once).
 */
void
EventboxCrashBoundary(void)
{
	ControlFileData *control;
	bool		crc_ok;
	FullTransactionId boundary;

	if (EventboxShared == NULL || !EventboxShared->after_crash)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	boundary = EventboxShared->crash_boundary;
	SpinLockRelease(&EventboxShared->mutex);
	if (FullTransactionIdIsValid(boundary))
		return;

	control = get_controlfile(DataDir, &crc_ok);
	if (crc_ok && control->checkPoint > EventboxShared->init_checkpoint)
		boundary = control->checkPointCopy.nextXid;
	else
		boundary = ReadNextFullTransactionId();
	pfree(control);

	SpinLockAcquire(&EventboxShared->mutex);
	if (!FullTransactionIdIsValid(EventboxShared->crash_boundary))
		EventboxShared->crash_boundary = boundary;
	SpinLockRelease(&EventboxShared->mutex);
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	EventboxShared = ShmemInitStruct("eventbox", shmem_size(), &found);
	if (!found)
	{
		memset(EventboxShared, 0, shmem_size());
		SpinLockInit(&EventboxShared->mutex);
		EventboxShared->launcher_procno = -1;
		EventboxShared->nslots = eventbox_max_databases;
		EventboxShared->after_crash =
			shmem_after_crash(&EventboxShared->init_checkpoint);
		EventboxShared->started_at = GetCurrentTimestamp();
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * shmem_xact_callback wakes the database's worker when a transaction that
 * published commits.  Nothing here may raise an error: the transaction is
 * already committed.
 */
static void
shmem_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (shmem_published)
				EventboxWakeWorker(MyDatabaseId);
			shmem_published = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction is found by the worker's timer */
			shmem_published = false;
			break;
		default:
			break;
	}
}

/*
 * EventboxShmemInit installs the shared memory hooks (only while
 * preloading) and the transaction callback (in every backend that loads
 * the library).
 */
void
EventboxShmemInit(void)
{
	if (process_shared_preload_libraries_in_progress)
	{
		prev_shmem_request_hook = shmem_request_hook;
		shmem_request_hook = shmem_request;
		prev_shmem_startup_hook = shmem_startup_hook;
		shmem_startup_hook = shmem_startup;
	}
	RegisterXactCallback(shmem_xact_callback, NULL);
}

/*
 * EventboxNotePublished records that the current transaction published, so
 * that its commit wakes the worker.
 */
void
EventboxNotePublished(void)
{
	shmem_published = true;
}

/*
 * EventboxWakeWorker sets the latch of the worker serving a database, if
 * there is one.  Safe in critical paths: it takes only a spinlock.
 */
void
EventboxWakeWorker(Oid dboid)
{
	int			procno = -1;
	int			i;

	if (EventboxShared == NULL)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	for (i = 0; i < EventboxShared->nslots; i++)
	{
		if (EventboxShared->slots[i].dboid == dboid)
		{
			procno = EventboxShared->slots[i].worker_procno;
			break;
		}
	}
	SpinLockRelease(&EventboxShared->mutex);
	if (procno >= 0)
		SetLatch(&ProcGlobal->allProcs[procno].procLatch);
}

/*
 * EventboxWakeLauncher sets the launcher's latch.
 */
void
EventboxWakeLauncher(void)
{
	int			procno;

	if (EventboxShared == NULL)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	procno = EventboxShared->launcher_procno;
	SpinLockRelease(&EventboxShared->mutex);
	if (procno >= 0)
		SetLatch(&ProcGlobal->allProcs[procno].procLatch);
}

/*
 * EventboxSlot returns the slot of a database, creating it when `create` is
 * set and there is room.  The caller holds the mutex.
 */
EventboxDbSlot *
EventboxSlot(Oid dboid, bool create)
{
	EventboxDbSlot *free_slot = NULL;
	int			i;

	for (i = 0; i < EventboxShared->nslots; i++)
	{
		EventboxDbSlot *slot = &EventboxShared->slots[i];

		if (slot->dboid == dboid)
			return slot;
		if (slot->dboid == InvalidOid && free_slot == NULL)
			free_slot = slot;
	}
	if (!create || free_slot == NULL)
		return NULL;
	memset(free_slot, 0, sizeof(EventboxDbSlot));
	free_slot->dboid = dboid;
	free_slot->worker_procno = -1;
	return free_slot;
}

/*
 * The lease bound of a database: no batch that a committed transaction
 * inserted has a leased_until before it.  Under a long transaction that
 * holds the xmin horizon, every claim and ack leaves a dead batch version
 * behind, and each search for ran-out leases (a claim's, the worker's
 * every 5 ms) walks all of them; with the bound, a search runs only when
 * a lease can have run out.
 *
 * Claims lower the bound with their leases' deadlines when they commit
 * (after the batch became visible).  The worker raises it: it sets the
 * bound to infinity, then (with a snapshot taken after that) expires what
 * ran out and lowers the bound to the earliest leased_until left.  A batch
 * committed before the raise is in the worker's snapshot; one committed
 * after it lowers the bound itself.  A failed worker cycle sets the bound
 * back to 0 (unknown).  extend_lease only moves deadlines later, and
 * deleted batches only make the bound early: both keep it a lower bound.
 */
TimestampTz
EventboxLeaseBound(void)
{
	EventboxDbSlot *slot;
	TimestampTz bound = 0;

	if (EventboxShared == NULL)
		return 0;
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(MyDatabaseId, false);
	if (slot != NULL)
		bound = slot->lease_bound;
	SpinLockRelease(&EventboxShared->mutex);
	return bound;
}

static void
lease_bound_set(TimestampTz t, bool only_lower)
{
	EventboxDbSlot *slot;

	if (EventboxShared == NULL)
		return;
	SpinLockAcquire(&EventboxShared->mutex);
	slot = EventboxSlot(MyDatabaseId, false);
	if (slot != NULL && (!only_lower || t < slot->lease_bound))
		slot->lease_bound = t;
	SpinLockRelease(&EventboxShared->mutex);
}

void
EventboxLowerLeaseBound(TimestampTz t)
{
	lease_bound_set(t, true);
}

void
EventboxRaiseLeaseBound(void)
{
	lease_bound_set(DT_NOEND, false);
}
