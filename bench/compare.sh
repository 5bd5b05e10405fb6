#!/usr/bin/env bash
# Side-by-side comparison of Warren and RabbitMQ 3.10 (issue #9): same machine,
# same client (warren-perf), same run. Writes bench/RESULTS.md and the raw
# per-run records to bench/results-raw.jsonl.
#
#   bash bench/compare.sh
#
# Builds with cargo unless WARREN_BIN and PERF_BIN are both set. Needs root for
# RabbitMQ (its node runs as user `rabbitmq`; the Debian package
# rabbitmq-server must be installed). Optional environment: RUNS (3),
# DURATION (10), DRAIN_DURATION (120), IDLE_CONNECTIONS (1000),
# BROKERS ("warren rabbitmq"), SCENARIOS ("1 2 3 4 5 6 7 8 9"), KEEP_WORK=1 (keep
# the broker data and log directories), RESULTS, RAW (output paths).
#
# Before/after mode: BASELINE_BIN=/path/to/an/older/warren compares this
# Warren with that binary instead of RabbitMQ, in the same run: for each
# scenario the two brokers take turns (new first), each on a fresh instance.
# It writes bench/ab-results.md (and bench/ab-results-raw.jsonl): medians and
# new/baseline ratios. BASELINE_DESC names the baseline in the report.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${BASELINE_BIN:-} ]]; then
    BASELINE_MODE=1
    RESULTS=${RESULTS:-$ROOT/bench/ab-results.md}
    RAW=${RAW:-$ROOT/bench/ab-results-raw.jsonl}
    BROKERS=${BROKERS:-"warren baseline"}
    BASELINE_DESC=${BASELINE_DESC:-$BASELINE_BIN}
else
    BASELINE_MODE=0
    BASELINE_DESC=""
fi
RESULTS=${RESULTS:-$ROOT/bench/RESULTS.md}
RAW=${RAW:-$ROOT/bench/results-raw.jsonl}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
DRAIN_DURATION=${DRAIN_DURATION:-120}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-1000}
BROKERS=${BROKERS:-"warren rabbitmq"}
SCENARIOS=${SCENARIOS:-"1 2 3 4 5 6 7 8 9"}
RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}

if [[ -z ${WARREN_BIN:-} || -z ${PERF_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p warren -p warren-perf)
    WARREN_BIN=${WARREN_BIN:-$ROOT/target/release/warren}
    PERF_BIN=${PERF_BIN:-$ROOT/target/release/warren-perf}
fi

# 1000 idle connections need descriptors in both the broker and the tool.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
export ERL_MAX_PORTS=65536

# Taken at the start: the tree may move on while the benchmark runs.
GIT_REV=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(cd "$ROOT" && git status --porcelain -- . ':!bench' 2>/dev/null | grep -qv '^??' &&
    echo ", with uncommitted changes outside bench/" || true)
WARREN_BUILT=$(date -u -r "$WARREN_BIN" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo unknown)
export GIT_REV GIT_DIRTY WARREN_BUILT
START_EPOCH=$(date +%s)
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
WORK=$(mktemp -d /tmp/warren-bench.XXXXXX)
chmod 755 "$WORK"
: >"$RAW"
EPMD_BEFORE=$(pgrep -x epmd || true)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- brokers --
BROKER="" BPID="" BPORT="" BDIR="" RNODE=""

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    return 1
}

proc_kb() { # field (VmRSS / VmHWM) in kB; 0 when the broker is gone
    local v=""
    [[ -n $BPID ]] && v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$BPID/status" 2>/dev/null || true)
    echo "${v:-0}"
}

start_warren() { # tag [binary]
    local bin=${2:-$WARREN_BIN}
    BDIR=$WORK/$BROKER-$1
    mkdir -p "$BDIR"
    BPORT=$(free_port)
    "$bin" --data-dir "$BDIR/data" --bind 127.0.0.1 --port "$BPORT" \
        >"$BDIR/broker.log" 2>&1 &
    BPID=$!
    wait_port "$BPORT" 30 || { log "$BROKER did not open port $BPORT"; return 1; }
}

start_baseline() { start_warren "$1" "$BASELINE_BIN"; }
stop_baseline() { stop_warren; }

stop_warren() {
    kill -TERM "$BPID" 2>/dev/null || true
    local i
    for ((i = 0; i < 150; i++)); do
        kill -0 "$BPID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$BPID" 2>/dev/null || true
    wait "$BPID" 2>/dev/null || true
}

rmqctl() { timeout 60 rabbitmqctl -n "$RNODE" "$@"; }

start_rabbitmq() { # tag
    BDIR=$WORK/rabbitmq-$1
    mkdir -p "$BDIR/mnesia" "$BDIR/log"
    echo '[].' >"$BDIR/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$BDIR"
    BPORT=$(free_port)
    local dport
    dport=$(free_port)
    while [[ $dport == "$BPORT" ]]; do dport=$(free_port); done
    RNODE="warrenbench$$-$1@localhost"
    # setpriv instead of the package wrapper's `su`: su goes through
    # pam_limits, which resets the descriptor limit to 1024.
    (cd /var/lib/rabbitmq && setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
        env HOME=/var/lib/rabbitmq \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$BPORT" \
        RABBITMQ_DIST_PORT="$dport" RABBITMQ_NODENAME="$RNODE" \
        RABBITMQ_MNESIA_BASE="$BDIR/mnesia" RABBITMQ_LOG_BASE="$BDIR/log" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$BDIR/enabled_plugins" ERL_MAX_PORTS="$ERL_MAX_PORTS" \
        "$RABBITMQ_LIB/rabbitmq-server" -detached) >"$BDIR/start.log" 2>&1
    wait_port "$BPORT" 90 || { log "rabbitmq did not open port $BPORT"; return 1; }
    rmqctl await_startup >/dev/null 2>&1 || true
    BPID=$(rmqctl eval 'os:getpid().' 2>/dev/null | tr -dc 0-9 || true)
    if [[ -z $BPID ]]; then
        BPID=$(pgrep -f -- "beam.smp.*-sname ${RNODE%@*}" | head -n1 || true)
    fi
    [[ -n $BPID ]] || { log "no beam.smp pid for $RNODE"; return 1; }
}

stop_rabbitmq() {
    rmqctl stop >>"$BDIR/start.log" 2>&1 || true
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$BPID" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -TERM "$BPID" 2>/dev/null || true
    sleep 2
    kill -KILL "$BPID" 2>/dev/null || true
}

INSTANCE=0
start_broker() { # label
    INSTANCE=$((INSTANCE + 1))
    local tag="s$1-$INSTANCE"
    log "starting $BROKER ($tag)"
    local rc=0
    "start_$BROKER" "$tag" || rc=$?
    echo "$BROKER $BDIR" >>"$WORK/instances"
    ((rc == 0)) || return 1
    sleep 3 # let the freshly booted broker settle before baselines are taken
}

stop_broker() {
    [[ -n $BPID || ($BROKER == rabbitmq && -n $RNODE) ]] || return 0
    log "stopping $BROKER (pid $BPID)"
    "stop_$BROKER"
    BPID="" RNODE=""
}

cleanup() {
    if [[ -n $BPID ]]; then stop_broker || true; fi
    local e
    for e in $(pgrep -x epmd || true); do # an epmd that the RabbitMQ nodes started
        [[ " $EPMD_BEFORE " == *" $e "* ]] || kill "$e" 2>/dev/null || true
    done
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------- runs --
PERF_RC=0 PERF_JSON=null PERF_ERR=""

run_perf() { # label timeout-seconds warren-perf-args...
    local label=$1 limit=$2
    shift 2
    local out=$BDIR/$label.out err=$BDIR/$label.err
    PERF_RC=0
    timeout --kill-after=10 "$limit" "$PERF_BIN" \
        --uri "amqp://guest:guest@127.0.0.1:$BPORT/%2f" "$@" >"$out" 2>"$err" || PERF_RC=$?
    perf_result "$out" "$err"
}

perf_result() { # out err
    PERF_JSON=$(tail -n1 "$1" | jq -c . 2>/dev/null || true)
    [[ -n $PERF_JSON ]] || PERF_JSON=null
    PERF_ERR=$(grep -v -E '^ +[0-9]+s +published' "$2" | head -c 2000 || true)
}

record() { # scenario run phase [extra jq args]: one JSON line in $RAW
    local scenario=$1 run=$2 phase=$3
    shift 3
    jq -cn --arg broker "$BROKER" --argjson scenario "$scenario" --argjson run "$run" \
        --arg phase "$phase" --argjson rc "$PERF_RC" --argjson perf "$PERF_JSON" \
        --arg stderr "$PERF_ERR" "$@" '$ARGS.named' >>"$RAW"
}

start_failed() { # scenario "runs" phases...: record runs as failed when a broker did not start
    local scenario=$1 runs=$2 run phase
    shift 2
    PERF_RC=255 PERF_JSON=null PERF_ERR="$BROKER did not start (see its log)"
    for run in $runs; do
        for phase in "$@"; do record "$scenario" "$run" "$phase"; done
    done
    stop_broker || true
}

quiesce() { # wait (up to 30 s) until no client connection to the broker is left open
    local i n=0
    for ((i = 0; i < 300; i++)); do
        n=$(ss -Htn state established state close-wait "( sport = :$BPORT )" 2>/dev/null | wc -l)
        ((n == 0)) && break
        sleep 0.1
    done
    echo $((i / 10))
}

alive() { kill -0 "$BPID" 2>/dev/null && echo true || echo false; }

LIMIT=$((DURATION + 60))

throughput_scenario() { # n warren-perf-args...
    local n=$1
    shift
    start_broker "$n" || { start_failed "$n" "$(seq 1 "$RUNS")" main; return 0; }
    local base run
    base=$(proc_kb VmRSS)
    for ((run = 1; run <= RUNS; run++)); do
        log "$BROKER scenario $n run $run"
        run_perf "s$n-r$run" "$LIMIT" --queue "s$n" --duration "$DURATION" "$@"
        record "$n" "$run" main --argjson rss_idle_kb "$base" --argjson quiesce_s "$(quiesce)" \
            --argjson hwm_kb "$(proc_kb VmHWM)" --argjson alive "$(alive)"
        sleep 1
    done
    stop_broker
}

proc_ticks() { # the broker's CPU time so far (user + system), in clock ticks
    local v=""
    [[ -n $BPID ]] && v=$(awk '{print $14 + $15}' "/proc/$BPID/stat" 2>/dev/null || true)
    echo "${v:-0}"
}
CLK_TCK=$(getconf CLK_TCK)

load_latency_scenario() { # 8: latency at half the broker's own saturation rate
    start_broker 8 || { start_failed 8 "$(seq 1 "$RUNS")" main; return 0; }
    log "$BROKER scenario 8: saturation"
    run_perf "s8-sat" "$LIMIT" --queue s8 --duration 5 --producers 1 --consumers 1 --size 16
    record 8 0 saturation
    local sat rate run
    sat=$(jq -r '.consume_rate // 0' <<<"$PERF_JSON" 2>/dev/null || echo 0)
    rate=$(((${sat%.*} + 1) / 2))
    for ((run = 1; run <= RUNS; run++)); do
        log "$BROKER scenario 8 run $run (--rate $rate)"
        if ((rate < 1)); then
            PERF_RC=255 PERF_JSON=null PERF_ERR="no saturation rate measured"
        else
            run_perf "s8-r$run" "$LIMIT" --queue s8 --duration "$DURATION" --producers 1 --consumers 1 \
                --size 16 --rate "$rate"
        fi
        record 8 "$run" main --argjson target_rate "$rate" --argjson quiesce_s "$(quiesce)" \
            --argjson hwm_kb "$(proc_kb VmHWM)" --argjson alive "$(alive)"
        sleep 1
    done
    stop_broker
}

many_queues_scenario() { # 9: 1,000 queues × 10 msg/s, 10 producers, 10 consumers
    start_broker 9 || { start_failed 9 "$(seq 1 "$RUNS")" main; return 0; }
    local run t0 t1
    for ((run = 1; run <= RUNS; run++)); do
        log "$BROKER scenario 9 run $run"
        t0=$(proc_ticks)
        run_perf "s9-r$run" "$LIMIT" --queue s9 --duration "$DURATION" --queues 1000 \
            --producers 10 --consumers 10 --rate 1000 --size 16
        t1=$(proc_ticks)
        record 9 "$run" main --argjson cpu_s "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {print (b - a) / hz}')" \
            --argjson quiesce_s "$(quiesce)" --argjson hwm_kb "$(proc_kb VmHWM)" --argjson alive "$(alive)"
        sleep 1
    done
    stop_broker
}

backlog_scenario() { # 6: publish-only backlog, then drain it (fresh broker per run)
    local run before after hwm q
    for ((run = 1; run <= RUNS; run++)); do
        start_broker 6 || { start_failed 6 "$run" publish drain; continue; }
        log "$BROKER scenario 6 run $run (publish phase)"
        before=$(proc_kb VmRSS)
        run_perf "s6-r$run-a" "$LIMIT" --queue s6 --producers 1 --consumers 0 \
            --size 100 --duration "$DURATION"
        # Let the broker take in what is still buffered: until the publisher's
        # connection is gone on its side too, then a further 2 s.
        q=$(quiesce)
        sleep 2
        after=$(proc_kb VmRSS)
        hwm=$(proc_kb VmHWM)
        record 6 "$run" publish --argjson rss_before_kb "$before" --argjson quiesce_s "$q" \
            --argjson rss_after_kb "$after" --argjson hwm_kb "$hwm" --argjson alive "$(alive)"
        log "$BROKER scenario 6 run $run (drain phase)"
        run_perf "s6-r$run-b" $((DRAIN_DURATION + 60)) --queue s6 --producers 0 \
            --consumers 1 --no-purge --drain --size 100 --duration "$DRAIN_DURATION"
        record 6 "$run" drain --argjson hwm_kb "$(proc_kb VmHWM)" --argjson alive "$(alive)"
        stop_broker
    done
}

idle_scenario() { # 7: idle connections (fresh broker per run)
    local run base peak rss conns maxconns ppid
    for ((run = 1; run <= RUNS; run++)); do
        start_broker 7 || { start_failed 7 "$run" main; continue; }
        log "$BROKER scenario 7 run $run"
        base=$(proc_kb VmRSS)
        peak=0 maxconns=0
        local out=$BDIR/s7-r$run.out err=$BDIR/s7-r$run.err
        timeout --kill-after=10 "$LIMIT" "$PERF_BIN" \
            --uri "amqp://guest:guest@127.0.0.1:$BPORT/%2f" --queue s7 --producers 0 \
            --consumers 0 --idle-connections "$IDLE_CONNECTIONS" --duration "$DURATION" \
            >"$out" 2>"$err" &
        ppid=$!
        while kill -0 "$ppid" 2>/dev/null; do
            rss=$(proc_kb VmRSS)
            ((rss > peak)) && peak=$rss
            conns=$(ss -Htn state established "( sport = :$BPORT )" 2>/dev/null | wc -l)
            ((conns > maxconns)) && maxconns=$conns
            sleep 0.5
        done
        PERF_RC=0
        wait "$ppid" || PERF_RC=$?
        perf_result "$out" "$err"
        record 7 "$run" main --argjson rss_before_kb "$base" --argjson rss_open_kb "$peak" \
            --argjson max_established "$maxconns" --argjson hwm_kb "$(proc_kb VmHWM)" \
            --argjson alive "$(alive)"
        stop_broker
    done
}

run_scenario() { # scenario, for $BROKER
    local s=$1
    case $s in
    1) throughput_scenario 1 --producers 1 --consumers 1 --size 16 ;;
    2) throughput_scenario 2 --producers 1 --consumers 1 --size 12 --persistent \
        --confirm 192 --prefetch 200 --multi-ack-every 200 ;;
    3) throughput_scenario 3 --exchange perf-fanout --exchange-type fanout --queues 4 \
        --consumers 4 --producers 1 --size 1024 ;;
    4) throughput_scenario 4 --producers 1 --consumers 1 --rate 1000 --size 16 ;;
    5) throughput_scenario 5 --producers 10 --consumers 10 --queues 10 --size 256 ;;
    6) backlog_scenario ;;
    7) idle_scenario ;;
    8) load_latency_scenario ;;
    9) many_queues_scenario ;;
    *) log "unknown scenario $s" ;;
    esac
}

# The brokers take turns scenario by scenario, so that a change in the
# machine's load touches both alike.
for s in $SCENARIOS; do
    for BROKER in $BROKERS; do
        run_scenario "$s"
    done
done

# ------------------------------------------------------------------ report --
LOGS=$WORK/broker-logs.txt
: >"$LOGS"
while read -r b d; do
    if [[ $b == warren || $b == baseline ]]; then
        echo "$b $d/broker.log" >>"$LOGS"
    else
        for f in "$d"/log/*.log; do [[ -e $f ]] && echo "$b $f" >>"$LOGS"; done
    fi
done <"$WORK/instances"

export RESULTS RAW RUNS DURATION DRAIN_DURATION IDLE_CONNECTIONS NOFILE START_DATE LOGS
export BASELINE_MODE BASELINE_DESC
export ELAPSED=$(($(date +%s) - START_EPOCH))
export CPU_MODEL=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
export CPUS=$(nproc)
export MEM_GB=$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
export KERNEL=$(uname -sr)
export OS_NAME=$(. /etc/os-release && echo "$PRETTY_NAME")
export WARREN_VERSION=$("$WARREN_BIN" --version 2>/dev/null || echo unknown)
export PERF_VERSION=$("$PERF_BIN" --version 2>/dev/null || echo unknown)
export RABBITMQ_VERSION=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo unknown)
export ERLANG_VERSION=$(dpkg-query -W -f '${Version}' erlang-base 2>/dev/null || echo unknown)

python3 - <<'PY'
import collections, json, os, re, statistics

env = os.environ
RUNS = int(env["RUNS"])
recs = [json.loads(l) for l in open(env["RAW"]) if l.strip()]

def ok(r):
    return r["rc"] == 0 and isinstance(r.get("perf"), dict)

def by(broker, scenario, phase="main"):
    return [r for r in recs if r["broker"] == broker and r["scenario"] == scenario and r["phase"] == phase]

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def fmt(v, unit=""):
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit

def ratio(w, r):
    if w is None or r is None or r == 0:
        return None
    return w / r

def fr(x):
    return "n/a" if x is None else f"{x:.2f}×"

MB = 1024.0  # kB per MB (MiB)

def perf(r, k, *ks):
    v = r["perf"].get(k) if ok(r) else None
    for kk in ks:
        v = v.get(kk) if isinstance(v, dict) else None
    return v

def nok(b, s, phase="main"):
    return sum(1 for r in by(b, s, phase) if ok(r))

def peak(b, s):
    v = [r.get("hwm_kb") for r in recs if r["broker"] == b and r["scenario"] == s and r.get("hwm_kb")]
    return max(v) / MB if v else None

# Per scenario: rows of (label, fn(broker) -> median value, unit)
def rate(s, key, phase="main"):
    return lambda b: med([perf(r, key) for r in by(b, s, phase)])

def confirm_rate(s):
    def f(b):
        return med([perf(r, "confirmed") / perf(r, "seconds") for r in by(b, s) if ok(r) and perf(r, "seconds")])
    return f

def lat(s, p):
    return lambda b: med([perf(r, "latency_us", p) for r in by(b, s)])

def backlog(b):
    out = []
    for r in by(b, 6, "publish"):
        if ok(r) and perf(r, "published"):
            out.append((r["rss_after_kb"] - r["rss_before_kb"]) * 1024 / perf(r, "published"))
    return med(out)

def backlog_msgs(b):
    return med([perf(r, "published") for r in by(b, 6, "publish")])

def drained(b):
    return med([perf(r, "consumed") for r in by(b, 6, "drain")])

def backlog_delta(b):
    return med([(r["rss_after_kb"] - r["rss_before_kb"]) / MB for r in by(b, 6, "publish") if ok(r)])

def idle_base(b):
    return med([r["rss_before_kb"] / MB for r in by(b, 7) if ok(r)])

def idle_open(b):
    return med([r["rss_open_kb"] / MB for r in by(b, 7) if ok(r)])

def idle_opened(b):
    return med([perf(r, "idle_connections") for r in by(b, 7)])

def per_conn(b):
    out = []
    for r in by(b, 7):
        n = perf(r, "idle_connections")
        if ok(r) and n:
            out.append((r["rss_open_kb"] - r["rss_before_kb"]) / n)
    return med(out)

scen = {
    1: ("1 producer → 1 queue → 1 consumer, 16 B, auto-ack, transient, no confirms",
        ["--producers 1 --consumers 1 --size 16"],
        [("publish rate", rate(1, "publish_rate"), " msg/s"), ("consume rate", rate(1, "consume_rate"), " msg/s"),
         ("latency p50 (queueing, not a goal)", lat(1, "p50"), " µs")]),
    2: ("persistent, durable queue, confirms (192 outstanding), manual acks (prefetch 200, multi-ack 200), 12 B",
        ["--size 12 --persistent --confirm 192 --prefetch 200 --multi-ack-every 200"],
        [("publish rate", rate(2, "publish_rate"), " msg/s"), ("confirmed rate", confirm_rate(2), " msg/s"),
         ("consume rate", rate(2, "consume_rate"), " msg/s")]),
    3: ("fanout exchange → 4 queues, 1 producer, 4 consumers, 1 KiB",
        ["--exchange perf-fanout --exchange-type fanout --queues 4 --consumers 4 --producers 1 --size 1024"],
        [("publish rate", rate(3, "publish_rate"), " msg/s"),
         ("consume rate (deliveries over the 4 queues)", rate(3, "consume_rate"), " msg/s")]),
    4: ("latency at a fixed 1,000 msg/s, 16 B, 1 producer, 1 consumer",
        ["--rate 1000 --size 16"],
        [("latency p50", lat(4, "p50"), " µs"), ("latency p99", lat(4, "p99"), " µs"),
         ("consume rate", rate(4, "consume_rate"), " msg/s")]),
    5: ("10 producers, 10 consumers, 10 queues, 256 B",
        ["--producers 10 --consumers 10 --queues 10 --size 256"],
        [("publish rate", rate(5, "publish_rate"), " msg/s"), ("consume rate", rate(5, "consume_rate"), " msg/s")]),
    6: ("backlog: publish only for DURATION s (100 B), then drain it with 1 consumer",
        ["--producers 1 --consumers 0 --size 100 (phase A)",
         f"--producers 0 --consumers 1 --no-purge --drain --size 100 --duration {env['DRAIN_DURATION']} (phase B, same queue)"],
        [("A: publish rate", rate(6, "publish_rate", "publish"), " msg/s"),
         ("B: drain rate", rate(6, "consume_rate", "drain"), " msg/s"),
         ("messages in backlog (published in A)", backlog_msgs, ""),
         ("messages drained in B", drained, ""),
         ("RSS growth over A (VmRSS after A − before A)", backlog_delta, " MiB"),
         ("broker RSS per backlog message", backlog, " B")]),
    8: ("latency under load: 1 producer, 1 consumer, 16 B, at half the broker's own saturation rate (a 5 s scenario-1 run on the same instance first)",
        ["--producers 1 --consumers 1 --size 16 --duration 5 (the saturation run)",
         "--producers 1 --consumers 1 --size 16 --rate R (R = half the saturation run's consume rate)"],
        [("offered rate R", lambda b: med([r.get("target_rate") for r in by(b, 8) if ok(r)]), " msg/s"),
         ("consume rate", rate(8, "consume_rate"), " msg/s"),
         ("latency p50", lat(8, "p50"), " µs"), ("latency p99", lat(8, "p99"), " µs"),
         ("latency p99.9", lat(8, "p999"), " µs"), ("latency max", lat(8, "max"), " µs")]),
    9: ("many queues: 1,000 queues × 10 msg/s (10 producers and 10 consumers, each with 100 queues), 16 B",
        ["--queues 1000 --producers 10 --consumers 10 --rate 1000 --size 16"],
        [("consume rate", rate(9, "consume_rate"), " msg/s"),
         ("latency p50", lat(9, "p50"), " µs"), ("latency p99", lat(9, "p99"), " µs"),
         ("latency max", lat(9, "max"), " µs"),
         ("broker CPU (share of one core over the run)",
          lambda b: med([100 * r["cpu_s"] / float(env["DURATION"]) for r in by(b, 9) if ok(r) and "cpu_s" in r]), " %")]),
    7: (f"idle: {env['IDLE_CONNECTIONS']} idle connections (one channel each) for DURATION s",
        [f"--producers 0 --consumers 0 --idle-connections {env['IDLE_CONNECTIONS']}"],
        [("connections opened", idle_opened, ""), ("broker RSS before", idle_base, " MiB"),
         ("broker RSS with the connections open (max sampled)", idle_open, " MiB"),
         ("broker RSS per connection", per_conn, " KiB")]),
}

present = sorted({r["scenario"] for r in recs})

if env["BASELINE_MODE"] == "1":
    el = int(env["ELAPSED"])
    A = ["# Warren before/after: same-run comparison", "",
         f"Generated by `BASELINE_BIN=... bash bench/compare.sh` on {env['START_DATE']} (total run time {el // 60} min {el % 60} s).", "",
         f"- new: `{env.get('WARREN_VERSION', '?')}` at git {env.get('GIT_REV', '?')}{env.get('GIT_DIRTY', '')} (release binary built {env.get('WARREN_BUILT', '?')})",
         f"- baseline: {env['BASELINE_DESC']}",
         f"- Machine: {env['CPUS']} cores ({env['CPU_MODEL']}), {env['MEM_GB']} GiB RAM, {env['OS_NAME']}; broker and client (`{env['PERF_VERSION']}`) share it.",
         f"- {RUNS} runs per scenario and binary; tables give medians. The binaries take turns scenario by scenario (new, then baseline), each on a fresh broker and data directory; runs last {env['DURATION']} s.",
         "- Ratios are new / baseline: above 1 is better for rates, below 1 for latency and memory.", "",
         "| scenario | metric | new | baseline | new / baseline | runs (new, baseline) |",
         "|---|---|---|---|---|---|"]
    for s in present:
        title, _, rows = scen[s]
        phases = ["publish", "drain"] if s == 6 else ["main"]
        runs = ", ".join(f"{sum(nok(b, s, p) for p in phases)}/{RUNS * len(phases)}" for b in ("warren", "baseline"))
        for label, fn, unit in rows:
            a, b = fn("warren"), fn("baseline")
            A.append(f"| S{s} | {label} | {fmt(a, unit)} | {fmt(b, unit)} | {fr(ratio(a, b))} | {runs} |")
        pa, pb = peak("warren", s), peak("baseline", s)
        A.append(f"| S{s} | peak RSS | {fmt(pa, ' MiB')} | {fmt(pb, ' MiB')} | {fr(ratio(pa, pb))} | {runs} |")
    open(env["RESULTS"], "w").write("\n".join(A) + "\n")
    raise SystemExit(0)
L = []
w = L.append
w("# Warren vs RabbitMQ 3.10: side-by-side benchmark (issue #9)")
w("")
w(f"Generated by `bench/compare.sh` on {env['START_DATE']} (total run time {int(env['ELAPSED']) // 60} min {int(env['ELAPSED']) % 60} s).")
w("")
w("Reproduce (from the repository root, as root, with the Debian package `rabbitmq-server` installed):")
w("")
w("```sh")
w("bash bench/compare.sh")
w("```")
w("")
w("(`WARREN_BIN=target/release/warren PERF_BIN=target/release/warren-perf bash bench/compare.sh` skips the cargo build.)")
w("")
w("## Setup")
w("")
w(f"- Machine: {env['CPUS']} cores ({env['CPU_MODEL']}), {env['MEM_GB']} GiB RAM, {env['OS_NAME']}, {env['KERNEL']}. Broker and client share the machine; nothing is pinned.")
w(f"- Warren: `{env['WARREN_VERSION']}` (release binary built {env['WARREN_BUILT']}; repository at git {env['GIT_REV']}{env['GIT_DIRTY']} when the run started), default settings, `--bind 127.0.0.1`, fresh data directory.")
w(f"- RabbitMQ: {env['RABBITMQ_VERSION']} (Debian package) on Erlang/OTP {env['ERLANG_VERSION']}, default configuration, no plugins, bound to 127.0.0.1, fresh Mnesia directory.")
w(f"- Client: `{env['PERF_VERSION']}` for both brokers, against `amqp://guest:guest@127.0.0.1:PORT/%2f`.")
w(f"- Each scenario ran **{RUNS} times per broker**; tables give the **median** of the successful runs (a count below {RUNS}/{RUNS} is flagged). Runs last {env['DURATION']} s (the drain phase of scenario 6 up to {env['DRAIN_DURATION']} s, ending one second after the last delivery).")
w("- Each broker is started fresh (new data directory, free port) for each scenario 1–5 (its runs share that instance, each run purges its queues first) and for every single run of scenarios 6 and 7, so their memory baselines start from an idle, freshly booted broker (3 s after the port opened).")
w("- Memory is the broker process's resident set from `/proc/PID/status`: VmHWM (peak) and VmRSS (current). For RabbitMQ, only the `beam.smp` process of the node is counted (its pid from `rabbitmqctl eval 'os:getpid().'`), not epmd or `erl_child_setup`. \"Peak RSS\" is the highest VmHWM over the scenario's broker instances. MiB = 1024 KiB.")
w(f"- Open-file limit: `ulimit -n` = {env['NOFILE']} (65536 was not permitted here; the hard limit applies) for the script, the client and both brokers. RabbitMQ is launched with `setpriv` as user `rabbitmq` instead of the package wrapper's `su`, because `su` goes through pam_limits and drops the soft limit to 1024; `ERL_MAX_PORTS=65536`. Nothing else is tuned on either broker.")
w("- Ratios are Warren / RabbitMQ: above 1 is better for rates, below 1 is better for latency and memory.")
w("- Scenario 2: both brokers confirm a persistent message to a durable queue only once an fsync covers it, and both batch their fsyncs (RabbitMQ's message store syncs at least every 200 ms; Warren's writer syncs as soon as the previous sync ends). One difference: RabbitMQ confirms at once, without writing it, a message that was consumed and acknowledged before its write came up; Warren confirms every persistent message after the fsync that covers it.")
w("- After each run the script waits (up to 30 s) until the broker has closed every client connection on its side, so a run does not start while the broker is still working through the previous run's buffered publishes; in scenario 6 it waits likewise after phase A, then 2 s more, before reading VmRSS. RSS per backlog message = (VmRSS after phase A − VmRSS before it) / messages published in phase A.")
w(f"- Scenario 7: VmRSS is sampled every 0.5 s while the idle connections are open; per connection = (highest sample − VmRSS before the run) / connections opened.")
w("- Client and broker share the 2 cores, so warren-perf's own CPU use is part of every number (for both brokers); the tool's ceiling against a trivial sink was not measured.")
w("- Throughput goals are judged on the consume rate (messages delivered per second, i.e. end-to-end), except scenario 6A (publish rate of the publish-only phase) and 6B (drain rate).")
w("")

goals = []
goals_at = len(L)  # the goals table goes here, ahead of the scenario sections
for s in present:
    title, flags, rows = scen[s]
    w(f"## Scenario {s}: {title}".replace("DURATION", env["DURATION"]))
    w("")
    for f in flags:
        cmd, _, note = f.partition(" (")
        if "--duration" not in cmd:
            cmd += f" --duration {env['DURATION']}"
        w(f"- `warren-perf {cmd}`" + (f" ({note}" if note else ""))
    w("")
    phases = ["publish", "drain"] if s == 6 else ["main"]
    counts = " / ".join(f"{p}: Warren {nok('warren', s, p)}/{RUNS}, RabbitMQ {nok('rabbitmq', s, p)}/{RUNS}" for p in phases)
    w(f"Successful runs — {counts}.")
    w("")
    w("| metric | Warren | RabbitMQ | Warren/RabbitMQ |")
    w("|---|---:|---:|---:|")
    vals = {}
    for label, fn, unit in rows:
        wv, rv = fn("warren"), fn("rabbitmq")
        vals[label] = (wv, rv)
        w(f"| {label} | {fmt(wv, unit)} | {fmt(rv, unit)} | {fr(ratio(wv, rv))} |")
    pw, pr = peak("warren", s), peak("rabbitmq", s)
    w(f"| peak broker RSS (VmHWM) | {fmt(pw, ' MiB')} | {fmt(pr, ' MiB')} | {fr(ratio(pw, pr))} |")
    w("")
    def goal(name, key, target, higher, per_run, unit=""):
        wv, rv = vals[key]
        x = ratio(wv, rv)
        met = None if x is None else (x >= target if higher else x <= target)
        runs = {b: " / ".join(fmt(v) for v in per_run(b)) or "n/a" for b in ("warren", "rabbitmq")}
        goals.append((s, name + unit, ("≥ " if higher else "≤ ") + f"{target}×", x, met, runs))
    def each(phase, *key):
        return lambda b: [perf(r, *key) for r in by(b, s, phase) if ok(r)]
    if s in (1, 2, 3, 5):
        goal("throughput (consume rate)", [k for k in vals if k.startswith("consume rate")][0],
             {1: 5}.get(s, 3), True, each("main", "consume_rate"), ", msg/s")
    if s == 4: goal("p99 latency", "latency p99", 0.5, False, each("main", "latency_us", "p99"), ", µs")
    if s == 6:
        goal("A: publish rate", "A: publish rate", 3, True, each("publish", "publish_rate"), ", msg/s")
        goal("B: drain rate", "B: drain rate", 3, True, each("drain", "consume_rate"), ", msg/s")
        goal("RSS per backlog message", "broker RSS per backlog message", 0.25, False,
             lambda b: [(r["rss_after_kb"] - r["rss_before_kb"]) * 1024 / perf(r, "published")
                        for r in by(b, 6, "publish") if ok(r) and perf(r, "published")], ", B")
    if s == 7:
        goal("RSS per idle connection", "broker RSS per connection", 0.25, False,
             lambda b: [(r["rss_open_kb"] - r["rss_before_kb"]) / perf(r, "idle_connections")
                        for r in by(b, 7) if ok(r) and perf(r, "idle_connections")], ", KiB")

G = ["## Goals (issue #9)", "",
     "Medians of the runs; the per-run values (in run order) show the spread.", "",
     "| scenario | metric | goal (Warren/RabbitMQ) | measured | verdict | Warren runs | RabbitMQ runs |",
     "|---|---|---|---:|---|---|---|"]
for s, name, target, x, met, runs in goals:
    verdict = "no data" if met is None else ("**met**" if met else "**missed**")
    G.append(f"| {s} | {name} | {target} | {fr(x)} | {verdict} | {runs['warren']} | {runs['rabbitmq']} |")
G.append("")
L[goals_at:goals_at] = G

# Anomalies: failed runs, client-side errors, short opens, incomplete drains.
w("## Run problems")
w("")
probs = []
for r in recs:
    tag = f"{r['broker']} scenario {r['scenario']} run {r['run']}" + ("" if r["phase"] == "main" else f" ({r['phase']})")
    if r["rc"] != 0:
        why = "timed out (killed by `timeout`)" if r["rc"] in (124, 137) else f"exit status {r['rc']}"
        probs.append(f"- {tag}: warren-perf {why}.")
    elif not isinstance(r.get("perf"), dict):
        probs.append(f"- {tag}: no JSON summary on stdout.")
    if r.get("stderr", "").strip():
        lines = sorted(set(l.strip() for l in r["stderr"].splitlines() if l.strip()))
        probs.append(f"- {tag}: warren-perf stderr: " + "; ".join(f"`{l[:200]}`" for l in lines[:5]))
    if r.get("quiesce_s", 0) >= 1:
        probs.append(f"- {tag}: the broker still held client connections open {r['quiesce_s']} s after warren-perf exited (it was still working through buffered publishes); the script waited for them (up to 30 s) before going on.")
    if r.get("alive") is False:
        probs.append(f"- {tag}: the broker process was gone after the run.")
    if r["scenario"] == 7 and ok(r) and perf(r, "idle_connections") != int(env["IDLE_CONNECTIONS"]):
        probs.append(f"- {tag}: only {perf(r, 'idle_connections')} of {env['IDLE_CONNECTIONS']} idle connections opened.")
    if r["scenario"] == 6 and r["phase"] == "drain" and ok(r):
        pub = [perf(p, "published") for p in by(r["broker"], 6, "publish") if p["run"] == r["run"] and ok(p)]
        if pub and perf(r, "consumed") != pub[0]:
            probs.append(f"- {tag}: drained {perf(r, 'consumed')} messages, {pub[0]} were published in phase A (phase A publishes are unconfirmed; presumably the broker dropped the ones it had not yet enqueued when the client closed its connection without `connection.close`).")
w("\n".join(probs) if probs else "None: every warren-perf run exited 0 with a JSON summary and nothing on stderr besides progress lines.")
w("")

# Broker logs: warnings and errors, grouped by message shape.
w("## Broker logs")
w("")
ansi = re.compile(r"\x1b\[[0-9;]*m")
groups = {"warren": collections.Counter(), "rabbitmq": collections.Counter()}
example, where = {}, collections.defaultdict(set)
for line in open(env["LOGS"]):
    broker, path = line.split(maxsplit=1)
    path = path.strip()
    m = re.search(r"-s(\d+)-\d+/", path)
    scenario = m.group(1) if m else "?"
    try:
        text = open(path, errors="replace").read()
    except OSError:
        continue
    # [level, headline, further lines, (timestamp, pid)]: RabbitMQ prefixes
    # every line of a multi-line entry with the same timestamp and pid.
    entries = []
    last = None
    for l in ansi.sub("", text).splitlines():
        if broker == "warren":
            m = re.search(r"\s(WARN|ERROR)\s+(.*)", l)
            if m:
                entries.append([m.group(1), m.group(2), [], None])
            continue
        m = re.match(r"(\S+ \S+) \[(\w+)\] (<[^>]*>)\s*(.*)", l)
        if not m:
            continue
        ts, level, pid, msg = m.groups()
        if (ts, pid) == last:
            if entries and entries[-1][3] == (ts, pid):
                entries[-1][2].append(msg.strip())
            continue
        last = (ts, pid)
        if level in ("warning", "error", "critical", "alert", "emergency"):
            entries.append([level, msg, [], (ts, pid)])
    for level, msg, rest, _ in entries:
        detail = ""
        # A crash report's reason: the line after "** Reason for termination ==",
        # a crasher's "exception exit: ...", a supervisor report's "reason: ...".
        for i, l in enumerate(rest):
            if l.startswith("** Reason for termination") and i + 1 < len(rest):
                detail = rest[i + 1].lstrip("* ").strip()
                break
            if l.startswith("exception exit:") or l.startswith("reason:"):
                detail = l.split(":", 1)[1].strip()
                break
        if rest and not detail and not msg.startswith(("**", "crasher", "supervisor")):
            detail = rest[0]
        shape = re.sub(r"<[0-9.]+>", "<pid>", msg)
        shape = re.sub(r"\d+", "N", shape)[:160] + " | " + re.sub(r"\d+", "N", detail)[:80]
        key = (level.upper(), shape)
        groups[broker][key] += 1
        where[(broker, key)].add(scenario)
        example.setdefault((broker, key), msg.strip()[:200] + (f" … {detail[:120]}" if detail else ""))
for broker, name in (("warren", "Warren"), ("rabbitmq", "RabbitMQ")):
    c = groups[broker]
    if not c:
        w(f"- {name}: no warnings or errors logged.")
        continue
    w(f"- {name}: {sum(c.values())} warning/error log entries (a multi-line entry counted once); by kind:")
    for key, n in c.most_common(12):
        sc = ", ".join(sorted(where[(broker, key)], key=lambda x: (len(x), x)))
        w(f"  - {n} × {key[0]} (scenario {sc}): `{example[(broker, key)]}`")
keys = {k[1] for c in groups.values() for k in c}
notes = []
if any("closing AMQP connection" in k for k in keys):
    notes.append("`closing AMQP connection ...: client unexpectedly closed TCP connection`: warren-perf drops its sockets at the end of a run without `connection.close`, and RabbitMQ logs that as a warning for every connection; this is the client's doing.")
if any("connection_forced" in k for k in keys):
    notes.append("`Error on AMQP connection ... connection_forced ... 'shutdown'`: the node was stopped while a client connection was still open on its side.")
if any(k.startswith(("supervisor:", "** Generic server", "crasher")) for k in keys):
    notes.append("`supervisor: {..., rabbit_channel_sup...}`, `** Generic server ... terminating` and `crasher:` entries are Erlang supervisor and crash reports (their reason after the `…`), here from rabbit_channel processes torn down after warren-perf dropped their connection. Full reports are in the node logs (kept with `KEEP_WORK=1`).")
if any("rebuilding indices from scratch" in k for k in keys):
    notes.append("`Message store ... rebuilding indices from scratch`: logged once per fresh node on first boot.")
if notes:
    w("")
    w("Reading the log lines:")
    w("")
    for n in notes:
        w(f"- {n}")
w("")
w("Raw per-run records (warren-perf JSON, RSS samples): `bench/results-raw.jsonl`.")
open(env["RESULTS"], "w").write("\n".join(L) + "\n")
PY
log "wrote $RESULTS (run time $((ELAPSED / 60)) min $((ELAPSED % 60)) s)"
