#!/usr/bin/env bash
# Healthy once this node is the primary of its single-node replica set; initiates the set on
# first start. Usage: healthcheck.sh REPLICA_SET_NAME
set -euo pipefail

password="$(head -n1 /run/secrets/mongo_root_password)"
exec mongosh --quiet --username root --password "$password" --authenticationDatabase admin \
    --eval "
try { rs.status() } catch (e) {
  if (e.codeName !== 'NotYetInitialized') throw e;
  rs.initiate({_id: '$1', members: [{_id: 0, host: '$(hostname)' + ':27017'}]});
}
if (!db.hello().isWritablePrimary) quit(1);"
