#!/usr/bin/env bash
# Cross-node throughput and latency: a three-node Warren cluster against a
# three-node RabbitMQ 3.10 cluster (Debian's package), both on this machine,
# taking turns run by run, with warren-perf as the client for both.
#
#   bash bench/cluster.sh          # as root, rabbitmq-server installed (apt-get install rabbitmq-server)
#
# Scenarios (the queue is durable and lives on node 2):
#   X1  publish on node 1, consume on node 3 (auto-ack), 10 s, as fast as possible
#   X2  publish on node 1, consume on node 2 (the queue's node), 10 s
#   X3  X1 with persistent messages, publisher confirms (256 outstanding)
#       and manual acks (prefetch 256)
#   X4  X1 at 1,000 msg/s: end-to-end latency
# Replicated queues (x-queue-type: quorum, declared through node 2, which
# leads them first; persistent messages, confirms, manual acks):
#   Q1 (5)  one producer on node 1, one consumer on node 3
#   Q2 (6)  ten producers and ten consumers over ten queues
#   Q3 (7)  Q1 at 1,000 msg/s: end-to-end latency
# Environment: RUNS (3), DURATION (10), BROKERS ("warren rabbitmq"),
# SCENARIOS ("1 2 3 4 5 6 7"), NAME (cluster). Writes bench/NAME-results.md
# and bench/NAME-results-raw.jsonl (one line per run): the quorum
# scenarios alone with SCENARIOS="5 6 7" NAME=quorum.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
BROKERS=${BROKERS:-"warren rabbitmq"}
SCENARIOS=${SCENARIOS:-"1 2 3 4 5 6 7"}
RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}
WORK=$(mktemp -d /tmp/warren-cluster-bench.XXXXXX)
chmod 755 "$WORK" # RabbitMQ runs as user rabbitmq
NAME=${NAME:-cluster}
RAW=$ROOT/bench/$NAME-results-raw.jsonl
PERF=$ROOT/target/release/warren-perf
HOST=$(hostname -s)

log() { echo "cluster-bench: $*" >&2; }

(cd "$ROOT" && cargo build --release -p warren -p warrenctl -p warren-perf)
command -v rabbitmq-server >/dev/null || { log "rabbitmq-server is not installed (apt-get install rabbitmq-server)"; exit 1; }

# --- Warren: scripts/cluster.sh (AMQP 5672-5674) --------------------------
warren_uri() { echo "amqp://guest:guest@127.0.0.1:$((5671 + $1))/%2f"; }
start_warren() { (cd "$ROOT" && scripts/cluster.sh clean >/dev/null && scripts/cluster.sh start >&2); }
stop_warren() { (cd "$ROOT" && scripts/cluster.sh clean >/dev/null); }

# --- RabbitMQ: three nodes rabbit-bench-N@host (AMQP 5772-5774) -----------
rabbitmq_uri() { echo "amqp://bench:bench@127.0.0.1:$((5771 + $1))/%2f"; }
rnode() { echo "warrenbench-$1@$HOST"; }
rmqctl() { local n=$1; shift; timeout 120 rabbitmqctl -n "$(rnode "$n")" "$@"; }
start_rabbitmq() {
    local i
    for i in 1 2 3; do
        local dir=$WORK/rabbit-$i
        rm -rf "$dir"
        mkdir -p "$dir/mnesia" "$dir/log"
        echo '[].' >"$dir/enabled_plugins"
        chown -R rabbitmq:rabbitmq "$dir"
        # setpriv, not the package wrapper's su (pam_limits drops the fd limit).
        (cd /var/lib/rabbitmq && setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
            env HOME=/var/lib/rabbitmq \
            RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$((5771 + i)) \
            RABBITMQ_DIST_PORT=$((25771 + i)) RABBITMQ_NODENAME="$(rnode "$i")" \
            RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
            "$RABBITMQ_LIB/rabbitmq-server" -detached) >"$dir/start.log" 2>&1
        # One at a time: the first start writes the Erlang cookie the
        # others read. Up once its AMQP port answers.
        local deadline=$((SECONDS + 120))
        until (exec 3<>"/dev/tcp/127.0.0.1/$((5771 + i))") 2>/dev/null; do
            ((SECONDS < deadline)) || { log "RabbitMQ node $i did not start; see $dir"; exit 1; }
            sleep 0.5
        done
        rmqctl "$i" await_startup >/dev/null
    done
    for i in 2 3; do
        rmqctl "$i" stop_app >/dev/null
        rmqctl "$i" join_cluster "$(rnode 1)" >/dev/null
        rmqctl "$i" start_app >/dev/null
    done
    # guest is loopback-only in RabbitMQ too; a user for the client.
    rmqctl 1 add_user bench bench >/dev/null
    rmqctl 1 set_permissions -p / bench '.*' '.*' '.*' >/dev/null
    rmqctl 1 cluster_status | grep -c "$HOST" >&2 || true
}
stop_rabbitmq() {
    local i
    for i in 3 2 1; do rmqctl "$i" stop >/dev/null 2>&1 || true; done
    # Each node's beam, if stop did not end it.
    pkill -f "warrenbench-" 2>/dev/null || true
    rm -rf "$WORK"/rabbit-*
}

scenario_args() { # scenario broker
    local u="${2}_uri"
    case $1 in
        1) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 3)" ;;
        2) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 2)" ;;
        3) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 3)" --persistent --confirm 256 --prefetch 256 --multi-ack-every 64 ;;
        4) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 3)" --rate 1000 ;;
        5) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 3)" --queue-type quorum --persistent --confirm 256 --prefetch 256 --multi-ack-every 64 ;;
        6) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 3)" --queue-type quorum --persistent --confirm 256 --prefetch 256 --multi-ack-every 64 --producers 10 --consumers 10 --queues 10 ;;
        7) echo --uri "$($u 1)" --declare-uri "$($u 2)" --consumer-uri "$($u 3)" --queue-type quorum --persistent --confirm 256 --prefetch 256 --rate 1000 ;;
    esac
}

# Whatever happens, no broker outlives the script.
trap 'stop_warren >/dev/null 2>&1 || true; stop_rabbitmq >/dev/null 2>&1 || true' EXIT
: >"$RAW.tmp"
for run in $(seq 1 "$RUNS"); do
    for broker in $BROKERS; do
        log "run $run: $broker"
        "start_$broker"
        for s in $SCENARIOS; do
            # shellcheck disable=SC2046
            err="$WORK/perf-$broker-$s-$run.err"
            out=$("$PERF" $(scenario_args "$s" "$broker") --durable --queue "x$s-$run" \
                --duration "$DURATION" 2>"$err" || echo '{}')
            log "  X$s: $out"
            # A run without a result says why (each run keeps its own).
            if [[ "$out" == '{}' ]]; then
                log "  X$s failed: $(tail -c 400 "$err")"
            fi
            echo "{\"run\":$run,\"broker\":\"$broker\",\"scenario\":$s,\"result\":$out}" >>"$RAW.tmp"
        done
        "stop_$broker"
    done
done
mv "$RAW.tmp" "$RAW"

python3 - "$RAW" "$ROOT/bench/$NAME-results.md" "$RUNS" <<'EOF'
import json, statistics, sys, subprocess
raw, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(raw)]
def med(b, s, f):
    v = [f(r["result"]) for r in rows if r["broker"] == b and r["scenario"] == s and r["result"]]
    v = [x for x in v if x is not None]
    return (statistics.median(v), v) if v else (None, v)
names = {1: "X1 publish on 1, queue on 2, consume on 3", 2: "X2 publish on 1, queue on 2, consume on 2",
         3: "X3 as X1, persistent, confirms, manual acks", 4: "X4 as X1 at 1,000 msg/s",
         5: "Q1 replicated queue, persistent, confirms, 1 producer (node 1), 1 consumer (node 3)",
         6: "Q2 as Q1, 10 producers and 10 consumers over 10 queues",
         7: "Q3 as Q1 at 1,000 msg/s"}
latency = (4, 7)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
L = [f"# Cross-node: three-node Warren vs three-node RabbitMQ 3.10 (one machine)", "",
     f"Commit {commit}; {runs} runs per broker, taking turns; medians (every run in brackets).", "",
     "| scenario | metric | Warren | RabbitMQ | Warren / RabbitMQ |", "|---|---|---|---|---|"]
for s in sorted({r["scenario"] for r in rows}):
    if s in latency:
        metric, f, unit = "p99 latency", lambda r: r.get("latency_us", {}).get("p99"), "µs"
    else:
        metric, f, unit = "consume rate", lambda r: r.get("consume_rate"), "msg/s"
    (w, wv), (q, qv) = med("warren", s, f), med("rabbitmq", s, f)
    ratio = f"{w / q:.2f}×" if w and q else "n/a"
    fmt = lambda m, v: "n/a" if m is None else f"{m:,.0f} {unit} ({', '.join(f'{x:,.0f}' for x in v)})"
    L.append(f"| {names[s]} | {metric} | {fmt(w, wv)} | {fmt(q, qv)} | {ratio} |")
    if s in latency:
        f = lambda r: r.get("latency_us", {}).get("p50")
        (w, wv), (q, qv) = med("warren", s, f), med("rabbitmq", s, f)
        ratio = f"{w / q:.2f}×" if w and q else "n/a"
        L.append(f"| {names[s]} | p50 latency | {fmt(w, wv)} | {fmt(q, qv)} | {ratio} |")
L += ["", "Reproduce: `bash bench/cluster.sh` as root with Debian's rabbitmq-server installed. Queues are durable classic queues (X) or quorum queues (Q: three replicas, on Warren and RabbitMQ alike) declared through node 2 (so they live, or are led first, there); RabbitMQ's nodes run with Debian's defaults (no plugins), the client as user `bench` that the script makes. Unconfirmed publishers (X1, X2) run ahead of the consumers on both brokers (Warren pauses them by flow control when a peer's backlog passes 16,384 messages), so their latencies are backlog, not transit; X4 measures transit."]
# Sections measured by other scripts (bench/cluster-meta.py) are kept.
try:
    old = open(out).read()
    kept = old[old.index("\n## "):] if "\n## " in old else ""
except FileNotFoundError:
    kept = ""
open(out, "w").write("\n".join(L) + "\n" + kept)
print("\n".join(L))
EOF
