#!/usr/bin/env bash
# Reproduces the performance figures of the README (issue 11) in one command: locates (or
# installs) the test server, builds the replicator optimised and runs benches/perf.rs, which
# starts its own servers and replicators. Arguments go to the bench:
#
#   scripts/bench.sh                        # 3 runs at the default sizes
#   scripts/bench.sh --runs 5 --out perf.json --docs 100000 --backlog 100000
#   scripts/bench.sh --smoke                # tiny sizes, a few seconds: completes, asserts no speed
#
# `cargo bench` builds every target with the bench profile, which inherits the release
# profile: the replicator the bench starts is the optimised binary (the bench says so).
set -euo pipefail

# --out is relative to where the script was called from; the bench runs in the repository.
args=()
while (($#)); do
    case "$1" in
        --out)
            args+=("$1" "$(realpath -m -- "${2:?--out needs a path}")")
            shift 2
            ;;
        --out=*)
            args+=("--out=$(realpath -m -- "${1#--out=}")")
            shift
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

cd "$(dirname "$0")/.."
SECANTUS_BIN="$(scripts/install-test-server.sh | tail -n 1)"
export SECANTUS_BIN

cargo bench --bench perf -- "${args[@]}"
