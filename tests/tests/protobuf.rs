//! Protobuf device payloads end to end: a device profile with proto schemas saved through REST,
//! devices of it publishing protobuf over MQTT (rumqttc: the profile's default topics, `v2/t/p`,
//! `v2/a/p`, and JSON on `v2/t/j`) and CoAP (`coap-client`), and what was stored read back
//! through REST. Bad input: a schema that does not compile, bytes that are not the message, a
//! `p` topic for a JSON device.

use std::time::Duration;

use prost_reflect::DynamicMessage;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest, coap_client, next_puback, v5_client};
use thingraft_transport_common::proto_payload;

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

/// `json` encoded as the last message of `schema`, as a device's generated code would.
fn encode(schema: &str, json: &str) -> Vec<u8> {
    let desc = proto_payload::compile(schema, "test schema").expect("schema compiles");
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

fn client_attributes(rest: &Rest, id: &str) -> anyhow::Result<Value> {
    let (code, v) = rest.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/attributes/CLIENT_SCOPE"),
        None,
    )?;
    anyhow::ensure!(code == 200, "attributes: {code} {v}");
    Ok(v)
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
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let attrs = loop {
        let a = client_attributes(&rest, &id)?;
        if a.as_array().is_some_and(|a| a.len() == 2) || std::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
    Ok(())
}
