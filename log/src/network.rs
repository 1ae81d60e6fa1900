//! The Raft transport: one tonic channel per peer, shared by every group and by append
//! forwarding; each RPC carries its group id and openraft's message as postcard bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thingraft_proto::v1::raft_client::RaftClient;
use thingraft_proto::v1::{RaftBatchRequest, RaftCallResult, RaftReply, RaftRequest};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::types::{GroupId, Node, NodeId, TypeConfig};

/// Largest gRPC message a node accepts or sends (a Raft batch, a snapshot chunk, a read).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Links to the other nodes, one per peer: a tonic channel (HTTP/2, multiplexed) and the
/// batcher that packs AppendEntries of all groups bound for that peer into one RPC.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    inner: Arc<Mutex<HashMap<NodeId, (String, PeerLink)>>>,
}

type BatchCall = (RaftRequest, oneshot::Sender<Result<RaftReply, tonic::Status>>);

/// The connection to one peer.
#[derive(Debug, Clone)]
pub struct PeerLink {
    pub channel: Channel,
    batch_tx: mpsc::Sender<BatchCall>,
}

/// AppendEntries batches to one peer in flight at once.
const BATCHES_IN_FLIGHT_MAX: usize = 4;
/// Calls in one batch.
const BATCH_CALLS: usize = 256;

impl Peers {
    /// The link to `id` at `addr`, created on first use (connects lazily, reconnects by itself).
    pub fn link(&self, id: NodeId, addr: &str) -> Result<PeerLink, tonic::transport::Error> {
        let mut map = self.inner.lock().expect("peers lock");
        if let Some((a, link)) = map.get(&id)
            && a == addr
        {
            return Ok(link.clone());
        }
        let channel = endpoint(addr)?.connect_lazy();
        let (batch_tx, rx) = mpsc::channel(4096);
        tokio::spawn(run_batch_sender(raft_client(channel.clone()), rx));
        let link = PeerLink { channel, batch_tx };
        map.insert(id, (addr.to_string(), link.clone()));
        Ok(link)
    }

    /// The channel to `id` at `addr`.
    pub fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.link(id, addr).map(|l| l.channel)
    }
}

fn raft_client(ch: Channel) -> RaftClient<Channel> {
    RaftClient::new(ch)
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
}

/// Sends whatever AppendEntries calls are waiting for one peer as one `AppendEntriesBatch`,
/// keeping at most `BATCHES_IN_FLIGHT_MAX` batches in flight.
async fn run_batch_sender(client: RaftClient<Channel>, mut rx: mpsc::Receiver<BatchCall>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut calls = vec![first];
        while calls.len() < BATCH_CALLS {
            match rx.try_recv() {
                Ok(c) => calls.push(c),
                Err(_) => break,
            }
        }
        let mut client = client.clone();
        tokio::spawn(async move {
            let (reqs, txs): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
            let res = client
                .append_entries_batch(RaftBatchRequest { calls: reqs })
                .await;
            drop(permit);
            match res {
                Ok(r) => {
                    let mut results = r.into_inner().results.into_iter();
                    for tx in txs {
                        let out = match results.next() {
                            Some(RaftCallResult {
                                reply: Some(reply), ..
                            }) => Ok(reply),
                            Some(RaftCallResult { code, message, .. }) => {
                                Err(tonic::Status::new(tonic::Code::from(code), message))
                            }
                            None => Err(tonic::Status::internal("batch reply is missing results")),
                        };
                        let _ = tx.send(out);
                    }
                }
                Err(s) => {
                    for tx in txs {
                        let _ = tx.send(Err(s.clone()));
                    }
                }
            }
        });
    }
}

/// An endpoint with the settings every thingraft connection uses.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .initial_connection_window_size(8 << 20)
        .initial_stream_window_size(4 << 20))
}

/// Builds openraft's connections for one group.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    pub group: GroupId,
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        let link = self
            .peers
            .link(target, &node.addr)
            .map(|l| (raft_client(l.channel.clone()), l))
            .map_err(|e| e.to_string());
        PeerConnection {
            group: self.group,
            target,
            link,
        }
    }
}

/// openraft's connection to one peer for one group.
pub struct PeerConnection {
    group: GroupId,
    target: NodeId,
    link: Result<(RaftClient<Channel>, PeerLink), String>,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let (client, link) = match &mut self.link {
            Ok((c, l)) => (c, l),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let payload = postcard::to_stdvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            group: self.group,
            payload: payload.into(),
        };
        let fut = async {
            match rpc {
                Rpc::AppendEntries => {
                    let (tx, rx) = oneshot::channel();
                    if link.batch_tx.send((request, tx)).await.is_err() {
                        return Err(tonic::Status::unavailable("peer link closed"));
                    }
                    rx.await
                        .unwrap_or_else(|_| Err(tonic::Status::unavailable("peer link dropped the call")))
                        .map(tonic::Response::new)
                }
                Rpc::Vote => client.vote(request).await,
                Rpc::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => return Err(RPCError::Network(NetworkError::new(&Msg("rpc timed out".into())))),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(r)) => r.into_inner(),
        };
        let res: Result<Resp, RaftError<NodeId, E>> =
            postcard::from_bytes(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
