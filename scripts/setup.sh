#!/usr/bin/env bash
# scripts/setup.sh -- install what eventbox needs to build, test and demo, then
# build the extension and install it into PostgreSQL 15.
#
# Usage:  scripts/setup.sh [--deps-only]
#   --deps-only   only install the Debian packages; do not build or install
#                 eventbox (scripts/test.sh builds from its own clean copy)
#
# Environment:
#   EVENTBOX_SRC  source tree to build (default: this repository)
#   PG_CONFIG     pg_config to build with (default: PostgreSQL 15's)
#
# Idempotent and cheap to rerun: when every package is already installed apt
# is not called at all (no network needed); otherwise `apt-get update` runs at
# most once an hour and installed packages are never upgraded. `make` only
# rebuilds what changed. Needs root (re-runs itself with sudo if possible).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
ensure_root "${BASH_SOURCE[0]}" "$@"

deps_only=0
case "${1:-}" in
    '') ;;
    --deps-only) deps_only=1 ;;
    *) die "usage: $0 [--deps-only]" ;;
esac

# Everything the build, the tests, the demo and the benchmarks use.
PACKAGES=(
    build-essential            # gcc, make
    postgresql-15              # the server the extension runs in
    postgresql-server-dev-15   # PGXS, server headers, pg_regress, isolation tester
    libpq-dev                  # the eventbox command-line tool
    libipc-run-perl            # PostgreSQL's TAP test framework (test/t/*.pl)
    libnats-dev                # the NATS JetStream relay
    nats-server                # the relay's tests run against a real server
    postgresql-15-pgq3         # PgQ, a benchmark anchor (bench/)
    pgqd                       # PgQ's ticker daemon (bench/)
    python3-psycopg2           # benchmark and stress drivers
    rsync                      # scripts/test.sh copies the tree with it
)

# --- 1. Debian packages -----------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = installed ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    log "all ${#PACKAGES[@]} packages already installed"
else
    log "missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-o Acquire::Retries=3)
    # Our own marker: apt's list files carry the server's timestamps, so
    # their mtimes cannot tell when `apt-get update` last ran.
    stamp=/var/lib/eventbox-setup/apt-update.stamp
    updated=0
    apt_update() {
        log "apt-get update"
        apt-get "${apt_opts[@]}" update
        mkdir -p "$(dirname "$stamp")" && touch "$stamp"
        updated=1
    }
    if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ]; then
        apt_update
    fi
    # --no-upgrade: install what is missing, never upgrade what is there
    # (upgrading postgresql-15 would restart the system's clusters).
    install=(apt-get "${apt_opts[@]}" install -y --no-install-recommends --no-upgrade "${PACKAGES[@]}")
    log "${install[*]}"
    if ! "${install[@]}"; then
        # The package lists may have gone stale since the marker was set.
        [ "$updated" -eq 0 ] || die "apt-get install failed"
        apt_update
        "${install[@]}"
    fi
fi

[ "$deps_only" -eq 1 ] && exit 0

# --- 2. Build and install the extension ----------------------------------------
[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (is postgresql-server-dev-15 installed?)"
src=$(cd -- "${EVENTBOX_SRC:-$EVENTBOX_ROOT}" && pwd)

# Build as the developer who called us through sudo, so the build products in
# their checkout stay theirs; install as root.
build_as=()
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    build_as=(runuser -u "$SUDO_USER" --)
fi

log "building eventbox in $src (warnings are errors)"
"${build_as[@]}" make -C "$src" -j"$(nproc)" PG_CONFIG="$PG_CONFIG"
log "installing eventbox into $("$PG_CONFIG" --pkglibdir)"
make -C "$src" PG_CONFIG="$PG_CONFIG" install
