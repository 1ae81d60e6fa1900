//! Links Debian's libjemalloc ahead of libc, so that jemalloc's malloc and free are the ones the
//! whole process resolves: Rust's allocations and RocksDB's C++ ones alike. glibc's malloc took
//! ~20 % of a node's CPU under MQTT load (docs/decisions/0009-jemalloc.md).

fn main() {
    println!("cargo:rustc-link-lib=dylib=jemalloc");
}
