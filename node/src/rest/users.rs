//! Login, token refresh and the current user (`/api/auth/...`).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use thingraft_engine::registry::{NULL_UUID, User};
use uuid::Uuid;

use super::auth::{self, ApiError, Claims};
use super::{AppState, Caller, entity_id};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/auth/login", post(login))
        .route("/api/auth/token", post(refresh))
        .route("/api/auth/user", get(current_user))
        .route("/api/auth/logout", post(logout))
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Refresh {
    refresh_token: String,
}

fn claims_for(u: &User, scope: &str, ttl_s: i64, session: &str) -> Claims {
    let now = auth::unix_now_s();
    Claims {
        sub: u.email.clone(),
        scopes: vec![scope.to_string()],
        user_id: u.id.to_string(),
        first_name: u.first_name.clone(),
        last_name: u.last_name.clone(),
        enabled: true,
        is_public: false,
        tenant_id: if u.tenant_id.is_nil() {
            NULL_UUID
        } else {
            u.tenant_id
        }
        .to_string(),
        customer_id: u.customer_id.to_string(),
        session_id: session.to_string(),
        iss: auth::ISSUER.into(),
        iat: now,
        exp: now + ttl_s,
    }
}

/// An access and a refresh token of login session `session` (both carry it as `sessionId`, so
/// that a logout revokes both).
fn tokens(state: &AppState, u: &User, session: &str) -> Value {
    let access = auth::encode(
        &claims_for(u, u.authority.as_str(), auth::ACCESS_TOKEN_TTL_S, session),
        &state.secret,
    );
    let refresh = auth::encode(
        &claims_for(u, auth::REFRESH_TOKEN_SCOPE, auth::REFRESH_TOKEN_TTL_S, session),
        &state.secret,
    );
    json!({"token": access, "refreshToken": refresh})
}

async fn login(
    State(state): State<AppState>,
    body: Result<Json<Login>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let user = state.engine.registry.user_by_email(&req.username);
    // Hashing takes tens of milliseconds: keep it off the async workers.
    let ok = match &user {
        Some(u) => {
            let stored = u.password_hash.clone();
            tokio::task::spawn_blocking(move || auth::verify_password(&req.password, &stored))
                .await
                .unwrap_or(false)
        }
        None => false,
    };
    match user {
        Some(u) if ok => Ok(Json(tokens(&state, &u, &Uuid::new_v4().to_string()))),
        _ => {
            tracing::info!(username = %req.username, "login refused");
            Err(ApiError::invalid_credentials())
        }
    }
}

async fn refresh(
    State(state): State<AppState>,
    body: Result<Json<Refresh>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let claims = auth::decode(&req.refresh_token, &state.secret, auth::unix_now_s())?;
    if !claims.scopes.iter().any(|s| s == auth::REFRESH_TOKEN_SCOPE)
        || state.engine.registry.session_revoked(&claims.session_id)
    {
        return Err(ApiError::authentication_failed());
    }
    let user = Uuid::parse_str(&claims.user_id)
        .ok()
        .and_then(|id| state.engine.registry.user(id))
        .ok_or_else(ApiError::authentication_failed)?;
    // The same login session: a logout revokes the tokens refreshed from it too.
    Ok(Json(tokens(&state, &user, &claims.session_id)))
}

pub fn user_json(u: &User) -> Value {
    json!({
        "id": entity_id("USER", u.id),
        "createdTime": u.created_ms,
        "tenantId": entity_id("TENANT", if u.tenant_id.is_nil() { NULL_UUID } else { u.tenant_id }),
        "customerId": entity_id("CUSTOMER", u.customer_id),
        "email": u.email,
        "name": u.email,
        "authority": u.authority.as_str(),
        "firstName": u.first_name,
        "lastName": u.last_name,
        "phone": null,
        "additionalInfo": {},
    })
}

async fn current_user(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let u = state
        .engine
        .registry
        .user(caller.user_id)
        .ok_or_else(ApiError::authentication_failed)?;
    Ok(Json(user_json(&u)))
}

/// `POST /api/auth/logout`: the caller's login session ends on every node; its access and
/// refresh tokens are refused from now on (as in ThingsBoard).
async fn logout(State(state): State<AppState>, caller: Caller) -> Result<(), ApiError> {
    let until_ms = (auth::unix_now_s() + auth::REFRESH_TOKEN_TTL_S).saturating_mul(1000);
    state
        .engine
        .registry
        .revoke_session(&caller.claims.session_id, until_ms)
        .await
        .map_err(|e| ApiError::status(axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string(), 2))?;
    tracing::info!(user = %caller.user_id, "logged out");
    Ok(())
}
