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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use thingraft_log::{LogHandle, Record};
use thingraft_proto::device::Value;
use thingraft_proto::records::{EntityId, Ingest, IngestMsg, Outcome, PartitionRecord, Scope};
use tokio::sync::watch;

use crate::store::{Batch, Progress, Store};

/// Ingest records held in memory between their commit and their outcome; beyond this the
/// shard forgets them and re-reads them from the log when their outcome arrives.
const PENDING_MAX: usize = 200_000;

pub struct Shard {
    pub partition: u32,
    pub log: LogHandle,
    pub store: Arc<Store>,
    /// `processed_upto` after each apply, for readers that wait for their write.
    pub applied_tx: watch::Sender<u64>,
}

struct State {
    processed_upto: u64,
    /// Every ingest record from `pending_from` up to the tail's position is in `pending`.
    pending: VecDeque<(u64, Ingest)>,
    pending_from: u64,
    /// Next offset the tail will deliver.
    seen_upto: u64,
    last_ingest: Option<u64>,
}

impl Shard {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if let Err(e) = self.run_inner(&mut shutdown).await
            && !*shutdown.borrow()
        {
            tracing::error!(partition = self.partition, error = %e, "engine shard stopped");
        }
    }

    async fn run_inner(&self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let p = self.partition;
        let progress = self.store.progress(p)?;
        let mut st = State {
            processed_upto: progress.processed_upto,
            pending: VecDeque::new(),
            pending_from: progress.processed_upto,
            seen_upto: progress.processed_upto,
            last_ingest: None,
        };
        self.applied_tx.send_replace(st.processed_upto);
        let mut tail = self.log.tail(p, st.processed_upto)?;
        let mut proposed_upto = st.processed_upto;
        let mut in_flight: Option<tokio::task::JoinHandle<bool>> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = tail.recv() => {
                    let Some(batch) = batch else { return Ok(()) };
                    let batch = batch?;
                    self.absorb(&mut st, batch.records)?;
                }
                ok = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    if !matches!(ok, Ok(true)) {
                        // Not appended (or unknown): propose again from what is applied.
                        proposed_upto = st.processed_upto;
                    }
                }
                _ = tick.tick() => {}
                () = crate::stopped(shutdown) => return Ok(()),
            }
            if in_flight.is_none()
                && let Some(term) = self.log.leader_term(p)
            {
                let from = proposed_upto.max(st.processed_upto);
                if st.last_ingest.is_some_and(|o| o >= from) && st.seen_upto > from {
                    let to = st.seen_upto;
                    let rec = PartitionRecord::Outcome(Outcome { from, to, term }).encode();
                    let log = self.log.clone();
                    proposed_upto = to;
                    in_flight = Some(tokio::spawn(async move {
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
    fn absorb(&self, st: &mut State, records: Vec<thingraft_log::StoredRecord>) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        let mut applied_any = false;
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
                    apply_default(&self.store, &mut batch, &inputs);
                    st.processed_upto = o.to;
                    applied_any = true;
                }
                Err(e) => {
                    // Transports validate before appending; a record that does not decode is
                    // from a newer format or damaged. Skip it, loudly, so the partition goes on.
                    tracing::error!(partition = self.partition, offset = r.offset, error = %e, "undecodable record skipped");
                }
            }
        }
        if applied_any {
            batch.progress(
                self.partition,
                Progress {
                    processed_upto: st.processed_upto,
                },
            );
            self.store.write(batch)?;
            self.applied_tx.send_replace(st.processed_upto);
        }
        Ok(())
    }

    /// The ingest records with offsets in `from .. to`, from memory or, if they were dropped,
    /// from the log.
    fn take(&self, st: &mut State, from: u64, to: u64) -> anyhow::Result<Vec<Ingest>> {
        let mut out = Vec::new();
        if from < st.pending_from {
            let mut next = from;
            let upto = to.min(st.pending_from);
            while next < upto {
                let r = self.log.read(self.partition, next, 4096)?;
                if r.records.is_empty() {
                    anyhow::bail!(
                        "partition {} offsets {next}..{upto} are no longer retained",
                        self.partition
                    );
                }
                for rec in r.records {
                    if rec.offset >= upto {
                        break;
                    }
                    next = rec.offset + 1;
                    if let Ok(PartitionRecord::Ingest(i)) = PartitionRecord::decode(&rec.value) {
                        out.push(i);
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
                out.push(i);
            }
        }
        st.pending_from = st.pending_from.max(to);
        Ok(out)
    }
}

/// The effect of the default root rule chain on each input, in order.
fn apply_default(store: &Store, batch: &mut Batch, inputs: &[Ingest]) {
    // Device activity, once per device per batch: the latest time wins.
    let mut activity: HashMap<EntityId, i64> = HashMap::new();
    for i in inputs {
        let d = &i.device;
        match &i.msg {
            IngestMsg::Telemetry(groups) | IngestMsg::SaveTelemetry(groups) => {
                for g in groups {
                    for (k, v) in &g.values {
                        batch.telemetry(store, d, k, g.ts_ms, v);
                    }
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
                }
            }
            IngestMsg::Connect => {
                batch.attribute(
                    d,
                    Scope::Server,
                    "lastConnectTime",
                    i.ts_ms,
                    &Value::Long(i.ts_ms),
                );
                batch.attribute(d, Scope::Server, "active", i.ts_ms, &Value::Bool(true));
            }
            IngestMsg::Disconnect => {
                batch.attribute(
                    d,
                    Scope::Server,
                    "lastDisconnectTime",
                    i.ts_ms,
                    &Value::Long(i.ts_ms),
                );
            }
        }
        if i.session.is_some() {
            let e = activity.entry(*d).or_insert(i.ts_ms);
            *e = (*e).max(i.ts_ms);
        }
    }
    for (d, ts) in activity {
        batch.attribute(&d, Scope::Server, "lastActivityTime", ts, &Value::Long(ts));
    }
}
