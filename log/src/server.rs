//! The node's gRPC server: the `Raft` transport between nodes and the `Log` API.
//!
//! Every request is checked before it reaches a Raft group: an unknown group, an undecodable
//! payload or an invalid append gets a gRPC error and a log line, and changes nothing.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::Serialize;
use thingraft_proto::v1::log_server::{Log, LogServer};
use thingraft_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use thingraft_proto::v1::{self as pb};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::network::{GRPC_MESSAGE_BYTES_MAX, SnapshotChunk, SnapshotChunkReply};
use std::sync::{Arc, Weak};

use crate::node::{FORWARDED, Group, Inner, LogHandle};
use crate::types::{Record, Snapshot, TypeConfig};

/// Both services, ready to serve.
/// The services hold the node weakly: connections that outlive a shutdown must not keep its
/// storage open.
pub fn router(handle: LogHandle) -> tonic::transport::server::Router {
    let node = NodeRef(Arc::downgrade(&handle.inner));
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // A peer that vanishes without closing its connection (its host died) must not keep
        // replication streams and their openraft tasks open until TCP gives up.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .initial_connection_window_size(8 << 20)
        .initial_stream_window_size(4 << 20)
        .add_service(
            RaftServer::new(RaftService { node: node.clone() })
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            LogServer::new(LogService { node })
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
}

#[derive(Clone)]
struct NodeRef(Weak<Inner>);

impl NodeRef {
    fn handle(&self) -> Result<LogHandle, Status> {
        self.0
            .upgrade()
            .map(|inner| LogHandle { inner })
            .ok_or_else(|| Status::unavailable("node is shutting down"))
    }
}

struct RaftService {
    node: NodeRef,
}

/// Most calls one `AppendEntriesBatch` may carry (one per group, at most).
pub const BATCH_CALLS_MAX: usize = 4097;

impl RaftService {
    fn group(&self, gid: u32) -> Result<Arc<Group>, Status> {
        self.node.handle()?.group(gid).cloned().ok_or_else(|| {
            tracing::warn!(group = gid, "raft rpc for a group this node does not host");
            Status::not_found(format!("group {gid} is not hosted on this node"))
        })
    }
}

fn decode<T: for<'de> serde::Deserialize<'de>>(what: &str, gid: u32, payload: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(payload).map_err(|e| {
        tracing::warn!(group = gid, error = %e, "malformed {what} rpc rejected");
        Status::invalid_argument(format!("malformed {what} payload: {e}"))
    })
}

fn reply<T: Serialize>(res: &T) -> Result<Response<pb::RaftReply>, Status> {
    let payload = postcard::to_stdvec(res).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftReply {
        payload: payload.into(),
    }))
}

/// Largest snapshot a follower buffers while receiving it.
const SNAPSHOT_BYTES_MAX: u64 = 8 << 30;

impl RaftService {
    /// Adds one chunk to the group's snapshot being received; installs it with the last one.
    async fn snapshot_chunk(&self, g: &Group, chunk: SnapshotChunk) -> Result<SnapshotChunkReply, Status> {
        let gid = g.id;
        // openraft panics (or debug-asserts) on a snapshot that no protocol-following leader
        // sends: refuse those here, before they reach it.
        if !chunk.vote.is_committed() {
            tracing::warn!(
                group = gid,
                "snapshot from a vote that is not a leader's rejected"
            );
            return Err(Status::invalid_argument(
                "snapshot sender's vote is not committed",
            ));
        }
        if chunk
            .meta
            .last_log_id
            .is_some_and(|l| l.leader_id > *chunk.vote.leader_id())
        {
            tracing::warn!(group = gid, "snapshot beyond its sender's vote rejected");
            return Err(Status::invalid_argument("snapshot is beyond the sender's vote"));
        }
        let data = {
            let mut rx = g.snapshot_rx.lock().expect("snapshot receive lock");
            let fresh = chunk.offset == 0;
            match rx.as_mut() {
                Some((t, buf)) if *t == chunk.transfer && buf.len() as u64 == chunk.offset => {
                    buf.extend_from_slice(&chunk.data);
                }
                _ if fresh => *rx = Some((chunk.transfer, chunk.data.to_vec())),
                current => {
                    tracing::warn!(
                        group = gid,
                        offset = chunk.offset,
                        "snapshot chunk out of order rejected"
                    );
                    // A broken transfer is dropped; another sender's transfer in progress is not.
                    if current.is_some_and(|(t, _)| *t == chunk.transfer) {
                        *rx = None;
                    }
                    return Err(Status::failed_precondition("snapshot chunk out of order"));
                }
            }
            if rx
                .as_ref()
                .is_some_and(|(_, b)| b.len() as u64 > SNAPSHOT_BYTES_MAX)
            {
                *rx = None;
                tracing::warn!(group = gid, "oversized snapshot rejected");
                return Err(Status::resource_exhausted("snapshot too large"));
            }
            if !chunk.done {
                return Ok(Ok(None));
            }
            rx.take().map(|(_, b)| b).unwrap_or_default()
        };
        if let Err(e) = crate::storage::validate_snapshot_payload(&data) {
            tracing::warn!(group = gid, error = %e, "undecodable snapshot rejected");
            return Err(Status::invalid_argument(format!("snapshot does not decode: {e}")));
        }
        // Best effort against the other panic (the metrics may trail the core a little): a
        // snapshot newer than the local commit must also be at a greater index.
        let committed =
            openraft::async_runtime::WatchReceiver::borrow_watched(&g.raft.metrics()).local_committed;
        if let (Some(c), Some(s)) = (committed, chunk.meta.last_log_id)
            && s > c
            && s.index <= c.index
        {
            tracing::warn!(group = gid, "snapshot contradicting the local commit rejected");
            return Err(Status::invalid_argument("snapshot contradicts committed entries"));
        }
        let snapshot = Snapshot {
            meta: chunk.meta,
            snapshot: std::io::Cursor::new(data),
        };
        let bytes = snapshot.snapshot.get_ref().len();
        let res = g.raft.install_full_snapshot(chunk.vote, snapshot).await;
        tracing::info!(
            group = gid,
            bytes,
            ok = res.is_ok(),
            "snapshot received from the leader"
        );
        Ok(res.map(Some))
    }

    async fn append_one(&self, r: pb::RaftRequest) -> Result<Response<pb::RaftReply>, Status> {
        let g = self.group(r.group)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode("append_entries", r.group, &r.payload)?;
        reply(&g.raft.append_entries(rpc).await)
    }
}

type AppendStreamReplies = Pin<Box<dyn Stream<Item = Result<pb::RaftReply, Status>> + Send>>;

fn failed_stream(s: Status) -> AppendStreamReplies {
    Box::pin(futures::stream::once(std::future::ready(Err(s))))
}

impl RaftService {
    /// One group's replication stream from its leader: every request goes to openraft as it
    /// arrives; the results go back in order. A request for another group or one that does not
    /// decode ends the stream with `InvalidArgument` after the results before it.
    async fn open_append_stream(&self, mut input: tonic::Streaming<pb::RaftRequest>) -> AppendStreamReplies {
        let first = match input.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Box::pin(futures::stream::empty()),
            Err(s) => return failed_stream(s),
        };
        let gid = first.group;
        let g = match self.group(gid) {
            Ok(g) => g,
            Err(s) => return failed_stream(s),
        };
        let first: AppendEntriesRequest<TypeConfig> = match decode("append_stream", gid, &first.payload) {
            Ok(r) => r,
            Err(s) => return failed_stream(s),
        };
        let failed: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let rest = {
            let failed = failed.clone();
            input.scan((), move |(), m| {
                let r = match m {
                    Ok(m) if m.group == gid => decode("append_stream", gid, &m.payload),
                    Ok(m) => {
                        tracing::warn!(
                            group = gid,
                            other = m.group,
                            "append stream switched groups; closed"
                        );
                        Err(Status::invalid_argument("an append stream carries one group"))
                    }
                    Err(s) => Err(s),
                };
                std::future::ready(match r {
                    Ok(req) => Some(req),
                    Err(s) => {
                        *failed.lock().expect("append stream lock") = Some(s);
                        None
                    }
                })
            })
        };
        let requests = futures::stream::once(std::future::ready(first)).chain(rest);
        let results = g
            .raft
            .stream_append(requests)
            .map(|r| reply(&r).map(Response::into_inner));
        let end = futures::stream::once(async move { failed.lock().expect("append stream lock").take() })
            .filter_map(|s| std::future::ready(s.map(Err)));
        Box::pin(results.chain(end))
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    type AppendStreamStream = AppendStreamReplies;

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<pb::RaftRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        // Answer the stream's headers at once; the group is known from its first request.
        let svc = RaftService {
            node: self.node.clone(),
        };
        let input = req.into_inner();
        let replies = futures::stream::once(async move { svc.open_append_stream(input).await }).flatten();
        Ok(Response::new(Box::pin(replies)))
    }

    async fn append_entries_batch(
        &self,
        req: Request<pb::RaftBatchRequest>,
    ) -> Result<Response<pb::RaftBatchReply>, Status> {
        let calls = req.into_inner().calls;
        if calls.len() > BATCH_CALLS_MAX {
            tracing::warn!(calls = calls.len(), "oversized raft batch rejected");
            return Err(Status::invalid_argument(format!(
                "more than {BATCH_CALLS_MAX} calls in one batch"
            )));
        }
        // Groups are independent: run their calls concurrently, answer in request order.
        let results = futures::future::join_all(calls.into_iter().map(|c| self.append_one(c))).await;
        let results = results
            .into_iter()
            .map(|r| match r {
                Ok(reply) => pb::RaftCallResult {
                    reply: Some(reply.into_inner()),
                    code: 0,
                    message: String::new(),
                },
                Err(s) => pb::RaftCallResult {
                    reply: None,
                    code: s.code() as i32,
                    message: s.message().to_string(),
                },
            })
            .collect();
        Ok(Response::new(pb::RaftBatchReply { results }))
    }

    async fn append_entries(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        self.append_one(req.into_inner()).await
    }

    async fn vote(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let r = req.into_inner();
        let g = self.group(r.group)?;
        let rpc: VoteRequest<TypeConfig> = decode("vote", r.group, &r.payload)?;
        if g.recovering.load(Ordering::SeqCst) && !g.may_vote_while_recovering(&rpc) {
            // This replica lost its data: it may not vote until its log has caught up, or it
            // could elect a leader that lacks committed entries.
            return Err(Status::unavailable("replica is recovering; not voting"));
        }
        reply(&g.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let r = req.into_inner();
        let g = self.group(r.group)?;
        let chunk: SnapshotChunk = decode("install_snapshot", r.group, &r.payload)?;
        reply(&self.snapshot_chunk(&g, chunk).await?)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let r = req.into_inner();
        let g = self.group(r.group)?;
        let rpc: TransferLeaderRequest<TypeConfig> = decode("transfer_leader", r.group, &r.payload)?;
        // On the target, openraft waits for its log to hold the leader's last entry first.
        reply(&g.raft.handle_transfer_leader(rpc).await)
    }
}

struct LogService {
    node: NodeRef,
}

type ReadReplyStream = Pin<Box<dyn Stream<Item = Result<pb::ReadReply, Status>> + Send>>;

fn read_reply(r: crate::node::ReadResult) -> pb::ReadReply {
    pb::ReadReply {
        records: r
            .records
            .into_iter()
            .map(|x| pb::LogRecord {
                offset: x.offset,
                key: x.key,
                value: x.value,
                timestamp_ms: x.timestamp_ms,
            })
            .collect(),
        next_offset: r.next_offset,
        start_offset: r.start_offset,
    }
}

#[tonic::async_trait]
impl Log for LogService {
    async fn append(&self, req: Request<pb::AppendRequest>) -> Result<Response<pb::AppendReply>, Status> {
        let forwarded = req.metadata().contains_key(FORWARDED);
        let r = req.into_inner();
        let records = records_of(r.records);
        match self
            .node
            .handle()?
            .append_inner(r.partition, records, !forwarded)
            .await
        {
            Ok(a) => Ok(Response::new(pb::AppendReply {
                first_offset: a.first_offset,
                count: a.count,
            })),
            Err(e) => {
                if !e.retriable() {
                    tracing::info!(partition = r.partition, error = %e, "append rejected");
                }
                Err(e.into())
            }
        }
    }

    type AppendStreamStream = Pin<Box<dyn Stream<Item = Result<pb::AppendStreamReply, Status>> + Send>>;

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<pb::AppendRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let forwarded = req.metadata().contains_key(FORWARDED);
        let node = self.node.clone();
        // Each append is handed to its partition's batcher as it is read (in stream order), and
        // answered in that order; `buffered` bounds how many wait. The task serving the stream
        // drives all of it: no task per append.
        let replies = req
            .into_inner()
            .map(
                move |m| -> futures::future::BoxFuture<'static, Result<pb::AppendStreamReply, Status>> {
                    let (r, handle) = match m.and_then(|r| Ok((r, node.handle()?))) {
                        Ok(x) => x,
                        // Ends the stream with this status, after the replies before it.
                        Err(s) => return Box::pin(std::future::ready(Err(s))),
                    };
                    let partition = r.partition;
                    let appended = handle.append_pipelined(partition, records_of(r.records), !forwarded);
                    Box::pin(async move { Ok(stream_reply(partition, appended.await)) })
                },
            )
            .buffered(APPEND_STREAM_INFLIGHT_MAX);
        Ok(Response::new(Box::pin(replies)))
    }

    async fn app(&self, req: Request<pb::AppRequest>) -> Result<Response<pb::AppReply>, Status> {
        let req = req.into_inner();
        let h = self
            .node
            .handle()?
            .app_handler(req.kind)
            .ok_or_else(|| Status::unavailable(format!("no application handles kind {}", req.kind)))?;
        match h(req.body).await {
            Ok(body) => Ok(Response::new(pb::AppReply { body })),
            Err(e) => {
                tracing::info!(error = %e, "application message refused");
                Err(Status::invalid_argument(e))
            }
        }
    }

    async fn meta_write(
        &self,
        req: Request<pb::MetaWriteRequest>,
    ) -> Result<Response<pb::MetaWriteReply>, Status> {
        let forwarded = req.metadata().contains_key(FORWARDED);
        let txn: crate::types::MetaTxn = postcard::from_bytes(&req.into_inner().txn).map_err(|e| {
            tracing::info!(error = %e, "malformed metadata transaction rejected");
            Status::invalid_argument(format!("malformed metadata transaction: {e}"))
        })?;
        let r = self.node.handle()?.meta_txn_inner(txn, !forwarded).await?;
        Ok(Response::new(pb::MetaWriteReply {
            applied: r.applied,
            failed_check: r.failed_check,
            index: r.index,
        }))
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let r = req.into_inner();
        let max = if r.max_records == 0 {
            1000
        } else {
            r.max_records.min(100_000)
        } as usize;
        let res = self
            .node
            .handle()?
            .read(r.partition, r.from_offset, max)
            .map_err(|e| {
                tracing::info!(partition = r.partition, error = %e, "read rejected");
                Status::from(e)
            })?;
        Ok(Response::new(read_reply(res)))
    }

    type TailStream = ReadReplyStream;

    async fn tail(&self, req: Request<pb::TailRequest>) -> Result<Response<ReadReplyStream>, Status> {
        let r = req.into_inner();
        let mut rx = self
            .node
            .handle()?
            .tail(r.partition, r.from_offset)
            .map_err(Status::from)?;
        let stream = async_stream(move |tx| async move {
            loop {
                let item = tokio::select! {
                    item = rx.recv() => item,
                    // The client went away: stop reading for it (`recv` is cancel-safe).
                    () = tx.closed() => return,
                };
                let Some(item) = item else { return };
                if tx.send(item.map(read_reply).map_err(Status::from)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(self.node.handle()?.status()))
    }
}

/// Appends of one `AppendStream` waiting for their commit at most (the proto says so).
const APPEND_STREAM_INFLIGHT_MAX: usize = 4096;

fn records_of(records: Vec<pb::Record>) -> Vec<Record> {
    records
        .into_iter()
        .map(|x| Record {
            key: x.key,
            value: x.value,
        })
        .collect()
}

/// One append's answer on an `AppendStream`: what a unary `Append` would have answered.
fn stream_reply(partition: u32, r: Result<crate::Appended, crate::LogError>) -> pb::AppendStreamReply {
    match r {
        Ok(a) => pb::AppendStreamReply {
            first_offset: a.first_offset,
            count: a.count,
            ..Default::default()
        },
        Err(e) => {
            if !e.retriable() {
                tracing::info!(partition, error = %e, "append rejected");
            }
            let s = Status::from(e);
            pb::AppendStreamReply {
                error_code: s.code() as i32,
                error_message: s.message().to_string(),
                leader_hint: s
                    .metadata()
                    .get(crate::error::LEADER_HINT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                ..Default::default()
            }
        }
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<T, F, Fut>(f: F) -> impl Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
