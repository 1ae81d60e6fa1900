//! Downlinks across the cluster: a partition's leader hands a [`Deliver`] to the sessions of
//! this node's transports and, through the log's application messages, to every peer's.
//!
//! Broadcasting keeps no session directory to go stale: downlinks (RPCs, attribute pushes) are
//! rare next to telemetry, and a cluster has few nodes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use thingraft_engine::Downlinks;
use thingraft_log::LogHandle;
use thingraft_proto::records::Deliver;
use thingraft_transport_common::Hub;

const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// The log's application message kind of downlink deliveries.
const APP_KIND: u32 = 0;

pub struct ClusterDownlinks {
    pub log: LogHandle,
    /// This node's device sessions, of every transport.
    pub hub: Arc<Hub>,
}

impl ClusterDownlinks {
    /// Answers peers' deliveries with this node's sessions.
    pub fn install(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        self.log.set_app_handler(
            APP_KIND,
            Arc::new(move |body: Bytes| {
                let this = this.clone();
                Box::pin(async move {
                    let d = Deliver::decode(&body).map_err(|e| e.to_string())?;
                    let n = this.upgrade().map(|t| t.hub.deliver(&d)).unwrap_or(0);
                    Ok(Bytes::copy_from_slice(&n.to_be_bytes()))
                })
            }),
        );
    }
}

impl Downlinks for ClusterDownlinks {
    fn deliver(&self, node: Option<u64>, d: Deliver) -> BoxFuture<'static, u32> {
        let me = self.log.node_id();
        let local = if node.is_none_or(|n| n == me) {
            self.hub.deliver(&d)
        } else {
            0
        };
        let peers: Vec<u64> = self
            .log
            .member_ids()
            .into_iter()
            .filter(|id| *id != me && node.is_none_or(|n| n == *id))
            .collect();
        let log = self.log.clone();
        let body = Bytes::from(d.encode());
        Box::pin(async move {
            let calls = peers.into_iter().map(|id| {
                let log = log.clone();
                let body = body.clone();
                async move {
                    match log.call_app(id, APP_KIND, body, PEER_TIMEOUT).await {
                        Ok(b) if b.len() == 4 => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                        Ok(_) => 0,
                        Err(e) => {
                            tracing::debug!(node = id, error = %e, "downlink not delivered to peer");
                            0
                        }
                    }
                }
            });
            local + futures::future::join_all(calls).await.into_iter().sum::<u32>()
        })
    }
}
