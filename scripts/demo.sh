#!/usr/bin/env bash
# The main job on a local default: starts a source and two followers (local test servers,
# each a single-node replica set), runs the replicator, writes sample data to the source,
# shows the followers matching, and stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER="$(scripts/install-test-server.sh | tail -n 1)"
cargo build --quiet --bin mongo-replicator --example sample_writer
BIN=target/debug/mongo-replicator
WRITER=target/debug/examples/sample_writer

DEMO="$(mktemp -d "${TMPDIR:-/tmp}/mongo-replicator-demo.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DEMO"
}
trap cleanup EXIT

# Starts a server in this shell (so that cleanup can stop it) and sets PORT to its port.
start_server() {
    local name=$1
    mkdir -p "$DEMO/$name"
    "$SERVER" --host 127.0.0.1 --port 0 --storage-path "$DEMO/$name" --log-file-max 16MB \
        --cache-size 256M >"$DEMO/$name.out" 2>"$DEMO/$name.err" &
    PIDS+=($!)
    PORT=""
    for _ in $(seq 1 100); do
        PORT=$(sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' "$DEMO/$name.out" | head -n 1)
        if [[ -n "$PORT" ]]; then return 0; fi
        sleep 0.1
    done
    echo "server $name did not start" >&2
    return 1
}

echo "== starting a source and two followers"
start_server source
SRC=$PORT
start_server follower-1
F1=$PORT
start_server follower-2
F2=$PORT
HTTP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 9187)
echo "   source 127.0.0.1:$SRC, followers 127.0.0.1:$F1 and 127.0.0.1:$F2"

cat >"$DEMO/config.toml" <<TOML
node_id = "demo-node"

[source]
uri = "mongodb://127.0.0.1:$SRC/?directConnection=true"
database = "app"
collections = ["data"]

[[followers]]
name = "node-2"
uri = "mongodb://127.0.0.1:$F1/?directConnection=true"

[[followers]]
name = "node-3"
uri = "mongodb://127.0.0.1:$F2/?directConnection=true"

[checkpoint]
token_file = "$DEMO/tokens.json"

[http]
listen = "127.0.0.1:$HTTP_PORT"
TOML

echo "== writing 1000 documents before the replicator starts (they arrive by initial sync)"
"$WRITER" "mongodb://127.0.0.1:$SRC/?directConnection=true" app data 1000

echo "== starting the replicator"
"$BIN" run --config "$DEMO/config.toml" 2>"$DEMO/replicator.log" &
REPLICATOR=$!
PIDS+=("$REPLICATOR")
for _ in $(seq 1 100); do
    if "$BIN" status --config "$DEMO/config.toml" --json 2>/dev/null | grep -q '"role":"leader"'; then break; fi
    sleep 0.2
done

echo "== writing more while it streams"
"$WRITER" "mongodb://127.0.0.1:$SRC/?directConnection=true" app data 500 1000

echo "== waiting for the followers to match"
for _ in $(seq 1 150); do
    if "$BIN" check --config "$DEMO/config.toml" --recheck-rounds 0 >/dev/null 2>&1; then break; fi
    sleep 0.2
done

echo "== status"
"$BIN" status --config "$DEMO/config.toml"
echo "== consistency check"
"$BIN" check --config "$DEMO/config.toml"

echo "== stopping the replicator (SIGTERM: finishes its batch, writes its checkpoint)"
kill -TERM "$REPLICATOR"
wait "$REPLICATOR"
echo "   replicator exited with status $?"
echo "== done"
