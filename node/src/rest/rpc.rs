//! Server-side RPC: `/api/plugins/rpc/...` (v1) and `/api/rpc/...` (v2), and persistent RPC
//! status.
//!
//! The REST call appends the request to the device's partition; the partition's leader
//! delivers it to the device wherever it is connected and records what happened; this node
//! waits for its own replica to show the outcome. So the answer is the same whichever node the
//! caller and the device are connected to.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use thingraft_engine::store::RpcState;
use thingraft_proto::records::{Ingest, IngestMsg, RpcStatus};
use uuid::Uuid;

use super::auth::{ApiError, unix_now_ms};
use super::{AppState, Caller, entity_id};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/plugins/rpc/{kind}/{device_id}", post(rpc_v1))
        .route("/api/rpc/{kind}/{device_id}", post(rpc_v2))
        .route(
            "/api/rpc/persistent/{rpc_id}",
            get(get_persistent).delete(delete_persistent),
        )
        .route("/api/rpc/persistent/device/{device_id}", get(list_persistent))
}

const TIMEOUT_DEFAULT_MS: i64 = 10_000;
const TIMEOUT_MIN_MS: i64 = 5_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    V1,
    V2,
}

async fn rpc_v1(
    state: State<AppState>,
    caller: Caller,
    path: Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    rpc(state, caller, path, body, Api::V1).await
}

async fn rpc_v2(
    state: State<AppState>,
    caller: Caller,
    path: Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    rpc(state, caller, path, body, Api::V2).await
}

async fn rpc(
    State(state): State<AppState>,
    caller: Caller,
    Path((kind, device_id)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
    api: Api,
) -> Result<Response, ApiError> {
    let oneway = match kind.as_str() {
        "oneway" => true,
        "twoway" => false,
        other => return Err(ApiError::not_found(format!("unknown RPC kind {other}"))),
    };
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = Uuid::parse_str(&device_id)
        .map_err(|_| ApiError::bad_request(format!("Invalid UUID string: {device_id}")))?;
    let device = caller.device(&state, id)?;
    let method = body
        .get("method")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("RPC method should be specified!"))?
        .to_string();
    let params = body.get("params").cloned().unwrap_or(Value::Null).to_string();
    let timeout_ms = body
        .get("timeout")
        .and_then(Value::as_i64)
        .unwrap_or(TIMEOUT_DEFAULT_MS)
        .max(TIMEOUT_MIN_MS);
    let now = unix_now_ms();
    let expiration_ms = body
        .get("expirationTime")
        .and_then(Value::as_i64)
        .filter(|e| *e > now)
        .unwrap_or(now + timeout_ms);
    let persistent = body.get("persistent").and_then(Value::as_bool).unwrap_or(false);
    let uuid = match body.get("requestUUID").and_then(Value::as_str) {
        Some(s) => {
            Uuid::parse_str(s).map_err(|_| ApiError::bad_request(format!("Invalid UUID string: {s}")))?
        }
        None => Uuid::new_v4(),
    };
    // A request UUID names one RPC: the shard ignores a second request under it, so one of
    // another device (perhaps another tenant's) must not be answered here as if it were this one.
    let taken = state
        .engine
        .store
        .rpc(uuid.as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if taken.is_some_and(|r| r.device != *device.id.as_bytes()) {
        return Err(ApiError::bad_request(format!(
            "requestUUID {uuid} is already used by another RPC"
        )));
    }
    let ingest = Ingest {
        tenant: *device.tenant_id.as_bytes(),
        device: *device.id.as_bytes(),
        ts_ms: now,
        session: None,
        msg: IngestMsg::RpcRequest {
            uuid: *uuid.as_bytes(),
            method,
            params,
            oneway,
            persistent,
            expiration_ms,
        },
    };
    let appended = state.engine.submit(&ingest).await.map_err(|e| {
        tracing::warn!(error = %e, "RPC request not committed");
        ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("RPC not committed: {e}"),
            2,
        )
    })?;
    if persistent {
        // Answered once this replica has recorded it, so that its status reads back at once
        // (ThingsBoard answers after saving it).
        if !state
            .engine
            .wait_applied(
                device.id.as_bytes(),
                appended.first_offset,
                std::time::Duration::from_secs(5),
            )
            .await
        {
            tracing::warn!(device = %device.id, "persistent RPC committed but not applied here within 5 s");
        }
        return Ok(Json(json!({"rpcId": uuid.to_string()})).into_response());
    }
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_millis((expiration_ms - now).max(0) as u64);
    let r = state
        .engine
        .wait_rpc(device.id.as_bytes(), uuid.as_bytes(), deadline, |r| {
            // ThingsBoard answers a one-way RPC as soon as it is sent.
            r.status.is_final() || (oneway && matches!(r.status, RpcStatus::Sent | RpcStatus::Delivered))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let status = r.as_ref().map(|r| r.status).unwrap_or(RpcStatus::Queued);
    match status {
        RpcStatus::Successful if !oneway => {
            let text = r.and_then(|r| r.response).unwrap_or_default();
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => Ok(Json(v).into_response()),
                Err(_) => Err(ApiError::status(
                    StatusCode::NOT_ACCEPTABLE,
                    "Response is not valid JSON",
                    2,
                )),
            }
        }
        RpcStatus::Sent | RpcStatus::Delivered | RpcStatus::Successful if oneway => {
            Ok(StatusCode::OK.into_response())
        }
        // Sent but unanswered in time: a timeout. Never sent: no active connection.
        RpcStatus::Delivered | RpcStatus::Sent | RpcStatus::Timeout => Err(match api {
            Api::V1 => ApiError::status(StatusCode::REQUEST_TIMEOUT, "Request timeout", 2),
            Api::V2 => ApiError::status(StatusCode::GATEWAY_TIMEOUT, "Request timeout", 2),
        }),
        _ => Err(match api {
            Api::V1 => ApiError::status(StatusCode::CONFLICT, "Device is offline", 2),
            Api::V2 => ApiError::status(StatusCode::GATEWAY_TIMEOUT, "Device is offline", 2),
        }),
    }
}

fn rpc_json(r: &RpcState) -> Value {
    let uuid = Uuid::from_bytes(r.uuid);
    let params: Value = serde_json::from_str(&r.params).unwrap_or(Value::Null);
    let response: Value = r
        .response
        .as_deref()
        .map(|t| serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_string())))
        .unwrap_or(Value::Null);
    json!({
        "id": entity_id("RPC", uuid),
        "createdTime": r.created_ms,
        "tenantId": entity_id("TENANT", Uuid::from_bytes(r.tenant)),
        "deviceId": entity_id("DEVICE", Uuid::from_bytes(r.device)),
        "expirationTime": r.expiration_ms,
        "request": {"id": uuid.to_string(), "oneway": r.oneway, "body": {"method": r.method, "params": params}},
        "response": response,
        "status": r.status.as_str(),
        "additionalInfo": null,
    })
}

fn visible_rpc(state: &AppState, caller: &Caller, rpc_id: &str) -> Result<RpcState, ApiError> {
    let uuid = Uuid::parse_str(rpc_id)
        .map_err(|_| ApiError::bad_request(format!("Invalid UUID string: {rpc_id}")))?;
    let r = state
        .engine
        .store
        .rpc(uuid.as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?
        // A deleted RPC is gone, as in ThingsBoard (the record stays, for the log's replicas).
        .filter(|r| r.status != RpcStatus::Deleted)
        .ok_or_else(|| ApiError::not_found(format!("Rpc with id [{rpc_id}] is not found")))?;
    // Checks the caller may see the device the RPC was for.
    caller.device(state, Uuid::from_bytes(r.device))?;
    Ok(r)
}

async fn get_persistent(
    State(state): State<AppState>,
    caller: Caller,
    Path(rpc_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(rpc_json(&visible_rpc(&state, &caller, &rpc_id)?)))
}

async fn delete_persistent(
    State(state): State<AppState>,
    caller: Caller,
    Path(rpc_id): Path<String>,
) -> Result<(), ApiError> {
    // ThingsBoard: TENANT_ADMIN only.
    caller.require_tenant_admin()?;
    let r = visible_rpc(&state, &caller, &rpc_id)?;
    let ingest = Ingest {
        tenant: r.tenant,
        device: r.device,
        ts_ms: unix_now_ms(),
        session: None,
        msg: IngestMsg::RpcStatus {
            uuid: r.uuid,
            status: RpcStatus::Deleted,
        },
    };
    let appended = state
        .engine
        .submit(&ingest)
        .await
        .map_err(|e| ApiError::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), 2))?;
    // Answered once this replica has applied it, so that a read right after finds it gone
    // (ThingsBoard answers after deleting it).
    if !state
        .engine
        .wait_applied(
            &r.device,
            appended.first_offset,
            std::time::Duration::from_secs(5),
        )
        .await
    {
        tracing::warn!(rpc = %Uuid::from_bytes(r.uuid), "RPC deletion committed but not applied here within 5 s");
    }
    Ok(())
}

async fn list_persistent(
    State(state): State<AppState>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&device_id)
        .map_err(|_| ApiError::bad_request(format!("Invalid UUID string: {device_id}")))?;
    let d = caller.device(&state, id)?;
    let page_size: usize = q
        .get("pageSize")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .max(1);
    let page: usize = q.get("page").and_then(|s| s.parse().ok()).unwrap_or(0);
    let want = q.get("rpcStatus").map(|s| s.to_uppercase());
    let all: Vec<RpcState> = state
        .engine
        .store
        .rpcs_of(d.id.as_bytes(), 100_000)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .into_iter()
        .filter(|r| r.persistent && r.status != RpcStatus::Deleted)
        .filter(|r| want.as_ref().is_none_or(|w| r.status.as_str() == w))
        .collect();
    let total = all.len();
    let data: Vec<Value> = all
        .iter()
        .skip(page * page_size)
        .take(page_size)
        .map(rpc_json)
        .collect();
    let pages = total.div_ceil(page_size);
    Ok(Json(
        json!({"data": data, "totalPages": pages, "totalElements": total, "hasNext": page + 1 < pages}),
    ))
}
