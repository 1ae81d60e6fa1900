//! Dependency arrows between the workspace's crates point one way, as in DESIGN.md's layout
//! table; a new arrow must be added here on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// crate → the workspace crates it may depend on.
fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    BTreeMap::from([
        ("thingraft-proto", BTreeSet::new()),
        ("thingraft-log", BTreeSet::from(["thingraft-proto"])),
        (
            "thingraft-engine",
            BTreeSet::from(["thingraft-proto", "thingraft-log"]),
        ),
        (
            "thingraft-transport-common",
            BTreeSet::from(["thingraft-proto", "thingraft-log"]),
        ),
        (
            "thingraft-transport-mqtt",
            BTreeSet::from(["thingraft-proto", "thingraft-log", "thingraft-transport-common"]),
        ),
        (
            "thingraft-transport-coap",
            BTreeSet::from(["thingraft-proto", "thingraft-log", "thingraft-transport-common"]),
        ),
        (
            "thingraft-transport-http",
            BTreeSet::from(["thingraft-proto", "thingraft-log", "thingraft-transport-common"]),
        ),
        (
            "thingraft",
            BTreeSet::from([
                "thingraft-proto",
                "thingraft-log",
                "thingraft-engine",
                "thingraft-transport-common",
                "thingraft-transport-mqtt",
                "thingraft-transport-http",
                "thingraft-transport-coap",
            ]),
        ),
        (
            "thingraft-tests",
            BTreeSet::from([
                "thingraft-proto",
                "thingraft-log",
                "thingraft-engine",
                "thingraft-transport-mqtt",
            ]),
        ),
    ])
}

#[test]
fn workspace_dependency_arrows_follow_the_layout_table() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        // The runtime value: a test binary reused from another checkout (a shared target
        // directory) still inspects the workspace it runs in.
        .current_dir(
            std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
        )
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let allowed = allowed();
    let members: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    for name in &members {
        assert!(
            allowed.contains_key(name.as_str()),
            "crate {name} is not in the layout table of this test"
        );
    }
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        for d in p["dependencies"].as_array().unwrap() {
            let dep = d["name"].as_str().unwrap();
            if members.contains(dep) {
                assert!(
                    allowed[name].contains(dep),
                    "{name} must not depend on {dep} (see DESIGN.md's layout table)"
                );
            }
        }
    }
}
