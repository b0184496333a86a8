#!/usr/bin/env python3
# Copyright (c) eventbox contributors
#
# crash_listener.py: publisher and consumers for 004_worker_crash.pl, all of
# which survive kill -9 of the server: on a lost connection they reconnect
# (retrying while the server restarts or recovers) and carry on.
#
#   publish  --dsn D --events N [--threads T] [--rollback-pct P]
#            --progress FILE --out FILE [--seed S] [--timeout SECS]
#       Publishes markers 1..N, one event ('crash.event', payload
#       {"m": marker, "t": try}) per transaction, which also inserts
#       (marker, try) into the table `committed`.  About P% of the markers
#       roll back on purpose.  A transaction whose outcome is unknown (the
#       connection broke, also during COMMIT) is resolved by looking up its
#       marker in `committed` after reconnecting; if it is not there it
#       never committed and is retried with try + 1.  FILE --progress holds
#       the number of markers finished so far; --out gets one line
#       "rolledback <marker>" per marker rolled back on purpose and a final
#       line "summary <json>".
#
#   listen   --dsn D --out FILE --ready FILE --stop FILE [--timeout SECS]
#       LISTENs on crashpush and eventbox (the default subscription).  For
#       every notification it writes a line to --out, flushed before the
#       ack: "push <id> <marker> <try> <attempt> <subscription>" or
#       "default <id> <marker> <try> <attempt> <subscription>", then acks all
#       push notifications of one read with eventbox.ack(id, 'crashpush',
#       lease), one call per notification.  Exits once FILE --stop exists
#       and writes "summary <json>".
#
#   pull     --dsn D --out FILE [--stop FILE | --drain] [--timeout SECS]
#       Claims batches of crashpull; in the claiming transaction inserts
#       them into the table `pulled` and acks exactly them.  Runs until FILE
#       --stop exists, or with --drain until a claim returns nothing.
#       Writes "summary <json>" to --out.
#
# Errors that do not break the connection are not expected: after 50 of
# them the helper gives up with exit status 1.  Every helper gives up with
# exit status 2 after --timeout seconds.

import argparse
import json
import os
import random
import select
import sys
import threading
import time

import psycopg2
import psycopg2.extensions

CONNECT_PATIENCE = 90.0		# seconds to keep trying to reconnect


class GiveUp(Exception):
    pass


def log(msg):
    sys.stderr.write('%s %s\n' % (time.strftime('%H:%M:%S'), msg))
    sys.stderr.flush()


def connect(dsn, deadline, autocommit=False):
    """Connect, retrying while the server is down, restarting or in
    recovery.  Returns (connection, attempts that failed)."""
    give_up = min(deadline, time.monotonic() + CONNECT_PATIENCE)
    failed = 0
    while True:
        try:
            conn = psycopg2.connect(dsn, connect_timeout=5,
                                    options='-c statement_timeout=60s')
            if autocommit:
                conn.set_isolation_level(
                    psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            return conn, failed
        except psycopg2.OperationalError as e:
            failed += 1
            if time.monotonic() > give_up:
                raise GiveUp('cannot connect: %s' % str(e).strip())
            time.sleep(0.1)


def close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


class Errors:
    """Counts errors: those of a lost connection, expected after a crash,
    and the others, which are not expected at all."""

    def __init__(self):
        self.lock = threading.Lock()
        self.broken = 0
        self.other = 0
        self.samples = {}

    def add(self, conn, e):
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # a crash shows as a closed connection or as an OperationalError
        # ("server closed the connection unexpectedly", "terminating
        # connection because of crash of another server process", ...)
        lost = (conn is None or conn.closed != 0
                or (isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError))
                    and not isinstance(e, psycopg2.extensions.QueryCanceledError)))
        with self.lock:
            if lost:
                self.broken += 1
            else:
                self.other += 1
            if text not in self.samples and len(self.samples) < 20:
                self.samples[text] = 0
                log('error (%s): %s' % ('connection lost' if lost else 'unexpected', text))
            if text in self.samples:
                self.samples[text] += 1
            if self.other > 50:
                raise GiveUp('too many unexpected errors')


# --------------------------------------------------------------------------
# publish
# --------------------------------------------------------------------------

def publish(args):
    deadline = time.monotonic() + args.timeout
    errors = Errors()
    lock = threading.Lock()
    state = {'done': 0, 'committed': 0, 'rolled_back': 0, 'tries': 0,
             'retried': 0, 'unknown_committed': 0, 'unknown_not_committed': 0,
             'reconnects': 0, 'connect_failures': 0}
    out = open(args.out, 'w')
    failure = []

    def progress():
        tmp = args.progress + '.tmp'
        with open(tmp, 'w') as f:
            f.write('%d\n' % state['done'])
        os.rename(tmp, args.progress)

    def worker(k):
        conn = None
        try:
            for m in range(k + 1, args.events + 1, args.threads):
                rollback = random.Random(args.seed * 1000003 + m).randrange(100) < args.rollback_pct
                t = 0
                while True:
                    if time.monotonic() > deadline:
                        raise GiveUp('timeout')
                    t += 1
                    if conn is None:
                        conn, f = connect(args.dsn, deadline)
                        with lock:
                            state['reconnects'] += 1
                            state['connect_failures'] += f
                    with lock:
                        state['tries'] += 1
                        if t > 1:
                            state['retried'] += 1
                    try:
                        cur = conn.cursor()
                        cur.execute('INSERT INTO committed (marker, try) VALUES (%s, %s)', (m, t))
                        cur.execute("SELECT eventbox.publish('crash.event', %s::jsonb, 'crash', %s)",
                                    (json.dumps({'m': m, 't': t}), str(m % 97)))
                        cur.fetchone()
                        if rollback:
                            conn.rollback()
                        else:
                            conn.commit()
                        outcome = 'rolledback' if rollback else 'committed'
                    except psycopg2.Error as e:
                        errors.add(conn, e)
                        close_quietly(conn)
                        conn = None
                        if rollback:
                            # never committed, whatever happened
                            outcome = 'rolledback'
                        else:
                            # the outcome is unknown: look it up
                            outcome = None
                            while outcome is None:
                                if time.monotonic() > deadline:
                                    raise GiveUp('timeout')
                                try:
                                    if conn is None:
                                        conn, f = connect(args.dsn, deadline)
                                        with lock:
                                            state['reconnects'] += 1
                                            state['connect_failures'] += f
                                    cur = conn.cursor()
                                    cur.execute('SELECT try FROM committed WHERE marker = %s', (m,))
                                    row = cur.fetchone()
                                    conn.rollback()
                                    if row is None:
                                        outcome = 'retry'
                                        with lock:
                                            state['unknown_not_committed'] += 1
                                    elif row[0] == t:
                                        outcome = 'committed'
                                        with lock:
                                            state['unknown_committed'] += 1
                                    else:
                                        raise GiveUp('marker %d committed with try %d, expected %d'
                                                     % (m, row[0], t))
                                except psycopg2.Error as e2:
                                    errors.add(conn, e2)
                                    close_quietly(conn)
                                    conn = None
                    if outcome == 'retry':
                        continue
                    with lock:
                        state['done'] += 1
                        if outcome == 'committed':
                            state['committed'] += 1
                        else:
                            state['rolled_back'] += 1
                            out.write('rolledback %d\n' % m)
                        if state['done'] % 100 == 0:
                            progress()
                    break
        except GiveUp as e:
            failure.append(str(e))
            log('publisher thread %d gives up: %s' % (k, e))
        except Exception as e:		# noqa: a bug here must fail the test
            failure.append('%s: %s' % (type(e).__name__, e))
            log('publisher thread %d failed: %s: %s' % (k, type(e).__name__, e))
        finally:
            close_quietly(conn)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    progress()
    state['errors_connection_lost'] = errors.broken
    state['errors_other'] = errors.other
    state['error_samples'] = errors.samples
    state['failure'] = failure
    out.write('summary %s\n' % json.dumps(state))
    out.close()
    if failure:
        return 2 if any(f == 'timeout' for f in failure) else 1
    return 0


# --------------------------------------------------------------------------
# listen
# --------------------------------------------------------------------------

def listen(args):
    deadline = time.monotonic() + args.timeout
    errors = Errors()
    state = {'push': 0, 'default': 0, 'other': 0, 'acked': 0, 'ack_false': 0,
             'connections': 0, 'connect_failures': 0, 'lost_acks': 0}
    out = open(args.out, 'w')
    conn = None
    ready = False
    rc = 0
    try:
        while not os.path.exists(args.stop):
            if time.monotonic() > deadline:
                raise GiveUp('timeout')
            try:
                if conn is None:
                    conn, f = connect(args.dsn, deadline, autocommit=True)
                    state['connections'] += 1
                    state['connect_failures'] += f
                    cur = conn.cursor()
                    cur.execute('LISTEN crashpush')
                    cur.execute('LISTEN eventbox')
                    if not ready:
                        with open(args.ready + '.tmp', 'w') as fr:
                            fr.write('%d\n' % conn.get_backend_pid())
                        os.rename(args.ready + '.tmp', args.ready)
                        ready = True
                if not conn.notifies:
                    r, _, _ = select.select([conn], [], [], 0.2)
                    if not r:
                        continue
                    conn.poll()
                ids = []
                leases = []
                while conn.notifies:
                    n = conn.notifies.pop(0)
                    try:
                        msg = json.loads(n.payload)
                        p = msg.get('payload') or {}
                        line = '%d %s %s %s %s' % (msg['id'], p.get('m'), p.get('t'),
                                                   msg.get('attempt'), msg.get('subscription'))
                    except (ValueError, KeyError, AttributeError, TypeError):
                        msg = None
                    if msg is None:
                        state['other'] += 1
                        out.write('other %s %s\n' % (n.channel, n.payload.replace('\n', ' ')))
                    elif n.channel == 'crashpush':
                        state['push'] += 1
                        out.write('push %s\n' % line)
                        if msg.get('lease'):
                            ids.append(msg['id'])
                            leases.append(msg['lease'])
                    else:
                        state['default'] += 1
                        out.write('default %s\n' % line)
                out.flush()
                if ids:
                    try:
                        cur = conn.cursor()
                        cur.execute("SELECT eventbox.ack(x.id, 'crashpush', x.lease) "
                                    "FROM unnest(%s::bigint[], %s::uuid[]) x(id, lease)",
                                    (ids, leases))
                        for (ok,) in cur.fetchall():
                            if ok:
                                state['acked'] += 1
                            else:
                                state['ack_false'] += 1
                    except psycopg2.Error:
                        state['lost_acks'] += len(ids)
                        raise
            except psycopg2.Error as e:
                errors.add(conn, e)
                close_quietly(conn)
                conn = None
    except GiveUp as e:
        log('listener gives up: %s' % e)
        rc = 2 if str(e) == 'timeout' else 1
    finally:
        close_quietly(conn)
    state['errors_connection_lost'] = errors.broken
    state['errors_other'] = errors.other
    state['error_samples'] = errors.samples
    out.write('summary %s\n' % json.dumps(state))
    out.close()
    return rc


# --------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------

def pull(args):
    deadline = time.monotonic() + args.timeout
    errors = Errors()
    state = {'batches': 0, 'events': 0, 'short_acks': 0, 'connections': 0,
             'connect_failures': 0}
    conn = None
    rc = 0
    try:
        while args.drain or not os.path.exists(args.stop):
            if time.monotonic() > deadline:
                raise GiveUp('timeout')
            try:
                if conn is None:
                    conn, f = connect(args.dsn, deadline)
                    state['connections'] += 1
                    state['connect_failures'] += f
                cur = conn.cursor()
                cur.execute("SELECT id, (payload->>'m')::int, (payload->>'t')::int, attempt "
                            "FROM eventbox.claim_batch(%s, 'crashpull', '5 minutes')",
                            (args.batch,))
                rows = cur.fetchall()
                if rows:
                    cur.execute('INSERT INTO pulled (id, marker, try, attempt) '
                                'SELECT * FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::int[])',
                                ([r[0] for r in rows], [r[1] for r in rows],
                                 [r[2] for r in rows], [r[3] for r in rows]))
                    cur.execute("SELECT eventbox.ack(%s::bigint[], 'crashpull')",
                                ([r[0] for r in rows],))
                    acked = cur.fetchone()[0]
                    if acked != len(rows):
                        state['short_acks'] += 1
                        log('ack acknowledged %d of %d claimed events' % (acked, len(rows)))
                conn.commit()
                if rows:
                    state['batches'] += 1
                    state['events'] += len(rows)
                elif args.drain:
                    break
                else:
                    time.sleep(0.02)
            except psycopg2.Error as e:
                errors.add(conn, e)
                close_quietly(conn)
                conn = None
    except GiveUp as e:
        log('pull consumer gives up: %s' % e)
        rc = 2 if str(e) == 'timeout' else 1
    finally:
        close_quietly(conn)
    state['errors_connection_lost'] = errors.broken
    state['errors_other'] = errors.other
    state['error_samples'] = errors.samples
    with open(args.out, 'a') as out:
        out.write('summary %s\n' % json.dumps(state))
    return rc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('mode', choices=['publish', 'listen', 'pull'])
    ap.add_argument('--dsn', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--timeout', type=float, default=240.0)
    ap.add_argument('--events', type=int, default=20000)
    ap.add_argument('--threads', type=int, default=4)
    ap.add_argument('--rollback-pct', type=int, default=10)
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--progress')
    ap.add_argument('--ready')
    ap.add_argument('--stop')
    ap.add_argument('--drain', action='store_true')
    ap.add_argument('--batch', type=int, default=500)
    args = ap.parse_args()
    if args.mode == 'publish':
        return publish(args)
    if args.mode == 'listen':
        return listen(args)
    return pull(args)


if __name__ == '__main__':
    sys.exit(main())
