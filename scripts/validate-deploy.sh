#!/usr/bin/env bash
# Validates the deployment files without a container engine:
#   - docker/docker-compose.yml parses and resolves (docker-compose, or the compose plugin);
#   - shellcheck passes on every *.sh under scripts/ and docker/, and on .ci/run.
# Run from anywhere. Runs every check, then exits 1 if any failed (2 if a tool is missing).
#
# Needs: docker-compose (Debian package `docker-compose`) or `docker compose`; shellcheck.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

status=0

echo "== compose: docker/docker-compose.yml"
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    echo "error: neither docker-compose nor the docker compose plugin is installed" >&2
    exit 2
fi
if "${compose[@]}" -f docker/docker-compose.yml config -q; then
    echo "ok"
else
    echo "error: docker/docker-compose.yml does not resolve" >&2
    status=1
fi

echo "== shellcheck"
if ! command -v shellcheck >/dev/null 2>&1; then
    echo "error: shellcheck is not installed" >&2
    exit 2
fi
scripts=()
while IFS= read -r -d '' f; do
    scripts+=("$f")
done < <(find scripts docker -type f -name '*.sh' -print0 2>/dev/null | sort -z)
if [[ -f .ci/run ]]; then
    scripts+=(.ci/run)
fi
if ((${#scripts[@]} == 0)); then
    echo "no shell scripts found"
elif shellcheck --external-sources "${scripts[@]}"; then
    printf 'ok: %s\n' "${scripts[@]}"
else
    status=1
fi

exit "$status"
