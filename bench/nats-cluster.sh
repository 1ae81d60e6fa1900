#!/usr/bin/env bash
# Starts / stops a 3-server NATS JetStream cluster on 127.0.0.1 (client ports 4222-4224), as in
# ../shared/bench/PEERS.md. Usage: bench/nats-cluster.sh start DIR | stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?state dir}
command -v nats-server >/dev/null || { apt-get install -y -qq nats-server >/dev/null; }
case "$cmd" in
start)
  mkdir -p "$dir"
  for i in 1 2 3; do
    cat > "$dir/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((4221 + i))
http: 127.0.0.1:$((8221 + i))
jetstream { store_dir: "$dir/data/n$i", max_memory_store: 256MB, max_file_store: 8GB }
cluster {
  name: bench
  listen: 127.0.0.1:$((6221 + i))
  routes: [ nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, nats-route://127.0.0.1:6224 ]
}
CONF
    nats-server -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
    echo $! > "$dir/n$i.pid"
  done
  for _ in $(seq 1 100); do
    if curl -s 127.0.0.1:8222/jsz | grep -q '"meta_cluster"' && curl -s 127.0.0.1:8222/jsz | grep -q '"leader"'; then
      echo "nats cluster up"; exit 0
    fi
    sleep 0.2
  done
  echo "nats cluster did not elect a meta leader" >&2; exit 1 ;;
stop)
  for i in 1 2 3; do [ -f "$dir/n$i.pid" ] && kill "$(cat "$dir/n$i.pid")" 2>/dev/null || true; done
  for i in 1 2 3; do
    [ -f "$dir/n$i.pid" ] || continue
    for _ in $(seq 1 100); do kill -0 "$(cat "$dir/n$i.pid")" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$dir" ;;
esac
