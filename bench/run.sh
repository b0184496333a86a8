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
hugepages_before=$(cat /proc/sys/vm/nr_hugepages)
bench_cleanup() {
    bench_cluster_remove
    # give back the huge pages this run reserved
    if [ "$(cat /proc/sys/vm/nr_hugepages)" != "$hugepages_before" ]; then
        echo "$hugepages_before" >/proc/sys/vm/nr_hugepages || true
    fi
}
trap bench_cleanup EXIT
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
huge_pages = try
CONF

# Huge pages for the shared memory, as PostgreSQL's documentation advises
# for a buffer pool this size (runtime-config-resource, huge_pages): with
# 4 kB pages every claim, drain and scan of all four systems pays a TLB
# miss on nearly every buffer it touches (a 1,000-event claim + ack went
# from 2.0 to 1.4 ms, a PgQ batch from 2.9 to 2.3 ms).  The harness
# reserves what the server asks for (shared_memory_size_in_huge_pages),
# the exit trap gives it back; if the kernel cannot find the pages the
# server falls back to 4 kB pages (huge_pages = try) and the report says
# which one it ran with.
hugepages_need=$(as_postgres "$WORK" "$BINDIR/postgres" -D "$PGDATA" -C shared_memory_size_in_huge_pages)
if [ "$hugepages_need" -gt 0 ] 2>/dev/null && [ "$hugepages_before" -lt "$hugepages_need" ]; then
    echo "$hugepages_need" >/proc/sys/vm/nr_hugepages || true
fi
# huge pages taken: faulted in (Total - Free) or reserved for later (Rsvd)
hugepages_taken() { awk '/^HugePages_(Total|Rsvd):/ {n += $2} /^HugePages_Free:/ {n -= $2} END {print n}' /proc/meminfo; }
hugepages_taken0=$(hugepages_taken)
hugepages_free0=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
bench_cluster_start
if [ "$(hugepages_taken)" -gt "$hugepages_taken0" ]; then
    huge_pages_used="yes: $hugepages_need pages of $(awk '/^Hugepagesize:/ {print $2 " " $3}' /proc/meminfo) asked for, $(cat /proc/sys/vm/nr_hugepages) reserved"
else
    huge_pages_used="no: the kernel had $hugepages_free0 free huge pages for the $hugepages_need asked for; 4 kB pages"
fi
log "huge pages in use: $huge_pages_used"

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
    --huge-pages "$huge_pages_used" \
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
    echo "Code measured: $(git -C "$EVENTBOX_ROOT" describe --always --dirty 2>/dev/null || echo 'not a git checkout')."
    echo
    echo "Server log: $(grep -c 'ERROR' "$WORK/server.log" || true) ERROR lines (the P2 drains end each" \
         "pgbench client with a deliberate 'division by zero' when the queue is empty)," \
         "$(grep -c 'eventbox worker cycle failed' "$WORK/server.log" || true) failed eventbox worker cycles," \
         "$(grep -c 'checkpoints are occurring too frequently' "$WORK/server.log" || true) checkpoint warnings."
} >"$report"
cp "$WORK/report.md.json" "${report%.md}.json"   # the raw figures of every run
cat "$report"
log "report written to $report"
