//! OTA packages: create, upload (multipart `file`, as ThingsBoard's UI and clients send it, or
//! the raw bytes), read; assignment to devices goes through the device's `firmwareId` /
//! `softwareId` (see [`assign`]), which sets the `fw_*` / `sw_*` shared attributes that devices
//! watch.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use thingraft_engine::ota::{OtaKind, OtaPackage};
use thingraft_engine::registry::{Device, DeviceProfile};
use thingraft_proto::records::{IngestMsg, Scope};
use uuid::Uuid;

use super::auth::ApiError;
use super::devices::registry_error;
use super::{AppState, Caller, entity_id};

/// Largest package accepted.
const PACKAGE_BYTES_MAX: usize = 64 << 20;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/otaPackage", post(create))
        .route(
            "/api/otaPackage/{id}",
            post(upload)
                .get(info)
                .layer(DefaultBodyLimit::max(PACKAGE_BYTES_MAX + (1 << 20))),
        )
        .route("/api/otaPackage/info/{id}", get(info))
}

pub fn package_json(p: &OtaPackage) -> Value {
    json!({
        "id": entity_id("OTA_PACKAGE", p.id),
        "tenantId": entity_id("TENANT", p.tenant_id),
        "deviceProfileId": p.profile_id.map(|id| entity_id("DEVICE_PROFILE", id)),
        "type": p.kind.as_str(),
        "title": p.title,
        "version": p.version,
        "tag": null,
        "url": null,
        "hasData": p.size.is_some(),
        "fileName": p.file_name,
        "contentType": p.content_type,
        "checksumAlgorithm": p.checksum_algorithm,
        "checksum": p.checksum,
        "dataSize": p.size,
        "createdTime": p.created_ms,
    })
}

fn package_of(state: &AppState, caller: &Caller, id: &str) -> Result<OtaPackage, ApiError> {
    let not_found = || ApiError::not_found(format!("OtaPackage with id [{id}] is not found"));
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    state
        .engine
        .registry
        .ota(uuid)
        .filter(|p| p.tenant_id == caller.tenant_id)
        .ok_or_else(not_found)
}

/// `POST /api/otaPackage` `{"title","version","type":"FIRMWARE"|"SOFTWARE","deviceProfileId"}`.
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant_admin()?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let kind = body["type"].as_str().unwrap_or("FIRMWARE");
    let kind = OtaKind::parse(kind)
        .ok_or_else(|| ApiError::bad_request(format!("Unknown OTA package type {kind}")))?;
    let profile = match body["deviceProfileId"]["id"].as_str() {
        // The caller's own profile only.
        Some(s) => Some(caller.profile(&state, s)?.id),
        None => None,
    };
    let p = state
        .engine
        .registry
        .create_ota(
            caller.tenant_id,
            kind,
            body["title"].as_str().unwrap_or_default(),
            body["version"].as_str().unwrap_or_default(),
            profile,
        )
        .await
        .map_err(registry_error)?;
    Ok(Json(package_json(&p)))
}

async fn info(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant()?;
    Ok(Json(package_json(&package_of(&state, &caller, &id)?)))
}

/// The `file` part of a `multipart/form-data` body: (file name, content type, bytes).
fn multipart_file<'a>(
    content_type: &str,
    body: &'a [u8],
) -> Option<(Option<String>, Option<String>, &'a [u8])> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let mut at = find(body, delim.as_bytes(), 0)? + delim.len();
    loop {
        let head_end = find(body, b"\r\n\r\n", at)?;
        let head = String::from_utf8_lossy(&body[at..head_end]).to_string();
        let start = head_end + 4;
        let next = find(body, format!("\r\n{delim}").as_bytes(), start)?;
        let lower = head.to_ascii_lowercase();
        if lower.contains("name=\"file\"") {
            let file_name = head
                .split("filename=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(String::from);
            let ctype = head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
                .map(|l| l["content-type:".len()..].trim().to_string());
            return Some((file_name, ctype, &body[start..next]));
        }
        at = next + 2 + delim.len();
    }
}

/// `POST /api/otaPackage/{id}?checksumAlgorithm=SHA256`: the package's data.
async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant_admin()?;
    let p = package_of(&state, &caller, &id)?;
    let ctype = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream");
    let (file_name, content_type, data) = if ctype.starts_with("multipart/form-data") {
        multipart_file(ctype, &body)
            .ok_or_else(|| ApiError::bad_request("multipart body without a file part"))?
    } else {
        (q.get("fileName").cloned(), Some(ctype.to_string()), &body[..])
    };
    if data.is_empty() || data.len() > PACKAGE_BYTES_MAX {
        return Err(ApiError::bad_request("OTA package data must be 1 byte to 64 MiB"));
    }
    let algorithm = q.get("checksumAlgorithm").map_or("SHA256", String::as_str);
    let done = state
        .engine
        .registry
        .upload_ota(p.id, file_name, content_type, algorithm, data)
        .await
        .map_err(registry_error)?;
    tracing::info!(package = %done.id, bytes = data.len(), "OTA package uploaded");
    Ok(Json(package_json(&done)))
}

/// A `firmwareId` must name a FIRMWARE package, a `softwareId` a SOFTWARE one.
fn check_kind(p: &OtaPackage, kind: OtaKind) -> Result<(), ApiError> {
    if p.kind == kind {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "The OTA package is {}, not {}",
            p.kind.as_str(),
            kind.as_str()
        )))
    }
}

/// Assigns the package `id` names (a device's `firmwareId` or `softwareId`) to `device`, and
/// sets the shared attributes the device's SDK watches (`fw_title`, `fw_version`, `fw_size`,
/// `fw_checksum`, `fw_checksum_algorithm`; `sw_*` for software).
/// The package `id` names, if it may be assigned as `kind` to a device of (or to) the profile
/// `profile` (`None`: a profile that does not exist yet): the caller's, of that kind, with its
/// data uploaded, and for that profile or for any. Checked before anything is written, so that a
/// refused assignment changes nothing.
pub fn assignable(
    state: &AppState,
    caller: &Caller,
    kind: OtaKind,
    id: &str,
    profile: Option<Uuid>,
) -> Result<OtaPackage, ApiError> {
    let p = package_of(state, caller, id)?;
    check_kind(&p, kind)?;
    if p.attributes().is_none() {
        return Err(ApiError::bad_request("The OTA package has no data yet"));
    }
    if p.profile_id.is_some() && p.profile_id != profile {
        return Err(ApiError::bad_request(
            "The OTA package belongs to a different device profile",
        ));
    }
    Ok(p)
}

/// The packages a device or profile body names (`firmwareId`, `softwareId`), each checked with
/// [`assignable`].
pub fn assignable_in(
    state: &AppState,
    caller: &Caller,
    body: &Value,
    profile: Option<Uuid>,
) -> Result<Vec<OtaPackage>, ApiError> {
    let mut out = Vec::new();
    for (field, kind) in [
        ("firmwareId", OtaKind::Firmware),
        ("softwareId", OtaKind::Software),
    ] {
        if let Some(id) = body.get(field).and_then(|v| v.get("id")).and_then(Value::as_str) {
            out.push(assignable(state, caller, kind, id, profile)?);
        }
    }
    Ok(out)
}

/// Assigns `p` (checked with [`assignable`]) to `device`.
pub async fn assign(state: &AppState, device: &Device, p: &OtaPackage) -> Result<(), ApiError> {
    let Some(values) = p.attributes() else {
        return Err(ApiError::bad_request("The OTA package has no data yet"));
    };
    state
        .engine
        .registry
        .assign_ota(device.id, p)
        .await
        .map_err(registry_error)?;
    super::telemetry::submit(
        state,
        device,
        IngestMsg::SaveAttributes {
            scope: Scope::Shared,
            values,
        },
    )
    .await
}

/// Assigns the package `id` names (a profile's `firmwareId` or `softwareId`) to the device
/// profile `profile`, and sets its attributes on every device of the profile that has no package
/// of that kind of its own (they follow the profile, as in ThingsBoard).
pub async fn assign_to_profile(
    state: &AppState,
    caller: &Caller,
    profile: &DeviceProfile,
    p: &OtaPackage,
) -> Result<(), ApiError> {
    let registry = &state.engine.registry;
    registry
        .assign_profile_ota(profile.id, p)
        .await
        .map_err(registry_error)?;
    let mut updated = 0usize;
    for d in registry.devices(caller.tenant_id, usize::MAX) {
        if d.profile_id != profile.id || registry.device_own_ota(d.id, p.kind).is_some() {
            continue;
        }
        state.engine.push_ota_attributes(&d, p).await.map_err(|e| {
            tracing::warn!(device = %d.id, error = %e, "profile OTA attributes not set");
            super::telemetry::not_committed(&e)
        })?;
        updated += 1;
    }
    tracing::info!(profile = %profile.id, package = %p.id, devices = updated, "OTA package assigned to profile");
    Ok(())
}
