//! thingraft-transport-http: ThingsBoard's HTTP device API (`/api/v1/{token}/...`) over the
//! replicated log.
//!
//! Every request is a short-lived session of its own, as in ThingsBoard: it authenticates by
//! the access token in its path, reports the device's activity with the records it appends,
//! and records no connect or disconnect. A write is answered 200 only after its record is
//! committed (DESIGN invariant 2). Reads and long polls go through the log and the partition's
//! leader like every other transport's, and come back as downlinks to the request's session.
//!
//! Errors carry ThingsBoard's status and error envelope: 401 for an unknown token, 400 for a
//! body that does not parse, 413 for one over the limit, 408 when a long poll times out.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use thingraft_log::LogError;
use thingraft_proto::device::{self, PayloadError};
use thingraft_proto::error::{ErrorClass, tb_error_envelope};
use thingraft_proto::records::{DownlinkMsg, IngestMsg, RpcStatus};
use thingraft_transport_common::payload::{self, CLIENT_RPC_TIMEOUT};
use thingraft_transport_common::{
    ClaimError, Credentials, Downlink, Hub, OtaKind, SUB_ATTRIBUTES, SUB_RPC, Session, now_ms, ota_chunk,
};
use tokio::sync::mpsc;

/// The `[http.device]` section of the node's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpDeviceConfig {
    /// A long poll without `?timeout=` waits this long (ThingsBoard's
    /// `transport.http.request_timeout`).
    pub request_timeout_ms: u64,
    /// The longest wait a long poll may ask for (`transport.http.max_request_timeout`).
    pub request_timeout_max_ms: u64,
    /// Largest request body (ThingsBoard: 50 MiB for `/api/v1/**`).
    pub max_payload_bytes: usize,
    /// Largest request body of the RPC endpoints (ThingsBoard: 64 KiB).
    pub max_rpc_payload_bytes: usize,
}

impl Default for HttpDeviceConfig {
    fn default() -> Self {
        Self {
            request_timeout_ms: 60_000,
            request_timeout_max_ms: 300_000,
            max_payload_bytes: 52_428_800,
            max_rpc_payload_bytes: 65_536,
        }
    }
}

struct Api {
    hub: Arc<Hub>,
    config: HttpDeviceConfig,
}

type St = State<Arc<Api>>;

/// The device API's routes, to merge into the node's HTTP server.
pub fn router(hub: Arc<Hub>, config: HttpDeviceConfig) -> Router {
    Router::new()
        .route("/api/v1/{token}/telemetry", post(telemetry))
        .route(
            "/api/v1/{token}/attributes",
            post(post_attributes).get(get_attributes),
        )
        .route("/api/v1/{token}/attributes/updates", get(attribute_updates))
        .route("/api/v1/{token}/rpc", get(rpc_poll).post(client_rpc))
        .route("/api/v1/{token}/rpc/{id}", post(rpc_reply))
        .route("/api/v1/{token}/claim", post(claim))
        .route("/api/v1/{token}/firmware", get(firmware))
        .route("/api/v1/{token}/software", get(software))
        .route("/api/v1/provision", post(provision))
        .with_state(Arc::new(Api { hub, config }))
}

/// An error answered with ThingsBoard's status and envelope.
#[derive(Debug)]
struct DevError {
    status: StatusCode,
    class: ErrorClass,
    message: String,
}

impl DevError {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(class.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        DevError {
            status,
            class,
            message: message.into(),
        }
    }

    /// A long poll that saw nothing in time: 408.
    fn timeout() -> Self {
        DevError {
            status: StatusCode::REQUEST_TIMEOUT,
            class: ErrorClass::Timeout,
            message: "Request timeout".into(),
        }
    }
}

impl From<LogError> for DevError {
    fn from(e: LogError) -> Self {
        tracing::warn!(error = %e, "HTTP device request not committed");
        DevError::new(e.class(), e.to_string())
    }
}

impl From<PayloadError> for DevError {
    fn from(e: PayloadError) -> Self {
        tracing::info!(error = %e, "HTTP device request refused");
        DevError::new(ErrorClass::BadRequest, format!("Invalid request body: {e}"))
    }
}

impl IntoResponse for DevError {
    fn into_response(self) -> Response {
        let body = tb_error_envelope(
            self.status.as_u16(),
            &self.message,
            self.class.tb_error_code(),
            now_ms(),
        );
        (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

fn json(body: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl Api {
    /// A session for the device with access token `token`, subscribed to `subscriptions`.
    fn session(
        &self,
        token: &str,
        subscriptions: u8,
    ) -> Result<(Session, mpsc::Receiver<Downlink>), DevError> {
        let Some(credentials) = self.hub.by_token(token) else {
            tracing::info!("HTTP device request with an unknown access token");
            return Err(DevError::new(ErrorClass::Unauthorized, "Invalid access token"));
        };
        let device = (*credentials.device).clone();
        Ok(self.hub.open_session(device, credentials, subscriptions, 16))
    }

    /// The wait of a long poll: `?timeout=` (0 or absent: the default), at most the maximum.
    fn poll_timeout(&self, q: &[(String, String)]) -> Duration {
        let asked = q
            .iter()
            .find(|(k, _)| k == "timeout")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .unwrap_or(self.config.request_timeout_ms);
        Duration::from_millis(asked.min(self.config.request_timeout_max_ms))
    }
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, DevError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        tracing::info!(error = %e, limit, "HTTP device request body refused");
        DevError::new(
            ErrorClass::TooLarge,
            format!("Payload size exceeds the limit of {limit} bytes"),
        )
    })
}

/// Waits for the first downlink `pick` accepts; `None` when `wait` passes first.
async fn wait_for<T>(
    rx: &mut mpsc::Receiver<Downlink>,
    wait: Duration,
    mut pick: impl FnMut(DownlinkMsg) -> Option<T>,
) -> Result<T, DevError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(DevError::timeout()),
            Ok(None) | Ok(Some(Downlink::Close)) => {
                return Err(DevError::new(ErrorClass::Forbidden, "Device was deleted!"));
            }
            Ok(Some(Downlink::Msg(_, m))) => {
                if let Some(t) = pick(m) {
                    return Ok(t);
                }
            }
        }
    }
}

/// `POST /api/v1/{token}/telemetry`; `{}` is the SDK's connectivity probe and is accepted.
async fn telemetry(State(api): St, Path(token): Path<String>, body: Body) -> Result<StatusCode, DevError> {
    let (s, _rx) = api.session(&token, 0)?;
    let body = read_body(body, api.config.max_payload_bytes).await?;
    let groups = device::parse_telemetry(&body, now_ms())?;
    s.submit(vec![IngestMsg::Telemetry(groups)]).await?;
    Ok(StatusCode::OK)
}

/// `POST /api/v1/{token}/attributes`: client attributes.
async fn post_attributes(
    State(api): St,
    Path(token): Path<String>,
    body: Body,
) -> Result<StatusCode, DevError> {
    let (s, _rx) = api.session(&token, 0)?;
    let body = read_body(body, api.config.max_payload_bytes).await?;
    let values = device::parse_attributes(&body)?;
    s.submit(vec![IngestMsg::ClientAttributes(values)]).await?;
    Ok(StatusCode::OK)
}

/// `GET /api/v1/{token}/attributes?clientKeys=a,b&sharedKeys=c`:
/// `{"client":{..},"shared":{..}}`, every attribute of both scopes when no keys are named.
async fn get_attributes(
    State(api): St,
    Path(token): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, DevError> {
    let (s, mut rx) = api.session(&token, 0)?;
    let (client_keys, shared_keys) =
        payload::attribute_request_from_query(q.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    s.submit(vec![IngestMsg::AttributeRequest {
        request_id: 1,
        client_keys,
        shared_keys,
    }])
    .await?;
    let wait = Duration::from_millis(api.config.request_timeout_ms);
    let body = wait_for(&mut rx, wait, |m| match m {
        m @ DownlinkMsg::AttributeResponse { .. } => Some(m.json()),
        _ => None,
    })
    .await?;
    Ok(json(body))
}

/// `GET /api/v1/{token}/attributes/updates?timeout=ms`: the next shared-attribute change, or
/// 408.
async fn attribute_updates(
    State(api): St,
    Path(token): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, DevError> {
    let (_s, mut rx) = api.session(&token, SUB_ATTRIBUTES)?;
    let body = wait_for(&mut rx, api.poll_timeout(&q), |m| match m {
        m @ DownlinkMsg::AttributeUpdate { .. } => Some(m.json()),
        _ => None,
    })
    .await?;
    Ok(json(body))
}

/// `GET /api/v1/{token}/rpc?timeout=ms`: the next server-side RPC
/// (`{"id":..,"method":..,"params":..}`), or 408.
async fn rpc_poll(
    State(api): St,
    Path(token): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, DevError> {
    let (s, mut rx) = api.session(&token, SUB_RPC)?;
    let (body, uuid) = wait_for(&mut rx, api.poll_timeout(&q), |m| match m {
        m @ DownlinkMsg::RpcRequest { id, uuid, .. } => {
            Some((payload::rpc_request_with_id(id, &m.json()), uuid))
        }
        _ => None,
    })
    .await?;
    // The answer is the delivery (ThingsBoard marks the RPC DELIVERED here). If the record
    // fails, the RPC stays SENT and its leader sends it again later.
    let delivered = IngestMsg::RpcStatus {
        uuid,
        status: RpcStatus::Delivered,
    };
    if let Err(e) = s.submit(vec![delivered]).await {
        tracing::info!(error = %e, "RPC delivery not recorded");
    }
    Ok(json(body))
}

/// `POST /api/v1/{token}/rpc/{id}`: the device's reply to server-side RPC `id`.
async fn rpc_reply(
    State(api): St,
    Path((token, id)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, DevError> {
    let (s, _rx) = api.session(&token, 0)?;
    let id: u32 = id
        .parse()
        .map_err(|_| DevError::new(ErrorClass::BadRequest, format!("RPC id {id:?} is not a number")))?;
    let body = read_body(body, api.config.max_rpc_payload_bytes).await?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
    s.submit(vec![payload::rpc_response(id, &body)]).await?;
    Ok(StatusCode::OK)
}

/// `POST /api/v1/{token}/rpc`: a client-side RPC. It is recorded in the log and run through the
/// root rule chain; the answer is what the chain replies, or `{"error":"timeout"}` once the
/// transports' client-RPC timeout passes.
async fn client_rpc(State(api): St, Path(token): Path<String>, body: Body) -> Result<Response, DevError> {
    let (s, mut rx) = api.session(&token, 0)?;
    let body = read_body(body, api.config.max_rpc_payload_bytes).await?;
    let msg = payload::parse_client_rpc(1, &body)?;
    s.submit(vec![msg]).await?;
    let wait = Duration::from_millis(api.hub.config.client_rpc_timeout_ms);
    match wait_for(&mut rx, wait, |m| match m {
        DownlinkMsg::ClientRpcResponse { body, .. } => Some(body),
        _ => None,
    })
    .await
    {
        Ok(answer) => Ok(json(answer)),
        Err(e) if e.status == StatusCode::REQUEST_TIMEOUT => Ok(json(CLIENT_RPC_TIMEOUT.to_string())),
        Err(e) => Err(e),
    }
}

/// `POST /api/v1/provision`: device provisioning; ThingsBoard's JSON answer with its `status`.
async fn provision(State(api): St, body: Body) -> Result<Response, DevError> {
    let body = read_body(body, api.config.max_rpc_payload_bytes).await?;
    let dir = api
        .hub
        .directory()
        .ok_or_else(|| DevError::new(ErrorClass::Unavailable, "The registry is not ready"))?;
    match dir.provision(&body).await {
        Ok(answer) => Ok(json(answer)),
        Err(e) => Err(PayloadError::InvalidJson(e).into()),
    }
}

/// `POST /api/v1/{token}/claim`: opens the device's claim window (body optional:
/// `{"secretKey":..,"durationMs":..}`).
async fn claim(State(api): St, Path(token): Path<String>, body: Body) -> Result<StatusCode, DevError> {
    let (s, _rx) = api.session(&token, 0)?;
    let body = read_body(body, api.config.max_rpc_payload_bytes).await?;
    let (secret, duration_ms) = payload::parse_claim(&body)?;
    let dir = api
        .hub
        .directory()
        .ok_or_else(|| DevError::new(ErrorClass::Unavailable, "The registry is not ready"))?;
    dir.claim(&s.device, secret, duration_ms).await.map_err(|e| {
        tracing::warn!(device = %s.device.name, error = %e, "claim window not opened");
        match e {
            ClaimError::Refused(m) => DevError::new(ErrorClass::BadRequest, m),
            ClaimError::Failed(m) => DevError::new(ErrorClass::Unavailable, m),
        }
    })?;
    Ok(StatusCode::OK)
}

async fn firmware(
    State(api): St,
    Path(token): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, DevError> {
    ota(&api, &token, &q, OtaKind::Firmware)
}

async fn software(
    State(api): St,
    Path(token): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, DevError> {
    ota(&api, &token, &q, OtaKind::Software)
}

/// `GET /api/v1/{token}/firmware?title=&version=&size=&chunk=` (and `/software`): chunk `chunk`
/// of `size` bytes of the package assigned to the device (all of it without `size`); 404 when
/// none is, 400 when `title`/`version` name another.
fn ota(api: &Api, token: &str, q: &[(String, String)], kind: OtaKind) -> Result<Response, DevError> {
    let Some(Credentials { device, .. }) = api.hub.by_token(token) else {
        return Err(DevError::new(ErrorClass::Unauthorized, "Invalid access token"));
    };
    let dir = api
        .hub
        .directory()
        .ok_or_else(|| DevError::new(ErrorClass::Unavailable, "The registry is not ready"))?;
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let info = dir
        .ota_info(&device.device, kind)
        .ok_or_else(|| DevError::new(ErrorClass::NotFound, "No OTA package is assigned to the device"))?;
    if param("title").is_some_and(|t| t != info.title) || param("version").is_some_and(|v| v != info.version)
    {
        return Err(DevError::new(
            ErrorClass::BadRequest,
            "Title or version do not match the assigned OTA package",
        ));
    }
    let number = |k: &str| -> Result<u64, DevError> {
        match param(k) {
            None | Some("") => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| DevError::new(ErrorClass::BadRequest, format!("{k} must be a number"))),
        }
    };
    let (size, chunk) = (number("size")?, number("chunk")?);
    let data = ota_chunk(dir.as_ref(), &device.device, kind, size, chunk)
        .ok_or_else(|| DevError::new(ErrorClass::NotFound, "OTA package data is not available"))?;
    let name = info.file_name.unwrap_or_else(|| info.title.clone());
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename={name}"),
            ),
            (header::HeaderName::from_static("x-filename"), name),
        ],
        data,
    )
        .into_response())
}
