//! CoAP power-saving mode with libcoap's `coap-client`: a device whose profile says PSM gets an
//! Observe notification only within `psmActivityTimer` of its last uplink; a notification for
//! it while it sleeps waits for its next uplink, where a device without PSM gets it at once. A
//! device's own `deviceData.transportConfiguration` takes the place of its profile's setting.

use std::time::Duration;

use serde_json::json;
use thingraft_tests::{CoapOut, ProcCluster, Rest, coap_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

/// `coap-client` observing `path` for `seconds`, on a thread of its own.
fn observe(coap: &str, path: &str, seconds: u32) -> tokio::task::JoinHandle<anyhow::Result<CoapOut>> {
    let url = format!("coap://{coap}/{path}");
    tokio::task::spawn_blocking(move || coap_client(&["-s", &seconds.to_string(), "-m", "get", &url]))
}

fn save_shared(rest: &Rest, id: &str, body: &str) -> anyhow::Result<()> {
    let (code, v) = rest.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(body),
    )?;
    anyhow::ensure!(code == 200, "shared attribute save: {code} {v}");
    Ok(())
}

/// What the device with `token` sees while it observes its attributes for 4 s, during which
/// (2 s in, 1 s past its last uplink) the shared attributes `body` are saved.
async fn change_while_observed(
    coap: &str,
    rest: &Rest,
    token: &str,
    id: &str,
    body: &str,
) -> anyhow::Result<CoapOut> {
    let seen = observe(coap, &format!("api/v1/{token}/attributes"), 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    save_shared(rest, id, body)?;
    seen.await?
}

/// Saves a CoAP device profile whose `clientSettings` say PSM with `activity_ms`.
/// Creates device `name` of profile `profile` with access token `token`; its id.
fn create_in_profile(rest: &Rest, name: &str, profile: &str, token: &str) -> anyhow::Result<String> {
    let body = json!({"name": name, "type": profile}).to_string();
    let (code, v) = rest.call("POST", &format!("/api/device?accessToken={token}"), Some(&body))?;
    anyhow::ensure!(code == 200, "{v}");
    Ok(v["id"]["id"].as_str().expect("id").to_string())
}

fn save_psm_profile(rest: &Rest, name: &str, activity_ms: u64) -> anyhow::Result<()> {
    let profile = json!({
        "name": name,
        "type": "DEFAULT",
        "transportType": "COAP",
        "profileData": {
            "configuration": {"type": "DEFAULT"},
            "transportConfiguration": {
                "type": "COAP",
                "coapDeviceTypeConfiguration": {"coapDeviceType": "DEFAULT",
                    "transportPayloadTypeConfiguration": {"transportPayloadType": "JSON"}},
                "clientSettings": {"powerMode": "PSM", "psmActivityTimer": activity_ms},
            },
        },
    });
    let (code, v) = rest.call("POST", "/api/deviceProfile", Some(&profile.to_string()))?;
    anyhow::ensure!(code == 200, "profile save: {code} {v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psm_device_gets_notifications_only_while_it_is_reachable() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    save_psm_profile(&rest, "Sleepy meters", 1000)?;
    let sleeper = create_in_profile(&rest, "Sleeper", "Sleepy meters", "SLEEPER")?;
    let awake = rest.create_device("Awake", "AWAKE")?;
    let coap = c.coap[&1].clone();

    // Both observe; 2 s later (the PSM device asleep since 1 s) a shared attribute changes.
    let psm = observe(&coap, "api/v1/SLEEPER/attributes", 4);
    let drx = observe(&coap, "api/v1/AWAKE/attributes", 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    save_shared(&rest, &sleeper, r#"{"setpoint":1}"#)?;
    save_shared(&rest, &awake, r#"{"setpoint":1}"#)?;
    let (psm, drx) = (psm.await??, drx.await??);
    assert!(
        drx.body.contains(r#""setpoint":1"#),
        "the device without PSM got it: {drx:?}"
    );
    assert!(
        !psm.body.contains("setpoint"),
        "the sleeping device did not: {psm:?}"
    );

    // A new observation (an uplink: the first notification has every shared attribute), then
    // a change while it sleeps, then an uplink of its own: the change arrives after it.
    let psm = observe(&coap, "api/v1/SLEEPER/attributes", 6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    save_shared(&rest, &sleeper, r#"{"setpoint":2}"#)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"battery":88}"#,
        &format!("coap://{coap}/api/v1/SLEEPER/telemetry"),
    ])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let psm = psm.await??;
    assert!(
        psm.body.contains(r#""setpoint":1"#),
        "first notification: {psm:?}"
    );
    assert!(
        psm.body.contains(r#""setpoint":2"#),
        "released by the uplink: {psm:?}"
    );
    Ok(())
}

/// ThingsBoard's device-level setting: a device of a profile without PSM whose own
/// `deviceData.transportConfiguration` says PSM sleeps like one; a bad setting is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_level_power_mode_overrides_its_profile() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;

    // Refused: an unknown mode, a type that is not built. Neither device exists afterwards.
    for (name, transport) in [
        ("BadMode", json!({"type": "COAP", "powerMode": "SLEEP"})),
        ("BadType", json!({"type": "SNMP"})),
    ] {
        let body = json!({"name": name, "deviceData": {"transportConfiguration": transport}});
        let (code, v) = rest.call("POST", "/api/device", Some(&body.to_string()))?;
        assert_eq!(code, 400, "{name}: {v}");
        let (code, _) = rest.call("GET", &format!("/api/tenant/device?deviceName={name}"), None)?;
        assert_eq!(code, 404, "{name} was not created");
    }

    let transport = json!({"type": "COAP", "powerMode": "PSM", "psmActivityTimer": 1000});
    let body = json!({"name": "Own PSM", "deviceData": {"transportConfiguration": transport}});
    let (code, v) = rest.call("POST", "/api/device?accessToken=OWNPSM", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{v}");
    let id = v["id"]["id"].as_str().expect("id").to_string();
    let (code, v) = rest.call("GET", &format!("/api/device/{id}"), None)?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["deviceData"]["transportConfiguration"]["powerMode"], "PSM",
        "{v}"
    );
    assert_eq!(
        v["deviceData"]["transportConfiguration"]["psmActivityTimer"], 1000,
        "{v}"
    );

    // Asleep 1 s after its last uplink: a change made at 2 s does not reach it.
    let coap = c.coap[&1].clone();
    let psm = change_while_observed(&coap, &rest, "OWNPSM", &id, r#"{"setpoint":1}"#).await?;
    assert!(
        !psm.body.contains("setpoint"),
        "the sleeping device did not get it: {psm:?}"
    );

    // Updated back to DEFAULT, it follows its profile (no PSM): the next change arrives.
    let body = json!({"id": {"entityType": "DEVICE", "id": id}, "name": "Own PSM"});
    let (code, v) = rest.call("POST", "/api/device", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["deviceData"]["transportConfiguration"]["type"], "DEFAULT",
        "{v}"
    );
    let awake = change_while_observed(&coap, &rest, "OWNPSM", &id, r#"{"setpoint":2}"#).await?;
    assert!(awake.body.contains(r#""setpoint":2"#), "{awake:?}");

    // A timer alone: the profile says PSM with a 10-minute activity timer, the device's own
    // configuration only a 1 s one. The device's timer counts, so it sleeps after 1 s.
    save_psm_profile(&rest, "Slow sleepers", 600_000)?;
    let body = json!({"name": "Own timer", "type": "Slow sleepers",
        "deviceData": {"transportConfiguration": {"type": "COAP", "psmActivityTimer": 1000}}});
    let (code, v) = rest.call(
        "POST",
        "/api/device?accessToken=OWNTIMER",
        Some(&body.to_string()),
    )?;
    assert_eq!(code, 200, "{v}");
    let timer = v["id"]["id"].as_str().expect("id").to_string();
    let psm = change_while_observed(&coap, &rest, "OWNTIMER", &timer, r#"{"setpoint":3}"#).await?;
    assert!(
        !psm.body.contains("setpoint"),
        "asleep after its own 1 s timer: {psm:?}"
    );
    Ok(())
}

/// A server-side RPC for a PSM device that sleeps: it waits for the device (neither sent again
/// into the waiting observation nor FAILED for want of an acknowledgement), reaches it once
/// after its uplink, and is DELIVERED when the device acknowledges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_for_a_sleeping_psm_device_waits_for_it_and_arrives_once() -> anyhow::Result<()> {
    let c = ProcCluster::start_with_config(
        1,
        4,
        Some("[engine]\nrpc_ack_timeout_ms = 500\nrpc_max_retries = 1\n"),
    )
    .await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    save_psm_profile(&rest, "Sleepy valves", 1000)?;
    let id = create_in_profile(&rest, "Valve", "Sleepy valves", "PSMRPC")?;
    let coap = c.coap[&1].clone();

    let seen = observe(&coap, "api/v1/PSMRPC/rpc", 7);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rpc_id = rest.persistent_rpc(&id, true, "flush")?;
    // Asleep for many acknowledgement timeouts (500 ms, 2 sends at most): still waiting.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, status) = rest.call("GET", &format!("/api/rpc/persistent/{rpc_id}"), None)?;
    let status = status["status"].as_str().unwrap_or_default().to_string();
    assert!(
        status == "SENT" || status == "QUEUED",
        "waiting for the device: {status}"
    );
    // An uplink wakes it: the RPC goes out, once, and is DELIVERED on the device's ACK.
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"battery":80}"#,
        &format!("coap://{coap}/api/v1/PSMRPC/telemetry"),
    ])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    assert_eq!(rest.rpc_status_becomes(&rpc_id, "DELIVERED").await?, "DELIVERED");
    let seen = seen.await??;
    assert_eq!(seen.body.matches(r#""method":"flush""#).count(), 1, "{seen:?}");
    Ok(())
}
