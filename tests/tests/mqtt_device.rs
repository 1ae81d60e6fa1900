//! The MQTT device path end to end, with real clients: `mosquitto_pub` and rumqttc publish to a
//! `thingraft serve` process, and `curl` reads the result back through the REST API.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use serde_json::Value;
use thingraft_tests::{
    ProcCluster, Rest, answer_and_puback, mosquitto_pub, next_packet, next_puback, publish_on, publish_qos1,
    v5_client,
};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

async fn single_node() -> anyhow::Result<(ProcCluster, Rest)> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    Ok((c, rest))
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
    let attrs = rest
        .wait_client_attributes(&id, 2, Duration::from_secs(5))
        .await?;
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
    let r = next_puback(&mut ev).await?;
    assert_eq!(r, PubAckReason::PayloadFormatInvalid);

    // A topic ThingsBoard does not have: PUBACK 0x90, topic name invalid.
    client
        .publish("v1/devices/me/elsewhere", QoS::AtLeastOnce, false, r#"{"y":2}"#)
        .await?;
    let r = next_puback(&mut ev).await?;
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
    let r = next_puback(&mut ev).await?;
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
    // The tenant's listing is for its administrators; a customer user lists its customer's
    // devices (none here), and no other customer's.
    let (code, body) = customer.call("GET", "/api/tenant/devices?pageSize=10&page=0", None)?;
    assert_eq!(
        (code, body["errorCode"].clone()),
        (403, Value::from(20)),
        "{body}"
    );
    let (_, me) = customer.call("GET", "/api/auth/user", None)?;
    let own = me["customerId"]["id"].as_str().expect("customer id").to_string();
    let (code, list) = customer.call(
        "GET",
        &format!("/api/customer/{own}/devices?pageSize=10&page=0"),
        None,
    )?;
    assert_eq!(
        (code, list["totalElements"].clone()),
        (200, Value::from(0)),
        "{list}"
    );
    let other = "5f1c7a2e-0000-4000-8000-000000000002";
    assert_eq!(
        customer
            .call(
                "GET",
                &format!("/api/customer/{other}/devices?pageSize=10&page=0"),
                None
            )?
            .0,
        403
    );
    // A device profile (with its provisioning key and secret) is for the tenant administrator.
    let (_, info) = rest.call("GET", "/api/deviceProfileInfo/default", None)?;
    let profile = format!(
        "/api/deviceProfile/{}",
        info["id"]["id"].as_str().expect("profile id")
    );
    assert_eq!(rest.call("GET", &profile, None)?.0, 200);
    let (code, body) = customer.call("GET", &profile, None)?;
    assert_eq!(
        (code, body["errorCode"].clone()),
        (403, Value::from(20)),
        "{body}"
    );
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
    // A logout ends that login session: its access token and its refresh token are refused
    // from then on; the user's other sessions go on.
    let (code, pair) = anon.call(
        "POST",
        "/api/auth/login",
        Some(r#"{"username":"tenant@thingsboard.org","password":"tenant"}"#),
    )?;
    assert_eq!(code, 200, "{pair}");
    let session = Rest {
        token: pair["token"].as_str().map(String::from),
        ..anon.clone()
    };
    let refresh = serde_json::json!({"refreshToken": pair["refreshToken"]}).to_string();
    assert_eq!(session.call("GET", "/api/auth/user", None)?.0, 200);
    assert_eq!(anon.call("POST", "/api/auth/token", Some(&refresh))?.0, 200);
    assert_eq!(session.call("POST", "/api/auth/logout", None)?.0, 200);
    assert_eq!(session.call("GET", "/api/auth/user", None)?.0, 401);
    assert_eq!(anon.call("POST", "/api/auth/token", Some(&refresh))?.0, 401);
    assert_eq!(rest.call("GET", &path, None)?.0, 200);
    // The tenant's own listing has the device.
    let (_, list) = rest.call("GET", "/api/tenant/devices?pageSize=10&page=0", None)?;
    assert_eq!(list["totalElements"], 1);
    assert_eq!(list["data"][0]["name"], "Private");
    Ok(())
}

/// A device on rumqttc (MQTT 5) that subscribes to shared attributes and RPC.
async fn subscribed_device(addr: &str, token: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (client, mut ev) = v5_client(addr, token);
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    for f in [
        "v1/devices/me/attributes",
        "v1/devices/me/rpc/request/+",
        "v1/devices/me/attributes/response/+",
    ] {
        client.subscribe(f, QoS::AtLeastOnce).await?;
        next_packet(&mut ev, |p| matches!(p, Packet::SubAck(_)).then_some(())).await?;
    }
    Ok((client, ev))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_attributes_and_rpc_reach_the_device_and_its_answers_come_back() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let id = rest.create_device("Valve", "TOKEN_V")?;
    let (client, mut ev) = subscribed_device(&c.mqtt[&1], "TOKEN_V").await?;

    // A shared attribute saved through REST is pushed to the subscribed device.
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"targetTemperature":22.5}"#),
    )?;
    assert_eq!(code, 200);
    let (_, pushed) = next_packet(&mut ev, |p| publish_on(p, "v1/devices/me/attributes")).await?;
    assert_eq!(pushed, serde_json::json!({"targetTemperature": 22.5}));

    // The device asks for its attributes: the answer has the shared section only (no client
    // attributes yet), on the response topic of its request id.
    client
        .publish(
            "v1/devices/me/attributes/request/7",
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await?;
    let (topic, answer) =
        next_packet(&mut ev, |p| publish_on(p, "v1/devices/me/attributes/response/")).await?;
    assert_eq!(topic, "v1/devices/me/attributes/response/7");
    assert_eq!(answer, serde_json::json!({"shared": {"targetTemperature": 22.5}}));

    // A two-way RPC: the device gets it on rpc/request/{id}, answers, and REST returns the answer.
    let rest2 = rest.clone();
    let path = format!("/api/plugins/rpc/twoway/{id}");
    let call = tokio::task::spawn_blocking(move || {
        rest2.call(
            "POST",
            &path,
            Some(r#"{"method":"setGpio","params":{"pin":7,"value":1}}"#),
        )
    });
    let (topic, req) = next_packet(&mut ev, |p| publish_on(p, "v1/devices/me/rpc/request/")).await?;
    assert_eq!(
        req,
        serde_json::json!({"method": "setGpio", "params": {"pin": 7, "value": 1}})
    );
    let rpc_id = topic.rsplit('/').next().unwrap().to_string();
    client
        .publish(
            format!("v1/devices/me/rpc/response/{rpc_id}"),
            QoS::AtLeastOnce,
            false,
            r#"{"pin":7,"value":1}"#,
        )
        .await?;
    // Keep the connection serviced while REST waits.
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let (code, body) = call.await??;
    assert_eq!((code, body), (200, serde_json::json!({"pin": 7, "value": 1})));
    pump.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_to_a_silent_or_absent_device_times_out_with_thingsboards_codes() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let id = rest.create_device("Mute", "TOKEN_M")?;
    let body = r#"{"method":"ping","params":{},"timeout":5000}"#;
    // No session: v1 answers 409 (no active connection), v2 504.
    let r1 = rest.clone();
    let p1 = format!("/api/plugins/rpc/twoway/{id}");
    let absent_v1 = tokio::task::spawn_blocking(move || r1.call("POST", &p1, Some(body)));
    let r2 = rest.clone();
    let p2 = format!("/api/rpc/twoway/{id}");
    let absent_v2 = tokio::task::spawn_blocking(move || r2.call("POST", &p2, Some(body)));
    assert_eq!(absent_v1.await??.0, 409);
    assert_eq!(absent_v2.await??.0, 504);
    // A subscribed device that never answers: v1 answers 408 (timeout).
    let (_client, mut ev) = subscribed_device(&c.mqtt[&1], "TOKEN_M").await?;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let r3 = rest.clone();
    let p3 = format!("/api/plugins/rpc/twoway/{id}");
    let (code, body) = tokio::task::spawn_blocking(move || r3.call("POST", &p3, Some(body))).await??;
    assert_eq!(code, 408, "{body}");
    pump.abort();
    // A persistent RPC answers at once with its id; its status is tracked. The device
    // above may still hold a session (dropping its event loop closes it some time later),
    // so the RPC goes to one that never connected: it stays QUEUED until it expires.
    let offline = rest.create_device("Offline", "TOKEN_OFF")?;
    let rpc_id = rest.persistent_rpc(&offline, true, "later")?;
    let (code, status) = rest.call("GET", &format!("/api/rpc/persistent/{rpc_id}"), None)?;
    assert_eq!(code, 200);
    assert_eq!(status["status"], "QUEUED");
    // Its UUID names that RPC alone: a request to another device under the same UUID is refused
    // (400), and the queued one is untouched.
    let steal = format!(r#"{{"method":"steal","params":{{}},"requestUUID":"{rpc_id}","timeout":1000}}"#);
    let (code, body) = rest.call("POST", &format!("/api/plugins/rpc/twoway/{id}"), Some(&steal))?;
    assert_eq!(code, 400, "{body}");
    let (_, status) = rest.call("GET", &format!("/api/rpc/persistent/{rpc_id}"), None)?;
    assert_eq!(
        (
            status["status"].as_str(),
            status["request"]["body"]["method"].as_str()
        ),
        (Some("QUEUED"), Some("later"))
    );
    // Deleted while queued: it is gone (404), and the device that connects later never gets it;
    // the first request it gets is the one sent after it has been connected for a while.
    let path = format!("/api/rpc/persistent/{rpc_id}");
    assert_eq!(rest.call("DELETE", &path, None)?.0, 200);
    assert_eq!(rest.call("GET", &path, None)?.0, 404);
    let (_device, mut ev) = subscribed_device(&c.mqtt[&1], "TOKEN_OFF").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // three retries of queued RPCs
    rest.persistent_rpc(&offline, true, "now")?;
    let first = next_packet(&mut ev, |p| match p {
        Packet::Publish(p) if p.topic.starts_with(b"v1/devices/me/rpc/request/") => {
            Some(String::from_utf8_lossy(&p.payload).into_owned())
        }
        _ => None,
    })
    .await?;
    assert!(first.contains(r#""method":"now""#), "{first}");
    Ok(())
}

/// Polls the event loop (so the client sends its acknowledgements) until it fails, or until a
/// packet `refused` picks arrives.
async fn pump_refusing(ev: &mut EventLoop, refused: impl Fn(&Packet) -> bool) -> anyhow::Result<()> {
    loop {
        if let rumqttc::v5::Event::Incoming(p) = ev.poll().await?
            && refused(&p)
        {
            anyhow::bail!("refused packet: {p:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_is_sent_again_until_the_device_acknowledges_it_and_then_it_is_delivered() -> anyhow::Result<()>
{
    // ThingsBoard: SENT when the transport has it, DELIVERED on the device's PUBACK, sent again
    // when the device does not acknowledge it in time, FAILED when the retries run out.
    let config = "[engine]\nrpc_ack_timeout_ms = 1500\nrpc_max_retries = 1\n";
    let c = ProcCluster::start_with_config(1, 4, Some(config)).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let id = rest.create_device("Acker", "TOKEN_ACK")?;
    // A device that acknowledges only what the test tells it to.
    let (host, port) = c.mqtt[&1].rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("acker", host, port.parse()?);
    o.set_credentials("TOKEN_ACK", "");
    o.set_manual_acks(true);
    let (client, mut ev) = AsyncClient::new(o, 16);
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .subscribe("v1/devices/me/rpc/request/+", QoS::AtLeastOnce)
        .await?;
    next_packet(&mut ev, |p| matches!(p, Packet::SubAck(_)).then_some(())).await?;
    let rpc_publish = |p: &Packet| match p {
        Packet::Publish(p) if p.topic.starts_with(b"v1/devices/me/rpc/request/") => Some(p.clone()),
        _ => None,
    };

    let rpc_id = rest.persistent_rpc(&id, false, "open")?;
    let first = next_packet(&mut ev, rpc_publish).await?;
    let first_at = tokio::time::Instant::now();
    assert_eq!(rest.rpc_status_becomes(&rpc_id, "SENT").await?, "SENT");
    // Not acknowledged: not delivered, and sent again once the acknowledgement is overdue
    // (rpc_ack_timeout_ms = 1500), not before.
    let again = next_packet(&mut ev, rpc_publish).await?;
    let gap = first_at.elapsed();
    assert!(gap >= Duration::from_millis(1200), "sent again after {gap:?}");
    assert_eq!(again.topic, first.topic, "the same RPC, sent again");
    assert_eq!(rest.rpc_status_becomes(&rpc_id, "SENT").await?, "SENT");
    client.ack(&again).await?;
    let delivered = tokio::select! {
        s = rest.rpc_status_becomes(&rpc_id, "DELIVERED") => s?,
        e = pump_refusing(&mut ev, |_| false) => return Err(anyhow::anyhow!("event loop ended: {e:?}")),
    };
    assert_eq!(delivered, "DELIVERED");
    let rid = String::from_utf8_lossy(&again.topic)
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    client
        .publish(
            format!("v1/devices/me/rpc/response/{rid}"),
            QoS::AtLeastOnce,
            false,
            r#"{"open":true}"#,
        )
        .await?;
    next_packet(&mut ev, |p| matches!(p, Packet::PubAck(_)).then_some(())).await?;
    assert_eq!(
        rest.rpc_status_becomes(&rpc_id, "SUCCESSFUL").await?,
        "SUCCESSFUL"
    );

    // One never acknowledged fails after its sends (1 + rpc_max_retries) run out.
    let ignored = rest.persistent_rpc(&id, true, "ignored")?;
    for _ in 0..2 {
        let p = next_packet(&mut ev, rpc_publish).await?;
        assert!(String::from_utf8_lossy(&p.payload).contains("ignored"));
    }
    // Two sends (1 + rpc_max_retries) and no third.
    let failed = tokio::select! {
        s = rest.rpc_status_becomes(&ignored, "FAILED") => s?,
        e = pump_refusing(&mut ev, |p| rpc_publish(p).is_some()) => return Err(anyhow::anyhow!("a third send, or the event loop ended: {e:?}")),
    };
    assert_eq!(failed, "FAILED");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_basic_credentials_authenticate_and_changing_them_closes_the_session() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let mqtt = &c.mqtt[&1];
    let id = rest.create_device("Basic", "TOKEN_OLD")?;
    let body = serde_json::json!({
        "deviceId": {"entityType": "DEVICE", "id": id},
        "credentialsType": "MQTT_BASIC",
        "credentialsValue": r#"{"clientId":"client-1","userName":"user-1","password":"secret"}"#,
    })
    .to_string();
    let (code, creds) = rest.call("POST", "/api/device/credentials", Some(&body))?;
    assert_eq!(code, 200, "{creds}");
    assert_eq!(creds["credentialsType"], "MQTT_BASIC");

    let pub_basic = |password: &str| {
        mosquitto_pub(
            mqtt,
            &[
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-i",
                "client-1",
                "-u",
                "user-1",
                "-P",
                password,
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                r#"{"basic":1}"#,
            ],
        )
    };
    assert_eq!(pub_basic("secret")?, 0);
    assert_eq!(pub_basic("wrong")?, 0x86, "a wrong password is refused");
    // The old token stopped working when the credentials changed.
    let rc = mosquitto_pub(
        mqtt,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            "TOKEN_OLD",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"x":1}"#,
        ],
    )?;
    assert_eq!(rc, 0x86);
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("basic").is_some())
        .await?;
    assert!(
        v.get("x").is_none(),
        "nothing from the refused token was stored: {v}"
    );

    // A connected session is closed with DISCONNECT 0x98 when its credentials change.
    let (host, port) = mqtt.rsplit_once(':').expect("port");
    let mut o = MqttOptions::new("client-1", host, port.parse()?);
    o.set_credentials("user-1", "secret");
    let (_client, mut ev) = AsyncClient::new(o, 16);
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    let body = serde_json::json!({
        "deviceId": {"entityType": "DEVICE", "id": id},
        "credentialsType": "ACCESS_TOKEN",
        "credentialsId": "TOKEN_NEW",
    })
    .to_string();
    assert_eq!(rest.call("POST", "/api/device/credentials", Some(&body))?.0, 200);
    // rumqttc reports the server's DISCONNECT as the end of its event loop.
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await? {
            Ok(_) => continue,
            Err(rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => break reason_code,
            Err(e) => anyhow::bail!("connection ended without a DISCONNECT: {e}"),
        }
    };
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction
    );
    assert_eq!(
        mosquitto_pub(
            mqtt,
            &[
                "-q",
                "1",
                "-u",
                "TOKEN_NEW",
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                r#"{"y":1}"#
            ]
        )?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_rpcs_get_the_root_chains_answer_or_time_out() -> anyhow::Result<()> {
    let c = ProcCluster::start_with_config(1, 4, Some("[transport]\nclient_rpc_timeout_ms = 1000\n")).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    rest.create_device("Asker", "TOKEN_ASK")?;
    let (client, mut ev) = v5_client(&c.mqtt[&1], "TOKEN_ASK");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .subscribe("v1/devices/me/rpc/response/+", QoS::AtLeastOnce)
        .await?;
    // `getTime`: the default root chain replies with the server time, on the request's id.
    client
        .publish(
            "v1/devices/me/rpc/request/2",
            QoS::AtLeastOnce,
            false,
            r#"{"method":"getTime","params":{}}"#,
        )
        .await?;
    let ((topic, body), r) = answer_and_puback(&mut ev, "v1/devices/me/rpc/response/").await?;
    assert_eq!(r, PubAckReason::Success);
    assert_eq!(topic, "v1/devices/me/rpc/response/2");
    let body: Value = serde_json::from_slice(&body)?;
    thingraft_tests::assert_server_time(&body);
    // Any other method: the chain only logs it, and the transport answers with a timeout.
    client
        .publish(
            "v1/devices/me/rpc/request/3",
            QoS::AtLeastOnce,
            false,
            r#"{"method":"getWeather","params":{}}"#,
        )
        .await?;
    let ((topic, body), r) = answer_and_puback(&mut ev, "v1/devices/me/rpc/response/").await?;
    assert_eq!(r, PubAckReason::Success);
    assert_eq!(topic, "v1/devices/me/rpc/response/3");
    let body: Value = serde_json::from_slice(&body)?;
    assert_eq!(body, serde_json::json!({"error": "timeout"}));
    Ok(())
}

/// A device's server-scope attributes, by key.
fn server_attributes(rest: &Rest, id: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    let v = rest.attributes(id, "SERVER_SCOPE", "")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| (r["key"].as_str().unwrap_or("").to_string(), r["value"].clone()))
                .collect()
        })
        .unwrap_or_default())
}

/// Polls the device's server attributes until `active` is `want` (failing after `within`).
async fn wait_active(
    rest: &Rest,
    id: &str,
    want: bool,
    within: Duration,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let a = server_attributes(rest, id)?;
        if a.get("active") == Some(&Value::Bool(want)) {
            return Ok(a);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "active never became {want}: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn long_of(a: &serde_json::Map<String, Value>, k: &str) -> i64 {
    a.get(k)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{k} missing: {a:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_becomes_inactive_and_activity_makes_it_active_again() -> anyhow::Result<()> {
    let config = "[engine]\ninactivity_timeout_ms = 1000\nstate_check_interval_ms = 200\n";
    let c = ProcCluster::start_with_config(1, 4, Some(config)).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let id = rest.create_device("Sleepy", "TOKEN_Z")?;
    let wait_for = |want_active: bool| wait_active(&rest, &id, want_active, Duration::from_secs(10));
    // A connection with a message: active, with connect, disconnect and activity times.
    let rc = mosquitto_pub(
        &c.mqtt[&1],
        &[
            "-q",
            "1",
            "-u",
            "TOKEN_Z",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"t":1}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    let a = wait_for(true).await?;
    for k in ["lastConnectTime", "lastActivityTime"] {
        assert!(a.get(k).and_then(Value::as_i64).is_some(), "{k} missing: {a:?}");
    }
    // Silent for longer than the timeout: inactive, with the alarm time recorded.
    let a = wait_for(false).await?;
    let alarm = long_of(&a, "inactivityAlarmTime");
    let last = long_of(&a, "lastActivityTime");
    assert!(alarm >= last + 1000, "inactive only after the timeout: {a:?}");
    assert!(
        a.get("lastDisconnectTime").and_then(Value::as_i64).is_some(),
        "{a:?}"
    );
    // New activity makes it active again.
    let rc = mosquitto_pub(
        &c.mqtt[&1],
        &[
            "-q",
            "1",
            "-u",
            "TOKEN_Z",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"t":2}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    wait_for(true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_times_a_device_out_from_its_last_activity() -> anyhow::Result<()> {
    // Checked every 100 ms; the 6 s timeout leaves the node time to restart before it passes.
    let config = "[engine]\ninactivity_timeout_ms = 6000\nstate_check_interval_ms = 100\n";
    let mut c = ProcCluster::start_with_config(1, 4, Some(config)).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let id = rest.create_device("Chatty", "TOKEN_C")?;
    // Four messages 250 ms apart on one connection: activity well within one second.
    let (client, mut ev) = v5_client(&c.mqtt[&1], "TOKEN_C");
    for n in 0..4 {
        let r = publish_qos1(
            &client,
            &mut ev,
            "v1/devices/me/telemetry",
            &format!(r#"{{"n":{n}}}"#),
        )
        .await?;
        assert_eq!(r, PubAckReason::Success);
        if n < 3 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // The connection closes: its disconnect counts as activity too.
    drop((client, ev));
    // The last message's time as the node stamped it (its telemetry's ts), once processed.
    let latest = rest
        .wait_latest(&id, Duration::from_secs(10), |v| v["n"][0]["value"] == "3")
        .await?;
    let last_ts = latest["n"][0]["ts"].as_i64().expect("ts of the last message");
    // Stopped cleanly (its store flushed) and started again: it reloads the connectivity state.
    c.stop(1).await?;
    c.restart(1)?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let a = wait_active(&rest, &id, false, Duration::from_secs(30)).await?;
    let last_activity = long_of(&a, "lastActivityTime");
    assert!(
        last_activity >= last_ts,
        "lastActivityTime is the last message's ({last_ts}) or later, not an earlier one: {a:?}"
    );
    assert!(
        long_of(&a, "inactivityAlarmTime") >= last_activity + 6000,
        "inactive only once the timeout passed after the last activity: {a:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_saves_reads_and_deletes_telemetry_and_attributes() -> anyhow::Result<()> {
    let (_c, rest) = single_node().await?;
    let id = rest.create_device("Meter", "TOKEN_R")?;
    let ts_path = format!("/api/plugins/telemetry/DEVICE/{id}/timeseries/ANY?scope=ANY");
    let body = r#"[{"ts":1000,"values":{"a":1,"b":2}},{"ts":2000,"values":{"a":3}}]"#;
    assert_eq!(rest.call("POST", &ts_path, Some(body))?.0, 200);
    // Bad input: 400 with the envelope, nothing stored.
    for bad in [r#"{"a":null}"#, "{not json", "{}"] {
        let (code, v) = rest.call("POST", &ts_path, Some(bad))?;
        assert_eq!((code, v["status"].clone()), (400, Value::from(400)), "{bad}: {v}");
    }
    let (_, keys) = rest.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/keys/timeseries"),
        None,
    )?;
    assert_eq!(keys, serde_json::json!(["a", "b"]));
    let hist = |rest: &Rest, key: &str| -> anyhow::Result<Value> {
        let (_, v) = rest.call(
            "GET",
            &format!("/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys={key}&startTs=0&endTs=10000&orderBy=ASC"),
            None,
        )?;
        Ok(v)
    };
    assert_eq!(
        hist(&rest, "a")?,
        serde_json::json!({"a": [{"ts": 1000, "value": "1"}, {"ts": 2000, "value": "3"}]})
    );
    // Delete "a" everywhere: history and latest; "b" stays.
    let (code, _) = rest.call(
        "DELETE",
        &format!("/api/plugins/telemetry/DEVICE/{id}/timeseries/delete?keys=a&deleteAllDataForKeys=true"),
        None,
    )?;
    assert_eq!(code, 200);
    assert_eq!(hist(&rest, "a")?, serde_json::json!({}));
    assert_eq!(
        hist(&rest, "b")?,
        serde_json::json!({"b": [{"ts": 1000, "value": "2"}]})
    );
    let latest = rest.latest(&id)?;
    assert!(latest.get("a").is_none() && latest.get("b").is_some(), "{latest}");

    // Attributes: server scope saved and deleted; client scope cannot be saved through REST.
    let attr_path = format!("/api/plugins/telemetry/{id}/SERVER_SCOPE");
    assert_eq!(
        rest.call("POST", &attr_path, Some(r#"{"floor":3,"room":"B12"}"#))?
            .0,
        200
    );
    assert_eq!(
        rest.call(
            "POST",
            &format!("/api/plugins/telemetry/{id}/CLIENT_SCOPE"),
            Some(r#"{"x":1}"#)
        )?
        .0,
        400
    );
    let scope_keys = |rest: &Rest| -> anyhow::Result<Value> {
        Ok(rest
            .call(
                "GET",
                &format!("/api/plugins/telemetry/DEVICE/{id}/keys/attributes/SERVER_SCOPE"),
                None,
            )?
            .1)
    };
    assert_eq!(
        scope_keys(&rest)?,
        serde_json::json!(["floor", "room"]),
        "keys in name order"
    );
    assert_eq!(
        rest.call("DELETE", &format!("{attr_path}?keys=floor"), None)?.0,
        200
    );
    assert_eq!(scope_keys(&rest)?, serde_json::json!(["room"]));
    Ok(())
}

/// CONNECT (MQTT 3.1.1, the token as user name), waiting for CONNACK accepted.
async fn raw_connect(addr: &str, token: &str) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 60, 0, 0];
    body.extend_from_slice(&(token.len() as u16).to_be_bytes());
    body.extend_from_slice(token.as_bytes());
    anyhow::ensure!(body.len() < 128, "token too long for this test client");
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack)).await??;
    anyhow::ensure!(ack == [0x20, 2, 0, 0], "CONNACK {ack:?}");
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pings_keep_a_device_active() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = "[engine]\ninactivity_timeout_ms = 1500\nstate_check_interval_ms = 200\n\
                  [mqtt]\nactivity_report_ms = 300\n";
    let c = ProcCluster::start_with_config(1, 4, Some(config)).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let id = rest.create_device("Pinger", "TOKEN_PING")?;
    let active = |rest: &Rest| -> anyhow::Result<Option<bool>> {
        let (_, v) = rest.call(
            "GET",
            &format!("/api/plugins/telemetry/DEVICE/{id}/values/attributes/SERVER_SCOPE?keys=active"),
            None,
        )?;
        Ok(v.as_array()
            .and_then(|a| a.first())
            .and_then(|r| r["value"].as_bool()))
    };
    let mut s = raw_connect(&c.mqtt[&1], "TOKEN_PING").await?;
    // Only PINGREQs for 4 s, well past the 1.5 s inactivity timeout.
    let start = std::time::Instant::now();
    let mut buf = [0u8; 2];
    while start.elapsed() < Duration::from_secs(4) {
        s.write_all(&[0xC0, 0]).await?;
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await??;
        assert_eq!(buf, [0xD0, 0], "PINGRESP");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(active(&rest)?, Some(true), "pings kept the device active");
    // Silence: inactive after the timeout.
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while active(&rest)? != Some(false) {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent device never became inactive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_short_topics_carry_the_same_exchanges_and_answers_use_the_family_asked() -> anyhow::Result<()> {
    let (c, rest) = single_node().await?;
    let id = rest.create_device("Short", "TOKEN_S2")?;
    let (client, mut ev) = v5_client(&c.mqtt[&1], "TOKEN_S2");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    // ThingsBoard's short filters are granted (the protobuf form too: tests/protobuf.rs uses
    // it); a wildcard on a publish topic is not one of them. The last attributes subscription
    // (`v2/a/j`) decides the family of the pushes.
    for (f, granted) in [
        ("v2/a/p", true),
        ("v2/a/j", true),
        ("v2/r/req/+", true),
        ("v2/a/res/+", true),
        ("v2/t/+", false),
    ] {
        client.subscribe(f, QoS::AtLeastOnce).await?;
        let codes = next_packet(&mut ev, |p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await?;
        assert_eq!(
            codes[0] == SubscribeReasonCode::Success(QoS::AtLeastOnce),
            granted,
            "{f}: {codes:?}"
        );
    }

    // Telemetry and attributes on the short topics.
    for (topic, body) in [("v2/t", r#"{"level":7}"#), ("v2/a", r#"{"mode":"eco"}"#)] {
        client.publish(topic, QoS::AtLeastOnce, false, body).await?;
        let r = next_puback(&mut ev).await?;
        assert_eq!(r, PubAckReason::Success, "{topic}");
    }
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("level").is_some())
        .await?;
    assert_eq!(v["level"][0]["value"], "7");

    // An attribute request on v2/a/req/{id} is answered on v2/a/res/{id}.
    client
        .publish("v2/a/req/5", QoS::AtLeastOnce, false, r#"{"clientKeys":"mode"}"#)
        .await?;
    let (topic, answer) = next_packet(&mut ev, |p| publish_on(p, "v2/a/res/")).await?;
    assert_eq!(topic, "v2/a/res/5");
    assert_eq!(answer, serde_json::json!({"client": {"mode": "eco"}}));

    // Shared attributes are pushed on the family subscribed: v2/a/j.
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"setpoint":19}"#),
    )?;
    assert_eq!(code, 200);
    let (topic, pushed) = next_packet(&mut ev, |p| publish_on(p, "v2/a")).await?;
    assert_eq!(
        (topic.as_str(), pushed),
        ("v2/a/j", serde_json::json!({"setpoint": 19}))
    );

    // getSessionLimits on v2/r/req/1 is answered by the transport on v2/r/res/1.
    client
        .publish(
            "v2/r/req/1",
            QoS::AtLeastOnce,
            false,
            r#"{"method":"getSessionLimits","params":{}}"#,
        )
        .await?;
    let (topic, limits) = next_packet(&mut ev, |p| publish_on(p, "v2/r/res/")).await?;
    assert_eq!(topic, "v2/r/res/1");
    assert!(limits.get("rateLimits").is_some(), "{limits}");

    // A one-way server-side RPC arrives on v2/r/req/{id}.
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/rpc/oneway/{id}"),
        Some(r#"{"method":"blink","params":{}}"#),
    )?;
    assert_eq!(code, 200);
    let (topic, req) = next_packet(&mut ev, |p| publish_on(p, "v2/r/req/")).await?;
    assert!(
        topic
            .strip_prefix("v2/r/req/")
            .is_some_and(|id| id.parse::<u32>().is_ok()),
        "{topic}"
    );
    assert_eq!(req["method"], "blink");
    Ok(())
}

/// A PUBLISH QoS 1 packet (MQTT 3.1.1) with packet id `pkid`.
fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    let mut pkt = vec![0x32];
    let mut len = body.len();
    loop {
        let b = (len % 128) as u8;
        len /= 128;
        pkt.push(if len > 0 { b | 0x80 } else { b });
        if len == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&body);
    pkt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_publishes_is_acknowledged_in_order_and_stored_in_order() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (c, rest) = single_node().await?;
    let id = rest.create_device("Streamer", "TOKEN_STREAM")?;
    let (mut rd, mut wr) = raw_connect(&c.mqtt[&1], "TOKEN_STREAM").await?.into_split();
    const N: u16 = 400;
    // Written in small bursts without waiting for PUBACKs, so that the session reads them as
    // many batches and keeps several appends in flight at once. Each burst sets the client
    // attribute `seq` and adds a telemetry row.
    let writer = tokio::spawn(async move {
        for burst in (1..=N).collect::<Vec<_>>().chunks(7) {
            let mut buf = Vec::new();
            for &i in burst {
                let attrs = format!("{{\"seq\":{i}}}");
                buf.extend(publish_packet(
                    "v1/devices/me/attributes",
                    2 * i - 1,
                    attrs.as_bytes(),
                ));
                let tel = format!("{{\"ts\":{},\"values\":{{\"n\":{i}}}}}", 1_000_000 + u64::from(i));
                buf.extend(publish_packet("v1/devices/me/telemetry", 2 * i, tel.as_bytes()));
            }
            wr.write_all(&buf).await?;
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        anyhow::Ok(wr)
    });
    // Every PUBACK, in the order of the PUBLISHes (MQTT 3.1.1 §4.6).
    let mut acks = vec![0u8; 4 * 2 * usize::from(N)];
    tokio::time::timeout(Duration::from_secs(20), rd.read_exact(&mut acks)).await??;
    for (k, ack) in acks.chunks(4).enumerate() {
        let pkid = k as u16 + 1;
        assert_eq!(ack, [0x40, 2, (pkid >> 8) as u8, pkid as u8], "PUBACK #{k}");
    }
    let mut wr = writer.await??;
    // A PUBLISH answered without an append (an unknown topic: dropped, acknowledged) between two
    // that are appended: its PUBACK waits for the one owed before it.
    let mut buf = publish_packet("v1/devices/me/telemetry", 1001, br#"{"ordered":1}"#);
    buf.extend(publish_packet("v1/devices/me/no-such-topic", 1002, b"{}"));
    buf.extend(publish_packet(
        "v1/devices/me/telemetry",
        1003,
        br#"{"ordered":3}"#,
    ));
    wr.write_all(&buf).await?;
    let mut acks = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), rd.read_exact(&mut acks)).await??;
    let pkids: Vec<u16> = acks.chunks(4).map(|a| u16::from_be_bytes([a[2], a[3]])).collect();
    assert_eq!(pkids, [1001, 1002, 1003], "PUBACKs {acks:?}");
    // Every telemetry message is in the history...
    let history = |rest: &Rest| -> anyhow::Result<usize> {
        let (code, v) = rest.call(
            "GET",
            &format!(
                "/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=n&startTs=0&endTs=9999999999999&limit=1000"
            ),
            None,
        )?;
        anyhow::ensure!(code == 200, "history: {code} {v}");
        Ok(v["n"].as_array().map_or(0, |a| a.len()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while history(&rest)? < usize::from(N) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "history has {} rows of {N}",
            history(&rest)?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and the attribute writes were applied in the order they were sent: the last one won.
    let (code, v) = rest.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/attributes/CLIENT_SCOPE?keys=seq"),
        None,
    )?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v[0]["value"], Value::from(N), "{v}");
    Ok(())
}
