#!/usr/bin/env bash
# bench/run.sh -- the SPEC §8 benchmark: eventbox side by side with its
# anchors (bare INSERT, hand-written outbox, PgQ ticked by pgqd) in one run.
#
# Starts a throwaway PostgreSQL 15 cluster as the postgres OS user (Unix
# socket in its temp dir only, never TCP; fsync on; eventbox preloaded),
# installs the four systems in one database, runs the workloads P1..P5 with
# bench/bench.py (pgbench, bench/latency.py) and writes a Markdown report to
# bench/results/<UTC timestamp>.md, which it also prints.  See bench/README.md.
#
# Usage (as root):  bash bench/run.sh [--quick]
#   --quick   one repetition, short runs, 60 s steady state (~4 minutes);
#             for developing the benchmark, not for the record
# Environment: EVENTBOX_BENCH_PORT (default 54332; only names the socket file)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../scripts/lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_root "${BASH_SOURCE[0]}" "$@"

quick=()
case "${1:-}" in
    '') ;;
    --quick) quick=(--quick) ;;
    *) die "usage: $0 [--quick]" ;;
esac

# Packages, then build and install this tree: the benchmark measures the
# code it is run from, never an older installed build.
"$EVENTBOX_ROOT/scripts/setup.sh"
command -v pgqd >/dev/null || [ -x /usr/sbin/pgqd ] || die "pgqd not found"

t0=$(date +%s)

# The relay bar first, in its own cluster and nats-server (bench/relay.sh):
# 100,000 events, batches of 1,000; its figures go into the report.
relay_summary=$(mktemp /tmp/eventbox-relay.XXXXXX.json)
relay_rc=0
RELAY_SUMMARY=$relay_summary bash "$EVENTBOX_ROOT/bench/relay.sh" 100000 1000 || relay_rc=$?
[ "$relay_rc" -eq 0 ] || { log "bench/relay.sh failed ($relay_rc); the report says so"; : >"$relay_summary"; }
chmod 644 "$relay_summary"

PORT=${EVENTBOX_BENCH_PORT:-54332}
BINDIR=$("$PG_CONFIG" --bindir)
trap bench_cluster_remove EXIT
bench_cluster_init eventbox-bench "$PORT"
log "initdb in $WORK"
cat >>"$PGDATA/postgresql.conf" <<CONF
synchronous_commit = on
shared_buffers = '1GB'
max_wal_size = '4GB'
checkpoint_timeout = '30min'
wal_level = replica
max_connections = 100
autovacuum = on
log_autovacuum_min_duration = 0
CONF
bench_cluster_start

# pgqd: PgQ's ticker and maintenance daemon, defaults except where it
# connects (ticker_period 1 s, maint_period 120 s).
cat >"$WORK/pgqd.ini" <<INI
[pgqd]
logfile = $WORK/pgqd.log
pidfile = $WORK/pgqd.pid
base_connstr = host=$WORK port=$PORT application_name=bench-pgqd
initial_database = bench
database_list = bench
INI
chown postgres:postgres "$WORK/pgqd.ini"

mkdir -p "$EVENTBOX_ROOT/bench/results"
report=$EVENTBOX_ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)${quick:+-quick}.md
status=0
as_postgres "$WORK" /usr/bin/python3 "$EVENTBOX_ROOT/bench/bench.py" \
    --host "$WORK" --port "$PORT" --db bench --work "$WORK" \
    --pgqd-conf "$WORK/pgqd.ini" --out "$WORK/report.md" --relay-summary "$relay_summary" \
    "${quick[@]}" || status=$?
rm -f "$relay_summary"
if [ "$status" -ne 0 ]; then
    log "bench.py failed ($status); server log tail:"
    tail -n 30 "$WORK/server.log" >&2 || true
    tail -n 10 "$WORK/pgqd.log" >&2 || true
    exit "$status"
fi
{
    cat "$WORK/report.md"
    echo "Wall time of bench/run.sh (setup check, initdb to report): $(( $(date +%s) - t0 )) s."
    echo
    echo "Server log: $(grep -c 'ERROR' "$WORK/server.log" || true) ERROR lines (the P2 drains end each" \
         "pgbench client with a deliberate 'division by zero' when the queue is empty)," \
         "$(grep -c 'eventbox worker cycle failed' "$WORK/server.log" || true) failed eventbox worker cycles," \
         "$(grep -c 'checkpoints are occurring too frequently' "$WORK/server.log" || true) checkpoint warnings."
} >"$report"
cp "$WORK/report.md.json" "${report%.md}.json"   # the raw figures of every run
cat "$report"
log "report written to $report"
