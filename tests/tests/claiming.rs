//! Device claiming end to end: devices open claim windows over MQTT, HTTP, CoAP and through a
//! gateway; a customer user claims them through REST (and gives one back).

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use serde_json::json;
use thingraft_tests::{ProcCluster, Rest, coap_client, mosquitto_pub, next_packet, next_puback, v5_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");
const CUSTOMER: (&str, &str) = ("customer@thingsboard.org", "customer");

fn claim(customer: &Rest, device: &str, secret: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    customer.call(
        "POST",
        &format!("/api/customer/device/{}/claim", device.replace(' ', "%20")),
        Some(&json!({"secretKey": secret}).to_string()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_claim_devices_that_opened_a_claim_window() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let tenant = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let customer = Rest::login(&c.http[&1], CUSTOMER.0, CUSTOMER.1).await?;
    let (_, me) = customer.call("GET", "/api/auth/user", None)?;
    let customer_id = me["customerId"]["id"].clone();

    // MQTT: the device opens a window with a secret.
    let id = tenant.create_device("Kettle", "KETTLE_TOKEN")?;
    let rc = mosquitto_pub(
        &c.mqtt[&1],
        &[
            "-q",
            "1",
            "-u",
            "KETTLE_TOKEN",
            "-t",
            "v1/devices/me/claim",
            "-m",
            r#"{"secretKey":"abc","durationMs":60000}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    assert_eq!(
        customer.call("GET", &format!("/api/device/{id}"), None)?.0,
        403,
        "not the customer's yet"
    );
    let (code, body) = claim(&customer, "Kettle", "wrong")?;
    assert_eq!((code, body["response"].clone()), (400, json!("FAILURE")));
    // Only customer users claim.
    assert_eq!(claim(&tenant, "Kettle", "abc")?.0, 403);
    let (code, body) = claim(&customer, "Kettle", "abc")?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["response"], "SUCCESS");
    assert_eq!(body["device"]["customerId"]["id"], customer_id);
    let (code, seen) = customer.call("GET", &format!("/api/device/{id}"), None)?;
    assert_eq!((code, seen["name"].clone()), (200, json!("Kettle")));
    // Listed as the customer's, to its user and to the tenant's administrator.
    let listing = format!(
        "/api/customer/{}/devices?pageSize=10&page=0",
        customer_id.as_str().expect("customer id")
    );
    for who in [&customer, &tenant] {
        let (code, list) = who.call("GET", &listing, None)?;
        assert_eq!(code, 200, "{list}");
        assert_eq!(list["data"][0]["name"], "Kettle", "{list}");
        assert_eq!(list["totalElements"], 1, "{list}");
    }
    // Persistent RPCs of the customer's device may be read by its user, deleted only by the
    // tenant's administrator (ThingsBoard: TENANT_ADMIN).
    let rpc = format!(
        "/api/rpc/persistent/{}",
        tenant.persistent_rpc(&id, true, "boil")?
    );
    assert_eq!(customer.call("GET", &rpc, None)?.0, 200);
    assert_eq!(customer.call("DELETE", &rpc, None)?.0, 403);
    assert_eq!(tenant.call("DELETE", &rpc, None)?.0, 200);
    let (code, body) = claim(&customer, "Kettle", "abc")?;
    assert_eq!((code, body["response"].clone()), (400, json!("CLAIMED")));
    // Given back: the customer no longer sees it.
    let (code, _) = customer.call("DELETE", "/api/customer/device/Kettle/claim", None)?;
    assert_eq!(code, 200);
    assert_eq!(customer.call("GET", &format!("/api/device/{id}"), None)?.0, 403);

    // HTTP: a window that has closed cannot be used.
    tenant.create_device("Toaster", "TOASTER_TOKEN")?;
    let dev = Rest::new(&c.http[&1]);
    let (code, _) = dev.call(
        "POST",
        "/api/v1/TOASTER_TOKEN/claim",
        Some(r#"{"secretKey":"t","durationMs":500}"#),
    )?;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(claim(&customer, "Toaster", "t")?.1["response"], "FAILURE");

    // CoAP: no body means an empty secret and the default window.
    tenant.create_device("Blender", "BLENDER_TOKEN")?;
    let out = coap_client(&[
        "-m",
        "post",
        &format!("coap://{}/api/v1/BLENDER_TOKEN/claim", c.coap[&1]),
    ])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    assert_eq!(claim(&customer, "Blender", "")?.1["response"], "SUCCESS");

    // A gateway opens windows for its children.
    let body = json!({"name": "Gateway C", "additionalInfo": {"gateway": true}}).to_string();
    assert_eq!(
        tenant
            .call("POST", "/api/device?accessToken=GWC_TOKEN", Some(&body))?
            .0,
        200
    );
    let (client, mut ev) = v5_client(&c.mqtt[&1], "GWC_TOKEN");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .publish(
            "v1/gateway/claim",
            QoS::AtLeastOnce,
            false,
            r#"{"Fridge":{"secretKey":"g","durationMs":60000}}"#,
        )
        .await?;
    let r = next_puback(&mut ev).await?;
    assert_eq!(r, PubAckReason::Success);
    assert_eq!(claim(&customer, "Fridge", "g")?.1["response"], "SUCCESS");

    // Bad claim bodies: 0x99 over MQTT 5, 400 over HTTP, 4.00 over CoAP; no window opens.
    tenant.create_device("Oven", "OVEN_TOKEN")?;
    let (client, mut ev) = v5_client(&c.mqtt[&1], "OVEN_TOKEN");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .publish("v1/devices/me/claim", QoS::AtLeastOnce, false, "[1]")
        .await?;
    let r = next_puback(&mut ev).await?;
    assert_eq!(r, PubAckReason::PayloadFormatInvalid);
    assert_eq!(dev.call("POST", "/api/v1/OVEN_TOKEN/claim", Some("[1]"))?.0, 400);
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        "{bad",
        &format!("coap://{}/api/v1/OVEN_TOKEN/claim", c.coap[&1]),
    ])?;
    assert_eq!(out.code, "4.00", "{out:?}");
    assert_eq!(claim(&customer, "Oven", "")?.1["response"], "FAILURE");
    Ok(())
}

/// With `[security] claim_allowed_by_default = false` (ThingsBoard's
/// `security.claim.allowClaimingByDefault`), only a device whose server attribute
/// `claimingAllowed` is true may open a claim window; a claimed device may not open another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_needs_claiming_allowed_when_not_allowed_by_default() -> anyhow::Result<()> {
    let c =
        ProcCluster::start_with_config(1, 4, Some("[security]\nclaim_allowed_by_default = false\n")).await?;
    let tenant = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let customer = Rest::login(&c.http[&1], CUSTOMER.0, CUSTOMER.1).await?;
    let dev = Rest::new(&c.http[&1]);
    let id = tenant.create_device("Locked Kettle", "LOCKED_TOKEN")?;
    let open = r#"{"secretKey":"k","durationMs":60000}"#;

    // No attribute: refused on every transport, and no window opens.
    let (code, body) = dev.call("POST", "/api/v1/LOCKED_TOKEN/claim", Some(open))?;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["status"], 400, "ThingsBoard's error envelope: {body}");
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        open,
        &format!("coap://{}/api/v1/LOCKED_TOKEN/claim", c.coap[&1]),
    ])?;
    assert_eq!(out.code, "4.00", "{out:?}");
    let (client, mut ev) = v5_client(&c.mqtt[&1], "LOCKED_TOKEN");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .publish("v1/devices/me/claim", QoS::AtLeastOnce, false, open)
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::NotAuthorized);
    // The session stays up: the device can still report.
    client
        .publish("v1/devices/me/telemetry", QoS::AtLeastOnce, false, r#"{"t":1}"#)
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    assert_eq!(claim(&customer, "Locked Kettle", "k")?.1["response"], "FAILURE");

    // `claimingAllowed` false is not enough; true is.
    for (allowed, expect) in [(false, 400), (true, 200)] {
        let (code, body) = tenant.call(
            "POST",
            &format!("/api/plugins/telemetry/DEVICE/{id}/attributes/SERVER_SCOPE"),
            Some(&json!({"claimingAllowed": allowed}).to_string()),
        )?;
        assert_eq!(code, 200, "{body}");
        // Applied by the engine shortly after the REST answer: wait until it reads back.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, attrs) = tenant.call(
                "GET",
                &format!(
                    "/api/plugins/telemetry/DEVICE/{id}/values/attributes/SERVER_SCOPE?keys=claimingAllowed"
                ),
                None,
            )?;
            if attrs[0]["value"] == json!(allowed) {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "attribute not applied: {attrs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (code, body) = dev.call("POST", "/api/v1/LOCKED_TOKEN/claim", Some(open))?;
        assert_eq!(code, expect, "claimingAllowed={allowed}: {body}");
    }
    let (code, body) = claim(&customer, "Locked Kettle", "k")?;
    assert_eq!((code, body["response"].clone()), (200, json!("SUCCESS")));

    // Claimed: the device may not open another window.
    let (code, body) = dev.call("POST", "/api/v1/LOCKED_TOKEN/claim", Some(open))?;
    assert_eq!(code, 400, "{body}");
    Ok(())
}
