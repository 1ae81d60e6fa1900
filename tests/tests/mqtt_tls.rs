//! MQTT over TLS with `mosquitto_pub`: a device authenticates by access token over TLS, or by
//! its client certificate (X.509 credentials set through REST); an unknown certificate is
//! refused and stores nothing. Certificates are made by `openssl` for the test.

use std::time::Duration;

use serde_json::json;
use thingraft_tests::{ProcCluster, Rest, certificate, free_ports, mosquitto_pub};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_tls_with_a_token_or_their_certificate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    certificate(d, "server", "thingraft")?;
    certificate(d, "device", "meter-x509")?;
    certificate(d, "stranger", "stranger")?;
    let port = free_ports(1)[0];
    let config = format!(
        "[mqtt]\ntls_listen = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        d.join("server.pem").display(),
        d.join("server.key").display()
    );
    let c = ProcCluster::start_with_config(1, 4, Some(&config)).await?;
    let rest = Rest::login(&c.http[&1], "tenant@thingsboard.org", "tenant").await?;
    let tls = format!("127.0.0.1:{port}");
    let ca = d.join("server.pem").display().to_string();

    // An access token over TLS.
    let by_token = rest.create_device("TLS token", "TLS_TOKEN")?;
    let rc = mosquitto_pub(
        &tls,
        &[
            "--cafile",
            &ca,
            "-q",
            "1",
            "-u",
            "TLS_TOKEN",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"tls":1}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    let v = rest
        .wait_latest(&by_token, Duration::from_secs(5), |v| v.get("tls").is_some())
        .await?;
    assert_eq!(v["tls"][0]["value"], "1");

    // A client certificate registered as the device's X.509 credentials.
    let by_cert = rest.create_device("TLS cert", "TLS_CERT_PLACEHOLDER")?;
    let pem = std::fs::read_to_string(d.join("device.pem"))?;
    let body = json!({"deviceId": {"entityType": "DEVICE", "id": by_cert}, "credentialsType": "X509_CERTIFICATE", "credentialsValue": pem});
    let (code, creds) = rest.call("POST", "/api/device/credentials", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{creds}");
    assert_eq!(creds["credentialsType"], "X509_CERTIFICATE");
    // Publishes `msg` over TLS with the client certificate `name` (.pem and .key in `d`).
    let publish_as = |name: &str, msg: &str| {
        let cert = d.join(format!("{name}.pem")).display().to_string();
        let key = d.join(format!("{name}.key")).display().to_string();
        mosquitto_pub(
            &tls,
            &[
                "--cafile",
                &ca,
                "--cert",
                &cert,
                "--key",
                &key,
                "-q",
                "1",
                "-t",
                "v1/devices/me/telemetry",
                "-m",
                msg,
            ],
        )
    };
    let rc = publish_as("device", r#"{"x509":2}"#)?;
    assert_eq!(rc, 0);
    let v = rest
        .wait_latest(&by_cert, Duration::from_secs(5), |v| v.get("x509").is_some())
        .await?;
    assert_eq!(v["x509"][0]["value"], "2");

    // Its credentials changed to an access token: the certificate stops authenticating (the
    // node's cached lookup of it is dropped with the change).
    let body = json!({"deviceId": {"entityType": "DEVICE", "id": by_cert}, "credentialsType": "ACCESS_TOKEN", "credentialsId": "TLS_CERT_TOKEN"});
    let (code, creds) = rest.call("POST", "/api/device/credentials", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{creds}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while publish_as("device", r#"{"x509":5}"#)? == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a certificate whose credentials were replaced still authenticates"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Put back for what follows.
    let body = json!({"deviceId": {"entityType": "DEVICE", "id": by_cert}, "credentialsType": "X509_CERTIFICATE", "credentialsValue": pem});
    let (code, creds) = rest.call("POST", "/api/device/credentials", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{creds}");
    assert_eq!(publish_as("device", r#"{"x509":2}"#)?, 0);

    // A certificate nobody registered: refused (CONNACK 5, not authorized), nothing stored.
    let rc = publish_as("stranger", r#"{"x509":3}"#)?;
    assert_ne!(rc, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rest.latest(&by_cert)?["x509"][0]["value"], "2");
    // Plain TCP still works beside TLS.
    let rc = mosquitto_pub(
        &c.mqtt[&1],
        &[
            "-q",
            "1",
            "-u",
            "TLS_TOKEN",
            "-t",
            "v1/devices/me/telemetry",
            "-m",
            r#"{"tls":4}"#,
        ],
    )?;
    assert_eq!(rc, 0);
    Ok(())
}
