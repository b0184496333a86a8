/*-------------------------------------------------------------------------
 *
 * relay.c
 *		eventbox relay nats: forward a pull subscription to NATS JetStream.
 *
 * The loop: claim a batch (eventbox.claim_batch, its own short transaction),
 * publish every event asynchronously to subject <prefix>.<event_type> with
 * header Nats-Msg-Id = the event's UUID, wait for every PubAck, then ack in
 * PostgreSQL exactly the events JetStream stored (one eventbox.ack call) and
 * nack the others with the NATS error.  An event is never acked unless a
 * PubAck for it arrived.  If the relay dies between PubAck and ack, the
 * lease expires, the event is claimed and published again with the same
 * Nats-Msg-Id, and the stream's duplicate window drops the copy: exactly once
 * in the stream as long as the redelivery comes within the window.
 *
 * When a claim finds nothing the relay waits for the subscription's wake-up
 * notification (LISTEN); it does not poll.  Both connections are re-made
 * with exponential backoff.  SIGTERM or SIGINT: finish the batch in flight
 * (PubAcks, then ack/nack), then exit 0.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <nats/nats.h>

#include "cli.h"

/* What became of one event of the batch in flight. */
typedef enum
{
	EV_PENDING = 0,				/* published, no answer yet */
	EV_STORED,					/* PubAck received: JetStream has it */
	EV_FAILED					/* publish failed; error holds why */
} EventState;

typedef struct RelayEvent
{
	long long	id;
	EventState	state;
	bool		duplicate;
	char		error[1024];
} RelayEvent;

typedef struct Relay
{
	/* configuration */
	CliConn		conn;
	const char *url;
	const char *prefix;
	const char *sub;
	const char *channel;
	const char *lease;
	long		batch;
	long		ack_timeout_ms;
	bool		exit_when_idle;
	bool		verbose;

	/* connections */
	PGconn	   *pg;
	natsConnection *nc;
	jsCtx	   *js;

	/* the batch in flight, shared with the PubAck callback */
	pthread_mutex_t mu;
	RelayEvent *events;
	int			nevents;
	bool		closed;			/* batch decided: late callbacks are ignored */

	/* totals */
	long long	stored;
	long long	duplicates;
	long long	failed;
	long long	acked;
} Relay;

static void
rlog(const char *fmt,...)
{
	va_list		ap;
	struct timeval tv;
	struct tm	tm;
	char		buf[32];

	gettimeofday(&tv, NULL);
	localtime_r(&tv.tv_sec, &tm);
	strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
	fprintf(stderr, "%s.%03d eventbox relay: ", buf, (int) (tv.tv_usec / 1000));
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void
relay_usage(void)
{
	printf("eventbox relay nats forwards the events of a pull subscription to NATS\n"
		   "JetStream, exactly once into the stream.\n"
		   "\n"
		   "Usage:\n"
		   "  eventbox relay nats -s SUBSCRIPTION [OPTION]...\n"
		   "\n"
		   "Options (environment variable in brackets; flags win):\n"
		   "  -s, --subscription=NAME  pull subscription to claim from [EVENTBOX_RELAY_SUBSCRIPTION]\n"
		   "      --nats-url=URL       NATS server(s), comma-separated [NATS_URL]\n"
		   "                           (default nats://127.0.0.1:4222)\n"
		   "      --prefix=PREFIX      subject prefix: events go to PREFIX.EVENT_TYPE\n"
		   "                           [EVENTBOX_RELAY_PREFIX] (default eventbox)\n"
		   "      --batch-size=N       events per claim [EVENTBOX_RELAY_BATCH_SIZE] (default 500)\n"
		   "      --lease=INTERVAL     lease of each claim [EVENTBOX_RELAY_LEASE]\n"
		   "                           (default: the subscription's lease)\n"
		   "      --ack-timeout=MS     longest wait for the PubAcks of a batch\n"
		   "                           [EVENTBOX_RELAY_ACK_TIMEOUT] (default 10000; never past\n"
		   "                           the lease)\n"
		   "  -c, --channel=CHANNEL    LISTEN channel of the subscription (default: looked up,\n"
		   "                           or the subscription's name)\n"
		   "      --exit-when-idle     exit 0 once a claim finds nothing (for scripts and tests)\n"
		   "  -v, --verbose            log every batch\n"
		   "  -d, -h, -p, -U           connection options (see eventbox --help)\n"
		   "      --help               show this help\n"
		   "\n"
		   "Each event is published with headers Nats-Msg-Id (event_id), Eventbox-Id,\n"
		   "Eventbox-Event-Type, Eventbox-Aggregate-Type, Eventbox-Aggregate-Id,\n"
		   "Eventbox-Occurred-At, Eventbox-Attempt and Eventbox-Headers (the event's headers\n"
		   "as JSON); the message data is the payload (JSON). Only events with a PubAck\n"
		   "are acked; failed ones are nacked with the NATS error (retry, then dead letter).\n"
		   "The stream's duplicate window must be longer than the lease plus the\n"
		   "subscription's backoff_max (see docs/cli.md). Needs the role eventbox_consumer.\n"
		   "SIGTERM/SIGINT: finish the batch in flight, then exit 0.\n"
		   "\n"
		   "Exit codes: 0 stopped cleanly, 1 fatal error (unknown or push subscription,\n"
		   "missing privilege), 2 bad usage.\n");
}

/* Sleep up to ms, waking early on SIGTERM/SIGINT. */
static void
relay_sleep(long ms)
{
	struct timeval tv;
	fd_set		fds;

	if (cli_terminated || cli_interrupted)
		return;
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	FD_ZERO(&fds);
	FD_SET(cli_wake_pipe[0], &fds);
	select(cli_wake_pipe[0] + 1, &fds, NULL, NULL, &tv);
}

static bool
stopping(void)
{
	return cli_terminated || cli_interrupted;
}

/* SQLSTATEs that no retry can fix: exit instead of looping. */
static bool
fatal_sqlstate(const char *st)
{
	static const char *const fatal[] = {
		"42704", "42809", "42501", "3F000", "42883", "22023", "22004", "54000", NULL
	};
	int			i;

	for (i = 0; st && fatal[i]; i++)
		if (strcmp(st, fatal[i]) == 0)
			return true;
	return false;
}

/*
 * pg_connect (re)connects to PostgreSQL with backoff until it works or a
 * signal asks us to stop, and LISTENs on the subscription's channel.
 */
static bool
pg_connect(Relay *r)
{
	long		backoff = 100;

	while (!stopping())
	{
		PGresult   *res;

		if (r->pg)
			PQfinish(r->pg);
		r->pg = cli_connect(&r->conn, false);
		if (r->pg)
		{
			char	   *ident;
			char		sql[600];

			res = PQexec(r->pg, "SET application_name = 'eventbox relay'");
			PQclear(res);
			if (r->channel == NULL)
			{
				const char *params[1] = {r->sub};

				/* readable by eventbox_admin only; else the default channel */
				res = PQexecParams(r->pg, "SELECT channel FROM eventbox.subscriptions WHERE name = $1",
								   1, NULL, params, NULL, NULL, 0);
				if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
					r->channel = strdup(PQgetvalue(res, 0, 0));
				else
					r->channel = r->sub;
				PQclear(res);
			}
			ident = PQescapeIdentifier(r->pg, r->channel, strlen(r->channel));
			snprintf(sql, sizeof(sql), "LISTEN %s", ident);
			PQfreemem(ident);
			res = PQexec(r->pg, sql);
			if (PQresultStatus(res) == PGRES_COMMAND_OK)
			{
				PQclear(res);
				rlog("connected to PostgreSQL (database %s), listening on channel \"%s\"",
					 PQdb(r->pg), r->channel);
				return true;
			}
			cli_report_result("starting to listen", res);
			PQclear(res);
		}
		rlog("PostgreSQL unavailable; retrying in %ld ms", backoff);
		relay_sleep(backoff);
		backoff = backoff * 2 > 30000 ? 30000 : backoff * 2;
	}
	return false;
}

/* Index of event id in the batch (sorted by id), or -1. */
static int
find_event(Relay *r, long long id)
{
	int			lo = 0;
	int			hi = r->nevents - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;

		if (r->events[mid].id == id)
			return mid;
		if (r->events[mid].id < id)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return -1;
}

/*
 * on_puback runs in a NATS library thread for every asynchronously
 * published message: a PubAck (stored, maybe as a duplicate) or an error.
 */
static void
on_puback(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
	Relay	   *r = closure;
	const char *idv = NULL;
	int			i;

	(void) js;
	if (natsMsgHeader_Get(msg, "Eventbox-Id", &idv) == NATS_OK && idv)
	{
		pthread_mutex_lock(&r->mu);
		i = r->closed ? -1 : find_event(r, atoll(idv));
		if (i >= 0 && r->events[i].state == EV_PENDING)
		{
			if (pa != NULL && pa->Stream != NULL && pa->Stream[0] != '\0')
			{
				r->events[i].state = EV_STORED;
				r->events[i].duplicate = pa->Duplicate;
			}
			else
			{
				r->events[i].state = EV_FAILED;
				if (pae != NULL)
					snprintf(r->events[i].error, sizeof(r->events[i].error),
							 "NATS publish to subject \"%s\" failed: %s%s%s (error code %d)%s",
							 natsMsg_GetSubject(msg), natsStatus_GetText(pae->Err),
							 pae->ErrText && strcmp(pae->ErrText, natsStatus_GetText(pae->Err)) != 0 ? ": " : "",
							 pae->ErrText && strcmp(pae->ErrText, natsStatus_GetText(pae->Err)) != 0 ? pae->ErrText : "",
							 (int) pae->ErrCode,
							 pae->Err == NATS_NO_RESPONDERS
							 ? "; no JetStream stream stores this subject" : "");
				else
					snprintf(r->events[i].error, sizeof(r->events[i].error),
							 "NATS publish: PubAck without a stream");
			}
		}
		pthread_mutex_unlock(&r->mu);
	}
	natsMsg_Destroy(msg);
}

/*
 * nats_connect connects to NATS (with our own backoff for the first
 * connection; afterwards the library reconnects by itself) and makes the
 * JetStream context whose PubAcks go to on_puback.
 */
static bool
nats_connect(Relay *r)
{
	long		backoff = 100;

	while (!stopping())
	{
		natsOptions *opts = NULL;
		natsStatus	s;
		jsOptions	jo;

		s = natsOptions_Create(&opts);
		if (s == NATS_OK)
			s = natsOptions_SetServers(opts, NULL, 0);
		if (s == NATS_OK)
			s = natsOptions_SetURL(opts, r->url);
		if (s == NATS_OK)
			s = natsOptions_SetName(opts, "eventbox relay");
		if (s == NATS_OK)
			s = natsOptions_SetMaxReconnect(opts, -1);
		if (s == NATS_OK)
			s = natsOptions_SetReconnectWait(opts, 250);
		if (s == NATS_OK)
			s = natsOptions_SetReconnectJitter(opts, 100, 1000);
		if (s == NATS_OK)
			s = natsConnection_Connect(&r->nc, opts);
		natsOptions_Destroy(opts);
		if (s == NATS_OK)
		{
			jsOptions_Init(&jo);
			jo.PublishAsync.AckHandler = on_puback;
			jo.PublishAsync.AckHandlerClosure = r;
			jo.PublishAsync.MaxPending = r->batch;
			s = natsConnection_JetStream(&r->js, r->nc, &jo);
			if (s == NATS_OK)
			{
				rlog("connected to NATS at %s", r->url);
				return true;
			}
			natsConnection_Destroy(r->nc);
			r->nc = NULL;
		}
		rlog("could not connect to NATS at %s: %s; retrying in %ld ms "
			 "(check --nats-url / NATS_URL and that nats-server runs with -js)",
			 r->url, natsStatus_GetText(s), backoff);
		relay_sleep(backoff);
		backoff = backoff * 2 > 30000 ? 30000 : backoff * 2;
	}
	return false;
}

static int
cmp_event(const void *a, const void *b)
{
	long long	x = ((const RelayEvent *) a)->id;
	long long	y = ((const RelayEvent *) b)->id;

	return x < y ? -1 : x > y;
}

/* Replace CR and LF, which NATS headers cannot carry, by spaces. */
static const char *
header_value(const char *v, char *buf, size_t size)
{
	char	   *p;

	if (strpbrk(v, "\r\n") == NULL)
		return v;
	snprintf(buf, size, "%s", v);
	for (p = buf; *p; p++)
		if (*p == '\r' || *p == '\n')
			*p = ' ';
	return buf;
}

static const char *claim_sql =
"SELECT id, event_id, event_type, aggregate_type, aggregate_id, payload::text,"
"       headers::text, pg_catalog.to_json(occurred_at)#>>'{}', attempt, lease,"
"       GREATEST(0, EXTRACT(epoch FROM leased_until - pg_catalog.clock_timestamp()) * 1000)::bigint"
"  FROM eventbox.claim_batch($1::int, $2, $3::interval)";

/*
 * relay_batch publishes a claimed batch and settles it in PostgreSQL.
 * Returns false if the PostgreSQL connection was lost while settling (the
 * leases then expire and the events come back; the stream drops the copies).
 */
static bool
relay_batch(Relay *r, PGresult *res)
{
	int			n = PQntuples(res);
	int			i;
	jsPubOptions po;
	natsStatus	s;
	const char *lease = PQgetvalue(res, 0, 9);
	long		left_ms = atol(PQgetvalue(res, 0, 10));
	long		wait_ms;
	char	   *ids;
	size_t		idlen = 3;
	int			nstored = 0;
	int			nfailed = 0;
	int			ndup = 0;

	r->events = calloc(n, sizeof(RelayEvent));
	for (i = 0; i < n; i++)
		r->events[i].id = atoll(PQgetvalue(res, i, 0));
	qsort(r->events, n, sizeof(RelayEvent), cmp_event);
	r->nevents = n;
	r->closed = false;

	/* never wait past the lease: an ack after it would be refused anyway */
	wait_ms = r->ack_timeout_ms;
	if (left_ms - 500 < wait_ms)
		wait_ms = left_ms - 500 > 100 ? left_ms - 500 : 100;
	jsPubOptions_Init(&po);
	po.MaxWait = wait_ms;

	for (i = 0; i < n; i++)
	{
		natsMsg    *msg = NULL;
		char		subject[600];
		const char *payload = PQgetvalue(res, i, 5);
		char		buf[512];

		snprintf(subject, sizeof(subject), "%s.%s", r->prefix, PQgetvalue(res, i, 2));
		s = natsMsg_Create(&msg, subject, NULL, payload, (int) strlen(payload));
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Nats-Msg-Id", PQgetvalue(res, i, 1));
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Eventbox-Id", PQgetvalue(res, i, 0));
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Eventbox-Event-Type", PQgetvalue(res, i, 2));
		if (s == NATS_OK && !PQgetisnull(res, i, 3))
			s = natsMsgHeader_Set(msg, "Eventbox-Aggregate-Type",
								  header_value(PQgetvalue(res, i, 3), buf, sizeof(buf)));
		if (s == NATS_OK && !PQgetisnull(res, i, 4))
			s = natsMsgHeader_Set(msg, "Eventbox-Aggregate-Id",
								  header_value(PQgetvalue(res, i, 4), buf, sizeof(buf)));
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Eventbox-Occurred-At", PQgetvalue(res, i, 7));
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Eventbox-Attempt", PQgetvalue(res, i, 8));
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Eventbox-Subscription", r->sub);
		if (s == NATS_OK)
			s = natsMsgHeader_Set(msg, "Eventbox-Headers", PQgetvalue(res, i, 6));
		if (s == NATS_OK)
			s = js_PublishMsgAsync(r->js, &msg, &po);
		if (s != NATS_OK)
		{
			int			k = find_event(r, atoll(PQgetvalue(res, i, 0)));

			pthread_mutex_lock(&r->mu);
			if (k >= 0 && r->events[k].state == EV_PENDING)
			{
				r->events[k].state = EV_FAILED;
				snprintf(r->events[k].error, sizeof(r->events[k].error),
						 "NATS publish to subject \"%.300s\" failed: %s: %.300s", subject,
						 natsStatus_GetText(s), nats_GetLastError(NULL));
			}
			pthread_mutex_unlock(&r->mu);
			natsMsg_Destroy(msg);
		}
	}

	/* wait for every PubAck (or error) */
	s = js_PublishAsyncComplete(r->js, &po);
	if (s != NATS_OK)
	{
		natsMsgList pending;

		if (js_PublishAsyncGetPendingList(&pending, r->js) == NATS_OK)
			natsMsgList_Destroy(&pending);
	}
	pthread_mutex_lock(&r->mu);
	r->closed = true;
	for (i = 0; i < n; i++)
	{
		if (r->events[i].state == EV_PENDING)
		{
			r->events[i].state = EV_FAILED;
			snprintf(r->events[i].error, sizeof(r->events[i].error),
					 "no PubAck from NATS within %ld ms (%s)", wait_ms, natsStatus_GetText(s));
		}
		if (r->events[i].state == EV_STORED)
		{
			nstored++;
			idlen += 21;
			ndup += r->events[i].duplicate;
		}
		else
			nfailed++;
	}
	pthread_mutex_unlock(&r->mu);

	/* ack what JetStream stored, in one call */
	if (nstored > 0)
	{
		const char *params[3];
		PGresult   *ar;
		char	   *p;

		ids = malloc(idlen);
		p = ids;
		*p++ = '{';
		for (i = 0; i < n; i++)
			if (r->events[i].state == EV_STORED)
				p += sprintf(p, "%s%lld", p - ids > 1 ? "," : "", r->events[i].id);
		*p++ = '}';
		*p = '\0';
		params[0] = ids;
		params[1] = r->sub;
		params[2] = lease;
		ar = PQexecParams(r->pg, "SELECT eventbox.ack($1::bigint[], $2, $3::uuid)", 3, NULL,
						  params, NULL, NULL, 0);
		free(ids);
		if (PQresultStatus(ar) != PGRES_TUPLES_OK)
		{
			cli_report_result("acking a batch", ar);
			PQclear(ar);
			rlog("could not ack %d stored events; their lease will expire and they will be "
				 "published again (the stream's duplicate window drops the copies)", nstored);
			free(r->events);
			r->events = NULL;
			return PQstatus(r->pg) != CONNECTION_BAD;
		}
		if (atol(PQgetvalue(ar, 0, 0)) < nstored)
			rlog("only %ld of %d stored events were acked: the lease ran out; the rest will be "
				 "published again and dropped by the stream's duplicate window "
				 "(raise --lease or lower --batch-size)", atol(PQgetvalue(ar, 0, 0)), nstored);
		r->acked += atol(PQgetvalue(ar, 0, 0));
		PQclear(ar);
	}

	/* nack the failures with the NATS error */
	for (i = 0; i < n; i++)
	{
		char		idbuf[32];
		const char *params[4];
		PGresult   *nr;

		if (r->events[i].state != EV_FAILED)
			continue;
		snprintf(idbuf, sizeof(idbuf), "%lld", r->events[i].id);
		params[0] = idbuf;
		params[1] = r->events[i].error;
		params[2] = r->sub;
		params[3] = lease;
		nr = PQexecParams(r->pg,
						  "SELECT eventbox.nack($1::bigint, $2, NULL, $3, $4::uuid)",
						  4, NULL, params, NULL, NULL, 0);
		if (PQresultStatus(nr) != PGRES_TUPLES_OK)
		{
			const char *st = PQresultErrorField(nr, PG_DIAG_SQLSTATE);

			/* 55000: the lease ran out meanwhile; expiry counted the attempt */
			if (st == NULL || strcmp(st, "55000") != 0)
				cli_report_result("nacking an event", nr);
			if (PQstatus(r->pg) == CONNECTION_BAD)
			{
				PQclear(nr);
				free(r->events);
				r->events = NULL;
				return false;
			}
		}
		else if (r->verbose || strcmp(PQgetvalue(nr, 0, 0), "dead") == 0)
			rlog("event %lld %s: %s", r->events[i].id,
				 strcmp(PQgetvalue(nr, 0, 0), "dead") == 0 ? "dead-lettered" : "will be retried",
				 r->events[i].error);
		PQclear(nr);
	}

	r->stored += nstored;
	r->duplicates += ndup;
	r->failed += nfailed;
	if (r->verbose || nfailed > 0)
		rlog("batch of %d: %d stored (%d duplicates), %d failed", n, nstored, ndup, nfailed);
	free(r->events);
	r->events = NULL;
	r->nevents = 0;
	return true;
}

/*
 * wait_for_wakeup blocks until a notification arrives on the PostgreSQL
 * connection or a signal asks us to stop.  Returns false if the connection
 * was lost.
 */
static bool
wait_for_wakeup(Relay *r)
{
	PGnotify   *n;
	bool		got = false;

	for (;;)
	{
		fd_set		fds;
		int			sock = PQsocket(r->pg);
		int			maxfd;

		if (!PQconsumeInput(r->pg))
			return false;
		while ((n = PQnotifies(r->pg)) != NULL)
		{
			got = true;
			PQfreemem(n);
		}
		if (got || stopping())
			return true;
		FD_ZERO(&fds);
		FD_SET(sock, &fds);
		FD_SET(cli_wake_pipe[0], &fds);
		maxfd = sock > cli_wake_pipe[0] ? sock : cli_wake_pipe[0];
		if (select(maxfd + 1, &fds, NULL, NULL, NULL) < 0 && errno != EINTR)
			return false;
		cli_drain_wake_pipe();
	}
}

static const char *
env_or(const char *name, const char *dflt)
{
	const char *v = getenv(name);

	return v && v[0] ? v : dflt;
}

int
cmd_relay(int argc, char **argv)
{
	static struct option opts[] = {
		{"subscription", required_argument, NULL, 's'},
		{"nats-url", required_argument, NULL, 'N'},
		{"prefix", required_argument, NULL, 'P'},
		{"batch-size", required_argument, NULL, 'b'},
		{"lease", required_argument, NULL, 'L'},
		{"ack-timeout", required_argument, NULL, 'A'},
		{"channel", required_argument, NULL, 'c'},
		{"exit-when-idle", no_argument, NULL, 'x'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, '?' + 256},
		CLI_CONN_OPTIONS,
		{NULL, 0, NULL, 0}
	};
	Relay		r = {0};
	const char *batch_s;
	const char *ack_s;
	int			c;
	int			rc = EXIT_OK;
	long		backoff = 100;

	r.url = env_or("NATS_URL", "nats://127.0.0.1:4222");
	r.prefix = env_or("EVENTBOX_RELAY_PREFIX", "eventbox");
	r.sub = env_or("EVENTBOX_RELAY_SUBSCRIPTION", NULL);
	r.lease = env_or("EVENTBOX_RELAY_LEASE", NULL);
	batch_s = env_or("EVENTBOX_RELAY_BATCH_SIZE", "500");
	ack_s = env_or("EVENTBOX_RELAY_ACK_TIMEOUT", "10000");

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "s:c:v" CLI_CONN_SHORT, opts, NULL)) != -1)
	{
		if (cli_conn_option(&r.conn, c, optarg))
			continue;
		switch (c)
		{
			case 's':
				r.sub = optarg;
				break;
			case 'N':
				r.url = optarg;
				break;
			case 'P':
				r.prefix = optarg;
				break;
			case 'b':
				batch_s = optarg;
				break;
			case 'L':
				r.lease = optarg;
				break;
			case 'A':
				ack_s = optarg;
				break;
			case 'c':
				r.channel = optarg;
				break;
			case 'x':
				r.exit_when_idle = true;
				break;
			case 'v':
				r.verbose = true;
				break;
			case '?' + 256:
				relay_usage();
				return EXIT_OK;
			default:
				cli_usage_error("relay", "unknown or incomplete option \"%s\"", argv[optind - 1]);
		}
	}
	if (optind >= argc)
		cli_usage_error("relay", "no target given: use \"eventbox relay nats\"");
	if (strcmp(argv[optind], "nats") != 0)
		cli_usage_error("relay", "unknown relay target \"%s\": only \"nats\" is supported", argv[optind]);
	if (optind + 1 < argc)
		cli_usage_error("relay", "unexpected argument \"%s\"", argv[optind + 1]);
	if (r.sub == NULL)
		cli_usage_error("relay", "no subscription given: use --subscription or EVENTBOX_RELAY_SUBSCRIPTION");
	if (!cli_parse_int(batch_s, 1, 1000000, &r.batch))
		cli_usage_error("relay", "invalid batch size \"%s\": give a positive number", batch_s);
	if (!cli_parse_int(ack_s, 1, 86400000L, &r.ack_timeout_ms))
		cli_usage_error("relay", "invalid ack timeout \"%s\": give milliseconds", ack_s);
	if (r.prefix[0] == '\0' || strpbrk(r.prefix, " \t\r\n*>") || r.prefix[0] == '.' ||
		r.prefix[strlen(r.prefix) - 1] == '.')
		cli_usage_error("relay", "invalid subject prefix \"%s\": NATS subject tokens without spaces, * or >, "
						"no leading or trailing dot", r.prefix);

	cli_install_signals();
	pthread_mutex_init(&r.mu, NULL);
	if (nats_Open(-1) != NATS_OK)
	{
		fprintf(stderr, "%s: could not initialize the NATS library\n", progname);
		return EXIT_ERROR;
	}

	if (!pg_connect(&r) || !nats_connect(&r))
		goto done;
	rlog("relaying subscription \"%s\" to subjects \"%s.<event_type>\" (batch size %ld)",
		 r.sub, r.prefix, r.batch);

	while (!stopping())
	{
		char		nbuf[32];
		const char *params[3];
		PGresult   *res;

		if (natsConnection_Status(r.nc) != NATS_CONN_STATUS_CONNECTED)
		{
			/* claiming now would only burn attempts: wait for the reconnect */
			rlog("NATS connection is down; waiting %ld ms before claiming", backoff);
			relay_sleep(backoff);
			backoff = backoff * 2 > 30000 ? 30000 : backoff * 2;
			continue;
		}
		backoff = 100;

		snprintf(nbuf, sizeof(nbuf), "%ld", r.batch);
		params[0] = nbuf;
		params[1] = r.sub;
		params[2] = r.lease;
		res = PQexecParams(r.pg, claim_sql, 3, NULL, params, NULL, NULL, 0);
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);

			if (PQstatus(r.pg) == CONNECTION_BAD)
			{
				PQclear(res);
				rlog("lost the connection to PostgreSQL; reconnecting");
				if (!pg_connect(&r))
					break;
				continue;
			}
			cli_report_result("claiming a batch", res);
			PQclear(res);
			if (fatal_sqlstate(st))
			{
				rc = EXIT_ERROR;
				break;
			}
			relay_sleep(1000);
			continue;
		}
		if (PQntuples(res) == 0)
		{
			PQclear(res);
			if (r.exit_when_idle)
				break;
			if (!wait_for_wakeup(&r))
			{
				rlog("lost the connection to PostgreSQL; reconnecting");
				if (!pg_connect(&r))
					break;
			}
			continue;
		}
		if (!relay_batch(&r, res))
		{
			PQclear(res);
			rlog("lost the connection to PostgreSQL; reconnecting");
			if (!pg_connect(&r))
				break;
			continue;
		}
		PQclear(res);
	}

done:
	rlog("stopping: %lld events stored in JetStream (%lld duplicates dropped by the stream), "
		 "%lld acked, %lld publish failures", r.stored, r.duplicates, r.acked, r.failed);
	if (r.js)
		jsCtx_Destroy(r.js);
	if (r.nc)
	{
		natsConnection_FlushTimeout(r.nc, 2000);
		natsConnection_Destroy(r.nc);
	}
	if (r.pg)
		PQfinish(r.pg);
	nats_CloseAndWait(2000);
	return rc;
}
