#!/usr/bin/env bash
# The management web UI in a real headless browser: Debian's chromium driven
# by playwright-core (its own browser download is never used) against the
# release binary, with amqplib as the AMQP client the pages must follow.
#
#     bash browser/run.sh
#
# Environment: WARREN_BIN (use this binary, skip `cargo build --release`),
# SHOTS (where the screenshots go; default target/browser-shots).
# Installs chromium (apt) and the two npm packages (pinned, into
# target/browser-node) once and reuses them. The broker listens on free
# ports on 127.0.0.1 with a temporary data directory; everything started
# here is stopped and removed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/browser
TARGET=$ROOT/target
NODE_DIR=$TARGET/browser-node
PLAYWRIGHT_VERSION=1.64.1
AMQPLIB_VERSION=0.10.9
export SHOTS=${SHOTS:-$TARGET/browser-shots}

say() { echo "== $*" >&2; }
die() { echo "browser: $*" >&2; exit 1; }

if [[ -n "${WARREN_BIN:-}" ]]; then
    BIN=$WARREN_BIN
else
    say "cargo build --release (warren and warrenctl, the build cargo run --release uses)"
    (cd "$ROOT" && cargo build --release)
    BIN=$TARGET/release/warren
fi
[[ -x "$BIN" ]] || die "broker binary $BIN is missing or not executable"

if ! command -v chromium >/dev/null 2>&1; then
    say "installing chromium (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v chromium >/dev/null 2>&1 || die "chromium not found after installing it"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    say "installing Node.js and npm (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
have() { [[ "$(node -p "require('$NODE_DIR/node_modules/$1/package.json').version" 2>/dev/null)" == "$2" ]]; }
if ! have playwright-core "$PLAYWRIGHT_VERSION" || ! have amqplib "$AMQPLIB_VERSION"; then
    say "installing playwright-core $PLAYWRIGHT_VERSION and amqplib $AMQPLIB_VERSION into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --no-save --silent \
        "playwright-core@$PLAYWRIGHT_VERSION" "amqplib@$AMQPLIB_VERSION"
fi

WORK=$(mktemp -d /tmp/warren-browser.XXXXXX)
BROKER_PID=""
cleanup() {
    local rc=$?
    if [[ -n $BROKER_PID ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    if ((rc != 0)) && [[ -s $WORK/warren.log ]]; then
        echo "browser: the broker's log (last 30 lines):" >&2
        tail -n 30 "$WORK/warren.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
AMQP_PORT=$(free_port)
MGMT_PORT=$(free_port)
PROM_PORT=$(free_port)
"$BIN" --data-dir "$WORK/data" --bind 127.0.0.1 --port "$AMQP_PORT" \
    --management-port "$MGMT_PORT" --prometheus-port "$PROM_PORT" \
    --node-name warren@localhost >"$WORK/warren.log" 2>&1 &
BROKER_PID=$!
for ((i = 0; i < 300; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$MGMT_PORT") 2>/dev/null && break
    kill -0 "$BROKER_PID" 2>/dev/null || die "the broker exited before listening"
    sleep 0.1
done
mkdir -p "$SHOTS"
say "the UI in chromium: http://127.0.0.1:$MGMT_PORT/ (AMQP $AMQP_PORT)"
NODE_PATH="$NODE_DIR/node_modules" WARREN_UI="http://127.0.0.1:$MGMT_PORT" \
    WARREN_AMQP="amqp://guest:guest@127.0.0.1:$AMQP_PORT" CHROMIUM=$(command -v chromium) \
    WORK="$WORK" node "$HERE/ui_test.js"
