#!/usr/bin/env bash
# Records how RabbitMQ 3.10 validates policy keys with `rabbitmqctl
# set_policy` (observed behaviour only), one set of keys per output file:
#
#   ha                    the 3.x mirrored-queue keys (ha-mode, ha-params,
#                         ha-sync-mode, ha-promote-on-*, ha-sync-batch-size)
#                         -> crates/server/tests/data/rabbitmq_3_10_ha_policies.md
#   dead-letter-strategy  the quorum queues' dead-letter-strategy key
#                         -> crates/server/tests/data/rabbitmq_3_10_dead_letter_strategy_policies.md
#
# crates/server/src/policy.rs's tests replay both against Warren's
# validation. Usage (node from README.md running as warrencap@localhost):
#   bash probe_policy_keys.sh [NODE] [ha|dead-letter-strategy]
set -euo pipefail
NODE=${1:-warrencap@localhost}
SET=${2:-ha}
DATA=$(cd "$(dirname "$0")/../.." && pwd)/crates/server/tests/data
case $SET in
ha)
    OUT=$DATA/rabbitmq_3_10_ha_policies.md
    WHAT="mirrored-queue (ha-*) policy keys"
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
    ;;
dead-letter-strategy)
    OUT=$DATA/rabbitmq_3_10_dead_letter_strategy_policies.md
    WHAT="the dead-letter-strategy policy key"
    CASES=(
    '{"dead-letter-strategy":"at-least-once"}'
    '{"dead-letter-strategy":"at-most-once"}'
    '{"dead-letter-strategy":"bogus"}'
    '{"dead-letter-strategy":5}'
    '{"dead-letter-strategy":"at-least-once","overflow":"reject-publish","dead-letter-exchange":"x"}'
    )
    ;;
*)
    echo "unknown set $SET (ha or dead-letter-strategy)" >&2
    exit 64
    ;;
esac
{
    echo "# RabbitMQ 3.10.8: validation of $WHAT (observed)"
    echo
    echo "Captured $(date +%F) by \`conformance/capture/probe_policy_keys.sh $SET\`: \`rabbitmqctl set_policy -p / p1 '^q' DEFINITION\`"
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
