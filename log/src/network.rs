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
use thingraft_proto::v1::RaftRequest;
use thingraft_proto::v1::raft_client::RaftClient;
use tonic::transport::{Channel, Endpoint};

use crate::types::{GroupId, Node, NodeId, TypeConfig};

/// Largest gRPC message a node accepts or sends (a Raft batch, a snapshot chunk, a read).
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Channels to the other nodes, one per peer.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    inner: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
}

impl Peers {
    /// The channel to `id` at `addr`, created on first use (connects lazily, reconnects by itself).
    pub fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.inner.lock().expect("peers lock");
        if let Some((a, ch)) = map.get(&id)
            && a == addr
        {
            return Ok(ch.clone());
        }
        let ch = endpoint(addr)?.connect_lazy();
        map.insert(id, (addr.to_string(), ch.clone()));
        Ok(ch)
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
        let client = self.peers.channel(target, &node.addr).map(|ch| {
            RaftClient::new(ch)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        });
        PeerConnection {
            group: self.group,
            target,
            client: client.map_err(|e| e.to_string()),
        }
    }
}

/// openraft's connection to one peer for one group.
pub struct PeerConnection {
    group: GroupId,
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
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
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let payload = postcard::to_stdvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            group: self.group,
            payload: payload.into(),
        };
        let fut = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(request).await,
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
