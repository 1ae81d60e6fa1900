//! The Raft transport: one tonic channel per peer, shared by every group and by append
//! forwarding; each RPC carries its group id and openraft's message as postcard bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use openraft::OptionalSend;
use openraft::errors::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2, stream_append_sequential};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thingraft_proto::v1::raft_client::RaftClient;
use thingraft_proto::v1::{RaftBatchRequest, RaftCallResult, RaftReply, RaftRequest};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::types::{GroupId, Node, NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote};

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
    /// How long an append stream holds a request that only carries a new commit index
    /// ([`hold_commit_only`]).
    pub commit_hold: Duration,
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
            heartbeat: false,
            commit_hold: self.commit_hold,
        }
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection {
            heartbeat: true,
            ..self.new_client(target, node).await
        }
    }
}

/// openraft's connection to one peer for one group.
pub struct PeerConnection {
    group: GroupId,
    target: NodeId,
    link: Result<(RaftClient<Channel>, PeerLink), String>,
    /// openraft's heartbeat connection: each heartbeat is a one-request stream, sent as one
    /// AppendEntries call through the peer's batcher (with every other group's heartbeats)
    /// instead of opening a gRPC stream per heartbeat.
    heartbeat: bool,
    commit_hold: Duration,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    TransferLeader,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

/// One piece of a snapshot on its way to a follower, sent over the `InstallSnapshot` RPC.
/// openraft 0.10 leaves the transfer to the application: the follower appends the pieces of
/// one `transfer` in `offset` order and installs the whole snapshot with the last one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    /// Names one transfer: a chunk of another transfer restarts the follower's buffer.
    pub transfer: u64,
    pub offset: u64,
    pub data: Bytes,
    pub done: bool,
}

/// The follower's answer to a [`SnapshotChunk`]: `None` until the last chunk, then openraft's
/// response to the installed snapshot.
pub type SnapshotChunkReply = Result<Option<SnapshotResponse<TypeConfig>>, Fatal<TypeConfig>>;

fn unreachable(e: impl std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::new(&Msg(e.to_string()))
}

impl PeerConnection {
    /// Sends one request and returns the reply's payload.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let (client, link) = match &mut self.link {
            Ok((c, l)) => (c, l),
            Err(e) => return Err(RPCError::Unreachable(unreachable(e))),
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
                Rpc::TransferLeader => client.transfer_leader(request).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => return Err(RPCError::Network(NetworkError::new(&Msg("rpc timed out".into())))),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(r)) => r.into_inner(),
        };
        postcard::from_bytes(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    /// An AppendEntries or Vote call: the peer answers openraft's result. A fatal error there
    /// means the peer's group is stopping, so back off as from an unreachable peer.
    async fn raft_call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let res: Result<Resp, RaftError<TypeConfig>> = self.call(rpc, req, option.hard_ttl()).await?;
        res.map_err(|e| {
            RPCError::Unreachable(unreachable(format_args!("node {} answered: {e}", self.target)))
        })
    }
}

/// Process-wide counter that, with the time, names a snapshot transfer.
static TRANSFERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

type AppendResults<'s> =
    futures::stream::BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

/// Send times of the requests of one append stream still waiting for their results.
#[derive(Default)]
struct Outstanding {
    sent: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
    pushed: tokio::sync::Notify,
}

fn status_error(status: tonic::Status) -> RPCError<TypeConfig> {
    if status.code() == tonic::Code::Unavailable {
        RPCError::Unreachable(Unreachable::new(&status))
    } else {
        RPCError::Network(NetworkError::new(&status))
    }
}

impl PeerConnection {
    /// openraft's replication stream to this peer as one gRPC stream: requests go out as the
    /// stream yields them, without waiting for earlier results, and results come back in order.
    /// A result that has not come back within `soft_ttl` ends the stream with an error.
    async fn append_stream<S>(
        &mut self,
        input: S,
        option: RPCOption,
    ) -> Result<AppendResults<'static>, RPCError<TypeConfig>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let mut client = match &self.link {
            Ok((c, _)) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(unreachable(e))),
        };
        let group = self.group;
        let ttl = option.soft_ttl();
        let outstanding = Arc::new(Outstanding::default());
        // The request side ends when the result side does: hyper keeps sending a request body
        // after its response was dropped, and openraft's request stream must be released for the
        // next session (it shares the replication state with it).
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let requests = {
            let outstanding = outstanding.clone();
            let input = hold_commit_only(input, self.commit_hold);
            input.take_until(stop_rx).map(move |req| {
                outstanding
                    .sent
                    .lock()
                    .expect("outstanding lock")
                    .push_back(tokio::time::Instant::now());
                outstanding.pushed.notify_one();
                RaftRequest {
                    group,
                    // Serializing openraft's own serde types into a Vec does not fail; an empty
                    // payload would be refused by the peer and end the stream.
                    payload: postcard::to_stdvec(&req).unwrap_or_default().into(),
                }
            })
        };
        let replies = match tokio::time::timeout(ttl, client.append_stream(requests)).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&Msg(
                    "append stream open timed out".into(),
                ))));
            }
            Ok(Err(status)) => return Err(status_error(status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let target = self.target;
        let results = futures::stream::unfold(
            Some((replies, outstanding, stop_tx)),
            move |state| async move {
                let (mut replies, outstanding, stop_tx) = state?;
                loop {
                    let oldest = outstanding
                        .sent
                        .lock()
                        .expect("outstanding lock")
                        .front()
                        .copied();
                    let expired = async {
                        match oldest {
                            Some(t) => tokio::time::sleep_until(t + ttl).await,
                            None => outstanding.pushed.notified().await,
                        }
                    };
                    tokio::select! {
                        m = replies.message() => {
                            let item = match m {
                                Ok(None) => return None,
                                Err(status) => Err(status_error(status)),
                                Ok(Some(reply)) => {
                                    outstanding.sent.lock().expect("outstanding lock").pop_front();
                                    match postcard::from_bytes::<Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>>>(&reply.payload) {
                                        Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
                                        Ok(Err(fatal)) => Err(RPCError::Unreachable(unreachable(format_args!("node {target} answered: {fatal}")))),
                                        Ok(Ok(r)) => Ok(r),
                                    }
                                }
                            };
                            // The stream ends after an error or a refused append, as openraft expects.
                            let next = matches!(item, Ok(Ok(_))).then_some((replies, outstanding, stop_tx));
                            return Some((item, next));
                        }
                        () = expired => {
                            if oldest.is_some() {
                                let e = RPCError::Network(NetworkError::new(&Msg("append stream result timed out".into())));
                                return Some((Err(e), None));
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(results))
    }
}

/// The log position a follower matches after `req`: its last entry, or `prev_log_id`.
fn last_log_id(req: &AppendEntriesRequest<TypeConfig>) -> Option<crate::types::LogId> {
    req.entries.last().map(|e| e.log_id).or(req.prev_log_id)
}

/// openraft sends a follower an entry-less request as soon as the commit index moves, even when
/// the next entries are about to carry it (with one append in flight: every time). Each one
/// costs a message, a follower wake-up and a reply on every follower, and the leader sends them
/// just before it answers its client. This holds such a request — one with no entries whose
/// `prev_log_id` is where the previous request left the follower, so it carries nothing but the
/// commit index — for up to `hold`; a request that comes in that time replaces it (its commit
/// index is at least as new), and one that does not is sent when the time is up. The request
/// stream's first request, probes and anything carrying entries go out at once, and so do
/// heartbeats, which take another path. The follower learns a commit up to `hold` later; an
/// append is acknowledged at its commit on the leader, so no acknowledgement waits for this.
fn hold_commit_only<S>(
    input: S,
    hold: Duration,
) -> impl futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static
where
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    type Held = Option<(tokio::time::Instant, AppendEntriesRequest<TypeConfig>)>;
    struct State<S> {
        input: S,
        held: Held,
        /// Where the last request sent leaves the follower; `None` before the first.
        sent_upto: Option<Option<crate::types::LogId>>,
        ended: bool,
    }
    let state = State {
        input,
        held: None,
        sent_upto: None,
        ended: false,
    };
    Box::pin(futures::stream::unfold(state, move |mut st| async move {
        loop {
            if st.ended {
                return st.held.take().map(|(_, r)| (r, st));
            }
            let next = match &st.held {
                Some((deadline, _)) => {
                    let deadline = *deadline;
                    tokio::select! {
                        biased;
                        r = st.input.next() => Some(r),
                        () = tokio::time::sleep_until(deadline) => None,
                    }
                }
                None => Some(st.input.next().await),
            };
            match next {
                // The hold is over: send the commit.
                None => return st.held.take().map(|(_, r)| (r, st)),
                Some(None) => st.ended = true,
                Some(Some(req)) => {
                    let commit_only =
                        req.entries.is_empty() && st.sent_upto.as_ref() == Some(&req.prev_log_id);
                    if commit_only && !hold.is_zero() {
                        let deadline = match &st.held {
                            Some((d, _)) => *d,
                            None => tokio::time::Instant::now() + hold,
                        };
                        st.held = Some((deadline, req));
                        continue;
                    }
                    st.held = None;
                    st.sent_upto = Some(last_log_id(&req));
                    return Some((req, st));
                }
            }
        }
    }))
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = crate::types::SnapshotData;

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> futures::future::BoxFuture<'s, Result<AppendResults<'s>, RPCError<TypeConfig>>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        if self.heartbeat {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let results: AppendResults<'s> = self.append_stream(input, option).await?;
            Ok(results)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call(Rpc::Vote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let res: Result<TransferLeaderResponse<TypeConfig>, Fatal<TypeConfig>> =
            self.call(Rpc::TransferLeader, &req, option.hard_ttl()).await?;
        res.map_err(|e| {
            RPCError::Unreachable(unreachable(format_args!("node {} answered: {e}", self.target)))
        })
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let data = Bytes::from(snapshot.snapshot.into_inner());
        let chunk_size = option
            .snapshot_chunk_size()
            .unwrap_or(4 << 20)
            .clamp(1, GRPC_MESSAGE_BYTES_MAX / 2);
        let transfer = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (TRANSFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 48);
        let mut cancel = std::pin::pin!(cancel);
        let mut offset = 0usize;
        loop {
            if let Some(closed) = cancel.as_mut().now_or_never() {
                return Err(StreamingError::Closed(closed));
            }
            let end = (offset + chunk_size).min(data.len());
            let chunk = SnapshotChunk {
                vote,
                meta: snapshot.meta.clone(),
                transfer,
                offset: offset as u64,
                data: data.slice(offset..end),
                done: end == data.len(),
            };
            // Each chunk gets `install_snapshot_timeout`, as each InstallSnapshot call did in
            // openraft 0.9: a large snapshot takes many of them.
            let reply: SnapshotChunkReply = self
                .call(Rpc::InstallSnapshot, &chunk, option.hard_ttl())
                .await
                .map_err(|e| match e {
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    RPCError::Network(n) => StreamingError::Network(n),
                    RPCError::Timeout(t) => StreamingError::Timeout(t),
                    RPCError::RemoteError(r) => StreamingError::Unreachable(unreachable(r)),
                })?;
            match reply {
                Err(fatal) => {
                    return Err(StreamingError::Unreachable(unreachable(format_args!(
                        "node {} answered: {fatal}",
                        self.target
                    ))));
                }
                Ok(Some(resp)) => return Ok(resp),
                Ok(None) if chunk.done => {
                    return Err(StreamingError::Network(NetworkError::new(&Msg(
                        "snapshot's last chunk got no response".into(),
                    ))));
                }
                Ok(None) => offset = end,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{blank_ent, log_id};

    fn req(prev: Option<u64>, entries: &[u64], commit: Option<u64>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev.map(|i| log_id::<TypeConfig>(1, 1, i)),
            leader_commit: commit.map(|i| log_id::<TypeConfig>(1, 1, i)),
            entries: entries
                .iter()
                .map(|i| blank_ent::<TypeConfig>(1, 1, *i))
                .collect(),
        }
    }

    /// (prev index, entry count, commit index) of each request that went out.
    fn shape(r: &AppendEntriesRequest<TypeConfig>) -> (Option<u64>, usize, Option<u64>) {
        (
            r.prev_log_id.map(|l| l.index),
            r.entries.len(),
            r.leader_commit.map(|l| l.index),
        )
    }

    #[tokio::test]
    async fn a_commit_only_request_is_replaced_by_the_next_one_or_sent_when_its_hold_ends() {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = hold_commit_only(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            Duration::from_millis(200),
        );
        let mut out = Box::pin(out);
        // The first request goes out as it is, even without entries (a probe).
        tx.send(req(Some(4), &[], Some(3))).unwrap();
        assert_eq!(shape(&out.next().await.unwrap()), (Some(4), 0, Some(3)));
        tx.send(req(Some(4), &[5], Some(4))).unwrap();
        assert_eq!(shape(&out.next().await.unwrap()), (Some(4), 1, Some(4)));
        // Two commit-only requests, then entries: only the entries go out, with the newer commit.
        tx.send(req(Some(5), &[], Some(5))).unwrap();
        tx.send(req(Some(5), &[], Some(5))).unwrap();
        tx.send(req(Some(5), &[6, 7], Some(5))).unwrap();
        assert_eq!(shape(&out.next().await.unwrap()), (Some(5), 2, Some(5)));
        // A commit-only request with nothing after it goes out when its hold ends.
        let held_at = tokio::time::Instant::now();
        tx.send(req(Some(7), &[], Some(7))).unwrap();
        assert_eq!(shape(&out.next().await.unwrap()), (Some(7), 0, Some(7)));
        assert!(held_at.elapsed() >= Duration::from_millis(200));
        // An entry-less request that does not continue where the last one left the follower
        // (a probe after a conflict) is not held.
        let at = tokio::time::Instant::now();
        tx.send(req(Some(2), &[], Some(7))).unwrap();
        assert_eq!(shape(&out.next().await.unwrap()), (Some(2), 0, Some(7)));
        assert!(at.elapsed() < Duration::from_millis(200));
        // A held commit goes out when the input ends.
        tx.send(req(Some(2), &[], Some(8))).unwrap();
        drop(tx);
        assert_eq!(shape(&out.next().await.unwrap()), (Some(2), 0, Some(8)));
        assert!(out.next().await.is_none());
    }
}
