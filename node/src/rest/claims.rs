//! Device claiming, the user side: a customer user claims a device that opened a claim window
//! (`v1/devices/me/claim`, `POST /api/v1/{token}/claim`, ...) with its secret; the device then
//! belongs to the user's customer. `DELETE` gives it back.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use thingraft_engine::registry::{Authority, ClaimRefusal};

use super::auth::ApiError;
use super::devices::{device_json, registry_error};
use super::{AppState, Caller};

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/api/customer/device/{device_name}/claim",
        post(claim).delete(reclaim),
    )
}

/// `POST /api/customer/device/{deviceName}/claim` `{"secretKey":"s"}`: 200
/// `{"device":{..},"response":"SUCCESS"}`, or 400 with `CLAIMED` / `FAILURE`.
async fn claim(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    if caller.authority != Authority::CustomerUser {
        return Err(ApiError::forbidden(
            "You don't have permission to perform this operation!",
        ));
    }
    // The body is optional: a device may claim with an empty secret.
    let secret = match body {
        Ok(Json(v)) => v["secretKey"].as_str().unwrap_or("").to_string(),
        Err(_) => String::new(),
    };
    let result = state
        .engine
        .registry
        .claim_device(caller.tenant_id, &name, caller.customer_id, &secret)
        .await
        .map_err(registry_error)?;
    Ok(match result {
        Ok(d) => {
            tracing::info!(device = %d.name, customer = %caller.customer_id, "device claimed");
            Json(json!({"device": device_json(&state.engine.registry, &d), "response": "SUCCESS"}))
                .into_response()
        }
        Err(refusal) => {
            let response = match refusal {
                ClaimRefusal::Claimed => "CLAIMED",
                ClaimRefusal::Failure => "FAILURE",
            };
            tracing::info!(device = %name, response, "claim refused");
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"device": null, "response": response})),
            )
                .into_response()
        }
    })
}

/// `DELETE /api/customer/device/{deviceName}/claim`: the device leaves its customer.
async fn reclaim(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant()?;
    let registry = &state.engine.registry;
    let d = registry
        .device_by_name(caller.tenant_id, &name)
        .ok_or_else(|| ApiError::not_found(format!("Device with name [{name}] is not found")))?;
    let id = d.id;
    // A customer user may only give back its own customer's devices.
    caller.device(&state, id)?;
    let d = registry.reclaim_device(id).await.map_err(registry_error)?;
    Ok(Json(
        json!({"device": device_json(registry, &d), "response": "SUCCESS"}),
    ))
}
