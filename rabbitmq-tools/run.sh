#!/usr/bin/env bash
# RabbitMQ's operator tools against the release binary, unchanged:
#
#   1. dashboard.py: a real Prometheus server (Debian's package, 2.42)
#      scrapes Warren on loopback; the 41 panel queries of RabbitMQ's
#      RabbitMQ-Overview Grafana dashboard must all return data, and the
#      figures must follow the traffic the script drives with pika.
#   2. rabbitmqadmin.py: rabbitmqadmin, the management plugin's Python CLI,
#      from Debian's rabbitmq-server 3.10.8 package (only the script is
#      unpacked; no Erlang), runs list/show/declare/delete/publish/get/
#      export/import, per vhost with -V, sorted with -S, in every -f format.
#   3. rabbitmq_conf.py: a RabbitMQ rabbitmq.conf given to --config sets the
#      listeners, default user, tuning and ports (seen by pika and over
#      HTTP); an unknown key stops the broker with an error naming it.
#   4. raft_dashboard.py: three Warren nodes as one cluster and a Prometheus
#      scraping them; the 5 panels of RabbitMQ's RabbitMQ-Quorum-Queues-Raft
#      dashboard must show every node, with figures that follow 5,200
#      confirmed enqueues into a quorum queue.
#
#     bash rabbitmq-tools/run.sh
#
# Environment: WARREN_BIN (use this binary, skip `cargo build --release`).
# Everything is downloaded into target/ once (Debian packages with
# `apt-get download`, unpacked with dpkg-deb; pika into a venv) and reused.
# Ports are free ones on 127.0.0.1; every process started here is stopped.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/rabbitmq-tools
TARGET=$ROOT/target
VENV=$TARGET/rabbitmq-tools-venv
DEBS=$TARGET/rabbitmq-tools-debs
PROMETHEUS_VERSION='2.42.0*'
RABBITMQ_VERSION='3.10.8*'

say() { echo "== $*" >&2; }
die() { echo "rabbitmq-tools: $*" >&2; exit 1; }

if [[ -n "${WARREN_BIN:-}" ]]; then
    BIN=$WARREN_BIN
else
    say "cargo build --release (warren and warrenctl, the build cargo run --release uses)"
    (cd "$ROOT" && cargo build --release)
    BIN=$TARGET/release/warren
fi
[[ -x "$BIN" ]] || die "broker binary $BIN is missing or not executable"

# unpack PACKAGE VERSION FILE: unpacks Debian's PACKAGE (VERSION, a glob)
# into $DEBS/PACKAGE unless FILE is already there.
unpack() {
    local pkg=$1 version=$2 file=$3
    [[ -e "$DEBS/$pkg/$file" ]] && return 0
    say "downloading Debian's $pkg $version"
    mkdir -p "$DEBS/$pkg"
    local tmp
    tmp=$(mktemp -d)
    # (apt-get download fetches as the _apt user where it can: a directory
    # it may write to.)
    chmod 777 "$tmp"
    if ! (cd "$tmp" && apt-get download -q "$pkg=$version" >/dev/null 2>&1); then
        apt-get update -qq
        (cd "$tmp" && apt-get download -q "$pkg=$version" >/dev/null)
    fi
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$DEBS/$pkg"
    rm -rf "$tmp"
    [[ -e "$DEBS/$pkg/$file" ]] || die "$pkg has no $file"
}
unpack prometheus "$PROMETHEUS_VERSION" usr/bin/prometheus
unpack rabbitmq-server "$RABBITMQ_VERSION" usr/bin/rabbitmqadmin

if ! "$VENV/bin/python" -c 'import pika' >/dev/null 2>&1; then
    say "creating $VENV with pika"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check 'pika==1.3.2'
fi

exec "$VENV/bin/python" "$HERE/harness.py" \
    --warren "$BIN" \
    --prometheus "$DEBS/prometheus/usr/bin/prometheus" \
    --rabbitmqadmin "$DEBS/rabbitmq-server/usr/bin/rabbitmqadmin"
