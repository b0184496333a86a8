/*-------------------------------------------------------------------------
 *
 * deadletters.c
 *		eventbox dead-letters list|show|replay|purge.
 *
 * replay and purge work in chunks, each chunk one transaction (one
 * statement), and report progress on stderr.  SIGINT is only looked at
 * between chunks: an interrupted run has committed whole chunks and left
 * the rest untouched, so rerunning it finishes the job.
 *
 *-------------------------------------------------------------------------
 */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

#define MAX_IDS 1000

typedef struct DlOptions
{
	const char *action;
	const char *sub;
	const char *type_like;		/* --type converted to a LIKE pattern */
	const char *type_glob;
	const char *older_than;
	long		limit;
	long		chunk;
	bool		json;
	bool		all;
	bool		quiet;
	const char *ids[MAX_IDS];
	int			nids;
} DlOptions;

static void
dl_usage(void)
{
	printf("eventbox dead-letters lists, shows, replays and purges dead letters: events\n"
		   "that used up a subscription's max_attempts.\n"
		   "\n"
		   "Usage:\n"
		   "  eventbox dead-letters list   [-s SUB] [-t GLOB] [--older-than AGE] [--limit N] [--json]\n"
		   "  eventbox dead-letters show   ID [-s SUB] [--json]\n"
		   "  eventbox dead-letters replay -s SUB [-t GLOB] [--older-than AGE] [--id ID]... [--chunk N]\n"
		   "  eventbox dead-letters purge  -s SUB (--older-than AGE | --all) [--chunk N]\n"
		   "\n"
		   "Options:\n"
		   "  -s, --subscription=NAME   only dead letters of this subscription\n"
		   "                            (required for replay and purge)\n"
		   "  -t, --type=GLOB           only event types matching GLOB (* and ?)\n"
		   "      --older-than=AGE      only dead for longer than AGE, a PostgreSQL interval\n"
		   "                            (\"90 seconds\", \"2 hours\", \"7 days\")\n"
		   "      --limit=N             list at most N (default 100)\n"
		   "      --id=ID               replay only these event ids (repeatable)\n"
		   "      --chunk=N             replay/purge N dead letters per transaction (default 1000)\n"
		   "      --all                 purge: every dead letter of the subscription\n"
		   "  -q, --quiet               no progress on stderr\n"
		   "      --json                list/show: one JSON object per dead letter\n"
		   "  -d, -h, -p, -U            connection options (see eventbox --help)\n"
		   "      --help                show this help\n"
		   "\n"
		   "replay and purge commit chunk by chunk and print progress on stderr; Ctrl-C\n"
		   "stops after the current chunk (exit 130) and a rerun continues. list needs the\n"
		   "role eventbox_reader, show/replay/purge eventbox_admin.\n"
		   "\n"
		   "Exit codes: 0 ok, 1 error (also: show of an id that is not a dead letter),\n"
		   "2 bad usage, 3 could not connect, 130 interrupted.\n");
}

/*
 * glob_to_like turns an event type pattern (* any run, ? one character) into
 * a LIKE pattern with backslash escapes.
 */
static char *
glob_to_like(const char *glob)
{
	char	   *out = malloc(strlen(glob) * 2 + 1);
	char	   *o = out;

	for (; *glob; glob++)
	{
		if (*glob == '*')
			*o++ = '%';
		else if (*glob == '?')
			*o++ = '_';
		else
		{
			if (*glob == '%' || *glob == '_' || *glob == '\\')
				*o++ = '\\';
			*o++ = *glob;
		}
	}
	*o = '\0';
	return out;
}

/* The filter shared by list, replay and the count before replay. */
#define DL_FILTER \
	" ($1::text IS NULL OR d.subscription = $1)" \
	" AND ($2::text IS NULL OR d.event_type LIKE $2)" \
	" AND ($3::interval IS NULL OR d.dead_at < pg_catalog.now() - $3::interval)"

static int
dl_list(PGconn *pg, DlOptions *o)
{
	char		limit[32];
	const char *params[4] = {o->sub, o->type_like, o->older_than, limit};
	PGresult   *res;
	int			i;

	snprintf(limit, sizeof(limit), "%ld", o->limit);
	res = cli_exec(pg, "reading eventbox.dead_letters",
				   "SELECT d.subscription, d.id, d.event_type,"
				   "       COALESCE(d.aggregate_type || ':' || d.aggregate_id, '-'),"
				   "       d.attempts, pg_catalog.date_trunc('second', d.dead_at),"
				   "       COALESCE(d.last_error, ''), pg_catalog.row_to_json(d)::text"
				   "  FROM eventbox.dead_letters d WHERE" DL_FILTER
				   " ORDER BY d.subscription, d.id LIMIT $4::bigint",
				   4, params);
	if (o->json)
	{
		for (i = 0; i < PQntuples(res); i++)
			printf("%s\n", PQgetvalue(res, i, 7));
	}
	else
	{
		printf("%-16s %10s %-24s %-20s %8s %-22s %s\n", "SUBSCRIPTION", "ID",
			   "EVENT_TYPE", "AGGREGATE", "ATTEMPTS", "DEAD_AT", "LAST_ERROR");
		for (i = 0; i < PQntuples(res); i++)
		{
			char		err[81];
			char	   *nl;

			/* one line per dead letter: first line of the error, cut */
			snprintf(err, sizeof(err), "%s", PQgetvalue(res, i, 6));
			if ((nl = strchr(err, '\n')) != NULL)
				*nl = '\0';
			printf("%-16s %10s %-24s %-20s %8s %-22s %s\n", PQgetvalue(res, i, 0),
				   PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3),
				   PQgetvalue(res, i, 4), PQgetvalue(res, i, 5), err);
		}
		printf("(%d dead letter%s%s)\n", PQntuples(res), PQntuples(res) == 1 ? "" : "s",
			   PQntuples(res) == o->limit ? "; more may exist, raise --limit" : "");
	}
	PQclear(res);
	return EXIT_OK;
}

static int
dl_show(PGconn *pg, DlOptions *o, const char *id)
{
	const char *params[2] = {id, o->sub};
	PGresult   *res;
	int			i;
	int			j;

	res = cli_exec(pg, "reading eventbox.dead_letter_events",
				   "SELECT d.subscription, d.id, d.event_id, d.event_type, d.aggregate_type,"
				   "       d.aggregate_id, d.occurred_at, d.attempts, d.dead_at, d.last_error,"
				   "       d.headers, d.payload, pg_catalog.row_to_json(d)::text"
				   "  FROM eventbox.dead_letter_events d"
				   " WHERE d.id = $1::bigint AND ($2::text IS NULL OR d.subscription = $2)"
				   " ORDER BY d.subscription",
				   2, params);
	if (PQntuples(res) == 0)
	{
		fprintf(stderr, "%s: error: event %s is not a dead letter%s%s%s\n"
				"Hint: eventbox dead-letters list shows the dead letters and their ids.\n",
				progname, id, o->sub ? " of subscription \"" : "", o->sub ? o->sub : "",
				o->sub ? "\"" : "");
		PQclear(res);
		return EXIT_ERROR;
	}
	for (i = 0; i < PQntuples(res); i++)
	{
		if (o->json)
		{
			printf("%s\n", PQgetvalue(res, i, 12));
			continue;
		}
		if (i > 0)
			putchar('\n');
		for (j = 0; j < 12; j++)
			printf("%-15s %s\n", PQfname(res, j),
				   PQgetisnull(res, i, j) ? "" : PQgetvalue(res, i, j));
	}
	PQclear(res);
	return EXIT_OK;
}

static void
progress(const DlOptions *o, const char *verb, long done, long total)
{
	if (!o->quiet)
		fprintf(stderr, "%s: %s %ld of %ld dead letters\n", progname, verb, done, total);
}

static int
interrupted(const DlOptions *o, const char *verb, long done, long total)
{
	fprintf(stderr, "%s: interrupted: %s %ld of %ld dead letters; every chunk done so far "
			"is committed and the rest are untouched.\n"
			"Hint: rerun the same command to continue.\n", progname, verb, done, total);
	(void) o;
	return EXIT_INTERRUPT;
}

static int
dl_replay(PGconn *pg, DlOptions *o)
{
	const char *params[5];
	char		after[32] = "0";
	char		chunk[32];
	long		total;
	long		done = 0;
	PGresult   *res;

	if (o->nids > 0)
	{
		/* an explicit id list: one transaction */
		char	   *arr;
		size_t		len = 3;
		int			i;

		for (i = 0; i < o->nids; i++)
			len += strlen(o->ids[i]) + 1;
		arr = malloc(len);
		strcpy(arr, "{");
		for (i = 0; i < o->nids; i++)
		{
			if (i)
				strcat(arr, ",");
			strcat(arr, o->ids[i]);
		}
		strcat(arr, "}");
		params[0] = o->sub;
		params[1] = arr;
		res = cli_exec(pg, "replaying dead letters",
					   "SELECT eventbox.replay_dead_letters($1, $2::bigint[])", 2, params);
		done = atol(PQgetvalue(res, 0, 0));
		PQclear(res);
		printf("replayed %ld of %d dead letters\n", done, o->nids);
		return EXIT_OK;
	}

	params[0] = o->sub;
	params[1] = o->type_like;
	params[2] = o->older_than;
	res = cli_exec(pg, "counting dead letters",
				   "SELECT count(*) FROM eventbox.dead_letters d WHERE" DL_FILTER, 3, params);
	total = atol(PQgetvalue(res, 0, 0));
	PQclear(res);

	snprintf(chunk, sizeof(chunk), "%ld", o->chunk);
	params[3] = after;
	params[4] = chunk;
	while (done < total || total == 0)
	{
		long		n;

		if (cli_interrupted || cli_terminated)
			return interrupted(o, "replayed", done, total);
		/* one statement, one transaction: pick a chunk by id and replay it */
		res = cli_exec(pg, "replaying dead letters",
					   "WITH c AS (SELECT d.id FROM eventbox.dead_letters d WHERE" DL_FILTER
					   "             AND d.id > $4::bigint ORDER BY d.id LIMIT $5::int)"
					   "SELECT eventbox.replay_dead_letters($1, ARRAY(SELECT id FROM c)),"
					   "       (SELECT max(id) FROM c), (SELECT count(*) FROM c)",
					   5, params);
		n = atol(PQgetvalue(res, 0, 0));
		if (atol(PQgetvalue(res, 0, 2)) == 0)
		{
			PQclear(res);
			break;
		}
		snprintf(after, sizeof(after), "%s", PQgetvalue(res, 0, 1));
		PQclear(res);
		done += n;
		progress(o, "replayed", done, total);
		if (total == 0)
			break;
	}
	printf("replayed %ld dead letters of subscription %s\n", done, o->sub);
	return EXIT_OK;
}

/*
 * purge_dead_letters takes only an age, so chunks are cut by dead_at: each
 * chunk purges what died before the dead_at of the chunk+1-th oldest
 * matching dead letter.  Dead letters that died in the same transaction
 * share a dead_at, so a chunk can be bigger than --chunk, never smaller
 * than one distinct dead_at.  TimeZone is UTC so that "now() - (now() - t)"
 * is exactly t.
 */
static int
dl_purge(PGconn *pg, DlOptions *o)
{
	const char *params[3] = {o->sub, o->older_than, NULL};
	char		chunk[32];
	long		total;
	long		done = 0;
	PGresult   *res;

	res = cli_exec(pg, "setting the time zone", "SET TimeZone = 'UTC'", 0, NULL);
	PQclear(res);
	res = cli_exec(pg, "counting dead letters",
				   "SELECT count(*) FROM eventbox.dead_letters d"
				   " WHERE d.subscription = $1"
				   "   AND ($2::interval IS NULL OR d.dead_at < pg_catalog.now() - $2::interval)",
				   2, params);
	total = atol(PQgetvalue(res, 0, 0));
	PQclear(res);
	/* an unknown subscription: let the server say so */
	if (total == 0)
	{
		res = cli_exec(pg, "purging dead letters",
					   "SELECT eventbox.purge_dead_letters($1, $2::interval)", 2, params);
		done = atol(PQgetvalue(res, 0, 0));
		PQclear(res);
		printf("purged %ld dead letters of subscription %s\n", done, o->sub);
		return EXIT_OK;
	}

	snprintf(chunk, sizeof(chunk), "%ld", o->chunk);
	params[2] = chunk;
	for (;;)
	{
		long		n;

		if (cli_interrupted || cli_terminated)
			return interrupted(o, "purged", done, total);
		res = cli_exec(pg, "purging dead letters",
					   "WITH cut AS (SELECT pg_catalog.now() - $2::interval AS t),"
					   " c AS (SELECT d.dead_at FROM eventbox.dead_letters d, cut"
					   "        WHERE d.subscription = $1 AND (cut.t IS NULL OR d.dead_at < cut.t)"
					   "        ORDER BY d.dead_at LIMIT $3::int + 1),"
					   " b AS (SELECT count(*) AS n, min(dead_at) AS lo, max(dead_at) AS hi FROM c),"
					   " bound AS (SELECT CASE WHEN b.n <= $3::int THEN cut.t"
					   "                       WHEN b.hi > b.lo THEN b.hi"
					   "                       ELSE b.hi + interval '1 microsecond' END AS t, b.n"
					   "             FROM b, cut)"
					   " SELECT CASE WHEN bound.n = 0 THEN 0 ELSE eventbox.purge_dead_letters($1,"
					   "          CASE WHEN bound.t IS NULL THEN NULL"
					   "               ELSE GREATEST(pg_catalog.now() - LEAST(bound.t, COALESCE((SELECT t FROM cut), bound.t)),"
					   "                             interval '0') END) END"
					   "   FROM bound",
					   3, params);
		n = atol(PQgetvalue(res, 0, 0));
		PQclear(res);
		if (n == 0)
			break;
		done += n;
		progress(o, "purged", done, total > done ? total : done);
	}
	printf("purged %ld dead letters of subscription %s\n", done, o->sub);
	return EXIT_OK;
}

int
cmd_dead_letters(int argc, char **argv)
{
	static struct option opts[] = {
		{"subscription", required_argument, NULL, 's'},
		{"type", required_argument, NULL, 't'},
		{"older-than", required_argument, NULL, 'o'},
		{"limit", required_argument, NULL, 'l'},
		{"chunk", required_argument, NULL, 'c'},
		{"id", required_argument, NULL, 'i'},
		{"all", no_argument, NULL, 'a'},
		{"json", no_argument, NULL, 'j'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, '?' + 256},
		CLI_CONN_OPTIONS,
		{NULL, 0, NULL, 0}
	};
	CliConn		conn = {0};
	DlOptions	o = {0};
	const char *show_id = NULL;
	int			c;
	long		v;
	PGconn	   *pg;
	int			rc;

	o.limit = 100;
	o.chunk = 1000;
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "s:t:q" CLI_CONN_SHORT, opts, NULL)) != -1)
	{
		if (cli_conn_option(&conn, c, optarg))
			continue;
		switch (c)
		{
			case 's':
				o.sub = optarg;
				break;
			case 't':
				if (optarg[0] == '\0')
					cli_usage_error("dead-letters", "--type must not be empty");
				o.type_glob = optarg;
				o.type_like = glob_to_like(optarg);
				break;
			case 'o':
				o.older_than = optarg;
				break;
			case 'l':
				if (!cli_parse_int(optarg, 1, 1000000000L, &o.limit))
					cli_usage_error("dead-letters", "invalid --limit \"%s\": give a positive number", optarg);
				break;
			case 'c':
				if (!cli_parse_int(optarg, 1, 1000000L, &o.chunk))
					cli_usage_error("dead-letters", "invalid --chunk \"%s\": give a number from 1 to 1000000", optarg);
				break;
			case 'i':
				if (!cli_parse_int(optarg, 1, 0x7fffffffffffffffL, &v))
					cli_usage_error("dead-letters", "invalid --id \"%s\": give an event id", optarg);
				if (o.nids == MAX_IDS)
					cli_usage_error("dead-letters", "too many --id options (at most %d)", MAX_IDS);
				o.ids[o.nids++] = optarg;
				break;
			case 'a':
				o.all = true;
				break;
			case 'j':
				o.json = true;
				break;
			case 'q':
				o.quiet = true;
				break;
			case '?' + 256:
				dl_usage();
				return EXIT_OK;
			default:
				cli_usage_error("dead-letters", "unknown or incomplete option \"%s\"", argv[optind - 1]);
		}
	}
	if (optind >= argc)
		cli_usage_error("dead-letters", "no action given: use list, show, replay or purge");
	o.action = argv[optind++];

	if (strcmp(o.action, "list") == 0)
		;
	else if (strcmp(o.action, "show") == 0)
	{
		if (optind >= argc)
			cli_usage_error("dead-letters", "show needs the event id of a dead letter");
		show_id = argv[optind++];
		if (!cli_parse_int(show_id, 1, 0x7fffffffffffffffL, &v))
			cli_usage_error("dead-letters", "invalid event id \"%s\"", show_id);
	}
	else if (strcmp(o.action, "replay") == 0)
	{
		if (o.sub == NULL)
			cli_usage_error("dead-letters", "replay needs --subscription");
		if (o.nids > 0 && (o.type_like || o.older_than))
			cli_usage_error("dead-letters", "--id cannot be combined with --type or --older-than");
	}
	else if (strcmp(o.action, "purge") == 0)
	{
		if (o.sub == NULL)
			cli_usage_error("dead-letters", "purge needs --subscription");
		if (o.type_like)
			cli_usage_error("dead-letters", "purge cannot filter by --type (eventbox.purge_dead_letters "
							"purges by age only); replay or purge by --older-than instead");
		if (o.nids > 0)
			cli_usage_error("dead-letters", "purge cannot take --id");
		if (!o.all && o.older_than == NULL)
			cli_usage_error("dead-letters", "purge needs --older-than AGE, or --all to purge every dead letter of the subscription");
		if (o.all && o.older_than)
			cli_usage_error("dead-letters", "give either --older-than or --all, not both");
	}
	else
		cli_usage_error("dead-letters", "unknown action \"%s\": use list, show, replay or purge", o.action);
	if (optind < argc)
		cli_usage_error("dead-letters", "unexpected argument \"%s\"", argv[optind]);
	if (strcmp(o.action, "list") != 0 && strcmp(o.action, "show") != 0 && o.json)
		cli_usage_error("dead-letters", "--json applies to list and show only");

	cli_install_signals();
	pg = cli_connect(&conn, true);
	cli_check_extension(pg);

	if (o.older_than)
	{
		const char *params[1] = {o.older_than};

		/*
		 * The server's rules for interval arguments (EventboxCheckInterval):
		 * no negative part, at most 100 years; checked here so that purge
		 * says so before it counts anything.
		 */
		PGresult   *res = PQexecParams(pg,
									   "SELECT extract(year FROM i) * 12 + extract(month FROM i) < 0"
									   " OR extract(day FROM i) < 0"
									   " OR extract(hour FROM i) * 3600 + extract(minute FROM i) * 60"
									   "    + extract(second FROM i) < 0,"
									   " i > interval '100 years'"
									   " FROM (SELECT $1::interval AS i) s",
									   1, NULL, params, NULL, NULL, 0);

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			cli_usage_error("dead-letters", "invalid --older-than \"%s\": give a PostgreSQL interval such as \"2 hours\" or \"7 days\"", o.older_than);
		if (strcmp(PQgetvalue(res, 0, 0), "t") == 0)
			cli_usage_error("dead-letters", "invalid --older-than \"%s\": must not be negative or have a negative part", o.older_than);
		if (strcmp(PQgetvalue(res, 0, 1), "t") == 0)
			cli_usage_error("dead-letters", "invalid --older-than \"%s\": must be at most 100 years", o.older_than);
		PQclear(res);
	}

	if (strcmp(o.action, "list") == 0)
		rc = dl_list(pg, &o);
	else if (strcmp(o.action, "show") == 0)
		rc = dl_show(pg, &o, show_id);
	else if (strcmp(o.action, "replay") == 0)
		rc = dl_replay(pg, &o);
	else
		rc = dl_purge(pg, &o);
	PQfinish(pg);
	return rc;
}
