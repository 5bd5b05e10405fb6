#!/usr/bin/env bash
# Records how RabbitMQ 3.10 handles operator policies (observed behaviour
# only): the management API's PUT/GET/DELETE of /api/operator-policies, its
# validation texts, how an operator policy and a policy combine on one queue
# (the queue's `policy`, `operator_policy`, `effective_policy_definition`),
# whether the limit is enforced, the definitions export, and rabbitmqctl's
# set_operator_policy / list_operator_policies / clear_operator_policy.
#
# Output: tests/data/rabbitmq_3_10_operator_policies.md (one `## ` section
# per step: the request and RabbitMQ's status and body, or the rabbitmqctl
# command, its exit code and output), which tests/management.rs (API steps)
# and crates/warrenctl/tests/cli.rs (rabbitmqctl steps) replay against Warren.
#
# Starts a throwaway node with rabbitmq_management (machinery: rabbitmq_node.sh)
# and removes it after. Run as root with Debian's rabbitmq-server (3.10.8)
# installed; needs curl and pika (as capture_management_api.sh finds it).
#   bash conformance/capture/probe_operator_policies.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$ROOT/tests/data/rabbitmq_3_10_operator_policies.md}
RABBITMQ_LIB=${RABBITMQ_LIB:-/usr/lib/rabbitmq/bin}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "probe_operator_policies: $*"; exit 1; }

source "$(dirname "${BASH_SOURCE[0]}")/rabbitmq_node.sh"
node_preflight
command -v curl >/dev/null || die "curl not on PATH"
node_init /tmp/warren-oppol.XXXXXX
find_pika /tmp/warren-oppol-venv.XXXXXX "$ROOT/target/rabbitmq-tools-venv/bin/python" \
    "$ROOT/target/conformance-venv/bin/python"

PORT=$(free_port)
DPORT=$(free_port_except "$PORT")
MPORT=$(free_port_except "$PORT" "$DPORT")
cat >"$WORK/rabbitmq.conf" <<EOF
management.tcp.ip = 127.0.0.1
management.tcp.port = $MPORT
EOF
RNODE="warrenoppol$$@localhost"
log "starting RabbitMQ node $RNODE on port $PORT, management on port $MPORT"
start_node '[rabbitmq_management].'
wait_port "$MPORT" 60 || die "management plugin did not open port $MPORT"
VERSION=$(rmqctl version | tr -d '[:space:]')

API="http://127.0.0.1:$MPORT"
: >"$WORK/out.md"
# step TITLE METHOD PATH [BODY]: one section with the request and the answer
# (status, then the body pretty-printed with sorted keys when it is JSON).
step() {
    local title=$1 method=$2 path=$3 body=${4:-}
    local args=(-sS -u guest:guest -o "$WORK/body" -w '%{http_code}' -X "$method")
    [[ -z $body ]] || args+=(-H 'content-type: application/json' --data "$body")
    local status
    status=$(curl "${args[@]}" "$API$path")
    {
        echo "## $title"
        echo
        echo "request: \`$method $path\`"
        [[ -z $body ]] || echo "body: \`$body\`"
        echo "status: $status"
        if [[ -s $WORK/body ]]; then
            echo
            echo '```json'
            python3 -m json.tool --sort-keys "$WORK/body" 2>/dev/null || cat "$WORK/body"
            echo '```'
        fi
        echo
    } >>"$WORK/out.md"
    log "$status $method $path"
}
# ctl TITLE ARGS...: one section with a rabbitmqctl command and its output
ctl() {
    local title=$1 out rc=0
    shift
    out=$(rmqctl "$@" 2>&1) || rc=$?
    {
        echo "## $title"
        echo
        echo "rabbitmqctl: \`$*\`"
        echo "exit: $rc"
        echo
        echo '```'
        printf '%s\n' "$out"
        echo '```'
        echo
    } >>"$WORK/out.md"
    log "rabbitmqctl $* -> $rc"
}

OP='{"pattern":"^q","definition":{"max-length":5,"message-ttl":60000},"apply-to":"queues","priority":0}'
step "create" PUT /api/operator-policies/%2F/op-limits "$OP"
step "update" PUT /api/operator-policies/%2F/op-limits "$OP"
step "list" GET /api/operator-policies
step "list in a vhost" GET /api/operator-policies/%2F
step "show" GET /api/operator-policies/%2F/op-limits
step "show missing" GET /api/operator-policies/%2F/nope
step "refuse a key operator policies do not take" PUT /api/operator-policies/%2F/bad \
    '{"pattern":"^q","definition":{"dead-letter-exchange":"dlx"},"apply-to":"queues"}'
step "refuse a bad value" PUT /api/operator-policies/%2F/bad \
    '{"pattern":"^q","definition":{"max-length":-1},"apply-to":"queues"}'
step "refuse an empty definition" PUT /api/operator-policies/%2F/bad \
    '{"pattern":"^q","definition":{},"apply-to":"queues"}'
step "policy: refuse an empty definition" PUT /api/policies/%2F/bad \
    '{"pattern":"^q","definition":{},"apply-to":"queues"}'
step "policy: refuse a bad value" PUT /api/policies/%2F/bad \
    '{"pattern":"^q","definition":{"max-length":-1},"apply-to":"queues"}'
step "policy: refuse a bad TTL" PUT /api/policies/%2F/bad \
    '{"pattern":"^q","definition":{"message-ttl":"x"},"apply-to":"queues"}'
step "refuse a bad expiry" PUT /api/operator-policies/%2F/bad \
    '{"pattern":"^q","definition":{"expires":0},"apply-to":"queues"}'
step "refuse a bad delivery limit" PUT /api/operator-policies/%2F/bad \
    '{"pattern":"^q","definition":{"delivery-limit":"x"},"apply-to":"queues"}'
step "refuse a bad length in bytes" PUT /api/operator-policies/%2F/bad \
    '{"pattern":"^q","definition":{"max-length-bytes":-5},"apply-to":"queues"}'
step "accept max-in-memory-length" PUT /api/operator-policies/%2F/op-memory \
    '{"pattern":"^never$","definition":{"max-in-memory-length":10,"max-in-memory-bytes":1000},"apply-to":"queues"}'
step "apply to exchanges" PUT /api/operator-policies/%2F/op-exchanges \
    '{"pattern":"^x","definition":{"max-length":5},"apply-to":"exchanges"}'
step "in a missing vhost" PUT /api/operator-policies/nowhere/op \
    '{"pattern":"^q","definition":{"max-length":5}}'
step "policy beside it" PUT /api/policies/%2F/user-limits \
    '{"pattern":"^q","definition":{"max-length":10,"message-ttl":3600000,"dead-letter-exchange":"dlx"},"apply-to":"queues"}'
step "queue with a lower own limit" PUT /api/queues/%2F/q-own '{"durable":true,"arguments":{"x-max-length":3}}'
step "queue without arguments" PUT /api/queues/%2F/q-plain '{"durable":true}'
step "queue only the operator policy matches" PUT /api/queues/%2F/q-op '{"durable":true}'
step "policy with a higher limit for q-op" PUT /api/policies/%2F/zz-other \
    '{"pattern":"^q-op$","definition":{"max-length":100},"apply-to":"queues","priority":5}'

log "pika: 8 messages into q-plain (operator max-length 5 should keep 5)"
"$PYTHON" - "$PORT" <<'EOF'
import sys

import pika

conn = pika.BlockingConnection(pika.ConnectionParameters(
    "127.0.0.1", int(sys.argv[1]), "/", pika.PlainCredentials("guest", "guest")))
ch = conn.channel()
ch.confirm_delivery()
for i in range(8):
    ch.basic_publish("", "q-plain", b"m%d" % i)
conn.close()
EOF
# Queue stats (effective policy, lengths) are emitted every 5 s.
sleep 6
for ((i = 0; i < 20; i++)); do
    curl -sS -u guest:guest "$API/api/queues/%2F/q-plain" | grep -q '"messages":5' && break
    sleep 1
done
step "q-own: own 3, policy 10, operator 5" GET /api/queues/%2F/q-own
step "q-plain: policy 10, operator 5 (8 published)" GET /api/queues/%2F/q-plain
step "q-op: policy zz-other 100 (priority 5), operator 5" GET /api/queues/%2F/q-op
step "definitions export" GET /api/definitions
ctl "rabbitmqctl list" list_operator_policies -p /
ctl "rabbitmqctl set" set_operator_policy -p / --priority 2 --apply-to queues op-ctl '^never$' '{"delivery-limit":4}'
ctl "rabbitmqctl set a refused key" set_operator_policy -p / op-bad '^never$' '{"overflow":"drop-head"}'
ctl "rabbitmqctl list after set" list_operator_policies -p /
ctl "rabbitmqctl clear" clear_operator_policy -p / op-ctl
ctl "rabbitmqctl clear missing" clear_operator_policy -p / op-ctl
step "delete" DELETE /api/operator-policies/%2F/op-limits
step "delete missing" DELETE /api/operator-policies/%2F/op-limits
for ((i = 0; i < 20; i++)); do
    curl -sS -u guest:guest "$API/api/queues/%2F/q-plain" | grep -q '"operator_policy":null' && break
    sleep 1
done
step "q-plain after the delete" GET /api/queues/%2F/q-plain

{
    echo "# RabbitMQ $VERSION: operator policies (observed)"
    echo
    echo "Captured $(date -u +%F) by \`conformance/capture/probe_operator_policies.sh\` against a"
    echo "throwaway single node (management API as guest, rabbitmqctl). Each section: the"
    echo "request, RabbitMQ's status and body (JSON pretty-printed with sorted keys)."
    echo
    cat "$WORK/out.md"
} >"$OUT"
log "wrote $OUT"
