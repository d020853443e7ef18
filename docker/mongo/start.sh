#!/usr/bin/env bash
# Starts mongod as a single-node replica set with authentication: members of a replica set
# with auth need a key file, made here on first start. Then the image's entrypoint creates
# the root user (MONGO_INITDB_ROOT_*) and runs init-replicator-user.js on an empty database.
# Usage: start.sh REPLICA_SET_NAME
set -euo pipefail

keyfile=/data/configdb/keyfile
if [[ ! -s "$keyfile" ]]; then
    head -c 756 /dev/urandom | base64 -w0 >"$keyfile"
fi
chmod 400 "$keyfile"
chown mongodb:mongodb "$keyfile"
exec docker-entrypoint.sh mongod --replSet "$1" --bind_ip_all --keyFile "$keyfile"
