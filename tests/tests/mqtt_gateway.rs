//! ThingsBoard's gateway MQTT API end to end: rumqttc plays an IoT Gateway reporting for many
//! child devices to a `thingraft serve` process; `curl` checks through REST that the children
//! exist and hold their data, and plays the user who talks to them.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, EventLoop};
use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest, next_packet, publish_on, v5_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

/// A gateway device (`additionalInfo.gateway = true`) with access token `token`.
fn create_gateway(rest: &Rest, name: &str, token: &str) -> anyhow::Result<String> {
    let body = json!({"name": name, "type": "gateway", "additionalInfo": {"gateway": true}}).to_string();
    let (code, v) = rest.call("POST", &format!("/api/device?accessToken={token}"), Some(&body))?;
    anyhow::ensure!(code == 200, "gateway create: {code} {v}");
    Ok(v["id"]["id"].as_str().unwrap_or_default().to_string())
}

async fn connected(addr: &str, token: &str, filters: &[&str]) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (client, mut ev) = v5_client(addr, token);
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await?;
        next_packet(&mut ev, |p| matches!(p, Packet::SubAck(_)).then_some(())).await?;
    }
    Ok((client, ev))
}

async fn publish_acked(
    client: &AsyncClient,
    ev: &mut EventLoop,
    topic: &str,
    body: String,
) -> anyhow::Result<PubAckReason> {
    client.publish(topic, QoS::AtLeastOnce, false, body).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = tokio::time::timeout_at(deadline, ev.poll()).await??;
        if let rumqttc::v5::Event::Incoming(Packet::PubAck(a)) = e {
            return Ok(a.reason);
        }
    }
}

/// Every device of the tenant: name → id.
fn all_devices(rest: &Rest) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for page in 0.. {
        let (code, v) = rest.call(
            "GET",
            &format!("/api/tenant/devices?pageSize=500&page={page}"),
            None,
        )?;
        anyhow::ensure!(code == 200, "list: {code} {v}");
        for d in v["data"].as_array().into_iter().flatten() {
            out.insert(
                d["name"].as_str().unwrap_or_default().to_string(),
                d["id"]["id"].as_str().unwrap_or_default().to_string(),
            );
        }
        if v["hasNext"] != json!(true) {
            break;
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reporting_for_1000_children_creates_them_all_and_their_data_is_readable()
-> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    create_gateway(&rest, "Gateway G", "GW_TOKEN")?;
    let (client, mut ev) = connected(&c.mqtt[&1], "GW_TOKEN", &["v1/devices/me/rpc/response/+"]).await?;

    // The gateway's own limits answer carries `gatewayRateLimits` besides `rateLimits`.
    client
        .publish(
            "v1/devices/me/rpc/request/1",
            QoS::AtLeastOnce,
            false,
            r#"{"method":"getSessionLimits","params":{"timeout":5000}}"#,
        )
        .await?;
    let (_, limits) = next_packet(&mut ev, |p| publish_on(p, "v1/devices/me/rpc/response/1")).await?;
    assert!(
        limits.get("rateLimits").is_some() && limits.get("gatewayRateLimits").is_some(),
        "{limits}"
    );

    // A connect names the child's device profile.
    let r = publish_acked(
        &client,
        &mut ev,
        "v1/gateway/connect",
        json!({"device": "Child-0", "type": "Thermo"}).to_string(),
    )
    .await?;
    assert_eq!(r, PubAckReason::Success);

    // Telemetry for 1,000 children, 100 per message; unknown children are created.
    for batch in 0..10 {
        let mut body = serde_json::Map::new();
        for i in batch * 100..(batch + 1) * 100 {
            body.insert(
                format!("Child-{i}"),
                json!([{"ts": 1_700_000_000_000i64 + i as i64, "values": {"temp": i, "ok": true}}]),
            );
        }
        let r = publish_acked(
            &client,
            &mut ev,
            "v1/gateway/telemetry",
            Value::Object(body).to_string(),
        )
        .await?;
        assert_eq!(r, PubAckReason::Success, "batch {batch}");
    }

    let devices = all_devices(&rest)?;
    assert_eq!(devices.len(), 1001, "the gateway and its 1,000 children");
    let (_, child0) = rest.call("GET", &format!("/api/device/{}", devices["Child-0"]), None)?;
    assert_eq!(child0["type"], "Thermo");
    let (_, child5) = rest.call("GET", &format!("/api/device/{}", devices["Child-5"]), None)?;
    assert_eq!(child5["type"], "default");
    // Acknowledged means committed: each child's value is there once the shard applied it.
    for i in 0..1000 {
        let id = &devices[&format!("Child-{i}")];
        let v = rest
            .wait_latest(id, Duration::from_secs(10), |v| v.get("temp").is_some())
            .await?;
        assert_eq!(v["temp"][0]["value"], i.to_string(), "Child-{i}: {v}");
        assert_eq!(v["temp"][0]["ts"], 1_700_000_000_000i64 + i as i64);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_get_attributes_and_rpc_through_their_gateway() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    create_gateway(&rest, "Gateway H", "GWH_TOKEN")?;
    let plain = rest.create_device("Plain", "PLAIN_TOKEN")?;
    let (client, mut ev) = connected(
        &c.mqtt[&1],
        "GWH_TOKEN",
        &[
            "v1/gateway/attributes",
            "v1/gateway/rpc",
            "v1/gateway/attributes/response",
        ],
    )
    .await?;
    let r = publish_acked(
        &client,
        &mut ev,
        "v1/gateway/connect",
        json!({"device": "Lamp"}).to_string(),
    )
    .await?;
    assert_eq!(r, PubAckReason::Success);
    let lamp = all_devices(&rest)?["Lamp"].clone();

    // Client attributes of the child, and a shared one pushed to the gateway for it.
    let r = publish_acked(
        &client,
        &mut ev,
        "v1/gateway/attributes",
        json!({"Lamp": {"model": "L1", "serial": "S9"}}).to_string(),
    )
    .await?;
    assert_eq!(r, PubAckReason::Success);
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{lamp}/SHARED_SCOPE"),
        Some(r#"{"brightness":70}"#),
    )?;
    assert_eq!(code, 200);
    let (_, pushed) = next_packet(&mut ev, |p| publish_on(p, "v1/gateway/attributes")).await?;
    assert_eq!(pushed, json!({"device": "Lamp", "data": {"brightness": 70}}));

    // Attribute requests: one value found → `value`, several → `values` (ThingsBoard's rule,
    // whether `key` or `keys` was asked).
    client
        .publish(
            "v1/gateway/attributes/request",
            QoS::AtLeastOnce,
            false,
            r#"{"id":3,"device":"Lamp","client":false,"key":"brightness"}"#,
        )
        .await?;
    let (_, answer) = next_packet(&mut ev, |p| publish_on(p, "v1/gateway/attributes/response")).await?;
    assert_eq!(answer, json!({"id": 3, "device": "Lamp", "value": 70}));
    client
        .publish(
            "v1/gateway/attributes/request",
            QoS::AtLeastOnce,
            false,
            r#"{"id":4,"device":"Lamp","client":true,"keys":["model","serial"]}"#,
        )
        .await?;
    let (_, answer) = next_packet(&mut ev, |p| publish_on(p, "v1/gateway/attributes/response")).await?;
    assert_eq!(
        answer,
        json!({"id": 4, "device": "Lamp", "values": {"model": "L1", "serial": "S9"}})
    );
    client
        .publish(
            "v1/gateway/attributes/request",
            QoS::AtLeastOnce,
            false,
            r#"{"id":5,"device":"Lamp","client":true,"keys":["model"]}"#,
        )
        .await?;
    let (_, answer) = next_packet(&mut ev, |p| publish_on(p, "v1/gateway/attributes/response")).await?;
    assert_eq!(answer, json!({"id": 5, "device": "Lamp", "value": "L1"}));

    // A two-way RPC to the child reaches the gateway; its reply answers the user.
    let rest2 = rest.clone();
    let path = format!("/api/plugins/rpc/twoway/{lamp}");
    let call = tokio::task::spawn_blocking(move || {
        rest2.call("POST", &path, Some(r#"{"method":"toggle","params":{"on":true}}"#))
    });
    let (_, req) = next_packet(&mut ev, |p| publish_on(p, "v1/gateway/rpc")).await?;
    assert_eq!(req["device"], "Lamp");
    assert_eq!(req["data"]["method"], "toggle");
    assert_eq!(req["data"]["params"], json!({"on": true}));
    let id = req["data"]["id"].as_u64().expect("rpc id");
    client
        .publish(
            "v1/gateway/rpc",
            QoS::AtLeastOnce,
            false,
            json!({"device": "Lamp", "id": id, "data": {"on": true}}).to_string(),
        )
        .await?;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let (code, answer) = call.await??;
    assert_eq!((code, answer), (200, json!({"on": true})));
    // A persistent RPC to the child is DELIVERED once the gateway acknowledges its PUBLISH.
    let rpc_id = rest.persistent_rpc(&lamp, true, "blink")?;
    assert_eq!(rest.rpc_status_becomes(&rpc_id, "DELIVERED").await?, "DELIVERED");
    pump.abort();

    // A gateway message that does not parse is refused (0x99) and creates nothing; a device
    // that is not a gateway cannot use the gateway topics (0x90).
    let (client, mut ev) = connected(&c.mqtt[&1], "GWH_TOKEN", &[]).await?;
    let r = publish_acked(&client, &mut ev, "v1/gateway/telemetry", "{not json".into()).await?;
    assert_eq!(r, PubAckReason::PayloadFormatInvalid);
    let r = publish_acked(&client, &mut ev, "v1/gateway/connect", r#"{"type":"x"}"#.into()).await?;
    assert_eq!(r, PubAckReason::PayloadFormatInvalid);
    let (client, mut ev) = connected(&c.mqtt[&1], "PLAIN_TOKEN", &[]).await?;
    let r = publish_acked(
        &client,
        &mut ev,
        "v1/gateway/telemetry",
        json!({"Sneaky": [{"t": 1}]}).to_string(),
    )
    .await?;
    assert_eq!(r, PubAckReason::TopicNameInvalid);
    let devices = all_devices(&rest)?;
    assert_eq!(
        devices.len(),
        3,
        "gateway, plain device and Lamp only: {devices:?}"
    );
    assert!(rest.latest(&plain)?.as_object().is_some_and(|o| o.is_empty()));
    Ok(())
}
