//! Three `thingraft serve` processes on loopback under append load.
//!
//! - `kill -9` of a partition's leader, then restart: every acknowledged record is present
//!   exactly once, at its acknowledged offset, and the replicas' logs are identical record by
//!   record.
//! - A node whose data directory is lost is rebuilt from its peers and ends identical to them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thingraft_tests::{Ledger, ProcCluster, check_replicas, spawn_load};

const PARTITIONS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_loses_no_acknowledged_record() {
    let mut cluster = ProcCluster::start(3, PARTITIONS).await.unwrap();
    let victim = cluster.leader_of(1, 0).await.unwrap();
    let survivor = if victim == 1 { 2 } else { 1 };
    let client = Arc::new(cluster.client(survivor).await.unwrap());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(client.clone(), PARTITIONS, 16, ledger.clone(), stop.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ledger.lock().unwrap().acked.len();
    cluster.kill(victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = ledger.lock().unwrap().acked.len();
    cluster.restart(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.await.unwrap();
    }
    let ledger = Arc::try_unwrap(ledger)
        .expect("load finished")
        .into_inner()
        .unwrap();
    assert!(before > 0, "nothing acknowledged before the kill");
    assert!(during > before, "the survivors kept acknowledging after the kill");
    assert!(
        ledger.acked.len() > during,
        "appends were acknowledged after the restart"
    );
    let ids: Vec<u64> = cluster.addrs.keys().copied().collect();
    let total = check_replicas(&client, &ids, PARTITIONS, &ledger, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nvictim {victim} log:\n{}", cluster.log_of(victim)));
    assert!(total >= ledger.acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_is_rebuilt_from_its_peers() {
    let mut cluster = ProcCluster::start(3, PARTITIONS).await.unwrap();
    let client = Arc::new(cluster.client(1).await.unwrap());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(client.clone(), PARTITIONS, 8, ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.kill(3);
    cluster.wipe(3).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(3).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.await.unwrap();
    }
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ledger = Arc::try_unwrap(ledger)
        .expect("load finished")
        .into_inner()
        .unwrap();
    assert!(!ledger.acked.is_empty());
    let total = check_replicas(&client, &[1, 2, 3], PARTITIONS, &ledger, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nnode 3 log:\n{}", cluster.log_of(3)));
    assert!(total >= ledger.acked.len());
    let log3 = cluster.log_of(3);
    assert!(
        log3.contains("rejoining as a recovering replica"),
        "node 3 must rejoin as recovering:\n{log3}"
    );
}
