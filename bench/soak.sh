#!/usr/bin/env bash
# bench/soak.sh -- push delivery under steady load: latency and memory.
#
# Starts a throwaway PostgreSQL 15 (Unix socket only, fsync on, eventbox
# preloaded) as the postgres OS user, publishes at a fixed rate for a while
# with bench/latency.py (commit -> LISTEN receipt on channel "eventbox"),
# and samples the private memory (RssAnon, from /proc) of the eventbox
# worker, the launcher and one publishing backend every few seconds.
# Writes a Markdown report to bench/results/soak-<date>.md and prints it.
#
# Usage (as root, after scripts/setup.sh):
#   bash bench/soak.sh [SECONDS=600] [RATE=1000] [PUBLISHERS=4]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../scripts/lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_root "${BASH_SOURCE[0]}" "$@"

SECONDS_TOTAL=${1:-600}
RATE=${2:-1000}
PUBLISHERS=${3:-4}
PORT=${EVENTBOX_BENCH_PORT:-54331}
SAMPLE_EVERY=10

BINDIR=$("$PG_CONFIG" --bindir)
trap bench_cluster_remove EXIT
bench_cluster_init eventbox-soak "$PORT"
cat >>"$PGDATA/postgresql.conf" <<CONF
synchronous_commit = on
shared_buffers = '256MB'
max_connections = 50
CONF
bench_cluster_start
sql() { as_postgres "$WORK" "$BINDIR/psql" -X -qAt -h "$WORK" -p "$PORT" -d bench -c "$1"; }
sql "CREATE EXTENSION eventbox"
for _ in $(seq 50); do
    [ -n "$(sql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbox worker' AND datname = 'bench'")" ] && break
    sleep 0.2
done

rss_kb() { awk '/^RssAnon:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo "?"; }

log "publishing $RATE events/s for $SECONDS_TOTAL s with $PUBLISHERS publishers"
as_postgres "$WORK" /usr/bin/python3 "$EVENTBOX_ROOT/bench/latency.py" \
    --dsn "host=$WORK port=$PORT dbname=bench" --rate "$RATE" \
    --seconds "$SECONDS_TOTAL" --publishers "$PUBLISHERS" --json >"$WORK/latency.json" &
bench=$!

samples=$WORK/samples.tsv
printf 't_s\tworker_kb\tlauncher_kb\tpublisher_kb\tlog_rows\n' >"$samples"
start=$(date +%s)
while kill -0 "$bench" 2>/dev/null; do
    sleep "$SAMPLE_EVERY"
    w=$(sql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbox worker' LIMIT 1")
    l=$(sql "SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbox launcher' LIMIT 1")
    p=$(sql "SELECT pid FROM pg_stat_activity WHERE application_name = 'eventbox-bench-publisher' ORDER BY pid LIMIT 1")
    rows=$(sql "SELECT count(*) FROM eventbox.log")
    printf '%s\t%s\t%s\t%s\t%s\n' "$(( $(date +%s) - start ))" \
        "$(rss_kb "${w:-0}")" "$(rss_kb "${l:-0}")" "$(rss_kb "${p:-0}")" "$rows" >>"$samples"
done
wait "$bench" || true

mkdir -p "$EVENTBOX_ROOT/bench/results"
report=$EVENTBOX_ROOT/bench/results/soak-$(date -u +%Y%m%dT%H%M%SZ).md
{
    echo "# eventbox soak: push delivery latency and memory"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "- PostgreSQL: $("$BINDIR/postgres" --version); fsync on, synchronous_commit on, shared_buffers 256MB"
    echo "- load: $RATE events/s for $SECONDS_TOTAL s, $PUBLISHERS publishing connections, one publish per transaction"
    echo "- eventbox defaults (naptime 1s, batch_size 1000, retention 1h, rotation_period 60s)"
    echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine inflates latency)"
    echo
    echo "## Commit -> LISTEN latency (bench/latency.py)"
    echo
    echo '```'
    cat "$WORK/latency.json"
    echo '```'
    echo
    echo "## Private memory (RssAnon, kB) over the run"
    echo
    echo "| t (s) | worker | launcher | a publishing backend | rows in eventbox.log |"
    echo "|---:|---:|---:|---:|---:|"
    tail -n +2 "$samples" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
} >"$report"
cat "$report"
log "report written to $report"
