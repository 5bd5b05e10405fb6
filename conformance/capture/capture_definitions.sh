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
# removes the temp dir (node machinery: rabbitmq_node.sh).
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

source "$(dirname "${BASH_SOURCE[0]}")/rabbitmq_node.sh"
node_preflight
node_init /tmp/warren-defs.XXXXXX
find_pika /tmp/warren-defs-venv.XXXXXX "$ROOT/target/conformance-venv/bin/python"

# ------------------------------------------------------------------ node --
PORT=$(free_port)
DPORT=$(free_port_except "$PORT")
RNODE="warrendefs$$@localhost"
log "starting RabbitMQ node $RNODE on port $PORT"
start_node '[].'
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
