#!/usr/bin/env bash
# Failover time of a replicated queue: kill -9 its leader, time the first
# delivery from its successor; TRIES (20) times, p50 in
# bench/failover-results.md. Runs a three-node cluster with
# scripts/cluster.sh (target/cluster, removed at the end); pika in a venv
# under target/.
#
#   bash bench/failover.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRIES=${TRIES:-20}
VENV=$ROOT/target/bench-venv
(cd "$ROOT" && cargo build --release -p warren -p warrenctl)
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet pika==1.3.2
fi
trap '"$ROOT/scripts/cluster.sh" clean >/dev/null 2>&1 || true' EXIT
"$ROOT/scripts/cluster.sh" clean >/dev/null
"$ROOT/scripts/cluster.sh" start >/dev/null
"$VENV/bin/python" "$ROOT/bench/failover.py" "$TRIES" "$ROOT/bench/failover-results.md"
cat "$ROOT/bench/failover-results.md"
