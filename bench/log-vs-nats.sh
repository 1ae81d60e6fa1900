#!/usr/bin/env bash
# Side-by-side: thingraft's log (1 node and 3 nodes) and NATS JetStream R3, 100-byte records,
# fsync on (thingraft) — all processes on this machine. Prints one JSON line per run.
# Usage: bench/log-vs-nats.sh [runs] [seconds]   (needs a release build: make release)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}; secs=${2:-5}
T=${THINGRAFT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/thingraft-target}/release/thingraft}
INFLIGHT=${INFLIGHT:-"1 256 4096 8192"}
tmp=$(mktemp -d)
trap 'bench/thingraft-cluster.sh stop $tmp/tr >/dev/null 2>&1 || true; bench/nats-cluster.sh stop $tmp/nats >/dev/null 2>&1 || true' EXIT
for run in $(seq 1 "$runs"); do
  for n in 1 3; do
    bench/thingraft-cluster.sh start "$n" "$tmp/tr" >/dev/null
    for inf in $INFLIGHT; do
      echo -n "run=$run nodes=$n inflight=$inf "
      "$T" bench log --addr 127.0.0.1:7401 --inflight "$inf" --seconds "$secs" --warmup 2 | grep '^json:' | cut -c7-
    done
    bench/thingraft-cluster.sh stop "$tmp/tr" >/dev/null
  done
  bench/nats-cluster.sh start "$tmp/nats" >/dev/null
  for inf in $INFLIGHT; do
    echo -n "run=$run nats-r3 inflight=$inf "
    "$T" bench nats --inflight "$inf" --seconds "$secs" --warmup 2 | grep '^json:' | cut -c7-
  done
  bench/nats-cluster.sh stop "$tmp/nats" >/dev/null
done
