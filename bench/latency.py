#!/usr/bin/env python3
"""Commit -> LISTEN receipt latency of eventbox push delivery.

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

Prints a one-line summary (or JSON with --json): events sent and received,
achieved rate, p50, p99, max in milliseconds, and how many never arrived.
"""
import argparse
import json
import select
import sys
import threading
import time

import psycopg2
import psycopg2.extensions


def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def publisher(dsn, rate, deadline_ns, start_ns, tag, committed, errors):
    """Publish at `rate` events/s until deadline; record commit times."""
    conn = psycopg2.connect(dsn, application_name="eventbox-bench-publisher")
    cur = conn.cursor()
    interval = 1e9 / rate
    n = 0
    try:
        while True:
            due = start_ns + int(n * interval)
            t = now_ns()
            if due > deadline_ns:
                break
            if due > t:
                time.sleep((due - t) / 1e9)
            key = "%s-%d" % (tag, n)
            cur.execute("SELECT eventbox.publish('bench.latency', %s)",
                        (json.dumps({"k": key}),))
            conn.commit()
            committed[key] = now_ns()
            n += 1
    except Exception as e:  # report, do not hide
        errors.append(repr(e))
    finally:
        conn.close()


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
    args = ap.parse_args()

    listener = psycopg2.connect(args.dsn)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    listener.cursor().execute('LISTEN "%s"' % args.channel.replace('"', '""'))

    committed = {}
    received = {}
    errors = []
    start = now_ns() + 200_000_000
    deadline = start + int(args.seconds * 1e9)
    threads = [threading.Thread(target=publisher,
                                args=(args.dsn, args.rate / args.publishers, deadline,
                                      start, "p%d" % i, committed, errors))
               for i in range(args.publishers)]
    for t in threads:
        t.start()

    # receive until publishers are done and nothing arrived for 2 s
    quiet_since = None
    while True:
        r, _, _ = select.select([listener], [], [], 0.2)
        if r:
            listener.poll()
            t = now_ns()
            while listener.notifies:
                msg = json.loads(listener.notifies.pop(0).payload)
                key = (msg.get("payload") or {}).get("k")
                if key is not None:
                    received[key] = t
            quiet_since = None
        elif not any(t.is_alive() for t in threads):
            quiet_since = quiet_since or now_ns()
            if now_ns() - quiet_since > 2e9:
                break
    for t in threads:
        t.join()
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
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("rate %(achieved_rate).0f/s sent %(sent)d received %(received)d "
              "missing %(missing)d p50 %(p50_ms).3f ms p99 %(p99_ms).3f ms "
              "max %(max_ms).3f ms" % result)
    return 1 if missing or errors else 0


if __name__ == "__main__":
    sys.exit(main())
