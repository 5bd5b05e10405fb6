#!/usr/bin/env bash
# Memory after connection bursts: starts a broker, opens and closes 10,000
# idle AMQP connections three times (warren-perf --idle-connections), and
# prints the broker's VmRSS after each burst (WAIT seconds after the last
# connection closed, default 12: jemalloc purges after a 10 s decay) and
# its peak (VmHWM), in MiB.
#
#   WARREN_BIN=target/release/warren PERF_BIN=target/release/warren-perf bash bench/connection-burst.sh
#
# Measured 2026-12-02 (2 cores; start / after bursts 1-3 / peak, MiB):
#   glibc malloc, 64 KiB read buffers (before):  9 / 143 / 253 / 336 / 336
#   glibc malloc, 2 KiB first read buffer:       9 / 122 / 124 / 123 / 125
#   jemalloc + background thread (the default): 11 /  16 /  16 /  19 / 126
set -euo pipefail
BIN=${WARREN_BIN:-target/release/warren}
PERF=${PERF_BIN:-target/release/warren-perf}
PORT=${PORT:-25690}
WAIT=${WAIT:-12}
ulimit -n 20000 || { echo "need 20000 open files (ulimit -n)"; exit 1; }
D=$(mktemp -d)
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$D" "$D.log"' EXIT
"$BIN" --data-dir "$D" --port "$PORT" --bind 127.0.0.1 --no-management --no-prometheus > "$D.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do grep -q "listening" "$D.log" && break; sleep 0.1; done
mib() { awk -v f="$1" '$1 == f {print int($2/1024)}' "/proc/$PID/status"; }
echo -n "start $(mib VmRSS:)"
for round in 1 2 3; do
  "$PERF" --uri "amqp://guest:guest@127.0.0.1:$PORT/%2f" --producers 0 --consumers 0 \
    --idle-connections 10000 --duration 3 > /dev/null 2>&1
  for _ in $(seq 1 100); do [ "$(ls "/proc/$PID/fd" | wc -l)" -lt 100 ] && break; sleep 0.1; done
  sleep "$WAIT"
  echo -n " | after burst $round $(mib VmRSS:)"
done
echo " | peak $(mib VmHWM:)"
