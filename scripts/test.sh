#!/usr/bin/env bash
# Runs the whole test suite. Tests start their own database servers (SecantusDB, or a real
# mongod when one is on PATH) on free ports, so nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

SECANTUS_BIN="$(scripts/install-test-server.sh | tail -n 1)"
export SECANTUS_BIN

# Two test threads: the machine this is sized for has two cores, and the fault tests start
# several servers and replicators each.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test -- --test-threads "${TEST_THREADS:-2}" "$@" 2>&1 | tee "$log" || status=$?

# With the whole suite: a smoke run of the performance bench (benches/perf.rs --smoke, about
# 15 s on the debug build the tests use; no timed assertions): every measurement completes
# and every follower ends identical to its source. scripts/bench.sh takes the figures.
if (($# == 0)); then
    smoke="$(mktemp)"
    if cargo test --bench perf -- --smoke >"$smoke" 2>&1; then
        echo "perf smoke: passed"
    else
        status=1
        cat "$smoke"
        echo "perf smoke: failed"
    fi
    rm -f "$smoke"
fi

# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
