/*-------------------------------------------------------------------------
 *
 * tail.c
 *		eventbox tail: follow events live.  LISTENs on the channel of a
 *		subscription that forwards events (notify 'event' or 'envelope'),
 *		by default the built-in subscription "default" on channel eventbox,
 *		and prints one line or one JSON object per event.
 *
 * A notification whose payload did not fit ("payload_omitted") or that
 * carries no payload (notify 'envelope') is completed with eventbox.event(id).
 * tail only watches: it never acks, so on a push subscription the events
 * it shows are still redelivered to (and must be acked by) the real consumer.
 *
 *-------------------------------------------------------------------------
 */
#include <fnmatch.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>

#include "cli.h"

#define MAX_TYPES 32

static void
tail_usage(void)
{
	printf("eventbox tail follows events live and prints one line (or one JSON object)\n"
		   "per event.\n"
		   "\n"
		   "Usage:\n"
		   "  eventbox tail [OPTION]...\n"
		   "\n"
		   "Options:\n"
		   "  -s, --subscription=NAME   listen on this subscription's channel (default: the\n"
		   "                            built-in subscription \"default\", channel eventbox);\n"
		   "                            it must forward events (notify 'event' or 'envelope')\n"
		   "  -c, --channel=CHANNEL     LISTEN on this channel instead of looking it up\n"
		   "  -t, --type=GLOB           only event types matching GLOB (* and ?); repeatable\n"
		   "      --json                one JSON object per event (the notification, with\n"
		   "                            payload and headers filled in)\n"
		   "  -n, --count=N             exit after N events\n"
		   "  -d, -h, -p, -U            connection options (see eventbox --help)\n"
		   "      --help                show this help\n"
		   "\n"
		   "Line format: OCCURRED_AT ID EVENT_TYPE AGGREGATE_TYPE:AGGREGATE_ID PAYLOAD\n"
		   "tail never acks. Events of payloads too big for a notification are fetched\n"
		   "with eventbox.event(id), which needs the role eventbox_consumer.\n"
		   "Stops on Ctrl-C or SIGTERM (exit 0).\n"
		   "\n"
		   "Exit codes: 0 ok, 1 error, 2 bad usage, 3 could not connect or connection lost.\n");
}

/*
 * The query that turns a notification into output: the envelope fields,
 * the payload (from the message, or eventbox.event(id) when it was left out)
 * and the whole event as JSON.  eventbox.event is only called when needed,
 * so tailing plain 'event' notifications needs no privileges at all.
 */
static const char *render_sql =
"WITH m AS (SELECT $1::jsonb AS m),"
" f AS (SELECT m, (m ? 'payload') AS has_payload FROM m),"
" e AS (SELECT m, CASE WHEN has_payload THEN m->'payload'"
"                      ELSE (SELECT pg_catalog.to_jsonb(x.payload) FROM eventbox.event((m->>'id')::bigint) x) END AS payload,"
"              CASE WHEN m ? 'headers' THEN m->'headers'"
"                   WHEN has_payload THEN NULL"
"                   ELSE (SELECT pg_catalog.to_jsonb(x.headers) FROM eventbox.event((m->>'id')::bigint) x) END AS headers"
"        FROM f)"
" SELECT m->>'id', m->>'event_type', m->>'aggregate_type', m->>'aggregate_id',"
"        m->>'occurred_at', payload::text,"
"        (m - 'payload_omitted' - 'headers_omitted'"
"           || pg_catalog.jsonb_build_object('payload', payload, 'headers', COALESCE(headers, '{}')))::text"
"   FROM e";

static bool
type_matches(const char *type, const char *const *globs, int nglobs)
{
	int			i;

	if (nglobs == 0)
		return true;
	for (i = 0; i < nglobs; i++)
		if (fnmatch(globs[i], type, 0) == 0)
			return true;
	return false;
}

/*
 * Find the channel of a subscription and check that it forwards events.
 * Reading eventbox.subscriptions needs eventbox_admin; without it, assume
 * the default channel (the subscription's name).
 */
static const char *
lookup_channel(PGconn *pg, const char *sub)
{
	const char *params[1] = {sub};
	PGresult   *res;
	static char channel[256];

	res = PQexecParams(pg, "SELECT channel, notify, mode FROM eventbox.subscriptions WHERE name = $1",
					   1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
	{
		PQclear(res);
		return sub;
	}
	if (PQntuples(res) == 0)
	{
		fprintf(stderr, "%s: error: subscription \"%s\" does not exist\n"
				"Hint: eventbox stats lists the subscriptions; without --subscription, "
				"tail follows every event (subscription \"default\").\n", progname, sub);
		exit(EXIT_ERROR);
	}
	if (strcmp(PQgetvalue(res, 0, 1), "event") != 0 &&
		strcmp(PQgetvalue(res, 0, 1), "envelope") != 0)
	{
		fprintf(stderr, "%s: error: subscription \"%s\" does not forward events on its channel (notify = '%s')\n"
				"Hint: tail needs a subscription with notify 'event' or 'envelope'; "
				"without --subscription it follows every event.\n",
				progname, sub, PQgetvalue(res, 0, 1));
		exit(EXIT_ERROR);
	}
	if (strcmp(PQgetvalue(res, 0, 2), "push") == 0)
		fprintf(stderr, "%s: note: tail does not ack; the consumer of push subscription \"%s\" still acks what it receives\n",
				progname, sub);
	snprintf(channel, sizeof(channel), "%s", PQgetvalue(res, 0, 0));
	PQclear(res);
	return channel;
}

int
cmd_tail(int argc, char **argv)
{
	static struct option opts[] = {
		{"subscription", required_argument, NULL, 's'},
		{"channel", required_argument, NULL, 'c'},
		{"type", required_argument, NULL, 't'},
		{"json", no_argument, NULL, 'j'},
		{"count", required_argument, NULL, 'n'},
		{"help", no_argument, NULL, '?' + 256},
		CLI_CONN_OPTIONS,
		{NULL, 0, NULL, 0}
	};
	CliConn		conn = {0};
	const char *sub = NULL;
	const char *channel = NULL;
	const char *globs[MAX_TYPES];
	int			nglobs = 0;
	bool		json = false;
	long		count = -1;
	long		seen = 0;
	int			c;
	PGconn	   *pg;
	PGresult   *res;
	char	   *listen;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "s:c:t:n:" CLI_CONN_SHORT, opts, NULL)) != -1)
	{
		if (cli_conn_option(&conn, c, optarg))
			continue;
		switch (c)
		{
			case 's':
				sub = optarg;
				break;
			case 'c':
				channel = optarg;
				break;
			case 't':
				if (nglobs == MAX_TYPES)
					cli_usage_error("tail", "too many --type options (at most %d)", MAX_TYPES);
				if (optarg[0] == '\0')
					cli_usage_error("tail", "--type must not be empty");
				globs[nglobs++] = optarg;
				break;
			case 'j':
				json = true;
				break;
			case 'n':
				if (!cli_parse_int(optarg, 1, 1000000000L, &count))
					cli_usage_error("tail", "invalid --count \"%s\": give a positive number", optarg);
				break;
			case '?' + 256:
				tail_usage();
				return EXIT_OK;
			default:
				cli_usage_error("tail", "unknown or incomplete option \"%s\"", argv[optind - 1]);
		}
	}
	if (optind < argc)
		cli_usage_error("tail", "unexpected argument \"%s\"", argv[optind]);

	cli_install_signals();
	pg = cli_connect(&conn, true);
	cli_check_extension(pg);

	if (channel == NULL)
		channel = (sub == NULL || strcmp(sub, "default") == 0)
			? "eventbox" : lookup_channel(pg, sub);

	listen = PQescapeIdentifier(pg, channel, strlen(channel));
	{
		char	   *sql = malloc(strlen(listen) + 16);

		sprintf(sql, "LISTEN %s", listen);
		res = cli_exec(pg, "starting to listen", sql, 0, NULL);
		PQclear(res);
		free(sql);
	}
	PQfreemem(listen);
	if (!json)
		fprintf(stderr, "%s: listening on channel \"%s\" (Ctrl-C to stop)\n", progname, channel);

	while (!cli_interrupted && !cli_terminated && (count < 0 || seen < count))
	{
		PGnotify   *n;
		fd_set		fds;
		int			sock = PQsocket(pg);
		int			maxfd;

		while ((n = PQnotifies(pg)) != NULL && (count < 0 || seen < count))
		{
			const char *params[1] = {n->extra};

			if (strstr(n->extra, "\"id\"") == NULL)
			{
				/* a wake-up, not an event */
				PQfreemem(n);
				continue;
			}
			res = PQexecParams(pg, render_sql, 1, NULL, params, NULL, NULL, 0);
			if (PQresultStatus(res) != PGRES_TUPLES_OK)
			{
				if (PQstatus(pg) == CONNECTION_BAD)
				{
					fprintf(stderr, "%s: lost the connection to the server: %s"
							"Hint: check that the server is running and rerun eventbox tail; "
							"events published meanwhile can be read with eventbox.timeline or eventbox.event.\n",
							progname, PQerrorMessage(pg));
					return EXIT_CONNECT;
				}
				cli_fail_result("reading an event", res);
			}
			if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 1) &&
				type_matches(PQgetvalue(res, 0, 1), globs, nglobs))
			{
				if (json)
					printf("%s\n", PQgetvalue(res, 0, 6));
				else
				{
					printf("%s %s %s", PQgetvalue(res, 0, 4), PQgetvalue(res, 0, 0),
						   PQgetvalue(res, 0, 1));
					if (!PQgetisnull(res, 0, 2))
						printf(" %s:%s", PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3));
					else
						printf(" -");
					printf(" %s\n", PQgetisnull(res, 0, 5) ? "null" : PQgetvalue(res, 0, 5));
				}
				fflush(stdout);
				seen++;
			}
			PQclear(res);
			PQfreemem(n);
		}
		if (count >= 0 && seen >= count)
			break;

		FD_ZERO(&fds);
		FD_SET(sock, &fds);
		FD_SET(cli_wake_pipe[0], &fds);
		maxfd = sock > cli_wake_pipe[0] ? sock : cli_wake_pipe[0];
		if (select(maxfd + 1, &fds, NULL, NULL, NULL) < 0)
			continue;			/* EINTR: the loop checks the flags */
		cli_drain_wake_pipe();
		if (!PQconsumeInput(pg))
		{
			fprintf(stderr, "%s: lost the connection to the server: %s"
					"Hint: check that the server is running and rerun eventbox tail; "
					"events published meanwhile can be read with eventbox.timeline or eventbox.event.\n",
					progname, PQerrorMessage(pg));
			return EXIT_CONNECT;
		}
	}
	PQfinish(pg);
	return EXIT_OK;
}
