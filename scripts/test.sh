#!/usr/bin/env bash
# Runs the whole test suite. Tests start their own database servers (SecantusDB, or a real
# mongod when one is on PATH) on free ports, so nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

SECANTUS_BIN="$(scripts/install-test-server.sh | tail -n 1)"
export SECANTUS_BIN

# Two test threads: the machine this is sized for has two cores, and the fault tests start
# several servers and replicators each.
cargo test -- --test-threads "${TEST_THREADS:-2}" "$@"
