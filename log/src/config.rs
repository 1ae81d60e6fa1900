//! The log's section of the node configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::storage::Retention;
use crate::types::NodeId;

/// Configuration of the replicated log on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// This node's id; unique in the cluster, stable for the life of its data directory.
    pub node_id: NodeId,
    /// Address other nodes and clients reach this node's gRPC server at (host:port).
    pub advertise_addr: String,
    /// Where this node's RocksDB lives.
    pub data_dir: PathBuf,
    /// Number of partitions (Raft groups besides the metadata group).
    pub partitions: u32,
    /// Replicas per partition (capped at the number of members).
    pub replication_factor: usize,
    /// The initial members, id → gRPC address, this node included. Empty: a single node.
    pub members: BTreeMap<NodeId, String>,
    pub heartbeat_ms: u64,
    /// A follower that has seen a leader starts an election after the leader's lease (openraft
    /// 0.9: `election_timeout_max_ms`) plus a random timeout in `[min, max)`; one whose log is
    /// shorter than a peer's waits another `2 * max`. 300/600 ms replace a dead leader within
    /// 0.9–2.4 s, inside the 3 s the device path promises.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Group commit: at most this many records in one Raft entry.
    pub batch_records_max: usize,
    /// Group commit: at most this many bytes in one Raft entry.
    pub batch_bytes_max: usize,
    /// How long a leader holds a message to a follower that carries only a new commit index,
    /// in case the next entries can carry it instead (0: send at once). Followers learn a
    /// commit up to this much later; acknowledgements do not wait for it.
    pub commit_hold_us: u64,
    /// Raft entries a partition leader keeps in flight (proposed, not yet committed).
    pub inflight_entries_max: usize,
    /// Appends waiting for a partition's batcher; beyond this, appenders wait (backpressure).
    pub append_queue_max: usize,
    /// Largest record (key + value) accepted.
    pub record_bytes_max: usize,
    /// Most records accepted in one append call (its bytes are bounded by `batch_bytes_max`).
    pub append_records_max: usize,
    /// How long an append waits for a leader, and for its commit, before giving up.
    pub append_timeout_ms: u64,
    /// Build a snapshot after this many applied entries (then older log entries are purged).
    pub snapshot_every_entries: u64,
    /// Raft entries kept behind the last snapshot, for followers that lag a little.
    pub entries_kept_after_snapshot: u64,
    /// Bytes per message when a snapshot is sent to a follower.
    pub snapshot_chunk_bytes: usize,
    /// How often a node asks for the lead of the partitions it is the preferred replica of
    /// (placement's first) and does not lead, once it is ready to lead them (0: never).
    pub leader_rebalance_ms: u64,
    /// How much of each partition is kept.
    pub retention: Retention,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            advertise_addr: "127.0.0.1:7400".into(),
            data_dir: PathBuf::from("data"),
            partitions: 16,
            replication_factor: 3,
            members: BTreeMap::new(),
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            batch_records_max: 8192,
            batch_bytes_max: 1 << 20,
            commit_hold_us: 1000,
            inflight_entries_max: 8,
            append_queue_max: 16_384,
            record_bytes_max: 1 << 20,
            append_records_max: 4096,
            append_timeout_ms: 10_000,
            snapshot_every_entries: 20_000,
            entries_kept_after_snapshot: 2_000,
            snapshot_chunk_bytes: 4 << 20,
            leader_rebalance_ms: 1_000,
            retention: Retention::default(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid log config: {0}")]
pub struct ConfigError(pub String);

impl LogConfig {
    /// Checks relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        if self.node_id == 0 {
            return err("node_id must be > 0");
        }
        if self.partitions == 0 || self.partitions > 4096 {
            return err("partitions must be in 1..=4096");
        }
        if self.replication_factor == 0 {
            return err("replication_factor must be >= 1");
        }
        if !self.members.is_empty() && !self.members.contains_key(&self.node_id) {
            return err("members must include this node's id");
        }
        if self.members.contains_key(&0) {
            return err("member ids must be > 0");
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 3 > self.election_timeout_min_ms {
            return err("heartbeat_ms must be > 0 and at most a third of election_timeout_min_ms");
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return err("election_timeout_min_ms must be < election_timeout_max_ms");
        }
        if self.batch_records_max == 0 || self.batch_bytes_max < self.record_bytes_max {
            return err("batch_records_max must be > 0 and batch_bytes_max >= record_bytes_max");
        }
        if self.inflight_entries_max == 0 || self.append_queue_max == 0 || self.append_records_max == 0 {
            return err("inflight_entries_max, append_queue_max and append_records_max must be > 0");
        }
        if self.append_records_max > self.batch_records_max {
            return err("append_records_max must be <= batch_records_max");
        }
        if self.snapshot_every_entries == 0 {
            return err("snapshot_every_entries must be > 0");
        }
        Ok(())
    }

    /// The members, or this node alone.
    pub fn effective_members(&self) -> BTreeMap<NodeId, String> {
        if self.members.is_empty() {
            BTreeMap::from([(self.node_id, self.advertise_addr.clone())])
        } else {
            self.members.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        LogConfig::default().validate().unwrap();
    }

    #[test]
    fn heartbeat_must_fit_in_the_election_timeout() {
        let c = LogConfig {
            heartbeat_ms: 400,
            ..LogConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn members_must_include_self() {
        let c = LogConfig {
            members: BTreeMap::from([(2, "x:1".into())]),
            ..LogConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
