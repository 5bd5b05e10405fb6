#!/usr/bin/env bash
# A three-node Warren cluster as local processes on this machine, for people
# without Docker and for trying the cluster out:
#
#   scripts/cluster.sh start     # build (release) if needed, start three nodes, wait until they formed
#   scripts/cluster.sh status    # warrenctl cluster_status on node 1
#   scripts/cluster.sh stop      # SIGTERM each node, wait for it to exit
#   scripts/cluster.sh clean     # stop, then delete the nodes' data directories
#
# Node i (1..3) is `warren-i@127.0.0.1`: AMQP on 5671+i, management API on
# 15671+i, Prometheus on 15691+i, cluster port 25671+i; data and log in
# target/cluster/node-i/. The nodes share a random secret
# (target/cluster/secret, made on first start). Environment:
#   WARREN_BIN   the broker binary (default: target/release/warren, built when missing)
#   NODES        how many nodes (default 3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$ROOT/target/cluster
NODES=${NODES:-3}
BIN=${WARREN_BIN:-$ROOT/target/release/warren}
CTL=$(dirname "$BIN")/warrenctl

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

build() {
    if [[ -z "${WARREN_BIN:-}" && ( ! -x "$BIN" || ! -x "$CTL" ) ]]; then
        say "cargo build --release"
        (cd "$ROOT" && cargo build --release)
    fi
    [[ -x "$BIN" ]] || die "broker binary $BIN is missing"
}

pid_of() { cat "$DIR/node-$1/pid" 2>/dev/null || true; }
alive() { local p; p=$(pid_of "$1"); [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

start() {
    build
    mkdir -p "$DIR"
    [[ -s "$DIR/secret" ]] || (umask 077 && head -c 32 /dev/urandom | base64 > "$DIR/secret")
    local peers=() i
    for ((i = 1; i <= NODES; i++)); do peers+=(--peer "127.0.0.1:$((25671 + i))"); done
    for ((i = 1; i <= NODES; i++)); do
        if alive "$i"; then say "node $i already running (pid $(pid_of "$i"))"; continue; fi
        mkdir -p "$DIR/node-$i"
        nohup "$BIN" --data-dir "$DIR/node-$i/data" --bind 127.0.0.1 \
            --node-name "warren-$i@127.0.0.1" \
            --port $((5671 + i)) --management-port $((15671 + i)) \
            --prometheus-port $((15691 + i)) --cluster-port $((25671 + i)) \
            --cluster-secret-file "$DIR/secret" "${peers[@]}" \
            > "$DIR/node-$i/log" 2>&1 &
        echo $! > "$DIR/node-$i/pid"
        say "node $i: pid $!, amqp://guest:guest@127.0.0.1:$((5671 + i)), http://127.0.0.1:$((15671 + i)), log $DIR/node-$i/log"
    done
    # Formed when node 1 lists every node as running.
    local deadline=$((SECONDS + 60)) body
    while ((SECONDS < deadline)); do
        for ((i = 1; i <= NODES; i++)); do
            alive "$i" || die "node $i exited; see $DIR/node-$i/log"
        done
        body=$(curl -fsS -u guest:guest "http://127.0.0.1:15672/api/nodes" 2>/dev/null || true)
        if [[ $(grep -o '"running":true' <<< "$body" | wc -l) -ge $NODES ]]; then
            say "formed: $NODES nodes running"
            return 0
        fi
        sleep 0.5
    done
    die "the nodes did not form a cluster within 60 s; see $DIR/node-*/log"
}

stop() {
    local i p
    for ((i = 1; i <= NODES; i++)); do
        alive "$i" || continue
        p=$(pid_of "$i")
        kill -TERM "$p"
        while kill -0 "$p" 2>/dev/null; do sleep 0.2; done
        say "node $i stopped"
    done
    rm -f "$DIR"/node-*/pid
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        [[ -x "$CTL" ]] || die "warrenctl missing: run '$0 start' first"
        "$CTL" --url http://127.0.0.1:15672 cluster_status ;;
    clean) stop; rm -rf "$DIR"; say "removed $DIR" ;;
    *) die "usage: $0 start|status|stop|clean" ;;
esac
