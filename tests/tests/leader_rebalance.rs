//! A partition's lead goes back to its preferred replica (decision 0019): three real processes;
//! a node that was `kill -9`ed and started again leads its partitions again once it has caught
//! up, and the device path goes on across the hand-over.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use thingraft_tests::{ProcCluster, Rest, publish_qos1, v5_client};

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
    // Whoever won the first elections, each partition comes to be led by its preferred replica;
    // node 1 is that of some of them.
    let preferred: BTreeMap<u32, u64> = (0..PARTITIONS).map(|p| (p, c.preferred_leader(p))).collect();
    assert!(
        preferred.values().any(|n| *n == 1),
        "node 1 is preferred for none: {preferred:?}"
    );
    let first = leaders_until(&c, 2, |l| *l == preferred).await;
    assert_eq!(first, preferred, "leads as the cluster settled");

    let rest = Rest::login(&c.http[&2], "tenant@thingsboard.org", "tenant").await?;
    let id = rest.create_device("Boiler", "BOILER")?;

    // Node 1 goes; the others take its partitions over, and the device goes on through node 2.
    c.kill(1);
    let without_1 = leaders_until(&c, 2, |l| l.values().all(|n| *n == 2 || *n == 3)).await;
    assert!(
        without_1.values().all(|n| *n == 2 || *n == 3),
        "partitions without a live leader: {without_1:?}"
    );
    let (client, mut ev) = v5_client(&c.mqtt[&2], "BOILER");
    for t in 0..20u32 {
        let body = format!(r#"{{"temperature":{t}}}"#);
        let r = publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", &body).await?;
        assert_eq!(r, PubAckReason::Success);
    }
    let _ = client.disconnect().await;

    // Back, it catches up and asks for its partitions' lead: every partition is led by its
    // preferred replica again.
    c.restart(1)?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let back = leaders_until(&c, 2, |l| *l == first).await;
    assert_eq!(
        back,
        first,
        "leads after node 1's return; its log:\n{}",
        c.log_of(1)
    );
    let log1 = c.log_of(1);
    assert!(log1.contains("taking back the lead"), "{log1}");

    // The device path goes on across the hand-over: what was sent while node 1 was away is on
    // node 1 now, and what is sent through node 1 reaches node 3.
    let rest1 = Rest::login(&c.http[&1], "tenant@thingsboard.org", "tenant").await?;
    let v = rest1
        .wait_latest(&id, Duration::from_secs(10), |v| {
            v["temperature"][0]["value"] == "19"
        })
        .await?;
    assert_eq!(v["temperature"][0]["value"], "19", "{v}");
    let (client, mut ev) = v5_client(&c.mqtt[&1], "BOILER");
    let r = publish_qos1(
        &client,
        &mut ev,
        "v1/devices/me/telemetry",
        r#"{"temperature":99}"#,
    )
    .await?;
    assert_eq!(r, PubAckReason::Success);
    let _ = client.disconnect().await;
    let rest3 = Rest::login(&c.http[&3], "tenant@thingsboard.org", "tenant").await?;
    let v = rest3
        .wait_latest(&id, Duration::from_secs(10), |v| {
            v["temperature"][0]["value"] == "99"
        })
        .await?;
    assert_eq!(v["temperature"][0]["value"], "99", "{v}");
    Ok(())
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
    // Three rebalancing periods of the default setting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = leaders(&c, if gone == 1 { 2 } else { 1 }).await;
    assert_eq!(after, without, "a lead moved with leader_rebalance_ms = 0");
    Ok(())
}
