//! Device profiles: create, update, get, the default one; with their provisioning settings
//! (ThingsBoard's `provisionType`, `provisionDeviceKey` and
//! `profileData.provisionConfiguration.provisionDeviceSecret`), and their transport
//! configuration (MQTT or CoAP, with JSON or protobuf payloads).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use thingraft_engine::ota::OtaKind;
use thingraft_engine::registry::{DeviceProfile, Provision, ProvisionType};
use thingraft_transport_common::proto_payload;
use uuid::Uuid;

use super::auth::ApiError;
use super::devices::registry_error;
use super::{AppState, Caller, entity_id};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/deviceProfile", post(save_profile))
        .route("/api/deviceProfile/{id}", get(get_profile))
        .route("/api/deviceProfileInfo/default", get(default_profile_info))
}

fn profile_info_json(p: &DeviceProfile) -> Value {
    json!({
        "id": entity_id("DEVICE_PROFILE", p.id),
        "tenantId": entity_id("TENANT", p.tenant_id),
        "name": p.name,
        "image": null,
        "defaultDashboardId": null,
        "type": "DEFAULT",
        "transportType": "DEFAULT",
    })
}

/// A profile's `transportConfiguration` as stored, or ThingsBoard's DEFAULT one.
fn transport_json(state: &AppState, p: &DeviceProfile) -> Value {
    state
        .engine
        .registry
        .profile_transport(p.id)
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({"type": "DEFAULT"}))
}

/// The transport configuration of a profile body: `None` for DEFAULT; MQTT (its topic filters
/// checked) or
/// COAP (DEFAULT device type) with JSON or PROTOBUF payloads, whose schemas are compiled here so
/// that a bad one is this request's 400, not a device's error later. The text kept is the
/// object as given.
fn transport_of(body: &Value) -> Result<Option<String>, ApiError> {
    let t = &body["profileData"]["transportConfiguration"];
    let kind = t["type"]
        .as_str()
        .or_else(|| body["transportType"].as_str())
        .unwrap_or("DEFAULT");
    match kind {
        "DEFAULT" => return Ok(None),
        "MQTT" => {
            for field in [
                "deviceTelemetryTopic",
                "deviceAttributesTopic",
                "deviceAttributesSubscribeTopic",
            ] {
                match &t[field] {
                    // Blank means the default topic, as in ThingsBoard.
                    Value::Null => {}
                    Value::String(topic) if topic.trim().is_empty() => {}
                    Value::String(topic) if thingraft_transport_common::valid_topic_filter(topic) => {}
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "Invalid MQTT topic filter {other} in {field}"
                        )));
                    }
                }
            }
        }
        "COAP" => {
            let device_type = t["coapDeviceTypeConfiguration"]["coapDeviceType"]
                .as_str()
                .unwrap_or("DEFAULT");
            if device_type != "DEFAULT" {
                return Err(ApiError::bad_request(format!(
                    "CoAP device type {device_type} is not supported"
                )));
            }
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "Device profile transport type {other} is not supported"
            )));
        }
    }
    let mut t = t.clone();
    t["type"] = json!(kind);
    if let Some((transport, _)) = proto_payload::payload_config(&t) {
        proto_payload::schemas_for(&t, transport).map_err(|e| ApiError::bad_request(e.0))?;
    }
    Ok(Some(t.to_string()))
}

fn profile_json(p: &DeviceProfile) -> Value {
    let mut provision = json!({"type": p.provision.kind.as_str()});
    if let Some(secret) = &p.provision.secret {
        provision["provisionDeviceSecret"] = json!(secret);
    }
    json!({
        "id": entity_id("DEVICE_PROFILE", p.id),
        "tenantId": entity_id("TENANT", p.tenant_id),
        "name": p.name,
        "description": p.description,
        "default": p.is_default,
        "createdTime": p.created_ms,
        "type": "DEFAULT",
        "transportType": "DEFAULT",
        "provisionType": p.provision.kind.as_str(),
        "provisionDeviceKey": p.provision.key,
        "profileData": {
            "configuration": {"type": "DEFAULT"},
            "transportConfiguration": {"type": "DEFAULT"},
            "provisionConfiguration": provision,
        },
    })
}

/// The provisioning settings of a profile body, in either of ThingsBoard's places.
fn provision_of(body: &Value) -> Result<Provision, ApiError> {
    let conf = &body["profileData"]["provisionConfiguration"];
    let kind = body["provisionType"]
        .as_str()
        .or_else(|| conf["type"].as_str())
        .unwrap_or("DISABLED");
    let kind = ProvisionType::parse(kind)
        .ok_or_else(|| ApiError::bad_request(format!("Unknown provision type {kind}")))?;
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(String::from);
    Ok(Provision {
        kind,
        key: text(&body["provisionDeviceKey"]).or_else(|| text(&conf["provisionDeviceKey"])),
        secret: text(&conf["provisionDeviceSecret"]),
    })
}

/// `POST /api/deviceProfile`: creates a profile, or updates the one its `id` names.
async fn save_profile(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant_admin()?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = match body["id"]["id"].as_str() {
        Some(s) => Some(Uuid::parse_str(s).map_err(|_| ApiError::bad_request("Invalid device profile id"))?),
        None => None,
    };
    let name = body["name"].as_str().unwrap_or_default();
    let description = body["description"].as_str().map(String::from);
    let provision = provision_of(&body)?;
    let transport = transport_of(&body)?;
    // Checked before the profile is written, so that a refused package changes nothing.
    let packages = super::ota::assignable_in(&state, &caller, &body, id)?;
    let p = state
        .engine
        .registry
        .save_profile(caller.tenant_id, id, name, description, provision, transport)
        .await
        .map_err(registry_error)?;
    for pkg in &packages {
        super::ota::assign_to_profile(&state, &caller, &p, pkg).await?;
    }
    Ok(Json(profile_json_with_ota(&state, &p)))
}

/// [`profile_json`] with the OTA packages assigned to the profile.
fn profile_json_with_ota(state: &AppState, p: &DeviceProfile) -> Value {
    let mut v = profile_json(p);
    let transport = transport_json(state, p);
    v["transportType"] = transport["type"].clone();
    v["profileData"]["transportConfiguration"] = transport;
    for (field, kind) in [
        ("firmwareId", OtaKind::Firmware),
        ("softwareId", OtaKind::Software),
    ] {
        v[field] = state
            .engine
            .registry
            .profile_ota(p.id, kind)
            .map_or(Value::Null, |pkg| entity_id("OTA_PACKAGE", pkg.id));
    }
    v
}

async fn get_profile(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // ThingsBoard: TENANT_ADMIN only. The profile carries the provisioning key and secret, which
    // let whoever holds them create devices (or take over pre-provisioned ones).
    caller.require_tenant_admin()?;
    let p = caller.profile(&state, &id)?;
    Ok(Json(profile_json_with_ota(&state, &p)))
}

async fn default_profile_info(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant()?;
    let p = state
        .engine
        .registry
        .default_profile(caller.tenant_id)
        .ok_or_else(|| ApiError::not_found("Default device profile is not found"))?;
    let mut info = profile_info_json(&p);
    info["transportType"] = transport_json(&state, &p)["type"].clone();
    Ok(Json(info))
}
