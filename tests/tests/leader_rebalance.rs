//! A partition's lead goes back to its preferred replica (decision 0019): three real processes;
//! a node that was `kill -9`ed and started again leads its partitions again once it has caught
//! up, and a device publishing through the hand-over loses nothing and is never dropped. A leader
//! whose engine shard keeps failing hands its lead to a ready replica (decision 0020).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use thingraft_tests::{ProcCluster, Rest, device_partition, numbers_of, publish_qos1, v5_client};

const PARTITIONS: u32 = 6;

/// Each partition's leader as node `via` sees it (0 where it sees none).
async fn leaders(c: &ProcCluster, via: u64) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for p in 0..PARTITIONS {
        out.insert(p, c.leader_of(via, p).await.unwrap_or(0));
    }
    out
}

/// Polls `leaders(c, via)` until `ok` holds or 30 s pass; the last answer either way.
async fn leaders_until(
    c: &ProcCluster,
    via: u64,
    ok: impl Fn(&BTreeMap<u32, u64>) -> bool,
) -> BTreeMap<u32, u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = leaders(c, via).await;
        if ok(&l) || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_takes_back_the_lead_of_its_partitions_once_it_has_caught_up() -> anyhow::Result<()>
{
    let mut c = ProcCluster::start(3, PARTITIONS).await?;
    // The cluster has settled: each partition led by its preferred replica, node 1 among them.
    let preferred: BTreeMap<u32, u64> = (0..PARTITIONS).map(|p| (p, c.preferred_leader(p))).collect();
    assert!(
        preferred.values().any(|n| *n == 1),
        "node 1 is preferred for none: {preferred:?}"
    );
    assert_eq!(leaders(&c, 2).await, preferred, "leads as the cluster settled");

    // A device in a partition node 1 is the preferred replica of: its lead goes away and back.
    let rest = Rest::login(&c.http[&2], "tenant@thingsboard.org", "tenant").await?;
    let mut device = None;
    for i in 0..64 {
        let token = format!("BOILER_{i}");
        let id = rest.create_device(&format!("Boiler {i}"), &token)?;
        if preferred[&device_partition(&id, PARTITIONS)] == 1 {
            device = Some((id, token));
            break;
        }
    }
    let (id, token) = device.expect("a device in one of node 1's partitions");

    c.kill(1);
    let without_1 = leaders_until(&c, 2, |l| l.values().all(|n| *n == 2 || *n == 3)).await;
    assert!(
        without_1.values().all(|n| *n == 2 || *n == 3),
        "partitions without a live leader: {without_1:?}"
    );

    // The device publishes through node 2 without a break while node 1 comes back and takes
    // the lead back: no message is refused, no session dropped, every acknowledged one stored.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (mqtt, stop) = (c.mqtt[&2].clone(), stop.clone());
        tokio::spawn(async move {
            let (client, mut ev) = v5_client(&mqtt, &token);
            let mut acked = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"ts":{},"values":{{"seq":{seq}}}}}"#,
                    1_700_000_000_000u64 + seq
                );
                let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", &body).await?;
                anyhow::ensure!(r == PubAckReason::Success, "seq {seq}: {r:?}");
                acked.push(seq);
                seq += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = client.disconnect().await;
            Ok(acked)
        })
    };
    c.restart(1)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let back = leaders_until(&c, 2, |l| *l == preferred).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = publisher.await??;
    assert_eq!(
        back,
        preferred,
        "leads after node 1's return; its log:\n{}",
        c.log_of(1)
    );
    let log1 = c.log_of(1);
    assert!(log1.contains("taking back the lead"), "{log1}");
    assert!(acked.len() > 20, "only {} messages acknowledged", acked.len());

    // Every acknowledged message is stored, on the node that took the lead back and on another.
    for n in [1, 3] {
        let rest = Rest::login(&c.http[&n], "tenant@thingsboard.org", "tenant").await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seqs = history_seqs(&rest, &id)?;
        while seqs != acked && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            seqs = history_seqs(&rest, &id)?;
        }
        assert_eq!(seqs, acked, "history on node {n}");
    }
    Ok(())
}

/// The `seq` values of a device's history, oldest first.
fn history_seqs(rest: &Rest, id: &str) -> anyhow::Result<Vec<u64>> {
    Ok(numbers_of(&rest.history(id, "seq")?, "seq"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_stay_where_they_are_with_rebalancing_off() -> anyhow::Result<()> {
    let mut c =
        ProcCluster::start_with_config(3, PARTITIONS, Some("[log]\nleader_rebalance_ms = 0\n")).await?;
    let first = leaders(&c, 2).await;
    // The node that leads most partitions goes, and comes back.
    let gone = (1..=3u64)
        .max_by_key(|n| first.values().filter(|l| *l == n).count())
        .expect("three nodes");
    let others = |l: &BTreeMap<u32, u64>| l.values().all(|n| *n != 0 && *n != gone);
    c.kill(gone);
    let without = leaders_until(&c, if gone == 1 { 2 } else { 1 }, others).await;
    assert!(others(&without), "{without:?}");
    c.restart(gone)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    // Six periods of the default setting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = leaders(&c, if gone == 1 { 2 } else { 1 }).await;
    assert_eq!(after, without, "a lead moved with leader_rebalance_ms = 0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_shard_keeps_failing_hands_its_lead_to_a_ready_replica() -> anyhow::Result<()> {
    let mut c = ProcCluster::start(3, PARTITIONS).await?;
    let rest = Rest::login(&c.http[&2], "tenant@thingsboard.org", "tenant").await?;
    let mut device = None;
    for i in 0..64 {
        let token = format!("PUMP_{i}");
        let id = rest.create_device(&format!("Pump {i}"), &token)?;
        let p = device_partition(&id, PARTITIONS);
        if c.preferred_leader(p) == 1 {
            device = Some((id, token, p));
            break;
        }
    }
    let (id, token, p) = device.expect("a device in one of node 1's partitions");

    // Node 1 comes back with the partition's shard set to fail 12 s after it starts, and on
    // every start after that; until then it catches up and takes its lead back.
    const FAIL_AFTER_MS: u64 = 12_000;
    c.restart_with_env(
        1,
        &[("THINGRAFT_FAULT_SHARD_FAIL", &format!("{p}@{FAIL_AFTER_MS}"))],
    )?;
    let restarted = Instant::now();
    c.wait_ready(Duration::from_secs(30)).await?;
    let back = leaders_until(&c, 2, |l| l[&p] == 1).await;
    assert_eq!(back[&p], 1, "node 1 did not take back partition {p}: {back:?}");
    assert!(
        restarted.elapsed() < Duration::from_millis(FAIL_AFTER_MS),
        "node 1 took its lead back only after its shard began to fail"
    );
    let (client, mut ev) = v5_client(&c.mqtt[&2], &token);
    let send = |seq: u64| {
        format!(
            r#"{{"ts":{},"values":{{"seq":{seq}}}}}"#,
            1_700_000_000_000u64 + seq
        )
    };
    let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", &send(0)).await?;
    assert_eq!(r, PubAckReason::Success);
    let deadline = Instant::now() + Duration::from_secs(10);
    while history_seqs(&rest, &id)? != [0] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        history_seqs(&rest, &id)?,
        [0],
        "processed while node 1's shard runs"
    );

    // The shard fails and keeps failing. What the device sends from then on is committed, and
    // processed once the lead has moved to a replica whose shard runs.
    // (The hook's clock starts with node 1's first shard, a little after the process.)
    let deadline = restarted + Duration::from_millis(FAIL_AFTER_MS) + Duration::from_secs(10);
    while !c.log_of(1).contains("failing on purpose") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log1 = c.log_of(1);
    assert!(
        log1.contains("failing on purpose"),
        "the shard has not failed:\n{log1}"
    );
    let failed_at = Instant::now();
    let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", &send(1)).await?;
    assert_eq!(r, PubAckReason::Success);
    let deadline = Instant::now() + Duration::from_secs(30);
    while history_seqs(&rest, &id)? != [0, 1] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        history_seqs(&rest, &id)?,
        [0, 1],
        "not processed 30 s after node 1's shard failed; node 1's log:\n{}",
        c.log_of(1)
    );
    let moved = failed_at.elapsed();
    let leader = c.leader_of(2, p).await?;
    assert_ne!(leader, 1, "node 1 still leads partition {p}");
    let log1 = c.log_of(1);
    assert!(
        log1.contains("handing the lead of a partition to a ready replica"),
        "{log1}"
    );

    // While its shard keeps failing, node 1 does not ask for the lead back, and the partition
    // goes on being processed where it moved.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.leader_of(2, p).await?, leader, "the lead moved again");
    let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", &send(2)).await?;
    assert_eq!(r, PubAckReason::Success);
    let deadline = Instant::now() + Duration::from_secs(5);
    while history_seqs(&rest, &id)? != [0, 1, 2] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(history_seqs(&rest, &id)?, [0, 1, 2]);
    eprintln!(
        "partition {p}: processing went on {} ms after node 1's shard failed",
        moved.as_millis()
    );
    let _ = client.disconnect().await;
    Ok(())
}
