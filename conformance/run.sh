#!/usr/bin/env bash
# Client conformance suite: drives the real `warren` binary with pika (Python),
# the RabbitMQ Java client, kombu (py-amqp) with a real Celery worker, and
# amqplib (Node.js), and fails on any behaviour that differs from RabbitMQ's.
# See conformance/README.md.
#
# Four brokers are started: the main one (defaults), "alarm" with a 256 KiB
# memory high watermark (connection_blocked), "timeout" with a 300 ms
# consumer timeout (consumer_timeout) and "tls" with an AMQPS listener using a
# throwaway PKI made by make_pki.sh, verifying client certificates (tls_*).
#
# Environment:
#   WARREN_BIN          use this broker binary and skip `cargo build --release`
#   WARREN_AMQP_PORT    do not start brokers; run the scenarios against 127.0.0.1:PORT
#                       (e.g. a RabbitMQ node, to check the suite itself; no shutdown check)
#   WARREN_ALARM_AMQP_PORT, WARREN_TIMEOUT_AMQP_PORT
#                       with WARREN_AMQP_PORT: the brokers for connection_blocked and
#                       consumer_timeout (those scenarios are skipped without them)
#   WARREN_TLS_AMQPS_PORT, WARREN_TLS_DIR
#                       with WARREN_AMQP_PORT: the AMQPS port of a broker using the PKI that
#                       make_pki.sh wrote to WARREN_TLS_DIR (tls_* are skipped without both)
#   CONFORMANCE_PRODUCT expected server_properties.product (default "Warren")
#   CONFORMANCE_ONLY    comma-separated scenario names to run (default: all)
#   CONFORMANCE_VERBOSE print stack traces of failing scenarios
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/conformance
TARGET=$ROOT/target
VENV=$TARGET/conformance-venv
JAVA_OUT=$TARGET/conformance-java
LOG=$TARGET/conformance-warren.log  # and conformance-warren-{alarm,timeout,tls}.log
SCENARIO_COUNT=20        # pika and Java each run the same 20 scenarios
KOMBU_SCENARIO_COUNT=5   # kombu_scenarios.py
AMQPLIB_SCENARIO_COUNT=5 # amqplib/scenarios.js
AMQPLIB_VERSION=0.10.9
NODE_DIR=$TARGET/conformance-node
ALARM_WATERMARK=262144   # octets; connection_blocked publishes ~2 MiB
CONSUMER_TIMEOUT_MS=300  # consumer_timeout expects exactly this value
START=$SECONDS

say() { echo "== $*" >&2; }
die() { echo "conformance: $*" >&2; exit 1; }

# ---------------------------------------------------------------- dependencies

if [[ -z "${WARREN_AMQP_PORT:-}" ]]; then
    if [[ -n "${WARREN_BIN:-}" ]]; then
        BIN=$WARREN_BIN
        say "using WARREN_BIN=$BIN (no build)"
    else
        say "cargo build --release (warren and warrenctl, the build cargo run --release uses)"
        (cd "$ROOT" && cargo build --release)
        BIN=$TARGET/release/warren
    fi
    [[ -x "$BIN" ]] || die "broker binary $BIN is missing or not executable"
fi

if ! command -v openssl >/dev/null 2>&1; then
    say "installing openssl (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
command -v openssl >/dev/null 2>&1 || die "openssl not found after installing it"

if ! "$VENV/bin/python" -c 'import pika, kombu, celery' >/dev/null 2>&1; then
    say "creating $VENV with pika, kombu and celery"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'pika>=1.3,<2' 'kombu>=5.3,<6' 'celery>=5.3,<6'
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    say "installing Node.js and npm (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [[ "$(node -p "require('$NODE_DIR/node_modules/amqplib/package.json').version" 2>/dev/null)" != "$AMQPLIB_VERSION" ]]; then
    say "installing amqplib $AMQPLIB_VERSION into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --no-save --silent "amqplib@$AMQPLIB_VERSION"
fi

AMQP_JAR=/usr/share/java/amqp-client.jar
SLF4J_JAR=/usr/share/java/slf4j-api.jar
if ! command -v javac >/dev/null 2>&1 || [[ ! -f $AMQP_JAR || ! -f $SLF4J_JAR ]]; then
    say "installing the RabbitMQ Java client and a JDK (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        librabbitmq-client-java libslf4j-java default-jdk-headless >/dev/null
fi
[[ -f $AMQP_JAR ]] || die "$AMQP_JAR not found after installing librabbitmq-client-java"
CLASSPATH_JAVA=$JAVA_OUT:$AMQP_JAR:$SLF4J_JAR
# a no-op slf4j binding keeps the client's logging quiet
[[ -f /usr/share/java/slf4j-nop.jar ]] && CLASSPATH_JAVA+=:/usr/share/java/slf4j-nop.jar

say "javac -> $JAVA_OUT"
rm -rf "$JAVA_OUT"
mkdir -p "$JAVA_OUT"
javac -nowarn -encoding UTF-8 -d "$JAVA_OUT" -cp "$AMQP_JAR" "$HERE/java/Scenarios.java"

# ---------------------------------------------------------------------- broker

BROKER_NAMES=()   # broker, broker-alarm, broker-timeout, broker-tls
BROKER_PIDS=()
BROKER_PORTS=()
BROKER_TLS_PORTS=()  # "" for brokers without a TLS listener
BROKER_LOGS=()
DATA_DIRS=()
cleanup() {
    local pid
    for pid in "${BROKER_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    [[ ${#DATA_DIRS[@]} -gt 0 ]] && rm -rf "${DATA_DIRS[@]}"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USED_PORTS=" "
# free_port: sets FREE_PORT to a free TCP port on 127.0.0.1 not handed out before
# in this run (no subshell, so USED_PORTS keeps track)
free_port() {
    while :; do
        FREE_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
        [[ $USED_PORTS == *" $FREE_PORT "* ]] || break
    done
    USED_PORTS+="$FREE_PORT "
}

# start_broker NAME LOG TLS_PORT [FLAGS...]: starts the broker on a free port in the
# background; TLS_PORT ("" if none) is its AMQPS port, set among FLAGS
start_broker() {
    local bname=$1 log=$2 tls_port=$3; shift 3
    local port dir
    free_port; port=$FREE_PORT
    dir=$(mktemp -d "${TMPDIR:-/tmp}/warren-conformance.XXXXXX")
    DATA_DIRS+=("$dir")
    say "starting $bname: $BIN --port $port${*:+ $*} (data dir $dir, log $log)"
    # the broker reads WARREN_* settings (config file, default user, ...) from
    # the environment: start it from a clean slate so only the flags apply
    env "${unset_args[@]}" NO_COLOR=1 "$BIN" --data-dir "$dir" --bind 127.0.0.1 --port "$port" --management-port 0 --prometheus-port 0 "$@" >"$log" 2>&1 &
    BROKER_NAMES+=("$bname"); BROKER_PIDS+=("$!"); BROKER_PORTS+=("$port"); BROKER_LOGS+=("$log")
    BROKER_TLS_PORTS+=("$tls_port")
}

# wait_ready I: waits until broker number I accepts connections on its port(s);
# all brokers share one 30 s budget
READY_DEADLINE=$((SECONDS + 30))
wait_ready() {
    local i=$1 p
    for p in ${BROKER_PORTS[$i]} ${BROKER_TLS_PORTS[$i]}; do
        while ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do
            if ! kill -0 "${BROKER_PIDS[$i]}" 2>/dev/null; then
                tail -n 30 "${BROKER_LOGS[$i]}" >&2 || true
                die "${BROKER_NAMES[$i]} exited before accepting connections"
            fi
            [[ $SECONDS -lt $READY_DEADLINE ]] ||
                die "${BROKER_NAMES[$i]} did not accept connections on port $p within 30 s"
            sleep 0.1
        done
    done
}

if [[ -n "${WARREN_AMQP_PORT:-}" ]]; then
    PORT=$WARREN_AMQP_PORT
    ALARM_PORT=${WARREN_ALARM_AMQP_PORT:-}
    TIMEOUT_PORT=${WARREN_TIMEOUT_AMQP_PORT:-}
    TLS_PORT=${WARREN_TLS_AMQPS_PORT:-}
    TLS_DIR=${WARREN_TLS_DIR:-}
    if [[ -n "$TLS_PORT" && ! -f "$TLS_DIR/ca.pem" ]]; then
        die "WARREN_TLS_AMQPS_PORT needs WARREN_TLS_DIR, a directory written by conformance/make_pki.sh"
    fi
    say "using the broker already listening on 127.0.0.1:$PORT" \
        "(alarm: ${ALARM_PORT:-none}, timeout: ${TIMEOUT_PORT:-none}, tls: ${TLS_PORT:-none})"
else
    mkdir -p "$TARGET"
    unset_args=()
    for v in $(compgen -e | grep '^WARREN_' || true); do unset_args+=(-u "$v"); done
    TLS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/warren-conformance-pki.XXXXXX")
    DATA_DIRS+=("$TLS_DIR")
    say "test PKI (make_pki.sh) in $TLS_DIR"
    "$HERE/make_pki.sh" "$TLS_DIR"
    free_port; TLS_PORT=$FREE_PORT
    start_broker broker "$LOG" ""
    start_broker broker-alarm "${LOG%.log}-alarm.log" "" --memory-high-watermark "$ALARM_WATERMARK"
    start_broker broker-timeout "${LOG%.log}-timeout.log" "" --consumer-timeout "$CONSUMER_TIMEOUT_MS"
    start_broker broker-tls "${LOG%.log}-tls.log" "$TLS_PORT" --tls-port "$TLS_PORT" \
        --tls-cert "$TLS_DIR/server.pem" --tls-key "$TLS_DIR/server.key" \
        --tls-ca "$TLS_DIR/ca.pem" --tls-verify-peer
    for i in "${!BROKER_PIDS[@]}"; do wait_ready "$i"; done
    PORT=${BROKER_PORTS[0]} ALARM_PORT=${BROKER_PORTS[1]} TIMEOUT_PORT=${BROKER_PORTS[2]}
fi

# ------------------------------------------------------------------- scenarios

RESULTS=$(mktemp "${TMPDIR:-/tmp}/warren-conformance-results.XXXXXX")
ONLY_ARGS=()
[[ -n "${CONFORMANCE_ONLY:-}" ]] && ONLY_ARGS=(--only "$CONFORMANCE_ONLY")
PORT_ARGS=(--port "$PORT")
[[ -n "$ALARM_PORT" ]] && PORT_ARGS+=(--alarm-port "$ALARM_PORT")
[[ -n "$TIMEOUT_PORT" ]] && PORT_ARGS+=(--timeout-port "$TIMEOUT_PORT")
[[ -n "$TLS_PORT" ]] && PORT_ARGS+=(--tls-port "$TLS_PORT" --tls-dir "$TLS_DIR")

# run_client NAME COUNT CMD...: runs one client's COUNT scenarios, echoing and recording
# the PASS/FAIL/SKIP lines; a runner that dies or leaves scenarios out is itself a failure.
run_client() {
    local client=$1 count=$2; shift 2
    local out rc=0
    out=$(mktemp "${TMPDIR:-/tmp}/warren-conformance-$client.XXXXXX")
    say "$client scenarios"
    "$@" "${PORT_ARGS[@]}" "${ONLY_ARGS[@]}" 2>&1 | tee "$out" || rc=${PIPESTATUS[0]}
    grep -E '^(PASS|FAIL|SKIP) ' "$out" >>"$RESULTS" || true
    local reported failed
    reported=$(grep -cE '^(PASS|FAIL|SKIP) ' "$out" || true)
    failed=$(grep -cE '^FAIL ' "$out" || true)
    if [[ -z "${CONFORMANCE_ONLY:-}" && "$reported" -ne "$count" ]]; then
        echo "FAIL $client.runner: reported $reported of $count scenarios (exit $rc)" | tee -a "$RESULTS"
    elif [[ "$rc" -ne 0 && "$failed" -eq 0 ]]; then
        echo "FAIL $client.runner: exited $rc without reporting a failed scenario" | tee -a "$RESULTS"
    fi
    rm -f "$out"
}

export CONFORMANCE_PRODUCT=${CONFORMANCE_PRODUCT:-Warren}
run_client pika "$SCENARIO_COUNT" "$VENV/bin/python" "$HERE/pika_scenarios.py"
run_client java "$SCENARIO_COUNT" java -cp "$CLASSPATH_JAVA" Scenarios
run_client kombu "$KOMBU_SCENARIO_COUNT" "$VENV/bin/python" "$HERE/kombu_scenarios.py"
run_client amqplib "$AMQPLIB_SCENARIO_COUNT" env NODE_PATH="$NODE_DIR/node_modules" node "$HERE/amqplib/scenarios.js"

# RabbitMQ 3.10's recorded replies to quorum-queue declares and consumers
# (conformance/capture/probe_quorum.py, raw frames): this broker must give
# the same replies, text for text (the file's first lines say when it was
# captured).
if [[ -z "${CONFORMANCE_ONLY:-}" || ",$CONFORMANCE_ONLY," == *,capture.quorum_replies,* ]]; then
    say "recorded quorum-queue replies"
    recorded=$ROOT/crates/queue-store/tests/data/rabbitmq_3_10_quorum.md
    got=$(mktemp "${TMPDIR:-/tmp}/warren-conformance-quorum.XXXXXX")
    if python3 "$HERE/capture/probe_quorum.py" --port "$PORT" --out "$got" >/dev/null \
        && diff <(sed 1,3d "$recorded") <(sed 1,3d "$got") >&2; then
        echo "PASS capture.quorum_replies" | tee -a "$RESULTS"
    else
        echo "FAIL capture.quorum_replies: replies differ from $recorded (diff above)" | tee -a "$RESULTS"
    fi
    rm -f "$got"
fi

# ------------------------------------------------------------ graceful shutdown

if [[ ${#BROKER_PIDS[@]} -gt 0 ]]; then
    say "stopping the brokers (SIGTERM)"
    died=()
    for i in "${!BROKER_PIDS[@]}"; do
        if kill -0 "${BROKER_PIDS[$i]}" 2>/dev/null; then
            kill -TERM "${BROKER_PIDS[$i]}"
            died+=("")
        else
            died+=(1)
        fi
    done
    for i in "${!BROKER_PIDS[@]}"; do
        pid=${BROKER_PIDS[$i]} bname=${BROKER_NAMES[$i]}
        if [[ -n "${died[$i]}" ]]; then
            rc=0; wait "$pid" || rc=$?
            echo "FAIL $bname.graceful_shutdown: broker died during the run (exit $rc)" | tee -a "$RESULTS"
            continue
        fi
        stopped=
        for _ in $(seq 1 150); do  # up to 15 s
            if ! kill -0 "$pid" 2>/dev/null; then stopped=1; break; fi
            sleep 0.1
        done
        if [[ -z "$stopped" ]]; then
            echo "FAIL $bname.graceful_shutdown: still running 15 s after SIGTERM" | tee -a "$RESULTS"
        else
            rc=0; wait "$pid" || rc=$?
            if [[ "$rc" -eq 0 ]]; then
                echo "PASS $bname.graceful_shutdown" | tee -a "$RESULTS"
            else
                echo "FAIL $bname.graceful_shutdown: exit status $rc after SIGTERM" | tee -a "$RESULTS"
            fi
        fi
    done
fi

# --------------------------------------------------------------------- summary

passed=$(grep -c '^PASS ' "$RESULTS" || true)
failed=$(grep -c '^FAIL ' "$RESULTS" || true)
skipped=$(grep -c '^SKIP ' "$RESULTS" || true)
if [[ "$failed" -gt 0 ]]; then
    echo
    echo "failures:"
    grep '^FAIL ' "$RESULTS" | sed 's/^/  /'
    for log in "${BROKER_LOGS[@]}"; do
        if [[ -s "$log" ]]; then echo "broker log tail ($log):"; tail -n 10 "$log" | sed 's/^/  /'; fi
    done
fi
rm -f "$RESULTS"
echo "conformance run took $((SECONDS - START)) s" >&2
if [[ "$skipped" -gt 0 ]]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[[ "$failed" -eq 0 ]]
