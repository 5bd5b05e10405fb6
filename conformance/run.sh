#!/usr/bin/env bash
# Client conformance suite: drives the real `warren` binary with pika (Python)
# and the RabbitMQ Java client, and fails on any behaviour that differs from
# RabbitMQ's.  See conformance/README.md.
#
# Environment:
#   WARREN_BIN          use this broker binary and skip `cargo build --release -p server`
#   WARREN_AMQP_PORT    do not start a broker; run the scenarios against 127.0.0.1:PORT
#                       (e.g. a RabbitMQ node, to check the suite itself; no shutdown check)
#   CONFORMANCE_PRODUCT expected server_properties.product (default "Warren")
#   CONFORMANCE_ONLY    comma-separated scenario names to run (default: all)
#   CONFORMANCE_VERBOSE print stack traces of failing scenarios
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/conformance
TARGET=$ROOT/target
VENV=$TARGET/conformance-venv
JAVA_OUT=$TARGET/conformance-java
LOG=$TARGET/conformance-warren.log
SCENARIO_COUNT=10
START=$SECONDS

say() { echo "== $*" >&2; }
die() { echo "conformance: $*" >&2; exit 1; }

# ---------------------------------------------------------------- dependencies

if [[ -z "${WARREN_AMQP_PORT:-}" ]]; then
    if [[ -n "${WARREN_BIN:-}" ]]; then
        BIN=$WARREN_BIN
        say "using WARREN_BIN=$BIN (no build)"
    else
        say "cargo build --release -p server"
        (cd "$ROOT" && cargo build --release -p server)
        BIN=$TARGET/release/warren
    fi
    [[ -x "$BIN" ]] || die "broker binary $BIN is missing or not executable"
fi

if ! "$VENV/bin/python" -c 'import pika' >/dev/null 2>&1; then
    say "creating $VENV with pika"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'pika>=1.3,<2'
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

BROKER_PID=
DATA_DIR=
cleanup() {
    if [[ -n "$BROKER_PID" ]] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    [[ -n "$DATA_DIR" ]] && rm -rf "$DATA_DIR"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -n "${WARREN_AMQP_PORT:-}" ]]; then
    PORT=$WARREN_AMQP_PORT
    say "using the broker already listening on 127.0.0.1:$PORT"
else
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/warren-conformance.XXXXXX")
    mkdir -p "$TARGET"
    say "starting $BIN on 127.0.0.1:$PORT (data dir $DATA_DIR, log $LOG)"
    # the broker reads WARREN_* settings (config file, default user, ...) from
    # the environment: start it from a clean slate so only the flags apply
    unset_args=()
    for v in $(compgen -e | grep '^WARREN_' || true); do unset_args+=(-u "$v"); done
    env "${unset_args[@]}" NO_COLOR=1 "$BIN" --data-dir "$DATA_DIR" --bind 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
    BROKER_PID=$!
    ready=
    for _ in $(seq 1 300); do  # up to 30 s
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            tail -n 30 "$LOG" >&2 || true
            die "broker exited before accepting connections"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then ready=1; break; fi
        sleep 0.1
    done
    [[ -n "$ready" ]] || die "broker did not accept connections on port $PORT within 30 s"
fi

# ------------------------------------------------------------------- scenarios

RESULTS=$(mktemp "${TMPDIR:-/tmp}/warren-conformance-results.XXXXXX")
ONLY_ARGS=()
[[ -n "${CONFORMANCE_ONLY:-}" ]] && ONLY_ARGS=(--only "$CONFORMANCE_ONLY")

# run_client NAME CMD...: runs one client's scenarios, echoing and recording the
# PASS/FAIL lines; a runner that dies or skips scenarios is itself a failure.
run_client() {
    local client=$1; shift
    local out rc=0
    out=$(mktemp "${TMPDIR:-/tmp}/warren-conformance-$client.XXXXXX")
    say "$client scenarios"
    "$@" "${ONLY_ARGS[@]}" 2>&1 | tee "$out" || rc=${PIPESTATUS[0]}
    grep -E '^(PASS|FAIL) ' "$out" >>"$RESULTS" || true
    local reported failed
    reported=$(grep -cE '^(PASS|FAIL) ' "$out" || true)
    failed=$(grep -cE '^FAIL ' "$out" || true)
    if [[ -z "${CONFORMANCE_ONLY:-}" && "$reported" -ne "$SCENARIO_COUNT" ]]; then
        echo "FAIL $client.runner: reported $reported of $SCENARIO_COUNT scenarios (exit $rc)" | tee -a "$RESULTS"
    elif [[ "$rc" -ne 0 && "$failed" -eq 0 ]]; then
        echo "FAIL $client.runner: exited $rc without reporting a failed scenario" | tee -a "$RESULTS"
    fi
    rm -f "$out"
}

export CONFORMANCE_PRODUCT=${CONFORMANCE_PRODUCT:-Warren}
run_client pika "$VENV/bin/python" "$HERE/pika_scenarios.py" --port "$PORT"
run_client java java -cp "$CLASSPATH_JAVA" Scenarios --port "$PORT"

# ------------------------------------------------------------ graceful shutdown

if [[ -n "$BROKER_PID" ]]; then
    say "stopping the broker (SIGTERM)"
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        rc=0; wait "$BROKER_PID" || rc=$?
        echo "FAIL broker.graceful_shutdown: broker died during the run (exit $rc)" | tee -a "$RESULTS"
    else
        kill -TERM "$BROKER_PID"
        stopped=
        for _ in $(seq 1 150); do  # up to 15 s
            if ! kill -0 "$BROKER_PID" 2>/dev/null; then stopped=1; break; fi
            sleep 0.1
        done
        if [[ -z "$stopped" ]]; then
            echo "FAIL broker.graceful_shutdown: still running 15 s after SIGTERM" | tee -a "$RESULTS"
        else
            rc=0; wait "$BROKER_PID" || rc=$?
            if [[ "$rc" -eq 0 ]]; then
                echo "PASS broker.graceful_shutdown" | tee -a "$RESULTS"
            else
                echo "FAIL broker.graceful_shutdown: exit status $rc after SIGTERM" | tee -a "$RESULTS"
            fi
        fi
        BROKER_PID=
    fi
fi

# --------------------------------------------------------------------- summary

passed=$(grep -c '^PASS ' "$RESULTS" || true)
failed=$(grep -c '^FAIL ' "$RESULTS" || true)
if [[ "$failed" -gt 0 ]]; then
    echo
    echo "failures:"
    grep '^FAIL ' "$RESULTS" | sed 's/^/  /'
    [[ -f "$LOG" && -z "${WARREN_AMQP_PORT:-}" ]] && { echo "broker log tail ($LOG):"; tail -n 20 "$LOG" | sed 's/^/  /'; }
fi
rm -f "$RESULTS"
echo "conformance run took $((SECONDS - START)) s" >&2
echo "$passed passed, $failed failed"
[[ "$failed" -eq 0 ]]
