#!/usr/bin/env bash
# Seeded random faults under load, proven by the consistency check (tests/chaos.rs).
#
#   scripts/chaos.sh [--seed S] [--rounds N] [--duration D]
#
# Runs rounds with seeds S, S+1, ..., S+N-1, each injecting faults for D (humantime, e.g.
# 60s) and then waiting for the followers to converge. Prints each round's timeline of faults
# with timestamps, and a summary of outcomes and faults per kind. A failed round keeps its
# servers' directories and every log, and prints where. The same seed replays the same fault
# schedule. Defaults: a seed from the clock, 1 round, 60s.
set -euo pipefail
cd "$(dirname "$0")/.."

seed="$(date +%s)"
rounds=1
duration=60s
while (($#)); do
    case "$1" in
    --seed) seed="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    *) echo "usage: scripts/chaos.sh [--seed S] [--rounds N] [--duration D]" >&2; exit 2 ;;
    esac
done
if ! [[ "$seed" =~ ^[0-9]+$ && "$rounds" =~ ^[0-9]+$ ]]; then
    echo "error: --seed and --rounds take whole numbers" >&2
    exit 2
fi

SECANTUS_BIN="$(scripts/install-test-server.sh | tail -n 1)"
export SECANTUS_BIN
echo "chaos: seed $seed, $rounds round(s) of $duration"
CHAOS_SEED="$seed" CHAOS_ROUNDS="$rounds" CHAOS_DURATION="$duration" \
    cargo test --test chaos -- --ignored --exact chaos_rounds --nocapture --test-threads 1
