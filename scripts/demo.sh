#!/usr/bin/env bash
# The main job on a local default: starts a source and two followers (local test servers,
# each a single-node replica set), runs the replicator, writes sample data to the source,
# shows the followers matching, and stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO="$(mktemp -d "${TMPDIR:-/tmp}/mongo-replicator-demo.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -n "${DEMO_KEEP:-}" ]]; then echo "kept $DEMO" >&2; else rm -rf "$DEMO"; fi
    rm -f "${BUILD_LOG:-}"
}
trap cleanup EXIT

# The replicator builds in the background while the servers are prepared.
echo "== building the replicator (the first time takes a few minutes)"
BUILD_LOG="$(mktemp)"
cargo build --quiet --bin mongo-replicator >"$BUILD_LOG" 2>&1 &
BUILD=$!
PIDS+=("$BUILD")
BIN=target/debug/mongo-replicator

# The servers: the compiled test server when it is installed (the test suite's; building it
# takes about 8 minutes, once per machine), otherwise SecantusDB's Python build, which
# installs in seconds from the Python package index into a private virtualenv. DEMO_SERVER
# (compiled | python) forces one.
SERVER_KIND="${DEMO_SERVER:-}"
if [[ -z "$SERVER_KIND" ]]; then
    if scripts/install-test-server.sh --installed >/dev/null 2>&1; then
        SERVER_KIND=compiled
    else
        SERVER_KIND=python
    fi
fi
# The sample writer is a few lines of Python (pymongo), in the same private virtualenv.
VENV="${HOME}/.cache/mongo-replicator/secantus-py"
SERVER_ARGS=()
if [[ "$SERVER_KIND" == compiled ]]; then
    SERVER="$(scripts/install-test-server.sh | tail -n 1)"
    SERVER_ARGS=(--log-file-max 16MB)
    if ! "$VENV/bin/python" -c 'import pymongo' >/dev/null 2>&1; then
        echo "== installing pymongo for the sample writer (seconds)"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "pymongo>=4,<5"
    fi
else
    if [[ ! -x "$VENV/bin/secantusd-py" ]]; then
        echo "== installing the test server's Python build (seconds)"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "SecantusDB==0.7.0b3"
    fi
    SERVER="$VENV/bin/secantusd-py"
fi
WRITER=("$VENV/bin/python" scripts/sample_writer.py)


# Starts a server in this shell (so that cleanup can stop it); `server_port NAME` then waits
# for it and prints its port. The three start side by side.
start_server() {
    local name=$1
    mkdir -p "$DEMO/$name"
    "$SERVER" --host 127.0.0.1 --port 0 --storage-path "$DEMO/$name" "${SERVER_ARGS[@]}" \
        --cache-size 256M >"$DEMO/$name.out" 2>"$DEMO/$name.err" &
    PIDS+=($!)
}
server_port() {
    local name=$1 port
    # The Python build takes a few seconds to start, more while the replicator compiles.
    for _ in $(seq 1 600); do
        port=$(cat "$DEMO/$name.out" "$DEMO/$name.err" 2>/dev/null | sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' | head -n 1)
        if [[ -n "$port" ]]; then
            echo "$port"
            return 0
        fi
        sleep 0.1
    done
    echo "server $name did not start" >&2
    return 1
}

echo "== starting a source and two followers ($SERVER_KIND test server)"
start_server source
start_server follower-1
start_server follower-2
SRC=$(server_port source)
F1=$(server_port follower-1)
F2=$(server_port follower-2)
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

# A few hundred documents: enough to show a copy and a stream, and quick on the Python
# build of the test server, which matches documents without an index's help.
echo "== writing 200 documents before the replicator starts (they arrive by initial sync)"
"${WRITER[@]}" "mongodb://127.0.0.1:$SRC/?directConnection=true" app data 200

if ! wait "$BUILD"; then
    cat "$BUILD_LOG" >&2
    echo "the replicator did not build" >&2
    exit 1
fi
rm -f "$BUILD_LOG"

echo "== starting the replicator"
"$BIN" run --config "$DEMO/config.toml" 2>"$DEMO/replicator.log" &
REPLICATOR=$!
PIDS+=("$REPLICATOR")
for _ in $(seq 1 100); do
    if "$BIN" status --config "$DEMO/config.toml" --json 2>/dev/null | grep -q '"role":"leader"'; then break; fi
    sleep 0.2
done

echo "== writing more while it streams"
"${WRITER[@]}" "mongodb://127.0.0.1:$SRC/?directConnection=true" app data 100 200

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
