//! Devices and their credentials.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use thingraft_engine::ota::OtaKind;
use thingraft_engine::registry::{Authority, Credentials, Device, NewDevice, Registry, RegistryError};
use uuid::Uuid;

use super::auth::ApiError;
use super::{AppState, Caller, entity_id};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/device", post(save_device))
        .route("/api/device/{id}", get(get_device).delete(delete_device))
        .route("/api/device/{id}/credentials", get(get_credentials))
        .route("/api/device/credentials", post(update_credentials))
        .route("/api/tenant/devices", get(tenant_devices))
        .route("/api/tenant/device", get(tenant_device))
        .route("/api/customer/{customer_id}/devices", get(customer_devices))
}

pub fn device_json(registry: &Registry, d: &Device) -> Value {
    let info: Value = serde_json::from_str(&d.additional_info).unwrap_or(Value::Null);
    let transport = registry
        .device_transport(d.id)
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or_else(|| json!({"type": "DEFAULT"}));
    json!({
        "id": entity_id("DEVICE", d.id),
        "createdTime": d.created_ms,
        "tenantId": entity_id("TENANT", d.tenant_id),
        "customerId": entity_id("CUSTOMER", d.customer_id),
        "name": d.name,
        "type": d.device_type,
        "label": d.label,
        "deviceProfileId": entity_id("DEVICE_PROFILE", d.profile_id),
        "deviceData": {"configuration": {"type": "DEFAULT"}, "transportConfiguration": transport},
        "firmwareId": null,
        "softwareId": null,
        "externalId": null,
        "additionalInfo": info,
        "version": d.version,
    })
}

fn credentials_json(c: &Credentials) -> Value {
    json!({
        "id": {"id": c.id.to_string()},
        "createdTime": c.created_ms,
        "deviceId": entity_id("DEVICE", c.device_id),
        "credentialsType": c.kind.as_str(),
        "credentialsId": c.credentials_id,
        "credentialsValue": c.value,
        "version": c.version,
    })
}

pub(super) fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::Conflict(m) | RegistryError::Invalid(m) => ApiError::bad_request(m),
        RegistryError::NotFound(m) => ApiError::not_found(m),
        RegistryError::Log(e) => {
            tracing::warn!(error = %e, "registry write failed");
            ApiError::status(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster unavailable: {e}"),
                2,
            )
        }
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::bad_request(format!("Invalid UUID string: {s}")))
}

/// A device body's `deviceData.transportConfiguration`, as it is kept: `None` for DEFAULT (or
/// none given); for COAP, its power-saving settings, which take the place of the profile's
/// `clientSettings` for this device when `powerMode` is set. 400 for a type that is not built
/// (LWM2M, SNMP) or a setting that is not valid.
fn device_transport(body: &Value) -> Result<Option<String>, ApiError> {
    let Some(t) = body
        .get("deviceData")
        .and_then(|d| d.get("transportConfiguration"))
        .filter(|t| !t.is_null())
    else {
        return Ok(None);
    };
    match t.get("type").and_then(Value::as_str) {
        None | Some("DEFAULT") => Ok(None),
        Some("MQTT") => Ok(Some(json!({"type": "MQTT"}).to_string())),
        Some("COAP") => {
            let mut kept = json!({"type": "COAP", "powerMode": null});
            match t.get("powerMode") {
                None | Some(Value::Null) => {}
                Some(Value::String(m)) if ["PSM", "DRX", "E_DRX"].contains(&m.as_str()) => {
                    kept["powerMode"] = json!(m);
                }
                Some(m) => {
                    return Err(ApiError::bad_request(format!(
                        "Invalid power mode {m}: expected PSM, DRX or E_DRX"
                    )));
                }
            }
            for k in ["psmActivityTimer", "edrxCycle", "pagingTransmissionWindow"] {
                match t.get(k) {
                    None | Some(Value::Null) => {}
                    Some(v) if v.as_u64().is_some() => kept[k] = v.clone(),
                    Some(v) => {
                        return Err(ApiError::bad_request(format!(
                            "Invalid {k} {v}: expected milliseconds"
                        )));
                    }
                }
            }
            Ok(Some(kept.to_string()))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "Device transport configuration {other} is not supported"
        ))),
    }
}

fn json_body(body: Result<Json<Value>, JsonRejection>) -> Result<Value, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

async fn save_device(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant_admin()?;
    let body = json_body(body)?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Device name should be specified!"))?;
    let transport = device_transport(&body)?;
    if let Some(id) = body.get("id").and_then(|v| v.get("id")).and_then(Value::as_str) {
        // An update: name, label, additionalInfo, the transport configuration, and the OTA
        // packages assigned.
        let current = caller.device(&state, parse_uuid(id)?)?;
        let packages = super::ota::assignable_in(&state, &caller, &body, Some(current.profile_id))?;
        let device = state
            .engine
            .registry
            .update_device(
                current.id,
                name,
                body.get("label").and_then(Value::as_str).map(str::to_string),
                body.get("additionalInfo")
                    .filter(|v| !v.is_null())
                    .map(Value::to_string),
                transport,
            )
            .await
            .map_err(registry_error)?;
        for p in &packages {
            super::ota::assign(&state, &device, p).await?;
        }
        tracing::info!(device = %device.id, name = %device.name, "device updated");
        return Ok(Json(device_json_with_ota(&state, &device)));
    }
    let profile_id = match body
        .get("deviceProfileId")
        .and_then(|v| v.get("id"))
        .and_then(Value::as_str)
    {
        Some(s) => Some(parse_uuid(s)?),
        None => None,
    };
    let device_type = body.get("type").and_then(Value::as_str).map(str::to_string);
    // The profile the device will have, for checking its packages before anything is written
    // (`None`: one its type creates).
    let registry = &state.engine.registry;
    let profile = match (profile_id, &device_type) {
        (Some(id), _) => Some(id),
        (None, Some(t)) if !t.is_empty() => registry.profile_by_name(caller.tenant_id, t).map(|p| p.id),
        _ => registry.default_profile(caller.tenant_id).map(|p| p.id),
    };
    let packages = super::ota::assignable_in(&state, &caller, &body, profile)?;
    let new = NewDevice {
        tenant_id: caller.tenant_id,
        customer_id: None,
        name: name.to_string(),
        device_type,
        label: body.get("label").and_then(Value::as_str).map(str::to_string),
        profile_id,
        additional_info: body
            .get("additionalInfo")
            .filter(|v| !v.is_null())
            .map(Value::to_string),
        access_token: q.get("accessToken").cloned(),
        transport,
    };
    let (device, _) = state
        .engine
        .registry
        .create_device(new)
        .await
        .map_err(registry_error)?;
    for p in &packages {
        super::ota::assign(&state, &device, p).await?;
    }
    state.engine.push_profile_ota(&device).await;
    tracing::info!(device = %device.id, name = %device.name, "device created");
    Ok(Json(device_json_with_ota(&state, &device)))
}

/// [`device_json`] with the OTA packages assigned to the device.
fn device_json_with_ota(state: &AppState, d: &Device) -> Value {
    let mut v = device_json(&state.engine.registry, d);
    for (field, kind) in [
        ("firmwareId", OtaKind::Firmware),
        ("softwareId", OtaKind::Software),
    ] {
        // The device's own package; one it follows from its profile shows on the profile.
        if let Some(p) = state.engine.registry.device_own_ota(d.id, kind) {
            v[field] = entity_id("OTA_PACKAGE", p.id);
        }
    }
    v
}

/// The packages a device body names in `firmwareId` / `softwareId`.
async fn get_device(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let d = caller.device(&state, parse_uuid(&id)?)?;
    Ok(Json(device_json_with_ota(&state, &d)))
}

async fn delete_device(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(), ApiError> {
    caller.require_tenant_admin()?;
    let d = caller.device(&state, parse_uuid(&id)?)?;
    state
        .engine
        .registry
        .delete_device(d.id)
        .await
        .map_err(registry_error)?;
    tracing::info!(device = %d.id, "device deleted");
    Ok(())
}

async fn get_credentials(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let d = caller.device(&state, parse_uuid(&id)?)?;
    let c = state
        .engine
        .registry
        .credentials(d.id)
        .ok_or_else(|| ApiError::not_found("Device credentials are not found"))?;
    Ok(Json(credentials_json(&c)))
}

async fn update_credentials(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant_admin()?;
    let body = json_body(body)?;
    let device_id = body
        .get("deviceId")
        .and_then(|v| v.get("id"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("deviceId should be specified!"))?;
    let d = caller.device(&state, parse_uuid(device_id)?)?;
    match body.get("credentialsType").and_then(Value::as_str) {
        Some("ACCESS_TOKEN") | None => {}
        Some("MQTT_BASIC") => {
            // ThingsBoard sends the value as JSON text; accept an object too.
            let v = match body.get("credentialsValue") {
                Some(Value::String(t)) => serde_json::from_str::<Value>(t)
                    .map_err(|_| ApiError::bad_request("Invalid credentials body for mqtt credentials!"))?,
                Some(v @ Value::Object(_)) => v.clone(),
                _ => {
                    return Err(ApiError::bad_request(
                        "Invalid credentials body for mqtt credentials!",
                    ));
                }
            };
            let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let c = state
                .engine
                .registry
                .update_basic(d.id, &field("clientId"), &field("userName"), &field("password"))
                .await
                .map_err(registry_error)?;
            return Ok(Json(credentials_json(&c)));
        }
        Some("X509_CERTIFICATE") => {
            let pem = body
                .get("credentialsValue")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("Invalid credentials body for X509 credentials!"))?;
            let c = state
                .engine
                .registry
                .update_x509(d.id, pem)
                .await
                .map_err(registry_error)?;
            return Ok(Json(credentials_json(&c)));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "credentials type {other} is not supported yet"
            )));
        }
    }
    let token = body
        .get("credentialsId")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Device credentials id should be specified!"))?;
    let c = state
        .engine
        .registry
        .update_token(d.id, token.to_string())
        .await
        .map_err(registry_error)?;
    Ok(Json(credentials_json(&c)))
}

fn visible(caller: &Caller, d: &Device) -> bool {
    d.tenant_id == caller.tenant_id
        && (caller.authority == Authority::TenantAdmin || d.customer_id == caller.customer_id)
}

/// `GET /api/tenant/devices?pageSize&page&type&textSearch&sortOrder` (or `?deviceName=`):
/// the tenant's devices, for its administrators (ThingsBoard: TENANT_ADMIN only).
async fn tenant_devices(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant_admin()?;
    if let Some(name) = q.get("deviceName") {
        // tb-rest-client 3.x asks for one device by name on this path.
        return tenant_device_by_name(&state, &caller, name).map(Json);
    }
    device_page(&state, &caller, &q, |_| true).map(Json)
}

/// `GET /api/customer/{customerId}/devices?pageSize&page&...`: the devices assigned to a
/// customer, for the tenant's administrators and for that customer's users.
async fn customer_devices(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant()?;
    let customer = parse_uuid(&customer_id)?;
    if caller.authority == Authority::CustomerUser && customer != caller.customer_id {
        return Err(ApiError::forbidden(
            "You don't have permission to perform this operation!",
        ));
    }
    device_page(&state, &caller, &q, |d| d.customer_id == customer).map(Json)
}

/// One page of the caller's visible devices that `keep` accepts, narrowed and ordered by the
/// query (ThingsBoard's `PageData`).
fn device_page(
    state: &AppState,
    caller: &Caller,
    q: &HashMap<String, String>,
    keep: impl Fn(&Device) -> bool,
) -> Result<Value, ApiError> {
    let page_size: usize = q
        .get("pageSize")
        .map(|s| {
            s.parse()
                .map_err(|_| ApiError::bad_request("pageSize must be a number"))
        })
        .transpose()?
        .unwrap_or(10);
    let page: usize = q
        .get("page")
        .map(|s| {
            s.parse()
                .map_err(|_| ApiError::bad_request("page must be a number"))
        })
        .transpose()?
        .unwrap_or(0);
    if page_size == 0 {
        return Err(ApiError::bad_request("pageSize must be positive"));
    }
    let text = q.get("textSearch").map(|s| s.to_lowercase());
    let dtype = q.get("type").filter(|t| !t.is_empty());
    const LISTED_MAX: usize = 1_000_000;
    let mut all: Vec<Device> = state
        .engine
        .registry
        .devices(caller.tenant_id, LISTED_MAX)
        .into_iter()
        .filter(|d| visible(caller, d) && keep(d))
        .filter(|d| dtype.is_none_or(|t| &d.device_type == t))
        .filter(|d| {
            text.as_ref()
                .is_none_or(|t| d.name.to_lowercase().contains(t.as_str()))
        })
        .collect();
    if q.get("sortOrder").is_some_and(|o| o.eq_ignore_ascii_case("DESC")) {
        all.reverse();
    }
    let total = all.len();
    let data: Vec<Value> = all
        .iter()
        .skip(page.saturating_mul(page_size))
        .take(page_size)
        .map(|d| device_json(&state.engine.registry, d))
        .collect();
    let total_pages = total.div_ceil(page_size);
    Ok(json!({
        "data": data,
        "totalPages": total_pages,
        "totalElements": total,
        "hasNext": (page + 1) < total_pages,
    }))
}

fn tenant_device_by_name(state: &AppState, caller: &Caller, name: &str) -> Result<Value, ApiError> {
    let d = state
        .engine
        .registry
        .device_by_name(caller.tenant_id, name)
        .filter(|d| visible(caller, d))
        .ok_or_else(|| ApiError::not_found(format!("Device with name [{name}] is not found")))?;
    Ok(device_json(&state.engine.registry, &d))
}

async fn tenant_device(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    // ThingsBoard: TENANT_ADMIN only.
    caller.require_tenant_admin()?;
    let name = q
        .get("deviceName")
        .ok_or_else(|| ApiError::bad_request("Required request parameter 'deviceName' is not present"))?;
    tenant_device_by_name(&state, &caller, name).map(Json)
}
