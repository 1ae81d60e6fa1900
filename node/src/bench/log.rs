//! `thingraft bench log`: a closed loop with `--inflight` records outstanding, spread evenly
//! over the partitions. Each partition keeps its share as the submit times of its waiting
//! records and sends whatever is waiting in one append request (like a Kafka producer with
//! linger 0), at most `--requests-per-partition` requests at a time. When a request is
//! acknowledged, each of its records is measured (submit → commit ack) and replaced by a new
//! record submitted at that instant. No task or channel per record: the load generator shares
//! the 2 cores with the nodes, so its own cost per record is kept small.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use thingraft_log::{LogClient, LogError, Record};
use tokio::task::JoinSet;

#[derive(clap::Args)]
pub struct Args {
    /// Any node of the cluster (gRPC address).
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// Record value size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Records in flight.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds before.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Most records per append request.
    #[arg(long, default_value_t = 1024)]
    request_records_max: usize,
    /// Append requests in flight per partition.
    #[arg(long, default_value_t = 2)]
    requests_per_partition: usize,
    /// Use only the first N partitions (0: all).
    #[arg(long, default_value_t = 0)]
    partitions: u32,
    /// Send each append as a unary `Append` call instead of on the node's `AppendStream`.
    #[arg(long)]
    unary: bool,
}

/// What one partition's loop needs.
struct Load {
    client: Arc<LogClient>,
    partition: u32,
    /// This partition's share of the records in flight.
    records: usize,
    max: usize,
    requests_max: usize,
    value: Bytes,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
}

/// Keeps `records` records of one partition outstanding until `stop`; returns their latencies.
async fn partition_load(l: Load) -> Histogram<u64> {
    let mut h = super::histogram();
    let key = Bytes::from(format!("bench-{}", l.partition));
    let now = Instant::now();
    let mut waiting: VecDeque<Instant> = std::iter::repeat_n(now, l.records).collect();
    let mut requests: JoinSet<(Vec<Instant>, Result<(), LogError>)> = JoinSet::new();
    loop {
        let stopping = l.stop.load(Ordering::Relaxed);
        while !stopping && requests.len() < l.requests_max && !waiting.is_empty() {
            let n = waiting.len().min(l.max);
            let submitted: Vec<Instant> = waiting.drain(..n).collect();
            let records = vec![
                Record {
                    key: key.clone(),
                    value: l.value.clone(),
                };
                n
            ];
            let (client, partition) = (l.client.clone(), l.partition);
            requests.spawn(async move {
                let res = client.append(partition, records).await.map(|_| ());
                (submitted, res)
            });
        }
        let Some(done) = requests.join_next().await else {
            return h;
        };
        let Ok((submitted, res)) = done else {
            return h;
        };
        let now = Instant::now();
        match res {
            Ok(()) => {
                if l.measuring.load(Ordering::Relaxed) {
                    for t0 in &submitted {
                        h.saturating_record(now.duration_since(*t0).as_micros() as u64);
                    }
                }
            }
            Err(_) => {
                l.errors.fetch_add(submitted.len() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Each answered record is replaced by a new one, submitted now.
        waiting.extend(std::iter::repeat_n(Instant::now(), submitted.len()));
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.inflight > 0 && a.size > 0, "--inflight and --size must be > 0");
    let mut client = LogClient::connect(&a.addr).await?;
    client.streamed = !a.unary;
    let client = Arc::new(client);
    client.refresh_leaders().await;
    let partitions = if a.partitions == 0 {
        client.partitions()
    } else {
        a.partitions.min(client.partitions())
    };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let value = Bytes::from(vec![b'x'; a.size]);
    let mut workers = Vec::new();
    for p in 0..partitions {
        // Record w of the old one-task-per-record model went to partition w % partitions.
        let share =
            a.inflight / partitions as usize + usize::from((p as usize) < a.inflight % partitions as usize);
        if share == 0 {
            continue;
        }
        workers.push(tokio::spawn(partition_load(Load {
            client: client.clone(),
            partition: p,
            records: share,
            max: a.request_records_max,
            requests_max: a.requests_per_partition.max(1),
            value: value.clone(),
            measuring: measuring.clone(),
            stop: stop.clone(),
            errors: errors.clone(),
        })));
    }
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let before = server_counters(&client).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let after = server_counters(&client).await;
    stop.store(true, Ordering::Relaxed);
    let mut h = super::histogram();
    for w in workers {
        h.add(w.await?)?;
    }
    let acked = h.len();
    let nodes = client.node_ids().len();
    let d = |i: usize| after[i].saturating_sub(before[i]);
    let (fs, batches, batched, commit_us, fsync_us) = (d(0), d(1), d(2), d(3), d(4));
    let per = |a: f64, b: u64| if b > 0 { a / b as f64 } else { 0.0 };
    let extra = format!(
        "nodes: {nodes}, partitions used: {partitions}, in flight: {}, record: {} B, errors: {}\n\
         server: fsyncs (all nodes) {fs}, records per fsync per node {:.1}, raft entries {batches}, \
         records per entry {:.1}, mean proposal-to-commit {:.0} µs, mean fsync {:.0} µs",
        a.inflight,
        a.size,
        errors.load(Ordering::Relaxed),
        per(acked as f64 * nodes as f64, fs),
        per(batched as f64, batches),
        per(commit_us as f64, batches),
        per(fsync_us as f64, fs),
    );
    super::report(
        &format!("thingraft-log nodes={nodes}"),
        acked,
        elapsed,
        &h,
        &extra,
    );
    Ok(())
}

/// Summed over nodes: fsyncs, batches, batched records, commit µs, fsync µs.
async fn server_counters(client: &LogClient) -> [u64; 5] {
    let mut c = [0u64; 5];
    for id in client.node_ids() {
        if let Ok(s) = client.status(id).await {
            c[0] += s.fsyncs;
            c[4] += s.fsync_us_total;
            for g in &s.groups {
                c[1] += g.batches;
                c[2] += g.batched_records;
                c[3] += g.commit_us_total;
            }
        }
    }
    c
}
