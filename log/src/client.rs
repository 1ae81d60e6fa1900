//! A gRPC client of the log, for tools, benchmarks and tests: sends each append to the
//! partition's leader when it knows it (learned from `Status` and from `NotLeader` hints) and
//! retries only errors that certainly did not commit. Appends go on one `AppendStream` per node
//! (unary `Append` calls when [`LogClient::streamed`] is off).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use thingraft_proto::v1::log_client::LogClient as GrpcLogClient;
use thingraft_proto::v1::{self as pb};
use tonic::transport::Channel;

use crate::batcher::Appended;
use crate::error::LogError;
use crate::network::{GRPC_MESSAGE_BYTES_MAX, endpoint};
use crate::pipe::Pipes;
use crate::types::{NodeId, Record};

/// A client of a thingraft cluster's log.
pub struct LogClient {
    nodes: HashMap<NodeId, GrpcLogClient<Channel>>,
    /// Partition → node believed to lead it.
    leaders: Mutex<HashMap<u32, NodeId>>,
    partitions: u32,
    default_node: NodeId,
    /// How long an append may keep retrying retriable errors.
    pub retry_for: Duration,
    /// Appends go on a node's `AppendStream` (true, the default) or as unary `Append` calls.
    pub streamed: bool,
    pipes: Pipes,
}

fn grpc(ch: Channel) -> GrpcLogClient<Channel> {
    GrpcLogClient::new(ch)
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
}

impl LogClient {
    /// Connects through `addr` (any node), then to every member it reports.
    pub async fn connect(addr: &str) -> anyhow::Result<LogClient> {
        let ch = endpoint(addr)?.connect().await?;
        let status = grpc(ch).status(pb::StatusRequest {}).await?.into_inner();
        let mut nodes = HashMap::new();
        for m in &status.members {
            nodes.insert(m.node_id, grpc(endpoint(&m.addr)?.connect_lazy()));
        }
        let c = LogClient {
            nodes,
            leaders: Mutex::new(HashMap::new()),
            partitions: status.partitions,
            default_node: status.node_id,
            retry_for: Duration::from_secs(10),
            streamed: true,
            pipes: Pipes::new(false),
        };
        c.learn_leaders(&status);
        Ok(c)
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The node this client first connected through.
    pub fn entry_node(&self) -> NodeId {
        self.default_node
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        let mut v: Vec<_> = self.nodes.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn learn_leaders(&self, s: &pb::StatusReply) {
        let mut l = self.leaders.lock().expect("leaders lock");
        for g in &s.groups {
            if g.group > 0 && g.leader != 0 {
                l.insert(g.group - 1, g.leader);
            }
        }
    }

    /// Asks every node for its status and learns the leaders it reports.
    pub async fn refresh_leaders(&self) {
        for id in self.node_ids() {
            if let Ok(s) = self.status(id).await {
                self.learn_leaders(&s);
            }
        }
    }

    fn client(&self, id: NodeId) -> Result<GrpcLogClient<Channel>, LogError> {
        self.nodes
            .get(&id)
            .cloned()
            .ok_or_else(|| LogError::Invalid(format!("unknown node {id}")))
    }

    /// Appends `records` to `partition`; returns their offsets once committed.
    pub async fn append(&self, partition: u32, records: Vec<Record>) -> Result<Appended, LogError> {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let req = pb::AppendRequest {
            partition,
            records: records
                .into_iter()
                .map(|r| pb::Record {
                    key: r.key,
                    value: r.value,
                })
                .collect(),
        };
        let mut attempt = 0u32;
        loop {
            let target = self
                .leaders
                .lock()
                .expect("leaders lock")
                .get(&partition)
                .copied()
                .unwrap_or(self.default_node);
            let err = if self.streamed {
                let reply = self
                    .pipes
                    .append(target, "", || self.client(target), req.clone())
                    .await;
                match reply {
                    Ok(r) => match LogError::from_stream_reply(partition, &r) {
                        None => {
                            return Ok(Appended {
                                first_offset: r.first_offset,
                                count: r.count,
                            });
                        }
                        Some(e) => e,
                    },
                    Err(s) => LogError::from_status(partition, &s),
                }
            } else {
                match self.client(target)?.append(req.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        return Ok(Appended {
                            first_offset: r.first_offset,
                            count: r.count,
                        });
                    }
                    Err(s) => LogError::from_status(partition, &s),
                }
            };
            if !err.retriable() || tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            attempt += 1;
            let next = match &err {
                LogError::NotLeader {
                    leader: Some((id, _)),
                    ..
                } if *id != target => Some(*id),
                _ => {
                    // Try another node next time.
                    let ids = self.node_ids();
                    ids.iter()
                        .position(|i| *i == target)
                        .map(|p| ids[(p + 1) % ids.len()])
                }
            };
            if let Some(n) = next {
                self.leaders.lock().expect("leaders lock").insert(partition, n);
            }
            tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 10)).await;
        }
    }

    /// Reads committed records of `partition` from node `node`'s own replica.
    pub async fn read_from(
        &self,
        node: NodeId,
        partition: u32,
        from: u64,
        max: u32,
    ) -> Result<pb::ReadReply, LogError> {
        let req = pb::ReadRequest {
            partition,
            from_offset: from,
            max_records: max,
        };
        self.client(node)?
            .read(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| LogError::from_status(partition, &s))
    }

    /// Node `node`'s view of the cluster.
    pub async fn status(&self, node: NodeId) -> Result<pb::StatusReply, LogError> {
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        self.client(node)?
            .status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| LogError::from_status(0, &s))
    }
}
