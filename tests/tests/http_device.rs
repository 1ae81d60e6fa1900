//! ThingsBoard's HTTP device API (`/api/v1/{token}/...`) end to end: `curl` plays the device
//! against a `thingraft serve` process, and the REST API (also through `curl`) checks what was
//! stored and plays the user.

use std::time::Duration;

use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

async fn node(config: Option<&str>) -> anyhow::Result<(ProcCluster, Rest, Rest)> {
    let c = ProcCluster::start_with_config(1, 4, config).await?;
    let user = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let device = Rest::new(&c.http[&1]);
    Ok((c, user, device))
}

/// Runs a blocking `curl` call on a thread of its own, so a long poll can wait while the test
/// goes on.
fn in_background(
    rest: &Rest,
    method: &'static str,
    path: String,
    body: Option<String>,
) -> tokio::task::JoinHandle<anyhow::Result<(u16, Value)>> {
    let rest = rest.clone();
    tokio::task::spawn_blocking(move || rest.call(method, &path, body.as_deref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_attributes_over_http_are_stored_and_read_back() -> anyhow::Result<()> {
    let (_c, user, dev) = node(None).await?;
    let id = user.create_device("Meter H", "HTTP_TOKEN")?;

    // The SDK's connectivity probe, then the three telemetry forms.
    assert_eq!(
        dev.call("POST", "/api/v1/HTTP_TOKEN/telemetry", Some("{}"))?.0,
        200
    );
    assert_eq!(
        dev.call(
            "POST",
            "/api/v1/HTTP_TOKEN/telemetry",
            Some(r#"{"temperature":25}"#)
        )?
        .0,
        200
    );
    let arr = r#"[{"ts":1700000000000,"values":{"pressure":1000}},{"ts":1700000001000,"values":{"pressure":1001.5}}]"#;
    assert_eq!(
        dev.call("POST", "/api/v1/HTTP_TOKEN/telemetry", Some(arr))?.0,
        200
    );
    // Acknowledged means committed: the values are readable (after the shard applies them).
    let v = user
        .wait_latest(&id, Duration::from_secs(5), |v| {
            v.get("temperature").is_some() && v.get("pressure").is_some()
        })
        .await?;
    assert_eq!(v["temperature"][0]["value"], "25");
    assert_eq!(v["pressure"][0]["value"], "1001.5");
    let (_, hist) = user.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys=pressure&startTs=1699999999000&endTs=1700000002000"),
        None,
    )?;
    assert_eq!(hist["pressure"].as_array().map(Vec::len), Some(2), "{hist}");

    // Client attributes, and a shared one set by the user; the device reads them back.
    assert_eq!(
        dev.call(
            "POST",
            "/api/v1/HTTP_TOKEN/attributes",
            Some(r#"{"fw":"v1.0","slot":3}"#)
        )?
        .0,
        200
    );
    let (code, _) = user.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"interval":30}"#),
    )?;
    assert_eq!(code, 200);
    let (code, all) = dev.call("GET", "/api/v1/HTTP_TOKEN/attributes", None)?;
    assert_eq!(code, 200);
    assert_eq!(
        all,
        json!({"client": {"fw": "v1.0", "slot": 3}, "shared": {"interval": 30}})
    );
    let (code, some) = dev.call(
        "GET",
        "/api/v1/HTTP_TOKEN/attributes?clientKeys=slot&sharedKeys=none",
        None,
    )?;
    assert_eq!(code, 200);
    assert_eq!(some, json!({"client": {"slot": 3}}));

    // An HTTP request reports activity (and makes the device active) but no connect.
    let (_, attrs) = user.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/attributes/SERVER_SCOPE?keys=active,lastActivityTime,lastConnectTime"),
        None,
    )?;
    let keys: Vec<&str> = attrs
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["key"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        keys.contains(&"active") && keys.contains(&"lastActivityTime"),
        "{attrs}"
    );
    assert!(!keys.contains(&"lastConnectTime"), "{attrs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_deliver_attribute_updates_and_rpc_and_time_out_with_408() -> anyhow::Result<()> {
    let (_c, user, dev) = node(Some("[transport]\nclient_rpc_timeout_ms = 1000\n")).await?;
    let id = user.create_device("Lamp H", "LAMP_TOKEN")?;

    // Nothing changes: 408 after the asked timeout.
    let (code, _) = dev.call("GET", "/api/v1/LAMP_TOKEN/attributes/updates?timeout=300", None)?;
    assert_eq!(code, 408);

    // A shared attribute saved while the device polls ends the poll with the change.
    let poll = in_background(
        &dev,
        "GET",
        "/api/v1/LAMP_TOKEN/attributes/updates?timeout=20000".into(),
        None,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, _) = user.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"brightness":70}"#),
    )?;
    assert_eq!(code, 200);
    let (code, update) = poll.await??;
    assert_eq!((code, update), (200, json!({"brightness": 70})));

    // A two-way RPC: the device's poll gets it with its id, the device's reply answers the
    // user's call.
    let poll = in_background(&dev, "GET", "/api/v1/LAMP_TOKEN/rpc?timeout=20000".into(), None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let call = in_background(
        &user,
        "POST",
        format!("/api/plugins/rpc/twoway/{id}"),
        Some(r#"{"method":"setLevel","params":{"level":3},"timeout":15000}"#.into()),
    );
    let (code, request) = poll.await??;
    assert_eq!(code, 200);
    assert_eq!(request["method"], "setLevel");
    assert_eq!(request["params"], json!({"level": 3}));
    let rpc_id = request["id"].as_u64().expect("rpc id");
    let (code, _) = dev.call(
        "POST",
        &format!("/api/v1/LAMP_TOKEN/rpc/{rpc_id}"),
        Some(r#"{"level":3,"ok":true}"#),
    )?;
    assert_eq!(code, 200);
    let (code, answer) = call.await??;
    assert_eq!((code, answer), (200, json!({"level": 3, "ok": true})));

    // A persistent RPC is DELIVERED once a poll has answered with it (as in ThingsBoard).
    let poll = in_background(&dev, "GET", "/api/v1/LAMP_TOKEN/rpc?timeout=20000".into(), None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let persistent = user.persistent_rpc(&id, false, "dim")?;
    let (code, request) = poll.await??;
    assert_eq!((code, &request["method"]), (200, &json!("dim")));
    assert_eq!(
        user.rpc_status_becomes(&persistent, "DELIVERED").await?,
        "DELIVERED"
    );

    // No RPC pending: the poll times out with 408.
    assert_eq!(
        dev.call("GET", "/api/v1/LAMP_TOKEN/rpc?timeout=300", None)?.0,
        408
    );

    // A client-side RPC that no rule chain answers gets the transport's timeout answer...
    let (code, answer) = dev.call(
        "POST",
        "/api/v1/LAMP_TOKEN/rpc",
        Some(r#"{"method":"getWeather","params":{}}"#),
    )?;
    assert_eq!((code, answer), (200, json!({"error": "timeout"})));
    // ...and `getTime` gets the default root chain's answer: the server time, as JavaScript's
    // `String(new Date())` prints it.
    let (code, answer) = dev.call(
        "POST",
        "/api/v1/LAMP_TOKEN/rpc",
        Some(r#"{"method":"getTime","params":{}}"#),
    )?;
    assert_eq!(code, 200);
    thingraft_tests::assert_server_time(&answer);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_device_input_gets_thingsboards_statuses_and_stores_nothing() -> anyhow::Result<()> {
    let (_c, user, dev) = node(Some("[http.device]\nmax_payload_bytes = 2048\n")).await?;
    let id = user.create_device("Strict H", "STRICT_TOKEN")?;

    // An unknown token: 401 with the envelope's authentication code.
    let (code, body) = dev.call("POST", "/api/v1/NO_SUCH_TOKEN/telemetry", Some(r#"{"t":1}"#))?;
    assert_eq!((code, body["errorCode"].clone()), (401, Value::from(10)));
    // Not JSON, a scalar, an array item that is not an object, attributes as an array: 400.
    for (path, body) in [
        ("telemetry", "{not json"),
        ("telemetry", r#""text""#),
        ("telemetry", r#"[{"ts":1,"values":{"a":1}}, 5]"#),
        ("attributes", r#"[{"a":1}]"#),
    ] {
        let (code, reply) = dev.call("POST", &format!("/api/v1/STRICT_TOKEN/{path}"), Some(body))?;
        assert_eq!(code, 400, "{path} {body}: {reply}");
        assert_eq!(reply["errorCode"], 31, "{reply}");
    }
    // Over the configured body limit: 413.
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(4096));
    let (code, reply) = dev.call("POST", "/api/v1/STRICT_TOKEN/telemetry", Some(&big))?;
    assert_eq!(code, 413, "{reply}");
    // An RPC reply to an id that is not a number, and a client RPC without a method: 400.
    assert_eq!(
        dev.call("POST", "/api/v1/STRICT_TOKEN/rpc/abc", Some("{}"))?.0,
        400
    );
    assert_eq!(
        dev.call("POST", "/api/v1/STRICT_TOKEN/rpc", Some(r#"{"params":{}}"#))?
            .0,
        400
    );

    // The node is still up, and a good message is the only telemetry stored.
    assert_eq!(
        dev.call("POST", "/api/v1/STRICT_TOKEN/telemetry", Some(r#"{"marker":1}"#))?
            .0,
        200
    );
    let v = user
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("marker").is_some())
        .await?;
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys, vec!["marker"], "only the good message was stored: {v}");
    let (_, attrs) = dev.call("GET", "/api/v1/STRICT_TOKEN/attributes", None)?;
    assert_eq!(attrs, json!({}), "no attributes were stored");
    Ok(())
}
