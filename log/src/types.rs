//! The openraft type configuration and the commands carried by Raft entries.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A node's id in the cluster; stable for the life of its data directory.
pub type NodeId = u64;

/// A Raft group inside one process: [`META_GROUP`] or a partition's group.
pub type GroupId = u32;

/// The metadata group: members, node addresses, placement.
pub const META_GROUP: GroupId = 0;

/// The Raft group that replicates partition `partition`.
pub fn partition_group(partition: u32) -> GroupId {
    partition + 1
}

/// What openraft knows of a node: where its gRPC server listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// One record of a partition: an entity key and an opaque value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: Bytes,
    pub value: Bytes,
}

impl Record {
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }

    /// Bytes this record costs in a batch (key + value + framing).
    pub fn size(&self) -> usize {
        self.key.len() + self.value.len() + 8
    }
}

/// The application data of a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records appended to a partition as one group-committed batch, already in their stored
    /// form (`batch::encode`: the leader's time stamp, then the records), so replicating and
    /// applying an entry moves one buffer instead of two per record. Applying never reads a
    /// clock: the time is the one the leader stamped.
    Append { batch: Bytes },
    /// Metadata group: set one key of the cluster metadata map.
    MetaPut { key: String, value: Bytes },
    /// Metadata group: check some keys, then apply all of `ops` or none of them.
    MetaTxn(MetaTxn),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Append { batch } => write!(f, "Append({} bytes)", batch.len()),
            Command::MetaPut { key, value } => write!(f, "MetaPut({key}, {} bytes)", value.len()),
            Command::MetaTxn(t) => write!(f, "MetaTxn({} checks, {} ops)", t.checks.len(), t.ops.len()),
        }
    }
}

/// An atomic compare-and-write of the metadata map (the entity registry is built on it: a
/// create is "these keys are absent, then put them all"). Evaluated at apply, in log order, so
/// every replica reaches the same verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaTxn {
    pub checks: Vec<MetaCheck>,
    pub ops: Vec<MetaOp>,
}

/// A condition on one key of the metadata map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCheck {
    Absent(String),
    Present(String),
    Equals(String, Bytes),
}

/// A write to the metadata map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOp {
    Put(String, Bytes),
    Delete(String),
}

impl MetaOp {
    pub fn key(&self) -> &str {
        match self {
            MetaOp::Put(k, _) | MetaOp::Delete(k) => k,
        }
    }
}

/// What applying an entry returns to the proposer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[default]
    None,
    /// The batch's records got offsets `first_offset .. first_offset + count`.
    Appended { first_offset: u64, count: u32 },
    /// A [`MetaTxn`] was applied (`applied`) or refused because check `failed_check` failed.
    Txn {
        applied: bool,
        failed_check: Option<u32>,
    },
}

/// thingraft's openraft type configuration: openraft's defaults (what `declare_raft_types!`
/// fills in), except the responder, which answers a batch's appends from the state machine
/// without a task in between ([`crate::batcher::FnResponder`]); the macro cannot name a generic
/// responder, so the configuration is written out.
#[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
pub struct TypeConfig {}

impl openraft::RaftTypeConfig for TypeConfig {
    type D = Command;
    type R = Response;
    type NodeId = NodeId;
    type Node = Node;
    type Term = u64;
    type LeaderId = openraft::impls::leader_id_adv::LeaderId<Self::Term, Self::NodeId>;
    type Vote = openraft::impls::Vote<Self::LeaderId>;
    type Payload = openraft::EntryPayload<Self::D, Self::NodeId, Self::Node>;
    type Entry = openraft::Entry<<Self::LeaderId as openraft::vote::RaftLeaderId>::Committed, Self::Payload>;
    type Responder<T>
        = crate::batcher::FnResponder<T>
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type AsyncRuntime = openraft::impls::TokioRuntime;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

use openraft::type_config::alias;

/// A Raft instance of thingraft.
pub type Raft = openraft::Raft<TypeConfig, crate::storage::StateMachine>;
/// A log entry of thingraft.
pub type Entry = alias::EntryOf<TypeConfig>;
/// openraft's log id with thingraft's leader id.
pub type LogId = alias::LogIdOf<TypeConfig>;
/// openraft's vote.
pub type Vote = alias::VoteOf<TypeConfig>;
/// openraft's membership as stored with the log id that set it.
pub type StoredMembership = alias::StoredMembershipOf<TypeConfig>;
/// What a snapshot covers.
pub type SnapshotMeta = alias::SnapshotMetaOf<TypeConfig>;
/// The bytes of a snapshot, in memory.
pub type SnapshotData = std::io::Cursor<Vec<u8>>;
/// A snapshot: its meta and its bytes.
pub type Snapshot = alias::SnapshotOf<TypeConfig, SnapshotData>;
/// openraft's storage error (the storage traits return `std::io::Error`; the test builder
/// still needs this one).
pub type StorageError = openraft::StorageError<TypeConfig>;
