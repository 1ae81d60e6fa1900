//! The MQTT device path end to end, with real clients: `mosquitto_pub` and rumqttc publish to a
//! `thingraft serve` process, and `curl` reads the result back through the REST API.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::Value;
use thingraft_tests::{ProcCluster, Rest, mosquitto_pub};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

async fn single_node() -> anyhow::Result<(ProcCluster, Rest)> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    Ok((c, rest))
}

fn v5_client(addr: &str, token: &str) -> (AsyncClient, EventLoop) {
    let (host, port) = addr.rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("", host, port.parse().expect("port number"));
    o.set_credentials(token, "");
    o.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(o, 16)
}

/// Polls the event loop until `f` picks a packet, or fails after 5 s.
async fn next_packet<T>(ev: &mut EventLoop, f: impl Fn(&Packet) -> Option<T>) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, ev.poll()).await??;
        if let Event::Incoming(p) = e
            && let Some(t) = f(&p)
        {
            return Ok(t);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_attributes_over_mqtt_are_readable_through_rest() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let mqtt = &c.mqtt[&1];
    let id = rest.create_device("Thermostat A", "TOKEN_A")?;

    // MQTT 3.1.1, QoS 1, the plain object form: PUBACK arrives, so the exit code is 0.
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-q",
            "1",
            "-u",
            "TOKEN_A",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"temperature":25,"humidity":40.5,"on":true}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("on").is_some())
        .await?;
    assert_eq!(v["temperature"][0]["value"], "25");
    assert_eq!(v["humidity"][0]["value"], "40.5");
    assert_eq!(v["on"][0]["value"], "true");

    // MQTT 5, an array of ts/values objects: history keeps both samples, latest the newest.
    let body = r#"[{"ts":1700000000000,"values":{"pressure":1000}},{"ts":1700000001000,"values":{"pressure":1001.5}}]"#;
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            "TOKEN_A",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            body,
        ],
    )?;
    assert_eq!(rc, 0);
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("pressure").is_some())
        .await?;
    assert_eq!(v["pressure"][0]["ts"], 1_700_000_001_000i64);
    let (code, h) = rest.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=pressure&startTs=0&endTs=1800000000000&limit=10&useStrictDataTypes=true"),
        None,
    )?;
    assert_eq!(code, 200);
    let samples: Vec<(i64, f64)> = h["pressure"]
        .as_array()
        .expect("history list")
        .iter()
        .map(|s| (s["ts"].as_i64().unwrap(), s["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        samples,
        vec![(1_700_000_001_000, 1001.5), (1_700_000_000_000, 1000.0)]
    );

    // Aggregation: AVG over one interval covering both samples, stamped at its middle.
    let (code, a) = rest.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=pressure&startTs=1700000000000&endTs=1700000002000&interval=2000&agg=AVG"),
        None,
    )?;
    assert_eq!(code, 200);
    assert_eq!(a["pressure"][0]["ts"], 1_700_000_001_000i64);
    assert_eq!(a["pressure"][0]["value"], "1000.75");

    // Client attributes.
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-q",
            "1",
            "-u",
            "TOKEN_A",
            "-t",
            "v1/devices/me/attributes",
            "-m",
            r#"{"firmware":"1.2.3","config":{"a":1}}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let attrs = loop {
        let (code, v) = rest.call(
            "GET",
            &format!("/api/plugins/telemetry/DEVICE/{id}/values/attributes/CLIENT_SCOPE"),
            None,
        )?;
        assert_eq!(code, 200);
        if v.as_array().is_some_and(|a| a.len() == 2) || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let get = |k: &str| {
        attrs
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == k)
            .map(|r| r["value"].clone())
    };
    assert_eq!(get("firmware"), Some(Value::from("1.2.3")));
    assert_eq!(get("config"), Some(serde_json::json!({"a": 1})));

    // The connection left connectivity attributes behind.
    let (_, server) = rest.call(
        "GET",
        &format!(
            "/api/plugins/telemetry/DEVICE/{id}/values/attributes/SERVER_SCOPE?keys=lastConnectTime,active"
        ),
        None,
    )?;
    assert_eq!(server.as_array().map(Vec::len), Some(2), "{server}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mqtt_input_gets_reason_codes_and_stores_nothing() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let mqtt = &c.mqtt[&1];
    let id = rest.create_device("Sensor B", "TOKEN_B")?;

    // Wrong token: MQTT 5 CONNACK 0x86 (bad user name or password); 3.1.1: 5 (not authorized).
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            "NOPE",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"x":1}"#,
        ],
    )?;
    assert_eq!(rc, 0x86);
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-q",
            "1",
            "-u",
            "NOPE",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"x":1}"#,
        ],
    )?;
    assert_eq!(rc, 5);

    let (client, mut ev) = v5_client(mqtt, "TOKEN_B");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;

    // Invalid JSON: PUBACK 0x99, payload format invalid.
    client
        .publish("v1/devices/me/telemetry", QoS::AtLeastOnce, false, "{not json")
        .await?;
    let r = next_packet(&mut ev, |p| match p {
        Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await?;
    assert_eq!(r, PubAckReason::PayloadFormatInvalid);

    // A topic ThingsBoard does not have: PUBACK 0x90, topic name invalid.
    client
        .publish("v1/devices/me/elsewhere", QoS::AtLeastOnce, false, r#"{"y":2}"#)
        .await?;
    let r = next_packet(&mut ev, |p| match p {
        Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await?;
    assert_eq!(r, PubAckReason::TopicNameInvalid);

    // Wildcards are refused at SUBACK (0x8F); ThingsBoard's own filters are granted QoS 1.
    client.subscribe("v1/devices/me/#", QoS::AtLeastOnce).await?;
    let codes = next_packet(&mut ev, |p| match p {
        Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(codes, vec![SubscribeReasonCode::TopicFilterInvalid]);
    client
        .subscribe("v1/devices/me/attributes", QoS::ExactlyOnce)
        .await?;
    let codes = next_packet(&mut ev, |p| match p {
        Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // getSessionLimits is answered by the transport, with the `rateLimits` key the SDKs wait for.
    client
        .subscribe("v1/devices/me/rpc/response/+", QoS::AtLeastOnce)
        .await?;
    client
        .publish(
            "v1/devices/me/rpc/request/1",
            QoS::AtLeastOnce,
            false,
            r#"{"method":"getSessionLimits","params":{"timeout":5000}}"#,
        )
        .await?;
    let limits = next_packet(&mut ev, |p| match p {
        Packet::Publish(p) if p.topic.as_ref() == b"v1/devices/me/rpc/response/1" => {
            serde_json::from_slice::<Value>(&p.payload).ok()
        }
        _ => None,
    })
    .await?;
    assert_eq!(limits["maxPayloadSize"], 65536);
    assert!(limits.get("rateLimits").is_some(), "{limits}");

    // MQTT 3.1.1 cannot refuse one message: invalid JSON closes the connection, unacknowledged.
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-q",
            "1",
            "-u",
            "TOKEN_B",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            "[1,2",
        ],
    )?;
    assert_ne!(rc, 0);
    // Oversized packet (> 65536 bytes): the connection is closed, nothing acknowledged.
    let big = format!(r#"{{"big":"{}"}}"#, "x".repeat(70_000));
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            "TOKEN_B",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            &big,
        ],
    )?;
    assert_ne!(rc, 0);

    // A good message after all that is stored, and it is the only telemetry there is.
    client
        .publish(
            "v1/devices/me/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"marker":1}"#,
        )
        .await?;
    let r = next_packet(&mut ev, |p| match p {
        Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await?;
    assert_eq!(r, PubAckReason::Success);
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("marker").is_some())
        .await?;
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys, vec!["marker"], "only the good message was stored: {v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_only_their_own_devices() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let id = rest.create_device("Private", "TOKEN_P")?;
    let path = format!("/api/device/{id}");
    assert_eq!(rest.call("GET", &path, None)?.0, 200);
    // The customer user of the same tenant: the device is not assigned to its customer.
    let customer = Rest::login(&c.http[&1], "customer@thingsboard.org", "customer").await?;
    let (code, body) = customer.call("GET", &path, None)?;
    assert_eq!(code, 403);
    assert_eq!(body["errorCode"], 20);
    let (_, list) = customer.call("GET", "/api/tenant/devices?pageSize=10&page=0", None)?;
    assert_eq!(list["totalElements"], 0);
    // The system administrator belongs to no tenant.
    let admin = Rest::login(&c.http[&1], "sysadmin@thingsboard.org", "sysadmin").await?;
    assert_eq!(admin.call("GET", &path, None)?.0, 403);
    // No token, a forged token, a wrong password: 401 with ThingsBoard's envelope.
    let anon = Rest::new(&c.http[&1]);
    let (code, body) = anon.call("GET", &path, None)?;
    assert_eq!((code, body["errorCode"].clone()), (401, Value::from(10)));
    let forged = Rest {
        token: Some("eyJhbGciOiJIUzUxMiJ9.e30.AAAA".into()),
        ..anon.clone()
    };
    assert_eq!(forged.call("GET", &path, None)?.0, 401);
    let (code, body) = anon.call(
        "POST",
        "/api/auth/login",
        Some(r#"{"username":"tenant@thingsboard.org","password":"wrong"}"#),
    )?;
    assert_eq!(code, 401);
    assert_eq!(body["message"], "Invalid username or password");
    // The tenant's own listing has the device.
    let (_, list) = rest.call("GET", "/api/tenant/devices?pageSize=10&page=0", None)?;
    assert_eq!(list["totalElements"], 1);
    assert_eq!(list["data"][0]["name"], "Private");
    Ok(())
}
