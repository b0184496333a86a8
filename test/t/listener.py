#!/usr/bin/env python3
# Copyright (c) eventbox contributors
#
# listener.py: a small LISTEN client for the worker's TAP tests.
#
# Connects, LISTENs on the given channels, then writes each notification it
# receives as one line of JSON to --out:
#   {"channel": "...", "payload": "...", "pid": n, "at": epoch[, "acked": bool]}
# ("payload" is the notification text, unparsed).  Each line is flushed at
# once so the test can poll the file.  Exits after --count notifications
# (0: no limit) or after --timeout seconds, whichever comes first.
#
# --ready FILE        created once the LISTEN commands have committed (and,
#                     with --stuck-until, once the open transaction exists),
#                     so the test knows notifications from then on are seen.
# --ack               for each notification that carries a lease (mode push),
#                     call eventbox.ack(id, subscription, lease) and record
#                     the result as "acked".
# --stuck-until FILE  after LISTEN, open a transaction (BEGIN; SELECT 1) and
#                     keep it open until FILE exists; then COMMIT and listen
#                     as usual.  PostgreSQL delivers nothing to a backend
#                     inside a transaction block, so this listener holds back
#                     the notification queue while it is stuck.

import argparse
import json
import os
import select
import sys
import time

import psycopg2
import psycopg2.extensions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--dsn', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--channel', action='append', required=True)
    ap.add_argument('--count', type=int, default=0)
    ap.add_argument('--timeout', type=float, default=60.0)
    ap.add_argument('--ready')
    ap.add_argument('--ack', action='store_true')
    ap.add_argument('--stuck-until')
    args = ap.parse_args()

    deadline = time.monotonic() + args.timeout
    conn = psycopg2.connect(args.dsn)
    conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    cur = conn.cursor()
    for ch in args.channel:
        cur.execute('LISTEN ' + psycopg2.extensions.quote_ident(ch, cur))

    if args.stuck_until:
        cur.execute('BEGIN')
        cur.execute('SELECT 1')
        cur.fetchall()

    if args.ready:
        with open(args.ready + '.tmp', 'w') as f:
            f.write('%d\n' % conn.get_backend_pid())
        os.rename(args.ready + '.tmp', args.ready)

    if args.stuck_until:
        while not os.path.exists(args.stuck_until):
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.05)
        cur.execute('COMMIT')

    seen = 0
    with open(args.out, 'a') as out:
        while args.count == 0 or seen < args.count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # the notifications that arrived with a command's result are
            # already in conn.notifies; poll() reads any others
            if not conn.notifies:
                r, _, _ = select.select([conn], [], [], min(left, 1.0))
                if not r:
                    continue
                conn.poll()
            while conn.notifies and (args.count == 0 or seen < args.count):
                n = conn.notifies.pop(0)
                rec = {'channel': n.channel, 'payload': n.payload, 'pid': n.pid,
                       'at': time.time()}
                if args.ack:
                    try:
                        msg = json.loads(n.payload)
                    except ValueError:
                        msg = {}
                    if isinstance(msg, dict) and msg.get('lease'):
                        cur.execute('SELECT eventbox.ack(%s, %s, %s::uuid)',
                                    (msg['id'], msg['subscription'], msg['lease']))
                        rec['acked'] = cur.fetchone()[0]
                out.write(json.dumps(rec) + '\n')
                out.flush()
                seen += 1
    conn.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
