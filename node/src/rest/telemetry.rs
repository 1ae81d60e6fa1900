//! Telemetry and attributes of devices (`/api/plugins/telemetry/...`): save, latest, history
//! with aggregation, keys.
//!
//! Saves are appended to the device's partition like device messages, so they are committed
//! before the answer and stored by every replica; the answer waits until this node's replica
//! has applied them, so that a read through the same node sees the write.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use thingraft_engine::registry::Device;
use thingraft_engine::store::TsValue;
use thingraft_proto::device::{self, Value as TbValue};
use thingraft_proto::records::{Ingest, IngestMsg, Scope};
use uuid::Uuid;

use super::auth::{ApiError, unix_now_ms};
use super::{AppState, Caller};

pub fn routes() -> Router<AppState> {
    // matchit wants one parameter name per position, so the device-only form
    // `/api/plugins/telemetry/{deviceId}/{scope}` shares the names of the entity form.
    Router::new()
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}",
            post(save_attributes_short).delete(delete_attributes_short),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/timeseries/delete",
            delete(delete_timeseries),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/values/timeseries",
            get(get_timeseries),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/values/attributes",
            get(get_attributes_all),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/values/attributes/{scope}",
            get(get_attributes_scope),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/keys/timeseries",
            get(timeseries_keys),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/keys/attributes",
            get(attribute_keys_all),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/keys/attributes/{scope}",
            get(attribute_keys_scope),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/timeseries/{scope}",
            post(save_timeseries),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/attributes/{scope}",
            post(save_attributes),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/{scope}",
            post(save_attributes).delete(delete_attributes),
        )
}

fn device_of(state: &AppState, caller: &Caller, entity_type: &str, id: &str) -> Result<Device, ApiError> {
    if entity_type != "DEVICE" {
        return Err(ApiError::bad_request(format!(
            "entity type {entity_type} is not supported yet"
        )));
    }
    let id = Uuid::parse_str(id).map_err(|_| ApiError::bad_request(format!("Invalid UUID string: {id}")))?;
    caller.device(state, id)
}

fn keys_param(q: &HashMap<String, String>) -> Vec<String> {
    q.get("keys")
        .map(|k| {
            k.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn num<T: std::str::FromStr>(q: &HashMap<String, String>, name: &str) -> Result<Option<T>, ApiError> {
    q.get(name)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("Invalid '{name}' parameter: {s}")))
        })
        .transpose()
}

fn shown(v: &TbValue, strict: bool) -> Value {
    if strict {
        v.to_json()
    } else {
        Value::String(v.to_text())
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %e, "store read failed");
    ApiError::internal("Internal server error")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Agg {
    None,
    Avg,
    Min,
    Max,
    Sum,
    Count,
}

async fn get_timeseries(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    let dev = *d.id.as_bytes();
    let strict = q.get("useStrictDataTypes").is_some_and(|v| v == "true");
    let keys = keys_param(&q);
    let store = &state.engine.store;
    let mut out = Map::new();
    let (Some(start), Some(end)) = (num::<i64>(&q, "startTs")?, num::<i64>(&q, "endTs")?) else {
        // No time range: the latest values.
        for (k, tv) in store.latest(&dev, &keys).map_err(internal)? {
            out.insert(k, json!([{"ts": tv.ts_ms, "value": shown(&tv.value, strict)}]));
        }
        return Ok(Json(Value::Object(out)));
    };
    if keys.is_empty() {
        return Err(ApiError::bad_request(
            "Required request parameter 'keys' is not present",
        ));
    }
    if end < start {
        return Err(ApiError::bad_request("endTs must not be before startTs"));
    }
    let limit = num::<usize>(&q, "limit")?.unwrap_or(100).clamp(1, 100_000);
    let desc = !q.get("orderBy").is_some_and(|o| o.eq_ignore_ascii_case("ASC"));
    let agg = match q.get("agg").map(|s| s.to_uppercase()).as_deref() {
        None | Some("NONE") | Some("") => Agg::None,
        Some("AVG") => Agg::Avg,
        Some("MIN") => Agg::Min,
        Some("MAX") => Agg::Max,
        Some("SUM") => Agg::Sum,
        Some("COUNT") => Agg::Count,
        Some(other) => return Err(ApiError::bad_request(format!("Invalid aggregation: {other}"))),
    };
    for k in &keys {
        let rows = if agg == Agg::None {
            store
                .history(&dev, k, start, end, desc, limit)
                .map_err(internal)?
        } else {
            let interval = num::<i64>(&q, "interval")?
                .filter(|i| *i > 0)
                .unwrap_or(end - start)
                .max(1);
            if (end - start) / interval > 100_000 {
                return Err(ApiError::bad_request("too many intervals: raise 'interval'"));
            }
            const POINTS_MAX: usize = 1_000_000;
            let points = store
                .history(&dev, k, start, end, false, POINTS_MAX)
                .map_err(internal)?;
            let mut rows = aggregate(&points, start, end, interval, agg);
            if desc {
                rows.reverse();
            }
            rows.truncate(limit);
            rows
        };
        if !rows.is_empty() {
            let list: Vec<Value> = rows
                .iter()
                .map(|r| json!({"ts": r.ts_ms, "value": shown(&r.value, strict)}))
                .collect();
            out.insert(k.clone(), Value::Array(list));
        }
    }
    Ok(Json(Value::Object(out)))
}

/// ThingsBoard's aggregation: one row per non-empty interval, stamped at the interval's middle.
fn aggregate(points: &[TsValue], start: i64, end: i64, interval: i64, agg: Agg) -> Vec<TsValue> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut lo = start;
    while lo < end {
        let hi = lo.saturating_add(interval).min(end);
        let mut count = 0i64;
        let (mut sum_l, mut sum_d, mut any_double) = (0i64, 0f64, false);
        let mut min: Option<f64> = None;
        let mut max: Option<f64> = None;
        let mut numeric = 0i64;
        while i < points.len() && points[i].ts_ms < hi {
            let p = &points[i];
            i += 1;
            if p.ts_ms < lo {
                continue;
            }
            count += 1;
            let x = match &p.value {
                TbValue::Long(v) => {
                    sum_l = sum_l.wrapping_add(*v);
                    *v as f64
                }
                TbValue::Double(v) => {
                    any_double = true;
                    sum_d += v;
                    *v
                }
                TbValue::Bool(b) => {
                    sum_l += i64::from(*b);
                    f64::from(u8::from(*b))
                }
                _ => continue,
            };
            numeric += 1;
            min = Some(min.map_or(x, |m| m.min(x)));
            max = Some(max.map_or(x, |m| m.max(x)));
        }
        let ts = lo + (hi - lo) / 2;
        let value = match agg {
            Agg::Count if count > 0 => Some(TbValue::Long(count)),
            _ if numeric == 0 => None,
            Agg::Avg => Some(TbValue::Double((sum_l as f64 + sum_d) / numeric as f64)),
            Agg::Sum if any_double => Some(TbValue::Double(sum_l as f64 + sum_d)),
            Agg::Sum => Some(TbValue::Long(sum_l)),
            Agg::Min => min.map(|m| whole_or_double(m, any_double)),
            Agg::Max => max.map(|m| whole_or_double(m, any_double)),
            Agg::Count | Agg::None => None,
        };
        if let Some(value) = value {
            out.push(TsValue { ts_ms: ts, value });
        }
        lo = hi;
    }
    out
}

fn whole_or_double(x: f64, any_double: bool) -> TbValue {
    if any_double {
        TbValue::Double(x)
    } else {
        TbValue::Long(x as i64)
    }
}

fn attribute_rows(
    state: &AppState,
    d: &Device,
    scopes: &[Scope],
    keys: &[String],
) -> Result<Vec<Value>, ApiError> {
    let mut rows = Vec::new();
    for s in scopes {
        for (k, tv) in state
            .engine
            .store
            .attributes(d.id.as_bytes(), *s, keys)
            .map_err(internal)?
        {
            rows.push(json!({"lastUpdateTs": tv.ts_ms, "key": k, "value": tv.value.to_json()}));
        }
    }
    Ok(rows)
}

const ALL_SCOPES: [Scope; 3] = [Scope::Client, Scope::Shared, Scope::Server];

fn scope_param(s: &str) -> Result<Scope, ApiError> {
    Scope::parse(s).ok_or_else(|| ApiError::bad_request(format!("Invalid scope: {s}")))
}

async fn get_attributes_all(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    Ok(Json(Value::Array(attribute_rows(
        &state,
        &d,
        &ALL_SCOPES,
        &keys_param(&q),
    )?)))
}

async fn get_attributes_scope(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    let s = scope_param(&scope)?;
    Ok(Json(Value::Array(attribute_rows(
        &state,
        &d,
        &[s],
        &keys_param(&q),
    )?)))
}

async fn timeseries_keys(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    let keys = state
        .engine
        .store
        .telemetry_keys(d.id.as_bytes())
        .map_err(internal)?;
    Ok(Json(json!(keys)))
}

fn attribute_keys(state: &AppState, d: &Device, scopes: &[Scope]) -> Result<Vec<String>, ApiError> {
    let mut keys = Vec::new();
    for s in scopes {
        for (k, _) in state
            .engine
            .store
            .attributes(d.id.as_bytes(), *s, &[])
            .map_err(internal)?
        {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.sort();
    Ok(keys)
}

async fn attribute_keys_all(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    Ok(Json(json!(attribute_keys(&state, &d, &ALL_SCOPES)?)))
}

async fn attribute_keys_scope(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    Ok(Json(json!(attribute_keys(&state, &d, &[scope_param(&scope)?])?)))
}

/// 503 for a write the log did not commit (ThingsBoard's general error code 2).
pub(super) fn not_committed(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::status(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        format!("write not committed: {e}"),
        2,
    )
}

/// Appends an API write to the device's partition and waits until this replica applied it.
pub(super) async fn submit(state: &AppState, d: &Device, msg: IngestMsg) -> Result<(), ApiError> {
    let ingest = Ingest {
        tenant: *d.tenant_id.as_bytes(),
        device: *d.id.as_bytes(),
        ts_ms: unix_now_ms(),
        session: None,
        msg,
    };
    let appended = state.engine.submit(&ingest).await.map_err(|e| {
        tracing::warn!(error = %e, "API write not committed");
        not_committed(&e)
    })?;
    if !state
        .engine
        .wait_applied(d.id.as_bytes(), appended.first_offset, Duration::from_secs(5))
        .await
    {
        tracing::warn!(device = %d.id, "write committed but not applied here within 5 s");
    }
    Ok(())
}

fn no_nulls(body: &[u8]) -> Result<(), ApiError> {
    // The device APIs skip nulls; the REST API refuses them (ThingsBoard answers 400).
    fn has_null(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Object(m) => m.values().any(|x| x.is_null()) || m.get("values").is_some_and(has_null),
            Value::Array(a) => a.iter().any(has_null),
            _ => false,
        }
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("Invalid JSON: {e}")))?;
    if has_null(&v) {
        return Err(ApiError::bad_request("Null values are not allowed"));
    }
    Ok(())
}

async fn save_timeseries(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id, _scope)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<(), ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    no_nulls(&body)?;
    let groups = device::parse_telemetry(&body, unix_now_ms())
        .map_err(|e| ApiError::bad_request(format!("Invalid telemetry: {e}")))?;
    if groups.iter().all(|g| g.values.is_empty()) {
        return Err(ApiError::bad_request(
            "No telemetry data found in the request body",
        ));
    }
    submit(&state, &d, IngestMsg::SaveTelemetry(groups)).await
}

async fn save_attributes_inner(
    state: &AppState,
    caller: &Caller,
    entity_type: &str,
    entity_id: &str,
    scope: &str,
    body: &[u8],
) -> Result<(), ApiError> {
    let d = device_of(state, caller, entity_type, entity_id)?;
    let scope = match scope_param(scope)? {
        Scope::Client => return Err(ApiError::bad_request("Invalid scope: CLIENT_SCOPE")),
        s => s,
    };
    no_nulls(body)?;
    let values = device::parse_attributes(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid attributes: {e}")))?;
    if values.is_empty() {
        return Err(ApiError::bad_request(
            "No attributes data found in the request body",
        ));
    }
    submit(state, &d, IngestMsg::SaveAttributes { scope, values }).await
}

async fn save_attributes(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<(), ApiError> {
    save_attributes_inner(&state, &caller, &entity_type, &entity_id, &scope, &body).await
}

/// `POST /api/plugins/telemetry/{deviceId}/{scope}`.
async fn save_attributes_short(
    State(state): State<AppState>,
    caller: Caller,
    Path((device_id, scope)): Path<(String, String)>,
    body: Bytes,
) -> Result<(), ApiError> {
    save_attributes_inner(&state, &caller, "DEVICE", &device_id, &scope, &body).await
}

async fn delete_attributes_inner(
    state: &AppState,
    caller: &Caller,
    entity_type: &str,
    entity_id: &str,
    scope: &str,
    q: &HashMap<String, String>,
) -> Result<(), ApiError> {
    let d = device_of(state, caller, entity_type, entity_id)?;
    let scope = scope_param(scope)?;
    let keys = keys_param(q);
    if keys.is_empty() {
        return Err(ApiError::bad_request(
            "Required request parameter 'keys' is not present",
        ));
    }
    submit(state, &d, IngestMsg::DeleteAttributes { scope, keys }).await
}

/// `DELETE /api/plugins/telemetry/{entityType}/{entityId}/{scope}?keys=`.
async fn delete_attributes(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(), ApiError> {
    delete_attributes_inner(&state, &caller, &entity_type, &entity_id, &scope, &q).await
}

/// `DELETE /api/plugins/telemetry/{deviceId}/{scope}?keys=`.
async fn delete_attributes_short(
    State(state): State<AppState>,
    caller: Caller,
    Path((device_id, scope)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(), ApiError> {
    delete_attributes_inner(&state, &caller, "DEVICE", &device_id, &scope, &q).await
}

/// `DELETE .../timeseries/delete?keys=&deleteAllDataForKeys=&startTs=&endTs=&deleteLatest=`.
async fn delete_timeseries(
    State(state): State<AppState>,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<(), ApiError> {
    let d = device_of(&state, &caller, &entity_type, &entity_id)?;
    let keys = keys_param(&q);
    if keys.is_empty() {
        return Err(ApiError::bad_request(
            "Required request parameter 'keys' is not present",
        ));
    }
    let all = q.get("deleteAllDataForKeys").is_some_and(|v| v == "true");
    let (start_ts, end_ts) = if all {
        (i64::MIN, i64::MAX)
    } else {
        match (num::<i64>(&q, "startTs")?, num::<i64>(&q, "endTs")?) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => {
                return Err(ApiError::bad_request(
                    "startTs and endTs are required unless deleteAllDataForKeys=true",
                ));
            }
        }
    };
    let delete_latest = q.get("deleteLatest").is_none_or(|v| v != "false");
    submit(
        &state,
        &d,
        IngestMsg::DeleteTelemetry {
            keys,
            start_ts,
            end_ts,
            delete_latest,
        },
    )
    .await
}
