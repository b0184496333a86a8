/*-------------------------------------------------------------------------
 *
 * eventbox.h
 *	  Declarations shared by the eventbox extension's C sources.
 *
 * An event is one row of the append-only log; a subscription sees every
 * matching event once; a lane is one independent stream of a subscription
 * with its own cursor; a batch is what one claim took from one lane, leased
 * under one token until a deadline; a delivery is one event of a batch as
 * the consumer sees it.  docs/design.md tells the whole story.
 *
 *-------------------------------------------------------------------------
 */
#ifndef EVENTBOX_H
#define EVENTBOX_H

#include "postgres.h"

#include "access/transam.h"
#include "access/xlogdefs.h"
#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "storage/spin.h"
#include "utils/tuplestore.h"
#include "utils/uuid.h"

/*
 * What the launcher knows of one database.  A slot is WANTED when the
 * database has the extension (it registered itself or a probe found it),
 * ABSENT when a probe found no extension, DROPPING while DROP DATABASE
 * waits for its worker to leave.
 */
typedef enum EventboxSlotState
{
	EB_SLOT_UNKNOWN = 0,
	EB_SLOT_WANTED,
	EB_SLOT_ABSENT,
	EB_SLOT_DROPPING
} EventboxSlotState;

typedef struct EventboxDbSlot
{
	Oid			dboid;			/* InvalidOid: free slot */
	EventboxSlotState state;
	pid_t		worker_pid;		/* 0 if none */
	int			worker_procno;	/* -1 if none */
	TimestampTz probed_at;		/* when the state was last settled */
	TransactionId registering_xid;	/* last CREATE EXTENSION's transaction */
	uint64		writeback_requested;	/* bumped to ask the worker to write
										 * back the cursors it holds */
	uint64		writeback_done; /* the last request it has done */
	TimestampTz lease_bound;	/* no batch committed in this database has
								 * an earlier leased_until (see
								 * EventboxLeaseBound); 0: unknown */
} EventboxDbSlot;

typedef struct EventboxSharedState
{
	slock_t		mutex;			/* protects everything below */
	pid_t		launcher_pid;
	int			launcher_procno;
	int			nslots;
	bool		after_crash;	/* the server did not shut down cleanly
								 * before this start (set at init) */
	TimestampTz started_at;		/* when this shared state was initialized */
	XLogRecPtr	init_checkpoint;	/* the control file's last checkpoint
									 * then */
	FullTransactionId crash_boundary;	/* after_crash: no transaction that
										 * ran before the crash has this or a
										 * later id (see
										 * EventboxCrashBoundary) */
	EventboxDbSlot slots[FLEXIBLE_ARRAY_MEMBER];
} EventboxSharedState;

extern EventboxSharedState *EventboxShared;

/* Settings (eventbox.c) */
extern char *eventbox_subscription;
extern char *eventbox_actor;
extern char *eventbox_correlation_id;
extern char *eventbox_causation_id;
extern int	eventbox_dedupe_window;
extern int	eventbox_max_payload_size;
extern int	eventbox_max_claim_size;
extern bool eventbox_enabled;
extern char *eventbox_databases;
extern int	eventbox_naptime;
extern int	eventbox_cycle_delay;
extern int	eventbox_batch_size;
extern int	eventbox_max_databases;
extern int	eventbox_retention;
extern int	eventbox_rotation_period;

/* Longest event type, in bytes. */
#define EVENTBOX_MAX_TYPE_LEN 255

/* the longest aggregate_id and dedupe_key (bytes): index keys of the log */
#define EVENTBOX_MAX_KEY_LEN 2048

/* the longest lease, backoff, retry delay or extension accepted */
#define EVENTBOX_MAX_INTERVAL_YEARS 100

/* eventbox.c */
extern SPIPlanPtr EventboxPreparePlan(const char *sql, int nargs, Oid *argtypes);
extern void EventboxExecPlan(SPIPlanPtr plan, Datum *values, const char *nulls,
							 int expected, const char *what);
extern void EventboxRandomBytes(void *buf, size_t len);
extern void EventboxCheckInterval(const char *what, const Interval *val, bool allow_zero);
extern void EventboxPushSearchPath(void);
extern void EventboxPopSearchPath(void);
extern int	EventboxIndexPlansBegin(void);
extern void EventboxIndexPlansEnd(int level);

/* shmem.c */
extern void EventboxShmemInit(void);
extern void EventboxNotePublished(void);
extern void EventboxWakeWorker(Oid dboid);
extern void EventboxWakeLauncher(void);
extern EventboxDbSlot *EventboxSlot(Oid dboid, bool create);
extern void EventboxCrashBoundary(void);
extern TimestampTz EventboxLeaseBound(void);
extern void EventboxLowerLeaseBound(TimestampTz t);
extern void EventboxRaiseLeaseBound(void);

/* consume.c */
extern uint64 EventboxSubscriptionsGeneration(void);
extern void EventboxClaimPush(text *name, int n, Tuplestorestate *out, TupleDesc desc);
extern void EventboxWriteHeld(bool release);
extern bool EventboxHeldDirty(void);
extern void EventboxForgetHeld(void);
extern void EventboxCompactCursors(void);

/* deliver.c */
extern TimestampTz EventboxDeliver(int batch, uint64 *forwarded);

/* logscan.c: rows are handed out as id, txid, event_id, event_type,
 * aggregate_type, aggregate_id, payload, headers, occurred_at, deliver_at */
#define EVENTBOX_LOG_NATTS 12	/* columns of the log */
#define EVENTBOX_LOGSCAN_NATTS 10
extern void EventboxCheckLogColumns(Relation rel);
typedef struct EventboxLogScan EventboxLogScan;
typedef bool (*EventboxLogReceive) (void *arg, Datum *values, bool *isnull);
extern EventboxLogScan *EventboxLogScanBegin(bool by_id);
extern void EventboxLogScanRange(EventboxLogScan *ls, uint64 lo_txid, int64 lo_id,
								 uint64 hi_txid, EventboxLogReceive receive, void *arg);
extern void EventboxLogScanIds(EventboxLogScan *ls, int64 lo_id,
							   EventboxLogReceive receive, void *arg);
extern void EventboxLogScanEnd(EventboxLogScan *ls);

/* launcher.c, worker.c */
extern bool EventboxIsWorker;
extern void EventboxRequestWriteBack(void);
extern void EventboxRegisterLauncher(void);
extern PGDLLEXPORT void EventboxLauncherMain(Datum main_arg);
extern PGDLLEXPORT void EventboxWorkerMain(Datum main_arg);
extern void EventboxStopWorker(Oid dboid);
extern void EventboxReleaseDatabase(Oid dboid);
extern void EventboxRegisterDatabase(void);

/* publish.c */
extern void EventboxGenerateUuidV7(pg_uuid_t *uuid);

/* routing.c */
extern PGDLLEXPORT Datum eventbox_type_matches(PG_FUNCTION_ARGS);
extern void EventboxCheckEventType(const char *type, int len);
extern int	EventboxLaneOf(const char *aggregate_type, int atlen,
						   const char *aggregate_id, int aidlen,
						   int64 id, int lanes);
extern int	EventboxLaneOfText(text *aggregate_type, text *aggregate_id, int64 id,
							   int lanes);

#endif							/* EVENTBOX_H */
