#!/usr/bin/env bash
# bench/relay.sh -- throughput of `eventbox relay nats` into JetStream.
#
# Starts a throwaway PostgreSQL 15 (Unix socket only, fsync on, eventbox
# preloaded) and a nats-server -js on 127.0.0.1 (random free ports, file
# storage in a temp dir), creates a stream for subject "bench.>" with a
# 10-minute duplicate window, publishes EVENTS events to a pull subscription,
# then runs one relay with --exit-when-idle and times it until everything
# is stored and acked.  Reads the stream back (test/t/nats_tool.py) to count
# messages and distinct Nats-Msg-Id values: duplicates = messages - distinct.
# Writes bench/results/relay-<date>.md and prints it.
#
# Usage (as root, after scripts/setup.sh and make install):
#   bash bench/relay.sh [EVENTS=100000] [BATCH_SIZES="500 1000 2000"]
#
# With RELAY_SUMMARY=FILE in the environment it also writes the figures as
# JSON to FILE (bench/run.sh does, to put them in its report).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../scripts/lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_root "${BASH_SOURCE[0]}" "$@"

EVENTS=${1:-100000}
BATCH_SIZES=${2:-"500 1000 2000"}
BINDIR=$("$PG_CONFIG" --bindir)
CLI=$BINDIR/eventbox
TOOL=$EVENTBOX_ROOT/test/t/nats_tool.py
NATS_SERVER=$(command -v nats-server || ls /usr/sbin/nats-server /usr/bin/nats-server 2>/dev/null | head -1)
[ -x "$CLI" ] || die "$CLI is missing: run make install"
[ -n "$NATS_SERVER" ] || die "nats-server is missing: run scripts/setup.sh"

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); NPORT=$(free_port)
NATS_PID=
cleanup() {
    [ -n "$NATS_PID" ] && kill "$NATS_PID" 2>/dev/null || true
    bench_cluster_remove
}
trap cleanup EXIT

bench_cluster_init eventbox-relaybench "$PORT"
cat >>"$PGDATA/postgresql.conf" <<CONF
shared_buffers = '256MB'
CONF
bench_cluster_start
sql() { as_postgres "$WORK" "$BINDIR/psql" -X -qAt -h "$WORK" -p "$PORT" -d bench -c "$1"; }
sql "CREATE EXTENSION eventbox"

"$NATS_SERVER" -js -a 127.0.0.1 -p "$NPORT" -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
URL=nats://127.0.0.1:$NPORT
for _ in $(seq 100); do
    /usr/bin/python3 "$TOOL" --url "$URL" create-stream BENCH 'bench.>' 600 >/dev/null 2>&1 && break
    sleep 0.2
done

results=$WORK/rows.md
for batch in $BATCH_SIZES; do
    sub=relay_$batch
    sql "SELECT eventbox.subscribe('$sub', event_types => '{bench.*}', lease => '60 seconds')"
    # publish in chunks of 10,000 (one publish_batch each)
    for ((done = 0; done < EVENTS; done += 10000)); do
        n=$(( EVENTS - done < 10000 ? EVENTS - done : 10000 ))
        sql "SELECT count(*) FROM eventbox.publish_batch((SELECT jsonb_agg(jsonb_build_object(
               'event_type', 'bench.order_created', 'aggregate_type', 'order',
               'aggregate_id', ($done + g)::text,
               'payload', jsonb_build_object('id', $done + g, 'total', 99.5, 'note', repeat('x', 60))))
             FROM generate_series(1, $n) g))" >/dev/null
    done
    before=$(/usr/bin/python3 "$TOOL" --url "$URL" count BENCH)
    start=$(date +%s.%N)
    as_postgres "$WORK" "$CLI" -h "$WORK" -p "$PORT" -d bench relay nats -s "$sub" \
        --nats-url "$URL" --prefix bench --batch-size "$batch" --exit-when-idle \
        >"$WORK/relay-$batch.log" 2>&1 || { cat "$WORK/relay-$batch.log"; die "relay failed"; }
    end=$(date +%s.%N)
    after=$(/usr/bin/python3 "$TOOL" --url "$URL" count BENCH)
    acked=$(sql "SELECT acked_total FROM eventbox.stats WHERE subscription = '$sub'")
    secs=$(echo "$end - $start" | bc -l)
    rate=$(echo "$EVENTS / $secs" | bc -l)
    printf '| %s | %s | %s | %.2f | %.0f | %s |\n' "$batch" "$EVENTS" "$(( after - before ))" \
        "$secs" "$rate" "$acked" >>"$results"
    sql "SELECT eventbox.unsubscribe('$sub')"
done
check=$(/usr/bin/python3 "$TOOL" --url "$URL" check BENCH)
messages=$(printf '%s' "$check" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
distinct=$(printf '%s' "$check" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["distinct"])')

mkdir -p "$EVENTBOX_ROOT/bench/results"
report=$EVENTBOX_ROOT/bench/results/relay-$(date -u +%Y%m%dT%H%M%SZ).md
{
    echo "# eventbox relay nats: throughput into JetStream"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) cores; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- $("$BINDIR/postgres" --version), fsync on; $("$NATS_SERVER" --version 2>&1 | head -1), JetStream file storage, loopback"
    echo "- one relay process; events of ~150 bytes of JSON payload plus metadata headers"
    echo "- SPEC §8 bar: >= 20,000 events/s into JetStream with 0 duplicates in the stream"
    echo
    echo "| batch size | events | stored in the stream | seconds | events/s | acked in PostgreSQL |"
    echo "|---:|---:|---:|---:|---:|---:|"
    cat "$results"
    echo
    echo "Stream BENCH at the end: $messages messages, $distinct distinct Nats-Msg-Id, duplicates $(( messages - distinct ))."
} >"$report"
if [ -n "${RELAY_SUMMARY:-}" ]; then
    /usr/bin/python3 - "$results" "$report" "$messages" "$distinct" >"$RELAY_SUMMARY" <<'PY'
import json, os, sys
rows = []
with open(sys.argv[1]) as f:
    for line in f:
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        rows.append({"batch": int(c[0]), "events": int(c[1]), "stored": int(c[2]),
                     "seconds": float(c[3]), "events_per_s": float(c[4]), "acked": int(c[5])})
print(json.dumps({"report": os.path.basename(sys.argv[2]), "rows": rows,
                  "messages": int(sys.argv[3]), "distinct": int(sys.argv[4])}))
PY
fi
cat "$report"
log "report written to $report"
