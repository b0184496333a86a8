/*-------------------------------------------------------------------------
 *
 * eventbox.c
 *		main() of the eventbox command-line tool and what its subcommands
 *		share: connecting, reporting errors, signals, JSON output.
 *
 * The tool connects like any libpq client (PG* environment variables, a
 * service file, or a connection string given with -d) and exits with a
 * code scripts can rely on: 0 ok, 1 error, 2 bad usage, 3 no connection,
 * 130 interrupted by SIGINT.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

#define EVENTBOX_CLI_VERSION "0.1"

const char *progname = "eventbox";
volatile sig_atomic_t cli_interrupted = 0;
volatile sig_atomic_t cli_terminated = 0;
int			cli_wake_pipe[2] = {-1, -1};

static void
usage(FILE *out)
{
	fprintf(out,
			"eventbox operates the eventbox transactional outbox from a shell.\n"
			"\n"
			"Usage:\n"
			"  eventbox [CONNECTION OPTION]... COMMAND [OPTION]...\n"
			"\n"
			"Commands:\n"
			"  stats          per-subscription pending, leased, retrying, dead, lag, rates\n"
			"  tail           follow events live (LISTEN)\n"
			"  dead-letters   list, show, replay or purge dead letters\n"
			"  relay nats     forward a pull subscription to NATS JetStream\n"
			"\n"
			"Connection options (accepted by every command):\n"
			"  -d, --dbname=CONNSTR   database name or connection string\n"
			"                         (\"host=... port=... dbname=... user=...\" or postgresql://...)\n"
			"  -h, --host=HOST        database server host or socket directory\n"
			"  -p, --port=PORT        database server port\n"
			"  -U, --username=USER    database user name\n"
			"Without them the usual libpq environment applies (PGHOST, PGPORT,\n"
			"PGDATABASE, PGUSER, PGPASSWORD, PGSERVICE, ~/.pgpass).\n"
			"\n"
			"Other options:\n"
			"  --help                 show this help; COMMAND --help shows the command's\n"
			"  --version              show the version\n"
			"\n"
			"Exit codes: 0 success, 1 error reported by the server or NATS,\n"
			"2 bad command line, 3 could not connect, 130 interrupted (SIGINT).\n");
}

/*
 * cli_conn_option handles one of the common connection options; returns
 * false if c is not one of them.
 */
bool
cli_conn_option(CliConn *conn, int c, const char *arg)
{
	switch (c)
	{
		case 'd':
			conn->dbname = arg;
			return true;
		case 'h':
			conn->host = arg;
			return true;
		case 'p':
			conn->port = arg;
			return true;
		case 'U':
			conn->user = arg;
			return true;
		default:
			return false;
	}
}

/*
 * cli_connect opens a connection.  On failure it either exits with
 * EXIT_CONNECT after saying what to check, or (for the relay, which retries)
 * returns NULL after printing the reason.
 */
PGconn *
cli_connect(const CliConn *conn, bool exit_on_failure)
{
	const char *keys[6];
	const char *vals[6];
	int			n = 0;
	PGconn	   *pg;

	if (conn->host)
	{
		keys[n] = "host";
		vals[n++] = conn->host;
	}
	if (conn->port)
	{
		keys[n] = "port";
		vals[n++] = conn->port;
	}
	if (conn->user)
	{
		keys[n] = "user";
		vals[n++] = conn->user;
	}
	/* dbname last, so that a connection string in it overrides the above */
	if (conn->dbname)
	{
		keys[n] = "dbname";
		vals[n++] = conn->dbname;
	}
	keys[n] = "fallback_application_name";
	vals[n++] = "eventbox";
	keys[n] = NULL;
	vals[n] = NULL;

	pg = PQconnectdbParams(keys, vals, 1);
	if (pg == NULL || PQstatus(pg) != CONNECTION_OK)
	{
		const char *msg = pg ? PQerrorMessage(pg) : "out of memory\n";

		fprintf(stderr,
				"%s: could not connect to the database: %s"
				"Hint: check that the server is running and reachable, and that "
				"-d/--dbname (a database name or connection string such as "
				"\"host=HOST port=PORT dbname=DB user=USER\"), -h, -p, -U or the "
				"PGHOST, PGPORT, PGDATABASE and PGUSER environment variables point to it.\n",
				progname, msg);
		PQfinish(pg);
		if (exit_on_failure)
			exit(EXIT_CONNECT);
		return NULL;
	}
	return pg;
}

/*
 * cli_check_extension exits with a clear message when the database has no
 * eventbox extension, rather than letting the first query fail with
 * "schema eventbox does not exist".
 */
void
cli_check_extension(PGconn *pg)
{
	PGresult   *res = cli_exec(pg, "checking for the eventbox extension",
							   "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'eventbox'",
							   0, NULL);

	if (PQntuples(res) == 0)
	{
		fprintf(stderr,
				"%s: error: the extension eventbox is not installed in database \"%s\"\n"
				"Hint: run CREATE EXTENSION eventbox in that database, or connect to "
				"the right one with -d.\n", progname, PQdb(pg));
		PQclear(res);
		exit(EXIT_ERROR);
	}
	PQclear(res);
}

/*
 * cli_usage_error reports a bad command line and exits with EXIT_USAGE.
 */
void
cli_usage_error(const char *cmd, const char *fmt,...)
{
	va_list		ap;

	fprintf(stderr, "%s: ", progname);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry \"%s%s%s --help\" for more information.\n",
			progname, cmd ? " " : "", cmd ? cmd : "");
	exit(EXIT_USAGE);
}

/*
 * cli_report_result prints the server's error for a failed query: the
 * message, its detail and hint, and our own hint for the errors an
 * operator most often meets (missing privileges or extension).
 */
void
cli_report_result(const char *what, const PGresult *res)
{
	const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
	const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
	const char *hint = PQresultErrorField(res, PG_DIAG_MESSAGE_HINT);

	if (primary == NULL)
		primary = PQresultErrorMessage(res);
	fprintf(stderr, "%s: error while %s: %s%s", progname, what, primary,
			primary[0] && primary[strlen(primary) - 1] == '\n' ? "" : "\n");
	if (sqlstate)
		fprintf(stderr, "SQLSTATE: %s\n", sqlstate);
	if (detail)
		fprintf(stderr, "Detail: %s\n", detail);
	if (hint)
		fprintf(stderr, "Hint: %s\n", hint);
	else if (sqlstate && strcmp(sqlstate, "42501") == 0)
		fprintf(stderr,
				"Hint: connect as a role that is a member of the right eventbox role: "
				"eventbox_reader for stats and dead-letters list, eventbox_consumer for "
				"tail and relay, eventbox_admin for dead-letters show, replay and purge.\n");
	else if (sqlstate && (strcmp(sqlstate, "3F000") == 0 || strcmp(sqlstate, "42883") == 0 ||
						  strcmp(sqlstate, "42P01") == 0))
		fprintf(stderr, "Hint: is the extension installed? Run CREATE EXTENSION eventbox "
				"in this database, or connect to the right one with -d.\n");
}

void
cli_fail_result(const char *what, PGresult *res)
{
	cli_report_result(what, res);
	PQclear(res);
	exit(EXIT_ERROR);
}

/*
 * cli_exec runs one statement with text parameters and returns its result;
 * on any failure it reports it and exits (EXIT_CONNECT if the connection
 * was lost, EXIT_ERROR otherwise).
 */
PGresult *
cli_exec(PGconn *pg, const char *what, const char *sql, int nparams,
		 const char *const *params)
{
	PGresult   *res = PQexecParams(pg, sql, nparams, NULL, params, NULL, NULL, 0);
	ExecStatusType st = PQresultStatus(res);

	if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
		return res;
	if (PQstatus(pg) == CONNECTION_BAD)
	{
		fprintf(stderr, "%s: lost the connection to the server while %s: %s"
				"Hint: check that the server is running; rerun the command once it is.\n",
				progname, what, PQerrorMessage(pg));
		PQclear(res);
		exit(EXIT_CONNECT);
	}
	cli_fail_result(what, res);
}

/*
 * cli_json_string writes s as a JSON string literal (NULL as null).
 */
void
cli_json_string(FILE *out, const char *s)
{
	if (s == NULL)
	{
		fputs("null", out);
		return;
	}
	fputc('"', out);
	for (; *s; s++)
	{
		unsigned char c = (unsigned char) *s;

		switch (c)
		{
			case '"':
				fputs("\\\"", out);
				break;
			case '\\':
				fputs("\\\\", out);
				break;
			case '\n':
				fputs("\\n", out);
				break;
			case '\r':
				fputs("\\r", out);
				break;
			case '\t':
				fputs("\\t", out);
				break;
			default:
				if (c < 0x20)
					fprintf(out, "\\u%04x", c);
				else
					fputc(c, out);
		}
	}
	fputc('"', out);
}

/*
 * cli_parse_int parses a whole decimal integer in [min, max].
 */
bool
cli_parse_int(const char *s, long min, long max, long *out)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
		return false;
	*out = v;
	return true;
}

static void
cli_signal(int sig)
{
	int			save = errno;
	ssize_t		rc;

	if (sig == SIGINT)
		cli_interrupted = 1;
	else
		cli_terminated = 1;
	if (cli_wake_pipe[1] >= 0)
		rc = write(cli_wake_pipe[1], "x", 1);
	(void) rc;
	errno = save;
}

/*
 * cli_install_signals makes SIGINT and SIGTERM set flags (and wake a
 * select() through a self-pipe) instead of killing the process, so that a
 * long command finishes its current chunk or batch and stops cleanly.
 */
void
cli_install_signals(void)
{
	struct sigaction sa;

	if (cli_wake_pipe[0] < 0 && pipe(cli_wake_pipe) == 0)
	{
		fcntl(cli_wake_pipe[0], F_SETFL, O_NONBLOCK);
		fcntl(cli_wake_pipe[1], F_SETFL, O_NONBLOCK);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = cli_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

void
cli_drain_wake_pipe(void)
{
	char		buf[64];

	while (cli_wake_pipe[0] >= 0 && read(cli_wake_pipe[0], buf, sizeof(buf)) > 0)
		;
}

/* Options taking a value, for finding the command among global options. */
static bool
takes_value(const char *arg)
{
	return strcmp(arg, "-d") == 0 || strcmp(arg, "-h") == 0 ||
		strcmp(arg, "-p") == 0 || strcmp(arg, "-U") == 0 ||
		strcmp(arg, "--dbname") == 0 || strcmp(arg, "--host") == 0 ||
		strcmp(arg, "--port") == 0 || strcmp(arg, "--username") == 0;
}

int
main(int argc, char **argv)
{
	int			i;
	int			cmd = -1;
	char	  **sub;
	int			n = 0;
	static const struct
	{
		const char *name;
		int			(*fn) (int, char **);
	}			commands[] = {
		{"stats", cmd_stats},
		{"tail", cmd_tail},
		{"dead-letters", cmd_dead_letters},
		{"relay", cmd_relay},
	};

	/* Find the command: the first argument that is not a global option. */
	for (i = 1; i < argc; i++)
	{
		if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-?") == 0)
		{
			usage(stdout);
			return EXIT_OK;
		}
		if (strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-V") == 0)
		{
			printf("eventbox %s (libpq %d)\n", EVENTBOX_CLI_VERSION, PQlibVersion());
			return EXIT_OK;
		}
		if (argv[i][0] != '-')
		{
			cmd = i;
			break;
		}
		if (takes_value(argv[i]))
			i++;
	}
	if (cmd < 0)
		cli_usage_error(NULL, "no command given");

	for (i = 0; i < (int) (sizeof(commands) / sizeof(commands[0])); i++)
	{
		int			j;

		if (strcmp(argv[cmd], commands[i].name) != 0)
			continue;
		/* argv for the command: its name, the global options, the rest */
		sub = calloc(argc + 1, sizeof(char *));
		if (sub == NULL)
			return EXIT_ERROR;
		sub[n++] = argv[cmd];
		for (j = 1; j < cmd; j++)
			sub[n++] = argv[j];
		for (j = cmd + 1; j < argc; j++)
			sub[n++] = argv[j];
		sub[n] = NULL;
		return commands[i].fn(n, sub);
	}
	cli_usage_error(NULL, "unknown command \"%s\"", argv[cmd]);
}
