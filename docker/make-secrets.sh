#!/usr/bin/env bash
# Creates the secrets of the compose deployment in docker/secrets/ (once; existing files are
# kept): random passwords for MongoDB's root and replicator users, the replicators' URIs
# (which carry the replicator password), and the HTTP admin token.
#
# The directory is 0700, so other users of this machine cannot read the files. The files
# themselves are 0644: compose mounts them into the containers as they are, and the
# containers' users (mongodb, and the replicator's 10001) must be able to read them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
umask 077
mkdir -p secrets
chmod 700 secrets

random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

write() { # NAME CONTENT
    if [[ ! -s "secrets/$1" ]]; then
        printf '%s\n' "$2" >"secrets/$1"
        echo "created docker/secrets/$1"
    fi
    chmod 644 "secrets/$1"
}

write mongo-root-password "$(random)"
write replicator-password "$(random)"
write admin-token "$(random)"
password="$(head -n1 secrets/replicator-password)"
write source-uri "mongodb://replicator:${password}@mongo1:27017/?replicaSet=rs1&authSource=admin"
write node-2-uri "mongodb://replicator:${password}@mongo2:27017/?replicaSet=rs2&authSource=admin"
write node-3-uri "mongodb://replicator:${password}@mongo3:27017/?replicaSet=rs3&authSource=admin"
