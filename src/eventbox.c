/*-------------------------------------------------------------------------
 *
 * eventbox.c
 *	  Module initialization and settings of the eventbox extension.
 *
 * _PG_init defines the settings, installs the hooks and, while preloading,
 * registers the launcher.  The SQL-callable functions live in publish.c
 * (producers), consume.c (consumers) and routing.c (event type patterns and
 * lanes); the background processes in launcher.c and worker.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "catalog/namespace.h"
#include "catalog/pg_namespace_d.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "commands/trigger.h"
#include "eventbox.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "port.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

PG_FUNCTION_INFO_V1(eventbox_register);
PG_FUNCTION_INFO_V1(table_changed);
PG_FUNCTION_INFO_V1(check_interval);

static ProcessUtility_hook_type prev_process_utility = NULL;

char	   *eventbox_subscription = NULL;
char	   *eventbox_actor = NULL;
char	   *eventbox_correlation_id = NULL;
char	   *eventbox_causation_id = NULL;
int			eventbox_dedupe_window = 3600;
int			eventbox_max_payload_size = 1024 * 1024;
int			eventbox_max_claim_size = 10000;
bool		eventbox_enabled = true;
char	   *eventbox_databases = NULL;
int			eventbox_naptime = 1000;
int			eventbox_cycle_delay = 500;
int			eventbox_batch_size = 1000;
int			eventbox_max_databases = 64;
int			eventbox_retention = 3600;
int			eventbox_rotation_period = 60;

static void eventbox_process_utility(PlannedStmt *pstmt, const char *queryString,
									 bool readOnlyTree, ProcessUtilityContext context,
									 ParamListInfo params, QueryEnvironment *queryEnv,
									 DestReceiver *dest, QueryCompletion *qc);

/*
 * _PG_init defines the eventbox.* settings.  It runs when the library is
 * preloaded or, without preloading, on the first call of any C function of
 * the extension; values set earlier in the session are kept.
 */
void
_PG_init(void)
{
	DefineCustomStringVariable("eventbox.subscription",
							   "Sets the subscription that claim_batch, ack and nack use when none is given.",
							   NULL,
							   &eventbox_subscription,
							   NULL,
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("eventbox.actor",
							   "Sets the actor recorded in the headers of events published in this session.",
							   "Typically set with SET LOCAL by the application for each request.",
							   &eventbox_actor,
							   NULL,
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("eventbox.correlation_id",
							   "Sets the correlation id recorded in the headers of events published in this session.",
							   NULL,
							   &eventbox_correlation_id,
							   NULL,
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("eventbox.causation_id",
							   "Sets the causation id recorded in the headers of events published in this session.",
							   NULL,
							   &eventbox_causation_id,
							   NULL,
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.dedupe_window",
							"Sets how long a dedupe_key suppresses a second publish with the same key.",
							"Only events still in the log are found, so keep it within eventbox.retention.",
							&eventbox_dedupe_window,
							3600,
							0,
							INT_MAX,
							PGC_USERSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.max_payload_size",
							"Sets the largest payload publish accepts.",
							"The default, 1MB, is NATS's default message limit.",
							&eventbox_max_payload_size,
							1024 * 1024,
							1,
							MaxAllocSize / 2,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.max_claim_size",
							"Sets the most events one claim_batch call may ask for.",
							NULL,
							&eventbox_max_claim_size,
							10000,
							1,
							1000000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("eventbox.enabled",
							 "Enables the background worker.",
							 "When off, the launcher starts no workers and running workers exit; the SQL API keeps working.",
							 &eventbox_enabled,
							 true,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	DefineCustomStringVariable("eventbox.databases",
							   "Sets the databases the background worker serves.",
							   "A comma-separated list of database names; empty means every database where the extension is installed.",
							   &eventbox_databases,
							   "",
							   PGC_SIGHUP,
							   GUC_LIST_INPUT,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.naptime",
							"Sets the longest time a database worker sleeps between cycles.",
							"Workers are woken at once by committing publishers and by due retries; this is the fallback.",
							&eventbox_naptime,
							1000,
							10,
							3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.cycle_delay",
							"Sets the shortest time between the starts of two delivery cycles while events arrive faster than one per this time, in microseconds.",
							"The commits that arrive in the meantime are forwarded together, which costs the worker far less CPU under a fast stream of small commits; the time grows with the rate, up to four times this setting. Slower streams are forwarded at once. 0 turns pacing off.",
							&eventbox_cycle_delay,
							500,
							0,
							100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.batch_size",
							"Sets how many events a worker cycle forwards per push subscription.",
							NULL,
							&eventbox_batch_size,
							1000,
							1,
							100000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.retention",
							"Sets how long consumed events stay in the log.",
							"A log partition is reclaimed only when all subscriptions have consumed it and its newest event is older than this; eventbox.event() and eventbox.timeline() see events this long.",
							&eventbox_retention,
							3600,
							0,
							INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("eventbox.rotation_period",
							"Sets how long publishers write to one log partition before the worker moves them to the next.",
							NULL,
							&eventbox_rotation_period,
							60,
							1,
							INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	/*
	 * A PGC_POSTMASTER setting can only be defined while preloading; a
	 * backend that loads the library later (no shared_preload_libraries)
	 * has no worker and needs none.
	 */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomIntVariable("eventbox.max_databases",
								"Sets how many databases the background worker can serve.",
								NULL,
								&eventbox_max_databases,
								64,
								1,
								10000,
								PGC_POSTMASTER,
								0,
								NULL, NULL, NULL);

	MarkGUCPrefixReserved("eventbox");

	EventboxShmemInit();
	if (process_shared_preload_libraries_in_progress)
		EventboxRegisterLauncher();

	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = eventbox_process_utility;
}

/*
 * eventbox_utility_target returns the database that a utility statement
 * needs to itself (DROP DATABASE, ALTER DATABASE ... RENAME or SET
 * TABLESPACE, CREATE DATABASE ... TEMPLATE), or InvalidOid.
 */
static Oid
eventbox_utility_target(Node *parsetree)
{
	ListCell   *lc;

	if (IsA(parsetree, DropdbStmt))
		return get_database_oid(((DropdbStmt *) parsetree)->dbname, true);
	if (IsA(parsetree, RenameStmt) &&
		((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
		return get_database_oid(((RenameStmt *) parsetree)->subname, true);
	if (IsA(parsetree, CreatedbStmt))
	{
		foreach(lc, ((CreatedbStmt *) parsetree)->options)
		{
			DefElem    *def = lfirst(lc);

			if (strcmp(def->defname, "template") == 0 && def->arg != NULL)
				return get_database_oid(defGetString(def), true);
		}
	}
	if (IsA(parsetree, AlterDatabaseStmt))
	{
		foreach(lc, ((AlterDatabaseStmt *) parsetree)->options)
		{
			DefElem    *def = lfirst(lc);

			if (strcmp(def->defname, "tablespace") == 0)
				return get_database_oid(((AlterDatabaseStmt *) parsetree)->dbname, true);
		}
	}
	return InvalidOid;
}

/*
 * eventbox_process_utility makes a database's worker leave while a command
 * that needs the database to itself runs, so that DROP DATABASE works
 * without FORCE, and lets it come back afterwards.
 */
static void
eventbox_process_utility(PlannedStmt *pstmt, const char *queryString,
						 bool readOnlyTree, ProcessUtilityContext context,
						 ParamListInfo params, QueryEnvironment *queryEnv,
						 DestReceiver *dest, QueryCompletion *qc)
{
	volatile Oid target = InvalidOid;

	if (EventboxShared != NULL)
		target = eventbox_utility_target(pstmt->utilityStmt);
	if (OidIsValid(target) && target != MyDatabaseId)
		EventboxStopWorker(target);

	PG_TRY();
	{
		if (prev_process_utility)
			prev_process_utility(pstmt, queryString, readOnlyTree, context,
								 params, queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
									params, queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		if (OidIsValid(target) && target != MyDatabaseId)
			EventboxReleaseDatabase(target);
	}
	PG_END_TRY();
}

/*
 * eventbox._table_changed(): the statement trigger on the tables whose
 * contents backends keep in memory (eventbox.subscriptions: consume.c and
 * deliver.c; eventbox.rotation: publish.c).  It sends a relcache
 * invalidation of the table, which PostgreSQL delivers to every backend at
 * the changing transaction's commit; their relcache callbacks then drop
 * what they kept, and the next use reads the table again.
 */
Datum
table_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "eventbox: _table_changed must be called as a trigger");
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}

/*
 * eventbox._register() tells the launcher that this database has the
 * extension; the install script calls it so that CREATE EXTENSION gets a
 * worker without a restart.  A no-op without shared_preload_libraries.
 */
Datum
eventbox_register(PG_FUNCTION_ARGS)
{
	EventboxRegisterDatabase();
	PG_RETURN_BOOL(EventboxShared != NULL);
}

/*
 * EventboxPreparePlan prepares a statement for SPI and keeps it for the
 * life of the backend.  Callers cache the result in a static variable; the
 * plan cache replans it when the tables it uses change (for example after
 * DROP and CREATE EXTENSION).
 *
 * The plan is generic: planned once, not again for each set of parameter
 * values.  Our statements are written for that (no parameter decides which
 * index fits), and custom plans over the partitioned log cost more to make
 * than to run: the plan cache's cost comparison kept choosing them, and a
 * claim spent most of its time in the planner.
 */
SPIPlanPtr
EventboxPreparePlan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

	if (plan == NULL)
		elog(ERROR, "eventbox: SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "eventbox: SPI_keepplan failed");
	return plan;
}

/*
 * EventboxExecPlan runs a kept plan and checks its result code; `what`
 * names the statement in the error message.
 */
void
EventboxExecPlan(SPIPlanPtr plan, Datum *values, const char *nulls,
				 int expected, const char *what)
{
	int			rc = SPI_execute_plan(plan, values, nulls, false, 0);

	if (rc != expected)
		elog(ERROR, "eventbox: %s failed: %s", what, SPI_result_code_string(rc));
}

/*
 * EventboxPushSearchPath makes name lookup see pg_catalog only, until
 * EventboxPopSearchPath (or the end of the (sub)transaction, on error).
 *
 * The SECURITY DEFINER C functions on hot paths (publish, publish_batch,
 * claim_batch, ack) pin their search path this way instead of with a SET
 * clause: a SET clause costs a configuration push and pop per call and
 * makes every cached plan recheck its search path, about a fifth of a
 * publish.  The effect is the same or stricter: their statements are
 * parsed with pg_catalog alone (no temporary schema at all), and the plan
 * cache sees the same path on every call, so plans stay valid.
 */
void
EventboxPushSearchPath(void)
{
	OverrideSearchPath path;

	path.schemas = list_make1_oid(PG_CATALOG_NAMESPACE);
	path.addCatalog = false;
	path.addTemp = false;
	path.generation = 0;
	PushOverrideSearchPath(&path);
	list_free(path.schemas);
}

void
EventboxPopSearchPath(void)
{
	PopOverrideSearchPath();
}

/*
 * EventboxIndexPlansBegin keeps the planner from reading tables by
 * sequential or bitmap scans in the plans made until EventboxIndexPlansEnd
 * (or the end of the (sub)transaction, on error), and returns what to pass
 * to EventboxIndexPlansEnd.
 *
 * The statements of claims and acks are cached plans, made once and kept
 * until an invalidation.  Right after rotation truncated a partition of
 * the log, after a fresh install, or after a VACUUM ANALYZE of an empty
 * log, the statistics say the log is empty, and a plan made then reads
 * the whole current partition by a sequential scan and a sort on every
 * claim, until autovacuum analyzes the partition about a minute later:
 * at 500 events/s a polling consumer's latency grew to 160 ms (p50) over
 * that minute.  Every statement of these paths has an index that fits it,
 * whatever the tables hold, so the plan through it is always the right
 * one.  The worker sets the same for all its statements (worker.c).
 */
int
EventboxIndexPlansBegin(void)
{
	int			level = NewGUCNestLevel();

	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("enable_bitmapscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return level;
}

void
EventboxIndexPlansEnd(int level)
{
	AtEOXact_GUC(true, level);
}

/*
 * EventboxRandomBytes fills buf with strong random bytes, drawing from a
 * small per-backend pool so that publishing an event costs no system call
 * most of the time.
 */
void
EventboxRandomBytes(void *buf, size_t len)
{
	static uint8 pool[512];
	static size_t avail = 0;
	uint8	   *out = buf;

	while (len > 0)
	{
		size_t		n;

		if (avail == 0)
		{
			if (!pg_strong_random(pool, sizeof(pool)))
				ereport(ERROR,
						(errcode(ERRCODE_INTERNAL_ERROR),
						 errmsg("could not generate random values")));
			avail = sizeof(pool);
		}
		n = Min(len, avail);
		memcpy(out, pool + sizeof(pool) - avail, n);
		avail -= n;
		out += n;
		len -= n;
	}
}

/* interval_text: val as interval_out writes it, for error messages */
static char *
interval_text(const Interval *val)
{
	return DatumGetCString(DirectFunctionCall1(interval_out, IntervalPGetDatum(val)));
}

/*
 * EventboxCheckInterval raises the error for an interval argument (lease,
 * backoff, retry_in, ...) that is NULL, negative in any of its parts, zero
 * when allow_zero is false, or longer than EVENTBOX_MAX_INTERVAL_YEARS.
 *
 * A part is checked on its own because months and days have no fixed
 * length: '-2 months 60 days 1 second' compares as positive (months count
 * 30 days) and yet ends before it starts when added to a timestamp in
 * December.  The upper limit keeps the deadlines computed from the
 * interval (now + lease, now + backoff) inside the timestamp range; past
 * it they raised "timestamp out of range" at claim time and in every cycle
 * of the worker, long after the value was accepted.
 */
void
EventboxCheckInterval(const char *what, const Interval *val, bool allow_zero)
{
	double		days;
	bool		negative_part;

	if (val == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", what)));
	negative_part = val->month < 0 || val->day < 0 || val->time < 0;
	if (negative_part ||
		(!allow_zero && val->month == 0 && val->day == 0 && val->time == 0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be %s, got %s", what,
						allow_zero ? "zero or positive" : "positive", interval_text(val)),
				 negative_part && (val->month > 0 || val->day > 0 || val->time > 0) ?
				 errdetail("None of its months, days and time may be negative.") : 0));
	/* as interval comparison reckons: a month is 30 days, a year 360 */
	days = val->month * (double) DAYS_PER_MONTH + val->day +
		val->time / (double) USECS_PER_DAY;
	if (days > EVENTBOX_MAX_INTERVAL_YEARS * MONTHS_PER_YEAR * DAYS_PER_MONTH)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be at most %d years, got %s", what,
						EVENTBOX_MAX_INTERVAL_YEARS, interval_text(val))));
}

/*
 * eventbox._check_interval(what text, val interval, allow_zero boolean):
 * EventboxCheckInterval for the SQL functions.
 */
Datum
check_interval(PG_FUNCTION_ARGS)
{
	char	   *what = PG_ARGISNULL(0) ? "interval" : text_to_cstring(PG_GETARG_TEXT_PP(0));

	EventboxCheckInterval(what, PG_ARGISNULL(1) ? NULL : PG_GETARG_INTERVAL_P(1),
						  !PG_ARGISNULL(2) && PG_GETARG_BOOL(2));
	PG_RETURN_VOID();
}
