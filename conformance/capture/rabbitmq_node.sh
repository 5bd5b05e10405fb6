# Throwaway RabbitMQ node for the capture scripts (capture_definitions.sh,
# capture_management_api.sh); sourced, not run, after `set -euo pipefail`:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/rabbitmq_node.sh"
#
# Provides:
#   node_preflight              die unless root, $RABBITMQ_LIB/rabbitmq-server
#                               and rabbitmqctl are there
#   node_init TEMPLATE          WORK=$(mktemp -d TEMPLATE), remembers the epmd
#                               already running, RNODE="" BPID="", and installs
#                               the EXIT trap (node_cleanup) and INT/TERM -> 130
#   node_cleanup                (the EXIT trap) node_cleanup_hook if defined,
#                               stops the node, kills an epmd it started, on
#                               failure tails $WORK/start.log and the files in
#                               NODE_FAIL_LOGS, removes $WORK (unless
#                               KEEP_WORK=1) and $TMP_VENV, exits with the status
#   find_pika VENV_TEMPLATE PYTHON...
#                               unless PYTHON is set: the first candidate that
#                               imports pika, else a new venv (TMP_VENV) with it
#   free_port, free_port_except PORT..., port_open PORT, wait_port PORT SECONDS
#   start_node PLUGINS          starts node $RNODE as user rabbitmq (setpriv)
#                               with mnesia/log dirs and enabled_plugins
#                               (PLUGINS, e.g. '[].') under $WORK, AMQP on
#                               127.0.0.1:$PORT, distribution on $DPORT,
#                               $WORK/rabbitmq.conf if present; waits for
#                               startup and sets BPID (the node's OS pid)
#   rmqctl ARGS                 rabbitmqctl -n $RNODE with a 60 s timeout
# The sourcing script must define log (message to stderr) and die (log, exit
# 1), set RABBITMQ_LIB, call node_init before anything else, and set RNODE,
# PORT and DPORT before start_node. It may define node_cleanup_hook (run
# first on exit, e.g. to stop a background consumer; must not fail) and set
# NODE_FAIL_LOGS (an array of more logs to show on failure).

rmqctl() { timeout 60 rabbitmqctl -n "$RNODE" "$@"; }

node_preflight() {
    [[ $(id -u) == 0 ]] || die "run as root (the node runs as user rabbitmq)"
    [[ -x $RABBITMQ_LIB/rabbitmq-server ]] || die "$RABBITMQ_LIB/rabbitmq-server missing (apt-get install rabbitmq-server)"
    command -v rabbitmqctl >/dev/null || die "rabbitmqctl not on PATH"
}

node_init() { # mktemp template for WORK
    WORK=$(mktemp -d "$1")
    chmod 755 "$WORK"
    EPMD_BEFORE=$(pgrep -x epmd || true)
    RNODE="" BPID=""
    trap node_cleanup EXIT
    trap 'exit 130' INT TERM
}

node_cleanup() {
    local rc=$?
    if declare -F node_cleanup_hook >/dev/null; then node_cleanup_hook; fi
    if [[ -n $RNODE ]]; then
        rmqctl stop >>"$WORK/start.log" 2>&1 || true
        if [[ -n $BPID ]]; then
            local i
            for ((i = 0; i < 300; i++)); do
                kill -0 "$BPID" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$BPID" 2>/dev/null; then
                kill -TERM "$BPID" 2>/dev/null || true
                sleep 2
                kill -KILL "$BPID" 2>/dev/null || true
            fi
        fi
    fi
    local e
    for e in $(pgrep -x epmd || true); do # only an epmd that our node started
        [[ " $EPMD_BEFORE " == *" $e "* ]] || kill "$e" 2>/dev/null || true
    done
    if ((rc != 0)); then
        local f
        for f in "$WORK/start.log" ${NODE_FAIL_LOGS[@]+"${NODE_FAIL_LOGS[@]}"}; do
            [[ -s $f ]] || continue
            log "$f:"
            tail -n 30 "$f" >&2 || true
        done
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    [[ -z ${TMP_VENV:-} ]] || rm -rf "$TMP_VENV"
    exit "$rc"
}

find_pika() { # venv mktemp template, candidate interpreters...
    local template=$1 p
    shift
    if [[ -z ${PYTHON:-} ]]; then
        for p in "$@"; do
            if "$p" -c 'import pika' >/dev/null 2>&1; then PYTHON=$p; break; fi
        done
    fi
    if [[ -z ${PYTHON:-} ]]; then
        TMP_VENV=$(mktemp -d "$template")
        log "creating $TMP_VENV with pika"
        python3 -m venv "$TMP_VENV"
        "$TMP_VENV/bin/pip" install -q --disable-pip-version-check 'pika>=1.3,<2'
        PYTHON=$TMP_VENV/bin/python
    fi
    "$PYTHON" -c 'import pika' || die "$PYTHON cannot import pika"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

free_port_except() { # ports to avoid...
    local p
    p=$(free_port)
    while [[ " $* " == *" $p "* ]]; do p=$(free_port); done
    printf '%s\n' "$p"
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

start_node() { # enabled plugins, e.g. '[].'
    mkdir -p "$WORK/mnesia" "$WORK/log"
    echo "$1" >"$WORK/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$WORK"
    local env=(HOME=/var/lib/rabbitmq
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$PORT"
        RABBITMQ_DIST_PORT="$DPORT" RABBITMQ_NODENAME="$RNODE"
        RABBITMQ_MNESIA_BASE="$WORK/mnesia" RABBITMQ_LOG_BASE="$WORK/log"
        RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/enabled_plugins")
    [[ ! -e $WORK/rabbitmq.conf ]] || env+=(RABBITMQ_CONFIG_FILE="$WORK/rabbitmq.conf")
    # setpriv instead of the package wrapper's `su` (as bench/compare.sh does).
    (cd /var/lib/rabbitmq && setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
        env "${env[@]}" "$RABBITMQ_LIB/rabbitmq-server" -detached) >"$WORK/start.log" 2>&1
    wait_port "$PORT" 90 || die "rabbitmq did not open port $PORT"
    rmqctl await_startup >/dev/null
    BPID=$(rmqctl eval 'os:getpid().' 2>/dev/null | tr -dc 0-9 || true)
}
