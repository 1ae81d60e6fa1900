//! Entity relations through ThingsBoard's relation API, and the `Created` relation a gateway
//! gets to each child device it brings (`v1/gateway/connect` with `mosquitto_pub`).

use std::time::Duration;

use serde_json::{Value, json};
use thingraft_tests::{ProcCluster, Rest, mosquitto_pub};

const TENANT: (&str, &str) = ("tenant@thingsboard.org", "tenant");
const CUSTOMER: (&str, &str) = ("customer@thingsboard.org", "customer");

fn dev(id: &str) -> Value {
    json!({"entityType": "DEVICE", "id": id})
}

fn relations(rest: &Rest, query: &str) -> anyhow::Result<Vec<Value>> {
    let (code, v) = rest.call("GET", &format!("/api/relations?{query}"), None)?;
    anyhow::ensure!(code == 200, "relations?{query}: {code} {v}");
    Ok(v.as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_are_saved_listed_deleted_and_made_for_gateway_children() -> anyhow::Result<()> {
    let c = ProcCluster::start(1, 4).await?;
    let tenant = Rest::login(&c.http[&1], TENANT.0, TENANT.1).await?;
    let customer = Rest::login(&c.http[&1], CUSTOMER.0, CUSTOMER.1).await?;
    let a = tenant.create_device("Room 1", "ROOM1")?;
    let b = tenant.create_device("Lamp 1", "LAMP1")?;

    let rel = json!({"from": dev(&a), "to": dev(&b), "type": "Contains", "typeGroup": "COMMON"});
    let (code, body) = tenant.call("POST", "/api/relation", Some(&rel.to_string()))?;
    assert_eq!(code, 200, "{body}");
    let one =
        format!("/api/relation?fromId={a}&fromType=DEVICE&relationType=Contains&toId={b}&toType=DEVICE");
    let (code, got) = tenant.call("GET", &one, None)?;
    assert_eq!(code, 200, "{got}");
    assert_eq!(
        got,
        json!({"from": dev(&a), "to": dev(&b), "type": "Contains", "typeGroup": "COMMON", "additionalInfo": null})
    );
    assert_eq!(
        relations(&tenant, &format!("fromId={a}&fromType=DEVICE"))?,
        vec![got.clone()]
    );
    assert_eq!(
        relations(&tenant, &format!("toId={b}&toType=DEVICE"))?,
        vec![got.clone()]
    );
    assert!(
        relations(
            &tenant,
            &format!("fromId={a}&fromType=DEVICE&relationType=Manages")
        )?
        .is_empty()
    );
    assert!(relations(&tenant, &format!("fromId={b}&fromType=DEVICE"))?.is_empty());

    // Bad input: ThingsBoard's statuses, and nothing stored.
    let missing = uuid_like();
    let cases = [
        (json!({"from": dev(&a), "to": dev(&b)}), 400),
        (
            json!({"from": dev(&a), "to": dev(&b), "type": "X", "typeGroup": "NOPE"}),
            400,
        ),
        (json!({"from": dev(&a), "to": dev(&missing), "type": "X"}), 404),
        (
            json!({"from": dev(&a), "to": {"entityType": "DEVICE", "id": "not-a-uuid"}, "type": "X"}),
            400,
        ),
        (
            json!({"from": dev(&a), "to": {"entityType": "ASSET", "id": missing}, "type": "X"}),
            400,
        ),
    ];
    for (body, want) in cases {
        let (code, v) = tenant.call("POST", "/api/relation", Some(&body.to_string()))?;
        assert_eq!(code, want, "{body} → {v}");
        assert_eq!(v["status"], want, "ThingsBoard's error envelope: {v}");
    }
    let (code, _) = tenant.call("POST", "/api/relation", Some("{not json"))?;
    assert_eq!(code, 400);
    // A customer user may not create relations.
    assert_eq!(
        customer.call("POST", "/api/relation", Some(&rel.to_string()))?.0,
        403
    );
    // A customer user listing from the tenant sees none of the tenant's devices that are not its
    // customer's.
    let (_, device) = tenant.call("GET", &format!("/api/device/{a}"), None)?;
    let tenant_id = device["tenantId"]["id"].as_str().expect("tenant id").to_string();
    let owns = json!({"from": {"entityType": "TENANT", "id": tenant_id}, "to": dev(&b), "type": "Owns"});
    assert_eq!(
        tenant.call("POST", "/api/relation", Some(&owns.to_string()))?.0,
        200
    );
    let from_tenant = format!("fromId={tenant_id}&fromType=TENANT&relationType=Owns");
    assert_eq!(relations(&tenant, &from_tenant)?.len(), 1);
    assert!(relations(&customer, &from_tenant)?.is_empty());
    let owns_one = format!("/api/relation?{from_tenant}&toId={b}&toType=DEVICE");
    assert_eq!(tenant.call("DELETE", &owns_one, None)?.0, 200);
    assert_eq!(tenant.call("GET", "/api/relations?fromType=DEVICE", None)?.0, 400);
    assert_eq!(
        relations(&tenant, &format!("fromId={a}&fromType=DEVICE"))?.len(),
        1
    );

    // Deleted once; then 404.
    assert_eq!(tenant.call("DELETE", &one, None)?.0, 200);
    assert_eq!(tenant.call("GET", &one, None)?.0, 404);
    assert_eq!(tenant.call("DELETE", &one, None)?.0, 404);
    assert!(relations(&tenant, &format!("toId={b}&toType=DEVICE"))?.is_empty());

    // Deleting a device deletes its relations.
    assert_eq!(
        tenant.call("POST", "/api/relation", Some(&rel.to_string()))?.0,
        200
    );
    assert_eq!(tenant.call("DELETE", &format!("/api/device/{b}"), None)?.0, 200);
    assert!(relations(&tenant, &format!("fromId={a}&fromType=DEVICE"))?.is_empty());

    // A gateway's child devices: related to it by `Created`.
    let body = json!({"name": "Gateway R", "additionalInfo": {"gateway": true}}).to_string();
    let (code, gw) = tenant.call("POST", "/api/device?accessToken=GWR_TOKEN", Some(&body))?;
    assert_eq!(code, 200, "{gw}");
    let gw = gw["id"]["id"].as_str().expect("gateway id").to_string();
    for child in ["Child R1", "Child R2"] {
        let rc = mosquitto_pub(
            &c.mqtt[&1],
            &[
                "-q",
                "1",
                "-u",
                "GWR_TOKEN",
                "-t",
                "v1/gateway/connect",
                "-m",
                &json!({"device": child}).to_string(),
            ],
        )?;
        assert_eq!(rc, 0);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let created = loop {
        let found = relations(&tenant, &format!("fromId={gw}&fromType=DEVICE"))?;
        if found.len() == 2 || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut children: Vec<String> = Vec::new();
    for r in &created {
        assert_eq!(
            (r["type"].clone(), r["typeGroup"].clone()),
            (json!("Created"), json!("COMMON"))
        );
        let id = r["to"]["id"].as_str().expect("child id");
        let (_, d) = tenant.call("GET", &format!("/api/device/{id}"), None)?;
        children.push(d["name"].as_str().unwrap_or_default().to_string());
    }
    children.sort();
    assert_eq!(children, ["Child R1", "Child R2"]);
    Ok(())
}

/// A UUID no entity has.
fn uuid_like() -> String {
    "1d7c2a8e-0000-4000-8000-00000000beef".to_string()
}
