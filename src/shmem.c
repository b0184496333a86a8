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

#include "access/xact.h"
#include "eventbox.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"

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
