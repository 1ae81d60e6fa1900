//! ThingsBoard's CoAP device API (`/api/v1/{token}/...`): telemetry, attributes (one-shot read
//! and Observe), RPC (Observe, replies, client RPC).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use coap_lite::{
    CoapOption, CoapRequest, ContentFormat, MessageClass, ObserveOption, RequestType, ResponseType,
};
use thingraft_log::LogError;
use thingraft_proto::device::{self, PayloadError};
use thingraft_proto::error::ErrorClass;
use thingraft_proto::records::{DownlinkMsg, EntityId, IngestMsg, RpcStatus};
use thingraft_transport_common::payload::{self, CLIENT_RPC_TIMEOUT};
use thingraft_transport_common::proto_payload::{
    self, DeviceTransport, Format, ProtoSchemas, Uplink, uplink_json,
};
use thingraft_transport_common::{
    ClaimError, Credentials, Downlink, OtaKind, PowerMode, SUB_ATTRIBUTES, SUB_RPC, Session, now_ms,
    ota_chunk,
};
use tokio::sync::mpsc;

use crate::{Reply, Responder, Transport};

/// How long a read waits for the partition leader's answer.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The CoAP code of an error class (the one table in `thingraft-proto`).
fn code_of(class: ErrorClass) -> ResponseType {
    let (c, d) = class.coap_code();
    match MessageClass::from((c << 5) | d) {
        MessageClass::Response(rt) => rt,
        _ => ResponseType::InternalServerError,
    }
}

fn refuse(class: ErrorClass, why: &str) -> Reply {
    tracing::info!(reason = why, "CoAP request refused");
    Reply::code(code_of(class))
}

/// The protobuf schemas of the device's profile for CoAP (`None`: its payloads are JSON).
fn proto_schemas(t: &Transport, s: &Session) -> Option<Arc<ProtoSchemas>> {
    t.hub
        .directory()
        .and_then(|d| d.proto_schemas(&s.device.device, DeviceTransport::Coap))
}

fn bad_payload(e: &PayloadError) -> Reply {
    refuse(ErrorClass::BadRequest, &e.to_string())
}

fn backend(e: &LogError) -> Reply {
    tracing::warn!(error = %e, "CoAP request not committed");
    Reply::code(code_of(e.class()))
}

/// Answers one request; `None` when an observation took over the answering.
pub(crate) async fn handle(
    t: &Arc<Transport>,
    req: &mut CoapRequest<SocketAddr>,
    responder: &Responder,
) -> Option<Reply> {
    route(t, req, responder).await.unwrap_or_else(Some)
}

/// [`handle`], with refusals as `Err`.
async fn route(
    t: &Arc<Transport>,
    req: &mut CoapRequest<SocketAddr>,
    responder: &Responder,
) -> Result<Option<Reply>, Reply> {
    let path = req.get_path();
    let mut segs: Vec<&str> = path.split('/').collect();
    // Over DTLS with a client certificate ThingsBoard's paths have no token
    // (`/api/v1/telemetry`, `/fw?title=..`): the certificate's credentials key stands in its
    // place. The key has `/` in it, which no segment of a split path has, so no request can
    // name it.
    let certificate = t.peer_credentials(responder.peer);
    if let Some(key) = certificate.as_deref() {
        if segs.len() >= 3 && segs[..2] == ["api", "v1"] && DEVICE_RESOURCES.contains(&segs[2]) {
            segs.insert(2, key);
        } else if segs == ["fw"] || segs == ["sw"] {
            segs.push(key);
        }
    }
    let method = *req.get_method();
    if let Some(cf) = req.message.get_content_format()
        && !matches!(
            cf,
            ContentFormat::ApplicationJSON | ContentFormat::TextPlain | ContentFormat::ApplicationOctetStream
        )
    {
        // JSON, or protobuf (octet stream) for devices whose profile has protobuf schemas.
        return Err(
            refuse(ErrorClass::BadRequest, "content format is not JSON or protobuf")
                .with_code(ResponseType::UnsupportedContentFormat),
        );
    }
    if req.message.payload.len() > t.config.max_payload_bytes {
        return Err(refuse(ErrorClass::TooLarge, "payload over the limit"));
    }
    let body = std::mem::take(&mut req.message.payload);
    let reply = match (method, segs.as_slice()) {
        (RequestType::Post, ["api", "v1", token, "telemetry"]) => {
            let (s, _rx) = session(t, token, 0)?;
            let proto = proto_schemas(t, &s);
            match uplink_json(proto.as_deref(), Format::Profile, Uplink::Telemetry, &body)
                .and_then(|json| device::parse_telemetry(&json, now_ms()))
            {
                Ok(groups) => submit(&s, IngestMsg::Telemetry(groups)).await,
                Err(e) => bad_payload(&e),
            }
        }
        (RequestType::Post, ["api", "v1", token, "attributes"]) => {
            let (s, _rx) = session(t, token, 0)?;
            let proto = proto_schemas(t, &s);
            match uplink_json(proto.as_deref(), Format::Profile, Uplink::Attributes, &body)
                .and_then(|json| device::parse_attributes(&json))
            {
                Ok(values) => submit(&s, IngestMsg::ClientAttributes(values)).await,
                Err(e) => bad_payload(&e),
            }
        }
        (RequestType::Get, ["api", "v1", token, "attributes"]) => match observe_flag(req) {
            Some(ObserveOption::Register) => {
                let (s, rx) = session(t, token, SUB_ATTRIBUTES)?;
                return Ok(observe_attributes(t, s, rx, req, responder).await);
            }
            flag => {
                if flag == Some(ObserveOption::Deregister) {
                    t.cancel_observation(responder.peer, &responder.token);
                }
                let (s, mut rx) = session(t, token, 0)?;
                let keys = query(req);
                let (client_keys, shared_keys) =
                    payload::attribute_request_from_query(keys.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                match read_attributes(&s, &mut rx, client_keys, shared_keys).await {
                    Ok(DownlinkMsg::AttributeResponse { client, shared, .. })
                        if client.is_empty() && shared.is_empty() =>
                    {
                        Reply::code(ResponseType::NotFound)
                    }
                    Ok(m) => render(&m, proto_schemas(t, &s).as_deref())
                        .unwrap_or_else(|| Reply::code(ResponseType::NotFound)),
                    Err(r) => r,
                }
            }
        },
        (RequestType::Get, ["api", "v1", token, "rpc"]) => match observe_flag(req) {
            Some(ObserveOption::Register) => {
                let (s, rx) = session(t, token, SUB_RPC)?;
                observe_rpc(t, s, rx, req, responder);
                return Ok(None);
            }
            Some(ObserveOption::Deregister) => {
                t.cancel_observation(responder.peer, &responder.token);
                Reply::code(ResponseType::Content)
            }
            None => refuse(ErrorClass::BadRequest, "GET rpc needs Observe")
                .with_code(ResponseType::MethodNotAllowed),
        },
        (RequestType::Post, ["api", "v1", token, "rpc", id]) => {
            let (s, _rx) = session(t, token, 0)?;
            let proto = proto_schemas(t, &s);
            let reply =
                uplink_json(proto.as_deref(), Format::Profile, Uplink::RpcResponse, &body).and_then(|json| {
                    serde_json::from_slice::<serde_json::Value>(&json)
                        .map(|_| json)
                        .map_err(|e| PayloadError::InvalidJson(e.to_string()))
                });
            match (id.parse::<u32>(), reply) {
                (Err(_), _) => refuse(ErrorClass::BadRequest, "rpc id is not a number"),
                (Ok(_), Err(e)) => bad_payload(&e),
                (Ok(id), Ok(json)) => submit(&s, payload::rpc_response(id, &json)).await,
            }
        }
        (RequestType::Post, ["api", "v1", token, "rpc"]) => {
            let (s, mut rx) = session(t, token, 0)?;
            // A protobuf device's request is a `ToServerRpcRequestMsg`, answered in kind.
            let proto = proto_schemas(t, &s).is_some();
            let parsed = if proto {
                proto_payload::client_rpc_json(&body)
                    .and_then(|json| payload::parse_client_rpc(1, json.as_bytes()))
            } else {
                payload::parse_client_rpc(1, &body)
            };
            match parsed {
                Err(e) => bad_payload(&e),
                Ok(msg) => match s.submit(vec![msg]).await {
                    Err(e) => backend(&e),
                    Ok(()) => {
                        // The root rule chain's answer, or a timeout when it gives none.
                        let limit = Duration::from_millis(t.hub.config.client_rpc_timeout_ms);
                        let answer = next_downlink(&mut rx, limit, |m| match m {
                            DownlinkMsg::ClientRpcResponse { body, .. } => Some(body),
                            _ => None,
                        })
                        .await;
                        match (proto, answer) {
                            (true, Some(body)) => Reply::bytes(
                                ResponseType::Content,
                                proto_payload::client_rpc_response(1, &body, ""),
                            ),
                            (true, None) => Reply::bytes(
                                ResponseType::Content,
                                proto_payload::client_rpc_response(1, "", "timeout"),
                            ),
                            (false, Some(body)) => Reply::json(ResponseType::Content, body),
                            (false, None) => {
                                Reply::json(ResponseType::Content, CLIENT_RPC_TIMEOUT.to_string())
                            }
                        }
                    }
                },
            }
        }
        (RequestType::Post, ["api", "v1", token, "claim"]) => {
            let (s, _rx) = session(t, token, 0)?;
            let parsed = if proto_schemas(t, &s).is_some() {
                proto_payload::claim(&body)
            } else {
                payload::parse_claim(&body)
            };
            match (parsed, t.hub.directory()) {
                (Err(e), _) => bad_payload(&e),
                (Ok(_), None) => refuse(ErrorClass::Unavailable, "the registry is not ready"),
                (Ok((secret, duration_ms)), Some(dir)) => {
                    match dir.claim(&s.device, secret, duration_ms).await {
                        Ok(()) => Reply::code(ResponseType::Created),
                        Err(ClaimError::Refused(e)) => refuse(ErrorClass::BadRequest, &e),
                        Err(ClaimError::Failed(e)) => refuse(ErrorClass::Unavailable, &e),
                    }
                }
            }
        }
        (RequestType::Get, [ota @ ("fw" | "sw"), token]) => {
            let kind = if *ota == "fw" {
                OtaKind::Firmware
            } else {
                OtaKind::Software
            };
            ota_download(t, token, kind, &query(req))?
        }
        (RequestType::Post, ["api", "v1", "provision"]) => match t.hub.directory() {
            None => refuse(ErrorClass::Unavailable, "the registry is not ready"),
            // JSON, or else ThingsBoard's `ProvisionDeviceRequestMsg` (answered in kind).
            Some(dir) => match thingraft_transport_common::provision(dir.as_ref(), &body).await {
                Ok(answer) if serde_json::from_slice::<serde_json::Value>(&body).is_ok() => Reply::json(
                    ResponseType::Content,
                    String::from_utf8_lossy(&answer).into_owned(),
                ),
                Ok(answer) => Reply::bytes(ResponseType::Content, answer),
                Err(e) => bad_payload(&PayloadError::InvalidJson(e)),
            },
        },
        (_, ["api", "v1", _, "telemetry" | "attributes" | "rpc" | "claim"] | ["api", "v1", _, "rpc", _]) => {
            refuse(ErrorClass::BadRequest, "method not allowed").with_code(ResponseType::MethodNotAllowed)
        }
        _ => refuse(ErrorClass::NotFound, "no such resource"),
    };
    Ok(Some(reply))
}

impl Reply {
    fn with_code(mut self, code: ResponseType) -> Reply {
        self.code = code;
        self
    }
}

/// A session of the device with this access token; 4.01 when the token is unknown.
/// A downlink as the device gets it: JSON (an RPC with its `id`, as the HTTP and CoAP APIs
/// show it), or, for a device whose profile has protobuf schemas for CoAP, ThingsBoard's
/// protobuf messages (content format 42). `None` when it cannot go as protobuf (an RPC without
/// an RPC request schema).
fn render(m: &DownlinkMsg, proto: Option<&ProtoSchemas>) -> Option<Reply> {
    if proto.is_some() {
        return proto_payload::downlink(m, proto).map(|b| Reply::bytes(ResponseType::Content, b));
    }
    let json = match m {
        DownlinkMsg::RpcRequest { id, .. } => payload::rpc_request_with_id(*id, &m.json()),
        _ => m.json(),
    };
    Some(Reply::json(ResponseType::Content, json))
}

/// The resources under `/api/v1/{token}/`.
const DEVICE_RESOURCES: &[&str] = &["telemetry", "attributes", "rpc", "claim"];

/// The credentials a path's token names: a credentials key itself (a DTLS client
/// certificate's, put there by `route`), or an access token. A miss before this node's
/// metadata replica has caught up (it was down) is 5.03, not 4.01: the device may have been
/// created meanwhile, and the client retries.
fn device_of(t: &Transport, token: &str) -> Result<Credentials, Reply> {
    let found = if token.contains('/') {
        t.hub.lookup(token)
    } else {
        t.hub.by_token(token)
    };
    match found {
        Some(c) => Ok(c),
        None if !t.hub.is_caught_up() => Err(refuse(
            ErrorClass::Unavailable,
            "this node is catching up with the cluster",
        )),
        None => Err(refuse(
            ErrorClass::Unauthorized,
            "unknown access token or certificate",
        )),
    }
}

fn session(
    t: &Transport,
    token: &str,
    subscriptions: u8,
) -> Result<(Session, mpsc::Receiver<Downlink>), Reply> {
    let credentials = device_of(t, token)?;
    let device = (*credentials.device).clone();
    t.uplink(&device.device);
    Ok(t.hub.open_session(device, credentials, subscriptions, 16))
}

async fn submit(s: &Session, msg: IngestMsg) -> Reply {
    match s.submit(vec![msg]).await {
        Ok(()) => Reply::code(ResponseType::Created),
        Err(e) => backend(&e),
    }
}

fn observe_flag(req: &CoapRequest<SocketAddr>) -> Option<ObserveOption> {
    req.get_observe_flag().and_then(Result::ok)
}

/// The request's Uri-Query options as key/value pairs.
fn query(req: &CoapRequest<SocketAddr>) -> Vec<(String, String)> {
    req.message
        .get_option(CoapOption::UriQuery)
        .map(|opts| {
            opts.iter()
                .filter_map(|o| {
                    let q = String::from_utf8_lossy(o);
                    q.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asks the partition's leader for attributes and waits for its answer.
async fn read_attributes(
    s: &Session,
    rx: &mut mpsc::Receiver<Downlink>,
    client_keys: Option<Vec<String>>,
    shared_keys: Option<Vec<String>>,
) -> Result<DownlinkMsg, Reply> {
    s.submit(vec![IngestMsg::AttributeRequest {
        request_id: 1,
        client_keys,
        shared_keys,
    }])
    .await
    .map_err(|e| backend(&e))?;
    next_downlink(rx, READ_TIMEOUT, |m| {
        matches!(m, DownlinkMsg::AttributeResponse { .. }).then_some(m)
    })
    .await
    .ok_or_else(|| refuse(ErrorClass::Timeout, "no attribute answer in time"))
}

/// The first downlink message within `limit` that `pick` accepts; `None` when none comes.
async fn next_downlink<T>(
    rx: &mut mpsc::Receiver<Downlink>,
    limit: Duration,
    mut pick: impl FnMut(DownlinkMsg) -> Option<T>,
) -> Option<T> {
    let wait = async {
        while let Some(d) = rx.recv().await {
            if let Downlink::Msg(_, m) = d
                && let Some(t) = pick(m)
            {
                return Some(t);
            }
        }
        None
    };
    tokio::time::timeout(limit, wait).await.ok().flatten()
}

/// Observe on attributes: the first notification carries every shared attribute, later ones
/// each change (`{"k":v,..,"deleted":[..]}`).
async fn observe_attributes(
    t: &Arc<Transport>,
    s: Session,
    mut rx: mpsc::Receiver<Downlink>,
    req: &CoapRequest<SocketAddr>,
    responder: &Responder,
) -> Option<Reply> {
    let shared = match read_attributes(&s, &mut rx, None, None).await {
        Ok(DownlinkMsg::AttributeResponse { shared, .. }) => shared,
        Ok(_) => Vec::new(),
        Err(r) => return Some(r),
    };
    let proto = proto_schemas(t, &s);
    let first = if shared.is_empty() && proto.is_none() {
        Some(Reply::json(ResponseType::Content, "{}".into()))
    } else {
        let all = DownlinkMsg::AttributeUpdate {
            updated: shared,
            deleted: Vec::new(),
        };
        render(&all, proto.as_deref())
    };
    spawn_observation(t, s, rx, req, responder, first, |m| {
        matches!(m, DownlinkMsg::AttributeUpdate { .. })
    });
    None
}

/// Observe on RPC: each server-side RPC is a notification `{"id":..,"method":..,"params":..}`.
fn observe_rpc(
    t: &Arc<Transport>,
    s: Session,
    rx: mpsc::Receiver<Downlink>,
    req: &CoapRequest<SocketAddr>,
    responder: &Responder,
) {
    spawn_observation(t, s, rx, req, responder, None, |m| {
        matches!(m, DownlinkMsg::RpcRequest { .. })
    });
}

/// Sends `first` (if any), then a notification for each downlink `pick` accepts, in the
/// device's format, until the device resets or ignores one, deregisters, or the session is
/// closed.
fn spawn_observation(
    t: &Arc<Transport>,
    s: Session,
    mut rx: mpsc::Receiver<Downlink>,
    req: &CoapRequest<SocketAddr>,
    responder: &Responder,
    first: Option<Reply>,
    pick: fn(&DownlinkMsg) -> bool,
) {
    let proto = proto_schemas(t, &s);
    // A power-saving device gets each notification only while it is reachable (after an
    // uplink, or in its paging window); until then the notification waits, in order.
    let power = t
        .hub
        .directory()
        .map_or(PowerMode::Drx, |d| d.coap_power_mode(&s.device.device));
    let device = s.device.device;
    let request = req.message.clone();
    let responder = responder.clone();
    let (peer, token) = (responder.peer, responder.token.clone());
    let token_key = token.clone();
    let t2 = t.clone();
    let task = tokio::spawn(async move {
        let session = s;
        let mut seq: u32 = 0;
        let notify = |mut r: Reply, seq: u32| {
            r.observe = Some(seq);
            r
        };
        let mut ok = match first {
            Some(r) => responder.send(notify(r, seq), &request).await,
            None => true,
        };
        // A confirmable observer's notifications are acknowledged, so one that is gone shows;
        // a non-confirmable one's are not: it is pinged instead (not in a power-saving mode,
        // where it is often asleep and its notifications wait for it anyway).
        let check = (!responder.confirmable() && matches!(power, PowerMode::Drx))
            .then(|| Duration::from_millis(t2.config.observe_check_ms.max(1)));
        let mut next_check = check.map(|c| tokio::time::Instant::now() + c);
        // The RPCs this observation delivered lately.
        let mut rpcs_delivered: std::collections::VecDeque<EntityId> = std::collections::VecDeque::new();
        while ok {
            let checking = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let received = tokio::select! {
                r = rx.recv() => r,
                () = checking => {
                    ok = t2.ping(peer).await;
                    if !ok {
                        tracing::info!(%peer, "CoAP observer answers no ping; observation ended");
                    }
                    next_check = check.map(|c| tokio::time::Instant::now() + c);
                    continue;
                }
            };
            match received {
                Some(Downlink::Msg(_, m)) => {
                    let rpc = m.rpc_uuid();
                    // DELIVERED, as ThingsBoard records it: appended aside, so that the next
                    // notification does not wait for it.
                    let delivered = |uuid: EntityId| {
                        let record = session.record(IngestMsg::RpcStatus {
                            uuid,
                            status: RpcStatus::Delivered,
                        });
                        let (log, partition) = (t2.hub.log.clone(), session.partition);
                        tokio::spawn(async move {
                            if let Err(e) = log.append(partition, vec![record]).await {
                                tracing::info!(error = %e, "RPC delivery not recorded");
                            }
                        });
                    };
                    // An RPC its leader sends again (its DELIVERED was not recorded in time)
                    // after this observation delivered it: not to the device again, and its
                    // DELIVERED once more.
                    if let Some(u) = rpc.filter(|u| rpcs_delivered.contains(u)) {
                        delivered(u);
                        continue;
                    }
                    if pick(&m)
                        && let Some(r) = render(&m, proto.as_deref())
                    {
                        // While the notification waits for a power-saving device, the session
                        // takes no RPC: the partition's leader keeps them queued (and counts no
                        // send that would make them FAIL) until the device can get them.
                        let rpc_bits = session.subscriptions() & SUB_RPC;
                        session.unsubscribe(rpc_bits);
                        t2.reachable(&device, power).await;
                        session.subscribe(rpc_bits);
                        seq += 1;
                        // Acknowledged (confirmable) or sent (non-confirmable).
                        ok = responder.send(notify(r, seq), &request).await;
                        if let Some(u) = rpc.filter(|_| ok) {
                            delivered(u);
                            if rpcs_delivered.len() >= 64 {
                                rpcs_delivered.pop_front();
                            }
                            rpcs_delivered.push_back(u);
                        }
                    }
                }
                Some(Downlink::Close) | None => break,
            }
        }
        tracing::debug!(%peer, "CoAP observation ended");
        t2.observations
            .lock()
            .expect("observations")
            .remove(&(peer, token));
    });
    t.observe(peer, token_key, task.abort_handle());
}

/// `GET /fw/{token}?title=&version=&size=&chunk=` (and `/sw/..`): a chunk of the package
/// assigned to the device (all of it without `size`); long answers go block-wise.
fn ota_download(t: &Transport, token: &str, kind: OtaKind, q: &[(String, String)]) -> Result<Reply, Reply> {
    let Credentials { device, .. } = device_of(t, token)?;
    let dir = t
        .hub
        .directory()
        .ok_or_else(|| refuse(ErrorClass::Unavailable, "the registry is not ready"))?;
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let info = dir
        .ota_info(&device.device, kind)
        .ok_or_else(|| refuse(ErrorClass::NotFound, "no OTA package assigned"))?;
    if param("title").is_some_and(|x| x != info.title) || param("version").is_some_and(|x| x != info.version)
    {
        return Err(refuse(ErrorClass::BadRequest, "title or version do not match"));
    }
    let number = |k: &str| {
        param(k)
            .filter(|v| !v.is_empty())
            .map_or(Ok(0), str::parse::<u64>)
    };
    let (Ok(size), Ok(chunk)) = (number("size"), number("chunk")) else {
        return Err(refuse(ErrorClass::BadRequest, "size and chunk must be numbers"));
    };
    let data = ota_chunk(dir.as_ref(), &device.device, kind, size, chunk)
        .ok_or_else(|| refuse(ErrorClass::NotFound, "OTA package data not available"))?;
    Ok(Reply::bytes(ResponseType::Content, data))
}
