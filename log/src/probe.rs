//! A latency probe for finding where a message's time goes: log2 histograms of a few stages of
//! the append path, and of the tokio scheduler's queueing delay, printed to the log every 3 s
//! (or every `THINGRAFT_PROBE_MS` ms).
//! Off unless the node runs with `THINGRAFT_PROBE=1` ([`start`]); when off, [`rec`] is one
//! relaxed load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The stages measured.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    /// MQTT: a message read from the socket until its session's append starts.
    SessionQueue,
    /// MQTT: a session's append, from its start until all of its records are committed.
    SessionAppend,
    /// A partition's batcher: an append handed to it until it is proposed.
    BatcherWait,
    /// A proposal until the state machine has applied it and answered.
    ProposalToApplied,
    /// A proposal until it is committed (for appends answered at the commit).
    ProposalToCommitted,
    /// A task's `yield_now` until it runs again: how long ready tasks wait for a worker.
    SchedulerDelay,
    /// The log's write and fsync of one round of appends (the syncer thread).
    Fsync,
}

const STAGES: [(Stage, &str); 7] = [
    (Stage::SessionQueue, "mqtt session queue"),
    (Stage::SessionAppend, "mqtt session append"),
    (Stage::BatcherWait, "batcher wait"),
    (Stage::ProposalToApplied, "proposal to applied"),
    (Stage::ProposalToCommitted, "proposal to committed"),
    (Stage::SchedulerDelay, "scheduler delay"),
    (Stage::Fsync, "log write and fsync"),
];

const BUCKETS: usize = 40;
static ENABLED: AtomicBool = AtomicBool::new(false);
static HIST: [[AtomicU64; BUCKETS]; STAGES.len()] =
    [const { [const { AtomicU64::new(0) }; BUCKETS] }; STAGES.len()];

/// Counts `d` for `stage` when the probe runs.
pub fn rec(stage: Stage, d: Duration) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let us = d.as_micros() as u64;
    let bucket = (64 - us.leading_zeros()) as usize;
    HIST[stage as usize][bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
}

/// Starts the probe if `THINGRAFT_PROBE` is set: a reporter thread, and a task on the current
/// runtime that measures its scheduler's delay every millisecond.
pub fn start() {
    if std::env::var_os("THINGRAFT_PROBE").is_none() || ENABLED.swap(true, Ordering::Relaxed) {
        return;
    }
    // The scheduler-delay sampler wakes the runtime every millisecond, which changes how it
    // parks: `THINGRAFT_PROBE_TICK=0` leaves it out.
    if std::env::var("THINGRAFT_PROBE_TICK").as_deref() != Ok("0") {
        tokio::spawn(async {
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let t = Instant::now();
                tokio::task::yield_now().await;
                rec(Stage::SchedulerDelay, t.elapsed());
            }
        });
    }
    // Every 3 s, or every `THINGRAFT_PROBE_MS` ms (short windows line up with background work
    // such as RocksDB's memtable flushes, which last a few hundred ms).
    let every = std::env::var("THINGRAFT_PROBE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_millis);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(every);
            for (stage, name) in STAGES {
                let counts: Vec<u64> = HIST[stage as usize]
                    .iter()
                    .map(|a| a.swap(0, Ordering::Relaxed))
                    .collect();
                let n: u64 = counts.iter().sum();
                if n > 0 {
                    // The bucket's upper bound, in µs, below which fraction `q` of the samples lie.
                    let below = |q: f64| {
                        let mut seen = 0;
                        for (b, c) in counts.iter().enumerate() {
                            seen += c;
                            if seen as f64 >= q * n as f64 {
                                return 1u64 << b;
                            }
                        }
                        1u64 << (BUCKETS - 1)
                    };
                    let max = counts.iter().rposition(|c| *c > 0).map_or(0, |b| 1u64 << b);
                    tracing::info!(
                        target: "thingraft::probe",
                        "{name}: n={n} p50<{}µs p90<{}µs p99<{}µs max<{max}µs",
                        below(0.5),
                        below(0.9),
                        below(0.99)
                    );
                }
            }
        }
    });
}
