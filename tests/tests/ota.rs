//! OTA packages end to end: uploaded through REST (multipart, as ThingsBoard's clients send
//! it), assigned to a device (its `fw_*` shared attributes), downloaded in chunks over HTTP
//! (`curl`), CoAP (`coap-client`, block-wise) and MQTT (rumqttc, `v2/fw/...`).

use std::process::Command;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest, coap_client, next_packet, next_puback, v5_client};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");

fn firmware() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 13 % 256) as u8).collect()
}

/// `curl` GET returning (status, body bytes).
fn get_bytes(url: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let out = Command::new("curl")
        .args(["-s", "-w", "%{http_code}", url])
        .output()?;
    let (body, code) = out.stdout.split_at(out.stdout.len() - 3);
    Ok((String::from_utf8_lossy(code).parse()?, body.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_is_uploaded_assigned_and_downloaded_over_http_coap_and_mqtt() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let id = rest.create_device("Updater", "UPD_TOKEN")?;
    let http = format!("http://{}", c.http[&1]);

    // Before any package: 404 over HTTP, 4.04 over CoAP.
    assert_eq!(get_bytes(&format!("{http}/api/v1/UPD_TOKEN/firmware"))?.0, 404);
    let out = coap_client(&["-m", "get", &format!("coap://{}/fw/UPD_TOKEN", c.coap[&1])])?;
    assert_eq!(out.code, "4.04", "{out:?}");

    let (code, pkg) = rest.call(
        "POST",
        "/api/otaPackage",
        Some(r#"{"title":"fw-upd","version":"1.1","type":"FIRMWARE"}"#),
    )?;
    assert_eq!(code, 200, "{pkg}");
    let pkg_id = pkg["id"]["id"].as_str().expect("id").to_string();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("fw.bin");
    std::fs::write(&file, firmware())?;
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", "-H"])
        .arg(format!(
            "X-Authorization: Bearer {}",
            rest.token.as_deref().unwrap_or_default()
        ))
        .arg("-F")
        .arg(format!("file=@{};type=application/octet-stream", file.display()))
        .arg(format!("{http}/api/otaPackage/{pkg_id}?checksumAlgorithm=SHA256"))
        .output()?;
    let uploaded: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(uploaded["dataSize"], 5000, "{uploaded}");
    assert_eq!(uploaded["fileName"], "fw.bin");
    let sha = uploaded["checksum"].as_str().expect("checksum").to_string();
    assert_eq!(sha.len(), 64);

    // Assigned through the device's firmwareId: the fw_* shared attributes appear.
    let body = json!({"id": {"entityType": "DEVICE", "id": id}, "name": "Updater",
                      "firmwareId": {"entityType": "OTA_PACKAGE", "id": pkg_id}});
    assert_eq!(rest.call("POST", "/api/device", Some(&body.to_string()))?.0, 200);
    let (_, dev) = rest.call("GET", &format!("/api/device/{id}"), None)?;
    assert_eq!(dev["firmwareId"]["id"], pkg_id.as_str(), "{dev}");
    let (_, attrs) = Rest::new(&c.http[&1]).call("GET", "/api/v1/UPD_TOKEN/attributes?sharedKeys=fw_title,fw_version,fw_size,fw_checksum,fw_checksum_algorithm", None)?;
    assert_eq!(
        attrs["shared"],
        json!({"fw_title": "fw-upd", "fw_version": "1.1", "fw_size": 5000, "fw_checksum": sha, "fw_checksum_algorithm": "SHA256"})
    );

    // HTTP: chunks, the whole package, a title that is not the assigned one (400).
    let fw = firmware();
    let (code, chunk1) = get_bytes(&format!(
        "{http}/api/v1/UPD_TOKEN/firmware?title=fw-upd&version=1.1&size=2048&chunk=1"
    ))?;
    assert_eq!((code, &chunk1[..]), (200, &fw[2048..4096]));
    let (code, last) = get_bytes(&format!(
        "{http}/api/v1/UPD_TOKEN/firmware?title=fw-upd&version=1.1&size=2048&chunk=2"
    ))?;
    assert_eq!((code, &last[..]), (200, &fw[4096..]));
    assert_eq!(
        get_bytes(&format!("{http}/api/v1/UPD_TOKEN/firmware"))?,
        (200, fw.clone())
    );
    assert_eq!(
        get_bytes(&format!(
            "{http}/api/v1/UPD_TOKEN/firmware?title=other&version=1.1"
        ))?
        .0,
        400
    );

    // CoAP: a chunk, and the whole package block-wise.
    let out = Command::new("coap-client-notls")
        .args(["-m", "get", "-o", "-"])
        .arg(format!(
            "coap://{}/fw/UPD_TOKEN?title=fw-upd&version=1.1&size=1000&chunk=3",
            c.coap[&1]
        ))
        .output()?;
    assert_eq!(&out.stdout[..], &fw[3000..4000]);
    let whole = dir.path().join("whole.bin");
    let status = Command::new("coap-client-notls")
        .args(["-m", "get", "-o"])
        .arg(&whole)
        .arg(format!("coap://{}/fw/UPD_TOKEN", c.coap[&1]))
        .status()?;
    assert!(status.success());
    assert_eq!(std::fs::read(&whole)?, fw, "block-wise download");

    // MQTT: chunk requests answered on v2/fw/response/..; a package that is not there is
    // answered on v2/fw/error and the connection closed.
    let (client, mut ev) = v5_client(&c.mqtt[&1], "UPD_TOKEN");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .publish("v2/fw/request/7/chunk/1", QoS::AtLeastOnce, false, "2048")
        .await?;
    let (topic, data) = next_packet(&mut ev, |p| match p {
        Packet::Publish(p) if p.topic.starts_with(b"v2/fw/") => {
            Some((String::from_utf8_lossy(&p.topic).into_owned(), p.payload.to_vec()))
        }
        _ => None,
    })
    .await?;
    assert_eq!(
        (topic.as_str(), &data[..]),
        ("v2/fw/response/7/chunk/1", &fw[2048..4096])
    );
    // (Over a raw MQTT 3.1.1 connection: rumqttc drops a publish that arrives together with
    // the server's DISCONNECT.)
    let mut sock = tokio::net::TcpStream::connect(&c.mqtt[&1]).await?;
    let user = b"UPD_TOKEN";
    let mut connect = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x82,
        0,
        60,
        0,
        0,
        0,
        user.len() as u8,
    ];
    connect.extend_from_slice(user);
    let topic = b"v2/sw/request/1/chunk/0";
    let mut publish = vec![0, topic.len() as u8];
    publish.extend_from_slice(topic);
    let mut bytes = vec![0x10, connect.len() as u8];
    bytes.extend(connect);
    bytes.extend([0x30, publish.len() as u8]);
    bytes.extend(publish);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(&bytes).await?;
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), sock.read_to_end(&mut got)).await??;
    let find = |needle: &[u8]| got.windows(needle.len()).any(|w| w == needle);
    assert!(
        find(b"v2/sw/error") && find(b"NOT_FOUND"),
        "no software assigned: {got:?}"
    );
    Ok(())
}

/// Uploads `data` raw to package `pkg` (`--data-binary`); returns its SHA256.
fn upload_raw(rest: &Rest, http: &str, pkg: &str, data: &[u8]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pkg.bin");
    std::fs::write(&file, data)?;
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
        ])
        .arg(format!(
            "X-Authorization: Bearer {}",
            rest.token.as_deref().unwrap_or_default()
        ))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{http}/api/otaPackage/{pkg}?fileName=pkg.bin"))
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    anyhow::ensure!(v["dataSize"] == data.len(), "upload: {v}");
    Ok(v["checksum"].as_str().unwrap_or_default().to_string())
}

fn package(rest: &Rest, title: &str, version: &str, profile: Option<&str>) -> anyhow::Result<String> {
    let mut body = json!({"title": title, "version": version, "type": "FIRMWARE"});
    if let Some(p) = profile {
        body["deviceProfileId"] = json!({"entityType": "DEVICE_PROFILE", "id": p});
    }
    let (code, pkg) = rest.call("POST", "/api/otaPackage", Some(&body.to_string()))?;
    anyhow::ensure!(code == 200, "package: {code} {pkg}");
    Ok(pkg["id"]["id"].as_str().unwrap_or_default().to_string())
}

/// The shared `fw_version` of the device with `token`, once it equals `want` (5 s at most).
async fn wait_fw_version(c: &ProcCluster, token: &str, want: &str) -> anyhow::Result<()> {
    let dev = Rest::new(&c.http[&1]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, a) = dev.call(
            "GET",
            &format!("/api/v1/{token}/attributes?sharedKeys=fw_version"),
            None,
        )?;
        if a["shared"]["fw_version"] == want {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{token}: fw_version {a} is not {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A package assigned to a device profile: its devices without a package of their own follow
/// it (attributes and downloads), devices with their own keep theirs, and devices created in
/// the profile later (REST, gateway children) follow it from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follow_their_profiles_package_unless_they_have_their_own() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let rest = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let http = format!("http://{}", c.http[&1]);
    let (code, profile) = rest.call("POST", "/api/deviceProfile", Some(r#"{"name":"Meters"}"#))?;
    assert_eq!(code, 200, "{profile}");
    let pid = profile["id"]["id"].as_str().expect("profile id").to_string();
    let in_profile = |name: &str, token: &str| -> anyhow::Result<String> {
        let body = json!({"name": name, "deviceProfileId": {"entityType": "DEVICE_PROFILE", "id": pid}});
        let (code, d) = rest.call(
            "POST",
            &format!("/api/device?accessToken={token}"),
            Some(&body.to_string()),
        )?;
        anyhow::ensure!(code == 200, "{code} {d}");
        Ok(d["id"]["id"].as_str().unwrap_or_default().to_string())
    };
    let follower = in_profile("Meter 1", "M1_TOKEN")?;
    let pinned = in_profile("Meter 2", "M2_TOKEN")?;

    // Meter 2 has a package of its own.
    let own = package(&rest, "meter-fw", "1.0", None)?;
    upload_raw(&rest, &http, &own, b"own firmware")?;
    let body = json!({"id": {"entityType": "DEVICE", "id": pinned}, "name": "Meter 2",
                      "firmwareId": {"entityType": "OTA_PACKAGE", "id": own}});
    assert_eq!(rest.call("POST", "/api/device", Some(&body.to_string()))?.0, 200);

    // A package of another profile, and one without data, are refused for this profile.
    let (_, other) = rest.call("POST", "/api/deviceProfile", Some(r#"{"name":"Pumps"}"#))?;
    let foreign = package(&rest, "pump-fw", "1.0", other["id"]["id"].as_str())?;
    upload_raw(&rest, &http, &foreign, b"pump")?;
    let empty = package(&rest, "meter-fw", "3.0", Some(&pid))?;
    // ...and so is a SOFTWARE package given as the firmware.
    let (code, sw) = rest.call(
        "POST",
        "/api/otaPackage",
        Some(&json!({"title": "meter-sw", "version": "1.0", "type": "SOFTWARE"}).to_string()),
    )?;
    assert_eq!(code, 200, "{sw}");
    let sw = sw["id"]["id"].as_str().expect("id").to_string();
    upload_raw(&rest, &http, &sw, b"software")?;
    for pkg in [&foreign, &empty, &sw] {
        let body = json!({"id": {"entityType": "DEVICE_PROFILE", "id": pid}, "name": "Meters renamed",
                          "firmwareId": {"entityType": "OTA_PACKAGE", "id": pkg}});
        let (code, v) = rest.call("POST", "/api/deviceProfile", Some(&body.to_string()))?;
        assert_eq!(code, 400, "{v}");
    }
    // Refused before anything was written: the profile keeps its name.
    let (_, got) = rest.call("GET", &format!("/api/deviceProfile/{pid}"), None)?;
    assert_eq!(got["name"], "Meters", "{got}");
    // A package can only be made for a profile of the caller's that exists.
    let (code, v) = rest.call(
        "POST",
        "/api/otaPackage",
        Some(&json!({"title": "x", "version": "1", "type": "FIRMWARE",
                     "deviceProfileId": {"entityType": "DEVICE_PROFILE", "id": "5f1c7a2e-0000-4000-8000-000000000001"}})
        .to_string()),
    )?;
    assert_eq!(code, 404, "{v}");

    // The profile's package: the follower gets its attributes, the pinned device keeps its own.
    let fw2 = firmware();
    let profile_pkg = package(&rest, "meter-fw", "2.0", Some(&pid))?;
    let sha = upload_raw(&rest, &http, &profile_pkg, &fw2)?;
    let body = json!({"id": {"entityType": "DEVICE_PROFILE", "id": pid}, "name": "Meters",
                      "firmwareId": {"entityType": "OTA_PACKAGE", "id": profile_pkg}});
    let (code, saved) = rest.call("POST", "/api/deviceProfile", Some(&body.to_string()))?;
    assert_eq!(code, 200, "{saved}");
    assert_eq!(saved["firmwareId"]["id"], profile_pkg.as_str());
    let (_, got) = rest.call("GET", &format!("/api/deviceProfile/{pid}"), None)?;
    assert_eq!(got["firmwareId"]["id"], profile_pkg.as_str(), "{got}");
    wait_fw_version(&c, "M1_TOKEN", "2.0").await?;
    let (_, a) = Rest::new(&c.http[&1]).call(
        "GET",
        "/api/v1/M1_TOKEN/attributes?sharedKeys=fw_title,fw_size,fw_checksum",
        None,
    )?;
    assert_eq!(
        a["shared"],
        json!({"fw_title": "meter-fw", "fw_size": fw2.len(), "fw_checksum": sha})
    );
    wait_fw_version(&c, "M2_TOKEN", "1.0").await?;
    // A device refuses a SOFTWARE package as its firmware too, and a package of another
    // profile; nothing changes, its name neither.
    for pkg in [&sw, &foreign] {
        let body = json!({"id": {"entityType": "DEVICE", "id": pinned}, "name": "Meter 2 renamed",
                          "firmwareId": {"entityType": "OTA_PACKAGE", "id": pkg}});
        let (code, v) = rest.call("POST", "/api/device", Some(&body.to_string()))?;
        assert_eq!(code, 400, "{v}");
    }
    let (_, d) = rest.call("GET", &format!("/api/device/{pinned}"), None)?;
    assert_eq!(d["name"], "Meter 2", "{d}");
    wait_fw_version(&c, "M2_TOKEN", "1.0").await?;
    // A device's own firmwareId stays its own; the follower has none.
    let (_, d) = rest.call("GET", &format!("/api/device/{follower}"), None)?;
    assert!(d["firmwareId"].is_null(), "{d}");
    let (_, d) = rest.call("GET", &format!("/api/device/{pinned}"), None)?;
    assert_eq!(d["firmwareId"]["id"], own.as_str());

    // Downloads serve each device the package it follows.
    let (code, bytes) = get_bytes(&format!(
        "{http}/api/v1/M1_TOKEN/firmware?title=meter-fw&version=2.0"
    ))?;
    assert_eq!((code, bytes == fw2), (200, true));
    let (code, bytes) = get_bytes(&format!(
        "{http}/api/v1/M2_TOKEN/firmware?title=meter-fw&version=1.0"
    ))?;
    assert_eq!((code, bytes), (200, b"own firmware".to_vec()));

    // Devices created in the profile later follow it from the start: through REST...
    in_profile("Meter 3", "M3_TOKEN")?;
    wait_fw_version(&c, "M3_TOKEN", "2.0").await?;
    // ...and as a gateway's child whose type names the profile.
    let body = json!({"name": "Meter Gateway", "additionalInfo": {"gateway": true}}).to_string();
    assert_eq!(
        rest.call("POST", "/api/device?accessToken=MGW_TOKEN", Some(&body))?
            .0,
        200
    );
    let (client, mut ev) = v5_client(&c.mqtt[&1], "MGW_TOKEN");
    next_packet(&mut ev, |p| matches!(p, Packet::ConnAck(_)).then_some(())).await?;
    client
        .publish(
            "v1/gateway/connect",
            QoS::AtLeastOnce,
            false,
            r#"{"device":"Meter 4","type":"Meters"}"#,
        )
        .await?;
    assert_eq!(next_puback(&mut ev).await?, PubAckReason::Success);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let child = loop {
        let (code, d) = rest.call("GET", "/api/tenant/devices?deviceName=Meter%204", None)?;
        if code == 200 {
            break d["id"]["id"].as_str().unwrap_or_default().to_string();
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "child not created: {code} {d}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, a) = rest.call(
            "GET",
            &format!("/api/plugins/telemetry/DEVICE/{child}/values/attributes/SHARED_SCOPE?keys=fw_version"),
            None,
        )?;
        if a[0]["value"] == "2.0" {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "child fw_version: {a}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}
