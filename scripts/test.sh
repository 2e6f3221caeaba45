#!/usr/bin/env bash
# Runs the whole test suite against real servers. Installs what is missing
# (nats-server, etcd, redis-server, protoc; MariaDB and PostgreSQL if absent),
# then runs cargo nextest (or cargo test where nextest is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
resonance_ensure_tools
resonance_ensure_databases
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  exec cargo test --workspace --no-fail-fast "$@"
fi
