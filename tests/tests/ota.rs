//! OTA packages end to end: uploaded through REST (multipart, as ThingsBoard's clients send
//! it), assigned to a device (its `fw_*` shared attributes), downloaded in chunks over HTTP
//! (`curl`), CoAP (`coap-client`, block-wise) and MQTT (rumqttc, `v2/fw/...`).

use std::process::Command;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest, coap_client, next_packet, v5_client};

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
