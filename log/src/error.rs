//! Errors of the log's public API.

use thingraft_proto::ErrorClass;

use crate::types::NodeId;

/// An error of [`crate::LogHandle`] or [`crate::LogClient`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("unknown partition {partition}: the log has {partitions} partitions")]
    UnknownPartition { partition: u32, partitions: u32 },
    #[error("record of {bytes} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge { bytes: usize, limit: usize },
    #[error("append of {count} records exceeds the limit of {limit}")]
    TooManyRecords { count: usize, limit: usize },
    #[error("append of {bytes} bytes exceeds the limit of {limit} bytes")]
    AppendTooLarge { bytes: usize, limit: usize },
    #[error("empty append")]
    EmptyAppend,
    #[error("no leader for partition {partition} within the wait")]
    NoLeader { partition: u32 },
    #[error("this node does not lead partition {partition}; leader: {leader:?}")]
    NotLeader {
        partition: u32,
        leader: Option<(NodeId, String)>,
    },
    /// The append was proposed but its outcome is unknown: it may or may not be committed.
    #[error("append outcome unknown: {reason}")]
    Ambiguous { reason: String },
    #[error("node is shutting down")]
    ShuttingDown,
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl LogError {
    /// Which row of the error-code table this error answers with.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::UnknownPartition { .. } | Self::EmptyAppend | Self::Invalid(_) => ErrorClass::BadRequest,
            Self::RecordTooLarge { .. } | Self::TooManyRecords { .. } | Self::AppendTooLarge { .. } => {
                ErrorClass::TooLarge
            }
            Self::NoLeader { .. } | Self::NotLeader { .. } | Self::ShuttingDown | Self::Unreachable(_) => {
                ErrorClass::Unavailable
            }
            Self::Ambiguous { .. } => ErrorClass::Timeout,
            Self::Internal(_) => ErrorClass::Internal,
        }
    }

    /// True when retrying cannot duplicate a record: the append was definitely not committed.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            Self::NoLeader { .. } | Self::NotLeader { .. } | Self::Unreachable(_) | Self::ShuttingDown
        )
    }
}

/// gRPC metadata key carrying the leader's id and address with a `NotLeader` answer.
pub const LEADER_HINT: &str = "x-thingraft-leader";

impl From<LogError> for tonic::Status {
    fn from(e: LogError) -> Self {
        let mut status = tonic::Status::new(e.class().grpc_code(), e.to_string());
        if let LogError::NotLeader {
            leader: Some((id, addr)),
            ..
        } = &e
            && let Ok(v) = format!("{id}@{addr}").parse()
        {
            status.metadata_mut().insert(LEADER_HINT, v);
        }
        status
    }
}

impl LogError {
    /// Rebuilds an error from a peer's gRPC status (client side of [`From<LogError>`]).
    pub fn from_status(partition: u32, s: &tonic::Status) -> Self {
        let leader = s
            .metadata()
            .get(LEADER_HINT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('@'))
            .and_then(|(id, addr)| Some((id.parse().ok()?, addr.to_string())));
        match s.code() {
            tonic::Code::Unavailable if leader.is_some() => LogError::NotLeader { partition, leader },
            tonic::Code::Unavailable if s.message().starts_with("no leader") => {
                LogError::NoLeader { partition }
            }
            tonic::Code::Unavailable if s.message().starts_with("this node does not lead") => {
                LogError::NotLeader {
                    partition,
                    leader: None,
                }
            }
            tonic::Code::Unavailable if s.message().starts_with("node is shutting down") => {
                LogError::ShuttingDown
            }
            // A connection that could not be made never carried the request: safe to retry.
            // A connection that broke while the request was out may have delivered it.
            tonic::Code::Unavailable if is_connect_failure(s.message()) => {
                LogError::Unreachable(s.message().to_string())
            }
            tonic::Code::Unavailable => LogError::Ambiguous {
                reason: s.message().to_string(),
            },
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                LogError::Invalid(s.message().to_string())
            }
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => LogError::Ambiguous {
                reason: s.message().to_string(),
            },
            _ => LogError::Ambiguous {
                reason: format!("{}: {}", s.code(), s.message()),
            },
        }
    }
}

impl LogError {
    /// The error of one append answered on an `AppendStream`, if it failed.
    pub fn from_stream_reply(partition: u32, r: &thingraft_proto::v1::AppendStreamReply) -> Option<Self> {
        if r.error_code == 0 {
            return None;
        }
        let mut s = tonic::Status::new(tonic::Code::from(r.error_code), r.error_message.clone());
        if !r.leader_hint.is_empty()
            && let Ok(v) = r.leader_hint.parse()
        {
            s.metadata_mut().insert(LEADER_HINT, v);
        }
        Some(Self::from_status(partition, &s))
    }
}

/// Whether a transport error happened while connecting (the request was never sent).
fn is_connect_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("tcp connect") || m.contains("connection refused") || m.contains("error trying to connect")
}
