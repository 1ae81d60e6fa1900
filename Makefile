# The two commands of the README. CARGO_TARGET_DIR defaults to a cache outside the clone so
# that rebuilds (and CI) reuse the RocksDB build.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/thingraft-target
ARGS ?=

.PHONY: run test release bench-log

## run: build and run a single node with embedded defaults (data under ./data)
run:
	./scripts/deps.sh
	cargo run --release --bin thingraft -- serve $(ARGS)

## test: build and run the whole test suite
test:
	./scripts/deps.sh
	cargo build --release --bin thingraft
	cargo nextest run --release --workspace --no-fail-fast

release:
	./scripts/deps.sh
	cargo build --release --bin thingraft
