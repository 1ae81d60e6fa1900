//! The device path on a 3-node cluster (three `thingraft serve` processes): devices connect to
//! a node that does not lead their partition, downlinks cross nodes, and `kill -9` of the
//! partition's leader loses no acknowledged telemetry.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::Value;
use thingraft_tests::{ProcCluster, Rest, device_partition, mosquitto_pub};

const PARTITIONS: u32 = 4;

fn partition_of(device_id: &str) -> u32 {
    device_partition(device_id, PARTITIONS)
}

async fn next_publish(ev: &mut EventLoop, prefix: &str) -> anyhow::Result<(String, Value)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout_at(deadline, ev.poll()).await?? {
            let t = String::from_utf8_lossy(&p.topic).into_owned();
            if t.starts_with(prefix) {
                return Ok((t, serde_json::from_slice(&p.payload).unwrap_or(Value::Null)));
            }
        }
    }
}

/// Publishes `{"ts":ts,"values":{"seq":seq}}` at QoS 1 through a new connection; true when the
/// PUBACK came.
fn publish_seq(addr: &str, token: &str, seq: u64) -> anyhow::Result<bool> {
    let body = format!(
        r#"{{"ts":{},"values":{{"seq":{seq}}}}}"#,
        1_700_000_000_000u64 + seq
    );
    Ok(mosquitto_pub(
        addr,
        &[
            "-q",
            "1",
            "-u",
            token,
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            &body,
        ],
    )? == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_a_follower_node_survive_kill_9_of_their_partitions_leader() -> anyhow::Result<()> {
    let mut c = ProcCluster::start(3, PARTITIONS).await?;
    let rest1 = Rest::login(&c.http[&1], "tenant@thingsboard.org", "tenant").await?;
    let id = rest1.create_device("Pump 7", "TOKEN_7")?;
    let p = partition_of(&id);
    let leader = c.leader_of(1, p).await?;
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let (device_node, rest_node) = (others[0], others[1]);
    let rest = Rest::login(&c.http[&rest_node], "tenant@thingsboard.org", "tenant").await?;

    // Downlinks reach a device connected to a node that leads nothing of it, from REST calls
    // made on yet another node.
    let (host, port) = c.mqtt[&device_node].rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("", host, port.parse()?);
    o.set_credentials("TOKEN_7", "");
    let (client, mut ev) = AsyncClient::new(o, 16);
    client
        .subscribe("v1/devices/me/attributes", QoS::AtLeastOnce)
        .await?;
    client
        .subscribe("v1/devices/me/rpc/request/+", QoS::AtLeastOnce)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut subacks = 0;
    while subacks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = tokio::time::timeout_at(deadline, ev.poll()).await?? {
            subacks += 1;
        }
    }
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"mode":"eco"}"#),
    )?;
    assert_eq!(code, 200);
    let (_, pushed) = next_publish(&mut ev, "v1/devices/me/attributes").await?;
    assert_eq!(pushed, serde_json::json!({"mode": "eco"}));
    let r = rest.clone();
    let path = format!("/api/rpc/twoway/{id}");
    let call = tokio::task::spawn_blocking(move || {
        r.call("POST", &path, Some(r#"{"method":"status","params":{}}"#))
    });
    let (topic, _) = next_publish(&mut ev, "v1/devices/me/rpc/request/").await?;
    let rpc_id = topic.rsplit('/').next().unwrap_or_default().to_string();
    client
        .publish(
            format!("v1/devices/me/rpc/response/{rpc_id}"),
            QoS::AtLeastOnce,
            false,
            r#"{"ok":true}"#,
        )
        .await?;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let (code, body) = call.await??;
    assert_eq!((code, body), (200, serde_json::json!({"ok": true})));
    pump.abort();

    // Telemetry through the follower node, each message acknowledged before the next.
    let mqtt = c.mqtt[&device_node].clone();
    let mut acked = Vec::new();
    for seq in 0..100 {
        if publish_seq(&mqtt, "TOKEN_7", seq)? {
            acked.push(seq);
        }
    }
    assert_eq!(
        acked.len(),
        100,
        "every message is acknowledged while the cluster is healthy"
    );

    // A persistent RPC to a device of the same partition that is not connected: it waits,
    // QUEUED, at the partition's leader.
    let later = (0..64)
        .map(|i| rest.create_device(&format!("Valve {i}"), &format!("TOKEN_V{i}")))
        .find_map(|d| match d {
            Ok(d) if partition_of(&d) == p => Some(Ok(d)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .expect("a device in the partition")?;
    let (code, body) = rest.call(
        "POST",
        &format!("/api/rpc/oneway/{later}"),
        Some(r#"{"method":"close","params":{},"persistent":true,"timeout":120000}"#),
    )?;
    assert_eq!(code, 200, "{body}");
    let valve_token = format!(
        "TOKEN_V{}",
        rest.call("GET", &format!("/api/device/{later}"), None)?.1["name"]
            .as_str()
            .and_then(|n| n.strip_prefix("Valve "))
            .expect("valve name")
    );

    // kill -9 of the partition's leader; new telemetry must be accepted within 3 s.
    c.kill(leader);
    let killed = Instant::now();
    let mut seq = 100;
    let recovered = loop {
        if publish_seq(&mqtt, "TOKEN_7", seq)? {
            acked.push(seq);
            break killed.elapsed();
        }
        seq += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no telemetry accepted after the kill"
        );
    };
    eprintln!("telemetry accepted again {recovered:?} after kill -9 of the leader");
    assert!(
        recovered < Duration::from_secs(3),
        "telemetry accepted again after {recovered:?}"
    );
    for s in seq + 1..seq + 20 {
        if publish_seq(&mqtt, "TOKEN_7", s)? {
            acked.push(s);
        }
    }

    // Every acknowledged sample is readable through a surviving node.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stored: Vec<u64> = loop {
        let (code, h) = rest.call(
            "GET",
            &format!(
                "/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=seq&startTs=0&endTs=1800000000000&limit=100000&orderBy=ASC&useStrictDataTypes=true"
            ),
            None,
        )?;
        assert_eq!(code, 200);
        let stored: Vec<u64> = h["seq"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["value"].as_u64()).collect())
            .unwrap_or_default();
        if acked.iter().all(|a| stored.contains(a)) || Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let missing: Vec<&u64> = acked.iter().filter(|a| !stored.contains(a)).collect();
    assert!(missing.is_empty(), "acknowledged but not stored: {missing:?}");

    // The RPC queued at the dead leader is the new leader's now: the device gets it when it
    // connects.
    let (host, port) = c.mqtt[&device_node].rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("", host, port.parse()?);
    o.set_credentials(valve_token, "");
    let (client, mut ev) = AsyncClient::new(o, 16);
    client
        .subscribe("v1/devices/me/rpc/request/+", QoS::AtLeastOnce)
        .await?;
    let (_, request) = next_publish(&mut ev, "v1/devices/me/rpc/request/").await?;
    assert_eq!(request["method"], "close", "{request}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_while_the_partition_has_no_majority() -> anyhow::Result<()> {
    let mut c = ProcCluster::start(3, PARTITIONS).await?;
    let rest = Rest::login(&c.http[&1], "tenant@thingsboard.org", "tenant").await?;
    let id = rest.create_device("Lonely", "TOKEN_L")?;
    let (host, port) = c.mqtt[&1].rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("", host, port.parse()?);
    o.set_credentials("TOKEN_L", "");
    let (client, mut ev) = AsyncClient::new(o, 16);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = tokio::time::timeout_at(deadline, ev.poll()).await?? {
            break;
        }
    }
    // Two of three nodes down: nothing can commit, so nothing may be acknowledged.
    c.kill(2);
    c.kill(3);
    client
        .publish(
            "v1/devices/me/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"unacked":1}"#,
        )
        .await?;
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(quiet_until, ev.poll()).await {
            Err(_) => break, // 3 s without a PUBACK
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                panic!("PUBACK {a:?} without a majority")
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break, // the server closed the session: also no PUBACK
        }
    }
    // A majority again: new telemetry is acknowledged and stored.
    c.restart(2)?;
    let started = Instant::now();
    loop {
        if publish_seq(&c.mqtt[&1], "TOKEN_L", 7)? {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no PUBACK after the majority returned"
        );
    }
    let v = rest
        .wait_latest(&id, Duration::from_secs(10), |v| v.get("seq").is_some())
        .await?;
    assert!(v.get("seq").is_some(), "{v}");
    Ok(())
}

/// What a CONNECT with `token` to `addr` is answered: `Ok(true)` accepted, `Ok(false)` "server
/// unavailable", `Err` a connection that failed otherwise (no listener yet, another refusal).
async fn connect_once(addr: &str, token: &str) -> Result<bool, rumqttc::v5::ConnectionError> {
    use rumqttc::v5::ConnectionError;
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
    let (host, port) = addr.rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("", host, port.parse().expect("port number"));
    o.set_credentials(token, "");
    let (client, mut ev) = AsyncClient::new(o, 16);
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Err(e) => break Err(ConnectionError::Timeout(e)),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break Ok(true),
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(ConnectReturnCode::ServerUnavailable))) => {
                break Ok(false);
            }
            Ok(Err(e)) => break Err(e),
        }
    };
    let _ = client.disconnect().await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_without_its_data_never_refuses_a_device_created_while_it_was_down() -> anyhow::Result<()>
{
    use rumqttc::v5::ConnectionError;
    let mut c = ProcCluster::start(3, PARTITIONS).await?;
    let rest = Rest::login(&c.http[&1], "tenant@thingsboard.org", "tenant").await?;
    c.kill(3);
    c.wipe(3)?;
    // Enough metadata that node 3 takes a while to catch up; the last device is the one to use.
    for i in 0..40 {
        rest.create_device(&format!("Late {i}"), &format!("LATE_{i}"))?;
    }
    c.restart(3)?;
    // From the moment node 3 listens, every answer is "accepted" or "server unavailable" (the
    // device retries), never "not authorized".
    let started = Instant::now();
    let mut unavailable = 0;
    loop {
        match connect_once(&c.mqtt[&3], "LATE_39").await {
            Ok(true) => break,
            Ok(false) => unavailable += 1,
            // Not listening yet, or not answering yet: no answer is not a refusal.
            Err(ConnectionError::Io(_) | ConnectionError::Timeout(_)) => {}
            Err(e) => panic!("CONNECT to the restarted node: {e:?}\n{}", c.log_of(3)),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node 3 did not accept the device in 60 s\n{}",
            c.log_of(3)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And once it has caught up, an unknown token is refused as such.
    let refused = connect_once(&c.mqtt[&3], "NO_SUCH_TOKEN").await;
    assert!(
        matches!(refused, Err(ConnectionError::ConnectionRefused(code)) if code != rumqttc::v5::mqttbytes::v5::ConnectReturnCode::ServerUnavailable),
        "unknown token on the caught-up node: {refused:?} (after {unavailable} unavailable answers)"
    );
    Ok(())
}
