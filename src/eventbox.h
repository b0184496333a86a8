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

#include "executor/spi.h"
#include "utils/uuid.h"

/* Settings (eventbox.c) */
extern char *eventbox_subscription;
extern char *eventbox_actor;
extern char *eventbox_correlation_id;
extern char *eventbox_causation_id;
extern int	eventbox_dedupe_window;
extern int	eventbox_max_payload_size;
extern int	eventbox_max_claim_size;

/* Longest event type, in bytes. */
#define EVENTBOX_MAX_TYPE_LEN 255

/* eventbox.c */
extern SPIPlanPtr EventboxPreparePlan(const char *sql, int nargs, Oid *argtypes);
extern void EventboxRandomBytes(void *buf, size_t len);

/* publish.c */
extern void EventboxGenerateUuidV7(pg_uuid_t *uuid);

/* routing.c */
extern void EventboxCheckEventType(const char *type, int len);
extern int	EventboxLaneOf(const char *aggregate_type, int atlen,
						   const char *aggregate_id, int aidlen,
						   int64 id, int lanes);

#endif							/* EVENTBOX_H */
