#!/usr/bin/env bash
# The consistency-check script: proves every follower holds exactly what the source holds,
# and with --repair makes it so. Runs `mongo-replicator check`; same exit codes:
#   0 identical (or repaired), 1 differences found, 2 usage or config error, 3 could not run.
#
#   scripts/consistency-check.sh [--config PATH] [--follower NAME] [--repair] [--json] ...
set -euo pipefail
cd "$(dirname "$0")/.."

config=config.toml
args=()
while (($#)); do
    case "$1" in
        --config) config="${2:?--config needs a path}"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

bin="${MONGO_REPLICATOR_BIN:-}"
if [[ -z "$bin" ]]; then
    if command -v mongo-replicator >/dev/null 2>&1; then
        bin=mongo-replicator
    else
        cargo build --quiet --release --bin mongo-replicator
        bin=target/release/mongo-replicator
    fi
fi
exec "$bin" check --config "$config" "${args[@]}"
