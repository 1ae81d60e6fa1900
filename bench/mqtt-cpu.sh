#!/usr/bin/env bash
# One `thingraft bench mqtt` row on a fresh single node, plus the node's own CPU over 5 s of the
# measured window (from /proc/<pid>/stat), for comparing CPU per message between builds.
# Usage: bench/mqtt-cpu.sh CONNECTIONS INFLIGHT RATE [SECONDS] [CONFIG.toml]
# Compare two builds with THINGRAFT_BIN=/path/to/thingraft.
set -euo pipefail
conns=$1 inflight=$2 rate=$3 secs=${4:-8}
BIN=${THINGRAFT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/thingraft-target}/release/thingraft}
export THINGRAFT_BIN=$BIN
dir=$(mktemp -d)
trap 'bench/thingraft-cluster.sh stop "$dir/c" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
extra=()
if [ -n "${5:-}" ]; then extra=(--config "$5"); fi
bench/thingraft-cluster.sh start 1 "$dir/c" "${extra[@]}" >/dev/null
pid=$(cat "$dir/c/n1.pid")
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
# Device creation, connecting and the 2 s warmup come first; sample 5 s after them.
# Steal: time the hypervisor gave this machine's vCPUs to others (a slow stretch of the host).
steal() { awk '/^cpu /{print $9}' /proc/stat; }
(sleep 5; t0=$(ticks); s0=$(steal); sleep 5; t1=$(ticks); s1=$(steal)
 echo "node CPU: $(( (t1 - t0) * 100 / (5 * hz) )) % of one core; steal: $(( (s1 - s0) * 100 / (5 * hz) )) % of one core") &
"$BIN" bench mqtt --mqtt 127.0.0.1:1901 --http 127.0.0.1:8101 --connections "$conns" \
  --inflight "$inflight" --rate "$rate" --seconds "$secs" --warmup 2 2>&1 |
  grep -E "acknowledged|latency|failed"
wait
