//! One device connection: authenticate, then turn publishes into ingest records, acknowledge
//! each QoS 1 publish only after the record that carries it is committed (DESIGN invariant 2),
//! and deliver downlinks.
//!
//! Per session, appends form a pipeline of one: while an append is in flight, newer messages
//! queue and go out together as the next append, in arrival order. This keeps a device's
//! messages in order in the log even across retries and forwarding, and batches them when the
//! log is slow. When the queue is full the session stops reading its socket: backpressure
//! reaches the device through TCP.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use thingraft_log::{LogError, Record};
use thingraft_proto::device::{self, PayloadError};
use thingraft_proto::records::{DeviceRef, Ingest, IngestMsg, PartitionRecord, SessionRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::codec::{self, CodecError, ConnackCode, DisconnectCode, Incoming, PubAckCode, Version};
use crate::{Downlink, Transport};

/// Filters ThingsBoard accepts in SUBSCRIBE; anything else is refused.
const VALID_FILTERS: &[&str] = &[
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/+",
    "v2/a",
    "v2/a/j",
    "v2/a/p",
    "v2/a/res/+",
    "v2/a/res/j/+",
    "v2/a/res/p/+",
    "v2/r/req/+",
    "v2/r/req/j/+",
    "v2/r/req/p/+",
    "v2/r/res/+",
    "v2/r/res/j/+",
    "v2/r/res/p/+",
    "v2/fw/response/+/chunk/+",
    "v2/fw/error",
    "v2/sw/response/+/chunk/+",
    "v2/sw/error",
    "v1/gateway/attributes",
    "v1/gateway/rpc",
    "v1/gateway/attributes/response",
];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a session ended (for the log line).
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientDisconnect,
    Refused(&'static str),
    Protocol(String),
    Backend(LogError),
    KeepAlive,
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed the connection"),
            End::ClientDisconnect => f.write_str("client sent DISCONNECT"),
            End::Refused(why) => write!(f, "refused: {why}"),
            End::Protocol(why) => write!(f, "protocol error: {why}"),
            End::Backend(e) => write!(f, "log append failed: {e}"),
            End::KeepAlive => f.write_str("keep-alive expired"),
            End::Shutdown => f.write_str("node shutting down"),
        }
    }
}

/// An append's outcome and the PUBACKs it owes.
type AppendDone = (Result<(), LogError>, Vec<Option<u16>>);

/// A message waiting for its append, and the PUBACK it owes.
struct Queued {
    record: Record,
    pkid: Option<u16>,
}

struct Session {
    transport: Arc<Transport>,
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    version: Version,
    device: DeviceRef,
    session: SessionRef,
    partition: u32,
    queue: Vec<Queued>,
    subscriptions: Arc<AtomicU8>,
    /// Client-side RPCs waiting for an answer: (deadline, request id), oldest first.
    client_rpcs: std::collections::VecDeque<(tokio::time::Instant, u32)>,
}

/// Serves one accepted connection until it ends.
pub(crate) async fn run(transport: Arc<Transport>, stream: TcpStream, peer: std::net::SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut wbuf = BytesMut::new();
    let mut stream = stream;
    let max = transport.config.max_packet_bytes;
    // The first packet must be a CONNECT, and must come soon.
    let connect = tokio::time::timeout(
        Duration::from_millis(transport.config.connect_timeout_ms),
        async {
            loop {
                match codec::read(&mut rbuf, None, max) {
                    Ok(Some(Incoming::Connect(c))) => return Ok(c),
                    Ok(Some(_)) => return Err(CodecError::Malformed("first packet is not CONNECT".into())),
                    Ok(None) => {}
                    Err(e) => return Err(e),
                }
                match stream.read_buf(&mut rbuf).await {
                    Ok(0) | Err(_) => {
                        return Err(CodecError::Malformed("connection closed before CONNECT".into()));
                    }
                    Ok(_) => {}
                }
            }
        },
    )
    .await;
    let connect = match connect {
        Ok(Ok(c)) => c,
        Ok(Err(CodecError::UnsupportedProtocolLevel(level))) => {
            tracing::info!(%peer, level, "MQTT CONNECT with unsupported protocol level");
            codec::write_connack(
                &mut wbuf,
                Version::V3_1_1,
                ConnackCode::UnsupportedProtocolVersion,
                false,
            );
            let _ = stream.write_all(&wbuf).await;
            return;
        }
        Ok(Err(CodecError::ClientIdRejected(n))) => {
            tracing::info!(%peer, length = n, "MQTT 3.1 client id refused");
            codec::write_connack(&mut wbuf, Version::V3_1_1, ConnackCode::ClientIdNotValid, false);
            let _ = stream.write_all(&wbuf).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "MQTT connection refused before CONNECT");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "MQTT connection sent no CONNECT in time");
            return;
        }
    };
    let version = connect.version;
    let (device, credentials_key) = match transport.authenticate(&connect) {
        Ok(d) => d,
        Err(code) => {
            tracing::info!(%peer, client_id = %connect.client_id, ?code, "MQTT CONNECT refused");
            codec::write_connack(&mut wbuf, version, code, false);
            let _ = stream.write_all(&wbuf).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let session = SessionRef {
        node: transport.log.node_id(),
        session: transport.next_session_id(),
    };
    let (tx, rx) = mpsc::channel(64);
    let subscriptions = Arc::new(AtomicU8::new(0));
    transport.sessions.register(
        device.device,
        session.session,
        tx,
        subscriptions.clone(),
        credentials_key.into(),
    );
    codec::write_connack(&mut wbuf, version, ConnackCode::Accepted, !connect.clean_session);
    let partition = transport.log.partition_for_key(&device.device);
    let mut s = Session {
        transport: transport.clone(),
        stream,
        rbuf,
        wbuf,
        version,
        device,
        session,
        partition,
        queue: Vec::new(),
        subscriptions,
        client_rpcs: std::collections::VecDeque::new(),
    };
    s.enqueue(IngestMsg::Connect, None);
    let span = tracing::info_span!("mqtt", device = %s.device.name, session = s.session.session);
    let keep_alive_s = connect.keep_alive_s;
    let end = {
        let _e = span.enter();
        tracing::debug!(%peer, ?version, "MQTT session open");
        drop(_e);
        s.serve(rx, keep_alive_s).await
    };
    transport.sessions.unregister(&s.device.device, s.session.session);
    let _e = span.enter();
    match &end {
        End::ClientClosed | End::ClientDisconnect | End::Shutdown => {
            tracing::debug!(?end, "MQTT session closed")
        }
        _ => tracing::info!(?end, "MQTT session closed"),
    }
    drop(_e);
    // Record the disconnect; the device is gone, so nobody waits for it.
    let rec = s.record(IngestMsg::Disconnect);
    let log = transport.log.clone();
    let p = s.partition;
    tokio::spawn(async move {
        if let Err(e) = log.append(p, vec![rec]).await {
            tracing::debug!(error = %e, "disconnect event not recorded");
        }
    });
}

impl Session {
    fn record(&self, msg: IngestMsg) -> Record {
        let ingest = Ingest {
            tenant: self.device.tenant,
            device: self.device.device,
            ts_ms: now_ms(),
            session: Some(self.session),
            msg,
        };
        Record::new(
            self.device.device.to_vec(),
            PartitionRecord::Ingest(ingest).encode(),
        )
    }

    fn enqueue(&mut self, msg: IngestMsg, pkid: Option<u16>) {
        let record = self.record(msg);
        self.queue.push(Queued { record, pkid });
    }

    async fn serve(&mut self, downlinks: mpsc::Receiver<Downlink>, keep_alive_s: u16) -> End {
        let mut in_flight: Option<tokio::task::JoinHandle<AppendDone>> = None;
        let end = self.serve_loop(downlinks, keep_alive_s, &mut in_flight).await;
        if matches!(end, End::ClientDisconnect | End::ClientClosed) {
            // What the device sent before it left is still its data (QoS 0 messages have no
            // other chance): append it; nobody is left to acknowledge to.
            if let Some(h) = in_flight.take() {
                let _ = h.await;
            }
            let queued: Vec<Record> = std::mem::take(&mut self.queue)
                .into_iter()
                .map(|q| q.record)
                .collect();
            if !queued.is_empty()
                && let Err(e) = self.transport.log.append(self.partition, queued).await
            {
                tracing::info!(error = %e, "messages sent before disconnect not appended");
            }
        }
        end
    }

    async fn serve_loop(
        &mut self,
        mut downlinks: mpsc::Receiver<Downlink>,
        keep_alive_s: u16,
        in_flight: &mut Option<tokio::task::JoinHandle<AppendDone>>,
    ) -> End {
        let mut stop = self.transport.shutdown.subscribe();
        // MQTT: the server may close a connection silent for 1.5 × keep-alive.
        let idle = if keep_alive_s == 0 {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_millis(u64::from(keep_alive_s) * 1500)
        };
        let mut last_packet = tokio::time::Instant::now();
        let queue_max = self.transport.config.queued_messages_max;
        let report_every = Duration::from_millis(self.transport.config.activity_report_ms);
        let mut next_report = tokio::time::Instant::now() + report_every;
        // Packets seen since the last record this session appended (which reports activity).
        let mut unreported = false;
        loop {
            if !self.queue.is_empty() {
                unreported = false;
            }
            if in_flight.is_none() && !self.queue.is_empty() {
                let batch = std::mem::take(&mut self.queue);
                let (records, pkids): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|q| (q.record, q.pkid)).unzip();
                let log = self.transport.log.clone();
                let p = self.partition;
                *in_flight = Some(tokio::spawn(async move {
                    let r = log.append(p, records).await.map(|_| ());
                    (r, pkids)
                }));
            }
            if !self.wbuf.is_empty() {
                if let Err(e) = self.stream.write_all(&self.wbuf).await {
                    return End::Protocol(format!("write: {e}"));
                }
                self.wbuf.clear();
            }
            tokio::select! {
                r = self.stream.read_buf(&mut self.rbuf), if self.queue.len() < queue_max => {
                    match r {
                        Ok(0) => return End::ClientClosed,
                        Err(e) => return End::Protocol(format!("read: {e}")),
                        Ok(_) => {}
                    }
                    last_packet = tokio::time::Instant::now();
                    unreported = true;
                    loop {
                        match codec::read(&mut self.rbuf, Some(self.version), self.transport.config.max_packet_bytes) {
                            Ok(None) => break,
                            Ok(Some(p)) => {
                                if let Some(end) = self.handle(p) {
                                    let _ = self.stream.write_all(&self.wbuf).await;
                                    return end;
                                }
                            }
                            Err(e) => {
                                codec::write_disconnect(&mut self.wbuf, self.version, e.disconnect_code());
                                let _ = self.stream.write_all(&self.wbuf).await;
                                return End::Protocol(e.to_string());
                            }
                        }
                    }
                }
                done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    *in_flight = None;
                    match done {
                        Ok((Ok(()), pkids)) => {
                            for pkid in pkids.into_iter().flatten() {
                                codec::write_puback(&mut self.wbuf, self.version, pkid, PubAckCode::Success);
                            }
                        }
                        Ok((Err(e), _)) => {
                            // Not acknowledged, so the device keeps the messages and resends
                            // them on its next connection.
                            codec::write_disconnect(&mut self.wbuf, self.version, DisconnectCode::ImplementationSpecificError);
                            let _ = self.stream.write_all(&self.wbuf).await;
                            return End::Backend(e);
                        }
                        Err(e) => return End::Protocol(format!("append task: {e}")),
                    }
                }
                d = downlinks.recv() => {
                    match d {
                        Some(Downlink::Publish { topic, payload }) => {
                            // ThingsBoard publishes with the subscription's QoS, 1 if none; every
                            // filter it grants is QoS 1.
                            let pkid = self.transport.next_pkid();
                            codec::write_publish(&mut self.wbuf, self.version, &topic, 1, pkid, &payload);
                        }
                        Some(Downlink::Close(code)) | Some(Downlink::CloseWith(code, _)) => {
                            codec::write_disconnect(&mut self.wbuf, self.version, code);
                            let _ = self.stream.write_all(&self.wbuf).await;
                            return End::Refused("closed by the server");
                        }
                        None => return End::Shutdown,
                    }
                }
                () = async {
                    match self.client_rpcs.front() {
                        Some((deadline, _)) => tokio::time::sleep_until(*deadline).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((_, id)) = self.client_rpcs.pop_front() {
                        let t = format!("v1/devices/me/rpc/response/{id}");
                        let pkid = self.transport.next_pkid();
                        codec::write_publish(&mut self.wbuf, self.version, &t, 1, pkid, br#"{"error":"timeout"}"#);
                    }
                }
                _ = tokio::time::sleep_until(next_report) => {
                    next_report += report_every;
                    if unreported && self.queue.is_empty() {
                        unreported = false;
                        self.enqueue(IngestMsg::Activity, None);
                    }
                }
                _ = tokio::time::sleep_until(last_packet + idle) => {
                    codec::write_disconnect(&mut self.wbuf, self.version, DisconnectCode::KeepAliveTimeout);
                    let _ = self.stream.write_all(&self.wbuf).await;
                    return End::KeepAlive;
                }
                () = crate::stopped(&mut stop) => return End::Shutdown,
            }
        }
    }

    /// Handles one packet; `Some` ends the session.
    fn handle(&mut self, p: Incoming) -> Option<End> {
        match p {
            Incoming::Connect(_) => {
                codec::write_disconnect(&mut self.wbuf, self.version, DisconnectCode::ProtocolError);
                Some(End::Protocol("second CONNECT".into()))
            }
            Incoming::PingReq => {
                codec::write_pingresp(&mut self.wbuf, self.version);
                None
            }
            Incoming::Disconnect => Some(End::ClientDisconnect),
            Incoming::PubAck { .. } => None,
            Incoming::Subscribe { pkid, filters } => {
                let results: Vec<Result<u8, ()>> = filters
                    .iter()
                    .map(|(f, qos)| {
                        if VALID_FILTERS.contains(&f.as_str()) {
                            self.subscriptions
                                .fetch_or(subscription_bit(f), Ordering::Relaxed);
                            Ok((*qos).min(1))
                        } else {
                            tracing::info!(filter = %f, "subscription refused");
                            Err(())
                        }
                    })
                    .collect();
                codec::write_suback(&mut self.wbuf, self.version, pkid, &results);
                None
            }
            Incoming::Unsubscribe { pkid, filters } => {
                for f in &filters {
                    self.subscriptions
                        .fetch_and(!subscription_bit(f), Ordering::Relaxed);
                }
                codec::write_unsuback(&mut self.wbuf, self.version, pkid, filters.len());
                None
            }
            Incoming::Publish {
                topic,
                qos,
                pkid,
                payload,
            } => self.publish(&topic, qos, pkid, &payload),
        }
    }

    fn publish(&mut self, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Option<End> {
        let ack = (qos > 0).then_some(pkid);
        let parsed: Result<IngestMsg, PayloadError> = match topic {
            "v1/devices/me/telemetry" | "v2/t" | "v2/t/j" => {
                device::parse_telemetry(payload, now_ms()).map(IngestMsg::Telemetry)
            }
            "v1/devices/me/attributes" | "v2/a" | "v2/a/j" => {
                device::parse_attributes(payload).map(IngestMsg::ClientAttributes)
            }
            _ if topic.starts_with("v1/devices/me/attributes/request/") => {
                let id = &topic["v1/devices/me/attributes/request/".len()..];
                match id.parse::<u32>() {
                    Err(_) => Err(PayloadError::InvalidJson(format!(
                        "request id {id:?} is not a number"
                    ))),
                    Ok(request_id) => parse_attribute_request(payload).map(|(client_keys, shared_keys)| {
                        IngestMsg::AttributeRequest {
                            request_id,
                            client_keys,
                            shared_keys,
                        }
                    }),
                }
            }
            _ if topic.starts_with("v1/devices/me/rpc/response/") => {
                let id = &topic["v1/devices/me/rpc/response/".len()..];
                match id.parse::<u32>() {
                    Err(_) => Err(PayloadError::InvalidJson(format!(
                        "rpc id {id:?} is not a number"
                    ))),
                    Ok(id) => Ok(IngestMsg::RpcResponse {
                        id,
                        payload: String::from_utf8_lossy(payload).into_owned(),
                    }),
                }
            }
            _ => {
                if let Some(id) = topic.strip_prefix("v1/devices/me/rpc/request/")
                    && let Some(reply) = session_limits_reply(payload, &self.transport.config)
                {
                    // Answered by the transport itself, as ThingsBoard does.
                    if let Some(pkid) = ack {
                        codec::write_puback(&mut self.wbuf, self.version, pkid, PubAckCode::Success);
                    }
                    let t = format!("v1/devices/me/rpc/response/{id}");
                    codec::write_publish(
                        &mut self.wbuf,
                        self.version,
                        &t,
                        1,
                        self.transport.next_pkid(),
                        reply.as_bytes(),
                    );
                    return None;
                }
                if let Some(id) = topic.strip_prefix("v1/devices/me/rpc/request/") {
                    return self.client_rpc(id, payload, ack);
                }
                tracing::info!(topic, "publish to an unknown topic dropped");
                if let Some(pkid) = ack {
                    codec::write_puback(&mut self.wbuf, self.version, pkid, PubAckCode::TopicNameInvalid);
                }
                return None;
            }
        };
        match parsed {
            Ok(msg) => {
                self.enqueue(msg, ack);
                None
            }
            Err(e) => self.refuse(topic, &e, ack),
        }
    }
}

impl Session {
    /// A client-side RPC: recorded in the log (acknowledged after the commit), answered with a
    /// timeout unless something replies first.
    fn client_rpc(&mut self, id: &str, payload: &[u8], ack: Option<u16>) -> Option<End> {
        let parsed = id
            .parse::<u32>()
            .map_err(|_| PayloadError::InvalidJson(format!("request id {id:?} is not a number")))
            .and_then(|request_id| {
                let v: serde_json::Value =
                    serde_json::from_slice(payload).map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
                let method = v
                    .get("method")
                    .and_then(|m| m.as_str())
                    .ok_or_else(|| PayloadError::InvalidJson("client RPC without a method".into()))?;
                let params = v.get("params").cloned().unwrap_or(serde_json::Value::Null);
                Ok((request_id, method.to_string(), params.to_string()))
            });
        match parsed {
            Ok((request_id, method, params)) => {
                self.enqueue(
                    IngestMsg::ClientRpc {
                        request_id,
                        method,
                        params,
                    },
                    ack,
                );
                let deadline = tokio::time::Instant::now()
                    + Duration::from_millis(self.transport.config.client_rpc_timeout_ms);
                // Bounded like the message queue: a device flooding RPCs loses the oldest timers.
                if self.client_rpcs.len() >= 1024 {
                    self.client_rpcs.pop_front();
                }
                self.client_rpcs.push_back((deadline, request_id));
                None
            }
            Err(e) => self.refuse(&format!("v1/devices/me/rpc/request/{id}"), &e, ack),
        }
    }

    /// Refuses a publish with invalid content: PUBACK 0x99 on MQTT 5; on 3.1.1 ThingsBoard
    /// closes the connection.
    fn refuse(&mut self, topic: &str, e: &PayloadError, ack: Option<u16>) -> Option<End> {
        tracing::info!(topic, error = %e, "invalid payload refused");
        match (self.version, ack) {
            (Version::V5, Some(pkid)) => {
                codec::write_puback(
                    &mut self.wbuf,
                    self.version,
                    pkid,
                    PubAckCode::PayloadFormatInvalid,
                );
                None
            }
            (Version::V5, None) => None,
            (Version::V3_1_1, _) => Some(End::Protocol(format!("invalid payload on {topic}: {e}"))),
        }
    }
}

/// The downlinks a subscription filter asks for.
fn subscription_bit(filter: &str) -> u8 {
    match filter {
        "v1/devices/me/attributes" | "v2/a" | "v2/a/j" | "v2/a/p" => crate::SUB_ATTRIBUTES,
        "v1/devices/me/rpc/request/+" | "v2/r/req/+" | "v2/r/req/j/+" | "v2/r/req/p/+" => crate::SUB_RPC,
        _ => 0,
    }
}

type KeyLists = (Option<Vec<String>>, Option<Vec<String>>);

/// `{"clientKeys":"a,b","sharedKeys":"c,d"}` (both optional, comma-separated strings).
fn parse_attribute_request(payload: &[u8]) -> Result<KeyLists, PayloadError> {
    let v: serde_json::Value = if payload.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(payload).map_err(|e| PayloadError::InvalidJson(e.to_string()))?
    };
    let list = |k: &str| -> Option<Vec<String>> {
        v.get(k).and_then(|x| x.as_str()).map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
    };
    if !v.is_object() {
        return Err(PayloadError::InvalidJson(
            "attribute request must be a JSON object".into(),
        ));
    }
    Ok((list("clientKeys"), list("sharedKeys")))
}

/// The transport's own answer to `getSessionLimits`, or `None` for any other RPC.
fn session_limits_reply(payload: &[u8], config: &crate::MqttConfig) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if v.get("method")?.as_str()? != "getSessionLimits" {
        return None;
    }
    Some(
        serde_json::json!({
            "maxPayloadSize": config.max_packet_bytes,
            "maxInflightMessages": config.queued_messages_max,
            "rateLimits": {"messages": null, "telemetryMessages": null, "telemetryDataPoints": null},
        })
        .to_string(),
    )
}
