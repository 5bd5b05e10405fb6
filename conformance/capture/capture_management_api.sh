#!/usr/bin/env bash
# Record real RabbitMQ 3.10 management HTTP API answers as test fixtures for
# Warren's management API:
#
#   tests/data/rabbitmq_3_10_api/<name>.json   one GET body each (sorted keys)
#   tests/data/rabbitmq_3_10_api/index.json    path -> HTTP status
#   tests/data/rabbitmq_3_10_api/README.md
#
# Starts a throwaway RabbitMQ node with rabbitmq_management enabled (own
# mnesia/log dirs, enabled_plugins file and rabbitmq.conf under a temp dir,
# free AMQP, distribution and management ports, a unique node name; the
# default node in /var/lib/rabbitmq and systemd are not touched). Creates with
# rabbitmqctl a vhost `shop`, a user `alice` (tag management) with
# permissions and topic permissions on shop and a policy in `/`; with the
# HTTP API queues `audit` (in /) and `invoices` (in shop); with pika an
# exchange `events` (topic) bound to a durable queue `orders` with key
# `order.#`, 4 messages published through `events` (publisher confirms) and a
# consumer (prefetch 1, never acks) that a background pika process keeps
# open while recording, so `orders` has 3 ready messages, 1 unacked and 1
# consumer. Waits for the management stats (emitted every 5 s), GETs every
# path below as guest, pretty-prints each body with
# `python3 -m json.tool --sort-keys`, then stops the node and removes the
# temp dir (node machinery: rabbitmq_node.sh). known_gaps.txt in the output
# dir is hand-kept and left alone.
#
#   bash conformance/capture/capture_management_api.sh
#
# File names: the path without its leading /api/, `/` written `__`, `%2F`
# written `root` (/api/queues/%2F/orders -> queues__root__orders.json).
# Paths holding a per-run value are keyed by a placeholder in index.json and
# named after it: /api/nodes/{node} -> nodes__node.json,
# /api/health/checks/port-listener/{port} ->
# health__checks__port-listener__port.json, /api/connections/{name} ->
# connection.json, /api/channels/{name} -> channel.json. Fixed names:
# queues_paginated.json, not_found.json (404), definitions.json.
# The answers are kept exactly as recorded (node name, ports, pids, rates,
# timestamps and password hashes differ between runs): they are fixtures of
# shape, compare key sets rather than values.
#
# Run as root (the node runs as user `rabbitmq`) with the Debian package
# rabbitmq-server (3.10.8 on bookworm) installed. Uses
# target/rabbitmq-tools-venv or target/conformance-venv when it has pika,
# otherwise creates a venv under /tmp. Needs curl.
# Environment: PYTHON (an interpreter with pika), OUT_DIR (output dir),
# RABBITMQ_LIB (/usr/lib/rabbitmq/bin), KEEP_WORK=1 (keep the node's dirs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT_DIR=${OUT_DIR:-$ROOT/tests/data/rabbitmq_3_10_api}
RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "capture_management_api: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/rabbitmq_node.sh"
node_preflight
command -v curl >/dev/null || die "curl not on PATH"
node_init /tmp/warren-mgmt.XXXXXX
CONSUMER_PID=""
NODE_FAIL_LOGS=("$WORK/consumer.log")
node_cleanup_hook() { # the background pika consumer
    if [[ -n $CONSUMER_PID ]]; then
        kill -TERM "$CONSUMER_PID" 2>/dev/null || true
        wait "$CONSUMER_PID" 2>/dev/null || true
    fi
}
find_pika /tmp/warren-mgmt-venv.XXXXXX "$ROOT/target/rabbitmq-tools-venv/bin/python" \
    "$ROOT/target/conformance-venv/bin/python"

# ------------------------------------------------------------------ node --
PORT=$(free_port)
DPORT=$(free_port_except "$PORT")
MPORT=$(free_port_except "$PORT" "$DPORT")
cat >"$WORK/rabbitmq.conf" <<EOF
management.tcp.ip = 127.0.0.1
management.tcp.port = $MPORT
EOF
RNODE="warrenapi$$@localhost"
log "starting RabbitMQ node $RNODE on port $PORT, management on port $MPORT"
start_node '[rabbitmq_management].'
wait_port "$MPORT" 60 || die "management plugin did not open port $MPORT"
VERSION=$(rmqctl version | tr -d '[:space:]')
log "RabbitMQ $VERSION"

API="http://127.0.0.1:$MPORT"
api() { # method path [json body] -> prints the status, body to $WORK/body
    local args=(-sS -u guest:guest -o "$WORK/body" -w '%{http_code}' -X "$1")
    [[ $# -lt 3 ]] || args+=(-H 'content-type: application/json' --data "$3")
    curl "${args[@]}" "$API$2"
}

# ----------------------------------------------------- users and policies --
log "rabbitmqctl: vhost, user, permissions, topic permissions, policy"
rmqctl add_vhost shop
rmqctl add_user alice s3cret
rmqctl set_user_tags alice management
rmqctl set_permissions -p shop alice '^orders.*' '^orders.*' '.*'
rmqctl set_permissions -p shop guest '.*' '.*' '.*'
rmqctl set_topic_permissions -p shop alice events '^order\.' '^order\.'
rmqctl set_policy -p / orders-limit '^orders$' '{"max-length":1000}' \
    --apply-to queues --priority 1

# --------------------------------------------------------------- topology --
# Two more queues (HTTP API) so that the paginated listing has two pages.
log "HTTP API: queues audit in / and invoices in shop"
status=$(api PUT /api/queues/%2F/audit '{"durable":true,"arguments":{"x-max-length":100}}')
[[ $status == 201 || $status == 204 ]] || die "PUT /api/queues/%2F/audit: $status $(cat "$WORK/body")"
status=$(api PUT /api/queues/shop/invoices '{"durable":true}')
[[ $status == 201 || $status == 204 ]] || die "PUT /api/queues/shop/invoices: $status $(cat "$WORK/body")"

log "pika: exchange events, queue orders, 4 messages, a consumer held open"
"$PYTHON" - "$PORT" "$WORK/consumer.ready" >"$WORK/consumer.log" 2>&1 <<'EOF' &
import signal
import sys

import pika

port, ready = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
conn = pika.BlockingConnection(pika.ConnectionParameters(
    "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest"),
    client_properties={"connection_name": "warren-capture"}))
pub = conn.channel()
pub.exchange_declare("events", "topic", durable=True)
pub.queue_declare("orders", durable=True)
pub.queue_bind("orders", "events", routing_key="order.#")
pub.confirm_delivery()
for i in range(4):
    pub.basic_publish("events", "order.created", b"order %d" % i,
                      pika.BasicProperties(delivery_mode=2,
                                           content_type="text/plain"))
sub = conn.channel()
sub.basic_qos(prefetch_count=1)
sub.basic_consume("orders", lambda *_: None, auto_ack=False,
                  consumer_tag="capture-consumer")
conn.process_data_events(time_limit=1)  # the first delivery, never acked
open(ready, "w").close()
try:
    while True:
        conn.process_data_events(time_limit=1)
finally:
    conn.close()
EOF
CONSUMER_PID=$!
for ((i = 0; i < 300; i++)); do
    [[ -e $WORK/consumer.ready ]] && break
    kill -0 "$CONSUMER_PID" 2>/dev/null || die "the pika process exited"
    sleep 0.1
done
[[ -e $WORK/consumer.ready ]] || die "the pika process did not get ready"

# ------------------------------------------------------------------ stats --
log "waiting for the management stats (emitted every 5 s)"
sleep 6
have_stats() {
    python3 - "$WORK" "$API" <<'EOF'
import base64, json, sys, urllib.request

work, api = sys.argv[1:3]
def get(path):
    req = urllib.request.Request(api + path, headers={
        "authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)
q = get("/api/queues/%2F/orders")
o = get("/api/overview")
e = get("/api/exchanges/%2F/events")
ok = ("message_stats" in q and q.get("messages_ready") == 3
      and q.get("messages_unacknowledged") == 1 and q.get("consumers") == 1
      and "message_stats" in o and "message_stats" in e
      and get("/api/channels") and get("/api/connections"))
sys.exit(0 if ok else 1)
EOF
}
for ((i = 0; i < 30; i++)); do
    have_stats && break
    sleep 1
done
have_stats || die "no message_stats / expected counts after 36 s"

# ------------------------------------------------------------------ record --
AMQP_PORT=$PORT
CONN_NAME=$(api GET /api/connections >/dev/null && python3 -c \
    'import json,sys,urllib.parse; print(urllib.parse.quote(json.load(open(sys.argv[1]))[0]["name"], safe=""))' "$WORK/body")
CHAN_NAME=$(api GET /api/channels >/dev/null && python3 -c \
    'import json,sys,urllib.parse; print(urllib.parse.quote(json.load(open(sys.argv[1]))[0]["name"], safe=""))' "$WORK/body")

# key (as written in index.json) | real path | file name ('' = from the key)
PATHS=(
    "/api/overview||"
    "/api/nodes||"
    "/api/nodes/{node}|/api/nodes/$RNODE|nodes__node"
    "/api/connections||"
    "/api/channels||"
    "/api/consumers||"
    "/api/exchanges||"
    "/api/exchanges/%2F/events||"
    "/api/exchanges/%2F/events/bindings/source||"
    "/api/queues||"
    "/api/queues/%2F/orders||"
    "/api/queues/%2F/orders/bindings||"
    "/api/bindings||"
    "/api/vhosts||"
    "/api/vhosts/shop||"
    "/api/users||"
    "/api/users/alice||"
    "/api/whoami||"
    "/api/permissions||"
    "/api/users/alice/permissions||"
    "/api/topic-permissions||"
    "/api/policies||"
    "/api/vhost-limits||"
    "/api/extensions||"
    "/api/cluster-name||"
    "/api/health/checks/alarms||"
    "/api/health/checks/virtual-hosts||"
    "/api/health/checks/port-listener/{port}|/api/health/checks/port-listener/$AMQP_PORT|health__checks__port-listener__port"
    "/api/health/checks/protocol-listener/amqp||"
    "/api/queues?pagination=true&page=1&page_size=2||queues_paginated"
    "/api/this/does/not/exist||not_found"
    "/api/global-parameters||"
    "/api/parameters||"
    "/api/operator-policies||"
    "/api/feature-flags||"
    "/api/definitions||definitions"
    "/api/connections/{name}|/api/connections/$CONN_NAME|connection"
    "/api/channels/{name}|/api/channels/$CHAN_NAME|channel"
)

log "recording ${#PATHS[@]} GETs into $OUT_DIR"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json
find "$OUT_DIR" -maxdepth 1 -name '*.txt' ! -name known_gaps.txt -delete # known_gaps.txt is hand-kept
: >"$WORK/index.tsv"
for entry in "${PATHS[@]}"; do
    IFS='|' read -r key path name <<<"$entry"
    [[ -n $path ]] || path=$key
    if [[ -z $name ]]; then
        name=${key#/api/}
        name=${name//%2F/root}
        name=${name//\//__}
    fi
    status=$(api GET "$path")
    printf '%s\t%s\n' "$key" "$status" >>"$WORK/index.tsv"
    if python3 -m json.tool --sort-keys "$WORK/body" >"$OUT_DIR/$name.json" 2>/dev/null; then
        log "$status $path -> $name.json"
    else
        rm -f "$OUT_DIR/$name.json"
        cp "$WORK/body" "$OUT_DIR/$name.txt"
        log "$status $path -> $name.txt (body is not JSON)"
    fi
done
python3 - "$WORK/index.tsv" "$OUT_DIR/index.json" <<'EOF'
import json, sys

index = {}
for line in open(sys.argv[1]):
    key, status = line.rstrip("\n").split("\t")
    index[key] = int(status)
with open(sys.argv[2], "w") as f:
    json.dump(index, f, indent=4, sort_keys=True)
    f.write("\n")
EOF

cat >"$OUT_DIR/README.md" <<EOF
Real RabbitMQ $VERSION management HTTP API answers (GET as guest; bodies
pretty-printed with sorted keys, kept exactly as recorded) and index.json
(path -> HTTP status), recorded $(date -u +%Y-%m-%d) from Debian's rabbitmq-server
package with a vhost, a user, a policy, 3 queues, a topic exchange bound to a
queue with 3 ready messages, 1 unacked and a consumer: fixtures of shape
(compare key sets; /api/nodes/{node} etc. are keyed by placeholders).
Re-record (root): bash conformance/capture/capture_management_api.sh
EOF
log "wrote $OUT_DIR"
