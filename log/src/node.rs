//! A node of the replicated log: its Raft groups, its gRPC server, cluster bootstrap and the
//! [`LogHandle`] that the rest of thingraft appends and reads through.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::{ServerState, SnapshotPolicy};
use thingraft_proto::v1::log_client::LogClient as GrpcLogClient;
use thingraft_proto::v1::{self as pb};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::batcher::{AppendJob, Appended, BatchLimits, Batcher, Reply};
use crate::config::LogConfig;
use crate::error::LogError;
use crate::metrics::PartitionMetrics;
use crate::network::{GRPC_MESSAGE_BYTES_MAX, NetworkFactory, Peers};
use crate::pipe::Pipes;
use crate::placement;
use crate::storage::{SmReader, Store, StoredRecord};
use crate::types::{
    Command, GroupId, META_GROUP, MetaTxn, Node, NodeId, Raft, Record, Response, TypeConfig, partition_group,
};

/// gRPC metadata key set on an append that one node forwards to another; the receiver answers
/// `NotLeader` instead of forwarding again.
pub const FORWARDED: &str = "x-thingraft-forwarded";

const MARKER_FILE: &str = "cluster.json";

/// One Raft group hosted by this node.
pub struct Group {
    pub id: GroupId,
    pub raft: Raft,
    pub reader: SmReader,
    pub replicas: Vec<NodeId>,
    batcher: Option<mpsc::Sender<AppendJob>>,
    pub metrics: Arc<PartitionMetrics>,
    /// Set while this replica's log is being rebuilt from its peers after its data was lost:
    /// it neither campaigns nor grants votes until it has caught up.
    pub recovering: AtomicBool,
    /// While recovering: the peers' newest (last log term, last log index) and current term
    /// when this node came back; `u64::MAX` index while unknown.
    recover_target: std::sync::Mutex<RecoverTarget>,
    /// The snapshot being received from the leader: its transfer id and the bytes so far.
    pub(crate) snapshot_rx: std::sync::Mutex<Option<(u64, Vec<u8>)>>,
}

#[derive(Debug, Clone, Copy)]
struct RecoverTarget {
    last_log: (u64, u64),
    term: u64,
}

impl RecoverTarget {
    const UNKNOWN: RecoverTarget = RecoverTarget {
        last_log: (u64::MAX, u64::MAX),
        term: u64::MAX,
    };

    fn from_replies(gid: GroupId, replies: &[pb::StatusReply]) -> Option<RecoverTarget> {
        let groups = replies
            .iter()
            .flat_map(|r| r.groups.iter())
            .filter(|s| s.group == gid);
        groups.fold(None, |acc: Option<RecoverTarget>, s| {
            let t = RecoverTarget {
                last_log: (s.last_log_term, s.last_log_index),
                term: s.term,
            };
            Some(match acc {
                None => t,
                Some(a) => RecoverTarget {
                    last_log: a.last_log.max(t.last_log),
                    term: a.term.max(t.term),
                },
            })
        })
    }
}

impl Group {
    /// Whether this replica may grant `req` while it is recovering. Its own log and vote are
    /// gone, so it only helps elect a candidate whose log is at least as up to date as every
    /// peer's was when it came back (so the candidate holds every committed entry) and whose
    /// term is newer than any term it could have voted in before (so it never votes twice in
    /// one term). Without this, a cluster formed while this node was starting could never
    /// elect a leader.
    pub fn may_vote_while_recovering(&self, req: &openraft::raft::VoteRequest<TypeConfig>) -> bool {
        let t = *self.recover_target.lock().expect("recover target lock");
        if t.term == u64::MAX {
            return false;
        }
        let candidate_log = req
            .last_log_id
            .map(|l| (l.leader_id.term, l.index))
            .unwrap_or((0, 0));
        req.vote.leader_id.term > t.term && candidate_log >= t.last_log
    }
}

/// Handles [`LogHandle::call_app`] messages from peers: the application's body in, its reply out.
pub type AppHandler =
    Arc<dyn Fn(Bytes) -> futures::future::BoxFuture<'static, Result<Bytes, String>> + Send + Sync>;

pub(crate) struct Inner {
    /// Installed by the applications above the log, one per message kind.
    pub app_handlers: std::sync::RwLock<HashMap<u32, AppHandler>>,
    /// Set by the application above the log: whether it is ready to lead a partition here.
    pub(crate) lead_ready: std::sync::RwLock<Option<crate::rebalance::LeadReady>>,
    pub config: LogConfig,
    pub store: Arc<Store>,
    pub peers: Peers,
    /// Streams of appends forwarded to the partitions' leaders, one per peer.
    forwards: Pipes,
    pub members: BTreeMap<NodeId, String>,
    /// Indexed by group id; `None` where this node holds no replica.
    pub groups: Vec<Option<Arc<Group>>>,
    /// The replicas of each partition group (index `gid - 1`), preferred leader first.
    placements: Vec<Vec<NodeId>>,
    pub initialized: AtomicBool,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Background tasks (batchers, bootstrap, metadata), aborted at shutdown.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The log API of a running node; cheap to clone. A handle keeps the node's storage open: drop
/// every handle after [`LogNode::shutdown`] before starting the node again in the same process.
#[derive(Clone)]
pub struct LogHandle {
    pub(crate) inner: Arc<Inner>,
}

/// A running log node; dropping it does not stop it, call [`LogNode::shutdown`].
pub struct LogNode {
    handle: LogHandle,
    server: tokio::task::JoinHandle<()>,
}

/// The outcome of a metadata transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// False when a check failed; then nothing was written.
    pub applied: bool,
    pub failed_check: Option<u32>,
    /// Log index of the metadata entry that carried it.
    pub index: u64,
}

/// Stands for the metadata group where errors name a partition.
pub const META_PARTITION: u32 = u32::MAX;

/// The result of a read.
#[derive(Debug, Clone)]
pub struct ReadResult {
    pub records: Vec<StoredRecord>,
    pub next_offset: u64,
    pub start_offset: u64,
}

enum Route {
    Local(Arc<Group>),
    Remote(NodeId, String),
}

fn raft_config(c: &LogConfig) -> anyhow::Result<openraft::Config> {
    let rc = openraft::Config {
        cluster_name: "thingraft".into(),
        heartbeat_interval: c.heartbeat_ms,
        election_timeout_min: c.election_timeout_min_ms,
        election_timeout_max: c.election_timeout_max_ms,
        install_snapshot_timeout: 10_000,
        max_payload_entries: 16,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_every_entries),
        max_in_snapshot_log_to_keep: c.entries_kept_after_snapshot,
        snapshot_max_chunk_size: c.snapshot_chunk_bytes as u64,
        // A replica that lost its data dir comes back with an empty log (`rejoin`): the leader
        // must restart its search for the match instead of insisting on the old one. That
        // replica neither votes nor campaigns until it has caught up.
        allow_log_reversion: Some(true),
        broadcast_submitted_on_append: Some(true),
        ..Default::default()
    };
    Ok(rc.validate()?)
}

impl LogNode {
    /// Opens the node's storage, starts its Raft groups and its gRPC server on `listener`, and
    /// bootstraps or rejoins the cluster in the background.
    pub async fn start(config: LogConfig, listener: tokio::net::TcpListener) -> anyhow::Result<LogNode> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let store = Store::open(&config.data_dir.join("log"))?;
        let members = config.effective_members();
        let member_ids: Vec<NodeId> = members.keys().copied().collect();
        let peers = Peers::default();
        let rc = Arc::new(raft_config(&config)?);
        let limits = BatchLimits {
            records_max: config.batch_records_max,
            bytes_max: config.batch_bytes_max,
            inflight_max: config.inflight_entries_max,
        };

        let placements =
            placement::partition_replicas(config.partitions, &member_ids, config.replication_factor);
        let mut groups = Vec::new();
        let mut tasks = Vec::new();
        for gid in 0..=config.partitions {
            let replicas = if gid == META_GROUP {
                member_ids.clone()
            } else {
                placements[gid as usize - 1].clone()
            };
            if !replicas.contains(&config.node_id) {
                groups.push(None);
                continue;
            }
            let sm = store.state_machine(gid, config.retention)?;
            let reader = sm.reader();
            let network = NetworkFactory {
                group: gid,
                peers: peers.clone(),
                commit_hold: Duration::from_micros(config.commit_hold_us),
            };
            let raft = Raft::new(config.node_id, rc.clone(), network, store.log_store(gid), sm)
                .await
                .with_context(|| format!("starting raft group {gid}"))?;
            let metrics = Arc::new(PartitionMetrics::default());
            let batcher = if gid == META_GROUP {
                None
            } else {
                let (tx, rx) = mpsc::channel(config.append_queue_max);
                let b = Batcher {
                    partition: gid - 1,
                    raft: raft.clone(),
                    rx,
                    limits,
                    metrics: metrics.clone(),
                };
                tasks.push(tokio::spawn(b.run()));
                Some(tx)
            };
            groups.push(Some(Arc::new(Group {
                id: gid,
                raft,
                reader,
                replicas,
                batcher,
                metrics,
                recovering: AtomicBool::new(false),
                recover_target: std::sync::Mutex::new(RecoverTarget::UNKNOWN),
                snapshot_rx: std::sync::Mutex::new(None),
            })));
        }

        let initialized = config.data_dir.join(MARKER_FILE).exists();
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let handle = LogHandle {
            inner: Arc::new(Inner {
                app_handlers: Default::default(),
                lead_ready: Default::default(),
                forwards: Pipes::new(true),
                config,
                store,
                peers,
                members,
                groups,
                placements,
                initialized: AtomicBool::new(initialized),
                shutdown,
                tasks: std::sync::Mutex::new(tasks),
            }),
        };

        // tonic applies `tcp_nodelay` only to listeners it binds itself: without it here every
        // accepted connection ran with Nagle's algorithm, and replies waited for the peer's
        // delayed ACK (~40 ms tails on Raft and append RPCs).
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let router = crate::server::router(handle.clone());
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });

        {
            let mut t = handle.inner.tasks.lock().expect("tasks lock");
            t.push(tokio::spawn(bootstrap(handle.clone())));
            t.push(tokio::spawn(publish_metadata(handle.clone())));
            t.push(tokio::spawn(crate::rebalance::run(handle.clone())));
        }
        handle.set_app_handler(crate::rebalance::LEAD_KIND, crate::rebalance::handler(&handle));
        handle.set_app_handler(
            crate::rebalance::READY_KIND,
            crate::rebalance::ready_handler(&handle),
        );
        Ok(LogNode { handle, server })
    }

    /// The API of this node.
    pub fn handle(&self) -> LogHandle {
        self.handle.clone()
    }

    /// Stops the server and every Raft group, then closes storage (once the node's own tasks
    /// have let go of it; handles held elsewhere keep it open, see [`LogHandle`]).
    pub async fn shutdown(self) {
        let inner = &self.handle.inner;
        let _ = inner.shutdown.send(true);
        self.server.abort();
        let _ = self.server.await;
        for g in inner.groups.iter().flatten() {
            let _ = g.raft.shutdown().await;
        }
        let tasks: Vec<_> = inner.tasks.lock().expect("tasks lock").drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        // An application handler may hold a handle of this node: let go of them all.
        inner.app_handlers.write().expect("app handlers lock").clear();
        *inner.lead_ready.write().expect("lead ready lock") = None;
        inner.store.close();
        // openraft drops its storage handles as its tasks wind down; what is left then is ours
        // (`inner.store` and each group's reader), dropped with this node.
        let ours = 1 + inner.groups.iter().flatten().count();
        for _ in 0..100 {
            if Arc::strong_count(&self.handle.inner) == 1 && Arc::strong_count(&inner.store) <= ours {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::debug!(
            inner = Arc::strong_count(&self.handle.inner),
            store = Arc::strong_count(&inner.store),
            "node shut down"
        );
    }
}

fn write_marker(dir: &Path, node_id: NodeId, members: &BTreeMap<NodeId, String>) -> std::io::Result<()> {
    let ids: Vec<String> = members.keys().map(|k| k.to_string()).collect();
    let body = format!("{{\"node_id\":{node_id},\"members\":[{}]}}\n", ids.join(","));
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, body)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(MARKER_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Forms the cluster (fresh nodes), or rejoins it as a recovering replica (a node whose data
/// directory was lost while the cluster lives on).
async fn bootstrap(handle: LogHandle) {
    let inner = &handle.inner;
    if inner.initialized.load(Ordering::SeqCst) {
        return;
    }
    // Crashed between initialising the groups and writing the marker?
    let mut all_initialized = true;
    for g in inner.groups.iter().flatten() {
        all_initialized &= g.raft.is_initialized().await.unwrap_or(false);
    }
    if all_initialized {
        mark_initialized(&handle);
        return;
    }
    let majority = inner.members.len() / 2 + 1;
    loop {
        if *inner.shutdown.borrow() {
            return;
        }
        let replies = handle.probe_peers().await;
        if replies.iter().any(|r| r.initialized) {
            tracing::warn!("cluster exists but this node has no data: rejoining as a recovering replica");
            rejoin(&handle, &replies).await;
            return;
        }
        if replies.len() + 1 >= majority {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(members = ?inner.members.keys().collect::<Vec<_>>(), "forming a new cluster");
    let node_id = inner.config.node_id;
    let mut delayed = Vec::new();
    for g in inner.groups.iter().flatten() {
        if g.replicas.first() == Some(&node_id) || g.replicas.len() == 1 {
            initialize_group(inner, g).await;
        } else {
            delayed.push(g.clone());
        }
    }
    mark_initialized(&handle);
    // The preferred leader (first replica) of each group initialises it, so leaders start spread
    // over the members; the others step in only if it has not produced a leader in time.
    tokio::time::sleep(Duration::from_millis(inner.config.election_timeout_max_ms * 3)).await;
    for g in delayed {
        if g.raft.metrics().borrow_watched().current_leader.is_none() {
            initialize_group(inner, &g).await;
        }
    }
}

async fn initialize_group(inner: &Inner, g: &Group) {
    let nodes: BTreeMap<NodeId, Node> = g
        .replicas
        .iter()
        .filter_map(|id| inner.members.get(id).map(|a| (*id, Node { addr: a.clone() })))
        .collect();
    match g.raft.initialize(nodes).await {
        Ok(()) => {}
        Err(openraft::errors::RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => {}
        Err(e) => tracing::error!(group = g.id, error = %e, "initialize failed"),
    }
}

fn mark_initialized(handle: &LogHandle) {
    let inner = &handle.inner;
    if let Err(e) = write_marker(&inner.config.data_dir, inner.config.node_id, &inner.members) {
        tracing::error!(error = %e, "writing cluster marker");
    }
    inner.initialized.store(true, Ordering::SeqCst);
}

async fn rejoin(handle: &LogHandle, replies: &[pb::StatusReply]) {
    let inner = &handle.inner;
    for g in inner.groups.iter().flatten() {
        g.recovering.store(true, Ordering::SeqCst);
        g.raft.runtime_config().elect(false);
        let target = RecoverTarget::from_replies(g.id, replies).unwrap_or(RecoverTarget::UNKNOWN);
        *g.recover_target.lock().expect("recover target lock") = target;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if *inner.shutdown.borrow() {
            return;
        }
        let mut left = 0;
        for g in inner.groups.iter().flatten() {
            if !g.recovering.load(Ordering::SeqCst) {
                continue;
            }
            let mut target = *g.recover_target.lock().expect("recover target lock");
            if target.term == u64::MAX {
                // No peer reported this group yet; ask again.
                let replies = handle.probe_peers().await;
                if let Some(t) = RecoverTarget::from_replies(g.id, &replies) {
                    *g.recover_target.lock().expect("recover target lock") = t;
                    target = t;
                }
            }
            let applied = g.reader.applied().last_applied.map(|l| l.index);
            if target.term != u64::MAX && applied.is_some_and(|a| a >= target.last_log.1) {
                tracing::info!(group = g.id, applied = ?applied, "replica recovered; voting again");
                g.recovering.store(false, Ordering::SeqCst);
                g.raft.runtime_config().elect(true);
            } else {
                left += 1;
            }
        }
        if left == 0 {
            mark_initialized(handle);
            return;
        }
    }
}

/// The metadata group's leader records members and placement, so every node reads them locally.
async fn publish_metadata(handle: LogHandle) {
    let inner = &handle.inner;
    let Some(meta) = inner.groups.first().and_then(|g| g.clone()) else {
        return;
    };
    let members = serde_members(&inner.members);
    let placement = {
        let mut s = String::from("{");
        for (p, r) in inner.placements.iter().enumerate() {
            if p > 0 {
                s.push(',');
            }
            s.push_str(&format!("\"{p}\":{r:?}"));
        }
        s.push('}');
        s
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..240 {
        tick.tick().await;
        if *inner.shutdown.borrow() {
            return;
        }
        if meta.reader.meta_get("members").is_some() {
            return;
        }
        if meta.raft.metrics().borrow_watched().current_leader != Some(inner.config.node_id) {
            continue;
        }
        for (k, v) in [("members", members.clone()), ("placement", placement.clone())] {
            let cmd = Command::MetaPut {
                key: k.into(),
                value: v.into_bytes().into(),
            };
            if let Err(e) = meta.raft.client_write(cmd).await {
                tracing::debug!(error = %e, "metadata write failed; will retry");
            }
        }
    }
}

fn serde_members(members: &BTreeMap<NodeId, String>) -> String {
    let body: Vec<String> = members
        .iter()
        .map(|(id, a)| format!("\"{id}\":\"{a}\""))
        .collect();
    format!("{{{}}}", body.join(","))
}

impl LogHandle {
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.inner.config.partitions
    }

    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    /// The partition of an entity key (jump consistent hash).
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        placement::partition_for_key(key, self.partitions())
    }

    /// The group of a partition hosted here, if any.
    pub fn group(&self, gid: GroupId) -> Option<&Arc<Group>> {
        self.inner.groups.get(gid as usize).and_then(|g| g.as_ref())
    }

    fn check_partition(&self, partition: u32) -> Result<GroupId, LogError> {
        if partition >= self.partitions() {
            return Err(LogError::UnknownPartition {
                partition,
                partitions: self.partitions(),
            });
        }
        Ok(partition_group(partition))
    }

    fn validate(&self, partition: u32, records: &[Record]) -> Result<usize, LogError> {
        self.check_partition(partition)?;
        let c = &self.inner.config;
        if records.is_empty() {
            return Err(LogError::EmptyAppend);
        }
        if records.len() > c.append_records_max {
            return Err(LogError::TooManyRecords {
                count: records.len(),
                limit: c.append_records_max,
            });
        }
        let mut total = 0;
        for r in records {
            let n = r.size();
            if n > c.record_bytes_max {
                return Err(LogError::RecordTooLarge {
                    bytes: n,
                    limit: c.record_bytes_max,
                });
            }
            total += n;
        }
        if total > c.batch_bytes_max {
            return Err(LogError::AppendTooLarge {
                bytes: total,
                limit: c.batch_bytes_max,
            });
        }
        Ok(total)
    }

    /// Appends `records` to `partition`; returns once they are committed on a majority and
    /// fsynced, with the offsets they got. Forwards to the partition's leader when that is
    /// another node; retries only what certainly did not commit.
    pub async fn append(&self, partition: u32, records: Vec<Record>) -> Result<Appended, LogError> {
        self.append_inner(partition, records, true).await
    }

    pub(crate) async fn append_inner(
        &self,
        partition: u32,
        records: Vec<Record>,
        may_forward: bool,
    ) -> Result<Appended, LogError> {
        let bytes = self.validate(partition, &records)?;
        // Waits below (for a leader, a commit, a retry) end at shutdown, so that requests in
        // flight do not keep the node's storage open.
        let mut stop = self.inner.shutdown.subscribe();
        tokio::select! {
            r = self.append_attempts(partition, records, bytes, may_forward) => r,
            // The append may already be proposed: its outcome is unknown, not a safe retry.
            _ = stop.wait_for(|s| *s) => Err(LogError::Ambiguous { reason: "node shut down with the append in flight".into() }),
        }
    }

    async fn append_attempts(
        &self,
        partition: u32,
        records: Vec<Record>,
        bytes: usize,
        may_forward: bool,
    ) -> Result<Appended, LogError> {
        let gid = partition_group(partition);
        let deadline = Instant::now() + Duration::from_millis(self.inner.config.append_timeout_ms);
        let mut attempt = 0u32;
        loop {
            let route = self.route(gid, partition, deadline).await;
            let res = match route {
                Err(e) => Err(e),
                Ok(Route::Local(g)) => self.append_local(&g, records.clone(), bytes, deadline).await,
                Ok(Route::Remote(id, addr)) if may_forward => {
                    self.forward(partition, id, &addr, records.clone(), deadline)
                        .await
                }
                Ok(Route::Remote(id, addr)) => Err(LogError::NotLeader {
                    partition,
                    leader: Some((id, addr)),
                }),
            };
            match res {
                Err(e) if may_forward && e.retriable() && Instant::now() < deadline && attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(partition, attempt, error = %e, "append retry");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 20)).await;
                }
                r => return r,
            }
        }
    }

    async fn route(&self, gid: GroupId, partition: u32, deadline: Instant) -> Result<Route, LogError> {
        let Some(g) = self.group(gid) else {
            // Not a replica here: ask the preferred replica, which forwards or redirects.
            let id = self.inner.placements[gid as usize - 1][0];
            let addr = self.inner.members.get(&id).cloned().unwrap_or_default();
            return Ok(Route::Remote(id, addr));
        };
        let mut metrics = g.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if let Some(leader) = m.current_leader {
                    if leader == self.node_id() {
                        if m.state == ServerState::Leader {
                            return Ok(Route::Local(g.clone()));
                        }
                    } else {
                        let addr = m
                            .membership_config
                            .membership()
                            .get_node(&leader)
                            .map(|n| n.addr.clone())
                            .or_else(|| self.inner.members.get(&leader).cloned())
                            .unwrap_or_default();
                        return Ok(Route::Remote(leader, addr));
                    }
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(LogError::ShuttingDown),
                Err(_) => return Err(LogError::NoLeader { partition }),
            }
        }
    }

    async fn append_local(
        &self,
        g: &Group,
        records: Vec<Record>,
        bytes: usize,
        deadline: Instant,
    ) -> Result<Appended, LogError> {
        let Some(batcher) = &g.batcher else {
            return Err(LogError::Invalid("the metadata group takes no records".into()));
        };
        let (reply, rx) = oneshot::channel();
        // A full queue makes the appender wait here: backpressure, not loss.
        batcher
            .send(AppendJob {
                at: std::time::Instant::now(),
                records,
                bytes,
                reply: Reply::Applied(reply),
            })
            .await
            .map_err(|_| LogError::ShuttingDown)?;
        committed(rx, deadline).await
    }

    /// Hands `records` to `partition`'s batcher at once, without waiting for the commit, when
    /// this node leads the partition and its queue has room; the returned future ends once they
    /// are committed on a majority and fsynced there, like [`LogHandle::append`], but without
    /// waiting for this node to apply them, so without their offsets (decision 0021). Appends
    /// enqueued one after another by one caller reach the log in that order, so a caller may
    /// keep several in flight (an MQTT session does): proposals follow the queue, and one
    /// refused at a leader change (retried like `append`) is followed by the refusal of every
    /// later one, because a node that lost a partition's leadership cannot win it back before
    /// the ones queued behind it have been proposed.
    /// `Err` gives the records back (not led here, queue full, invalid): append them with
    /// [`LogHandle::append`], after the appends in flight, to keep the order.
    pub fn enqueue(
        &self,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<impl std::future::Future<Output = Result<(), LogError>> + Send + 'static, Vec<Record>> {
        let (reply, rx) = oneshot::channel();
        let again = self.hand_to_batcher(partition, records, Reply::Committed(reply))?;
        Ok(self.answer(partition, again, true, rx, |_| ()))
    }

    /// [`LogHandle::append_inner`] as a future that has already handed the records to the
    /// partition's batcher when this node leads it (so appends started one after another keep
    /// that order, as with [`LogHandle::enqueue`]); otherwise it routes them when first polled.
    pub(crate) fn append_pipelined(
        &self,
        partition: u32,
        records: Vec<Record>,
        may_forward: bool,
    ) -> futures::future::BoxFuture<'static, Result<Appended, LogError>> {
        let (reply, rx) = oneshot::channel();
        match self.hand_to_batcher(partition, records, Reply::Applied(reply)) {
            Ok(again) => Box::pin(self.answer(partition, again, may_forward, rx, |a| a)),
            Err(records) => {
                let this = self.clone();
                Box::pin(async move { this.append_inner(partition, records, may_forward).await })
            }
        }
    }

    /// Queues `records` at `partition`'s batcher if this node leads it and the queue has room;
    /// gives back a copy of them for a retry (`Bytes` clones share the data), or, if not
    /// queued, the records themselves.
    fn hand_to_batcher(
        &self,
        partition: u32,
        records: Vec<Record>,
        reply: Reply,
    ) -> Result<Vec<Record>, Vec<Record>> {
        let Ok(bytes) = self.validate(partition, &records) else {
            return Err(records);
        };
        let Some(g) = self.group(partition_group(partition)) else {
            return Err(records);
        };
        let Some(batcher) = &g.batcher else {
            return Err(records);
        };
        if self.leader_term(partition).is_none() {
            return Err(records);
        }
        let again = records.clone();
        if let Err(e) = batcher.try_send(AppendJob {
            at: std::time::Instant::now(),
            records,
            bytes,
            reply,
        }) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            return Err(job.records);
        }
        Ok(again)
    }

    /// The batcher's answer to records [`LogHandle::hand_to_batcher`] queued, or `Ambiguous` at
    /// the append timeout or at shutdown; if refused where a retry is safe, the records `again`
    /// appended like [`LogHandle::append`], their result made a `T` by `retried`.
    fn answer<T: Send + 'static>(
        &self,
        partition: u32,
        again: Vec<Record>,
        may_forward: bool,
        rx: oneshot::Receiver<Result<T, LogError>>,
        retried: fn(Appended) -> T,
    ) -> impl std::future::Future<Output = Result<T, LogError>> + Send + 'static {
        let this = self.clone();
        let deadline = Instant::now() + Duration::from_millis(self.inner.config.append_timeout_ms);
        async move {
            let mut stop = this.inner.shutdown.subscribe();
            let r = tokio::select! {
                r = committed(rx, deadline) => r,
                _ = stop.wait_for(|s| *s) => Err(LogError::Ambiguous { reason: "node shut down with the append in flight".into() }),
            };
            match r {
                Err(e) if e.retriable() => this
                    .append_inner(partition, again, may_forward)
                    .await
                    .map(retried),
                r => r,
            }
        }
    }

    async fn forward(
        &self,
        partition: u32,
        id: NodeId,
        addr: &str,
        records: Vec<Record>,
        deadline: Instant,
    ) -> Result<Appended, LogError> {
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
        let reply = self
            .inner
            .forwards
            .append(id, addr, || self.peer_client(id, addr), req);
        match tokio::time::timeout_at(deadline, reply).await {
            Err(_) => Err(LogError::Ambiguous {
                reason: format!("forwarded append to node {id} not answered in time"),
            }),
            Ok(Err(s)) => Err(LogError::from_status(partition, &s)),
            Ok(Ok(r)) => match LogError::from_stream_reply(partition, &r) {
                Some(e) => Err(e),
                None => Ok(Appended {
                    first_offset: r.first_offset,
                    count: r.count,
                }),
            },
        }
    }

    /// Appends like [`LogHandle::append`] but only if this node leads the partition now; never
    /// forwards. For writers whose records are only valid from the current leader.
    pub async fn append_as_leader(&self, partition: u32, records: Vec<Record>) -> Result<Appended, LogError> {
        self.append_inner(partition, records, false).await
    }

    /// The Raft term in which this node leads `partition`, if it does.
    pub fn leader_term(&self, partition: u32) -> Option<u64> {
        let g = self.group(partition_group(partition))?;
        // Read in place: the metrics hold the membership, too costly to clone per call.
        let metrics = g.raft.metrics();
        let m = metrics.borrow_watched();
        (m.state == ServerState::Leader && m.current_leader == Some(self.node_id())).then_some(m.current_term)
    }

    /// Hands the lead of `partition` to replica `to` if this node leads it and `to`'s log is
    /// within [`crate::rebalance::LAG_MAX`] entries of its own; whether it did. openraft's
    /// leadership transfer: this node stops proposing (appends get `NotLeader` naming `to`), and
    /// `to` elects itself once its log holds this node's last entry.
    pub async fn transfer_leader(&self, partition: u32, to: NodeId) -> Result<bool, LogError> {
        let gid = self.check_partition(partition)?;
        let g = self
            .group(gid)
            .ok_or_else(|| LogError::Invalid(format!("partition {partition} has no replica on this node")))?;
        let close = {
            let m = g.raft.metrics();
            let m = m.borrow_watched();
            let leads = m.state == ServerState::Leader && m.current_leader == Some(self.node_id());
            let last = m.last_log_index.unwrap_or(0);
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&to))
                .and_then(|l| l.as_ref())
                .map(|l| l.index);
            leads && to != self.node_id() && matched.is_some_and(|i| i + crate::rebalance::LAG_MAX >= last)
        };
        if !close {
            return Ok(false);
        }
        g.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| LogError::Internal(e.to_string()))?;
        Ok(true)
    }

    /// Installs the application's answer to how ready it is to lead a partition on this node:
    /// asked before this node, the partition's preferred replica, asks for its lead back
    /// (decision 0019), before it hands away the lead of a partition the application is not
    /// running, and when a leader in that state asks whether this node could take it (0020).
    pub fn set_lead_ready(&self, ready: crate::rebalance::LeadReady) {
        *self.inner.lead_ready.write().expect("lead ready lock") = Some(ready);
    }

    /// A `Log` client on the shared channel to peer `id`.
    fn peer_client(
        &self,
        id: NodeId,
        addr: &str,
    ) -> Result<GrpcLogClient<tonic::transport::Channel>, LogError> {
        let ch = self
            .inner
            .peers
            .channel(id, addr)
            .map_err(|e| LogError::Unreachable(e.to_string()))?;
        Ok(GrpcLogClient::new(ch)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX))
    }

    /// Ids of the cluster's initial members (this node included).
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.inner.members.keys().copied().collect()
    }

    /// Installs the handler of application messages of `kind` from peers (a later call for the
    /// same kind replaces it).
    pub fn set_app_handler(&self, kind: u32, h: AppHandler) {
        self.inner
            .app_handlers
            .write()
            .expect("app handlers lock")
            .insert(kind, h);
    }

    /// Sends an application message of `kind` to node `id` and returns its reply.
    pub async fn call_app(
        &self,
        id: NodeId,
        kind: u32,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, LogError> {
        let addr = self
            .inner
            .members
            .get(&id)
            .ok_or_else(|| LogError::Invalid(format!("unknown node {id}")))?;
        let mut client = self.peer_client(id, addr)?;
        let mut req = tonic::Request::new(pb::AppRequest { body, kind });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.app(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().body),
            Ok(Err(s)) => Err(LogError::from_status(META_PARTITION, &s)),
            Err(_) => Err(LogError::Unreachable(format!("node {id} did not answer in time"))),
        }
    }

    pub(crate) fn app_handler(&self, kind: u32) -> Option<AppHandler> {
        self.inner
            .app_handlers
            .read()
            .expect("app handlers lock")
            .get(&kind)
            .cloned()
    }

    fn meta_group(&self) -> &Arc<Group> {
        self.group(META_GROUP)
            .expect("every node holds a replica of the metadata group")
    }

    /// A value of the metadata map, from this node's replica.
    pub fn meta_get(&self, key: &str) -> Option<Bytes> {
        self.meta_group().reader.meta_get(key)
    }

    /// Entries of the metadata map under `prefix`, from this node's replica.
    pub fn meta_scan(&self, prefix: &str, max: usize) -> Vec<(String, Bytes)> {
        self.meta_group().reader.meta_scan(prefix, max)
    }

    /// Keys of the metadata map changed by each apply on this replica (an empty list or a
    /// lagged receiver: anything may have changed).
    pub fn meta_changes(&self) -> broadcast::Receiver<Arc<Vec<String>>> {
        self.meta_group().reader.shared.meta_changes.subscribe()
    }

    /// Commits `txn` through the metadata group (forwarding to its leader) and returns once
    /// this node's replica has applied it, so that a read here sees the outcome.
    pub async fn meta_txn(&self, txn: MetaTxn) -> Result<TxnResult, LogError> {
        self.meta_txn_inner(txn, true).await
    }

    /// Returns once this node's replica of the metadata group has applied every change
    /// committed before the call: an empty transaction through the group's leader, waited for
    /// here. A node that starts with a lagging replica (it was down, or lost its data) calls it
    /// before it serves reads of the registry.
    pub async fn meta_barrier(&self) -> Result<(), LogError> {
        self.meta_txn(MetaTxn {
            checks: Vec::new(),
            ops: Vec::new(),
        })
        .await
        .map(|_| ())
    }

    pub(crate) async fn meta_txn_inner(
        &self,
        txn: MetaTxn,
        may_forward: bool,
    ) -> Result<TxnResult, LogError> {
        let deadline = Instant::now() + Duration::from_millis(self.inner.config.append_timeout_ms);
        let mut attempt = 0u32;
        let res = loop {
            let res = match self.route(META_GROUP, META_PARTITION, deadline).await {
                Err(e) => Err(e),
                Ok(Route::Local(g)) => match g.raft.client_write(Command::MetaTxn(txn.clone())).await {
                    Ok(r) => match r.data {
                        Response::Txn {
                            applied,
                            failed_check,
                        } => Ok(TxnResult {
                            applied,
                            failed_check,
                            index: r.log_id.index,
                        }),
                        other => Err(LogError::Internal(format!("unexpected reply {other:?}"))),
                    },
                    Err(openraft::errors::RaftError::APIError(e)) => {
                        Err(crate::batcher::client_write_error(META_PARTITION, e))
                    }
                    Err(openraft::errors::RaftError::Fatal(e)) => Err(LogError::Internal(e.to_string())),
                },
                Ok(Route::Remote(id, addr)) if may_forward => {
                    self.meta_forward(id, &addr, &txn, deadline).await
                }
                Ok(Route::Remote(id, addr)) => Err(LogError::NotLeader {
                    partition: META_PARTITION,
                    leader: Some((id, addr)),
                }),
            };
            match res {
                Err(e) if may_forward && e.retriable() && Instant::now() < deadline && attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 20)).await;
                }
                r => break r?,
            }
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.meta_group()
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(res.index), "metadata transaction")
            .await
            .map_err(|e| LogError::Ambiguous {
                reason: format!("committed at index {} but not applied here: {e}", res.index),
            })?;
        Ok(res)
    }

    async fn meta_forward(
        &self,
        id: NodeId,
        addr: &str,
        txn: &MetaTxn,
        deadline: Instant,
    ) -> Result<TxnResult, LogError> {
        let mut client = self.peer_client(id, addr)?;
        let body = postcard::to_stdvec(txn).map_err(|e| LogError::Invalid(e.to_string()))?;
        let mut req = tonic::Request::new(pb::MetaWriteRequest { txn: body.into() });
        req.metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        match client.meta_write(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok(TxnResult {
                    applied: r.applied,
                    failed_check: r.failed_check,
                    index: r.index,
                })
            }
            Err(s) => Err(LogError::from_status(META_PARTITION, &s)),
        }
    }

    /// Up to `max` committed records of `partition` from `from_offset`, read from this node's
    /// replica (every applied record is committed).
    pub fn read(&self, partition: u32, from_offset: u64, max: usize) -> Result<ReadResult, LogError> {
        let gid = self.check_partition(partition)?;
        let g = self
            .group(gid)
            .ok_or_else(|| LogError::Invalid(format!("partition {partition} has no replica on this node")))?;
        let applied = g.reader.applied();
        let records = g
            .reader
            .read(from_offset, max)
            .map_err(|e| LogError::Internal(e.to_string()))?;
        Ok(ReadResult {
            records,
            next_offset: applied.next_offset,
            start_offset: applied.start_offset,
        })
    }

    /// A receiver of the partition's `next_offset`, updated after every apply on this replica.
    pub fn watch_partition(&self, partition: u32) -> Result<watch::Receiver<u64>, LogError> {
        let gid = self.check_partition(partition)?;
        let g = self
            .group(gid)
            .ok_or_else(|| LogError::Invalid(format!("partition {partition} has no replica on this node")))?;
        Ok(g.reader.subscribe())
    }

    /// Committed records of `partition` from `from_offset` on, in order. Each item of
    /// [`Tail::recv`] is a batch of consecutive records.
    pub fn tail(&self, partition: u32, from_offset: u64) -> Result<Tail, LogError> {
        Ok(Tail {
            watch: self.watch_partition(partition)?,
            handle: self.clone(),
            stop: self.inner.shutdown.subscribe(),
            partition,
            next: from_offset,
            ended: false,
        })
    }

    /// Asks each peer for its status (short timeout); returns the replies that came.
    pub(crate) async fn probe_peers(&self) -> Vec<pb::StatusReply> {
        let mut out = Vec::new();
        for (id, addr) in &self.inner.members {
            if *id == self.node_id() {
                continue;
            }
            let Ok(ch) = self.inner.peers.channel(*id, addr) else {
                continue;
            };
            let mut c = GrpcLogClient::new(ch);
            let mut req = tonic::Request::new(pb::StatusRequest {});
            req.set_timeout(Duration::from_millis(500));
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(700), c.status(req)).await {
                out.push(r.into_inner());
            }
        }
        out
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> pb::StatusReply {
        let inner = &self.inner;
        let mut groups = Vec::new();
        for g in inner.groups.iter().flatten() {
            let m = g.raft.metrics().borrow_watched().clone();
            let applied = g.reader.applied();
            let membership = m.membership_config.membership();
            groups.push(pb::GroupStatus {
                group: g.id,
                leader: m.current_leader.unwrap_or(0),
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                last_log_term: g
                    .raft
                    .data_metrics()
                    .borrow_watched()
                    .last_log
                    .map(|l| l.leader_id.term)
                    .unwrap_or(0),
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                next_offset: applied.next_offset,
                start_offset: applied.start_offset,
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                batches: g.metrics.batches.load(Ordering::Relaxed),
                batched_records: g.metrics.batched_records.load(Ordering::Relaxed),
                commit_us_total: g.metrics.commit_us_total.load(Ordering::Relaxed),
                snapshots_installed: g.reader.shared.snapshots_installed.load(Ordering::Relaxed),
                preferred_leader: if g.id == META_GROUP {
                    0
                } else {
                    g.replicas.first().copied().unwrap_or(0)
                },
                state: if g.recovering.load(Ordering::SeqCst) {
                    "Recovering".into()
                } else {
                    format!("{:?}", m.state)
                },
            });
        }
        pb::StatusReply {
            node_id: inner.config.node_id,
            members: inner
                .members
                .iter()
                .map(|(id, addr)| pb::MemberInfo {
                    node_id: *id,
                    addr: addr.clone(),
                })
                .collect(),
            partitions: inner.config.partitions,
            groups,
            initialized: inner.initialized.load(Ordering::SeqCst),
            fsyncs: inner.store.sync_stats.fsyncs.load(Ordering::Relaxed),
            fsynced_appends: inner.store.sync_stats.flushed_appends.load(Ordering::Relaxed),
            fsync_us_total: inner.store.sync_stats.fsync_us_total.load(Ordering::Relaxed),
            leader_rebalance_ms: inner.config.leader_rebalance_ms,
        }
    }

    /// Waits until every group hosted here has a leader.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), LogError> {
        let deadline = Instant::now() + timeout;
        for g in self.inner.groups.iter().flatten() {
            let mut m = g.raft.metrics();
            loop {
                if m.borrow_and_update().current_leader.is_some() {
                    break;
                }
                match tokio::time::timeout_at(deadline, m.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(LogError::ShuttingDown),
                    Err(_) => {
                        return Err(LogError::NoLeader {
                            partition: g.id.saturating_sub(1),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// A reader of a partition's committed records, polled by its owner: reading happens in the
/// owner's task, so a newly applied batch costs one wake-up (the owner's), not a relay task's too.
pub struct Tail {
    handle: LogHandle,
    partition: u32,
    next: u64,
    watch: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    ended: bool,
}

impl Tail {
    /// The committed records from the tail's position that are there now, without waiting:
    /// `None` when there are none (or the tail has ended).
    pub fn try_recv(&mut self) -> Option<Result<ReadResult, LogError>> {
        if self.ended {
            return None;
        }
        match self.handle.read(self.partition, self.next, 4096) {
            Err(e) => {
                self.ended = true;
                Some(Err(e))
            }
            Ok(r) if !r.records.is_empty() => {
                self.next = r.records.last().map(|x| x.offset + 1).unwrap_or(self.next);
                Some(Ok(r))
            }
            Ok(_) => None,
        }
    }

    /// The next batch of committed records from the tail's position; waits while there is none.
    /// `None` once the node shuts down or after an error was returned. Cancel-safe: a `recv`
    /// dropped before it returns loses nothing.
    pub async fn recv(&mut self) -> Option<Result<ReadResult, LogError>> {
        loop {
            if self.ended {
                return None;
            }
            // A reader catching up finds records at every call and never waits: let it count
            // against the task's budget, so that it yields to the runtime now and then.
            tokio::task::coop::consume_budget().await;
            match self.handle.read(self.partition, self.next, 4096) {
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
                Ok(r) if !r.records.is_empty() => {
                    self.next = r.records.last().map(|x| x.offset + 1).unwrap_or(self.next);
                    return Some(Ok(r));
                }
                Ok(_) => {
                    tokio::select! {
                        changed = self.watch.changed() => if changed.is_err() { self.ended = true },
                        _ = self.stop.wait_for(|s| *s) => self.ended = true,
                    }
                }
            }
        }
    }
}

/// The batcher's answer to one append, or `Ambiguous` when it does not come by `deadline`.
async fn committed<T>(rx: oneshot::Receiver<Result<T, LogError>>, deadline: Instant) -> Result<T, LogError> {
    match tokio::time::timeout_at(deadline, rx).await {
        Err(_) => Err(LogError::Ambiguous {
            reason: "timed out waiting for commit".into(),
        }),
        Ok(Err(_)) => Err(LogError::Ambiguous {
            reason: "batcher dropped the append".into(),
        }),
        Ok(Ok(r)) => r,
    }
}
