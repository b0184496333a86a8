#!/usr/bin/env bash
# scripts/demo.sh -- a short tour of eventbox on a throwaway PostgreSQL 15.
#
# Runs scripts/setup.sh (packages, build, install), then, as the postgres OS
# user, creates a private server under /tmp/eventbox-demo.XXXXXX (Unix socket
# in that directory only, port 54329, eventbox preloaded) and walks through:
# a pull subscription, a committed publish, a rolled-back publish that never
# shows up, claim, ack and the stats view. Every SQL statement is printed
# before it runs, and a LISTEN client shows the events the background
# worker forwards. The server is stopped and its directory removed on exit,
# also after an error or Ctrl-C.
#
# Environment:
#   EVENTBOX_DEMO_PORT   port of the throwaway server (default 54329; the
#                        socket lives in the demo directory, so it cannot
#                        collide with a server on the machine)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
ensure_root "${BASH_SOURCE[0]}" "$@"

PORT=${EVENTBOX_DEMO_PORT:-54329}

# Packages, build, install: quiet unless it fails (it can take a few minutes
# on a fresh machine).
setup_log=$(mktemp /tmp/eventbox-setup.XXXXXX.log)
log "running scripts/setup.sh (packages, build, install; output in $setup_log)"
bash "$EVENTBOX_ROOT/scripts/setup.sh" >"$setup_log" 2>&1 ||
    { tail -n 50 "$setup_log"; die "scripts/setup.sh failed; full output in $setup_log"; }
rm -f -- "$setup_log"

BINDIR=$("$PG_CONFIG" --bindir)
DEMO=$(mktemp -d /tmp/eventbox-demo.XXXXXX)
PGDATA=$DEMO/data
chown postgres:postgres "$DEMO"

# Stop the server and remove everything, however we leave.
cleanup() {
    if [ -f "$PGDATA/postmaster.pid" ]; then
        log "stopping the demo server"
        as_postgres "$DEMO" "$BINDIR/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null || true
    fi
    rm -rf -- "$DEMO"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- a throwaway server ---------------------------------------------------------
log "creating a throwaway server in $PGDATA"
as_postgres "$DEMO" "$BINDIR/initdb" -D "$PGDATA" -U postgres -E UTF8 \
    --auth=trust --no-sync >"$DEMO/initdb.log" 2>&1 ||
    { cat "$DEMO/initdb.log"; die "initdb failed"; }
cat >>"$PGDATA/postgresql.conf" <<EOF

# --- eventbox demo ---
listen_addresses = ''                   # no TCP; Unix socket only
unix_socket_directories = '$DEMO'
port = $PORT
shared_preload_libraries = 'eventbox'
EOF
log "starting it (socket $DEMO/.s.PGSQL.$PORT)"
as_postgres "$DEMO" "$BINDIR/pg_ctl" -D "$PGDATA" -l "$DEMO/server.log" -w start >/dev/null ||
    { cat "$DEMO/server.log"; die "the demo server did not start"; }
as_postgres "$DEMO" "$BINDIR/createdb" -h "$DEMO" -p "$PORT" demo

# psql on the demo database: no ~/.psqlrc, stop at the first error.
# Extra arguments choose how statements are echoed (-a: the whole input,
# comments included; -e: each query as sent).
demo_psql() {
    as_postgres "$DEMO" "$BINDIR/psql" -X -v ON_ERROR_STOP=1 \
        -h "$DEMO" -p "$PORT" -d demo "$@"
}

# step TITLE: a heading between the parts of the tour.
step() { printf '\n=== %s ===\n\n' "$*"; }

# --- the tour --------------------------------------------------------------------------
step "1. Install the extension"
demo_psql -a <<'SQL'
CREATE EXTENSION eventbox;
SQL

step "2. A pull subscription for every order.* event"
demo_psql -a <<'SQL'
SELECT eventbox.subscribe('billing', event_types => '{order.*}');
SQL

step "3. Publish inside your own transaction: the event exists iff it commits"
demo_psql -a <<'SQL'
BEGIN;
-- ... the business write (INSERT INTO orders ...) would go here ...
SELECT eventbox.publish('order.created', '{"id":42}', 'order', '42');
COMMIT;

-- The same in a transaction that rolls back: consumers never see it.
BEGIN;
SELECT eventbox.publish('order.created', '{"id":43}', 'order', '43');
ROLLBACK;
SQL

step "4. A consumer claims up to 10 events (only order 42 is there)"
# Expanded output (-x) shows one field per line; the id and lease of each
# claimed event are read back from it for the ack below.
claimed=$(demo_psql -e -x <<'SQL'
SELECT * FROM eventbox.claim_batch(10, 'billing');
SQL
)
printf '%s\n' "$claimed"
mapfile -t acks < <(printf '%s\n' "$claimed" | awk -F' *[|] *' '
    $1 == "id"    { id = $2 }
    $1 == "lease" { printf "SELECT eventbox.ack(%s, subscription => '\''billing'\'', lease => '\''%s'\'');\n", id, $2 }')
[ "${#acks[@]}" -gt 0 ] || die "claim_batch returned no event; expected order 42"

step "5. ...processes it, then acks it with the id and lease it was given"
printf '%s\n' "${acks[@]}" | demo_psql -e

step "6. Push: a LISTEN client gets each committed event from the background worker"
# psql prints the notifications it received after each command, so the
# client listens, sleeps while we publish, and prints them when it wakes.
listen_out="$DEMO/listen.out"
demo_psql -q -c 'LISTEN eventbox;' -c 'SELECT pg_sleep(3);' >"$listen_out" 2>&1 &
listener=$!
sleep 1     # let the LISTEN commit before we publish
demo_psql -a <<'SQL'
-- The built-in subscription "default" forwards every event to channel
-- "eventbox" right after the publishing transaction commits.
BEGIN;
SELECT eventbox.publish('order.paid', '{"id":42,"amount":99.5}', 'order', '42');
COMMIT;

BEGIN;
SELECT eventbox.publish('order.paid', '{"id":43,"amount":10}', 'order', '43');
ROLLBACK;   -- never notified
SQL
wait "$listener" || die "the LISTEN client failed: $(cat "$listen_out")"
echo
echo "The LISTEN client (LISTEN eventbox;) received:"
grep 'Asynchronous notification' "$listen_out" ||
    die "the LISTEN client received nothing; is the background worker running?"
grep -q '"id": 43' "$listen_out" && die "the rolled-back event was notified"

step "7. Per-subscription statistics"
demo_psql -a -x <<'SQL'
SELECT * FROM eventbox.stats;
SQL

step "Done"
echo "The demo server is being stopped and $DEMO removed."
