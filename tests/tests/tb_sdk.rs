//! Compatibility target A: ThingsBoard's own Python device SDK (tb-mqtt-client 1.13: MQTT
//! device, OTA firmware, provisioning, gateway, HTTP device) runs unchanged against a `thingraft serve`
//! process. The checks are in `tests/python/tb_sdk.py`; each prints `ok <name>`.

use std::process::Command;

use thingraft_tests::ProcCluster;

/// The virtualenv `scripts/deps.sh` installs the SDK into.
fn python() -> String {
    std::env::var("THINGRAFT_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/thingraft-venv/bin/python3",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thingsboards_python_sdk_runs_unchanged() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let (host, mqtt_port) = c.mqtt[&1].rsplit_once(':').expect("port");
    let http_port = c.http[&1].rsplit_once(':').expect("port").1;
    let script = thingraft_tests::package_dir().join("python/tb_sdk.py");
    let out = tokio::task::spawn_blocking({
        let (host, mqtt_port, http_port) = (host.to_string(), mqtt_port.to_string(), http_port.to_string());
        move || {
            // The HTTP SDK stores downloaded firmware in its working directory.
            let dir = tempfile::tempdir()?;
            Command::new(python())
                .arg(&script)
                .args([&host, &mqtt_port, &http_port])
                .current_dir(dir.path())
                .output()
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("DEBUG"))
        .rev()
        .take(15)
        .collect();
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the SDK checks failed.\nstdout:\n{stdout}\nstderr (last lines, newest first):\n{}",
        errors.join("\n")
    );
    // Every check ran.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        30,
        "{stdout}"
    );
    Ok(())
}
