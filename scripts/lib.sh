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
