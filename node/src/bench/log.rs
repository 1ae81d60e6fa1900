//! `thingraft bench log`: N workers each keep one record in flight; a sender per partition packs
//! whatever records are waiting into one append request (like a Kafka producer with linger 0),
//! so N is the number of records in flight, and each record's latency is submit → commit ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thingraft_log::{LogClient, LogError, Record};
use tokio::sync::{mpsc, oneshot};

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
}

type Job = (Record, oneshot::Sender<Result<(), LogError>>);

/// Sends one partition's waiting records: at most `requests_max` requests in flight, each
/// carrying every record that queued meanwhile (like Kafka's max.in.flight.requests).
async fn partition_sender(
    client: Arc<LogClient>,
    partition: u32,
    mut rx: mpsc::Receiver<Job>,
    max: usize,
    requests_max: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(requests_max));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut records = vec![first.0];
        let mut replies = vec![first.1];
        while records.len() < max {
            match rx.try_recv() {
                Ok((r, tx)) => {
                    records.push(r);
                    replies.push(tx);
                }
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            let res = client.append(partition, records).await.map(|_| ());
            drop(permit);
            for tx in replies {
                let _ = tx.send(res.clone());
            }
        });
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.inflight > 0 && a.size > 0, "--inflight and --size must be > 0");
    let client = Arc::new(LogClient::connect(&a.addr).await?);
    client.refresh_leaders().await;
    let partitions = if a.partitions == 0 {
        client.partitions()
    } else {
        a.partitions.min(client.partitions())
    };
    let mut senders = Vec::new();
    for p in 0..partitions {
        let (tx, rx) = mpsc::channel(a.inflight.max(16));
        tokio::spawn(partition_sender(
            client.clone(),
            p,
            rx,
            a.request_records_max,
            a.requests_per_partition.max(1),
        ));
        senders.push(tx);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let value = Bytes::from(vec![b'x'; a.size]);
    let mut workers = Vec::new();
    for w in 0..a.inflight {
        let tx = senders[w % senders.len()].clone();
        let (measuring, stop, errors, value) =
            (measuring.clone(), stop.clone(), errors.clone(), value.clone());
        workers.push(tokio::spawn(async move {
            let mut h = super::histogram();
            let key = Bytes::from(format!("bench-{w}"));
            while !stop.load(Ordering::Relaxed) {
                let (rtx, rrx) = oneshot::channel();
                let t0 = Instant::now();
                if tx
                    .send((
                        Record {
                            key: key.clone(),
                            value: value.clone(),
                        },
                        rtx,
                    ))
                    .await
                    .is_err()
                {
                    break;
                }
                match rrx.await {
                    Ok(Ok(())) => {
                        if measuring.load(Ordering::Relaxed) {
                            h.saturating_record(t0.elapsed().as_micros() as u64);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            h
        }));
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
