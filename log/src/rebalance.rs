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
//!
//! The other way round (decision 0020): a node leads a partition its application is not running
//! — the engine's shard failed and backs off, or takes its state from a peer — and has found it
//! down at every check for `HAND_OFF_AFTER`. It then asks the partition's other replicas, preferred one
//! first, whether they are ready (application messages of kind `READY_KIND`) and hands the lead to
//! the first that is, if its log is close enough. Without a ready replica the lead stays. A
//! preferred replica that handed its lead away waits before asking for it back, as after a lead it
//! did not keep.

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

/// The application message kind of readiness questions: is the asked node ready to lead a
/// partition (its replica not recovering, its application ready)? Answers `[1]` or `[0]`.
pub const READY_KIND: u32 = 3;

/// A leader whose application has been down at every check for this long hands the lead to a
/// replica that is ready (decision 0020). Longer than a shard's first back-offs after a failure
/// (0.5, 1, 2, 4 s). A leader that is only behind (catching up, overloaded) keeps its lead: its
/// replicas are as loaded, and moving the lead would make it churn.
const HAND_OFF_AFTER: Duration = Duration::from_secs(10);

/// After a hand-off attempt (made or not), the next one waits at least this long.
const HAND_OFF_AGAIN: Duration = Duration::from_secs(5);

/// How ready the application above the log is to lead a partition on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Not running it: failed and backing off, taking its state from a peer, or not started.
    Down,
    /// Running it, but too far behind the log's end to lead it well (catching up, overloaded).
    Behind,
    /// Running it and close to the log's end.
    Ready,
}

/// The application's [`Readiness`] for a partition on this node.
pub type LeadReady = Arc<dyn Fn(u32) -> Readiness + Send + Sync>;

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
    // Per partition this node leads: since when its application has been down at every check.
    let mut down_since: HashMap<u32, Instant> = HashMap::new();
    // Per partition: no hand-off attempt before then.
    let mut hand_off_at: HashMap<u32, Instant> = HashMap::new();
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
            let readiness = ready.as_ref().map_or(Readiness::Ready, |f| f(p));
            let preferred = g.replicas.first() == Some(&me);
            if h.leader_term(p).is_some() {
                if readiness != Readiness::Down {
                    down_since.remove(&p);
                } else {
                    let since = *down_since.entry(p).or_insert_with(Instant::now);
                    if since.elapsed() >= HAND_OFF_AFTER
                        && hand_off_at.get(&p).is_none_or(|at| Instant::now() >= *at)
                    {
                        hand_off_at.insert(p, Instant::now() + HAND_OFF_AGAIN);
                        if let Some(to) = hand_off(&h, &g.replicas, p).await {
                            tracing::warn!(
                                partition = p,
                                to,
                                down_s = since.elapsed().as_secs(),
                                "handing the lead of a partition to a ready replica: this node's \
                                 engine has not been running it"
                            );
                            // `down_since` stays: should the hand-over not complete, the next
                            // attempt comes after `HAND_OFF_AGAIN`, not after another full wait.
                            leading_since.remove(&p);
                            if preferred {
                                let wait = retry
                                    .get(&p)
                                    .map_or(RETRY_FIRST, |(_, w)| (*w * 2).min(RETRY_MAX));
                                retry.insert(p, (Instant::now() + wait, wait));
                            }
                            continue;
                        }
                    }
                }
                if preferred {
                    let since = *leading_since.entry(p).or_insert_with(Instant::now);
                    if since.elapsed() >= KEPT {
                        retry.remove(&p);
                    }
                }
                continue;
            }
            down_since.remove(&p);
            leading_since.remove(&p);
            if !preferred || g.recovering.load(Ordering::SeqCst) {
                continue;
            }
            let leader = {
                let m = g.raft.metrics();
                let m = m.borrow_watched();
                (m.state == ServerState::Follower)
                    .then_some(m.current_leader)
                    .flatten()
                    .filter(|l| *l != me)
            };
            let Some(leader) = leader else { continue };
            if readiness != Readiness::Ready {
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

/// Asks `replicas` (this node left out, in order) whether they are ready to lead `partition` and
/// hands the lead to the first that is and whose log is close enough; the node it went to.
async fn hand_off(h: &LogHandle, replicas: &[NodeId], partition: u32) -> Option<NodeId> {
    let body = Bytes::from(postcard::to_stdvec(&partition).ok()?);
    for &to in replicas.iter().filter(|n| **n != h.node_id()) {
        match h.call_app(to, READY_KIND, body.clone(), REQUEST_TIMEOUT).await {
            Ok(r) if r.first() == Some(&1) => {}
            Ok(_) => {
                tracing::debug!(partition, to, "replica not ready to lead");
                continue;
            }
            Err(e) => {
                tracing::debug!(partition, to, error = %e, "readiness question failed");
                continue;
            }
        }
        match h.transfer_leader(partition, to).await {
            Ok(true) => return Some(to),
            Ok(false) => tracing::debug!(partition, to, "ready replica too far behind for the lead"),
            Err(e) => tracing::debug!(partition, to, error = %e, "lead hand-off failed"),
        }
    }
    None
}

/// An application handler that holds its node weakly (the handler lives in the node it refers
/// to) and runs `f` with a handle to it.
fn weak_handler<F, Fut>(h: &LogHandle, f: F) -> AppHandler
where
    F: Fn(LogHandle, Bytes) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Bytes, String>> + Send + 'static,
{
    let node: Weak<Inner> = Arc::downgrade(&h.inner);
    let f = Arc::new(f);
    Arc::new(move |body: Bytes| {
        let (node, f) = (node.clone(), f.clone());
        Box::pin(async move {
            let inner = node.upgrade().ok_or("the node is stopping")?;
            f(LogHandle { inner }, body).await
        })
    })
}

/// Answers [`READY_KIND`] questions: `[1]` when this node's replica of the partition is not
/// recovering and its application is ready to lead it.
pub(crate) fn ready_handler(h: &LogHandle) -> AppHandler {
    weak_handler(h, |h, body| async move {
        let partition: u32 =
            postcard::from_bytes(&body).map_err(|e| format!("malformed readiness question: {e}"))?;
        let ready = h
            .group(partition_group(partition))
            .is_some_and(|g| !g.recovering.load(Ordering::SeqCst))
            && h.inner
                .lead_ready
                .read()
                .expect("lead ready lock")
                .as_ref()
                .is_none_or(|f| f(partition) == Readiness::Ready);
        Ok(Bytes::from_static(if ready { &[1] } else { &[0] }))
    })
}

/// The leader's side: hands the lead of a partition it leads to the replica asking, if that is
/// the partition's preferred replica and its log is close enough to its own. Answers `[1]` when it
/// handed the lead over, `[0]` when it did not (not the leader, asker too far behind).
pub(crate) fn handler(h: &LogHandle) -> AppHandler {
    weak_handler(h, |h, body| async move {
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
}
