//! CoAP over DTLS with libcoap's `coap-client-openssl`: a device posts with its access token in
//! the path, or with its client certificate (X.509 credentials set through REST) on
//! ThingsBoard's token-less paths; an unknown certificate gets 4.01 and stores nothing, a
//! ClientHello first gets a cookie (HelloVerifyRequest, seen by `openssl s_client`), and
//! datagrams that are not DTLS leave the listener serving. Certificates are made by `openssl`.

use std::time::Duration;

use serde_json::json;
use thingraft_tests::{ProcCluster, Rest, certificate, coaps_client, free_ports};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_post_over_dtls_with_a_token_or_their_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    certificate(d, "server", "thingraft")?;
    certificate(d, "device", "meter-dtls")?;
    certificate(d, "stranger", "stranger")?;
    let port = free_ports(1)[0];
    let config = format!(
        "[coap]\ndtls_listen = \"127.0.0.1:{port}\"\ndtls_cert_file = \"{}\"\ndtls_key_file = \"{}\"\n",
        d.join("server.pem").display(),
        d.join("server.key").display()
    );
    let c = ProcCluster::start_with_config(1, 4, Some(&config)).await?;
    let rest = Rest::login(&c.http[&1], "tenant@thingsboard.org", "tenant").await?;
    let base = format!("coaps://127.0.0.1:{port}/api/v1");
    let ca = d.join("server.pem").display().to_string();

    // An access token over DTLS; the server's certificate is checked against its own PEM.
    let post_with_token = |token: &str, msg: &str| {
        coaps_client(&[
            "-R",
            &ca,
            "-m",
            "post",
            "-e",
            msg,
            &format!("{base}/{token}/telemetry"),
        ])
    };
    let by_token = rest.create_device("DTLS token", "DTLS_TOKEN")?;
    let out = post_with_token("DTLS_TOKEN", r#"{"dtls":1}"#)?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let v = rest
        .wait_latest(&by_token, Duration::from_secs(5), |v| v.get("dtls").is_some())
        .await?;
    assert_eq!(v["dtls"][0]["value"], "1");
    // A ClientHello is answered with a HelloVerifyRequest first (the cookie exchange against
    // spoofed sources), as OpenSSL's own client reports its states.
    let out = std::process::Command::new("timeout")
        .args(["5", "openssl", "s_client", "-dtls1_2", "-state", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .output()?;
    let states = String::from_utf8_lossy(&out.stderr);
    assert!(states.contains("DTLS1 read hello verify request"), "{states}");
    assert!(states.contains("read server hello"), "{states}");

    // A wrong token over DTLS: 4.01.
    let out = post_with_token("NO_SUCH", "{}")?;
    assert_eq!(out.code, "4.01", "{out:?}");

    // A client certificate registered as the device's X.509 credentials: token-less paths.
    let by_cert = rest.create_device("DTLS cert", "DTLS_CERT_PLACEHOLDER")?;
    let pem = std::fs::read_to_string(d.join("device.pem"))?;
    let body = json!({"deviceId": {"entityType": "DEVICE", "id": by_cert}, "credentialsType": "X509_CERTIFICATE", "credentialsValue": pem});
    let (code, creds) = rest.call("POST", "/api/device/credentials", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{creds}");
    // `coap-client` with the client certificate `name` (.pem and .key in `d`), then `args`.
    let as_device = |name: &str, args: &[&str]| {
        let cert = d.join(format!("{name}.pem")).display().to_string();
        let key = d.join(format!("{name}.key")).display().to_string();
        let mut all = vec!["-R", &ca, "-c", &cert, "-j", &key];
        all.extend_from_slice(args);
        coaps_client(&all)
    };
    let post_as = |name: &str, resource: &str, msg: &str| {
        as_device(name, &["-m", "post", "-e", msg, &format!("{base}/{resource}")])
    };
    let out = post_as("device", "telemetry", r#"{"x509":2}"#)?;
    assert_eq!(out.code, "2.01", "{out:?}");
    let v = rest
        .wait_latest(&by_cert, Duration::from_secs(5), |v| v.get("x509").is_some())
        .await?;
    assert_eq!(v["x509"][0]["value"], "2");
    let out = post_as("device", "attributes", r#"{"firmware":"2.0"}"#)?;
    assert_eq!(out.code, "2.01", "{out:?}");

    // The OTA path without a token: the certificate's device is found (no package assigned
    // yet: 4.04), where an unknown certificate gets 4.01.
    let fw = format!("coaps://127.0.0.1:{port}/fw?title=x&version=1");
    let get_fw_as = |name: &str| as_device(name, &["-m", "get", &fw]);
    assert_eq!(get_fw_as("device")?.code, "4.04");
    assert_eq!(get_fw_as("stranger")?.code, "4.01");

    // A certificate nobody registered: 4.01, nothing stored.
    let out = post_as("stranger", "telemetry", r#"{"x509":3}"#)?;
    assert_eq!(out.code, "4.01", "{out:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rest.latest(&by_cert)?["x509"][0]["value"], "2");

    // Datagrams that are not DTLS are dropped; the listener goes on serving.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let target = format!("127.0.0.1:{port}");
    sock.send_to(&[0xff, 0x00, 0x01], &target).await?;
    sock.send_to(&[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 1, 2], &target)
        .await?;
    sock.send_to(b"", &target).await?;
    let out = post_with_token("DTLS_TOKEN", r#"{"dtls":5}"#)?;
    assert_eq!(out.code, "2.01", "{out:?}");
    rest.wait_latest(&by_token, Duration::from_secs(5), |v| {
        v["dtls"][0]["value"] == "5"
    })
    .await?;
    Ok(())
}
