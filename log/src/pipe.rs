//! Appends to another node on its `AppendStream`: one stream per node, many appends in flight on
//! it, answered in order. Cheaper per append than unary `Append` calls (no HTTP/2 stream, no
//! server task and no client buffer hop per call: BENCHMARKS.md, twelfth log run). Used by
//! [`crate::LogClient`] and by nodes forwarding appends to a partition's leader.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

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

/// One open `AppendStream`: requests go out through `tx`; replies come back in order and go to
/// `waiting` in order. Dropping it ends the request side; the replies still due are delivered.
struct Pipe {
    /// The address it was opened to.
    addr: String,
    tx: mpsc::UnboundedSender<pb::AppendRequest>,
    waiting: Arc<Mutex<Waiting>>,
}

/// The appends on a stream waiting for their replies, held by the stream's task.
#[derive(Default)]
struct Waiting {
    queue: VecDeque<oneshot::Sender<Reply>>,
    closed: bool,
}

/// The `AppendStream`s of one client (or node) to the nodes it appends to; a stream is opened at
/// the first append to a node and again after it ended.
pub(crate) struct Pipes {
    open: Mutex<HashMap<NodeId, Pipe>>,
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
            // A node's stream is replaced when it ended or the node moved to another address.
            let live = open
                .get(&id)
                .is_some_and(|p| p.addr == addr && !p.waiting.lock().expect("pipe lock").closed);
            if !live {
                let client = client().map_err(Status::from)?;
                open.insert(id, open_pipe(client, addr, self.forwarded));
            }
            let pipe = open.get(&id).expect("just checked or inserted");
            // Under the lock the stream's end takes too: either the request is queued before the
            // end fails every waiting one, or the pipe is seen closed here.
            let mut w = pipe.waiting.lock().expect("pipe lock");
            if w.closed {
                // Its connection failed at once (a broken one is replaced above): nothing was sent.
                return Err(Status::unavailable(
                    "append stream closed before the append was sent (error trying to connect)",
                ));
            }
            w.queue.push_back(tx);
            let _ = pipe.tx.send(req);
        }
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("append stream closed")))
    }
}

fn open_pipe(mut client: GrpcLogClient<Channel>, addr: &str, forwarded: bool) -> Pipe {
    let (tx, rx) = mpsc::unbounded_channel();
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    // The task holds what waits, not the sender: once the pipe is dropped, the request stream
    // ends, the peer answers what it has, and then the reply stream and the task end.
    let w = waiting.clone();
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
                            let next = w.lock().expect("pipe lock").queue.pop_front();
                            match next {
                                Some(n) => {
                                    let _ = n.send(Ok(r));
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
        let waiting = {
            let mut w = w.lock().expect("pipe lock");
            w.closed = true;
            std::mem::take(&mut w.queue)
        };
        for n in waiting {
            let _ = n.send(Err(end.clone()));
        }
    });
    Pipe {
        addr: addr.to_string(),
        tx,
        waiting,
    }
}
