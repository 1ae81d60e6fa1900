#!/usr/bin/env bash
# Engine state transfer (decision 0018): three nodes with a small retention take load, then
# node 3 loses its data directory and starts again; prints what each partition took from a peer.
# Usage: bench/state-transfer.sh [RETENTION_BYTES (4 MiB)] [LOAD_SECONDS (20)]
set -euo pipefail
ret=${1:-4194304} secs=${2:-20}
BIN=${THINGRAFT_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/thingraft-target}/release/thingraft}
export THINGRAFT_BIN=$BIN
dir=$(mktemp -d)
trap 'bench/thingraft-cluster.sh stop "$dir/c" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
printf '[log.retention]\nbytes_max = %s\nage_ms_max = 604800000\n' "$ret" > "$dir/cfg.toml"
bench/thingraft-cluster.sh start 3 "$dir/c" --config "$dir/cfg.toml" >/dev/null
"$BIN" bench mqtt --mqtt 127.0.0.1:1901 --http 127.0.0.1:8101 --connections 100 --inflight 32 \
  --seconds "$secs" --warmup 1 2>&1 | grep -E "acknowledged"
sleep 2
kill -9 "$(cat "$dir/c/n3.pid")"
sleep 0.5
echo "node 1 store: $(du -sh "$dir/c/n1/store" | cut -f1)"
rm -rf "$dir/c/n3"
RUST_LOG=info,openraft=warn "$BIN" serve --node-id 3 --peers 1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403 \
  --data-dir "$dir/c/n3" --mqtt-listen 127.0.0.1:1903 --http-listen 127.0.0.1:8103 \
  --coap-listen 127.0.0.1:5703 --config "$dir/cfg.toml" > "$dir/c/n3.log" 2>&1 &
echo $! > "$dir/c/n3.pid"
sleep 40
sed 's/\x1b\[[0-9;]*m//g' "$dir/c/n3.log" | grep -E "taken from a peer|are lost here" |
  grep -oE "partition=[0-9]+ peer=[0-9]+ processed_upto=[0-9]+ keys=[0-9]+ bytes=[0-9]+ ms=[0-9]+|lost here.*" || true
echo "node 3 store: $(du -sh "$dir/c/n3/store" | cut -f1)"
