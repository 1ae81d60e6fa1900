//! The REST API: ThingsBoard's subset that its Python clients and the device tour use.
//!
//! - [`auth`]: JWT (HS512), password hashing, the error envelope.
//! - [`users`]: login, refresh, current user.
//! - [`devices`]: devices and their credentials.
//! - [`profiles`]: device profiles and their provisioning settings.
//! - [`claims`]: device claiming by customer users.
//! - [`ota`]: OTA packages and their assignment to devices.
//! - [`telemetry`]: telemetry and attributes: save, latest, history, keys.
//! - [`rpc`]: server-side RPC (v1, v2, persistent).
//!
//! Every handler authenticates with [`Caller`] and only ever sees its tenant's entities.

pub mod auth;
pub mod claims;
pub mod devices;
pub mod ota;
pub mod profiles;
pub mod relations;
pub mod rpc;
pub mod telemetry;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use thingraft_engine::EngineHandle;
use thingraft_engine::registry::{Authority, Device, DeviceProfile};
use uuid::Uuid;

use crate::rest::auth::{ApiError, Claims};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    /// The JWT secret, shared by every node through the metadata map.
    pub secret: Arc<Vec<u8>>,
}

impl FromRef<AppState> for EngineHandle {
    fn from_ref(s: &AppState) -> EngineHandle {
        s.engine.clone()
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub claims: Claims,
    pub user_id: Uuid,
    pub tenant_id: Uuid,
    pub customer_id: Uuid,
    pub authority: Authority,
}

impl Caller {
    /// The device `id` if the caller may see it: same tenant, and for a customer user, the
    /// same customer. Anything else is answered as ThingsBoard does, with 403 or 404.
    pub fn device(&self, state: &AppState, id: Uuid) -> Result<Device, ApiError> {
        let not_found = || ApiError::not_found(format!("Device with id [{id}] is not found"));
        let d = state.engine.registry.device(id).ok_or_else(not_found)?;
        let allowed = match self.authority {
            Authority::SysAdmin => false,
            Authority::TenantAdmin => d.tenant_id == self.tenant_id,
            Authority::CustomerUser => d.tenant_id == self.tenant_id && d.customer_id == self.customer_id,
        };
        if !allowed {
            tracing::info!(user = %self.claims.sub, device = %id, "access to another tenant's device refused");
            return Err(ApiError::forbidden(
                "You don't have permission to perform this operation!",
            ));
        }
        Ok(d)
    }

    /// The device profile `id` names (text from a path or body) if it is the caller's tenant's;
    /// 404 otherwise, as ThingsBoard answers.
    pub fn profile(&self, state: &AppState, id: &str) -> Result<DeviceProfile, ApiError> {
        let not_found = || ApiError::not_found(format!("Device profile with id [{id}] is not found"));
        let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
        state
            .engine
            .registry
            .profile(uuid)
            .filter(|p| p.tenant_id == self.tenant_id)
            .ok_or_else(not_found)
    }

    pub fn require_tenant_admin(&self) -> Result<(), ApiError> {
        if self.authority != Authority::TenantAdmin {
            return Err(ApiError::forbidden(
                "You don't have permission to perform this operation!",
            ));
        }
        Ok(())
    }

    pub fn require_tenant(&self) -> Result<(), ApiError> {
        match self.authority {
            Authority::TenantAdmin | Authority::CustomerUser => Ok(()),
            Authority::SysAdmin => Err(ApiError::forbidden(
                "You don't have permission to perform this operation!",
            )),
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        let token = auth::bearer(&parts.headers).ok_or_else(ApiError::authentication_failed)?;
        let claims = auth::decode(token, &state.secret, auth::unix_now_s())?;
        if claims.scopes.iter().any(|s| s == auth::REFRESH_TOKEN_SCOPE)
            || state.engine.registry.session_revoked(&claims.session_id)
        {
            return Err(ApiError::authentication_failed());
        }
        let user_id = Uuid::parse_str(&claims.user_id).map_err(|_| ApiError::authentication_failed())?;
        // The user may have been deleted or changed since the token was issued.
        let user = state
            .engine
            .registry
            .user(user_id)
            .ok_or_else(ApiError::authentication_failed)?;
        Ok(Caller {
            claims,
            user_id,
            tenant_id: user.tenant_id,
            customer_id: user.customer_id,
            authority: user.authority,
        })
    }
}

/// `{"entityType": t, "id": id}`
pub fn entity_id(entity_type: &str, id: Uuid) -> serde_json::Value {
    serde_json::json!({"entityType": entity_type, "id": id.to_string()})
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(users::routes())
        .merge(devices::routes())
        .merge(profiles::routes())
        .merge(claims::routes())
        .merge(relations::routes())
        .merge(ota::routes())
        .merge(telemetry::routes())
        .merge(rpc::routes())
        .with_state(state)
}
