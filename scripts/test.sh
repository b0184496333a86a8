#!/usr/bin/env bash
# scripts/test.sh -- run eventbox's whole test suite: the one command for a
# fresh clone on a fresh Debian 12 machine (CI runs it through .ci/run).
#
#   1. scripts/setup.sh --deps-only    Debian packages (root)
#   2. copy the tree to a fresh /tmp/eventbox-test.XXXXXX owned by `postgres`
#      (PostgreSQL refuses to run as root), without .git and build products
#   3. build there as postgres; the build must be free of warnings
#      (-Werror makes compiler warnings errors; this also catches the rest)
#   4. install that build into PostgreSQL 15 (root)
#   5. `make installcheck` as postgres, one stage at a time so that a failing
#      stage does not hide the others, in PGXS's order:
#        regress     pg_regress, sql/*.sql, its own --temp-instance
#        isolation   pg_isolation_regress, test/isolation/specs/*.spec
#        tap         prove, test/t/*.pl (PostgreSQL::Test::Cluster nodes)
#   6. test/stress/*.sh, each run as postgres from the copied tree with
#      `bash`; exit status 0 means pass. They get PG_CONFIG and EVENTBOX_SRC
#      (the copied tree) in the environment, PostgreSQL 15's bin directory
#      first on PATH, and must start and stop their own servers.
#
# On failure it prints the head of every regression.diffs and server/TAP log
# written by the failing stage, and keeps the copy for inspection. The last
# line of output is always "N passed, M failed" (regress tests + isolation
# tests + TAP files + stress scripts); the exit status is 0 only when nothing
# failed and at least one test ran.
#
# Environment:
#   EVENTBOX_SRC            tree to test (default: this repository)
#   EVENTBOX_STAGE_TIMEOUT  seconds per stage / stress script (default 3600)
#   EVENTBOX_LOG_LINES      lines shown from the head of each file (default 100;
#                           half as many from the tail of longer files)
#   EVENTBOX_KEEP_TMP=1     keep the copy even when everything passed
#   PG_TEST_EXTRA, PG_TEST_TIMEOUT_DEFAULT, PGCTLTIMEOUT are passed to the tests.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
ensure_root "${BASH_SOURCE[0]}" "$@"

SRC=$(cd -- "${EVENTBOX_SRC:-$EVENTBOX_ROOT}" && pwd)
STAGE_TIMEOUT=${EVENTBOX_STAGE_TIMEOUT:-3600}
LOG_LINES=${EVENTBOX_LOG_LINES:-100}

passed=0
failed=0
report=()       # one line per stage, printed above the summary
WORK=''         # the temporary directory: $WORK/tree and $WORK/logs

# finish: print the per-stage report and the summary line, clean up, exit.
finish() {
    trap - EXIT
    local total=$((passed + failed)) status=0
    if [ "$failed" -gt 0 ]; then
        status=1
    elif [ "$total" -eq 0 ]; then
        log "no tests ran: expected sql/*.sql, test/isolation/specs/*.spec, test/t/*.pl or test/stress/*.sh"
        status=1
    fi
    if [ -n "$WORK" ]; then
        if [ "$status" -eq 0 ] && [ -z "${EVENTBOX_KEEP_TMP:-}" ]; then
            rm -rf -- "$WORK"
        else
            log "test tree and logs kept in $WORK"
        fi
    fi
    echo
    local line
    for line in "${report[@]}"; do echo "  $line"; done
    echo "$passed passed, $failed failed"
    exit "$status"
}
# Any unexpected error (set -e) still ends with a summary and a failure.
trap 'rc=$?; log "test.sh stopped by an unexpected error (status $rc)"; failed=$((failed + 1)); finish' EXIT

# show_file FILE: the head of FILE, and its tail when it is long (TAP logs
# end with the failure), never the whole of a big file.
show_file() {
    local f=$1 n tail_lines=$((LOG_LINES / 2))
    n=$(wc -l <"$f")
    echo "----- ${f#"$WORK/tree/"} ($n lines) -----"
    if [ "$n" -le $((LOG_LINES + tail_lines + 10)) ]; then
        cat -- "$f"
    else
        head -n "$LOG_LINES" -- "$f"
        echo "[... $((n - LOG_LINES - tail_lines)) lines skipped; full file: $f ...]"
        tail -n "$tail_lines" -- "$f"
    fi
}

# show_logs_since STAMP [TEST...]: every non-empty regression.diffs, then
# every log file (log/, output_iso/log/, tmp_check/log/; not initdb's) that
# changed since STAMP was touched. With TEST names, only the TAP logs of
# those tests (regress_log_NAME, NAME_node.log).
show_logs_since() {
    local stamp=$1 f base t
    shift
    find "$WORK/tree" -type f -newer "$stamp" -name regression.diffs -size +0 -print |
        sort | while IFS= read -r f; do show_file "$f"; done
    find "$WORK/tree" -type f -newer "$stamp" -path '*/log/*' ! -name initdb.log -size +0 -print |
        sort | while IFS= read -r f; do
            if [ $# -gt 0 ]; then
                base=$(basename -- "$f")
                for t in "$@"; do
                    case "$base" in "regress_log_$t" | "${t}_"*.log) show_file "$f" ;; esac
                done
            else
                show_file "$f"
            fi
        done
}

# failed_tap_tests LOG: names (without .pl) of the test files listed in
# prove's "Test Summary Report", one per line.
failed_tap_tests() {
    sed -nE 's|^([^[:space:]]*/)?([^/[:space:]]+)\.pl \(Wstat:.*|\2|p' "$1" | sort -u
}

# make_var NAME: the value of a variable of the Makefile (after PGXS).
make_var() {
    # shellcheck disable=SC2016  # $($*) is make's, not the shell's
    as_postgres "$WORK/tree" make -s --no-print-directory PG_CONFIG="$PG_CONFIG" \
        --eval='print-var-%: ; @echo '"'"'$($*)'"'"'' "print-var-$1"
}

# count_pg_regress_ok LOG: tests pg_regress / pg_isolation_regress reported
# as passing. PostgreSQL 15 prints "test name ... ok 12 ms" (members of a
# parallel group are indented instead of prefixed with "test"); from 16 on it
# prints TAP, "ok 1 - name 12 ms" / "not ok 1 - name". Both are understood.
# shellcheck disable=SC2317  # called indirectly, through run_stage
count_pg_regress_ok() {
    grep -cE '^(test[[:space:]]+|[[:space:]]+)[^[:space:]]+[[:space:]]+\.\.\.[[:space:]]+(ok|failed \(ignored\))([[:space:]]|$)|^ok [0-9]+[[:space:]]+[-+][[:space:]]' "$1" || true
}

# count_prove_ok LOG: test files prove reported as "file.pl .. ok" (or skipped).
# shellcheck disable=SC2317  # called indirectly, through run_stage
count_prove_ok() {
    grep -cE '^(\[[^]]*\] )?[^[:space:]]+\.pl \.+ (ok|skipped:)' "$1" || true
}

# record NAME PASSED FAILED NOTE: add a stage's result to the totals.
record() {
    passed=$((passed + $2))
    failed=$((failed + $3))
    report+=("$(printf '%-10s %3d passed, %3d failed%s' "$1" "$2" "$3" "${4:+  ($4)}")")
}

# run_stage NAME EXPECTED COUNTER [MAKE ARGS...]: `make installcheck` as
# postgres with the given overrides; EXPECTED is how many tests it should
# report, COUNTER counts those reported as passing. Tests that never
# reported (a crashed server, a missing expected file) count as failed.
run_stage() {
    local name=$1 expected=$2 counter=$3
    shift 3
    if [ "$expected" -eq 0 ]; then
        report+=("$(printf '%-10s no tests' "$name")")
        return 0
    fi
    local logf="$WORK/logs/$name.log" stamp="$WORK/logs/$name.start" rc=0 ok bad note=''
    touch "$stamp"
    log "stage $name: $expected test(s)"
    as_postgres "$WORK/tree" timeout -k 60 "$STAGE_TIMEOUT" \
        make --no-print-directory PG_CONFIG="$PG_CONFIG" installcheck "$@" 2>&1 |
        tee "$logf" || rc=${PIPESTATUS[0]}
    ok=$("$counter" "$logf")
    [ "$ok" -le "$expected" ] || ok=$expected
    bad=$((expected - ok))
    [ "$rc" -ne 124 ] || note="timed out after ${STAGE_TIMEOUT}s"
    if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
        # Every test passed yet make failed: still a failure of the stage.
        bad=1
        note=${note:-"make exited with status $rc"}
    fi
    record "$name" "$ok" "$bad" "$note"
    if [ "$bad" -gt 0 ]; then
        log "stage $name FAILED; diffs and logs follow"
        local only=()
        [ "$name" != tap ] || mapfile -t only < <(failed_tap_tests "$logf")
        show_logs_since "$stamp" "${only[@]}"
    fi
}

# --- 1. packages ----------------------------------------------------------------
if ! bash "$EVENTBOX_ROOT/scripts/setup.sh" --deps-only; then
    record setup 0 1 "scripts/setup.sh --deps-only failed"
    finish
fi

# --- 2. a copy owned by postgres ---------------------------------------------------
WORK=$(mktemp -d /tmp/eventbox-test.XXXXXX)
mkdir "$WORK/tree" "$WORK/logs" "$WORK/tmp"
# Temporary files of the tests (pg_regress's and the TAP nodes' socket
# directories, which the TAP framework keeps after a failure) go in here too.
export TMPDIR="$WORK/tmp"
log "copying $SRC to $WORK/tree"
# Leave out Git's data and build/test products, both the Makefile's and
# whatever .gitignore names, so the copy looks like a fresh clone.
rsync -a --delete \
    --exclude=/.git \
    --filter=':- .gitignore' \
    --exclude='*.o' --exclude='*.so' --exclude='*.bc' --exclude='.deps/' \
    --exclude='/tmp_check*/' --exclude='/output_iso/' --exclude='/results/' \
    --exclude='/log/' --exclude='/regression.diffs' --exclude='/regression.out' \
    "$SRC/" "$WORK/tree/"
chown -R postgres:postgres "$WORK"

# --- 3. build as postgres, warning-free ----------------------------------------------
log "building in $WORK/tree"
rc=0
as_postgres "$WORK/tree" make -j"$(nproc)" PG_CONFIG="$PG_CONFIG" 2>&1 |
    tee "$WORK/logs/build.log" || rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    record build 0 1 "make failed with status $rc"
    finish
fi
if grep -qi 'warning:' "$WORK/logs/build.log"; then
    log "the build printed warnings:"
    grep -i 'warning:' "$WORK/logs/build.log" | head -n "$LOG_LINES"
    record build 0 1 "build printed warnings"
    finish
fi

# --- 4. install that build --------------------------------------------------------------
log "installing into $("$PG_CONFIG" --pkglibdir)"
if ! make -C "$WORK/tree" --no-print-directory PG_CONFIG="$PG_CONFIG" install >"$WORK/logs/install.log" 2>&1; then
    tail -n "$LOG_LINES" "$WORK/logs/install.log"
    record install 0 1 "make install failed"
    finish
fi

# --- 5. make installcheck, stage by stage ---------------------------------------------------
# Which tests exist is the Makefile's business; ask it instead of repeating
# its globs. Setting a list to empty on make's command line turns that part
# of PGXS's installcheck off (it tests them with ifdef).
regress_list=$(make_var REGRESS)
isolation_list=$(make_var ISOLATION)
tap_enabled=$(make_var TAP_TESTS)
prove_tests=$(make_var PROVE_TESTS)
read -r -a regress_tests <<<"$regress_list"
read -r -a isolation_tests <<<"$isolation_list"
tap_files=()
if [ -n "$tap_enabled" ]; then
    mapfile -t tap_files < <(
        cd "$WORK/tree" && shopt -s nullglob &&
            for f in ${prove_tests:-t/*.pl}; do [ -f "$f" ] && echo "$f"; done
    )
fi

run_stage regress "${#regress_tests[@]}" count_pg_regress_ok ISOLATION= TAP_TESTS=
run_stage isolation "${#isolation_tests[@]}" count_pg_regress_ok REGRESS= TAP_TESTS=
# prove is not started without test files: it would fail on the bare glob.
run_stage tap "${#tap_files[@]}" count_prove_ok REGRESS= ISOLATION=

# --- 6. stress scripts ----------------------------------------------------------------------
mapfile -t stress_scripts < <(
    cd "$WORK/tree" && shopt -s nullglob && for f in test/stress/*.sh; do echo "$f"; done
)
stress_ok=0
stress_failed=()
for script in "${stress_scripts[@]}"; do
    log "stress: $script"
    rc=0
    as_postgres "$WORK/tree" env PG_CONFIG="$PG_CONFIG" EVENTBOX_SRC="$WORK/tree" \
        timeout -k 60 "$STAGE_TIMEOUT" bash "$script" 2>&1 |
        tee "$WORK/logs/stress-$(basename "$script" .sh).log" || rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        stress_ok=$((stress_ok + 1))
    else
        log "stress: $script FAILED (exit status $rc)"
        stress_failed+=("$(basename "$script")")
    fi
done
if [ "${#stress_scripts[@]}" -eq 0 ]; then
    report+=("$(printf '%-10s no tests' stress)")
else
    record stress "$stress_ok" "${#stress_failed[@]}" "${stress_failed[*]:+failed: ${stress_failed[*]}}"
fi

finish
