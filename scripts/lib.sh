# shellcheck shell=bash
# scripts/lib.sh -- helpers shared by setup.sh, test.sh and demo.sh.
#
# Source it (". scripts/lib.sh"); it is not meant to be run. It defines:
#   EVENTBOX_ROOT    the repository root (the directory above scripts/)
#   PG_CONFIG        the PostgreSQL 15 pg_config (override with PG_CONFIG=...)
#   log, die         messages on stderr
#   ensure_root      re-executes the calling script as root via sudo, or fails
#   as_postgres      runs a command as the `postgres` OS user in a clean
#                    environment and a given working directory

# shellcheck disable=SC2034  # used by the scripts that source this file
EVENTBOX_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

# Always the PostgreSQL 15 pg_config. /usr/bin/pg_config is Debian's wrapper
# that picks the newest postgresql-server-dev-NN installed, which is not
# necessarily 15, so we never rely on it.
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ensure_root "$0" "$@": if we are not root, re-run the calling script under
# sudo (keeping the EVENTBOX_*, PG_CONFIG and CI variables), else fail.
# Without a terminal on stdin (CI) sudo must not prompt, so it runs with -n.
ensure_root() {
    local script=$1; shift
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null 2>&1 ||
        die "$(basename -- "$script") must run as root (it installs packages and runs tests as the postgres user), and sudo is not available. Run it as root."
    local keep=() name
    while IFS= read -r name; do
        keep+=("$name=${!name}")
    done < <(compgen -e | grep -E '^(EVENTBOX_[A-Z_]+|PG_CONFIG|CI)$' || true)
    local nonint=()
    [ -t 0 ] || nonint=(-n)
    log "not root: re-running $(basename -- "$script") with sudo"
    exec sudo "${nonint[@]}" -- env "${keep[@]}" bash "$script" "$@"
}

# as_postgres DIR CMD [ARGS...]: run CMD as the postgres OS user with DIR as
# the working directory. The environment is reset so that results do not
# depend on who calls us (root's PG* variables, locale, ...): a fixed
# C.UTF-8 locale (pg_regress's temporary instances inherit it) and the
# PostgreSQL 15 binaries first on PATH. A few test knobs pass through.
as_postgres() {
    local dir=$1; shift
    local bindir
    bindir=$("$PG_CONFIG" --bindir)
    local envv=(
        HOME="$(getent passwd postgres | cut -d: -f6)"
        USER=postgres LOGNAME=postgres SHELL=/bin/bash
        LANG=C.UTF-8
        PATH="$bindir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    local name
    for name in CI TMPDIR PG_TEST_EXTRA PG_TEST_TIMEOUT_DEFAULT PGCTLTIMEOUT; do
        [ -n "${!name:-}" ] && envv+=("$name=${!name}")
    done
    # shellcheck disable=SC2016  # $1 and $@ belong to the inner bash
    runuser -u postgres -- env -i "${envv[@]}" \
        bash -c 'cd -- "$1" && shift && exec "$@"' as_postgres "$dir" "$@"
}

# Throwaway clusters for the benchmarks (bench/*.sh).
#   bench_cluster_init NAME PORT  creates $WORK (/tmp/NAME.XXXXXX, owned by
#       postgres) and an initdb'd $PGDATA in it: Unix socket in $WORK only,
#       on PORT, eventbox preloaded, fsync on. Callers append their own
#       settings to $PGDATA/postgresql.conf, then call
#   bench_cluster_start  which starts it and creates the database "bench";
#   bench_cluster_remove  stops it and removes $WORK (call it from an EXIT trap).
bench_cluster_init() {
    BINDIR=${BINDIR:-$("$PG_CONFIG" --bindir)}
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    PGDATA=$WORK/data
    BENCH_PORT=$2
    chmod 755 "$WORK"
    chown postgres:postgres "$WORK"
    as_postgres "$WORK" "$BINDIR/initdb" -D "$PGDATA" -U postgres -E UTF8 --auth=trust >/dev/null
    cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$WORK'
port = $BENCH_PORT
shared_preload_libraries = 'eventbox'
fsync = on
CONF
}

bench_cluster_start() {
    as_postgres "$WORK" "$BINDIR/pg_ctl" -D "$PGDATA" -l "$WORK/server.log" -w start >/dev/null
    as_postgres "$WORK" "$BINDIR/createdb" -h "$WORK" -p "$BENCH_PORT" bench
}

bench_cluster_remove() {
    if [ -n "${PGDATA:-}" ] && [ -f "$PGDATA/postmaster.pid" ]; then
        as_postgres "$WORK" "$BINDIR/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null || true
    fi
    [ -n "${WORK:-}" ] && rm -rf -- "$WORK"
    return 0
}
