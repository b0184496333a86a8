/*-------------------------------------------------------------------------
 *
 * stats.c
 *		eventbox stats: per-subscription counts, lag and rates from the
 *		eventbox.stats view, as a table or JSON, once or every few seconds.
 *
 * Rates are differences of the view's running totals between two samples
 * taken --interval apart (by the server's clock), so even a single
 * `eventbox stats` takes two samples.
 *
 *-------------------------------------------------------------------------
 */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

#define NCOLS 17

/* One sample: the view's rows plus the server time it was taken at. */
typedef struct Sample
{
	PGresult   *res;
	double		at;
} Sample;

static const char *stats_sql =
"SELECT subscription, mode, paused, pending, leased, scheduled_retries, dead,"
"       lag_events, lag_seconds,"
"       COALESCE(EXTRACT(epoch FROM oldest_pending_age), 0)::float8,"
"       published_total, delivered_total, acked_total, retried_total,"
"       dead_lettered_total, last_activity,"
"       EXTRACT(epoch FROM pg_catalog.clock_timestamp())::float8"
"  FROM eventbox.stats"
" WHERE $1::text IS NULL OR subscription = $1"
" ORDER BY subscription";

static void
stats_usage(void)
{
	printf("eventbox stats shows, per subscription, what is pending, leased, waiting\n"
		   "for a retry and dead, the lag, and the publish/delivery/ack rates.\n"
		   "\n"
		   "Usage:\n"
		   "  eventbox stats [OPTION]...\n"
		   "\n"
		   "Options:\n"
		   "  -s, --subscription=NAME   only this subscription\n"
		   "  -w, --watch               repeat every interval until interrupted (Ctrl-C)\n"
		   "  -i, --interval=SECONDS    time between samples (default 1); rates are\n"
		   "                            measured over it\n"
		   "      --json                one JSON object per sample instead of a table\n"
		   "  -d, -h, -p, -U            connection options (see eventbox --help)\n"
		   "      --help                show this help\n"
		   "\n"
		   "Columns: PENDING (not yet handed out, incl. due retries), LEASED (claimed,\n"
		   "not acked), RETRYING (scheduled retries), DEAD (dead letters), LAG (events),\n"
		   "LAG_S (age of the oldest pending event, seconds), PUB/S, DELIV/S, ACK/S.\n"
		   "Needs the role eventbox_reader (or eventbox_admin).\n"
		   "\n"
		   "Exit codes: 0 ok, 1 error, 2 bad usage, 3 could not connect.\n");
}

static long long
num(const PGresult *res, int row, int col)
{
	return PQgetisnull(res, row, col) ? 0 : atoll(PQgetvalue(res, row, col));
}

/* Find subscription name's row in a sample, or -1. */
static int
find_row(const PGresult *res, const char *name)
{
	int			i;

	if (res == NULL)
		return -1;
	for (i = 0; i < PQntuples(res); i++)
		if (strcmp(PQgetvalue(res, i, 0), name) == 0)
			return i;
	return -1;
}

/* Rate of column col between prev and cur for row i; < 0 if unknown. */
static double
rate(const Sample *prev, const Sample *cur, int i, int col)
{
	int			j;
	double		dt;

	if (prev == NULL || prev->res == NULL)
		return -1;
	j = find_row(prev->res, PQgetvalue(cur->res, i, 0));
	dt = cur->at - prev->at;
	if (j < 0 || dt <= 0)
		return -1;
	return (double) (num(cur->res, i, col) - num(prev->res, j, col)) / dt;
}

static void
print_rate(double r, int width)
{
	if (r < 0)
		printf(" %*s", width, "-");
	else
		printf(" %*.1f", width, r);
}

static void
print_table(const Sample *prev, const Sample *cur)
{
	PGresult   *res = cur->res;
	int			i;
	int			w = 12;

	for (i = 0; i < PQntuples(res); i++)
		if ((int) strlen(PQgetvalue(res, i, 0)) > w)
			w = (int) strlen(PQgetvalue(res, i, 0));

	printf("%-*s %-14s %9s %8s %8s %8s %9s %8s %8s %8s %8s\n", w, "SUBSCRIPTION",
		   "MODE", "PENDING", "LEASED", "RETRYING", "DEAD", "LAG", "LAG_S",
		   "PUB/S", "DELIV/S", "ACK/S");
	for (i = 0; i < PQntuples(res); i++)
	{
		char		mode[64];

		snprintf(mode, sizeof(mode), "%s%s", PQgetvalue(res, i, 1),
				 strcmp(PQgetvalue(res, i, 2), "t") == 0 ? ",paused" : "");
		printf("%-*s %-14s %9lld %8lld %8lld %8lld %9lld %8.1f", w,
			   PQgetvalue(res, i, 0), mode, num(res, i, 3), num(res, i, 4),
			   num(res, i, 5), num(res, i, 6), num(res, i, 7),
			   atof(PQgetvalue(res, i, 8)));
		print_rate(rate(prev, cur, i, 10), 8);
		print_rate(rate(prev, cur, i, 11), 8);
		print_rate(rate(prev, cur, i, 12), 8);
		putchar('\n');
	}
	if (PQntuples(res) == 0)
		printf("(no subscriptions)\n");
}

static void
print_json_rate(const char *key, double r)
{
	printf(",\"%s\":", key);
	if (r < 0)
		printf("null");
	else
		printf("%.3f", r);
}

static void
print_json(const Sample *prev, const Sample *cur)
{
	PGresult   *res = cur->res;
	int			i;
	static const char *const keys[] = {
		"pending", "leased", "scheduled_retries", "dead", "lag_events"
	};
	static const char *const totals[] = {
		"published_total", "delivered_total", "acked_total", "retried_total",
		"dead_lettered_total"
	};

	printf("{\"time\":%.3f,\"subscriptions\":[", cur->at);
	for (i = 0; i < PQntuples(res); i++)
	{
		int			k;

		printf("%s{\"subscription\":", i ? "," : "");
		cli_json_string(stdout, PQgetvalue(res, i, 0));
		printf(",\"mode\":");
		cli_json_string(stdout, PQgetvalue(res, i, 1));
		printf(",\"paused\":%s", strcmp(PQgetvalue(res, i, 2), "t") == 0 ? "true" : "false");
		for (k = 0; k < 5; k++)
			printf(",\"%s\":%lld", keys[k], num(res, i, 3 + k));
		printf(",\"lag_seconds\":%s", PQgetvalue(res, i, 8));
		printf(",\"oldest_pending_age_seconds\":%s", PQgetvalue(res, i, 9));
		for (k = 0; k < 5; k++)
			printf(",\"%s\":%lld", totals[k], num(res, i, 10 + k));
		printf(",\"last_activity\":");
		cli_json_string(stdout, PQgetisnull(res, i, 15) ? NULL : PQgetvalue(res, i, 15));
		print_json_rate("published_per_second", rate(prev, cur, i, 10));
		print_json_rate("delivered_per_second", rate(prev, cur, i, 11));
		print_json_rate("acked_per_second", rate(prev, cur, i, 12));
		printf("}");
	}
	printf("]}\n");
}

static void
take_sample(PGconn *pg, const char *sub, Sample *s)
{
	const char *params[1] = {sub};

	s->res = cli_exec(pg, "reading eventbox.stats", stats_sql, 1, params);
	s->at = PQntuples(s->res) > 0 ? atof(PQgetvalue(s->res, 0, 16)) : 0;
	if (PQntuples(s->res) == 0)
	{
		/* still need a time stamp for the next rate */
		PGresult   *t = cli_exec(pg, "reading the clock",
								 "SELECT EXTRACT(epoch FROM pg_catalog.clock_timestamp())::float8",
								 0, NULL);

		s->at = atof(PQgetvalue(t, 0, 0));
		PQclear(t);
	}
}

/* Sleep ms milliseconds or until a signal arrives. */
static void
nap(long ms)
{
	struct timeval tv;
	fd_set		fds;

	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	FD_ZERO(&fds);
	FD_SET(cli_wake_pipe[0], &fds);
	select(cli_wake_pipe[0] + 1, &fds, NULL, NULL, &tv);
	cli_drain_wake_pipe();
}

int
cmd_stats(int argc, char **argv)
{
	static struct option opts[] = {
		{"subscription", required_argument, NULL, 's'},
		{"watch", no_argument, NULL, 'w'},
		{"interval", required_argument, NULL, 'i'},
		{"json", no_argument, NULL, 'j'},
		{"help", no_argument, NULL, '?' + 256},
		CLI_CONN_OPTIONS,
		{NULL, 0, NULL, 0}
	};
	CliConn		conn = {0};
	const char *sub = NULL;
	bool		watch = false;
	bool		json = false;
	double		interval = 1.0;
	int			c;
	PGconn	   *pg;
	Sample		prev = {0};
	Sample		cur = {0};

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "s:wi:" CLI_CONN_SHORT, opts, NULL)) != -1)
	{
		if (cli_conn_option(&conn, c, optarg))
			continue;
		switch (c)
		{
			case 's':
				sub = optarg;
				break;
			case 'w':
				watch = true;
				break;
			case 'i':
				{
					char	   *end;

					interval = strtod(optarg, &end);
					if (end == optarg || *end || interval < 0.1 || interval > 86400)
						cli_usage_error("stats", "invalid --interval \"%s\": give seconds between 0.1 and 86400", optarg);
					break;
				}
			case 'j':
				json = true;
				break;
			case '?' + 256:
				stats_usage();
				return EXIT_OK;
			default:
				cli_usage_error("stats", "unknown or incomplete option \"%s\"", argv[optind - 1]);
		}
	}
	if (optind < argc)
		cli_usage_error("stats", "unexpected argument \"%s\"", argv[optind]);

	cli_install_signals();
	pg = cli_connect(&conn, true);
	cli_check_extension(pg);

	take_sample(pg, sub, &prev);
	if (sub && PQntuples(prev.res) == 0)
	{
		fprintf(stderr, "%s: error: subscription \"%s\" does not exist\n"
				"Hint: run eventbox stats without --subscription to see them all.\n",
				progname, sub);
		return EXIT_ERROR;
	}
	for (;;)
	{
		nap((long) (interval * 1000));
		if (cli_interrupted || cli_terminated)
			break;
		take_sample(pg, sub, &cur);
		if (json)
			print_json(&prev, &cur);
		else
		{
			if (watch)
			{
				time_t		now = time(NULL);
				char		buf[64];

				strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", localtime(&now));
				printf("%s%s\n", prev.res && cur.at && watch && isatty(1) ? "\033[H\033[2J" : "", buf);
			}
			print_table(&prev, &cur);
		}
		fflush(stdout);
		PQclear(prev.res);
		prev = cur;
		cur.res = NULL;
		if (!watch)
			break;
	}
	PQclear(prev.res);
	PQfinish(pg);
	/* Ctrl-C is how --watch is meant to end */
	if (cli_interrupted && !watch)
		return EXIT_INTERRUPT;
	return EXIT_OK;
}
