#!/usr/bin/env python3
"""Commit -> LISTEN receipt latency of eventbox push delivery (and anchors).

Publishers commit one eventbox.publish() per transaction at a fixed total
rate, spread over several connections; a listener on the subscription's
channel records when each event's notification arrives.  Latency is
receipt time minus the time the publisher's COMMIT returned (both read from
CLOCK_MONOTONIC, which all processes on the machine share), so it is a
slight underestimate of "commit to receipt" by one local round trip, and it
includes the worker's wake-up, its delivery transaction and the NOTIFY
queue.

Usage: latency.py --dsn DSN [--rate 1000] [--seconds 10] [--publishers 4]
                  [--channel eventbox] [--warmup 1] [--json]
                  [--system eventbox|outbox-notify|pgq] [--queue Q --consumer C]
                  [--quiet SECONDS]

--system picks what is measured (default eventbox, as above):
  outbox-notify  a hand-written outbox table whose AFTER INSERT trigger does
                 pg_notify(channel, NEW.id::text); publishers INSERT one row
                 per transaction into --table (default event_outbox_notify)
                 and the listener LISTENs on --channel (use "outbox").
  pgq            publishers call pgq.insert_event(queue, 'bench.latency', key)
                 one per transaction; a consumer polls pgq.next_batch every
                 --poll seconds (default 0.01), reads the batch with
                 pgq.get_batch_events and finishes it; receipt = when the
                 batch's events were read.  Ticks come from whatever ticks
                 the queue (pgqd in bench/run.sh).  The consumer is
                 registered if it is not yet.

Prints a one-line summary (or JSON with --json): events sent and received,
achieved rate, p50, p99, max in milliseconds, and how many never arrived.
"""
import argparse
import json
import multiprocessing
import os
import tempfile
import select
import sys
import time

import psycopg2
import psycopg2.extensions


def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def publisher(dsn, rate, deadline_ns, start_ns, tag, committed, errors, opts=None):
    """Publish at `rate` events/s until deadline; record commit times."""
    system = getattr(opts, "system", "eventbox")
    conn = psycopg2.connect(dsn, application_name="eventbox-bench-publisher")
    cur = conn.cursor()
    interval = 1e9 / rate
    n = 0
    try:
        while True:
            due = start_ns + int(n * interval)
            t = now_ns()
            # stop at the deadline even when behind schedule, so that
            # achieved_rate is what was really sustained
            if due > deadline_ns or t > deadline_ns:
                break
            if due > t:
                time.sleep((due - t) / 1e9)
            key = "%s-%d" % (tag, n)
            if system == "eventbox":
                cur.execute("SELECT eventbox.publish('bench.latency', %s)",
                            (json.dumps({"k": key}),))
            elif system == "outbox-notify":
                cur.execute("INSERT INTO " + opts.table + " (event_type, payload)"
                            " VALUES ('bench.latency', %s) RETURNING id",
                            (json.dumps({"k": key}),))
                key = str(cur.fetchone()[0])
            else:
                cur.execute("SELECT pgq.insert_event(%s, 'bench.latency', %s)",
                            (opts.queue, key))
            conn.commit()
            committed[key] = now_ns()
            n += 1
    except Exception as e:  # report, do not hide
        errors.append(repr(e))
    finally:
        conn.close()


def publisher_process(path, *args):
    """A publisher in a process of its own (no GIL shared with the
    listener); hands its commit times back through a file."""
    committed, errors = {}, []
    try:
        publisher(*args[:5], committed, errors, args[5])
    except BaseException as e:  # report, do not hide
        errors.append(repr(e))
    finally:
        with open(path, "w") as f:
            json.dump({"committed": committed, "errors": errors}, f)
        os._exit(0)   # no atexit/finalizers in the forked child


def percentile(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(p * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s in total")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--channel", default="eventbox")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds at the start not counted")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--system", default="eventbox",
                    choices=["eventbox", "outbox-notify", "pgq"])
    ap.add_argument("--table", default="event_outbox_notify",
                    help="outbox-notify: the table with the NOTIFY trigger")
    ap.add_argument("--queue", default="latq", help="pgq: queue name")
    ap.add_argument("--consumer", default="lat", help="pgq: consumer name")
    ap.add_argument("--poll", type=float, default=0.01,
                    help="pgq: seconds between next_batch polls when idle")
    ap.add_argument("--quiet", type=float, default=2.0,
                    help="stop after the publishers are done and nothing "
                         "arrived for this many seconds")
    args = ap.parse_args()

    listener = psycopg2.connect(args.dsn, application_name="eventbox-bench-listener")
    if args.system == "pgq":
        lc = listener.cursor()
        lc.execute("SELECT pgq.register_consumer(%s, %s)", (args.queue, args.consumer))
        listener.commit()
    else:
        listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        listener.cursor().execute('LISTEN "%s"' % args.channel.replace('"', '""'))

    committed = {}
    received = {}
    errors = []
    # Publishers are processes, so that Python's GIL does not cap the
    # offered rate or delay the listener.  They are forked after LISTEN (so
    # no event can be committed before it); they never touch the inherited
    # connection and leave with os._exit, so it is not closed under us.
    tmpdir = tempfile.mkdtemp(prefix="latency-")
    start = now_ns() + 300_000_000
    deadline = start + int(args.seconds * 1e9)
    threads = [multiprocessing.Process(
        target=publisher_process,
        args=(os.path.join(tmpdir, "p%d.json" % i), args.dsn, args.rate / args.publishers,
              deadline, start, "p%d" % i, args))
        for i in range(args.publishers)]
    for t in threads:
        t.start()

    # receive until the publishers are done and nothing arrived for --quiet s
    quiet_since = None
    batches = 0
    while args.system == "pgq":
        lc.execute("SELECT pgq.next_batch(%s, %s)", (args.queue, args.consumer))
        batch = lc.fetchone()[0]
        if batch is not None:
            lc.execute("SELECT ev_data FROM pgq.get_batch_events(%s)", (batch,))
            rows = lc.fetchall()
            t = now_ns()
            for (key,) in rows:
                received[key] = t
            lc.execute("SELECT pgq.finish_batch(%s)", (batch,))
            listener.commit()
            batches += 1
            if rows:
                quiet_since = None
            continue
        listener.commit()
        if not any(t.is_alive() for t in threads):
            quiet_since = quiet_since or now_ns()
            if now_ns() - quiet_since > args.quiet * 1e9:
                break
        time.sleep(args.poll)
    while args.system != "pgq":
        r, _, _ = select.select([listener], [], [], 0.2)
        if r:
            listener.poll()
            t = now_ns()
            while listener.notifies:
                note = listener.notifies.pop(0)
                if args.system == "outbox-notify":
                    received[note.payload] = t
                    continue
                msg = json.loads(note.payload)
                key = (msg.get("payload") or {}).get("k")
                if key is not None:
                    received[key] = t
            quiet_since = None
        elif not any(t.is_alive() for t in threads):
            quiet_since = quiet_since or now_ns()
            if now_ns() - quiet_since > args.quiet * 1e9:
                break
    for i, t in enumerate(threads):
        t.join()
        path = os.path.join(tmpdir, "p%d.json" % i)
        try:
            with open(path) as f:
                r = json.load(f)
            committed.update(r["committed"])
            errors.extend(r["errors"])
            os.unlink(path)
        except (OSError, ValueError) as e:
            errors.append("publisher %d left no result: %r" % (i, e))
    os.rmdir(tmpdir)
    listener.close()

    warm = start + int(args.warmup * 1e9)
    lat = sorted((received[k] - c) / 1e6 for k, c in committed.items()
                 if k in received and c >= warm)
    missing = sum(1 for k in committed if k not in received)
    result = {
        "target_rate": args.rate,
        "achieved_rate": round(len(committed) / args.seconds, 1),
        "sent": len(committed),
        "received": len(received),
        "missing": missing,
        "measured": len(lat),
        "p50_ms": round(percentile(lat, 0.50), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "max_ms": round(lat[-1], 3) if lat else None,
        "publisher_errors": errors,
        "system": args.system,
    }
    if args.system == "pgq":
        result["batches"] = batches
    if args.json:
        print(json.dumps(result))
    else:
        print("rate %(achieved_rate).0f/s sent %(sent)d received %(received)d "
              "missing %(missing)d p50 %(p50_ms).3f ms p99 %(p99_ms).3f ms "
              "max %(max_ms).3f ms" % result)
    return 1 if missing or errors else 0


if __name__ == "__main__":
    sys.exit(main())
