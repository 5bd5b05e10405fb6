#!/bin/sh
# Fetches RabbitMQ's Grafana overview dashboard for rabbitmq_prometheus at
# $RABBITMQ_RELEASE into /dashboards (the `dashboards` service of
# docker-compose.monitoring.yml). It is RabbitMQ's, under the Mozilla
# Public License 2.0. Its data-source input (${DS_PROMETHEUS}, filled in
# when a dashboard is imported by hand) becomes the provisioned "prometheus".
set -eu
base="https://raw.githubusercontent.com/rabbitmq/rabbitmq-server/$RABBITMQ_RELEASE/deps/rabbitmq_prometheus/docker/grafana/dashboards"
for d in RabbitMQ-Overview; do
    curl -fsSL "$base/$d.json" | sed 's/\${DS_PROMETHEUS}/prometheus/g' > "/dashboards/$d.json"
    echo "fetched $d.json"
done
