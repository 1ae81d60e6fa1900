//! Appends to another node on its `AppendStream`: one stream per node, many appends in flight on
//! it, answered in order. Cheaper per append than unary `Append` calls (no HTTP/2 stream, no
//! server task and no client buffer hop per call: BENCHMARKS.md, twelfth log run). Used by
//! [`crate::LogClient`] and by nodes forwarding appends to a partition's leader.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use thingraft_proto::v1::log_client::LogClient as GrpcLogClient;
use thingraft_proto::v1::{self as pb};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

use crate::error::LogError;
use crate::node::FORWARDED;
use crate::types::NodeId;

type Reply = Result<pb::AppendStreamReply, Status>;
/// Open streams by node id and address.
type Open = HashMap<(NodeId, String), Arc<Mutex<Pipe>>>;

/// One open `AppendStream`: requests go out through `tx`; replies come back in order and go to
/// `waiting` in order.
struct Pipe {
    tx: mpsc::UnboundedSender<pb::AppendRequest>,
    waiting: VecDeque<oneshot::Sender<Reply>>,
    closed: bool,
}

/// The `AppendStream`s of one client (or node) to the nodes it appends to; a stream is opened at
/// the first append to a node and again after it ended.
pub(crate) struct Pipes {
    open: Mutex<Open>,
    /// Marks the streams as carrying appends forwarded by a node (the peer must not forward
    /// them again).
    forwarded: bool,
}

impl Pipes {
    pub fn new(forwarded: bool) -> Pipes {
        Pipes {
            open: Mutex::new(HashMap::new()),
            forwarded,
        }
    }

    /// Sends `req` on the stream to node `id` at `addr` (opened with `client` if there is none)
    /// and waits for its reply. `Err` is the stream's end: a connection never made (nothing was
    /// sent) or one lost with the append out (its outcome unknown), as a unary call would have
    /// failed; [`LogError::from_status`] tells them apart.
    pub async fn append(
        &self,
        id: NodeId,
        addr: &str,
        client: impl FnOnce() -> Result<GrpcLogClient<Channel>, LogError>,
        req: pb::AppendRequest,
    ) -> Reply {
        let (tx, rx) = oneshot::channel();
        {
            let mut open = self.open.lock().expect("pipes lock");
            let key = (id, addr.to_string());
            let live = open
                .get(&key)
                .filter(|p| !p.lock().expect("pipe lock").closed)
                .cloned();
            let pipe = match live {
                Some(p) => p,
                None => {
                    let p = open_pipe(client().map_err(Status::from)?, self.forwarded);
                    open.insert(key, p.clone());
                    p
                }
            };
            // Under the lock the stream's end takes too: either the request is queued before the
            // end fails every waiting one, or the pipe is seen closed here.
            let mut p = pipe.lock().expect("pipe lock");
            if p.closed {
                // Its connection failed at once (a broken one is replaced above): nothing was sent.
                return Err(Status::unavailable(
                    "append stream closed before the append was sent (error trying to connect)",
                ));
            }
            p.waiting.push_back(tx);
            let _ = p.tx.send(req);
        }
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("append stream closed")))
    }
}

fn open_pipe(mut client: GrpcLogClient<Channel>, forwarded: bool) -> Arc<Mutex<Pipe>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let pipe = Arc::new(Mutex::new(Pipe {
        tx,
        waiting: VecDeque::new(),
        closed: false,
    }));
    // The task holds the pipe weakly: once its owner is gone, the request stream ends, and with
    // it the reply stream and the task.
    let weak: Weak<Mutex<Pipe>> = Arc::downgrade(&pipe);
    tokio::spawn(async move {
        let mut req = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if forwarded {
            req.metadata_mut()
                .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        }
        let end = match client.append_stream(req).await {
            Err(s) => s,
            Ok(replies) => {
                let mut replies = replies.into_inner();
                loop {
                    match replies.message().await {
                        Ok(Some(r)) => {
                            let Some(pipe) = weak.upgrade() else { return };
                            let w = pipe.lock().expect("pipe lock").waiting.pop_front();
                            match w {
                                Some(w) => {
                                    let _ = w.send(Ok(r));
                                }
                                None => break Status::internal("an append stream reply to no append"),
                            }
                        }
                        Ok(None) => break Status::unavailable("append stream ended"),
                        Err(s) => break s,
                    }
                }
            }
        };
        let Some(pipe) = weak.upgrade() else { return };
        let waiting = {
            let mut p = pipe.lock().expect("pipe lock");
            p.closed = true;
            std::mem::take(&mut p.waiting)
        };
        for w in waiting {
            let _ = w.send(Err(end.clone()));
        }
    });
    pipe
}
