#!/usr/bin/env bash
# Records what RabbitMQ 3.10's management API lets an administrator do in a
# vhost where it has no permissions (observed behaviour only): declare,
# bind, delete, purge, get and publish, reads, and a policy.
#
# Output: tests/data/rabbitmq_3_10_admin_permissions.md (one `## ` section
# per request: the request, RabbitMQ's status and body), which
# tests/management.rs (an_administrator_needs_permissions_in_a_vhost_to_change_it)
# asserts of Warren.
#
# Starts a throwaway node with rabbitmq_management (machinery: rabbitmq_node.sh)
# and removes it after. Run as root with Debian's rabbitmq-server (3.10.8)
# installed; needs curl.
#   bash conformance/capture/probe_admin_permissions.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$ROOT/tests/data/rabbitmq_3_10_admin_permissions.md}
RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "probe_admin_permissions: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/rabbitmq_node.sh"
node_preflight
command -v curl >/dev/null || die "curl not on PATH"
node_init /tmp/warren-adminperm.XXXXXX

PORT=$(free_port)
DPORT=$(free_port_except "$PORT")
MPORT=$(free_port_except "$PORT" "$DPORT")
cat >"$WORK/rabbitmq.conf" <<EOC
management.tcp.ip = 127.0.0.1
management.tcp.port = $MPORT
EOC
RNODE="adminperm$$@localhost"
log "starting RabbitMQ node $RNODE, management on port $MPORT"
start_node '[rabbitmq_management].'
wait_port "$MPORT" 60 || die "management plugin did not open port $MPORT"
VERSION=$(rmqctl version | tr -d '[:space:]')

API="http://127.0.0.1:$MPORT"
rmqctl add_vhost other >/dev/null
rmqctl add_user boss b0ss >/dev/null
rmqctl set_user_tags boss administrator >/dev/null
rmqctl set_permissions -p other guest '.*' '.*' '.*' >/dev/null
curl -sS -o /dev/null -u guest:guest -X PUT -H 'content-type: application/json' \
    --data '{"durable":true}' "$API/api/queues/other/q0"

{
    echo "# RabbitMQ $VERSION: an administrator without permissions in a vhost (observed)"
    echo
    echo "Captured $(date -u +%F) by \`conformance/capture/probe_admin_permissions.sh\` against a"
    echo "throwaway single node. User \`boss\` has the \`administrator\` tag and no permissions in"
    echo "vhost \`other\`; queue \`q0\` there was declared by guest. Each section: the request as"
    echo "boss, RabbitMQ's status and body."
} >"$OUT"

step() { # name method path [body]
    local name=$1 method=$2 path=$3 body=${4:-}
    local args=(-sS -u boss:b0ss -o "$WORK/body" -w '%{http_code}' -X "$method")
    [[ -z $body ]] || args+=(-H 'content-type: application/json' --data "$body")
    local status
    status=$(curl "${args[@]}" "$API$path")
    {
        echo
        echo "## $name"
        echo
        echo "request: \`$method $path\`"
        [[ -z $body ]] || echo "body: \`$body\`"
        echo "status: $status"
        if [[ $status != 2* ]]; then
            echo "response: \`$(cat "$WORK/body")\`"
        fi
    } >>"$OUT"
}

step "declare a queue" PUT /api/queues/other/q1 '{"durable":true}'
step "declare an exchange" PUT /api/exchanges/other/x1 '{"type":"fanout"}'
step "bind" POST /api/bindings/other/e/amq.fanout/q/q0 '{"routing_key":""}'
step "purge" DELETE /api/queues/other/q0/contents
step "get" POST /api/queues/other/q0/get '{"count":1,"ackmode":"ack_requeue_true","encoding":"auto"}'
step "delete a queue" DELETE /api/queues/other/q0
step "publish" POST /api/exchanges/other/amq.default/publish '{"properties":{},"routing_key":"q0","payload":"x","payload_encoding":"string"}'
step "list the vhost's queues" GET /api/queues/other
step "set a policy" PUT /api/policies/other/p1 '{"pattern":"^x","definition":{"max-length":1}}'
log "wrote $OUT"
