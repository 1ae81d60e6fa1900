//! One engine shard per partition replica: it applies the partition's committed outcomes to the
//! local store on every replica, and, on the partition's leader, processes new ingest records
//! and appends their outcome (DESIGN invariant 3).
//!
//! Fencing is by range: an [`Outcome`] covers offsets `from .. to`, and a replica applies only
//! the part above its `processed_upto`; so when a deposed leader's outcome and its successor's
//! both commit, each ingest record is still applied exactly once, in log order.
//!
//! With the default root rule chain, processing an ingest record has a fixed effect (save the
//! telemetry, save the attributes, record connectivity), so an outcome names the range and each
//! replica applies the records it already holds, instead of copying them into the log again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use thingraft_log::rebalance::Readiness;
use thingraft_log::{LogHandle, Record};
use thingraft_proto::records::{
    AttrKv, Deliver, DownlinkMsg, EntityId, Ingest, IngestMsg, Outcome, PartitionRecord, RpcStatus, Scope,
    SessionRef,
};
use tokio::sync::{mpsc, watch};

use crate::connectivity::Connectivity;
use crate::rules::{Effect, RuleChain, RuleMsg};
use crate::store::{Batch, Progress, RpcState, Store};
use crate::{Downlinks, EngineConfig};

/// Outcomes a quiet partition's leader may propose back to back before they are spaced by
/// `EngineConfig::outcome_interval_ms` (decision 0021).
const OUTCOME_BURST: u32 = 4;

/// Ingest records held in memory between their commit and their outcome; beyond this the
/// shard forgets them and re-reads them from the log when their outcome arrives.
const PENDING_MAX: usize = 200_000;

pub struct Shard {
    pub partition: u32,
    pub log: LogHandle,
    pub store: Arc<Store>,
    /// `processed_upto` after each apply, for readers that wait for their write.
    pub applied_tx: watch::Sender<u64>,
    pub downlinks: Arc<dyn Downlinks>,
    pub config: EngineConfig,
    /// Where a state taken from a peer is written before it is installed.
    pub transfer_dir: std::path::PathBuf,
    /// Per partition: how ready its shard here is to lead it, read through [`readiness`]: running
    /// (not taking its state from a peer, not backing off) and within `READY_LAG` records of its
    /// log's end, running but behind, or not running. The log asks before it takes a partition's
    /// lead back for this node (decision 0019), and hands away the lead of a partition whose shard
    /// has not been running for a while (decision 0020).
    pub ready: Arc<Vec<AtomicU8>>,
}

/// Records a shard may be behind its log's end and still be ready to lead the partition.
const READY_LAG: u64 = 4096;

/// Test hook for a shard that keeps failing: with this variable set to `P@MS`, partition P's
/// shard fails MS milliseconds after the first shard of the process started, and at every start
/// after that, as it would on a store that refuses every write. `tests/tests/leader_rebalance.rs`
/// checks that a leader in that state hands its lead to a ready replica (decision 0020).
pub const SHARD_FAIL: &str = "THINGRAFT_FAULT_SHARD_FAIL";

/// Whether [`SHARD_FAIL`] makes `partition`'s shard fail now.
fn failing_on_purpose(partition: u32) -> bool {
    static HOOK: std::sync::OnceLock<Option<(u32, Duration, tokio::time::Instant)>> =
        std::sync::OnceLock::new();
    let hook = HOOK.get_or_init(|| {
        let v = std::env::var(SHARD_FAIL).ok()?;
        let (p, ms) = v.split_once('@')?;
        Some((
            p.parse().ok()?,
            Duration::from_millis(ms.parse().ok()?),
            tokio::time::Instant::now(),
        ))
    });
    hook.as_ref()
        .is_some_and(|(p, after, since)| *p == partition && since.elapsed() >= *after)
}

/// A shard's readiness as stored in [`Shard::ready`]: 0 not running, 1 running but behind,
/// 2 running and close to its log's end.
pub(crate) fn readiness(v: u8) -> Readiness {
    match v {
        2 => Readiness::Ready,
        1 => Readiness::Behind,
        _ => Readiness::Down,
    }
}

/// Sets a shard's readiness while it runs, and back to not running when its run ends (for a state
/// transfer, a back-off or shutdown).
struct ReadyFlag<'a>(&'a AtomicU8);

impl ReadyFlag<'_> {
    fn set(&self, close_to_the_end: bool) {
        self.0
            .store(if close_to_the_end { 2 } else { 1 }, Ordering::Relaxed);
    }
}

impl Drop for ReadyFlag<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// The log no longer holds records of the partition this replica has not applied (retention
/// dropped them): its state must come from a peer's (decision 0018).
#[derive(Debug, thiserror::Error)]
#[error("partition {partition}: offsets from {from} below the log's start {start} are no longer retained")]
struct Gap {
    partition: u32,
    from: u64,
    start: u64,
}

/// External work an applied input asks for, done by the partition's leader only.
#[derive(Debug)]
pub(crate) enum Action {
    /// Push shared attributes to the device's subscribed sessions.
    AttributeUpdate { device: EntityId, msg: DownlinkMsg },
    /// Answer a session's attribute request from the store.
    AttributeResponse {
        device: EntityId,
        session: SessionRef,
        request_id: u32,
        client_keys: Option<Vec<String>>,
        shared_keys: Option<Vec<String>>,
    },
    /// Deliver a server-side RPC (or queue it until a session subscribes).
    Rpc(RpcState),
    /// This node leads the partition now: take over its open RPCs (the previous leader's queued
    /// and awaiting ones lived in its memory only).
    Lead(Vec<RpcState>),
    /// This node no longer leads the partition: stop delivering and timing out its RPCs.
    Follow,
    /// Run a device's client-side RPC through the root rule chain; answer what it replies.
    ClientRpc {
        device: EntityId,
        session: SessionRef,
        request_id: u32,
        method: String,
        params: String,
    },
}

struct State {
    /// Every ingest record below it is applied (the last outcome's end, or, with no ingest
    /// waiting, everything seen).
    processed_upto: u64,
    /// Every ingest record from `pending_from` up to the tail's position is in `pending`.
    pending: VecDeque<(u64, Ingest)>,
    pending_from: u64,
    /// Next offset the tail will deliver.
    seen_upto: u64,
    last_ingest: Option<u64>,
    connectivity: Connectivity,
    /// Records skipped because they did not decode.
    undecodable: u64,
}

impl Shard {
    /// Runs until shutdown (or the log's end). A shard that fails (a store write error, a
    /// record range it cannot read) starts again from its stored progress after a back-off,
    /// doubling from 0.5 s up to 30 s: what it had applied is in the store with its progress,
    /// and what it had not is read from the log again.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        const FIRST: Duration = Duration::from_millis(500);
        let mut backoff = FIRST;
        loop {
            let started = tokio::time::Instant::now();
            let e = match self.run_inner(&mut shutdown).await {
                Ok(()) => return,
                Err(_) if *shutdown.borrow() => return,
                Err(e) => match e.downcast::<Gap>() {
                    Ok(gap) => {
                        tracing::warn!(partition = self.partition, "{gap}; taking the state from a peer");
                        let restored = crate::state::restore(
                            &self.log,
                            &self.store,
                            &self.transfer_dir,
                            self.partition,
                            gap.start,
                            &mut shutdown,
                        )
                        .await;
                        match restored {
                            Ok(()) => continue,
                            Err(_) if *shutdown.borrow() => return,
                            Err(e) => e,
                        }
                    }
                    Err(e) => e,
                },
            };
            // A shard that ran for a while before it failed starts over from the first back-off.
            if started.elapsed() > Duration::from_secs(60) {
                backoff = FIRST;
            }
            tracing::error!(
                partition = self.partition,
                error = %e,
                retry_ms = backoff.as_millis() as u64,
                "engine shard failed; starting it again from its stored progress"
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = crate::stopped(&mut shutdown) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn run_inner(&self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let p = self.partition;
        anyhow::ensure!(!failing_on_purpose(p), "{SHARD_FAIL} is set: failing on purpose");
        let progress = self.store.progress(p)?;
        let start = self.log.read(p, 0, 0)?.start_offset;
        if progress.processed_upto < start {
            return Err(Gap {
                partition: p,
                from: progress.processed_upto,
                start,
            }
            .into());
        }
        let mut st = State {
            processed_upto: progress.processed_upto,
            pending: VecDeque::new(),
            pending_from: progress.processed_upto,
            seen_upto: progress.processed_upto,
            last_ingest: None,
            undecodable: 0,
            connectivity: Connectivity::load(&self.store, self.config.inactivity_timeout_ms as i64, |d| {
                self.log.partition_for_key(d) == p
            })?,
        };
        let check_every = Duration::from_millis(self.config.state_check_interval_ms);
        let mut last_check = tokio::time::Instant::now();
        self.applied_tx.send_replace(st.processed_upto);
        let (actions_tx, actions_rx) = mpsc::channel(1024);
        let actor = tokio::spawn(
            Leader {
                partition: p,
                log: self.log.clone(),
                store: self.store.clone(),
                downlinks: self.downlinks.clone(),
                root_chain: RuleChain::default_root(),
                ack_timeout_ms: self.config.rpc_ack_timeout_ms as i64,
                sends_max: self.config.rpc_max_retries.saturating_add(1),
                queued: Vec::new(),
                awaiting: Vec::new(),
            }
            .run(actions_rx),
        );
        let _abort_actor = AbortOnDrop(actor);
        let mut tail = self.log.tail(p, st.processed_upto)?;
        let log_end = self.log.watch_partition(p)?;
        let ready = ReadyFlag(&self.ready[p as usize]);
        let mut proposed_upto = st.processed_upto;
        // The outcome append in flight, polled here rather than spawned (a task per outcome is a
        // spawn and a cross-thread wake-up each).
        let mut in_flight: Option<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The term this node led the partition in when it last looked (`None`: it did not).
        let mut led: Option<u64> = None;
        // Outcomes are spaced (`EngineConfig::outcome_interval_ms`): one per interval on
        // average, and up to `OUTCOME_BURST` at once on a partition that was quiet (a device
        // connecting and publishing), a rate limit kept as its next due time (GCRA).
        let outcome_every = Duration::from_millis(self.config.outcome_interval_ms);
        let outcome_slack = outcome_every * (OUTCOME_BURST - 1);
        let mut outcome_tat = tokio::time::Instant::now();
        // Set for when the next outcome may be proposed, while one waits for that.
        let outcome_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(outcome_timer);
        let mut outcome_waits = false;
        // One wait for the shutdown for the whole loop, not a waiter added and removed per turn.
        let stopped = crate::stopped(shutdown);
        tokio::pin!(stopped);
        loop {
            // A leader waiting to propose its next outcome, with every outcome it proposed
            // applied, has nothing to do with new records before that: it reads them when the
            // timer fires, all at once, instead of waking up for every entry (decision 0022).
            let read_later = outcome_waits && in_flight.is_none() && st.processed_upto >= proposed_upto;
            tokio::select! {
                () = &mut outcome_timer, if outcome_waits => {
                    outcome_waits = false;
                    while let Some(batch) = tail.try_recv() {
                        self.absorb(&mut st, batch?.records, &actions_tx).await?;
                    }
                }
                batch = tail.recv(), if !read_later => {
                    let Some(batch) = batch else { return Ok(()) };
                    let batch = batch?;
                    self.absorb(&mut st, batch.records, &actions_tx).await?;
                }
                ok = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    if !ok {
                        // Not appended (or unknown): propose again from what is applied.
                        proposed_upto = st.processed_upto;
                    }
                }
                _ = tick.tick() => {
                    anyhow::ensure!(!failing_on_purpose(p), "{SHARD_FAIL} is set: failing on purpose");
                    if last_check.elapsed() >= check_every {
                        last_check = tokio::time::Instant::now();
                        self.check_inactivity(&mut st).await;
                    }
                }
                () = &mut stopped => return Ok(()),
            }
            ready.set(st.seen_upto + READY_LAG >= *log_end.borrow());
            let term = self.log.leader_term(p);
            if term != led {
                led = term;
                let a = match term {
                    Some(_) => {
                        let log = &self.log;
                        Action::Lead(self.store.open_rpcs(|d| log.partition_for_key(d) == p)?)
                    }
                    None => Action::Follow,
                };
                if actions_tx.send(a).await.is_err() {
                    return Ok(());
                }
            }
            if in_flight.is_none()
                && let Some(term) = term
            {
                let from = proposed_upto.max(st.processed_upto);
                if st.last_ingest.is_some_and(|o| o >= from) && st.seen_upto > from {
                    let now = tokio::time::Instant::now();
                    if now + outcome_slack < outcome_tat {
                        if !outcome_waits {
                            outcome_timer.as_mut().reset(outcome_tat - outcome_slack);
                            outcome_waits = true;
                        }
                        continue;
                    }
                    outcome_tat = outcome_tat.max(now) + outcome_every;
                    let to = st.seen_upto;
                    let rec = PartitionRecord::Outcome(Outcome { from, to, term }).encode();
                    let log = self.log.clone();
                    proposed_upto = to;
                    in_flight = Some(Box::pin(async move {
                        match log.append_as_leader(p, vec![Record::new(Vec::new(), rec)]).await {
                            Ok(_) => true,
                            Err(e) => {
                                tracing::debug!(partition = p, error = %e, "outcome not appended");
                                false
                            }
                        }
                    }));
                }
            }
        }
    }

    /// Takes committed records from the tail: keeps ingest records until their outcome, applies
    /// outcomes.
    async fn absorb(
        &self,
        st: &mut State,
        records: Vec<thingraft_log::StoredRecord>,
        actions_tx: &mpsc::Sender<Action>,
    ) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        let mut applied_any = false;
        let mut actions = Vec::new();
        // The tail goes on from the oldest record retained: past `seen_upto`, records this
        // replica never saw were dropped.
        if let Some(first) = records.first()
            && first.offset > st.seen_upto
        {
            return Err(Gap {
                partition: self.partition,
                from: st.seen_upto,
                start: first.offset,
            }
            .into());
        }
        for r in records {
            st.seen_upto = r.offset + 1;
            match PartitionRecord::decode(&r.value) {
                Ok(PartitionRecord::Ingest(i)) => {
                    st.last_ingest = Some(r.offset);
                    if st.pending.len() >= PENDING_MAX {
                        st.pending.clear();
                        st.pending_from = r.offset + 1;
                    } else {
                        st.pending.push_back((r.offset, i));
                    }
                }
                Ok(PartitionRecord::Outcome(o)) => {
                    if o.to <= st.processed_upto {
                        continue; // already covered by an earlier outcome
                    }
                    let from = o.from.max(st.processed_upto);
                    let inputs = self.take(st, from, o.to)?;
                    let acts = apply_default(&self.store, &mut batch, &inputs, &mut st.connectivity);
                    // The leader acts on every range it applies, also one its predecessor
                    // proposed and could not act on: at least once, so around a change of leader
                    // a device may get a push or an RPC twice, never not at all.
                    if self.log.leader_term(self.partition).is_some() {
                        actions.extend(acts);
                    }
                    st.processed_upto = o.to;
                    applied_any = true;
                }
                Err(e) => {
                    // Transports validate before appending; a record that does not decode is
                    // not a device record (`thingraft bench log` writes raw ones), from a newer
                    // format, or damaged. Skip it so the partition goes on; say so, but not once
                    // per record.
                    st.undecodable += 1;
                    if st.undecodable.is_power_of_two() {
                        tracing::warn!(
                            partition = self.partition,
                            offset = r.offset,
                            skipped = st.undecodable,
                            error = %e,
                            "records that are not device records skipped"
                        );
                    }
                }
            }
        }
        if applied_any {
            // With no ingest record waiting for its outcome (and none left to re-read), every
            // record seen is done with: the progress moves past the outcome records too, so
            // that retention dropping only those never reads as a gap at the next start.
            if st.pending.is_empty() && st.pending_from <= st.processed_upto {
                st.processed_upto = st.seen_upto;
                st.pending_from = st.seen_upto;
            }
            batch.progress(
                self.partition,
                Progress {
                    processed_upto: st.processed_upto,
                },
            );
            self.store.write_in_task(batch)?;
            self.applied_tx.send_replace(st.processed_upto);
        }
        for a in actions {
            // A full queue slows applying down rather than dropping the action.
            if actions_tx.send(a).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Leader only: appends an `Inactive` record for each device silent past its timeout.
    async fn check_inactivity(&self, st: &mut State) {
        if self.log.leader_term(self.partition).is_none() {
            st.connectivity.clear_proposed();
            return;
        }
        let now = crate::registry::now_ms();
        let due = st.connectivity.due(now, 1000);
        if due.is_empty() {
            return;
        }
        let records: Vec<Record> = due
            .iter()
            .map(|(tenant, device)| {
                let i = Ingest {
                    tenant: *tenant,
                    device: *device,
                    ts_ms: now,
                    session: None,
                    msg: IngestMsg::Inactive,
                };
                Record::new(device.to_vec(), PartitionRecord::Ingest(i).encode())
            })
            .collect();
        if let Err(e) = self.log.append_as_leader(self.partition, records).await {
            tracing::debug!(partition = self.partition, error = %e, "inactivity not recorded; will retry");
            st.connectivity.clear_proposed();
        }
    }

    /// The ingest records with offsets in `from .. to`, from memory or, if they were dropped,
    /// from the log.
    fn take(&self, st: &mut State, from: u64, to: u64) -> anyhow::Result<Vec<(u64, Ingest)>> {
        let mut out = Vec::new();
        if from < st.pending_from {
            let mut next = from;
            let upto = to.min(st.pending_from);
            while next < upto {
                let r = self.log.read(self.partition, next, 4096)?;
                // A read starts at the oldest record retained: one past `next` means a gap (and
                // would never move `next`).
                if r.records.first().is_none_or(|rec| rec.offset != next) {
                    return Err(Gap {
                        partition: self.partition,
                        from: next,
                        start: r.start_offset.max(next + 1),
                    }
                    .into());
                }
                for rec in r.records {
                    if rec.offset >= upto {
                        break;
                    }
                    next = rec.offset + 1;
                    if let Ok(PartitionRecord::Ingest(i)) = PartitionRecord::decode(&rec.value) {
                        out.push((rec.offset, i));
                    }
                }
            }
        }
        while let Some((o, _)) = st.pending.front() {
            if *o >= to {
                break;
            }
            let (o, i) = st.pending.pop_front().expect("front exists");
            if o >= from {
                out.push((o, i));
            }
        }
        st.pending_from = st.pending_from.max(to);
        Ok(out)
    }
}

/// The effect of the default root rule chain on each input, in order; returns the external
/// actions the leader owes.
fn apply_default(
    store: &Store,
    batch: &mut Batch,
    inputs: &[(u64, Ingest)],
    conn: &mut Connectivity,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (offset, i) in inputs {
        let d = &i.device;
        match &i.msg {
            IngestMsg::Telemetry(groups) | IngestMsg::SaveTelemetry(groups) => {
                for g in groups {
                    batch.telemetry(store, d, g.ts_ms, *offset, &g.values);
                }
            }
            IngestMsg::ClientAttributes(values) => {
                for (k, v) in values {
                    batch.attribute(d, Scope::Client, k, i.ts_ms, v);
                }
            }
            IngestMsg::SaveAttributes { scope, values } => {
                for (k, v) in values {
                    batch.attribute(d, *scope, k, i.ts_ms, v);
                    if *scope == Scope::Server {
                        conn.on_server_attribute(d, k, v);
                    }
                }
                if *scope == Scope::Shared {
                    let updated = values
                        .iter()
                        .map(|(k, v)| AttrKv {
                            key: k.clone(),
                            ts_ms: i.ts_ms,
                            value: v.clone(),
                        })
                        .collect();
                    actions.push(Action::AttributeUpdate {
                        device: *d,
                        msg: DownlinkMsg::AttributeUpdate {
                            updated,
                            deleted: Vec::new(),
                        },
                    });
                }
            }
            IngestMsg::DeleteAttributes { scope, keys } => {
                for k in keys {
                    batch.delete_attribute(d, *scope, k);
                }
                if *scope == Scope::Shared && !keys.is_empty() {
                    actions.push(Action::AttributeUpdate {
                        device: *d,
                        msg: DownlinkMsg::AttributeUpdate {
                            updated: Vec::new(),
                            deleted: keys.clone(),
                        },
                    });
                }
            }
            IngestMsg::DeleteTelemetry {
                keys,
                start_ts,
                end_ts,
                delete_latest,
            } => {
                if let Err(e) = batch.delete_telemetry(store, d, keys, *start_ts, *end_ts, *delete_latest) {
                    tracing::error!(error = %e, "telemetry delete failed to read the store");
                }
            }
            IngestMsg::AttributeRequest {
                request_id,
                client_keys,
                shared_keys,
            } => {
                if let Some(session) = i.session {
                    actions.push(Action::AttributeResponse {
                        device: *d,
                        session,
                        request_id: *request_id,
                        client_keys: client_keys.clone(),
                        shared_keys: shared_keys.clone(),
                    });
                }
            }
            IngestMsg::RpcRequest {
                uuid,
                method,
                params,
                oneway,
                persistent,
                expiration_ms,
            } => {
                if batch.rpc(store, uuid).is_none() {
                    let r = RpcState {
                        uuid: *uuid,
                        device: *d,
                        tenant: i.tenant,
                        id: batch.next_rpc_id(store, d),
                        method: method.clone(),
                        params: params.clone(),
                        oneway: *oneway,
                        persistent: *persistent,
                        expiration_ms: *expiration_ms,
                        created_ms: i.ts_ms,
                        status: RpcStatus::Queued,
                        response: None,
                    };
                    batch.put_rpc(r.clone());
                    actions.push(Action::Rpc(r));
                }
            }
            IngestMsg::ClientRpc {
                request_id,
                method,
                params,
            } => {
                // Only a session can take the answer; the transport answers with a timeout when
                // the chain gives none.
                if let Some(session) = i.session {
                    actions.push(Action::ClientRpc {
                        device: *d,
                        session,
                        request_id: *request_id,
                        method: method.clone(),
                        params: params.clone(),
                    });
                }
            }
            IngestMsg::RpcResponse { id, payload } => {
                if let Some(mut r) = batch.rpc_by_id(store, d, *id)
                    && !r.status.is_final()
                {
                    r.status = RpcStatus::Successful;
                    r.response = Some(payload.clone());
                    batch.put_rpc(r);
                }
            }
            IngestMsg::RpcStatus { uuid, status } => {
                // A deletion ends any RPC, answered or not; other statuses only move an open
                // one forward (a session's DELIVERED may be appended before the leader's SENT).
                if let Some(mut r) = batch.rpc(store, uuid)
                    && r.device == *d
                    && r.status.may_become(*status)
                {
                    r.status = *status;
                    batch.put_rpc(r);
                }
            }
            IngestMsg::Connect => conn.on_connect(batch, d, &i.tenant, i.ts_ms),
            // Counted as activity below, like every record from a session.
            IngestMsg::Activity => {}
            IngestMsg::Disconnect => conn.on_disconnect(batch, d, i.ts_ms),
            IngestMsg::Inactive => conn.on_inactive(batch, d, i.ts_ms),
        }
        if i.session.is_some() {
            conn.on_activity(batch, d, &i.tenant, i.ts_ms);
        }
    }
    conn.flush(batch);
    actions
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Open RPCs a partition's leader follows for one device; a new one beyond is FAILED.
const RPCS_PER_DEVICE_MAX: usize = 1_000;

/// Open RPCs a partition's leader follows (queued and awaiting together).
const RPCS_TRACKED_MAX: usize = 10_000;

/// The partition leader's side of a shard: carries out [`Action`]s and keeps RPCs that no
/// session could take until one can, or until they expire.
struct Leader {
    partition: u32,
    log: LogHandle,
    store: Arc<Store>,
    downlinks: Arc<dyn Downlinks>,
    /// The chain client-side RPCs run through (per tenant once chains can be edited).
    root_chain: RuleChain,
    /// How long a device has to acknowledge an RPC before it is sent again, and how many times
    /// it is sent before it fails ([`crate::EngineConfig::rpc_ack_timeout_ms`]).
    ack_timeout_ms: i64,
    sends_max: u32,
    /// RPCs no session took yet (or whose session went away before the device acknowledged).
    queued: Vec<Tracked>,
    /// RPCs a session took: waiting for the device's acknowledgement (DELIVERED), and then, if
    /// two-way, for its reply.
    awaiting: Vec<Tracked>,
}

/// An open RPC as the partition's leader follows it.
struct Tracked {
    rpc: RpcState,
    /// When a session last took it (ms).
    sent_ms: i64,
    /// How many times a session took it.
    sends: u32,
}

impl Tracked {
    fn new(rpc: RpcState) -> Tracked {
        Tracked {
            rpc,
            sent_ms: 0,
            sends: 0,
        }
    }
}

fn now_ms() -> i64 {
    crate::registry::now_ms()
}

impl Leader {
    async fn run(mut self, mut rx: mpsc::Receiver<Action>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                a = rx.recv() => match a {
                    Some(a) => self.act(a).await,
                    None => return,
                },
                _ = tick.tick(), if !self.queued.is_empty() || !self.awaiting.is_empty() => self.retry_queued().await,
            }
        }
    }

    async fn act(&mut self, a: Action) {
        match a {
            Action::AttributeUpdate { device, msg } => {
                let d = Deliver {
                    device,
                    session: None,
                    msg,
                };
                self.downlinks.deliver(None, d).await;
            }
            Action::AttributeResponse {
                device,
                session,
                request_id,
                client_keys,
                shared_keys,
            } => {
                let msg = match self.attribute_response(&device, request_id, client_keys, shared_keys) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(partition = self.partition, error = %e, "attribute response failed");
                        return;
                    }
                };
                let d = Deliver {
                    device,
                    session: Some(session.session),
                    msg,
                };
                self.downlinks.deliver(Some(session.node), d).await;
            }
            Action::ClientRpc {
                device,
                session,
                request_id,
                method,
                params,
            } => {
                let data = serde_json::json!({
                    "method": method,
                    "params": serde_json::from_str::<serde_json::Value>(&params).unwrap_or(serde_json::Value::Null),
                });
                let msg = RuleMsg {
                    msg_type: "TO_SERVER_RPC_REQUEST",
                    data,
                    metadata: BTreeMap::from([
                        ("requestId".to_string(), request_id.to_string()),
                        ("sessionId".to_string(), session.session.to_string()),
                        ("serviceId".to_string(), session.node.to_string()),
                    ]),
                };
                for effect in self.root_chain.run(msg, now_ms()) {
                    match effect {
                        Effect::RpcReply { request_id, body } => {
                            let d = Deliver {
                                device,
                                session: Some(session.session),
                                msg: DownlinkMsg::ClientRpcResponse { request_id, body },
                            };
                            self.downlinks.deliver(Some(session.node), d).await;
                        }
                    }
                }
            }
            Action::Lead(open) => {
                tracing::info!(
                    partition = self.partition,
                    rpcs = open.len(),
                    "taking over the partition's open RPCs"
                );
                self.queued.clear();
                self.awaiting.clear();
                let now = now_ms();
                for r in open {
                    if self.queued.len() + self.awaiting.len() >= RPCS_TRACKED_MAX {
                        tracing::warn!(
                            partition = self.partition,
                            "too many open RPCs to take over; the rest wait"
                        );
                        break;
                    }
                    match r.status {
                        RpcStatus::Queued => self.queued.push(Tracked::new(r)),
                        // A one-way RPC the device acknowledged: nothing more to wait for.
                        RpcStatus::Delivered if r.oneway => {}
                        // Sent by the previous leader: the device has the usual time to
                        // acknowledge it from now on.
                        _ => self.awaiting.push(Tracked {
                            rpc: r,
                            sent_ms: now,
                            sends: 1,
                        }),
                    }
                }
            }
            Action::Follow => {
                self.queued.clear();
                self.awaiting.clear();
            }
            Action::Rpc(r) => {
                let mut t = Tracked::new(r);
                let of_device = || {
                    self.queued
                        .iter()
                        .chain(&self.awaiting)
                        .filter(|o| o.rpc.device == t.rpc.device)
                        .count()
                };
                if self.queued.len() + self.awaiting.len() >= RPCS_TRACKED_MAX
                    || of_device() >= RPCS_PER_DEVICE_MAX
                {
                    // Bounded like everything else: refuse rather than grow without end, and
                    // one device cannot take the whole partition's room.
                    tracing::warn!(partition = self.partition, "too many open RPCs; new one failed");
                    self.record_status(&t.rpc, RpcStatus::Failed).await;
                } else if self.send_rpc(&mut t).await {
                    self.awaiting.push(t);
                } else {
                    self.queued.push(t);
                }
            }
        }
    }

    fn attribute_response(
        &self,
        device: &EntityId,
        request_id: u32,
        client_keys: Option<Vec<String>>,
        shared_keys: Option<Vec<String>>,
    ) -> anyhow::Result<DownlinkMsg> {
        let all = client_keys.is_none() && shared_keys.is_none();
        let mut found = [Vec::new(), Vec::new()];
        for (slot, scope, keys) in [(0, Scope::Client, client_keys), (1, Scope::Shared, shared_keys)] {
            let keys = match keys {
                Some(k) => k,
                None if all => Vec::new(),
                None => continue,
            };
            // An empty list asks for nothing, unless nothing at all was asked (then: all).
            if keys.is_empty() && !all {
                continue;
            }
            found[slot] = self
                .store
                .attributes(device, scope, &keys)?
                .into_iter()
                .map(|(key, tv)| AttrKv {
                    key,
                    ts_ms: tv.ts_ms,
                    value: tv.value,
                })
                .collect();
        }
        let [client, shared] = found;
        Ok(DownlinkMsg::AttributeResponse {
            request_id,
            client,
            shared,
        })
    }

    /// Hands the RPC to the device's sessions; records SENT when one took it (the session
    /// records DELIVERED when the device acknowledges it).
    async fn send_rpc(&self, t: &mut Tracked) -> bool {
        let r = &t.rpc;
        let d = Deliver {
            device: r.device,
            session: None,
            msg: DownlinkMsg::RpcRequest {
                id: r.id,
                method: r.method.clone(),
                params: r.params.clone(),
                uuid: r.uuid,
            },
        };
        if self.downlinks.deliver(None, d).await == 0 {
            return false;
        }
        t.sent_ms = now_ms();
        t.sends += 1;
        // Not appended: the RPC reads QUEUED a little longer, and DELIVERED follows anyway.
        let _ = self.record_status(r, RpcStatus::Sent).await;
        true
    }

    /// Appends the RPC's new status; false if it could not be appended.
    async fn record_status(&self, r: &RpcState, status: RpcStatus) -> bool {
        let ingest = Ingest {
            tenant: r.tenant,
            device: r.device,
            ts_ms: now_ms(),
            session: None,
            msg: IngestMsg::RpcStatus { uuid: r.uuid, status },
        };
        let rec = Record::new(r.device.to_vec(), PartitionRecord::Ingest(ingest).encode());
        match self.log.append(self.partition, vec![rec]).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(partition = self.partition, error = %e, "rpc status not recorded");
                false
            }
        }
    }

    /// The RPC's status as the store holds it now.
    fn stored_status(&self, r: &RpcState) -> Option<RpcStatus> {
        self.store.rpc(&r.uuid).ok().flatten().map(|s| s.status)
    }

    /// Every tick: sends the queued RPCs to sessions that can take them now, sends again the
    /// ones not acknowledged in time, and ends the ones whose time is up.
    async fn retry_queued(&mut self) {
        let now = now_ms();
        let queued = std::mem::take(&mut self.queued);
        let awaiting = std::mem::take(&mut self.awaiting);
        for t in queued.into_iter().chain(awaiting) {
            self.follow_up(t, now).await;
        }
    }

    async fn follow_up(&mut self, mut t: Tracked, now: i64) {
        let status = self.stored_status(&t.rpc);
        // Answered, deleted or otherwise ended (here or by an earlier leader): nothing to do.
        if status.is_some_and(RpcStatus::is_final) {
            return;
        }
        let delivered = status == Some(RpcStatus::Delivered);
        // A one-way RPC the device acknowledged is done.
        if delivered && t.rpc.oneway {
            return;
        }
        let end = if now >= t.rpc.expiration_ms {
            // ThingsBoard: TIMEOUT if it was sent, else it expired without a connection.
            Some(if t.sends > 0 {
                RpcStatus::Timeout
            } else {
                RpcStatus::Expired
            })
        } else if delivered || (t.sends > 0 && now - t.sent_ms < self.ack_timeout_ms) {
            // Waiting for the reply, or still for the acknowledgement.
            self.awaiting.push(t);
            return;
        } else if t.sends == 0 || !t.rpc.persistent {
            // Never taken, or a plain RPC not acknowledged in time: sent again until it expires
            // (an HTTP long poll may have dropped it, a CoAP device may still be asleep).
            None
        } else if t.sends >= self.sends_max {
            tracing::info!(
                partition = self.partition,
                sends = t.sends,
                "RPC never acknowledged"
            );
            Some(RpcStatus::Failed)
        } else {
            // A persistent one is sent again, as ThingsBoard retries, until the sends run out.
            None
        };
        match end {
            Some(status) => {
                // Kept (and tried again next tick) until its end is recorded.
                if !self.record_status(&t.rpc, status).await {
                    self.queued.push(t);
                }
            }
            None if self.send_rpc(&mut t).await => self.awaiting.push(t),
            None => self.queued.push(t),
        }
    }
}
