#!/usr/bin/env bash
# Installs the pinned SecantusDB server used by the test suite (a MongoDB-wire-compatible
# single-node server; GPL-2.0, installed for tests and demos only, never linked or shipped).
# Idempotent: does nothing when the pinned version is already installed.
#
#   SECANTUS_ROOT  install prefix (default: $HOME/.cache/mongo-replicator/secantus)
#
# Prints the path of the server binary on its last line. With --installed, prints it only
# if it is already installed, and otherwise exits 1 without building.
set -euo pipefail

VERSION="0.5.3-beta.196"
ROOT="${SECANTUS_ROOT:-${HOME}/.cache/mongo-replicator/secantus}"
BIN="${ROOT}/bin/secantusd-rs"
STAMP="${ROOT}/.version"

if [[ -x "${BIN}" && -f "${STAMP}" && "$(cat "${STAMP}")" == "${VERSION}" ]]; then
    echo "${BIN}"
    exit 0
fi

# --installed: report only, never build (exit 1 when the pinned server is not there).
if [[ "${1:-}" == "--installed" ]]; then
    exit 1
fi

if ! command -v cmake >/dev/null 2>&1; then
    echo "installing cmake (needed to build the test server)" >&2
    if [[ "$(id -u)" == "0" ]]; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
    else
        sudo apt-get update -qq >&2
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
    fi
fi

echo "building secantus-mdb ${VERSION} into ${ROOT} (takes a few minutes, once per machine)" >&2
mkdir -p "${ROOT}"
cargo install secantus-mdb --version "=${VERSION}" --locked --ignore-rust-version \
    --root "${ROOT}" >&2
echo "${VERSION}" > "${STAMP}"
echo "${BIN}"
