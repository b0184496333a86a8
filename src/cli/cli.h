/*-------------------------------------------------------------------------
 *
 * cli.h
 *		Shared declarations of the eventbox command-line tool: exit codes,
 *		connection handling, error reporting and small output helpers.
 *
 * The tool is an ordinary libpq client.  Each subcommand lives in its own
 * file (stats.c, tail.c, deadletters.c, relay.c); eventbox.c holds main()
 * and what they share.
 *
 *-------------------------------------------------------------------------
 */
#ifndef EVENTBOX_CLI_H
#define EVENTBOX_CLI_H

#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <libpq-fe.h>

/* Exit codes, documented in docs/cli.md and in --help. */
#define EXIT_OK			0		/* success */
#define EXIT_ERROR		1		/* the server or NATS reported an error */
#define EXIT_USAGE		2		/* bad command line */
#define EXIT_CONNECT	3		/* could not connect to PostgreSQL (or NATS) */
#define EXIT_INTERRUPT	130		/* stopped by SIGINT; finished work is kept */

/* Connection options common to every subcommand. */
typedef struct CliConn
{
	const char *dbname;			/* -d: database name or conninfo string */
	const char *host;			/* -h */
	const char *port;			/* -p */
	const char *user;			/* -U */
} CliConn;

extern const char *progname;

/* Set by the signal handlers installed with cli_install_signals(). */
extern volatile sig_atomic_t cli_interrupted;	/* SIGINT */
extern volatile sig_atomic_t cli_terminated;	/* SIGTERM */
extern int	cli_wake_pipe[2];	/* written by the handlers; select() on [0] */

/* Common long options; each subcommand appends them to its own table. */
#define CLI_CONN_OPTIONS \
	{"dbname", required_argument, NULL, 'd'}, \
	{"host", required_argument, NULL, 'h'}, \
	{"port", required_argument, NULL, 'p'}, \
	{"username", required_argument, NULL, 'U'}
#define CLI_CONN_SHORT "d:h:p:U:"

extern bool cli_conn_option(CliConn *conn, int c, const char *arg);
extern PGconn *cli_connect(const CliConn *conn, bool exit_on_failure);
extern void cli_check_extension(PGconn *pg);
extern void cli_install_signals(void);
extern void cli_drain_wake_pipe(void);

extern void cli_usage_error(const char *cmd, const char *fmt,...)
			__attribute__((format(printf, 2, 3), noreturn));
extern void cli_report_result(const char *what, const PGresult *res);
extern void cli_fail_result(const char *what, PGresult *res) __attribute__((noreturn));
extern PGresult *cli_exec(PGconn *pg, const char *what, const char *sql,
						  int nparams, const char *const *params);
extern void cli_json_string(FILE *out, const char *s);
extern bool cli_parse_int(const char *s, long min, long max, long *out);

extern int	cmd_stats(int argc, char **argv);
extern int	cmd_tail(int argc, char **argv);
extern int	cmd_dead_letters(int argc, char **argv);
extern int	cmd_relay(int argc, char **argv);

#endif
