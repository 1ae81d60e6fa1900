//! Bad input to a node's gRPC API gets a clear error code; the node stays up and its data is
//! unchanged.

use std::time::Duration;

use futures::StreamExt;
use openraft::testing::log_id;
use thingraft_log::network::SnapshotChunk;
use thingraft_log::types::{SnapshotMeta, TypeConfig, Vote};
use thingraft_log::{LogConfig, LogNode};
use thingraft_proto::v1::log_client::LogClient;
use thingraft_proto::v1::raft_client::RaftClient;
use thingraft_proto::v1::{AppendRequest, RaftRequest, Record, StatusRequest};
use tonic::Code;

async fn offsets(c: &mut LogClient<tonic::transport::Channel>) -> Vec<(u32, u64, u64)> {
    let s = c.status(StatusRequest {}).await.unwrap().into_inner();
    s.groups
        .iter()
        .map(|g| (g.group, g.next_offset, g.applied_index))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_its_code_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cfg = LogConfig {
        advertise_addr: addr.clone(),
        data_dir: dir.path().to_path_buf(),
        partitions: 2,
        record_bytes_max: 1024,
        batch_bytes_max: 4096,
        ..LogConfig::default()
    };
    let node = LogNode::start(cfg, listener).await.unwrap();
    node.handle()
        .wait_for_leaders(Duration::from_secs(10))
        .await
        .unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut log = LogClient::new(ch.clone());
    let mut raft = RaftClient::new(ch);

    // One good append so there is data to keep unchanged.
    let good = AppendRequest {
        partition: 0,
        records: vec![Record {
            key: "k".into(),
            value: "v".into(),
        }],
    };
    log.append(good.clone()).await.unwrap();
    // The node's own start-up entries (each group's first blank entry, the metadata it
    // publishes) may still be applying: wait until nothing moves, so that what is compared below
    // can only have been changed by the bad input.
    let before = settled(&mut log).await;

    let unknown = AppendRequest {
        partition: 7,
        records: good.records.clone(),
    };
    assert_eq!(
        log.append(unknown.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let big = AppendRequest {
        partition: 0,
        records: vec![Record {
            key: "k".into(),
            value: vec![0u8; 2000].into(),
        }],
    };
    assert_eq!(
        log.append(big.clone()).await.unwrap_err().code(),
        Code::OutOfRange
    );

    let empty = AppendRequest {
        partition: 0,
        records: vec![],
    };
    assert_eq!(
        log.append(empty.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // The same on an `AppendStream`: each bad append is answered in order with the code a unary
    // call gets, and the stream goes on.
    let replies: Vec<_> = log
        .append_stream(futures::stream::iter(vec![unknown.clone(), big.clone(), empty]))
        .await
        .expect("stream opens")
        .into_inner()
        .collect()
        .await;
    let codes: Vec<_> = replies
        .into_iter()
        .map(|r| Code::from(r.expect("answered in the stream").error_code))
        .collect();
    assert_eq!(
        codes,
        vec![Code::InvalidArgument, Code::OutOfRange, Code::InvalidArgument]
    );

    let garbage = RaftRequest {
        group: 1,
        payload: vec![0xff; 37].into(),
    };
    assert_eq!(
        raft.append_entries(garbage.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        raft.vote(garbage.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        raft.install_snapshot(garbage.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A replication stream: its first message that does not decode ends it with the error.
    assert_eq!(
        append_stream_error(&mut raft, garbage).await,
        Code::InvalidArgument
    );
    let stray = RaftRequest {
        group: 999,
        payload: vec![].into(),
    };
    assert_eq!(
        raft.append_entries(stray.clone()).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(append_stream_error(&mut raft, stray).await, Code::NotFound);

    // Snapshot chunks: a piece of a transfer that never started, and a snapshot beyond the
    // leadership that sends it (openraft would panic installing it).
    let chunk = |vote_term: u64, last_term: u64, offset: u64| RaftRequest {
        group: 1,
        payload: postcard::to_stdvec(&SnapshotChunk {
            vote: Vote::new_committed(vote_term, 2),
            meta: SnapshotMeta {
                last_log_id: Some(log_id::<TypeConfig>(last_term, 2, 1_000_000)),
                last_membership: Default::default(),
            },
            transfer: 7,
            offset,
            data: vec![0u8; 16].into(),
            done: true,
        })
        .unwrap()
        .into(),
    };
    assert_eq!(
        raft.install_snapshot(chunk(1, 1, 4096)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        raft.install_snapshot(chunk(1, 5, 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(offsets(&mut log).await, before, "bad input changed stored state");

    // Still up and serving, on both paths.
    let r = log.append(good.clone()).await.unwrap().into_inner();
    assert_eq!(r.first_offset, 1);
    let streamed: Vec<_> = log
        .append_stream(futures::stream::iter(vec![good.clone(), good]))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().first_offset)
        .collect()
        .await;
    assert_eq!(streamed, vec![2, 3]);
    node.shutdown().await;
}

/// The groups' offsets once two reads 300 ms apart agree.
async fn settled(c: &mut LogClient<tonic::transport::Channel>) -> Vec<(u32, u64, u64)> {
    let mut last = offsets(c).await;
    for _ in 0..50 {
        // Longer than the node's metadata publisher waits between its tries (500 ms): 300 ms
        // once saw two equal snapshots while its write was still to come.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = offsets(c).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the node's applied state kept moving with no writes: {last:?}");
}

/// Opens a replication stream carrying `first` and returns the error it ends with.
async fn append_stream_error(raft: &mut RaftClient<tonic::transport::Channel>, first: RaftRequest) -> Code {
    let mut replies = raft
        .append_stream(futures::stream::iter(vec![first]))
        .await
        .expect("stream opens")
        .into_inner();
    match replies.message().await {
        Err(s) => s.code(),
        Ok(m) => panic!("stream answered {m:?} instead of an error"),
    }
}
