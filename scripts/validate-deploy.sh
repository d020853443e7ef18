#!/usr/bin/env bash
# Validates the deployment files without a container engine:
#   - docker/docker-compose.yml parses and resolves (docker-compose, or the compose plugin);
#   - shellcheck passes on every *.sh under scripts/ and docker/, and on .ci/run;
#   - the Prometheus alert rules pass `promtool check rules` and their unit tests
#     (`promtool test rules`), and every query of the Grafana dashboard parses.
# Run from anywhere. Runs every check, then exits 1 if any failed (2 if a tool is missing).
#
# Needs: docker-compose (Debian package `docker-compose`) or `docker compose`; shellcheck;
# promtool (Debian package `prometheus`); python3.
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

echo "== compose: hardening and secrets"
# Every replicator runs read-only, without capabilities or privilege escalation, with its
# URIs and token from secrets; no URI in the deployment carries a password.
if "${compose[@]}" -f docker/docker-compose.yml config | python3 -c '
import re, sys, yaml
conf = yaml.safe_load(sys.stdin)
bad = []
for name, svc in conf["services"].items():
    if not name.startswith("replicator"):
        continue
    if svc.get("read_only") is not True:
        bad.append(f"{name}: read_only is not true")
    if "ALL" not in (svc.get("cap_drop") or []):
        bad.append(f"{name}: cap_drop lacks ALL")
    if not any("no-new-privileges" in o for o in svc.get("security_opt") or []):
        bad.append(f"{name}: no no-new-privileges")
    secrets = {s["source"] if isinstance(s, dict) else s for s in svc.get("secrets") or []}
    for needed in ("source_uri", "admin_token"):
        if needed not in secrets:
            bad.append(f"{name}: does not get the {needed} secret")
for path in ("docker/docker-compose.yml", "docker/config.toml"):
    for line in open(path):
        if re.search(r"mongodb(\+srv)?://[^/\s:@]+:[^@\s]+@", line) and "PASSWORD" not in line:
            bad.append(f"{path}: a URI with a password: {line.strip()}")
# The state directory (the token file) is private, in the image and under systemd.
if "-m 0700 /var/lib/mongo-replicator" not in open("docker/Dockerfile").read():
    bad.append("docker/Dockerfile: the state directory is not created 0700")
if "StateDirectoryMode=0700" not in open("deploy/mongo-replicator.service").read():
    bad.append("deploy/mongo-replicator.service: StateDirectoryMode is not 0700")
print("\n".join(bad) if bad else "ok: read_only, cap_drop ALL, no-new-privileges, secrets, state directory 0700")
sys.exit(1 if bad else 0)
'; then
    :
else
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

echo "== alert rules and dashboard"
if ! command -v promtool >/dev/null 2>&1; then
    echo "error: promtool is not installed (Debian package prometheus)" >&2
    exit 2
fi
if ! (cd deploy/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml); then
    status=1
fi
# Every query of the dashboard, checked by promtool as a recording rule.
queries="$(mktemp)"
trap 'rm -f "$queries"' EXIT
if python3 - deploy/grafana/mongo-replicator.json >"$queries" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
print("groups:\n  - name: dashboard\n    rules:")
n = 0
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        n += 1
        expr = target["expr"].replace("'", "''")
        print(f"      - record: dashboard_query_{n}\n        expr: '{expr}'")
PY
then
    if promtool check rules "$queries" >/dev/null; then
        echo "ok: every dashboard query parses"
    else
        promtool check rules "$queries" || true
        status=1
    fi
else
    echo "error: deploy/grafana/mongo-replicator.json is not a dashboard" >&2
    status=1
fi

exit "$status"
