//! Engine state the log no longer holds (decision 0018): with a retention that keeps a few KiB
//! per partition, a node that lost its data directory gets back its devices' telemetry,
//! attributes and RPCs from a peer's store; a lone node that lost its store goes on from the
//! start of its log. Bad state requests get their gRPC codes.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::Value;
use thingraft_proto::v1::AppRequest;
use thingraft_proto::v1::log_client::LogClient;
use thingraft_tests::{ProcCluster, Rest, device_partition, numbers_of, publish_qos1, v5_client};
use tonic::Code;

/// Snapshots (and so purges of the Raft log) every 50 entries, and at most 8 KiB of records per
/// partition: a peer that lost everything gets a snapshot whose records start far past 0.
const CONFIG: &str = "[log]
snapshot_every_entries = 50
entries_kept_after_snapshot = 5

[log.retention]
bytes_max = 8192
age_ms_max = 604800000
";

const MESSAGES: u64 = 150;

/// Publishes `MESSAGES` samples of `seq` (each acknowledged before the next) as `token`.
async fn publish_samples(mqtt: &str, token: &str, first_seq: u64) -> anyhow::Result<()> {
    let (client, mut ev) = v5_client(mqtt, token);
    for seq in first_seq..first_seq + MESSAGES {
        let body = format!(
            r#"{{"ts":{},"values":{{"seq":{seq}}}}}"#,
            1_700_000_000_000u64 + seq
        );
        let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", &body).await?;
        anyhow::ensure!(r == PubAckReason::Success, "seq {seq}: {r:?}");
    }
    let _ = client.disconnect().await;
    Ok(())
}

/// The tenant administrator's REST session on node `n` (logged in once the node answers).
async fn tenant(c: &ProcCluster, n: u64) -> anyhow::Result<Rest> {
    Rest::login(&c.http[&n], "tenant@thingsboard.org", "tenant").await
}

/// A cluster started with `config`, the tenant's REST session on node 1, and a device `name`
/// with access token `token`.
async fn cluster_with_device(
    nodes: usize,
    partitions: u32,
    config: &str,
    name: &str,
    token: &str,
) -> anyhow::Result<(ProcCluster, Rest, String)> {
    let c = ProcCluster::start_with_config(nodes, partitions, Some(config)).await?;
    let rest = tenant(&c, 1).await?;
    let id = rest.create_device(name, token)?;
    Ok((c, rest, id))
}

fn history(rest: &Rest, id: &str) -> anyhow::Result<Value> {
    rest.history(id, "seq")
}

/// The `seq` values of a history answer.
fn seqs_of(history: &Value) -> Vec<u64> {
    numbers_of(history, "seq")
}

fn shared_attributes(rest: &Rest, id: &str) -> anyhow::Result<Value> {
    rest.attributes(id, "SHARED_SCOPE", "")
}

/// Polls until `f` holds or 30 s pass; the last value either way.
async fn eventually<T>(mut f: impl FnMut() -> anyhow::Result<(bool, T)>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, v) = f()?;
        if ok || Instant::now() > deadline {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_takes_the_device_state_the_log_no_longer_holds_from_a_peer()
-> anyhow::Result<()> {
    const PARTITIONS: u32 = 2;
    let mut c = ProcCluster::start_with_config(3, PARTITIONS, Some(CONFIG)).await?;
    let rest = tenant(&c, 1).await?;
    // Devices until both partitions have one.
    let mut devices: Vec<(String, String)> = Vec::new();
    for i in 0..32 {
        let token = format!("METER_{i}");
        let id = rest.create_device(&format!("Meter {i}"), &token)?;
        if devices
            .iter()
            .all(|(d, _)| device_partition(d, PARTITIONS) != device_partition(&id, PARTITIONS))
        {
            devices.push((id, token));
        }
        if devices.len() == PARTITIONS as usize {
            break;
        }
    }
    assert_eq!(devices.len(), PARTITIONS as usize, "no device in some partition");

    // A shared attribute and a persistent RPC first (the device is offline: it stays QUEUED),
    // then enough telemetry that retention drops the records that made them.
    let mut rpcs = Vec::new();
    for (id, _) in &devices {
        let (code, v) = rest.call(
            "POST",
            &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
            Some(r#"{"mode":"eco"}"#),
        )?;
        assert_eq!(code, 200, "{v}");
        rpcs.push(rest.persistent_rpc(id, true, "close")?);
    }
    for (_, token) in &devices {
        publish_samples(&c.mqtt[&1], token, 0).await?;
    }

    // Node 3 loses everything and comes back.
    c.kill(3);
    c.wipe(3)?;
    c.restart(3)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    // Its replicas were repaired with snapshots whose records start far past offset 0: the log
    // alone cannot rebuild its store.
    let lc = c.client(3).await?;
    for p in 0..PARTITIONS {
        let deadline = Instant::now() + Duration::from_secs(30);
        while lc.read_from(3, p, 0, 1).await?.start_offset == 0 {
            assert!(
                Instant::now() < deadline,
                "partition {p} of node 3 still starts at offset 0"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let rest3 = tenant(&c, 3).await?;
    for ((id, _), rpc) in devices.iter().zip(&rpcs) {
        let want = history(&rest, id)?;
        assert_eq!(
            want["seq"].as_array().map(Vec::len),
            Some(MESSAGES as usize),
            "{want}"
        );
        let got = eventually(|| {
            let v = history(&rest3, id)?;
            Ok((v == want, v))
        })
        .await?;
        assert_eq!(got, want, "history of {id} on node 3; its log:\n{}", c.log_of(3));
        assert_eq!(rest3.latest(id)?, rest.latest(id)?);
        let attrs = shared_attributes(&rest3, id)?;
        assert_eq!(attrs, shared_attributes(&rest, id)?);
        assert_eq!(attrs[0]["value"], "eco", "{attrs}");
        let path = format!("/api/rpc/persistent/{rpc}");
        let (code, on3) = rest3.call("GET", &path, None)?;
        assert_eq!(code, 200, "{on3}");
        assert_eq!(on3["status"], "QUEUED", "{on3}");
        assert_eq!(on3, rest.call("GET", &path, None)?.1);
    }
    let log3 = c.log_of(3);
    assert!(log3.contains("engine state taken from a peer"), "{log3}");
    assert!(!log3.contains("are lost here"), "{log3}");

    // A state request that does not decode, and a message kind no one handles, get their gRPC
    // codes; the node goes on.
    let mut raw = LogClient::connect(format!("http://{}", c.addrs[&1])).await?;
    let bad = |kind: u32| AppRequest {
        kind,
        body: vec![0xff; 8].into(),
    };
    assert_eq!(raw.app(bad(1)).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(raw.app(bad(77)).await.unwrap_err().code(), Code::Unavailable);

    // And it goes on: telemetry sent through node 3 is readable there.
    let (id, token) = &devices[0];
    publish_samples(&c.mqtt[&3], token, 1000).await?;
    let v = rest3
        .wait_latest(id, Duration::from_secs(10), |v| {
            v["seq"][0]["value"] == format!("{}", 1000 + MESSAGES - 1)
        })
        .await?;
    assert_eq!(v["seq"][0]["value"], format!("{}", 1000 + MESSAGES - 1), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_crashes_part_way_through_an_install_takes_the_state_again_at_its_next_start()
-> anyhow::Result<()> {
    let (mut c, rest, id) = cluster_with_device(3, 1, CONFIG, "Meter", "METER").await?;
    publish_samples(&c.mqtt[&1], "METER", 0).await?;
    // A PUBACK means committed; the samples are applied with the partition's next outcome.
    let want = eventually(|| {
        let v = history(&rest, &id)?;
        Ok((seqs_of(&v).len() == MESSAGES as usize, v))
    })
    .await?;
    assert_eq!(seqs_of(&want).len(), MESSAGES as usize, "{want}");

    // Node 3 loses everything, and its first install of the partition's state stops half-way:
    // the keys written so far are made durable, then the process aborts (the test hook
    // `thingraft_engine::store::CRASH_IN_INSTALL`).
    c.kill(3);
    c.wipe(3)?;
    c.restart_with_env(3, &[("THINGRAFT_FAULT_CRASH_IN_INSTALL_AFTER_KEYS", "75")])?;
    let status = c.wait_exit(3, Duration::from_secs(60)).await;
    let first_life = c.log_of(3);
    assert!(
        status.is_some_and(|s| !s.success()),
        "node 3 did not crash during its install: {status:?}; its log:\n{first_life}"
    );
    assert!(first_life.contains("crashing on purpose"), "{first_life}");

    // Started again, it must not take the half-installed state for a whole one.
    c.restart(3)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let rest3 = tenant(&c, 3).await?;
    let got = eventually(|| {
        let v = history(&rest3, &id)?;
        Ok((v == want, v))
    })
    .await?;
    assert_eq!(got, want, "history on node 3; its log:\n{}", c.log_of(3));
    assert_eq!(rest3.latest(&id)?, rest.latest(&id)?);
    let log3 = c.log_of(3);
    assert!(log3.contains("engine state taken from a peer"), "{log3}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_a_partitions_state_leaves_its_lead_to_a_peer_until_it_has_the_state()
-> anyhow::Result<()> {
    let (mut c, _, id) = cluster_with_device(3, 1, CONFIG, "Pump", "PUMP").await?;
    // The partition's preferred replica comes to lead it (decision 0019).
    let preferred = c.preferred_leader(0);
    let other = if preferred == 1 { 2 } else { 1 };
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.leader_of(other, 0).await? != preferred {
        assert!(
            Instant::now() < deadline,
            "node {preferred} never led partition 0"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rest = tenant(&c, other).await?;
    publish_samples(&c.mqtt[&other], "PUMP", 0).await?;

    // The preferred replica loses everything, comes back, and takes a while to install the
    // state it fetched (the test hook `thingraft_engine::state::INSTALL_DELAY`).
    c.kill(preferred);
    c.wipe(preferred)?;
    c.restart_with_env(preferred, &[("THINGRAFT_FAULT_STATE_INSTALL_DELAY_MS", "12000")])?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.log_of(preferred).contains("waiting before installing") {
        assert!(
            Instant::now() < deadline,
            "no state taken: {}",
            c.log_of(preferred)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its log has caught up, but it must not lead a partition it cannot process yet: more than
    // two rebalancing periods later a peer leads it still, and telemetry is processed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leader = c.leader_of(other, 0).await?;
    assert_ne!(
        leader, preferred,
        "node {preferred} took the lead before it had the state"
    );
    let (client, mut ev) = v5_client(&c.mqtt[&other], "PUMP");
    let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", r#"{"seq":5000}"#).await?;
    assert_eq!(r, PubAckReason::Success);
    let _ = client.disconnect().await;
    let v = rest
        .wait_latest(&id, Duration::from_secs(3), |v| v["seq"][0]["value"] == "5000")
        .await?;
    assert_eq!(
        v["seq"][0]["value"], "5000",
        "telemetry stalled; node {leader} leads"
    );

    // With the state installed it leads again, and shows what its peers show.
    let deadline = Instant::now() + Duration::from_secs(40);
    while c.leader_of(other, 0).await? != preferred {
        assert!(
            Instant::now() < deadline,
            "node {preferred} never led again; its log:\n{}",
            c.log_of(preferred)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let want = history(&rest, &id)?;
    let rest_p = tenant(&c, preferred).await?;
    let got = eventually(|| {
        let v = history(&rest_p, &id)?;
        Ok((v == want, v))
    })
    .await?;
    assert_eq!(got, want, "history on node {preferred}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_that_lost_its_store_says_what_is_lost_and_goes_on_from_the_start_of_its_log()
-> anyhow::Result<()> {
    let (mut c, _, id) = cluster_with_device(1, 1, CONFIG, "Meter", "METER").await?;
    publish_samples(&c.mqtt[&1], "METER", 0).await?;

    c.kill(1);
    std::fs::remove_dir_all(c.data_dir(1).join("store"))?;
    c.restart(1)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let rest = tenant(&c, 1).await?;
    publish_samples(&c.mqtt[&1], "METER", 1000).await?;
    let last = format!("{}", 1000 + MESSAGES - 1);
    let v = rest
        .wait_latest(&id, Duration::from_secs(10), |v| v["seq"][0]["value"] == last)
        .await?;
    assert_eq!(v["seq"][0]["value"], last, "{v}; its log:\n{}", c.log_of(1));
    let log = c.log_of(1);
    assert!(log.contains("are lost here"), "{log}");
    // What the log still held is applied: the history is the retained tail of the first
    // samples and all of the new ones.
    let h = history(&rest, &id)?;
    let seqs = seqs_of(&h);
    assert!((1000..1000 + MESSAGES).all(|s| seqs.contains(&s)), "{h}");
    assert!(
        seqs.contains(&(MESSAGES - 1)),
        "the retained tail of the first samples is missing: {h}"
    );
    assert!(
        !seqs.contains(&0),
        "seq 0 was dropped by retention yet is in the history: {h}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_the_retention_keeps_nothing_its_peers_deleted_meanwhile() -> anyhow::Result<()> {
    let (mut c, rest, id) = cluster_with_device(3, 1, CONFIG, "Valve", "VALVE").await?;
    let rest3 = tenant(&c, 3).await?;
    let (code, v) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"mode":"eco","stale":true}"#),
    )?;
    assert_eq!(code, 200, "{v}");
    let on3 = eventually(|| {
        let v = shared_attributes(&rest3, &id)?;
        Ok((v.as_array().is_some_and(|a| a.len() == 2), v))
    })
    .await?;
    assert_eq!(on3.as_array().map(Vec::len), Some(2), "{on3}");

    // Node 3 is down (its store keeps both attributes) while `stale` is deleted and retention
    // drops the records of all of it.
    c.kill(3);
    let (code, v) = rest.call(
        "DELETE",
        &format!("/api/plugins/telemetry/DEVICE/{id}/SHARED_SCOPE?keys=stale"),
        None,
    )?;
    assert_eq!(code, 200, "{v}");
    publish_samples(&c.mqtt[&1], "VALVE", 0).await?;
    let want = shared_attributes(&rest, &id)?;
    assert_eq!(want.as_array().map(Vec::len), Some(1), "{want}");

    c.restart(3)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let rest3 = tenant(&c, 3).await?;
    let want_history = history(&rest, &id)?;
    let got = eventually(|| {
        let v = history(&rest3, &id)?;
        Ok((v == want_history, v))
    })
    .await?;
    assert_eq!(got, want_history, "node 3's log:\n{}", c.log_of(3));
    assert_eq!(
        shared_attributes(&rest3, &id)?,
        want,
        "node 3 kept a deleted attribute"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_lost_every_store_goes_on_from_the_start_of_its_logs() -> anyhow::Result<()> {
    let (mut c, _, id) = cluster_with_device(3, 1, CONFIG, "Gauge", "GAUGE").await?;
    publish_samples(&c.mqtt[&1], "GAUGE", 0).await?;

    // Every node loses its store (the logs stay): no replica can give the state from before
    // the logs' start, so none waits for one.
    for n in 1..=3 {
        c.kill(n);
    }
    for n in 1..=3 {
        std::fs::remove_dir_all(c.data_dir(n).join("store"))?;
        c.restart(n)?;
    }
    c.wait_ready(Duration::from_secs(30)).await?;
    let rest = tenant(&c, 1).await?;
    publish_samples(&c.mqtt[&1], "GAUGE", 1000).await?;
    let last = format!("{}", 1000 + MESSAGES - 1);
    for n in 1..=3 {
        let rest = tenant(&c, n).await?;
        let v = rest
            .wait_latest(&id, Duration::from_secs(30), |v| v["seq"][0]["value"] == last)
            .await?;
        assert_eq!(
            v["seq"][0]["value"],
            last,
            "node {n}: {v}; its log:\n{}",
            c.log_of(n)
        );
    }
    assert!(
        (1..=3).any(|n| c.log_of(n).contains("are lost here")),
        "no node said what is lost"
    );
    let h = history(&rest, &id)?;
    assert!(
        !h["seq"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["value"] == "0")),
        "seq 0 was dropped by retention yet is in the history: {h}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_is_flushed_before_the_retention_drops_what_it_was_made_of() -> anyhow::Result<()> {
    // Records older than 2 s are dropped as new ones come, and snapshots let the log forget its
    // entries; the store is written without a WAL, so after `kill -9` only what was flushed
    // survives of it.
    let config = "[log]\nsnapshot_every_entries = 50\nentries_kept_after_snapshot = 5\n\n\
                  [log.retention]\nbytes_max = 1073741824\nage_ms_max = 2000\n";
    let (mut c, rest, id) = cluster_with_device(1, 1, config, "Tank", "TANK").await?;
    publish_samples(&c.mqtt[&1], "TANK", 0).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish_samples(&c.mqtt[&1], "TANK", 1000).await?;
    let last = format!("{}", 1000 + MESSAGES - 1);
    let v = rest
        .wait_latest(&id, Duration::from_secs(10), |v| v["seq"][0]["value"] == last)
        .await?;
    assert_eq!(v["seq"][0]["value"], last, "{v}");

    c.kill(1);
    c.restart(1)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let rest = tenant(&c, 1).await?;
    let seqs = eventually(|| {
        let seqs = seqs_of(&history(&rest, &id)?);
        Ok((seqs.contains(&last.parse()?), seqs))
    })
    .await?;
    let missing: Vec<u64> = (0..MESSAGES)
        .chain(1000..1000 + MESSAGES)
        .filter(|s| !seqs.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged samples gone after kill -9: {missing:?}; the node's log:\n{}",
        c.log_of(1)
    );
    Ok(())
}
