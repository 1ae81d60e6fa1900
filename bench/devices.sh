#!/usr/bin/env bash
# The HTTP and CoAP device APIs side by side with MQTT, one node, each row on a fresh node:
# telemetry with 3 data points per request, every answer sent only after the commit.
# Usage: bench/devices.sh [seconds]
set -euo pipefail
secs=${1:-8}
BIN=${THINGRAFT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/thingraft-target}/release/thingraft}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
dir=$(mktemp -d)
trap 'bench/thingraft-cluster.sh stop "$dir/c" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
fresh() {
  rm -rf "$dir/c"
  bench/thingraft-cluster.sh start 1 "$dir/c" >/dev/null
}
devices() { # n: creates bench-<i> / bench-token-<i> through REST
  "$BIN" bench devices --http 127.0.0.1:8101 --count "$1" 2>/dev/null
}
for conns in 10 100; do
  fresh; devices 100
  echo "== HTTP (wrk), $conns connections over 100 devices"
  DEVICES=100 wrk -t 2 -c "$conns" -d "${secs}s" --latency -s bench/http-telemetry.lua http://127.0.0.1:8101 |
    grep -E "Requests/sec|Non-2xx|50%|99%|requests in|Socket errors"
  bench/thingraft-cluster.sh stop "$dir/c" >/dev/null
done
for inflight in 1 8; do
  fresh
  echo "== CoAP, 100 clients × $inflight in flight"
  "$BIN" bench coap --coap 127.0.0.1:5701 --http 127.0.0.1:8101 --clients 100 --inflight "$inflight" \
    --seconds "$secs" --warmup 2 2>&1 | grep -E "acknowledged|latency|clients"
  bench/thingraft-cluster.sh stop "$dir/c" >/dev/null
done
for inflight in 1 32; do
  fresh
  echo "== MQTT, 100 connections × $inflight in flight"
  "$BIN" bench mqtt --mqtt 127.0.0.1:1901 --http 127.0.0.1:8101 --connections 100 --inflight "$inflight" \
    --seconds "$secs" --warmup 2 2>&1 | grep -E "acknowledged|latency"
  bench/thingraft-cluster.sh stop "$dir/c" >/dev/null
done
