//! A device profile's own MQTT topics (ThingsBoard's `deviceTelemetryTopic`,
//! `deviceAttributesTopic`, `deviceAttributesSubscribeTopic`, with MQTT wildcards), with rumqttc
//! as the device: telemetry and attributes on the profile's topics are stored, the default v1
//! topics then get "topic name invalid" and store nothing, a subscription to the profile's
//! attributes filter gets shared-attribute pushes, and `sendAckOnValidationException` has a bad
//! payload acknowledged on MQTT 3.1.1 instead of the connection closed, storing nothing.
//! Invalid filters are refused at profile save; blank ones are the defaults.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest, mosquitto_pub, next_packet, publish_on, publish_qos1, v5_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

fn profile(name: &str, telemetry: &str, attributes: &str, subscribe: &str, ack_invalid: bool) -> String {
    json!({
        "name": name,
        "type": "DEFAULT",
        "transportType": "MQTT",
        "profileData": {
            "configuration": {"type": "DEFAULT"},
            "transportConfiguration": {
                "type": "MQTT",
                "deviceTelemetryTopic": telemetry,
                "deviceAttributesTopic": attributes,
                "deviceAttributesSubscribeTopic": subscribe,
                "sendAckOnValidationException": ack_invalid,
                "transportPayloadTypeConfiguration": {"transportPayloadType": "JSON"},
            },
        },
    })
    .to_string()
}

fn create_device(rest: &Rest, name: &str, profile: &str, token: &str) -> anyhow::Result<String> {
    let body = json!({"name": name, "type": profile}).to_string();
    let (code, v) = rest.call("POST", &format!("/api/device?accessToken={token}"), Some(&body))?;
    anyhow::ensure!(code == 200, "device create: {code} {v}");
    Ok(v["id"]["id"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_with_its_own_topics_takes_data_on_them() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;

    // Filters that are not MQTT topic filters: 400, no profile.
    for bad in ["sensors/#/telemetry", "sensors/a+/telemetry"] {
        let body = profile(
            "Bad topics",
            bad,
            "v1/devices/me/attributes",
            "v1/devices/me/attributes",
            false,
        );
        let (code, v) = rest.call("POST", "/api/deviceProfile", Some(&body))?;
        assert_eq!(code, 400, "{bad:?}: {v}");
    }

    let body = profile(
        "Custom topics",
        "sensors/+/telemetry",
        "sensors/+/attributes",
        "sensors/+/attributes/updates",
        false,
    );
    let (code, v) = rest.call("POST", "/api/deviceProfile", Some(&body))?;
    assert_eq!(code, 200, "{v}");
    let id = create_device(&rest, "Custom 1", "Custom topics", "CUSTOM1")?;
    let (client, mut ev) = v5_client(&c.mqtt[&1], "CUSTOM1");

    assert_eq!(
        publish_qos1(&client, &mut ev, "sensors/7/telemetry", r#"{"temperature":21.5}"#).await?,
        PubAckReason::Success
    );
    assert_eq!(
        publish_qos1(&client, &mut ev, "sensors/7/attributes", r#"{"firmware":"1.2"}"#).await?,
        PubAckReason::Success
    );
    // The default topics no longer carry this device's telemetry or attributes.
    assert_eq!(
        publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", r#"{"humidity":40}"#).await?,
        PubAckReason::TopicNameInvalid
    );

    let latest = rest
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("temperature").is_some())
        .await?;
    assert_eq!(latest["temperature"][0]["value"], "21.5", "{latest}");
    assert!(
        latest.get("humidity").is_none(),
        "default topic stored nothing: {latest}"
    );
    let client_attrs = rest
        .wait_client_attributes(&id, 1, Duration::from_secs(5))
        .await?;
    assert!(client_attrs.to_string().contains("firmware"), "{client_attrs}");

    // Subscribed through the profile's attributes filter: a shared attribute saved through REST
    // is pushed (on ThingsBoard's attributes topic).
    client
        .subscribe("sensors/7/attributes/updates", QoS::AtLeastOnce)
        .await?;
    let granted = next_packet(&mut ev, |p| match p {
        Packet::SubAck(a) => Some(a.return_codes.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(format!("{granted:?}"), "[Success(AtLeastOnce)]");
    let (code, v) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"setpoint":7}"#),
    )?;
    assert_eq!(code, 200, "{v}");
    let (topic, push) = next_packet(&mut ev, |p| publish_on(p, "v1/devices/me/attributes")).await?;
    assert_eq!(topic, "v1/devices/me/attributes");
    assert_eq!(push, json!({"setpoint": 7}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_ack_on_validation_exception_acknowledges_bad_payloads_on_mqtt_3() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    for (name, ack_invalid) in [("Acking", true), ("Strict", false)] {
        // Blank topics are the default ones, as in ThingsBoard.
        let body = profile(name, "", " ", "", ack_invalid);
        let (code, v) = rest.call("POST", "/api/deviceProfile", Some(&body))?;
        assert_eq!(code, 200, "{v}");
    }
    let acking = create_device(&rest, "Acking 1", "Acking", "ACKING1")?;
    let strict = create_device(&rest, "Strict 1", "Strict", "STRICT1")?;
    let mqtt = &c.mqtt[&1];
    let publish = |token: &str, message: &str| {
        mosquitto_pub(
            mqtt,
            &[
                "-V",
                "mqttv311",
                "-q",
                "1",
                "-u",
                token,
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                message,
            ],
        )
    };
    // MQTT 3.1.1 has no reason code: with the setting the bad message is acknowledged (the
    // client ends normally), without it the connection is closed before any PUBACK.
    assert_eq!(publish("ACKING1", "not json")?, 0, "acknowledged");
    assert_ne!(publish("STRICT1", "not json")?, 0, "closed unacknowledged");
    // MQTT 5 refuses it with 0x99 either way.
    for token in ["ACKING1", "STRICT1"] {
        let (client, mut ev) = v5_client(mqtt, token);
        assert_eq!(
            publish_qos1(&client, &mut ev, "v1/devices/me/telemetry", "not json").await?,
            PubAckReason::PayloadFormatInvalid,
            "{token}"
        );
    }
    for (token, id) in [("ACKING1", &acking), ("STRICT1", &strict)] {
        assert_eq!(publish(token, r#"{"ok":1}"#)?, 0, "{token}");
        let latest: Value = rest
            .wait_latest(id, Duration::from_secs(5), |v| v.get("ok").is_some())
            .await?;
        let keys: Vec<&String> = latest.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        assert_eq!(keys, ["ok"], "only the valid message was stored: {latest}");
    }
    Ok(())
}
