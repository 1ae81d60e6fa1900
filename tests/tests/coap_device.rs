//! ThingsBoard's CoAP device API end to end: libcoap's `coap-client` plays the device against a
//! `thingraft serve` process (raw UDP where a test needs a datagram no client sends: a
//! duplicate, garbage), and the REST API through `curl` checks what was stored.

use std::time::Duration;

use serde_json::{Value, json};
use thingraft_tests::{CoapOut, ProcCluster, Rest, coap_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

async fn node(config: Option<&str>) -> anyhow::Result<(ProcCluster, Rest)> {
    let c = ProcCluster::start_with_config(1, 4, config).await?;
    let user = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    Ok((c, user))
}

fn url(c: &ProcCluster, path: &str) -> String {
    format!("coap://{}/{path}", c.coap[&1])
}

/// `coap-client` observing `path` for `secs` seconds, on a thread of its own.
fn observe_in_background(
    c: &ProcCluster,
    path: &str,
    secs: u32,
) -> tokio::task::JoinHandle<anyhow::Result<CoapOut>> {
    let (secs, url) = (secs.to_string(), url(c, path));
    tokio::task::spawn_blocking(move || coap_client(&["-s", &secs, "-m", "get", &url]))
}

fn history_len(user: &Rest, id: &str, key: &str) -> anyhow::Result<usize> {
    let (code, v) = user.call(
        "GET",
        &format!("/api/plugins/telemetry/DEVICE/{id}/values/timeseries?keys={key}&startTs=0&endTs=9999999999999&limit=100"),
        None,
    )?;
    anyhow::ensure!(code == 200, "history: {code} {v}");
    Ok(v[key].as_array().map_or(0, Vec::len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_attributes_over_coap_are_stored_and_read_back() -> anyhow::Result<()> {
    let (c, user) = node(None).await?;
    let id = user.create_device("Sensor C", "COAP_TOKEN")?;

    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"temperature":21.5}"#,
        &url(&c, "api/v1/COAP_TOKEN/telemetry"),
    ])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let v = user
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("temperature").is_some())
        .await?;
    assert_eq!(v["temperature"][0]["value"], "21.5");

    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"fw":"v2","slot":4}"#,
        &url(&c, "api/v1/COAP_TOKEN/attributes"),
    ])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let out = coap_client(&[
        "-m",
        "get",
        &url(&c, "api/v1/COAP_TOKEN/attributes?clientKeys=fw"),
    ])?;
    assert_eq!(out.code, "2.05", "{out:?}");
    assert!(
        out.messages
            .iter()
            .any(|m| m.contains("Content-Format:application/json")),
        "{out:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out.body)?,
        json!({"client": {"fw": "v2"}})
    );
    // Nothing found: 4.04, as ThingsBoard answers.
    let out = coap_client(&[
        "-m",
        "get",
        &url(&c, "api/v1/COAP_TOKEN/attributes?sharedKeys=none"),
    ])?;
    assert_eq!(out.code, "4.04", "{out:?}");

    // A payload larger than one message goes up block-wise (Block1) and comes back block-wise
    // (Block2), whole.
    let blob = "b".repeat(3000);
    let big = format!(r#"{{"blob":"{blob}"}}"#);
    let out = coap_client(&[
        "-m",
        "post",
        "-b",
        "256",
        "-e",
        &big,
        &url(&c, "api/v1/COAP_TOKEN/attributes"),
    ])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    assert!(
        out.messages.iter().any(|m| m.contains("Block1:")),
        "sent block-wise: {out:?}"
    );
    let out = coap_client(&[
        "-m",
        "get",
        &url(&c, "api/v1/COAP_TOKEN/attributes?clientKeys=blob"),
    ])?;
    assert_eq!(out.code, "2.05", "{out:?}");
    assert!(
        out.messages.iter().any(|m| m.contains("Block2:")),
        "answered block-wise: {out:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out.body)?,
        json!({"client": {"blob": blob}})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_delivers_shared_attributes_and_rpc_and_replies_come_back() -> anyhow::Result<()> {
    let (c, user) = node(None).await?;
    let id = user.create_device("Valve C", "VALVE_TOKEN")?;
    let (code, _) = user.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"target":20}"#),
    )?;
    assert_eq!(code, 200);

    // Observe attributes for 3 s: the first notification is every shared attribute, the next
    // the change made meanwhile.
    let obs = observe_in_background(&c, "api/v1/VALVE_TOKEN/attributes", 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (code, _) = user.call(
        "POST",
        &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
        Some(r#"{"target":22}"#),
    )?;
    assert_eq!(code, 200);
    let out = obs.await??;
    let notes: Vec<&String> = out.messages.iter().filter(|m| m.contains("Observe:")).collect();
    assert!(notes.len() >= 2, "{out:?}");
    assert_eq!(out.body, r#"{"target":20}{"target":22}"#, "{out:?}");

    // Observe RPC: a two-way RPC reaches the device as a notification with its id; the device's
    // reply answers the user's call.
    let obs = observe_in_background(&c, "api/v1/VALVE_TOKEN/rpc", 4);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let user2 = user.clone();
    let path = format!("/api/plugins/rpc/twoway/{id}");
    let call = tokio::task::spawn_blocking(move || {
        user2.call(
            "POST",
            &path,
            Some(r#"{"method":"open","params":{"pct":40},"timeout":15000}"#),
        )
    });
    let out = obs.await??;
    let request: Value = serde_json::from_str(&out.body)?;
    assert_eq!(request["method"], "open", "{out:?}");
    assert_eq!(request["params"], json!({"pct": 40}));
    let rpc_id = request["id"].as_u64().expect("id");
    let reply = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"pct":40}"#,
        &url(&c, &format!("api/v1/VALVE_TOKEN/rpc/{rpc_id}")),
    ])?;
    assert_eq!(reply.code, "2.01", "{reply:?}");
    let (code, answer) = call.await??;
    assert_eq!((code, answer), (200, json!({"pct": 40})));

    // A persistent RPC is DELIVERED once the device has acknowledged its notification.
    let obs = observe_in_background(&c, "api/v1/VALVE_TOKEN/rpc", 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let persistent = user.persistent_rpc(&id, false, "close")?;
    assert_eq!(
        user.rpc_status_becomes(&persistent, "DELIVERED").await?,
        "DELIVERED"
    );
    let out = obs.await??;
    assert!(out.body.contains(r#""method":"close""#), "{out:?}");

    // A client-side `getTime`: the default root chain answers with the server time.
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"method":"getTime","params":{}}"#,
        &url(&c, "api/v1/VALVE_TOKEN/rpc"),
    ])?;
    assert_eq!(out.code, "2.05", "{out:?}");
    thingraft_tests::assert_server_time(&serde_json::from_str(&out.body)?);
    Ok(())
}

/// A confirmable POST of `payload` to `/api/v1/{token}/{resource}` with message id `mid` and
/// token 0x07, as raw bytes.
fn raw_post(token: &str, resource: &str, payload: &[u8], mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    let mut b = vec![0x41, 0x02, hi, lo, 0x07];
    let segs = ["api", "v1", token, resource];
    let mut first = true;
    for s in segs {
        let delta: u8 = if first { 11 } else { 0 }; // Uri-Path is option 11
        first = false;
        assert!(s.len() < 13);
        b.push((delta << 4) | s.len() as u8);
        b.extend_from_slice(s.as_bytes());
    }
    b.push(0xff);
    b.extend_from_slice(payload);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_come_separately_and_duplicates_are_answered_once() -> anyhow::Result<()> {
    let (c, user) = node(Some(
        "[transport]\nclient_rpc_timeout_ms = 1500\n[coap]\nack_timeout_ms = 300\n",
    ))
    .await?;
    let id = user.create_device("Clock C", "CLOCK_TOKEN")?;

    // A client-side RPC the root chain does not answer takes 1.5 s: coap-client gets the answer as a separate confirmable
    // response...
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"method":"getWeather","params":{}}"#,
        &url(&c, "api/v1/CLOCK_TOKEN/rpc"),
    ])?;
    assert_eq!(out.code, "2.05", "{out:?}");
    assert!(
        out.messages.iter().any(|m| m.contains("t:CON c:2.05")),
        "separate response: {out:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out.body)?,
        json!({"error": "timeout"})
    );
    // ...after an empty ACK to its request (seen on a raw socket), and the separate response is
    // sent again until it is acknowledged.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(&c.coap[&1]).await?;
    sock.send(&raw_post(
        "CLOCK_TOKEN",
        "rpc",
        br#"{"method":"getWeather"}"#,
        0x2222,
    ))
    .await?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await??;
    assert_eq!(
        &buf[..n],
        &[0x60, 0x00, 0x22, 0x22],
        "an empty ACK with the request's id"
    );
    let mut separate = Vec::new();
    for _ in 0..2 {
        let n = tokio::time::timeout(Duration::from_secs(8), sock.recv(&mut buf)).await??;
        separate.push(buf[..n].to_vec());
    }
    assert_eq!(separate[0], separate[1], "retransmitted while not acknowledged");
    // CON (type 0) 2.05 (0x45) with the request's token.
    assert_eq!(
        (separate[0][0], separate[0][1], separate[0][4]),
        (0x41, 0x45, 0x07)
    );
    let ack = [0x60, 0x00, separate[0][2], separate[0][3]];
    sock.send(&ack).await?;

    // A confirmable Observe registration on RPC, with no RPC to send yet: acknowledged (an
    // empty ACK) instead of left for the device to retransmit until it gives up.
    let [hi, lo] = 0x3333u16.to_be_bytes();
    let mut observe = vec![0x41, 0x01, hi, lo, 0x08, 0x60]; // CON GET, token 0x08, Observe: 0
    for (i, seg) in ["api", "v1", "CLOCK_TOKEN", "rpc"].iter().enumerate() {
        let delta: u8 = if i == 0 { 5 } else { 0 }; // Uri-Path (11) after Observe (6)
        observe.push((delta << 4) | seg.len() as u8);
        observe.extend_from_slice(seg.as_bytes());
    }
    sock.send(&observe).await?;
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await??;
    assert_eq!(
        &buf[..n],
        &[0x60, 0x00, 0x33, 0x33],
        "an empty ACK to the registration"
    );

    // The same confirmable message twice (a retransmission sent the moment the first answer
    // arrives): the same answer twice, one record. Repeated, because the retransmission races
    // the server's bookkeeping of its answer.
    const ROUNDS: u16 = 20;
    for round in 0..ROUNDS {
        let mid = 0x1234 + round;
        // Each with its own timestamp, so that every record is a row of its own in the history.
        let body = format!(
            r#"{{"ts":{},"values":{{"dup":{round}}}}}"#,
            1_000 + u64::from(round)
        );
        let msg = raw_post("CLOCK_TOKEN", "telemetry", body.as_bytes(), mid);
        let mut answers = Vec::new();
        for _ in 0..2 {
            sock.send(&msg).await?;
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await??;
            answers.push(buf[..n].to_vec());
        }
        assert_eq!(answers[0], answers[1], "round {round}");
        // ACK (type 2), 2.01 (0x41), the message id and token of the request.
        let [hi, lo] = mid.to_be_bytes();
        assert_eq!(&answers[0][..5], &[0x61, 0x41, hi, lo, 0x07], "round {round}");
    }
    let last = (ROUNDS - 1).to_string();
    user.wait_latest(&id, Duration::from_secs(5), |v| {
        v.get("dup")
            .is_some_and(|d| d[0]["value"].to_string().trim_matches('"') == last)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        history_len(&user, &id, "dup")?,
        usize::from(ROUNDS),
        "no duplicate was stored again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_coap_input_gets_coap_codes_and_stores_nothing() -> anyhow::Result<()> {
    let (c, user) = node(Some("[coap]\nmax_payload_bytes = 2048\n")).await?;
    let id = user.create_device("Strict C", "STRICT_C")?;
    let telemetry = url(&c, "api/v1/STRICT_C/telemetry");

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "-m".into(),
                "post".into(),
                "-e".into(),
                r#"{"t":1}"#.into(),
                url(&c, "api/v1/NO_SUCH/telemetry"),
            ],
            "4.01",
        ),
        (
            vec![
                "-m".into(),
                "post".into(),
                "-e".into(),
                "{not json".into(),
                telemetry.clone(),
            ],
            "4.00",
        ),
        (
            vec![
                "-m".into(),
                "post".into(),
                "-e".into(),
                r#"[{"a":1}]"#.into(),
                url(&c, "api/v1/STRICT_C/attributes"),
            ],
            "4.00",
        ),
        (
            vec![
                "-m".into(),
                "put".into(),
                "-e".into(),
                r#"{"t":1}"#.into(),
                telemetry.clone(),
            ],
            "4.05",
        ),
        (
            vec![
                "-m".into(),
                "post".into(),
                "-e".into(),
                r#"{"t":1}"#.into(),
                url(&c, "api/v1/STRICT_C/nothing"),
            ],
            "4.04",
        ),
        (
            vec![
                "-m".into(),
                "post".into(),
                // CBOR: neither JSON nor protobuf (octet stream).
                "-t".into(),
                "60".into(),
                "-e".into(),
                r#"{"t":1}"#.into(),
                telemetry.clone(),
            ],
            "4.15",
        ),
        (
            vec![
                "-m".into(),
                "post".into(),
                "-b".into(),
                "512".into(),
                "-e".into(),
                format!(r#"{{"t":"{}"}}"#, "x".repeat(4000)),
                telemetry.clone(),
            ],
            "4.13",
        ),
    ];
    for (args, want) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = coap_client(&a)?;
        assert_eq!(out.code, want, "{:?}: {out:?}", &a[..a.len() - 1]);
    }
    // Garbage datagrams are dropped (a log line); the node keeps serving.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&[0xff, 0x00, 0x01], &c.coap[&1]).await?;
    sock.send_to(b"", &c.coap[&1]).await?;

    let out = coap_client(&["-m", "post", "-e", r#"{"marker":1}"#, &telemetry])?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let v = user
        .wait_latest(&id, Duration::from_secs(5), |v| v.get("marker").is_some())
        .await?;
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys, vec!["marker"], "only the good message was stored: {v}");
    let out = coap_client(&["-m", "get", &url(&c, "api/v1/STRICT_C/attributes")])?;
    assert_eq!(out.code, "4.04", "no attributes were stored: {out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_confirmable_observer_that_is_gone_is_pinged_out_and_gets_no_more_rpcs() -> anyhow::Result<()> {
    let (c, user) = node(Some(
        "[coap]\nobserve_check_ms = 400\nack_timeout_ms = 200\nmax_retransmit = 1\n",
    ))
    .await?;
    let id = user.create_device("Pinged", "PING_TOKEN")?;
    // A device observing RPC with non-confirmable requests: its notifications are never
    // acknowledged, so only the pings (which it answers) tell that it is still there.
    let mut observer = std::process::Command::new("coap-client-notls")
        .args(["-N", "-s", "60", "-m", "get", &url(&c, "api/v1/PING_TOKEN/rpc")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let oneway = |user: &Rest| {
        user.call(
            "POST",
            &format!("/api/plugins/rpc/oneway/{id}"),
            Some(r#"{"method":"beep","params":{},"timeout":1500}"#),
        )
    };
    // Alive through several pings: a one-way RPC is sent to it (200).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, body) = oneway(&user)?;
    assert_eq!(code, 200, "the observer is there: {body}");
    // Gone without a word (killed): the next ping goes unanswered and the observation ends, so
    // an RPC finds no active connection (409) instead of vanishing into it.
    observer.kill()?;
    observer.wait()?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (code, body) = oneway(&user)?;
    assert_eq!(code, 409, "the observer is gone: {body}");
    Ok(())
}

/// A non-confirmable Observe registration (GET, Observe 0) on `/api/v1/{token}/rpc` with message
/// id `mid` and token 0x07, as raw bytes.
fn raw_observe_rpc_non(token: &str, mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    // NON (type 1), token length 1, GET; Observe (option 6) empty = register.
    let mut b = vec![0x51, 0x01, hi, lo, 0x07, 0x60];
    for (i, s) in ["api", "v1", token, "rpc"].iter().enumerate() {
        let delta: u8 = if i == 0 { 5 } else { 0 }; // Uri-Path is option 11 = 6 + 5
        assert!(s.len() < 13);
        b.push((delta << 4) | s.len() as u8);
        b.extend_from_slice(s.as_bytes());
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_rejects_a_notification_with_rst_ends_its_observation() -> anyhow::Result<()> {
    let (c, user) = node(None).await?;
    let id = user.create_device("Rejecter", "RST_TOKEN")?;
    let oneway = |user: &Rest| {
        user.call(
            "POST",
            &format!("/api/plugins/rpc/oneway/{id}"),
            Some(r#"{"method":"tick","params":{},"timeout":1500}"#),
        )
    };
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(&c.coap[&1]).await?;
    sock.send(&raw_observe_rpc_non("RST_TOKEN", 0x3333)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The first RPC comes as a non-confirmable notification with the registration's token.
    let (code, body) = oneway(&user)?;
    assert_eq!(code, 200, "{body}");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await??;
    assert_eq!(
        (buf[0], buf[1], buf[4]),
        (0x51, 0x45, 0x07),
        "NON 2.05: {:?}",
        &buf[..n]
    );
    assert!(String::from_utf8_lossy(&buf[..n]).contains("tick"));
    // The device has forgotten the observation (a reboot, say): it rejects it with RST, and the
    // observation ends, so the next RPC finds no active connection (409).
    sock.send(&[0x70, 0x00, buf[2], buf[3]]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = oneway(&user)?;
    assert_eq!(code, 409, "the observation is gone: {body}");
    Ok(())
}
