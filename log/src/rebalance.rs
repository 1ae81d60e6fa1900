//! Partition leadership goes back to each partition's preferred replica (placement's first) once
//! that replica can lead it well (decision 0019).
//!
//! Leaders start spread over the nodes: each group's preferred replica initialises it. A node
//! that stops loses its leads to the others, and nothing gave them back: after a restart a node
//! led nothing, and the survivors carried every partition's appends (each forwarded to them),
//! outcomes and downlinks for good. Now every `leader_rebalance_ms` a node looks at the
//! partitions it is the preferred replica of and, for each one it does not lead whose leader it
//! knows, asks that leader for the lead — only once its log replica is not recovering and the
//! application above the log (the engine's shard of the partition) has said it is ready at two
//! checks in a row: a shard still taking its state from a peer, or far behind its log, leads
//! badly (it proposes no outcomes until it has caught up). The leader hands the lead over
//! (openraft's `transfer_leader`) only if the asker is the partition's preferred replica and its
//! log is within `LAG_MAX` entries of its own. A node that was handed a lead and does not hold it
//! at its next checks (it lost the election, or lost the lead again) waits before it asks again,
//! 5 s doubling to 5 min, so that a slow replica cannot take its partition through election
//! after election.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};

use tokio::time::Instant;

use crate::node::{AppHandler, Inner, LogHandle};
use crate::types::{NodeId, partition_group};

/// The application message kind of lead requests (kinds 0 and 1 are the engine's).
pub const LEAD_KIND: u32 = 2;

/// Whether the application above the log is ready to lead a partition on this node.
pub type LeadReady = Arc<dyn Fn(u32) -> bool + Send + Sync>;

/// Entries a replica's log may be behind the leader's and still be handed the lead: the leader
/// proposes nothing once it hands over, and openraft has the target wait for the rest.
pub(crate) const LAG_MAX: u64 = 256;

/// The first wait after a hand-over this node did not keep; doubled each time, up to the second.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Leading a partition this long without a break clears its wait.
const KEPT: Duration = Duration::from_secs(300);

/// How long a lead request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A preferred replica asking a partition's leader for the lead.
#[derive(Debug, Serialize, Deserialize)]
struct LeadRequest {
    partition: u32,
    from: NodeId,
}

/// Runs until shutdown: asks for the lead of the partitions this node is the preferred replica
/// of, as the module says.
pub(crate) async fn run(h: LogHandle) {
    let every = Duration::from_millis(h.config().leader_rebalance_ms);
    if every.is_zero() || h.member_ids().len() < 2 {
        return;
    }
    let me = h.node_id();
    let mut stop = h.inner.shutdown.subscribe();
    // Partitions whose shard was ready at the previous check.
    let mut was_ready: HashSet<u32> = HashSet::new();
    // Per partition handed over to this node: not before when it asks again, and the wait after.
    let mut retry: HashMap<u32, (Instant, Duration)> = HashMap::new();
    // Per partition this node leads: since when, without a break.
    let mut leading_since: HashMap<u32, Instant> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let ready = h.inner.lead_ready.read().expect("lead ready lock").clone();
        let mut now_ready = HashSet::new();
        for p in 0..h.partitions() {
            let Some(g) = h.group(partition_group(p)) else {
                continue;
            };
            if g.replicas.first() != Some(&me) || g.recovering.load(Ordering::SeqCst) {
                continue;
            }
            if h.leader_term(p).is_some() {
                let since = *leading_since.entry(p).or_insert_with(Instant::now);
                if since.elapsed() >= KEPT {
                    retry.remove(&p);
                }
                continue;
            }
            leading_since.remove(&p);
            let leader = {
                let m = g.raft.metrics();
                let m = m.borrow_watched();
                (m.state == ServerState::Follower)
                    .then_some(m.current_leader)
                    .flatten()
                    .filter(|l| *l != me)
            };
            let Some(leader) = leader else { continue };
            if !ready.as_ref().is_none_or(|f| f(p)) {
                continue;
            }
            now_ready.insert(p);
            if !was_ready.contains(&p) || retry.get(&p).is_some_and(|(at, _)| Instant::now() < *at) {
                continue;
            }
            let body = match postcard::to_stdvec(&LeadRequest {
                partition: p,
                from: me,
            }) {
                Ok(b) => Bytes::from(b),
                Err(_) => continue,
            };
            match h.call_app(leader, LEAD_KIND, body, REQUEST_TIMEOUT).await {
                Ok(r) if r.first() == Some(&1) => {
                    let wait = retry
                        .get(&p)
                        .map_or(RETRY_FIRST, |(_, w)| (*w * 2).min(RETRY_MAX));
                    retry.insert(p, (Instant::now() + wait, wait));
                    tracing::info!(
                        partition = p,
                        from = leader,
                        "taking back the lead of a partition this node is the preferred replica of"
                    );
                }
                Ok(_) => tracing::debug!(partition = p, leader, "lead not handed over yet"),
                Err(e) => tracing::debug!(partition = p, leader, error = %e, "lead request failed"),
            }
        }
        was_ready = now_ready;
    }
}

/// The leader's side: hands the lead of a partition it leads to the replica asking, if that is
/// the partition's preferred replica and its log is close enough to its own. Answers `[1]` when it
/// handed the lead over, `[0]` when it did not (not the leader, asker too far behind). Holds the
/// node weakly: the handler lives in the node it refers to.
pub(crate) fn handler(h: &LogHandle) -> AppHandler {
    let node: Weak<Inner> = Arc::downgrade(&h.inner);
    Arc::new(move |body: Bytes| {
        let node = node.clone();
        Box::pin(async move {
            let h = LogHandle {
                inner: node.upgrade().ok_or("the node is stopping")?,
            };
            let req: LeadRequest =
                postcard::from_bytes(&body).map_err(|e| format!("malformed lead request: {e}"))?;
            let g = h
                .group(partition_group(req.partition))
                .ok_or_else(|| format!("no replica of partition {} here", req.partition))?;
            if g.replicas.first() != Some(&req.from) {
                return Err(format!(
                    "node {} is not the preferred replica of partition {}",
                    req.from, req.partition
                ));
            }
            let handed = h
                .transfer_leader(req.partition, req.from)
                .await
                .map_err(|e| e.to_string())?;
            if handed {
                tracing::info!(
                    partition = req.partition,
                    to = req.from,
                    "handing the lead of a partition to its preferred replica"
                );
            }
            Ok(Bytes::from_static(if handed { &[1] } else { &[0] }))
        })
    })
}
