//! The log's API on a single real node (RocksDB on disk, gRPC on loopback): append, read, tail,
//! offsets that survive a restart, and retention.

use std::time::Duration;

use thingraft_log::{LogClient, LogConfig, LogNode, Record, Retention};

fn config(dir: &std::path::Path, addr: &str) -> LogConfig {
    LogConfig {
        advertise_addr: addr.to_string(),
        data_dir: dir.to_path_buf(),
        partitions: 2,
        ..LogConfig::default()
    }
}

async fn start(cfg: LogConfig) -> LogNode {
    let listener = tokio::net::TcpListener::bind(&cfg.advertise_addr).await.unwrap();
    let node = LogNode::start(cfg, listener).await.unwrap();
    node.handle()
        .wait_for_leaders(Duration::from_secs(10))
        .await
        .unwrap();
    node
}

fn addr() -> String {
    format!("127.0.0.1:{}", thingraft_tests::free_ports(1)[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_dense_ordered_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &addr());
    let node = start(cfg.clone()).await;
    let h = node.handle();
    let mut expected = Vec::new();
    for i in 0..50u32 {
        let recs: Vec<Record> = (0..=i % 3)
            .map(|j| Record::new("dev-1", format!("{i}.{j}")))
            .collect();
        let a = h.append(1, recs.clone()).await.unwrap();
        assert_eq!(a.first_offset, expected.len() as u64, "offsets are dense");
        assert_eq!(a.count as usize, recs.len());
        expected.extend(recs.into_iter().map(|r| r.value));
    }
    let read = h.read(1, 0, 10_000).unwrap();
    let got: Vec<_> = read.records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(got, expected);
    assert!(read.records.iter().enumerate().all(|(i, r)| r.offset == i as u64));
    // A read from the middle starts exactly there.
    let mid = h.read(1, 17, 5).unwrap();
    assert_eq!(
        mid.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![17, 18, 19, 20, 21]
    );
    // The other partition is untouched.
    assert!(h.read(0, 0, 10).unwrap().records.is_empty());
    drop(h);
    node.shutdown().await;

    let node = start(cfg).await;
    let again = node.handle().read(1, 0, 10_000).unwrap();
    assert_eq!(
        again.records, read.records,
        "an offset names the same record after a restart"
    );
    let a = node
        .handle()
        .append(1, vec![Record::new("dev-1", "after")])
        .await
        .unwrap();
    assert_eq!(a.first_offset, expected.len() as u64);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_yields_committed_records_in_order_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let a = addr();
    let node = start(config(dir.path(), &a)).await;
    let h = node.handle();
    for i in 0..10 {
        h.append(0, vec![Record::new("k", format!("v{i}"))])
            .await
            .unwrap();
    }
    let mut tail = h.tail(0, 4).unwrap();
    let writer = {
        let h = h.clone();
        tokio::spawn(async move {
            for i in 10..30 {
                h.append(0, vec![Record::new("k", format!("v{i}"))])
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    while seen.len() < 26 {
        let batch = tokio::time::timeout(Duration::from_secs(10), tail.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.extend(
            batch
                .records
                .into_iter()
                .map(|r| (r.offset, String::from_utf8(r.value.to_vec()).unwrap())),
        );
    }
    writer.await.unwrap();
    let want: Vec<_> = (4..30).map(|i| (i as u64, format!("v{i}"))).collect();
    assert_eq!(seen, want);
    drop(tail);
    drop(h);

    // The same through the gRPC client.
    let client = LogClient::connect(&a).await.unwrap();
    let r = client.read_from(1, 0, 28, 10).await.unwrap();
    assert_eq!(
        r.records.iter().map(|x| x.offset).collect::<Vec<_>>(),
        vec![28, 29]
    );
    assert_eq!(r.next_offset, 30);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_batches_but_never_renumbers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention: Retention {
            bytes_max: 4_000,
            age_ms_max: u64::MAX,
        },
        ..config(dir.path(), &addr())
    };
    let node = start(cfg).await;
    let h = node.handle();
    let value = vec![b'x'; 200];
    for _ in 0..100 {
        h.append(0, vec![Record::new("k", value.clone())]).await.unwrap();
    }
    let r = h.read(0, 0, 1000).unwrap();
    assert_eq!(r.next_offset, 100);
    assert!(
        r.start_offset > 50,
        "old batches were dropped (start {})",
        r.start_offset
    );
    assert_eq!(r.records.first().map(|x| x.offset), Some(r.start_offset));
    assert_eq!(r.records.last().map(|x| x.offset), Some(99));
    let kept: usize = r.records.iter().map(|x| x.value.len() + x.key.len()).sum();
    assert!(kept <= 4_000 + 300, "retained {kept} bytes");
    drop(h);
    node.shutdown().await;
}

/// Many appends in flight on one `AppendStream` (the gRPC client's path): each is answered in the
/// order sent, and offsets follow that order; the client survives the node's restart (its stream
/// breaks and a new one is opened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_on_one_stream_are_each_answered_with_their_own_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let a = addr();
    let cfg = config(dir.path(), &a);
    let node = start(cfg.clone()).await;
    let client = std::sync::Arc::new(LogClient::connect(&a).await.unwrap());
    assert!(client.streamed, "the client appends on a stream by default");
    // All in flight at once (in whatever order the tasks run): each must get its own answer.
    let appends: Vec<_> = (0..300u32)
        .map(|i| {
            let recs: Vec<Record> = (0..=i % 2)
                .map(|j| Record::new("k", format!("{i}.{j}")))
                .collect();
            let c = client.clone();
            (i, tokio::spawn(async move { c.append(1, recs).await }))
        })
        .collect();
    let mut answered = Vec::new();
    for (i, t) in appends {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.count, i % 2 + 1);
        answered.push((r.first_offset, i));
    }
    answered.sort_unstable();
    let total: u64 = (0..300u32).map(|i| u64::from(i % 2 + 1)).sum();
    // Dense: every offset is given once, and each append's records are together.
    let mut next = 0u64;
    for (first, i) in &answered {
        assert_eq!(*first, next, "offsets are dense");
        next += u64::from(i % 2 + 1);
    }
    assert_eq!(next, total);
    let read = node.handle().read(1, 0, 10_000).unwrap();
    for (first, i) in &answered {
        let v = &read.records[*first as usize].value;
        assert_eq!(
            v.as_ref(),
            format!("{i}.0").as_bytes(),
            "offset {first} holds append {i}"
        );
    }

    // In order of sending, on one stream: a task that sends one after another sees increasing
    // offsets (each waits for its answer here, so this checks the reply matching, too).
    let mut last = None;
    for i in 0..20 {
        let r = client
            .append(0, vec![Record::new("k", format!("o{i}"))])
            .await
            .unwrap();
        assert!(last.is_none_or(|l| r.first_offset == l + 1));
        last = Some(r.first_offset);
    }

    // The node restarts: the stream breaks; the next append opens a new one.
    node.shutdown().await;
    let node = start(cfg).await;
    let r = client.append(0, vec![Record::new("k", "after")]).await.unwrap();
    assert_eq!(r.first_offset, 20);
    node.shutdown().await;
}
