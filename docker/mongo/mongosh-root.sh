#!/usr/bin/env bash
# mongosh logged in as this deployment's root user (password from its secret), for the
# commands in docker/README.md: `docker compose exec mongo1 mongosh-root --quiet app ...`.
set -euo pipefail
password="$(head -n1 /run/secrets/mongo_root_password)"
exec mongosh --username root --password "$password" --authenticationDatabase admin "$@"
