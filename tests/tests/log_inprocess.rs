//! An in-process 3-node cluster (real RocksDB, real gRPC on loopback): the leader of a partition
//! crashes under append load and restarts; every acknowledged record survives exactly once, in
//! offset order, on every replica.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thingraft_log::{LogClient, LogConfig, LogNode, NodeId};
use thingraft_tests::{Ledger, check_replicas, free_ports, spawn_load};

fn config(id: NodeId, members: &BTreeMap<NodeId, String>, dir: &std::path::Path) -> LogConfig {
    LogConfig {
        node_id: id,
        advertise_addr: members[&id].clone(),
        data_dir: dir.join(format!("n{id}")),
        partitions: 4,
        members: members.clone(),
        heartbeat_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        // Small snapshots interval so the restarted node also exercises snapshot + purge.
        snapshot_every_entries: 200,
        entries_kept_after_snapshot: 50,
        // Small chunks, so that snapshots travel in many pieces.
        snapshot_chunk_bytes: 4096,
        ..LogConfig::default()
    }
}

async fn start(id: NodeId, members: &BTreeMap<NodeId, String>, dir: &std::path::Path) -> LogNode {
    let listener = tokio::net::TcpListener::bind(&members[&id]).await.expect("bind");
    LogNode::start(config(id, members, dir), listener)
        .await
        .expect("start node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_and_restart_under_load_keeps_every_acked_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let members: BTreeMap<NodeId, String> = free_ports(3)
        .iter()
        .enumerate()
        .map(|(i, p)| (i as NodeId + 1, format!("127.0.0.1:{p}")))
        .collect();
    let mut nodes: BTreeMap<NodeId, LogNode> = BTreeMap::new();
    for id in members.keys() {
        nodes.insert(*id, start(*id, &members, dir.path()).await);
    }
    for n in nodes.values() {
        n.handle()
            .wait_for_leaders(Duration::from_secs(20))
            .await
            .expect("leaders");
    }

    let client = Arc::new(LogClient::connect(&members[&1]).await.unwrap());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(client.clone(), 4, 16, ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Crash the leader of partition 0 (as node 1 sees it).
    let victim = nodes[&1]
        .handle()
        .status()
        .groups
        .iter()
        .find(|g| g.group == 1)
        .unwrap()
        .leader;
    assert_ne!(victim, 0, "partition 0 has a leader");
    let acked_before = ledger.lock().unwrap().acked.len();
    nodes.remove(&victim).unwrap().shutdown().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.insert(victim, start(victim, &members, dir.path()).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.await.unwrap();
    }

    let ledger = Arc::try_unwrap(ledger)
        .expect("load finished")
        .into_inner()
        .unwrap();
    assert!(acked_before > 0, "load was acknowledged before the crash");
    assert!(
        ledger.acked.len() > acked_before,
        "load was acknowledged after the crash"
    );
    // The restarted node fell more than `entries_kept_after_snapshot` behind, so the leaders
    // sent it snapshots (chunked by thingraft's own transfer, openraft 0.10 has none).
    let installed = |n: &LogNode| -> u64 {
        n.handle()
            .status()
            .groups
            .iter()
            .map(|g| g.snapshots_installed)
            .sum()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while installed(&nodes[&victim]) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        installed(&nodes[&victim]) > 0,
        "the restarted node installed no snapshot"
    );
    let ids: Vec<NodeId> = members.keys().copied().collect();
    let total = check_replicas(&client, &ids, 4, &ledger, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(total >= ledger.acked.len());
    for (_, n) in nodes {
        n.shutdown().await;
    }
}
