#!/usr/bin/env bash
# Starts / stops N thingraft nodes (release build) on 127.0.0.1:7401.. for benchmarks.
# Usage: bench/thingraft-cluster.sh start N DIR [extra serve flags] | stop DIR
set -euo pipefail
cmd=${1:?start|stop}
BIN=${THINGRAFT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/thingraft-target}/release/thingraft}
case "$cmd" in
start)
  n=${2:?nodes}; dir=${3:?state dir}; shift 3
  mkdir -p "$dir"
  peers=""
  for i in $(seq 1 "$n"); do peers="$peers${peers:+,}$i=127.0.0.1:$((7400 + i))"; done
  for i in $(seq 1 "$n"); do
    if [ "$n" -eq 1 ]; then p=(--listen 127.0.0.1:7401); else p=(--peers "$peers"); fi
    RUST_LOG=${RUST_LOG:-warn} "$BIN" serve --node-id "$i" "${p[@]}" --data-dir "$dir/n$i" --mqtt-listen "127.0.0.1:$((1900 + i))" --http-listen "127.0.0.1:$((8100 + i))" --coap-listen "127.0.0.1:$((5700 + i))" "$@" > "$dir/n$i.log" 2>&1 &
    echo $! > "$dir/n$i.pid"
  done
  # Ready when every group is led, each partition by its preferred replica: the lead moves
  # there within seconds (decision 0019), and the move must not fall inside a measurement.
  for _ in $(seq 1 300); do
    if "$BIN" status --addr 127.0.0.1:7401 --json 2>/dev/null | python3 -c '
import json,sys
s=json.load(sys.stdin)
sys.exit(0 if s["groups"] and all(g["leader"] and g.get("preferred_leader", 0) in (0, g["leader"]) for g in s["groups"]) else 1)' 2>/dev/null; then
      echo "thingraft cluster of $n up"; exit 0
    fi
    sleep 0.2
  done
  echo "thingraft cluster did not become ready" >&2; exit 1 ;;
stop)
  dir=${2:?state dir}
  for f in "$dir"/n*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  # Wait for a clean exit (it flushes applied state), so the ports are free for the next start.
  for f in "$dir"/n*.pid; do
    [ -f "$f" ] || continue
    for _ in $(seq 1 100); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  rm -rf "$dir" ;;
esac
