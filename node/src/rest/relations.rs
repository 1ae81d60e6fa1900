//! Entity relations, ThingsBoard's relation API: save (`POST /api/relation`), get and delete one
//! (`GET`/`DELETE /api/relation?fromId&fromType&relationType[&relationTypeGroup]&toId&toType`),
//! and list those from or to an entity (`GET /api/relations?fromId&fromType` or `?toId&toType`,
//! optionally `relationType` and `relationTypeGroup`).
//!
//! Both ends must be entities of the caller's tenant that the caller may see: devices, device
//! profiles and the tenant itself for now.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use thingraft_engine::relations::{COMMON, EntityRef, Relation, TYPE_GROUPS};
use uuid::Uuid;

use super::auth::ApiError;
use super::devices::registry_error;
use super::{AppState, Caller, entity_id};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/relation", post(save).get(get_one).delete(delete_one))
        .route("/api/relations", get(list))
}

pub fn relation_json(r: &Relation) -> Value {
    json!({
        "from": entity_id(&r.from.entity_type, r.from.id),
        "to": entity_id(&r.to.entity_type, r.to.id),
        "type": r.kind,
        "typeGroup": r.group,
        "additionalInfo": serde_json::from_str::<Value>(&r.additional_info).unwrap_or(Value::Null),
    })
}

/// Checks that the caller may see `e`, an entity of its tenant.
fn check_entity(state: &AppState, caller: &Caller, e: &EntityRef) -> Result<(), ApiError> {
    let not_found = || ApiError::not_found(format!("{} with id [{}] is not found", e.entity_type, e.id));
    match e.entity_type.as_str() {
        "DEVICE" => caller.device(state, e.id).map(|_| ()),
        "DEVICE_PROFILE" => state
            .engine
            .registry
            .profile(e.id)
            .filter(|p| p.tenant_id == caller.tenant_id)
            .map(|_| ())
            .ok_or_else(not_found),
        "TENANT" if e.id == caller.tenant_id => Ok(()),
        "TENANT" => Err(not_found()),
        other => Err(ApiError::bad_request(format!(
            "Relations of {other} entities are not supported"
        ))),
    }
}

fn entity_of(v: &Value, what: &str) -> Result<EntityRef, ApiError> {
    let entity_type = v["entityType"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request(format!("Relation {what} entity type is required")))?;
    let id = v["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| ApiError::bad_request(format!("Relation {what} entity id is invalid")))?;
    Ok(EntityRef {
        entity_type: entity_type.to_string(),
        id,
    })
}

fn group_of(g: Option<&str>) -> Result<String, ApiError> {
    let g = g.filter(|g| !g.is_empty()).unwrap_or(COMMON);
    if TYPE_GROUPS.contains(&g) {
        Ok(g.to_string())
    } else {
        Err(ApiError::bad_request(format!("Unknown relation type group {g}")))
    }
}

/// `POST /api/relation` `{"from":{..},"to":{..},"type":"Contains","typeGroup":"COMMON"}`.
async fn save(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(), ApiError> {
    caller.require_tenant_admin()?;
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let from = entity_of(&body["from"], "from")?;
    let to = entity_of(&body["to"], "to")?;
    let kind = body["type"]
        .as_str()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("Relation type should be specified"))?;
    let group = group_of(body["typeGroup"].as_str())?;
    check_entity(&state, &caller, &from)?;
    check_entity(&state, &caller, &to)?;
    let r = Relation {
        from,
        to,
        kind: kind.to_string(),
        group,
        additional_info: body
            .get("additionalInfo")
            .map_or_else(|| "null".to_string(), Value::to_string),
    };
    state
        .engine
        .registry
        .save_relation(&r)
        .await
        .map_err(registry_error)?;
    tracing::info!(from = %r.from.id, to = %r.to.id, kind = %r.kind, "relation saved");
    Ok(())
}

/// The relation the query's `fromId`, `fromType`, `relationType`, `relationTypeGroup`, `toId`,
/// `toType` name.
fn named(state: &AppState, caller: &Caller, q: &HashMap<String, String>) -> Result<Relation, ApiError> {
    let param = |k: &str| {
        q.get(k)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::bad_request(format!("Required request parameter '{k}' is not present")))
    };
    let end = |id: &str, ty: &str| -> Result<EntityRef, ApiError> {
        entity_of(&json!({"id": param(id)?, "entityType": param(ty)?}), id)
    };
    let from = end("fromId", "fromType")?;
    let to = end("toId", "toType")?;
    check_entity(state, caller, &from)?;
    check_entity(state, caller, &to)?;
    Ok(Relation {
        from,
        to,
        kind: param("relationType")?.clone(),
        group: group_of(q.get("relationTypeGroup").map(String::as_str))?,
        additional_info: "null".into(),
    })
}

async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant()?;
    let r = named(&state, &caller, &q)?;
    state
        .engine
        .registry
        .relation(&r)
        .map(|r| Json(relation_json(&r)))
        .ok_or_else(|| ApiError::not_found("Relation is not found"))
}

async fn delete_one(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(), ApiError> {
    caller.require_tenant_admin()?;
    let r = named(&state, &caller, &q)?;
    if state
        .engine
        .registry
        .delete_relation(&r)
        .await
        .map_err(registry_error)?
    {
        Ok(())
    } else {
        Err(ApiError::not_found("Relation is not found"))
    }
}

/// `GET /api/relations?fromId&fromType` (or `toId&toType`), optionally narrowed by
/// `relationType` and `relationTypeGroup`.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_tenant()?;
    let group = match q.get("relationTypeGroup") {
        Some(g) => Some(group_of(Some(g))?),
        None => None,
    };
    let end = |id: &str, ty: &str| -> Option<Result<EntityRef, ApiError>> {
        let (i, t) = (q.get(id)?, q.get(ty)?);
        Some(entity_of(&json!({"id": i, "entityType": t}), id))
    };
    let registry = &state.engine.registry;
    // Each relation found is listed only if the caller may see its other end too (ThingsBoard's
    // `filterRelationsByReadPermission`), so that a customer user listing from the tenant sees its
    // own devices only.
    let (found, other_end): (Vec<Relation>, fn(&Relation) -> &EntityRef) =
        match (end("fromId", "fromType"), end("toId", "toType")) {
            (Some(from), None) => {
                let from = from?;
                check_entity(&state, &caller, &from)?;
                (registry.relations_from(&from, group.as_deref()), |r| &r.to)
            }
            (None, Some(to)) => {
                let to = to?;
                check_entity(&state, &caller, &to)?;
                (registry.relations_to(&to, group.as_deref()), |r| &r.from)
            }
            _ => {
                return Err(ApiError::bad_request(
                    "Either fromId and fromType or toId and toType are required",
                ));
            }
        };
    let kind = q.get("relationType");
    Ok(Json(Value::Array(
        found
            .iter()
            .filter(|r| {
                kind.is_none_or(|k| &r.kind == k) && check_entity(&state, &caller, other_end(r)).is_ok()
            })
            .map(relation_json)
            .collect(),
    )))
}
