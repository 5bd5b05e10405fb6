#!/usr/bin/env bash
# Record a real RabbitMQ 3.10 definitions export (`rabbitmqctl
# export_definitions`) as a test fixture for Warren's definitions import:
#
#   crates/server/tests/data/rabbitmq_3_10_definitions.json
#
# Starts a throwaway RabbitMQ node (own mnesia/log dirs under a temp dir, a
# free AMQP port, a unique node name; the default node in /var/lib/rabbitmq
# and systemd are not touched), creates a vhost, a user with tags,
# permissions, topic permissions and a policy with rabbitmqctl, declares
# exchanges, queues and bindings (queue, exchange-to-exchange and headers
# bindings, queue and exchange arguments) with pika, exports the definitions,
# pretty-prints them with `python3 -m json.tool`, then stops the node and
# removes the temp dir.
#
#   bash conformance/capture/capture_definitions.sh
#
# Run as root (the node runs as user `rabbitmq`) with the Debian package
# rabbitmq-server (3.10) installed. Uses target/conformance-venv (made by
# conformance/run.sh) when it has pika, otherwise creates a venv under /tmp.
# Environment: PYTHON (an interpreter with pika), OUT (output path),
# RABBITMQ_LIB (/usr/lib/rabbitmq/bin), KEEP_WORK=1 (keep the node's dirs).
# The password hashes are salted, so every run gives a different
# password_hash; everything else should be stable.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$ROOT/crates/server/tests/data/rabbitmq_3_10_definitions.json}
RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "capture_definitions: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (the node runs as user rabbitmq)"
[[ -x $RABBITMQ_LIB/rabbitmq-server ]] || die "$RABBITMQ_LIB/rabbitmq-server missing (apt-get install rabbitmq-server)"
command -v rabbitmqctl >/dev/null || die "rabbitmqctl not on PATH"

WORK=$(mktemp -d /tmp/warren-defs.XXXXXX)
chmod 755 "$WORK"
EPMD_BEFORE=$(pgrep -x epmd || true)
RNODE="" BPID=""

rmqctl() { timeout 60 rabbitmqctl -n "$RNODE" "$@"; }

cleanup() {
    local rc=$?
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
    if ((rc != 0)) && [[ -f $WORK/start.log ]]; then
        log "node start log:"
        tail -n 30 "$WORK/start.log" >&2 || true
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    [[ -z ${TMP_VENV:-} ]] || rm -rf "$TMP_VENV"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

# ------------------------------------------------------------------ pika --
if [[ -z ${PYTHON:-} ]]; then
    if "$ROOT/target/conformance-venv/bin/python" -c 'import pika' >/dev/null 2>&1; then
        PYTHON=$ROOT/target/conformance-venv/bin/python
    else
        TMP_VENV=$(mktemp -d /tmp/warren-defs-venv.XXXXXX)
        log "creating $TMP_VENV with pika"
        python3 -m venv "$TMP_VENV"
        "$TMP_VENV/bin/pip" install -q --disable-pip-version-check 'pika>=1.3,<2'
        PYTHON=$TMP_VENV/bin/python
    fi
fi
"$PYTHON" -c 'import pika' || die "$PYTHON cannot import pika"

# ------------------------------------------------------------------ node --
mkdir -p "$WORK/mnesia" "$WORK/log"
echo '[].' >"$WORK/enabled_plugins"
chown -R rabbitmq:rabbitmq "$WORK"
PORT=$(free_port)
DPORT=$(free_port)
while [[ $DPORT == "$PORT" ]]; do DPORT=$(free_port); done
RNODE="warrendefs$$@localhost"
log "starting RabbitMQ node $RNODE on port $PORT"
# setpriv instead of the package wrapper's `su` (as bench/compare.sh does).
(cd /var/lib/rabbitmq && setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
    env HOME=/var/lib/rabbitmq \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$PORT" \
    RABBITMQ_DIST_PORT="$DPORT" RABBITMQ_NODENAME="$RNODE" \
    RABBITMQ_MNESIA_BASE="$WORK/mnesia" RABBITMQ_LOG_BASE="$WORK/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/enabled_plugins" \
    "$RABBITMQ_LIB/rabbitmq-server" -detached) >"$WORK/start.log" 2>&1
wait_port "$PORT" 90 || die "rabbitmq did not open port $PORT"
rmqctl await_startup >/dev/null
BPID=$(rmqctl eval 'os:getpid().' 2>/dev/null | tr -dc 0-9 || true)
rmqctl version >&2

# ----------------------------------------------------- users and policies --
log "rabbitmqctl: vhost, user, permissions, policy"
rmqctl add_vhost shop
rmqctl add_user alice s3cret
rmqctl set_user_tags alice management monitoring
rmqctl set_permissions -p shop alice '^orders.*' '^orders.*' '.*'
rmqctl set_permissions -p / guest '.*' '.*' '.*'
rmqctl set_permissions -p shop guest '.*' '.*' '.*'
rmqctl set_topic_permissions -p shop alice orders '^order\.' '^order\.'
rmqctl set_policy -p / ttl-policy '^orders\.' '{"message-ttl":30000}' \
    --apply-to queues --priority 1

# --------------------------------------------------------------- topology --
log "pika: exchanges, queues, bindings"
"$PYTHON" - "$PORT" <<'EOF'
import sys

import pika

port = int(sys.argv[1])
creds = pika.PlainCredentials("guest", "guest")


def channel(vhost):
    conn = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", port, vhost, creds))
    return conn, conn.channel()


conn, ch = channel("/")
ch.exchange_declare("events", "fanout", durable=True)
ch.exchange_declare("orders.topic", "topic", durable=True,
                    arguments={"alternate-exchange": "unrouted"})
ch.exchange_declare("unrouted", "fanout", durable=True)
ch.queue_declare("audit", durable=True)
ch.queue_declare("orders.paid", durable=True, arguments={
    "x-message-ttl": 60000,
    "x-max-length": 1000,
    "x-dead-letter-exchange": "dlx",
    "x-queue-mode": "lazy",
})
ch.queue_bind("audit", "events", routing_key="")
ch.queue_bind("orders.paid", "orders.topic", routing_key="order.paid")
ch.exchange_bind(destination="events", source="orders.topic",
                 routing_key="order.#")
ch.exchange_declare("by-region", "headers", durable=True)
ch.queue_bind("audit", "by-region", routing_key="",
              arguments={"x-match": "any", "region": "eu"})
conn.close()

conn, ch = channel("shop")
ch.queue_declare("orders", durable=True)
ch.exchange_declare("orders.direct", "direct", durable=True)
ch.queue_bind("orders", "orders.direct", routing_key="new")
conn.close()
EOF

# ----------------------------------------------------------------- export --
log "rabbitmqctl export_definitions"
rmqctl export_definitions "$WORK/definitions.json"
mkdir -p "$(dirname "$OUT")"
python3 -m json.tool "$WORK/definitions.json" >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "wrote $OUT"
