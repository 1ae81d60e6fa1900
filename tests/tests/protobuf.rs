//! Protobuf device payloads end to end: a device profile with proto schemas saved through REST,
//! devices of it publishing protobuf over MQTT (rumqttc: the profile's default topics, `v2/t/p`,
//! `v2/a/p`, and JSON on `v2/t/j`) and CoAP (`coap-client`), and what was stored read back
//! through REST; attribute pushes, attribute requests, server- and client-side RPC in
//! protobuf on the `p` topics. Bad input: a schema that does not compile, bytes that are not
//! the message, a `p` topic for a JSON device.

use std::time::Duration;

use prost::Message as _;
use prost_reflect::DynamicMessage;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use serde_json::{Value, json};
use thingraft_proto::tb;
use thingraft_tests::{ProcCluster, Rest, answer_and_puback, coap_client, next_puback, v5_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

const TELEMETRY: &str = r#"syntax ="proto3";
package telemetry;

message SensorDataReading {
  optional double temperature = 1;
  optional double humidity = 2;
  InnerObject innerObject = 3;
  int64 counter = 4;

  message InnerObject {
    optional string key1 = 1;
    optional bool key2 = 2;
  }
}"#;

const ATTRIBUTES: &str = r#"syntax ="proto3";
package attributes;

message SensorConfiguration {
  optional string firmwareVersion = 1;
  optional string serialNumber = 2;
}"#;

const RPC_REQUEST: &str = r#"syntax ="proto3";
package rpc;

message RpcRequestMsg {
  optional string method = 1;
  optional int32 requestId = 2;
  optional string params = 3;
}"#;

const RPC_RESPONSE: &str = r#"syntax ="proto3";
package rpc;

message RpcResponseMsg {
  optional string payload = 1;
}"#;

fn payload_config(telemetry: &str) -> Value {
    json!({
        "transportPayloadType": "PROTOBUF",
        "deviceTelemetryProtoSchema": telemetry,
        "deviceAttributesProtoSchema": ATTRIBUTES,
        "deviceRpcRequestProtoSchema": RPC_REQUEST,
        "deviceRpcResponseProtoSchema": RPC_RESPONSE,
        "enableCompatibilityWithJsonPayloadFormat": false,
        "useJsonPayloadFormatForDefaultDownlinkTopics": false,
    })
}

/// A device profile body as ThingsBoard's UI sends it, for MQTT or CoAP.
fn profile(name: &str, transport: &str, telemetry: &str) -> String {
    let transport_configuration = match transport {
        "MQTT" => json!({
            "type": "MQTT",
            "deviceTelemetryTopic": "v1/devices/me/telemetry",
            "deviceAttributesTopic": "v1/devices/me/attributes",
            "deviceAttributesSubscribeTopic": "v1/devices/me/attributes",
            "transportPayloadTypeConfiguration": payload_config(telemetry),
        }),
        _ => json!({
            "type": "COAP",
            "coapDeviceTypeConfiguration": {
                "coapDeviceType": "DEFAULT",
                "transportPayloadTypeConfiguration": payload_config(telemetry),
            },
        }),
    };
    json!({
        "name": name,
        "type": "DEFAULT",
        "transportType": transport,
        "profileData": {
            "configuration": {"type": "DEFAULT"},
            "transportConfiguration": transport_configuration,
        },
    })
    .to_string()
}

/// The message `name` of `schema`, compiled here as a device's toolchain would (not with the
/// node's code under test).
fn message(schema: &str, name: &str) -> prost_reflect::MessageDescriptor {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("device.proto"), schema).expect("write schema");
    let pool = protox::compile(["device.proto"], [dir.path()]).expect("schema compiles");
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(pool).expect("descriptor pool");
    pool.get_message_by_name(name).expect("message in schema")
}

/// `json` encoded as the last message of `schema` (the one ThingsBoard reads), as a device's
/// generated code would.
fn encode(schema: &str, json: &str) -> Vec<u8> {
    let name = match schema {
        TELEMETRY => "telemetry.SensorDataReading",
        ATTRIBUTES => "attributes.SensorConfiguration",
        RPC_RESPONSE => "rpc.RpcResponseMsg",
        _ => panic!("unknown test schema"),
    };
    let desc = message(schema, name);
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize(desc, &mut de).expect("message of the schema");
    prost::Message::encode_to_vec(&msg)
}

fn create_device(rest: &Rest, name: &str, profile: &str, token: &str) -> anyhow::Result<String> {
    let body = json!({"name": name, "type": profile}).to_string();
    let (code, v) = rest.call("POST", &format!("/api/device?accessToken={token}"), Some(&body))?;
    anyhow::ensure!(code == 200, "device create: {code} {v}");
    Ok(v["id"]["id"].as_str().expect("id").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_profile_devices_publish_over_mqtt_and_coap() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;

    // A schema that does not compile is refused, and no profile is created: the same name is
    // free afterwards.
    let (code, v) = rest.call(
        "POST",
        "/api/deviceProfile",
        Some(&profile(
            "proto-sensors",
            "MQTT",
            "syntax = \"proto3\"; message M { int32 a = ; }",
        )),
    )?;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("telemetry proto schema")),
        "{v}"
    );
    let (code, v) = rest.call(
        "POST",
        "/api/deviceProfile",
        Some(&profile("proto-sensors", "MQTT", TELEMETRY)),
    )?;
    assert_eq!(code, 200, "{v}");
    let profile_id = v["id"]["id"].as_str().expect("profile id").to_string();
    let (_, got) = rest.call("GET", &format!("/api/deviceProfile/{profile_id}"), None)?;
    assert_eq!(got["transportType"], "MQTT");
    let cfg = &got["profileData"]["transportConfiguration"]["transportPayloadTypeConfiguration"];
    assert_eq!(cfg["transportPayloadType"], "PROTOBUF", "{got}");
    assert_eq!(cfg["deviceTelemetryProtoSchema"], TELEMETRY);

    let id = create_device(&rest, "Proto sensor", "proto-sensors", "PROTO_TOKEN")?;
    let (client, mut ev) = v5_client(&c.mqtt[&1], "PROTO_TOKEN");

    // Protobuf on the profile's telemetry topic and on `v2/t/p`.
    let reading = encode(
        TELEMETRY,
        r#"{"temperature":25.5,"humidity":60,"innerObject":{"key1":"a","key2":true},"counter":"7"}"#,
    );
    client
        .publish("v1/devices/me/telemetry", QoS::AtLeastOnce, false, reading)
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("temperature").is_some())
        .await?;
    assert_eq!(v["temperature"][0]["value"], "25.5", "{v}");
    assert_eq!(v["humidity"][0]["value"], "60.0", "{v}");
    assert_eq!(v["counter"][0]["value"], "7", "{v}");
    let inner: Value = serde_json::from_str(v["innerObject"][0]["value"].as_str().expect("json value"))?;
    assert_eq!(inner, json!({"key1": "a", "key2": true}));

    client
        .publish(
            "v2/t/p",
            QoS::AtLeastOnce,
            false,
            encode(TELEMETRY, r#"{"temperature":26}"#),
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    rest.wait_latest(&id, Duration::from_secs(5), |v| {
        v["temperature"][0]["value"] == "26.0"
    })
    .await?;

    // `v2/t/j` forces JSON; JSON on the profile's topic is refused (compatibility is off), and
    // so are bytes that are not the message. Nothing of them is stored.
    client
        .publish("v2/t/j", QoS::AtLeastOnce, false, r#"{"pressure":1013}"#)
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    client
        .publish(
            "v1/devices/me/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"wrong":1}"#,
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::PayloadFormatInvalid);
    client
        .publish("v2/t/p", QoS::AtLeastOnce, false, vec![0xff, 0xff, 0xff])
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::PayloadFormatInvalid);
    let v = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("pressure").is_some())
        .await?;
    assert_eq!(v["pressure"][0]["value"], "1013", "{v}");
    assert!(v.get("wrong").is_none(), "{v}");

    // Client attributes in the attributes schema, on `v2/a/p`.
    client
        .publish(
            "v2/a/p",
            QoS::AtLeastOnce,
            false,
            encode(ATTRIBUTES, r#"{"firmwareVersion":"1.0.3","serialNumber":"SN-1"}"#),
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    let attrs = rest
        .wait_client_attributes(&id, 2, Duration::from_secs(5))
        .await?;
    let value = |k: &str| {
        attrs
            .as_array()
            .and_then(|a| a.iter().find(|x| x["key"] == k))
            .map(|x| x["value"].clone())
    };
    assert_eq!(value("firmwareVersion"), Some(json!("1.0.3")), "{attrs}");
    assert_eq!(value("serialNumber"), Some(json!("SN-1")), "{attrs}");

    // A device of a JSON profile has no schema: `v2/t/p` is refused.
    let plain = rest.create_device("Plain sensor", "PLAIN_TOKEN")?;
    let (plain_client, mut plain_ev) = v5_client(&c.mqtt[&1], "PLAIN_TOKEN");
    plain_client
        .publish(
            "v2/t/p",
            QoS::AtLeastOnce,
            false,
            encode(TELEMETRY, r#"{"temperature":1}"#),
        )
        .await?;
    assert_eq!(
        next_puback(&mut plain_ev).await?,
        PubAckReason::PayloadFormatInvalid
    );
    assert_eq!(
        rest.latest(&plain)?,
        json!({}),
        "nothing stored for the refused message"
    );

    // CoAP: a profile for CoAP with the same schemas; `coap-client` posts the bytes.
    let (code, v) = rest.call(
        "POST",
        "/api/deviceProfile",
        Some(&profile("proto-coap", "COAP", TELEMETRY)),
    )?;
    assert_eq!(code, 200, "{v}");
    let coap_id = create_device(&rest, "Proto CoAP sensor", "proto-coap", "PROTO_COAP")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("reading.bin");
    std::fs::write(&file, encode(TELEMETRY, r#"{"temperature":19.25,"counter":"3"}"#))?;
    let url = format!("coap://{}/api/v1/PROTO_COAP/telemetry", c.coap[&1]);
    let file_arg = file.display().to_string();
    let out = coap_client(&["-m", "post", "-t", "octet", "-f", &file_arg, &url])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let v = rest
        .wait_latest(&coap_id, Duration::from_secs(5), |v| {
            v.get("temperature").is_some()
        })
        .await?;
    assert_eq!(v["temperature"][0]["value"], "19.25", "{v}");
    assert_eq!(v["counter"][0]["value"], "3", "{v}");
    std::fs::write(&file, [0xff, 0xff, 0xff])?;
    let out = coap_client(&["-m", "post", "-t", "octet", "-f", &file_arg, &url])?;
    assert_eq!(out.code, "4.00", "{out:?}");

    // Its attribute reads are answered in protobuf too: a GetAttributeResponseMsg.
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{coap_id}/SHARED_SCOPE"),
        Some(r#"{"mode":"eco"}"#),
    )?;
    assert_eq!(code, 200);
    let answer_file = dir.path().join("answer.bin");
    let answer_arg = answer_file.display().to_string();
    let out = coap_client(&[
        "-m",
        "get",
        "-o",
        &answer_arg,
        &format!(
            "coap://{}/api/v1/PROTO_COAP/attributes?sharedKeys=mode",
            c.coap[&1]
        ),
    ])?;
    assert_eq!(out.code, "2.05", "{out:?}");
    let answer = tb::GetAttributeResponseMsg::decode(std::fs::read(&answer_file)?.as_slice())?;
    let kv = answer.shared_attribute_list[0].kv.clone().expect("kv");
    assert_eq!(
        (kv.key.as_str(), kv.string_v.as_str()),
        ("mode", "eco"),
        "{answer:?}"
    );
    Ok(())
}

/// The payload of the next PUBLISH on a topic starting with `prefix`: (topic, bytes).
async fn next_publish(
    ev: &mut rumqttc::v5::EventLoop,
    prefix: &'static str,
) -> anyhow::Result<(String, Vec<u8>)> {
    thingraft_tests::next_packet(ev, |p| match p {
        Packet::Publish(p) => {
            let t = String::from_utf8_lossy(&p.topic).into_owned();
            t.starts_with(prefix).then(|| (t, p.payload.to_vec()))
        }
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_devices_get_attributes_and_rpc_in_protobuf() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let (code, v) = rest.call(
        "POST",
        "/api/deviceProfile",
        Some(&profile("proto-valves", "MQTT", TELEMETRY)),
    )?;
    assert_eq!(code, 200, "{v}");
    let id = create_device(&rest, "Proto valve", "proto-valves", "PVALVE")?;
    let (client, mut ev) = v5_client(&c.mqtt[&1], "PVALVE");
    thingraft_tests::next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    for f in ["v2/a/p", "v2/r/req/p/+", "v2/a/res/p/+", "v2/r/res/p/+"] {
        client.subscribe(f, QoS::AtLeastOnce).await?;
        let codes = thingraft_tests::next_packet(&mut ev, |p| match p {
            Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await?;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)], "{f}");
    }

    // A shared attribute saved through REST reaches the device as an
    // AttributeUpdateNotificationMsg, typed.
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"targetTemperature":22.5,"mode":"eco"}"#),
    )?;
    assert_eq!(code, 200);
    let (topic, bytes) = next_publish(&mut ev, "v2/a/p").await?;
    assert_eq!(topic, "v2/a/p");
    let update = tb::AttributeUpdateNotificationMsg::decode(bytes.as_slice())?;
    let mut got: Vec<(String, i32, f64, String)> = update
        .shared_updated
        .iter()
        .map(|t| {
            let kv = t.kv.clone().expect("kv");
            assert!(t.ts > 0, "{t:?}");
            (kv.key, kv.r#type, kv.double_v, kv.string_v)
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("mode".into(), tb::KeyValueType::StringV as i32, 0.0, "eco".into()),
            (
                "targetTemperature".into(),
                tb::KeyValueType::DoubleV as i32,
                22.5,
                String::new()
            ),
        ]
    );

    // An attribute request as GetAttributeRequestMsg; the answer is a GetAttributeResponseMsg
    // on the request's `p` response topic.
    let request = tb::GetAttributeRequestMsg {
        request_id: 4,
        shared_attribute_names: vec!["mode".into()],
        ..Default::default()
    };
    client
        .publish("v2/a/req/p/4", QoS::AtLeastOnce, false, request.encode_to_vec())
        .await?;
    let ((topic, bytes), ack) = answer_and_puback(&mut ev, "v2/a/res/").await?;
    assert_eq!(ack, PubAckReason::Success);
    assert_eq!(topic, "v2/a/res/p/4");
    let answer = tb::GetAttributeResponseMsg::decode(bytes.as_slice())?;
    assert_eq!(answer.request_id, 4);
    assert!(answer.client_attribute_list.is_empty(), "{answer:?}");
    let kv = answer.shared_attribute_list[0].kv.clone().expect("kv");
    assert_eq!((kv.key.as_str(), kv.string_v.as_str()), ("mode", "eco"));

    // Bytes that are not a GetAttributeRequestMsg: refused, no answer.
    client
        .publish("v2/a/req/p/5", QoS::AtLeastOnce, false, vec![0xff, 0xff, 0xff])
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::PayloadFormatInvalid);

    // A two-way RPC arrives in the profile's RPC request message; the device answers in its
    // RPC response message, and REST returns the JSON it means.
    let rest2 = rest.clone();
    let path = format!("/api/plugins/rpc/twoway/{id}");
    let call = tokio::task::spawn_blocking(move || {
        rest2.call(
            "POST",
            &path,
            Some(r#"{"method":"setValve","params":{"open":true}}"#),
        )
    });
    let (topic, bytes) = next_publish(&mut ev, "v2/r/req/").await?;
    let rpc_id = topic.strip_prefix("v2/r/req/p/").expect("p family").to_string();
    let req = DynamicMessage::decode(message(RPC_REQUEST, "rpc.RpcRequestMsg"), bytes.as_slice())?;
    let field = |n: &str| req.get_field_by_name(n).map(|v| v.into_owned());
    assert_eq!(
        field("method"),
        Some(prost_reflect::Value::String("setValve".into()))
    );
    assert_eq!(
        field("params"),
        Some(prost_reflect::Value::String(r#"{"open":true}"#.into()))
    );
    assert_eq!(
        field("requestId"),
        Some(prost_reflect::Value::I32(rpc_id.parse()?))
    );
    client
        .publish(
            format!("v2/r/res/p/{rpc_id}"),
            QoS::AtLeastOnce,
            false,
            encode(RPC_RESPONSE, r#"{"payload":"opened"}"#),
        )
        .await?;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let (code, body) = call.await??;
    assert_eq!((code, body), (200, json!({"payload": "opened"})));
    pump.abort();

    // A client-side RPC in ToServerRpcRequestMsg: `getSessionLimits` is answered by the
    // transport in a ToServerRpcResponseMsg.
    let (client, mut ev) = v5_client(&c.mqtt[&1], "PVALVE");
    thingraft_tests::next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    let ask = tb::ToServerRpcRequestMsg {
        request_id: 9,
        method_name: "getSessionLimits".into(),
        params: "{}".into(),
    };
    client
        .publish("v2/r/req/p/9", QoS::AtLeastOnce, false, ask.encode_to_vec())
        .await?;
    let (topic, bytes) = next_publish(&mut ev, "v2/r/res/").await?;
    assert_eq!(topic, "v2/r/res/p/9");
    let reply = tb::ToServerRpcResponseMsg::decode(bytes.as_slice())?;
    assert_eq!(reply.request_id, 9);
    assert_eq!(reply.error, "");
    let limits: Value = serde_json::from_str(&reply.payload)?;
    assert!(limits.get("rateLimits").is_some(), "{limits}");

    // A claim request as ClaimDeviceMsg opens the window; a customer user claims with its
    // secret.
    let ask = tb::ClaimDeviceMsg {
        secret_key: "pv-secret".into(),
        duration_ms: 60_000,
        ..Default::default()
    };
    client
        .publish(
            "v1/devices/me/claim",
            QoS::AtLeastOnce,
            false,
            ask.encode_to_vec(),
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    let customer = Rest::login(&c.http[&1], "customer@thingsboard.org", "customer").await?;
    let claim = |secret: &str| {
        customer.call(
            "POST",
            "/api/customer/device/Proto%20valve/claim",
            Some(&json!({"secretKey": secret}).to_string()),
        )
    };
    assert_eq!(claim("wrong")?.0, 400);
    let (code, body) = claim("pv-secret")?;
    assert_eq!(
        (code, body["response"].clone()),
        (200, json!("SUCCESS")),
        "{body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_provision_themselves_in_protobuf() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let body = json!({
        "name": "Proto provisioned",
        "type": "DEFAULT",
        "provisionType": "ALLOW_CREATE_NEW_DEVICES",
        "provisionDeviceKey": "pk-proto",
        "profileData": {"provisionConfiguration": {"type": "ALLOW_CREATE_NEW_DEVICES", "provisionDeviceSecret": "ps-proto"}},
    });
    let (code, v) = rest.call("POST", "/api/deviceProfile", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{v}");
    let request = |name: &str, secret: &str, token: &str| {
        let mut m = tb::ProvisionDeviceRequestMsg {
            device_name: name.into(),
            provision_device_credentials_msg: Some(tb::ProvisionDeviceCredentialsMsg {
                provision_device_key: "pk-proto".into(),
                provision_device_secret: secret.into(),
            }),
            credentials_data_proto: Some(tb::CredentialsDataProto {
                validate_device_token_request_msg: Some(tb::ValidateDeviceTokenRequestMsg {
                    token: token.into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        m.set_credentials_type(tb::CredentialsType::AccessToken);
        m.encode_to_vec()
    };

    // MQTT: a provisioning connection publishes a ProvisionDeviceRequestMsg and gets a
    // ProvisionDeviceResponseMsg; the new device then connects with its token.
    let (client, mut ev) = v5_client(&c.mqtt[&1], "provision");
    thingraft_tests::next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client.subscribe("/provision/response", QoS::AtLeastOnce).await?;
    thingraft_tests::next_packet(&mut ev, |p| matches!(p, Packet::SubAck(_)).then_some(())).await?;
    client
        .publish(
            "/provision/request",
            QoS::AtLeastOnce,
            false,
            request("Proto prov A", "ps-proto", "PROV_PROTO_A"),
        )
        .await?;
    let (_, bytes) = next_publish(&mut ev, "/provision/response").await?;
    let answer = tb::ProvisionDeviceResponseMsg::decode(bytes.as_slice())?;
    assert_eq!(answer.status(), tb::ResponseStatus::Success, "{answer:?}");
    assert_eq!(answer.credentials_type(), tb::CredentialsType::AccessToken);
    assert_eq!(answer.credentials_value, "PROV_PROTO_A");
    let (device, mut dev_ev) = v5_client(&c.mqtt[&1], "PROV_PROTO_A");
    device
        .publish(
            "v1/devices/me/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"provisioned":1}"#,
        )
        .await?;
    assert_eq!(next_puback(&mut dev_ev).await?, PubAckReason::Success);

    // A wrong secret: NOT_FOUND, in protobuf too.
    client
        .publish(
            "/provision/request",
            QoS::AtLeastOnce,
            false,
            request("Proto prov B", "nope", ""),
        )
        .await?;
    let (_, bytes) = next_publish(&mut ev, "/provision/response").await?;
    let answer = tb::ProvisionDeviceResponseMsg::decode(bytes.as_slice())?;
    assert_eq!(answer.status(), tb::ResponseStatus::NotFound, "{answer:?}");

    // CoAP: the same request posted to /api/v1/provision is answered with a 2.05 carrying a
    // ProvisionDeviceResponseMsg, and the device exists afterwards.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("provision.bin");
    std::fs::write(&file, request("Proto prov C", "ps-proto", ""))?;
    let file_arg = file.display().to_string();
    let url = format!("coap://{}/api/v1/provision", c.coap[&1]);
    let out = coap_client(&["-m", "post", "-t", "octet", "-f", &file_arg, &url])?;
    assert_eq!(out.code, "2.05", "{out:?}");
    let (code, v) = rest.call("GET", "/api/tenant/devices?deviceName=Proto%20prov%20C", None)?;
    assert_eq!(code, 200, "{v}");
    Ok(())
}

fn kv(key: &str, kind: tb::KeyValueType, f: impl FnOnce(&mut tb::KeyValueProto)) -> tb::KeyValueProto {
    let mut p = tb::KeyValueProto {
        key: key.into(),
        ..Default::default()
    };
    p.set_type(kind);
    f(&mut p);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protobuf_gateway_reports_for_its_children_in_thingsboards_gateway_messages() -> anyhow::Result<()>
{
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let (code, v) = rest.call(
        "POST",
        "/api/deviceProfile",
        Some(&profile("proto-gateways", "MQTT", TELEMETRY)),
    )?;
    assert_eq!(code, 200, "{v}");
    let body =
        json!({"name": "Proto gateway", "type": "proto-gateways", "additionalInfo": {"gateway": true}});
    let (code, v) = rest.call(
        "POST",
        "/api/device?accessToken=PGW_TOKEN",
        Some(&body.to_string()),
    )?;
    assert_eq!(code, 200, "{v}");
    let (client, mut ev) = v5_client(&c.mqtt[&1], "PGW_TOKEN");
    thingraft_tests::next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;

    // Telemetry for two children, typed by KeyValueProto: both are created and readable.
    let reading = |name: &str, t: f64| tb::GatewayDeviceTelemetryMsg {
        device_name: name.into(),
        msg: Some(tb::PostTelemetryMsg {
            ts_kv_list: vec![tb::TsKvListProto {
                ts: 0,
                kv: vec![
                    kv("temperature", tb::KeyValueType::DoubleV, |p| p.double_v = t),
                    kv("door", tb::KeyValueType::BooleanV, |p| p.bool_v = true),
                    kv("serial", tb::KeyValueType::StringV, |p| p.string_v = "007".into()),
                ],
            }],
        }),
    };
    let batch = tb::GatewayTelemetryMsg {
        msg: vec![reading("PG child 1", 21.5), reading("PG child 2", 19.0)],
    };
    client
        .publish(
            "v1/gateway/telemetry",
            QoS::AtLeastOnce,
            false,
            batch.encode_to_vec(),
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    let (code, child) = rest.call("GET", "/api/tenant/devices?deviceName=PG%20child%201", None)?;
    assert_eq!(code, 200, "{child}");
    let child_id = child["id"]["id"].as_str().expect("child id").to_string();
    let v = rest
        .wait_latest(&child_id, Duration::from_secs(5), |v| {
            v.get("temperature").is_some()
        })
        .await?;
    assert_eq!(v["temperature"][0]["value"], "21.5", "{v}");
    assert_eq!(v["door"][0]["value"], "true", "{v}");
    // A STRING_V stays a string: "007", not the number 7.
    assert_eq!(v["serial"][0]["value"], "007", "{v}");
    assert_eq!(
        rest.call("GET", "/api/tenant/devices?deviceName=PG%20child%202", None)?
            .0,
        200
    );

    // A shared attribute of a child is pushed as a GatewayAttributeUpdateNotificationMsg; an
    // attribute request is answered with a GatewayAttributeResponseMsg.
    let (code, _) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{child_id}/SHARED_SCOPE"),
        Some(r#"{"mode":"eco"}"#),
    )?;
    assert_eq!(code, 200);
    let (topic, bytes) = next_publish(&mut ev, "v1/gateway/attributes").await?;
    assert_eq!(topic, "v1/gateway/attributes");
    let push = tb::GatewayAttributeUpdateNotificationMsg::decode(bytes.as_slice())?;
    assert_eq!(push.device_name, "PG child 1");
    let update = push.notification_msg.expect("notification");
    assert_eq!(
        update.shared_updated[0].kv.as_ref().map(|k| k.string_v.as_str()),
        Some("eco")
    );
    let ask = tb::GatewayAttributesRequestMsg {
        id: 6,
        device_name: "PG child 1".into(),
        client: false,
        keys: vec!["mode".into()],
    };
    client
        .publish(
            "v1/gateway/attributes/request",
            QoS::AtLeastOnce,
            false,
            ask.encode_to_vec(),
        )
        .await?;
    let ((_, bytes), ack) = answer_and_puback(&mut ev, "v1/gateway/attributes/response").await?;
    assert_eq!(ack, PubAckReason::Success);
    let answer = tb::GatewayAttributeResponseMsg::decode(bytes.as_slice())?;
    assert_eq!(answer.device_name, "PG child 1");
    let inner = answer.response_msg.expect("response");
    assert_eq!(inner.request_id, 6);
    assert_eq!(
        inner.shared_attribute_list[0].kv.as_ref().map(|k| k.key.as_str()),
        Some("mode")
    );

    // Bytes that are not a gateway message: refused, nothing created.
    client
        .publish(
            "v1/gateway/telemetry",
            QoS::AtLeastOnce,
            false,
            vec![0xff, 0xff, 0xff],
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::PayloadFormatInvalid);
    Ok(())
}
