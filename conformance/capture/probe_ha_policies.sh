#!/usr/bin/env bash
# Records how RabbitMQ 3.10 validates the 3.x mirrored-queue policy keys
# (ha-mode, ha-params, ha-sync-mode, ha-promote-on-*, ha-sync-batch-size)
# with `rabbitmqctl set_policy` (observed behaviour only).
#
# Output: crates/server/tests/data/rabbitmq_3_10_ha_policies.md, which
# crates/server/src/policy.rs's tests replay against Warren's validation.
# Usage (node from README.md running as warrencap@localhost):
#   bash probe_ha_policies.sh [NODE]
set -euo pipefail
NODE=${1:-warrencap@localhost}
OUT=$(cd "$(dirname "$0")/../.." && pwd)/crates/server/tests/data/rabbitmq_3_10_ha_policies.md
CASES=(
    '{"ha-mode":"all"}'
    '{"ha-mode":"exactly","ha-params":2}'
    '{"ha-mode":"exactly"}'
    '{"ha-mode":"exactly","ha-params":0}'
    '{"ha-mode":"exactly","ha-params":"2"}'
    '{"ha-mode":"nodes","ha-params":["rabbit@a"]}'
    '{"ha-mode":"nodes","ha-params":2}'
    '{"ha-mode":"bogus"}'
    '{"ha-params":2}'
    '{"ha-mode":"all","ha-params":2}'
    '{"ha-mode":"all","ha-sync-mode":"automatic"}'
    '{"ha-mode":"all","ha-sync-mode":"bogus"}'
    '{"ha-sync-mode":"manual"}'
    '{"ha-mode":"all","ha-promote-on-shutdown":"always"}'
    '{"ha-mode":"all","ha-promote-on-shutdown":"bogus"}'
    '{"ha-mode":"all","ha-promote-on-failure":"when-synced"}'
    '{"ha-mode":"all","ha-promote-on-failure":"bogus"}'
    '{"ha-mode":"all","ha-sync-batch-size":100}'
    '{"ha-mode":"all","ha-sync-batch-size":0}'
    '{"ha-mode":"all","ha-sync-batch-size":"x"}'
    '{"ha-mode":"all","queue-master-locator":"min-masters","max-length":5}'
    '{"ha-mode":"all","ha-params":2,"ha-sync-mode":"automatic"}'
)
{
    echo "# RabbitMQ 3.10.8: validation of mirrored-queue (ha-*) policy keys (observed)"
    echo
    echo "Captured $(date +%F) by \`conformance/capture/probe_ha_policies.sh\`: \`rabbitmqctl set_policy -p / p1 '^q' DEFINITION\`"
    echo "against a local single RabbitMQ 3.10.8 node. The reply is \`ok\`, or the text after"
    echo "\`Validation failed\` (blank lines dropped)."
    echo
    echo "| definition | reply |"
    echo "|---|---|"
    for def in "${CASES[@]}"; do
        if out=$(timeout 60 rabbitmqctl -n "$NODE" set_policy -p / p1 '^q' "$def" 2>&1); then
            reply=ok
        else
            reply=$(printf '%s\n' "$out" | sed -n '/^Validation failed$/,$p' | sed '1d;/^$/d' | paste -sd' ')
        fi
        echo "| \`$def\` | \`$reply\` |"
    done
} > "$OUT"
rabbitmqctl -n "$NODE" clear_policy -p / p1 >/dev/null 2>&1 || true
echo "wrote $OUT"
