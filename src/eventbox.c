/*-------------------------------------------------------------------------
 *
 * eventbox.c
 *	  Module initialization and settings of the eventbox extension.
 *
 * _PG_init only defines the settings; the SQL-callable functions live in
 * publish.c (producers), consume.c (consumers) and routing.c (event type
 * patterns and lanes).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "eventbox.h"
#include "fmgr.h"
#include "port.h"
#include "utils/guc.h"
#include "utils/memutils.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *eventbox_subscription = NULL;
char	   *eventbox_actor = NULL;
char	   *eventbox_correlation_id = NULL;
char	   *eventbox_causation_id = NULL;
int			eventbox_dedupe_window = 86400;
int			eventbox_max_payload_size = 1024 * 1024;
int			eventbox_max_claim_size = 10000;

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
							NULL,
							&eventbox_dedupe_window,
							86400,
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

	MarkGUCPrefixReserved("eventbox");
}

/*
 * EventboxPreparePlan prepares a statement for SPI and keeps it for the
 * life of the backend.  Callers cache the result in a static variable; the
 * plan cache replans it when the tables it uses change (for example after
 * DROP and CREATE EXTENSION).
 */
SPIPlanPtr
EventboxPreparePlan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "eventbox: SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "eventbox: SPI_keepplan failed");
	return plan;
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
