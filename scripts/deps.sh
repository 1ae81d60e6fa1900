#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine (idempotent).
# Rust itself must already be installed (rustup); everything else comes from apt and crates.io.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)   # bindgen, for librocksdb-sys
dpkg -s librocksdb-dev >/dev/null 2>&1 || need+=(librocksdb-dev) # RocksDB 7.8 (linked, not compiled)
command -v g++ >/dev/null 2>&1 || need+=(g++)                   # RocksDB is C++
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)         # OpenSSL's DTLS, for CoAP over DTLS
dpkg -s libjemalloc-dev >/dev/null 2>&1 || need+=(libjemalloc-dev) # the node's malloc (decision 0009)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)     # finds libssl for openssl-sys
command -v make >/dev/null 2>&1 || need+=(make)
command -v curl >/dev/null 2>&1 || need+=(curl)                 # tests call the REST API with curl
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients) # tests and the README tour
command -v coap-client-notls >/dev/null 2>&1 || need+=(libcoap3-bin)      # CoAP tests and the README tour
command -v openssl >/dev/null 2>&1 || need+=(openssl)                # certificates for the MQTT TLS test
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest >/dev/null
fi
# ThingsBoard's own Python device SDK, for the compatibility test (tests/tests/tb_sdk.rs), in a
# virtualenv of its own so that no system Python is touched.
venv="$HOME/.cache/thingraft-venv"
if ! "$venv/bin/python3" -c "import tb_device_mqtt, mmh3" >/dev/null 2>&1; then
  echo "installing tb-mqtt-client into $venv" >&2
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q "tb-mqtt-client==1.13.14" mmh3 >/dev/null
fi
