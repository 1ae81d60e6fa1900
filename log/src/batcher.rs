//! Group commit at a partition leader: concurrent appends become one Raft entry.
//!
//! The batcher takes the first waiting append, waits for one of `inflight_entries_max` slots,
//! then takes every append that queued meanwhile (up to the batch bounds) and proposes them as
//! one entry. With nothing in flight an append is proposed at once (lowest latency); under load
//! appends pile up while earlier entries commit, so batches grow with the load (highest
//! throughput). Proposals are made in queue order, so appends keep their order in the log.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::errors::ClientWriteError;
use openraft::raft::ClientWriteResult;
use openraft::raft::responder::Responder;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::LogError;
use crate::probe::{self, Stage};
use crate::types::{Command, Raft, Record, Response, TypeConfig};

/// Offsets given to one append's records: `first_offset .. first_offset + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_offset: u64,
    pub count: u32,
}

/// One append waiting for its batch to commit.
pub(crate) struct AppendJob {
    /// When the append was handed over (for the latency probe).
    pub at: std::time::Instant,
    pub records: Vec<Record>,
    pub bytes: usize,
    pub reply: Reply,
}

/// Where and when an append is answered.
pub(crate) enum Reply {
    /// Once its entry is applied, with the offsets its records got.
    Applied(oneshot::Sender<Result<Appended, LogError>>),
    /// As soon as its entry is committed (on a majority, each of which fsynced it), before it
    /// is applied: its offsets are not known yet. Decision 0021.
    Committed(oneshot::Sender<Result<(), LogError>>),
}

impl Reply {
    fn fail(self, e: LogError) {
        match self {
            Reply::Applied(tx) => {
                let _ = tx.send(Err(e));
            }
            Reply::Committed(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub records_max: usize,
    pub bytes_max: usize,
    pub inflight_max: usize,
}

pub(crate) struct Batcher {
    pub partition: u32,
    pub raft: Raft,
    pub rx: mpsc::Receiver<AppendJob>,
    pub limits: BatchLimits,
    pub metrics: Arc<crate::metrics::PartitionMetrics>,
}

/// openraft's responder for thingraft: a closure called once with the outcome of the proposal,
/// and optionally one called when its entry commits (before it is applied).
pub struct FnResponder<T> {
    complete: Box<dyn FnOnce(T) + Send + 'static>,
    commit: Option<Box<dyn FnOnce() + Send + 'static>>,
}

impl<T> FnResponder<T> {
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> Self {
        Self {
            complete: Box::new(f),
            commit: None,
        }
    }

    /// Also calls `f` when the entry is committed: openraft calls it on the node that proposed
    /// the entry (a leader then, perhaps not any more) once its commit index passes the entry,
    /// right before the entry goes to the state machine. An entry truncated at a leader change
    /// never gets it (its proposal fails with `LogEntryDiscarded`, answered as `Ambiguous`).
    pub fn on_commit(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.commit = Some(Box::new(f));
        self
    }
}

impl<T: Send + 'static> Responder<TypeConfig, T> for FnResponder<T> {
    fn on_commit(&mut self, _log_id: openraft::type_config::alias::LogIdOf<TypeConfig>) {
        if let Some(f) = self.commit.take() {
            f()
        }
    }

    fn on_complete(self, result: T) {
        (self.complete)(result)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn client_write_error(partition: u32, e: ClientWriteError<TypeConfig>) -> LogError {
    match e {
        // Refused before its entry was appended: it did not commit and may be retried.
        ClientWriteError::ForwardToLeader(f) => LogError::NotLeader {
            partition,
            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        },
        // Appended, then truncated or purged at a leader change: it may still have committed
        // elsewhere, so a retry could store the records twice.
        ClientWriteError::LogEntryDiscarded(_) => LogError::Ambiguous {
            reason: "entry discarded at a leader change; commit status unknown".into(),
        },
        ClientWriteError::ChangeMembershipError(e) => LogError::Internal(e.to_string()),
        ClientWriteError::PreconditionFailed(e) => LogError::Internal(e.to_string()),
    }
}

impl Batcher {
    pub async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(self.limits.inflight_max));
        let mut carry: Option<AppendJob> = None;
        loop {
            let first = match carry.take() {
                Some(j) => j,
                None => match self.rx.recv().await {
                    Some(j) => j,
                    None => return,
                },
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            // With other entries of this partition in flight the batch cannot commit before
            // them anyway: let the tasks that are ready run once (sessions reading their
            // sockets), so that what they append joins this entry. A timed wait did worse: tokio's
            // timers tick in whole milliseconds, and every entry waited one or two (BENCHMARKS.md,
            // 2026-11-27). With none in flight, propose at once so that an idle partition keeps
            // its latency.
            if slots.available_permits() + 1 < self.limits.inflight_max {
                tokio::task::yield_now().await;
            }
            let mut records = first.records;
            let mut bytes = first.bytes;
            let mut replies = vec![(Some(first.reply), records.len() as u32)];
            while records.len() < self.limits.records_max && bytes < self.limits.bytes_max {
                let Ok(job) = self.rx.try_recv() else { break };
                if records.len() + job.records.len() > self.limits.records_max
                    || bytes + job.bytes > self.limits.bytes_max
                {
                    carry = Some(job);
                    break;
                }
                bytes += job.bytes;
                replies.push((Some(job.reply), job.records.len() as u32));
                records.extend(job.records);
            }
            probe::rec(Stage::BatcherWait, first.at.elapsed());
            self.metrics.observe_batch(records.len(), bytes);
            let partition = self.partition;
            let metrics = self.metrics.clone();
            let proposed = std::time::Instant::now();
            let early = replies
                .iter()
                .any(|(r, _)| matches!(r, Some(Reply::Committed(_))));
            // Taken by whichever answers the appends: the responder, or the refusal below.
            let replies = Arc::new(std::sync::Mutex::new(Some(replies)));
            let in_responder = replies.clone();
            // Called by the state machine right after the entry is applied (or by openraft when
            // the proposal fails): the appends are answered there, with no task in between.
            let mut responder = FnResponder::new(move |outcome: ClientWriteResult<TypeConfig>| {
                drop(permit);
                let Some(replies) = in_responder.lock().expect("replies lock").take() else {
                    return;
                };
                probe::rec(Stage::ProposalToApplied, proposed.elapsed());
                metrics.observe_commit(proposed.elapsed().as_micros() as u64);
                let result = match outcome {
                    Ok(resp) => match resp.data {
                        Response::Appended { first_offset, .. } => Ok(first_offset),
                        other => Err(LogError::Internal(format!("unexpected apply result {other:?}"))),
                    },
                    Err(e) => Err(client_write_error(partition, e)),
                };
                let mut offset = result.as_ref().copied().unwrap_or(0);
                for (reply, count) in replies {
                    let first_offset = offset;
                    offset += u64::from(count);
                    match (reply, &result) {
                        // Answered at the commit already.
                        (None, _) => {}
                        (Some(Reply::Applied(tx)), Ok(_)) => {
                            let _ = tx.send(Ok(Appended { first_offset, count }));
                        }
                        (Some(Reply::Committed(tx)), Ok(_)) => {
                            let _ = tx.send(Ok(()));
                        }
                        (Some(reply), Err(e)) => reply.fail(e.clone()),
                    }
                }
            });
            // Enqueued appends are answered as soon as openraft reports the commit, before the
            // state machine's task applies the entry (decision 0021).
            if early {
                let at_commit = replies.clone();
                responder = responder.on_commit(move || {
                    probe::rec(Stage::ProposalToCommitted, proposed.elapsed());
                    let mut replies = at_commit.lock().expect("replies lock");
                    for (reply, _) in replies.iter_mut().flatten() {
                        if matches!(reply, Some(Reply::Committed(_)))
                            && let Some(Reply::Committed(tx)) = reply.take()
                        {
                            let _ = tx.send(Ok(()));
                        }
                    }
                });
            }
            let command = Command::Append {
                batch: crate::batch::encode(now_ms(), &records).into(),
            };
            if let Err(fatal) = self.raft.client_write_ff(command, Some(responder)).await {
                // Refused before it was proposed: nothing of it can commit.
                tracing::warn!(partition, error = %fatal, "raft stopped; failing batch");
                if let Some(replies) = replies.lock().expect("replies lock").take() {
                    for (reply, _) in replies {
                        if let Some(reply) = reply {
                            reply.fail(LogError::ShuttingDown);
                        }
                    }
                }
            }
        }
    }
}
