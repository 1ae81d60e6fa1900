//! thingraft-log: a partitioned log, each partition a Raft group (openraft) stored in one RocksDB
//! per node, replicated over gRPC (tonic).
//!
//! - [`types`]: openraft type config, [`Record`], the [`Command`]s carried by entries.
//! - [`storage`]: RocksDB log store and state machine of every group; the shared fsync thread.
//! - [`batch`]: the stored form of a batch of records.
//! - [`batcher`]: group commit at a partition's leader.
//! - [`network`], [`server`]: the Raft transport and the `Log` gRPC API.
//! - [`node`]: [`LogNode`] (start, bootstrap, rejoin, shutdown) and [`LogHandle`] (append, read,
//!   tail, status).
//! - [`client`]: [`LogClient`], a gRPC client for tools and tests.
//! - [`placement`]: keys → partitions, partitions → replicas.
//! - [`rebalance`]: a partition's lead goes back to its preferred replica once that one is ready.
//! - [`config`], [`error`], [`metrics`].

pub mod batch;
pub mod batcher;
pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
pub mod network;
pub mod node;
mod pipe;
pub mod placement;
pub mod rebalance;
mod segments;
pub mod server;
pub mod storage;
pub mod types;

pub use batcher::Appended;
pub use client::LogClient;
pub use config::LogConfig;
pub use error::LogError;
pub use node::{AppHandler, LogHandle, LogNode, META_PARTITION, ReadResult, Tail, TxnResult};
pub use storage::{Retention, StoredRecord};
pub use types::{Command, MetaCheck, MetaOp, MetaTxn, NodeId, Record};

pub mod probe;
