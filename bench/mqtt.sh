#!/usr/bin/env bash
# `thingraft bench mqtt` rows for BENCHMARKS.md, each on a freshly started node (or 3-node
# cluster), so that no row measures the data an earlier row left behind.
# Usage: bench/mqtt.sh [seconds]
set -euo pipefail
secs=${1:-8}
BIN=${THINGRAFT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/thingraft-target}/release/thingraft}
dir=$(mktemp -d)
trap 'bench/thingraft-cluster.sh stop "$dir/c" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
row() { # nodes connections inflight rate
  local nodes=$1 conns=$2 inflight=$3 rate=$4
  rm -rf "$dir/c"
  bench/thingraft-cluster.sh start "$nodes" "$dir/c" >/dev/null
  echo "== nodes $nodes, connections $conns, in flight $inflight, rate $rate"
  "$BIN" bench mqtt --mqtt 127.0.0.1:1901 --http 127.0.0.1:8101 --connections "$conns" \
    --inflight "$inflight" --rate "$rate" --seconds "$secs" --warmup 2 2>&1 |
    grep -E "acknowledged|latency|lag|failed"
  bench/thingraft-cluster.sh stop "$dir/c" >/dev/null
}
row 1 1 1 0
row 1 100 32 0
row 1 100 32 10000
row 1 100 32 20000
row 1 100 32 50000
row 1 1000 8 0
row 1 10000 1 10000
row 3 1 1 0
row 3 100 32 0
