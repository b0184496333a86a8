/*-------------------------------------------------------------------------
 *
 * routing.c
 *	  Which events go where: event type rules, subscription patterns and
 *	  the lanes of ordered subscriptions.
 *
 * An event type is 1 to 255 bytes of letters, digits, "_", ".", ":" and
 * "-", made of non-empty dot-separated tokens, so that it can also be a
 * NATS subject token sequence.  A pattern is an event type that may contain
 * "*" (any run of characters) and "?" (one character).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "eventbox.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(eventbox_lane);
PG_FUNCTION_INFO_V1(eventbox_glob_regex);

static inline bool
routing_is_type_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		(c >= '0' && c <= '9') || c == '_' || c == '.' || c == ':' || c == '-';
}

/*
 * routing_misplaced_dot: whether s[i] is a dot where an event type may not
 * have one (first, last, or right after another dot)
 */
static bool
routing_misplaced_dot(const char *s, int len, int i)
{
	return s[i] == '.' && (i == 0 || i == len - 1 || s[i - 1] == '.');
}

/*
 * EventboxCheckEventType raises an error unless type (len bytes) is a valid
 * event type.
 */
void
EventboxCheckEventType(const char *type, int len)
{
	int			i;

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event_type must not be empty")));
	if (len > EVENTBOX_MAX_TYPE_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event_type is too long"),
				 errdetail("An event type has at most %d bytes, this one has %d.",
						   EVENTBOX_MAX_TYPE_LEN, len)));
	for (i = 0; i < len; i++)
	{
		if (!routing_is_type_char(type[i]))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid event_type \"%.*s\"", len, type),
					 errdetail("An event type may only contain letters, digits, \"_\", \".\", \":\" and \"-\".")));
		if (routing_misplaced_dot(type, len, i))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid event_type \"%.*s\"", len, type),
					 errdetail("An event type must not start or end with \".\" or contain \"..\".")));
	}
}

/*
 * EventboxLaneOf returns the lane (0 .. lanes-1) of an event: a hash of its
 * aggregate, so that all events of one aggregate share a lane, or of its id
 * when it has no aggregate.
 */
int
EventboxLaneOf(const char *aggregate_type, int atlen,
			   const char *aggregate_id, int aidlen, int64 id, int lanes)
{
	uint32		h;

	if (lanes <= 1)
		return 0;
	if (aggregate_id != NULL)
	{
		h = hash_bytes((const unsigned char *) aggregate_type, atlen);
		h = hash_combine(h, hash_bytes((const unsigned char *) aggregate_id, aidlen));
	}
	else
		h = hash_bytes_uint32((uint32) id ^ (uint32) (id >> 32));
	return (int) (h % (uint32) lanes);
}

/*
 * eventbox._lane(aggregate_type, aggregate_id, id, lanes): SQL access to
 * EventboxLaneOf, used by the management functions and views.
 */
Datum
eventbox_lane(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(EventboxLaneOfText(PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0),
									   PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1),
									   PG_GETARG_INT64(2), PG_GETARG_INT32(3)));
}

/*
 * EventboxLaneOfText is EventboxLaneOf for an event's aggregate columns as
 * text values; NULL for either (an event without an aggregate) means the
 * lane of its id.
 */
int
EventboxLaneOfText(text *aggregate_type, text *aggregate_id, int64 id, int lanes)
{
	if (aggregate_type == NULL || aggregate_id == NULL)
		return EventboxLaneOf(NULL, 0, NULL, 0, id, lanes);
	return EventboxLaneOf(VARDATA_ANY(aggregate_type), VARSIZE_ANY_EXHDR(aggregate_type),
						  VARDATA_ANY(aggregate_id), VARSIZE_ANY_EXHDR(aggregate_id),
						  id, lanes);
}

/*
 * eventbox._glob_regex(patterns text[]) checks a subscription's event type
 * patterns and returns one anchored regular expression matching any of
 * them, or NULL when a pattern is "*" (every type matches).
 */
Datum
eventbox_glob_regex(PG_FUNCTION_ARGS)
{
	ArrayType  *arr;
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	int			i;
	StringInfoData re;
	text	   *result;
	MemoryContext ctx = CurrentMemoryContext;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("event_types must not be null")));
	arr = PG_GETARG_ARRAYTYPE_P(0);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("event_types must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &nelems);

	initStringInfo(&re);
	appendStringInfoString(&re, "^(?:");
	for (i = 0; i < nelems; i++)
	{
		text	   *t;
		const char *p;
		int			len;
		int			j;

		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("event_types must not contain nulls")));
		t = DatumGetTextPP(elems[i]);
		p = VARDATA_ANY(t);
		len = VARSIZE_ANY_EXHDR(t);
		if (len == 0 || len > EVENTBOX_MAX_TYPE_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid event type pattern \"%.*s\"", len, p),
					 errdetail("A pattern has 1 to %d bytes.", EVENTBOX_MAX_TYPE_LEN)));
		if (len == 1 && p[0] == '*')
			PG_RETURN_NULL();

		if (i > 0)
			appendStringInfoChar(&re, '|');
		for (j = 0; j < len; j++)
		{
			char		c = p[j];

			if (c == '*')
				appendStringInfoString(&re, ".*");
			else if (c == '?')
				appendStringInfoChar(&re, '.');
			else if (c == '.')
			{
				/* a literal dot where event types never have one */
				if (routing_misplaced_dot(p, len, j))
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("invalid event type pattern \"%.*s\"", len, p),
							 errdetail("No event type starts or ends with a dot or has two dots in a row, so the pattern could never match.")));
				appendStringInfoString(&re, "\\.");
			}
			else if (routing_is_type_char(c))
				appendStringInfoChar(&re, c);
			else
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid event type pattern \"%.*s\"", len, p),
						 errdetail("A pattern may only contain letters, digits, \"_\", \".\", \":\", \"-\" and the wildcards \"*\" and \"?\".")));
		}
	}
	appendStringInfoString(&re, ")$");
	result = cstring_to_text_with_len(re.data, re.len);

	/*
	 * Compile it now, as the claims and the worker will: a pattern list the
	 * regular expression engine cannot take (tens of thousands of
	 * patterns) would otherwise be accepted here and then fail every claim
	 * of the subscription, the stats view and every cycle of the worker.
	 */
	PG_TRY();
	{
		(void) DirectFunctionCall2Coll(textregexeq, DEFAULT_COLLATION_OID,
									   PointerGetDatum(cstring_to_text("")),
									   PointerGetDatum(result));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(ctx);
		edata = CopyErrorData();
		/* a cancel, a timeout or out of memory stays what it is */
		if (edata->sqlerrcode != ERRCODE_INVALID_REGULAR_EXPRESSION)
			PG_RE_THROW();
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("event_types has too many patterns to match together"),
				 errdetail("The regular expression built from %d patterns could not be compiled: %s.",
						   nelems, edata->message),
				 errhint("Use fewer patterns, with wildcards that cover several event types.")));
	}
	PG_END_TRY();
	PG_RETURN_TEXT_P(result);
}

/*
 * eventbox._type_matches(event_type text, type_regex text) is
 * "event_type ~ type_regex" for the window scans of claims and of the
 * worker, which test every event they read against the subscription's
 * pattern.  A subscription's events have few distinct types, so the
 * answer for each of the last TYPE_MEMO types is kept (per call site, for
 * one pattern) and the regular expression runs only for a type not among
 * them.  The regular expression ran for every row before, about a quarter
 * of a claim's time.
 */
#define TYPE_MEMO 16

typedef struct TypeMemo
{
	text	   *regex;			/* the pattern the answers are for, or NULL */
	int			n;				/* entries in use */
	int			next;			/* the entry to replace when full */
	struct
	{
		int			len;
		bool		match;
		char		type[EVENTBOX_MAX_TYPE_LEN];
	}			e[TYPE_MEMO];
} TypeMemo;

PG_FUNCTION_INFO_V1(eventbox_type_matches);

Datum
eventbox_type_matches(PG_FUNCTION_ARGS)
{
	text	   *type = PG_GETARG_TEXT_PP(0);
	text	   *regex = PG_GETARG_TEXT_PP(1);
	TypeMemo   *memo = (TypeMemo *) fcinfo->flinfo->fn_extra;
	const char *t = VARDATA_ANY(type);
	int			tlen = VARSIZE_ANY_EXHDR(type);
	bool		match;
	int			i;

	if (memo == NULL)
	{
		memo = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(TypeMemo));
		fcinfo->flinfo->fn_extra = memo;
	}
	if (memo->regex == NULL ||
		VARSIZE_ANY_EXHDR(memo->regex) != VARSIZE_ANY_EXHDR(regex) ||
		memcmp(VARDATA_ANY(memo->regex), VARDATA_ANY(regex),
			   VARSIZE_ANY_EXHDR(regex)) != 0)
	{
		if (memo->regex != NULL)
			pfree(memo->regex);
		memo->regex = (text *) MemoryContextAlloc(fcinfo->flinfo->fn_mcxt,
												  VARSIZE_ANY(regex));
		memcpy(memo->regex, regex, VARSIZE_ANY(regex));
		memo->n = 0;
		memo->next = 0;
	}

	for (i = 0; i < memo->n; i++)
		if (memo->e[i].len == tlen && memcmp(memo->e[i].type, t, tlen) == 0)
			PG_RETURN_BOOL(memo->e[i].match);

	match = DatumGetBool(DirectFunctionCall2Coll(textregexeq, PG_GET_COLLATION(),
												 PointerGetDatum(type),
												 PointerGetDatum(regex)));
	/* types longer than the limit cannot be in the log; do not keep them */
	if (tlen <= EVENTBOX_MAX_TYPE_LEN)
	{
		i = memo->n < TYPE_MEMO ? memo->n++ : memo->next;
		memo->next = (i + 1) % TYPE_MEMO;
		memo->e[i].len = tlen;
		memo->e[i].match = match;
		memcpy(memo->e[i].type, t, tlen);
	}
	PG_RETURN_BOOL(match);
}
