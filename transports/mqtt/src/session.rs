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
use std::time::Duration;

use bytes::BytesMut;
use thingraft_log::probe::{self, Stage};
use thingraft_log::{LogError, Record};
use thingraft_proto::device::{self, PayloadError};
use thingraft_proto::records::{DownlinkMsg, EntityId, IngestMsg, RpcStatus};
use thingraft_transport_common::payload::{self, CLIENT_RPC_TIMEOUT};
use thingraft_transport_common::proto_payload::{
    self, DeviceTransport, Format, ProtoSchemas, Uplink, uplink_json,
};
use thingraft_transport_common::{
    ClaimError, Downlink, MqttTopics, OtaKind, SUB_ATTRIBUTES, SUB_RPC, now_ms, topic_matches,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::Transport;
use crate::codec::{self, CodecError, ConnackCode, DisconnectCode, Incoming, PubAckCode, Version};
use crate::gateway::{self, ChildOp, Gateway, GatewayTopic};

/// How long a CONNECT whose credentials are unknown waits for a restarted node's metadata to
/// catch up before it is refused as "server unavailable".
const CATCH_UP_WAIT: Duration = Duration::from_secs(3);

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

/// A topic family: ThingsBoard answers and pushes on the family the device last used for
/// that kind of exchange (its `TopicType`: V1, V2, V2_JSON, V2_PROTO).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Family {
    #[default]
    V1,
    V2,
    V2Json,
    V2Proto,
}

impl Family {
    /// The `v2` short form's infix: `""`, `"j/"` or `"p/"`.
    fn v2(self) -> &'static str {
        match self {
            Family::V1 | Family::V2 => "",
            Family::V2Json => "j/",
            Family::V2Proto => "p/",
        }
    }

    fn attributes(self) -> &'static str {
        match self {
            Family::V1 => "v1/devices/me/attributes",
            Family::V2 => "v2/a",
            Family::V2Json => "v2/a/j",
            Family::V2Proto => "v2/a/p",
        }
    }

    fn attribute_response(self, id: u32) -> String {
        match self {
            Family::V1 => format!("v1/devices/me/attributes/response/{id}"),
            _ => format!("v2/a/res/{}{id}", self.v2()),
        }
    }

    fn rpc_request(self, id: u32) -> String {
        match self {
            Family::V1 => format!("v1/devices/me/rpc/request/{id}"),
            _ => format!("v2/r/req/{}{id}", self.v2()),
        }
    }

    fn rpc_response(self, id: &str) -> String {
        match self {
            Family::V1 => format!("v1/devices/me/rpc/response/{id}"),
            _ => format!("v2/r/res/{}{id}", self.v2()),
        }
    }

    /// The payload format of the family's uplinks.
    fn format(self) -> Format {
        match self {
            Family::V1 | Family::V2 => Format::Profile,
            Family::V2Json => Format::Json,
            Family::V2Proto => Format::Protobuf,
        }
    }
}

/// What a publish topic asks for.
#[derive(Debug, PartialEq, Eq)]
enum Topic<'a> {
    Telemetry(Format),
    Attributes(Format),
    AttributeRequest(Family, &'a str),
    RpcResponse(Format, &'a str),
    ClientRpc(Family, &'a str),
    Claim,
    /// An OTA chunk request: kind, request id, chunk index.
    Ota(OtaKind, &'a str, &'a str),
    Unknown,
}

/// Makes a [`Topic`] of the id after a prefix.
type TopicOf = fn(&str) -> Topic<'_>;

fn classify(topic: &str) -> Topic<'_> {
    match topic {
        "v1/devices/me/telemetry" | "v2/t" => return Topic::Telemetry(Format::Profile),
        "v2/t/j" => return Topic::Telemetry(Format::Json),
        "v2/t/p" => return Topic::Telemetry(Format::Protobuf),
        "v1/devices/me/attributes" | "v2/a" => return Topic::Attributes(Format::Profile),
        "v2/a/j" => return Topic::Attributes(Format::Json),
        "v2/a/p" => return Topic::Attributes(Format::Protobuf),
        "v1/devices/me/claim" => return Topic::Claim,
        _ => {}
    }
    for (prefix, kind) in [
        ("v2/fw/request/", OtaKind::Firmware),
        ("v2/sw/request/", OtaKind::Software),
    ] {
        if let Some((rid, idx)) = topic.strip_prefix(prefix).and_then(|r| r.split_once("/chunk/"))
            && !rid.is_empty()
            && !idx.is_empty()
            && !idx.contains('/')
        {
            return Topic::Ota(kind, rid, idx);
        }
    }
    // Longer prefixes first: `v2/a/req/j/5` also starts with `v2/a/req/`.
    let prefixed: [(&str, TopicOf); 12] = [
        ("v1/devices/me/attributes/request/", |id| {
            Topic::AttributeRequest(Family::V1, id)
        }),
        ("v2/a/req/j/", |id| Topic::AttributeRequest(Family::V2Json, id)),
        ("v2/a/req/p/", |id| Topic::AttributeRequest(Family::V2Proto, id)),
        ("v2/a/req/", |id| Topic::AttributeRequest(Family::V2, id)),
        ("v1/devices/me/rpc/response/", |id| {
            Topic::RpcResponse(Format::Profile, id)
        }),
        ("v2/r/res/j/", |id| Topic::RpcResponse(Format::Json, id)),
        ("v2/r/res/p/", |id| Topic::RpcResponse(Format::Protobuf, id)),
        ("v2/r/res/", |id| Topic::RpcResponse(Format::Profile, id)),
        ("v1/devices/me/rpc/request/", |id| {
            Topic::ClientRpc(Family::V1, id)
        }),
        ("v2/r/req/j/", |id| Topic::ClientRpc(Family::V2Json, id)),
        ("v2/r/req/p/", |id| Topic::ClientRpc(Family::V2Proto, id)),
        ("v2/r/req/", |id| Topic::ClientRpc(Family::V2, id)),
    ];
    for (prefix, make) in prefixed {
        if let Some(id) = topic.strip_prefix(prefix)
            && !id.is_empty()
            && !id.contains('/')
        {
            return make(id);
        }
    }
    Topic::Unknown
}

/// The families a session uses, per kind of exchange.
#[derive(Debug, Default)]
struct Families {
    /// Shared-attribute pushes: set by the attributes subscription.
    attributes: Family,
    /// Server-side RPC requests: set by the RPC subscription.
    rpc: Family,
    /// Attribute responses: set by the last attribute request.
    attribute_request: Family,
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

/// An append of the session's in flight. Polled by the session itself rather than spawned: a
/// task per append costs a spawn and a cross-thread wake-up per message at low rates.
type Append = std::pin::Pin<Box<dyn std::future::Future<Output = AppendDone> + Send>>;

/// Most appends a session keeps in flight.
const APPENDS_IN_FLIGHT_MAX: usize = 8;

/// Most server-side RPCs a session remembers while it waits for their PUBACKs.
const RPCS_UNACKED_MAX: usize = 256;

/// The session's appends in flight, oldest first; PUBACKs go out in this order (MQTT 3.1.1
/// §4.6). Several are in flight only while each was enqueued at the local leader of one
/// partition ([`LogHandle::enqueue`](thingraft_log::LogHandle::enqueue)), which keeps their
/// order in the log; any other append (a forward to another node, a gateway's records for many
/// partitions, a full queue) goes alone.
#[derive(Default)]
struct InFlight {
    appends: std::collections::VecDeque<Append>,
    /// The partition of the enqueued appends, `None` when the one in flight is not enqueued.
    enqueued: Option<u32>,
    /// Messages in the appends.
    messages: usize,
}

/// A message waiting for its append, and the PUBACK it owes.
struct Queued {
    /// When the message was read (for the latency probe).
    at: std::time::Instant,
    record: Record,
    /// The partition of the record's device (a gateway's children are on many).
    partition: u32,
    pkid: Option<u16>,
}

struct Session {
    transport: Arc<Transport>,
    stream: crate::Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    version: Version,
    s: thingraft_transport_common::Session,
    queue: Vec<Queued>,
    /// The PUBACKs owed, in the order of their PUBLISHes (MQTT 3.1.1 §4.6): each with its code
    /// once known, `None` while its message's append is in flight. Written from the front as
    /// they become known, so a PUBACK answered at once waits for the ones owed before it.
    acks: std::collections::VecDeque<(u16, Option<PubAckCode>)>,
    /// Server-side RPCs published and not yet acknowledged by the device: packet id → the
    /// DELIVERED record of the RPC (of a child's device, for a gateway's; made when it was
    /// published, so it is recorded even if the child has left by the PUBACK), oldest first.
    /// A PUBACK appends it (ThingsBoard: SENT → DELIVERED on PUBACK).
    rpcs_unacked: std::collections::VecDeque<(u16, Queued)>,
    /// The packet id of the last PUBLISH to the device.
    pkid: u16,
    families: Families,
    /// Client-side RPCs waiting for an answer: (deadline, request id, response topic, and a
    /// protobuf request's id when the answer is a `ToServerRpcResponseMsg`), oldest first.
    client_rpcs: std::collections::VecDeque<(tokio::time::Instant, u32, String, Option<u32>)>,
    /// The children of a gateway device's connection (`None`: not a gateway).
    gateway: Option<Gateway>,
    /// The OTA chunk size this device asked for last (0: whole packages).
    ota_chunk_size: u64,
    /// The device profile's protobuf schemas for MQTT, as they were at CONNECT (`None`: JSON).
    proto: Option<Arc<ProtoSchemas>>,
    /// The device profile's own MQTT topics, as they were at CONNECT (`None`: the defaults).
    topics: Option<Arc<MqttTopics>>,
}

/// Serves one accepted connection until it ends.
/// `x509` is the credentials key of the client certificate a TLS connection presented, if any.
pub(crate) async fn run(
    transport: Arc<Transport>,
    stream: crate::Stream,
    peer: std::net::SocketAddr,
    x509: Option<String>,
) {
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
    if crate::provision::is_provisioning(&connect) {
        tracing::debug!(%peer, "MQTT provisioning connection");
        crate::provision::serve(transport, stream, rbuf, version).await;
        return;
    }
    let authenticate = || match &x509 {
        // A client certificate decides alone, as in ThingsBoard.
        Some(key) => transport.hub.lookup(key).ok_or(ConnackCode::NotAuthorized),
        None => transport.authenticate(&connect),
    };
    let mut authenticated = authenticate();
    // A node that was down may not have applied the credentials yet: wait for its metadata
    // replica to catch up before refusing, and if it does not in time, say "server unavailable"
    // (the device retries) rather than "not authorized".
    if authenticated.is_err() && !transport.hub.is_caught_up() {
        if transport.hub.wait_caught_up(CATCH_UP_WAIT).await {
            authenticated = authenticate();
        } else {
            authenticated = Err(ConnackCode::ServerUnavailable);
        }
    }
    let credentials = match authenticated {
        Ok(c) => c,
        Err(code) => {
            tracing::info!(%peer, client_id = %connect.client_id, ?code, "MQTT CONNECT refused");
            codec::write_connack(&mut wbuf, version, code, false);
            let _ = stream.write_all(&wbuf).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let device = (*credentials.device).clone();
    let (tx, rx) = mpsc::channel(64);
    let is_gateway = transport
        .hub
        .directory()
        .is_some_and(|d| d.is_gateway(&device.device));
    let gateway = is_gateway.then(|| Gateway::new(tx.clone(), credentials.clone()));
    let proto = transport
        .hub
        .directory()
        .and_then(|d| d.proto_schemas(&device.device, DeviceTransport::Mqtt));
    let topics = transport
        .hub
        .directory()
        .and_then(|d| d.mqtt_topics(&device.device));
    let session = transport.hub.open_session_on(device, credentials, 0, tx);
    codec::write_connack(&mut wbuf, version, ConnackCode::Accepted, !connect.clean_session);
    let mut s = Session {
        transport: transport.clone(),
        stream,
        rbuf,
        wbuf,
        version,
        s: session,
        queue: Vec::new(),
        acks: std::collections::VecDeque::new(),
        rpcs_unacked: std::collections::VecDeque::new(),
        pkid: 0,
        families: Families::default(),
        client_rpcs: std::collections::VecDeque::new(),
        gateway,
        ota_chunk_size: 0,
        proto,
        topics,
    };
    s.enqueue(IngestMsg::Connect, None);
    let span = tracing::info_span!("mqtt", device = %s.s.device.name, session = s.s.id.session);
    let keep_alive_s = connect.keep_alive_s;
    let end = {
        let _e = span.enter();
        tracing::debug!(%peer, ?version, "MQTT session open");
        drop(_e);
        s.serve(rx, keep_alive_s).await
    };
    let _e = span.enter();
    match &end {
        End::ClientClosed | End::ClientDisconnect | End::Shutdown => {
            tracing::debug!(?end, "MQTT session closed")
        }
        _ => tracing::info!(?end, "MQTT session closed"),
    }
    drop(_e);
    // Record the disconnect; the device is gone, so nobody waits for it. The session leaves
    // the session table (its drop) once the record is appended.
    let mut sessions = vec![s.s];
    if let Some(mut g) = s.gateway {
        sessions.extend(g.drain());
    }
    for session in sessions {
        tokio::spawn(async move {
            if let Err(e) = session.submit(vec![IngestMsg::Disconnect]).await {
                tracing::debug!(error = %e, "disconnect event not recorded");
            }
        });
    }
}

impl Session {
    /// A packet id for a PUBLISH to the device: the session's own sequence, skipping 0 and the
    /// ids of RPCs still waiting for their PUBACK (at most [`RPCS_UNACKED_MAX`] of 65,535), so
    /// that a PUBACK always names the message it acknowledges.
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.pkid = self.pkid.wrapping_add(1);
            if self.pkid != 0 && !self.rpcs_unacked.iter().any(|(p, _)| *p == self.pkid) {
                return self.pkid;
            }
        }
    }

    /// Remembers a server-side RPC of `device` (the session's own, or a gateway child's)
    /// published under `pkid`, until the device acknowledges it.
    fn published_rpc(&mut self, pkid: u16, device: EntityId, uuid: Option<EntityId>) {
        let Some(uuid) = uuid else { return };
        let msg = IngestMsg::RpcStatus {
            uuid,
            status: RpcStatus::Delivered,
        };
        let (record, partition) = if device == self.s.device.device {
            (self.s.record(msg), self.s.partition)
        } else if let Some(child) = self.gateway.as_ref().and_then(|g| g.child_of(&device)) {
            (child.record(msg), child.partition)
        } else {
            return;
        };
        // Bounded: a device that never acknowledges loses the oldest (its RPCs stay SENT, and
        // the partition's leader sends them again).
        if self.rpcs_unacked.len() >= RPCS_UNACKED_MAX {
            self.rpcs_unacked.pop_front();
        }
        let delivered = Queued {
            at: std::time::Instant::now(),
            record,
            partition,
            pkid: None,
        };
        self.rpcs_unacked.push_back((pkid, delivered));
    }

    /// A PUBACK from the device: the RPC published under `pkid`, if any, is DELIVERED.
    fn rpc_acked(&mut self, pkid: u16) {
        if let Some(i) = self.rpcs_unacked.iter().position(|(p, _)| *p == pkid) {
            let (_, mut delivered) = self.rpcs_unacked.remove(i).expect("found above");
            delivered.at = std::time::Instant::now();
            self.queue.push(delivered);
        }
    }

    fn enqueue(&mut self, msg: IngestMsg, pkid: Option<u16>) {
        if let Some(pkid) = pkid {
            self.acks.push_back((pkid, None));
        }
        let record = self.s.record(msg);
        let partition = self.s.partition;
        self.queue.push(Queued {
            at: std::time::Instant::now(),
            record,
            partition,
            pkid,
        });
    }

    async fn serve(&mut self, downlinks: mpsc::Receiver<Downlink>, keep_alive_s: u16) -> End {
        let mut in_flight = InFlight::default();
        let end = self.serve_loop(downlinks, keep_alive_s, &mut in_flight).await;
        if matches!(end, End::ClientDisconnect | End::ClientClosed) {
            // What the device sent before it left is still its data (QoS 0 messages have no
            // other chance): append it; nobody is left to acknowledge to.
            for h in in_flight.appends.drain(..) {
                let _ = h.await;
            }
            let queued = std::mem::take(&mut self.queue);
            if !queued.is_empty()
                && let (Err(e), _) = append_all(&self.transport.hub.log, queued).await
            {
                tracing::info!(error = %e, "messages sent before disconnect not appended");
            }
        } else {
            // Appends already under way finish on their own, as they would have as tasks.
            for h in in_flight.appends.drain(..) {
                tokio::spawn(h);
            }
        }
        end
    }

    async fn serve_loop(
        &mut self,
        mut downlinks: mpsc::Receiver<Downlink>,
        keep_alive_s: u16,
        in_flight: &mut InFlight,
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
        // Two timers for the whole session rather than two made and dropped at every turn of
        // the loop (each a registration in tokio's timer wheel and a removal): the idle one is
        // moved on lazily, when it fires before the connection has been silent for `idle`.
        let report_timer = tokio::time::sleep_until(next_report);
        let idle_timer = tokio::time::sleep_until(last_packet + idle);
        // Likewise one wait for the shutdown, not a waiter added and removed at every turn.
        let stopped = crate::stopped(&mut stop);
        tokio::pin!(report_timer, idle_timer, stopped);
        // Packets seen since the last record this session appended (which reports activity).
        let mut unreported = false;
        // Packets the client sent right behind its CONNECT are already buffered.
        if let Some(end) = self.handle_buffered().await {
            return end;
        }
        loop {
            if !self.queue.is_empty() {
                unreported = false;
            }
            if !self.queue.is_empty()
                && let Some(mut append) = self.start_append(in_flight)
            {
                if !in_flight.appends.is_empty() {
                    // Enqueued behind the others: its PUBACKs wait for theirs.
                    in_flight.appends.push_back(append);
                } else {
                    // One poll now hands the records to the log before a socket write below
                    // can block on a client that does not read.
                    match futures::poll!(append.as_mut()) {
                        std::task::Poll::Ready(done) => {
                            in_flight.messages -= done.1.len();
                            in_flight.enqueued = None;
                            if let Some(end) = self.appended(done).await {
                                return end;
                            }
                        }
                        std::task::Poll::Pending => in_flight.appends.push_back(append),
                    }
                }
            }
            if !self.wbuf.is_empty() {
                if let Err(e) = self.stream.write_all(&self.wbuf).await {
                    return End::Protocol(format!("write: {e}"));
                }
                self.wbuf.clear();
            }
            tokio::select! {
                r = self.stream.read_buf(&mut self.rbuf), if self.queue.len() + in_flight.messages < queue_max => {
                    match r {
                        Ok(0) => return End::ClientClosed,
                        Err(e) => return End::Protocol(format!("read: {e}")),
                        Ok(_) => {}
                    }
                    last_packet = tokio::time::Instant::now();
                    unreported = true;
                    if let Some(end) = self.handle_buffered().await {
                        return end;
                    }
                }
                done = async { in_flight.appends.front_mut().expect("guarded").await }, if !in_flight.appends.is_empty() => {
                    let mut done = Some(done);
                    // Appends answered together (one Raft entry) write their PUBACKs together.
                    while let Some(d) = done.take() {
                        in_flight.appends.pop_front();
                        in_flight.messages -= d.1.len();
                        if let Some(end) = self.appended(d).await {
                            return end;
                        }
                        if let Some(next) = in_flight.appends.front_mut()
                            && let std::task::Poll::Ready(d) = futures::poll!(next.as_mut())
                        {
                            done = Some(d);
                        }
                    }
                    if in_flight.appends.is_empty() {
                        in_flight.enqueued = None;
                    }
                }
                d = downlinks.recv() => {
                    match d {
                        Some(Downlink::Msg(device, m)) if device != self.s.device.device => {
                            let protobuf = self.proto.is_some();
                            let rpc = m.rpc_uuid();
                            if let Some((topic, payload)) =
                                self.gateway.as_mut().and_then(|g| g.downlink(device, m, protobuf))
                            {
                                let pkid = self.next_pkid();
                                codec::write_publish(&mut self.wbuf, self.version, topic, 1, pkid, &payload);
                                self.published_rpc(pkid, device, rpc);
                            }
                        }
                        Some(Downlink::Msg(_, DownlinkMsg::ClientRpcResponse { request_id, body })) => {
                            self.client_rpc_answered(request_id, &body);
                        }
                        Some(Downlink::Msg(_, m)) => {
                            let (family, topic) = match &m {
                                DownlinkMsg::ClientRpcResponse { .. } => continue,
                                DownlinkMsg::AttributeUpdate { .. } => {
                                    let f = self.families.attributes;
                                    (f, f.attributes().to_string())
                                }
                                DownlinkMsg::AttributeResponse { request_id, .. } => {
                                    let f = self.families.attribute_request;
                                    (f, f.attribute_response(*request_id))
                                }
                                DownlinkMsg::RpcRequest { id, .. } => {
                                    let f = self.families.rpc;
                                    (f, f.rpc_request(*id))
                                }
                            };
                            if let Some(payload) = self.downlink_payload(family, &m) {
                                // ThingsBoard publishes with the subscription's QoS, 1 if none;
                                // every filter it grants is QoS 1.
                                let pkid = self.next_pkid();
                                codec::write_publish(&mut self.wbuf, self.version, &topic, 1, pkid, &payload);
                                self.published_rpc(pkid, self.s.device.device, m.rpc_uuid());
                            }
                        }
                        Some(Downlink::Close) => {
                            // Credentials changed or deleted: ThingsBoard answers 0x98.
                            codec::write_disconnect(&mut self.wbuf, self.version, DisconnectCode::AdministrativeAction);
                            let _ = self.stream.write_all(&self.wbuf).await;
                            return End::Refused("closed by the server");
                        }
                        None => return End::Shutdown,
                    }
                }
                () = async {
                    match self.client_rpcs.front() {
                        Some((deadline, ..)) => tokio::time::sleep_until(*deadline).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((_, _, t, proto_id)) = self.client_rpcs.pop_front() {
                        let body = match proto_id {
                            Some(rid) => proto_payload::client_rpc_response(rid, "", "timeout"),
                            None => CLIENT_RPC_TIMEOUT.as_bytes().to_vec(),
                        };
                        let pkid = self.next_pkid();
                        codec::write_publish(&mut self.wbuf, self.version, &t, 1, pkid, &body);
                    }
                }
                () = &mut report_timer => {
                    next_report += report_every;
                    report_timer.as_mut().reset(next_report);
                    if unreported && self.queue.is_empty() {
                        unreported = false;
                        self.enqueue(IngestMsg::Activity, None);
                    }
                }
                () = &mut idle_timer => {
                    if last_packet + idle > tokio::time::Instant::now() {
                        idle_timer.as_mut().reset(last_packet + idle);
                        continue;
                    }
                    codec::write_disconnect(&mut self.wbuf, self.version, DisconnectCode::KeepAliveTimeout);
                    let _ = self.stream.write_all(&self.wbuf).await;
                    return End::KeepAlive;
                }
                () = &mut stopped => return End::Shutdown,
            }
        }
    }

    /// Takes the queued messages into a new append if the ones in flight allow it (see
    /// [`InFlight`]); counts them in.
    fn start_append(&mut self, in_flight: &mut InFlight) -> Option<Append> {
        let log = &self.transport.hub.log;
        let partition = self.queue[0].partition;
        let one_partition = self.queue.iter().all(|q| q.partition == partition);
        let enqueued_before = in_flight.enqueued;
        // Only an append of the same partition can be enqueued behind the ones in flight; any
        // other (another partition, a gateway's records for several) waits until they are done.
        if !in_flight.appends.is_empty()
            && (!one_partition
                || enqueued_before != Some(partition)
                || in_flight.appends.len() >= APPENDS_IN_FLIGHT_MAX)
        {
            return None;
        }
        let batch = std::mem::take(&mut self.queue);
        if one_partition {
            let records = batch.iter().map(|q| q.record.clone()).collect();
            match log.enqueue(partition, records) {
                Ok(commit) => {
                    let started = std::time::Instant::now();
                    probe::rec(Stage::SessionQueue, started - batch[0].at);
                    in_flight.enqueued = Some(partition);
                    in_flight.messages += batch.len();
                    let pkids = batch.into_iter().map(|q| q.pkid).collect();
                    return Some(Box::pin(async move {
                        let r = commit.await;
                        probe::rec(Stage::SessionAppend, started.elapsed());
                        (r, pkids)
                    }));
                }
                Err(_) if enqueued_before.is_some() => {
                    // It cannot go behind the enqueued ones: wait until they are done.
                    self.queue = batch;
                    return None;
                }
                Err(_) => {}
            }
        }
        in_flight.enqueued = None;
        in_flight.messages += batch.len();
        let log = log.clone();
        Some(Box::pin(async move { append_all(&log, batch).await }))
    }

    /// An append's outcome: the PUBACKs it owes, or the end of the session if it failed.
    async fn appended(&mut self, done: AppendDone) -> Option<End> {
        match done {
            (Ok(()), pkids) => {
                for pkid in pkids.into_iter().flatten() {
                    if let Some(a) = self
                        .acks
                        .iter_mut()
                        .find(|(p, code)| *p == pkid && code.is_none())
                    {
                        a.1 = Some(PubAckCode::Success);
                    }
                }
                self.write_known_acks();
                None
            }
            (Err(e), _) => {
                // Not acknowledged, so the device keeps the messages and resends them on its
                // next connection.
                codec::write_disconnect(
                    &mut self.wbuf,
                    self.version,
                    DisconnectCode::ImplementationSpecificError,
                );
                let _ = self.stream.write_all(&self.wbuf).await;
                Some(End::Backend(e))
            }
        }
    }

    /// Owes a PUBACK with `code` for `pkid`, known now: written after the ones owed before it.
    fn ack(&mut self, pkid: u16, code: PubAckCode) {
        self.acks.push_back((pkid, Some(code)));
        self.write_known_acks();
    }

    /// Writes the PUBACKs at the front of [`Session::acks`] whose codes are known.
    fn write_known_acks(&mut self) {
        while let Some(&(pkid, Some(code))) = self.acks.front() {
            codec::write_puback(&mut self.wbuf, self.version, pkid, code);
            self.acks.pop_front();
        }
    }

    /// Handles every whole packet in the read buffer; `Some` ends the session (what it owes the
    /// client is written first).
    async fn handle_buffered(&mut self) -> Option<End> {
        loop {
            match codec::read(
                &mut self.rbuf,
                Some(self.version),
                self.transport.config.max_packet_bytes,
            ) {
                Ok(None) => return None,
                Ok(Some(p)) => {
                    if let Some(end) = self.handle(p).await {
                        let _ = self.stream.write_all(&self.wbuf).await;
                        return Some(end);
                    }
                }
                Err(e) => {
                    codec::write_disconnect(&mut self.wbuf, self.version, e.disconnect_code());
                    let _ = self.stream.write_all(&self.wbuf).await;
                    return Some(End::Protocol(e.to_string()));
                }
            }
        }
    }

    /// Handles one packet; `Some` ends the session.
    async fn handle(&mut self, p: Incoming) -> Option<End> {
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
            Incoming::PubAck { pkid } => {
                self.rpc_acked(pkid);
                None
            }
            Incoming::Subscribe { pkid, filters } => {
                let results: Vec<Result<u8, ()>> = filters
                    .iter()
                    .map(|(f, qos)| {
                        let custom = self
                            .topics
                            .as_ref()
                            .is_some_and(|t| topic_matches(&t.attributes_subscribe, f));
                        if VALID_FILTERS.contains(&f.as_str()) || custom {
                            let (bit, family) = if custom {
                                (SUB_ATTRIBUTES, Family::V1)
                            } else {
                                subscription(f)
                            };
                            match bit {
                                SUB_ATTRIBUTES => self.families.attributes = family,
                                SUB_RPC => self.families.rpc = family,
                                _ => {}
                            }
                            self.s.subscribe(bit);
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
                    self.s.unsubscribe(subscription(f).0);
                }
                codec::write_unsuback(&mut self.wbuf, self.version, pkid, filters.len());
                None
            }
            Incoming::Publish {
                topic,
                qos,
                pkid,
                payload,
            } => self.publish(&topic, qos, pkid, &payload).await,
        }
    }

    async fn publish(&mut self, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Option<End> {
        let ack = (qos > 0).then_some(pkid);
        if let Some(g) = GatewayTopic::of(topic)
            && self.gateway.is_some()
        {
            return self.gateway_publish(topic, g, payload, ack).await;
        }
        let parsed: Result<IngestMsg, PayloadError> = match self.classify(topic) {
            Topic::Telemetry(format) => {
                uplink_json(self.proto.as_deref(), format, Uplink::Telemetry, payload)
                    .and_then(|json| device::parse_telemetry(&json, now_ms()))
                    .map(IngestMsg::Telemetry)
            }
            Topic::Attributes(format) => {
                uplink_json(self.proto.as_deref(), format, Uplink::Attributes, payload)
                    .and_then(|json| device::parse_attributes(&json))
                    .map(IngestMsg::ClientAttributes)
            }
            Topic::AttributeRequest(family, id) => request_id(id).and_then(|request_id| {
                let (client_keys, shared_keys) =
                    if proto_payload::is_protobuf(self.proto.as_deref(), family.format()) {
                        proto_payload::attribute_request(payload)?
                    } else {
                        payload::parse_attribute_request(payload)?
                    };
                self.families.attribute_request = family;
                Ok(IngestMsg::AttributeRequest {
                    request_id,
                    client_keys,
                    shared_keys,
                })
            }),
            Topic::RpcResponse(format, id) => request_id(id).and_then(|id| {
                let json = uplink_json(self.proto.as_deref(), format, Uplink::RpcResponse, payload)?;
                Ok(payload::rpc_response(id, &json))
            }),
            Topic::ClientRpc(family, id) => return self.client_rpc(family, id, payload, ack),
            Topic::Ota(kind, rid, idx) => return self.ota(kind, rid, idx, payload, ack),
            Topic::Claim => {
                let parsed = if self.proto.is_some() {
                    proto_payload::claim(payload)
                } else {
                    payload::parse_claim(payload)
                };
                let claims = match parsed {
                    Ok(c) => vec![(self.s.device.clone(), c)],
                    Err(e) => return self.refuse(topic, &e, ack),
                };
                return self.claim(claims, ack).await;
            }
            Topic::Unknown => {
                tracing::info!(topic, "publish to an unknown topic dropped");
                if let Some(pkid) = ack {
                    self.ack(pkid, PubAckCode::TopicNameInvalid);
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

    /// A rule chain answered client-side RPC `request_id`: sent on the topic the request came
    /// on, in its format; dropped when the request already timed out.
    fn client_rpc_answered(&mut self, request_id: u32, body: &str) {
        let Some(i) = self
            .client_rpcs
            .iter()
            .position(|(_, rid, ..)| *rid == request_id)
        else {
            tracing::debug!(request_id, "client-side RPC answer after its timeout; dropped");
            return;
        };
        let Some((_, _, topic, proto_id)) = self.client_rpcs.remove(i) else {
            return;
        };
        let payload = match proto_id {
            Some(rid) => proto_payload::client_rpc_response(rid, body, ""),
            None => body.as_bytes().to_vec(),
        };
        let pkid = self.next_pkid();
        codec::write_publish(&mut self.wbuf, self.version, &topic, 1, pkid, &payload);
    }

    /// A client-side RPC: `getSessionLimits` is answered by the transport itself, as
    /// ThingsBoard does; any other is recorded in the log (acknowledged after the commit), run
    /// through the root rule chain by the partition's leader, and answered with what the chain
    /// replies or with a timeout.
    fn client_rpc(&mut self, family: Family, id: &str, payload: &[u8], ack: Option<u16>) -> Option<End> {
        let response_topic = family.rpc_response(id);
        // A protobuf request (`ToServerRpcRequestMsg`) is read as its JSON form, and its answer
        // goes back as a `ToServerRpcResponseMsg`.
        let proto_id = if proto_payload::is_protobuf(self.proto.as_deref(), family.format()) {
            match request_id(id) {
                Ok(rid) => Some(rid),
                Err(e) => return self.refuse(&response_topic, &e, ack),
            }
        } else {
            None
        };
        let json;
        let payload = match proto_id {
            Some(_) => match proto_payload::client_rpc_json(payload) {
                Ok(j) => {
                    json = j;
                    json.as_bytes()
                }
                Err(e) => return self.refuse(&response_topic, &e, ack),
            },
            None => payload,
        };
        if let Some(reply) = session_limits_reply(payload, &self.transport.config, self.gateway.is_some()) {
            let reply = match proto_id {
                Some(rid) => proto_payload::client_rpc_response(rid, &reply, ""),
                None => reply.into_bytes(),
            };
            if let Some(pkid) = ack {
                self.ack(pkid, PubAckCode::Success);
            }
            let pkid = self.next_pkid();
            codec::write_publish(&mut self.wbuf, self.version, &response_topic, 1, pkid, &reply);
            return None;
        }
        match request_id(id).and_then(|rid| Ok((rid, payload::parse_client_rpc(rid, payload)?))) {
            Ok((rid, msg)) => {
                self.enqueue(msg, ack);
                let deadline = tokio::time::Instant::now()
                    + Duration::from_millis(self.transport.hub.config.client_rpc_timeout_ms);
                // Bounded like the message queue: a device flooding RPCs loses the oldest timers.
                if self.client_rpcs.len() >= 1024 {
                    self.client_rpcs.pop_front();
                }
                self.client_rpcs
                    .push_back((deadline, rid, response_topic, proto_id));
                None
            }
            Err(e) => self.refuse(&response_topic, &e, ack),
        }
    }

    /// A downlink's payload in the family's format: JSON on `j` topics, protobuf on `p`
    /// topics, and the profile's format on the others — except that the v1 topics stay JSON
    /// when the profile asks so (`useJsonPayloadFormatForDefaultDownlinkTopics`). `None` when it
    /// cannot be sent as protobuf (an RPC to a device without an RPC request schema).
    fn downlink_payload(&self, family: Family, m: &DownlinkMsg) -> Option<Vec<u8>> {
        let proto = self.proto.as_deref();
        let protobuf = match family {
            Family::V1 => proto.is_some_and(|p| !p.json_default_downlinks),
            other => proto_payload::is_protobuf(proto, other.format()),
        };
        if !protobuf {
            return Some(m.json().into_bytes());
        }
        let out = proto_payload::downlink(m, proto);
        if out.is_none() {
            tracing::info!(
                ?family,
                "downlink not sent: the device profile has no protobuf RPC request schema"
            );
        }
        out
    }

    /// What a publish topic is for this device: its profile's own topic filters first
    /// (ThingsBoard checks attributes, then telemetry), which then also take the place of the
    /// default v1 telemetry and attributes topics.
    fn classify<'t>(&self, topic: &'t str) -> Topic<'t> {
        if let Some(t) = &self.topics {
            if topic_matches(&t.attributes, topic) {
                return Topic::Attributes(Format::Profile);
            }
            if topic_matches(&t.telemetry, topic) {
                return Topic::Telemetry(Format::Profile);
            }
            if topic == "v1/devices/me/telemetry" || topic == "v1/devices/me/attributes" {
                return Topic::Unknown;
            }
        }
        classify(topic)
    }

    /// Refuses a publish with invalid content, as ThingsBoard's
    /// `sendResponseForAdaptorErrorOrCloseContext`: a QoS 1 publish gets PUBACK 0x99 on MQTT 5,
    /// and on 3.1.1 too when the profile sets `sendAckOnValidationException` (3.1.1's PUBACK
    /// carries no reason code); otherwise the connection is closed (MQTT 5: DISCONNECT 0x99).
    /// Nothing is stored either way.
    fn refuse(&mut self, topic: &str, e: &PayloadError, ack: Option<u16>) -> Option<End> {
        let may_ack = self.version == Version::V5 || self.topics.as_ref().is_some_and(|t| t.ack_invalid);
        match ack {
            Some(pkid) if may_ack => {
                tracing::info!(topic, error = %e, "invalid payload refused");
                self.ack(pkid, PubAckCode::PayloadFormatInvalid);
                None
            }
            _ => {
                if self.version == Version::V5 {
                    codec::write_disconnect(
                        &mut self.wbuf,
                        self.version,
                        DisconnectCode::PayloadFormatInvalid,
                    );
                }
                Some(End::Protocol(format!("invalid payload on {topic}: {e}")))
            }
        }
    }
}

impl Session {
    /// A publish on a gateway topic: one operation per child device, each child's records on
    /// its own partition, one PUBACK once all of them are committed.
    async fn gateway_publish(
        &mut self,
        topic: &str,
        g: GatewayTopic,
        payload: &[u8],
        ack: Option<u16>,
    ) -> Option<End> {
        // A gateway whose profile's payloads are protobuf speaks ThingsBoard's gateway messages.
        let parsed = if self.proto.is_some() {
            gateway::parse_proto(g, payload)
        } else {
            gateway::parse(g, payload)
        };
        let ops = match parsed {
            Ok(ops) => ops,
            Err(e) => return self.refuse(topic, &e, ack),
        };
        let gw = self.gateway.as_mut().expect("checked by the caller");
        let hub = &self.transport.hub;
        let mut queued = Vec::new();
        let mut claims = Vec::new();
        for (name, op) in ops {
            if op == ChildOp::Disconnect {
                // The child leaves the session table now; its disconnect is recorded and
                // acknowledged like any message.
                if let Some(child) = gw.remove(&name) {
                    queued.push(Queued {
                        at: std::time::Instant::now(),
                        record: child.record(IngestMsg::Disconnect),
                        partition: child.partition,
                        pkid: None,
                    });
                }
                continue;
            }
            let device_type = match &op {
                ChildOp::Connect(t) => t.as_str(),
                _ => "default",
            };
            let (child, fresh) = match gw.child(hub, &self.s.device, &name, device_type).await {
                Ok(c) => c,
                Err(e) => {
                    // Not acknowledged: the gateway keeps the message and sends it again.
                    tracing::warn!(device = %name, error = %e, "gateway child device unavailable");
                    codec::write_disconnect(
                        &mut self.wbuf,
                        self.version,
                        DisconnectCode::ImplementationSpecificError,
                    );
                    return Some(End::Refused("child device unavailable"));
                }
            };
            let mut push = |msg: IngestMsg| {
                queued.push(Queued {
                    at: std::time::Instant::now(),
                    record: child.record(msg),
                    partition: child.partition,
                    pkid: None,
                })
            };
            if fresh {
                push(IngestMsg::Connect);
            }
            let expect = match op {
                ChildOp::Msg(m) => {
                    push(m);
                    None
                }
                ChildOp::AttributeRequest { msg, id } => {
                    push(msg);
                    Some((child.device.device, id))
                }
                ChildOp::Claim(secret, duration_ms) => {
                    claims.push((child.device.clone(), (secret, duration_ms)));
                    None
                }
                ChildOp::Connect(_) | ChildOp::Disconnect => None,
            };
            if let Some((device, id)) = expect {
                gw.expect_response(device, id);
            }
        }
        if !claims.is_empty() {
            self.queue.extend(queued);
            return self.claim(claims, ack).await;
        }
        match (queued.last_mut(), ack) {
            (Some(last), Some(pkid)) => {
                last.pkid = Some(pkid);
                self.acks.push_back((pkid, None));
            }
            // Nothing to record (a disconnect of an unknown child): acknowledged at once.
            (None, Some(pkid)) => self.ack(pkid, PubAckCode::Success),
            (_, None) => {}
        }
        self.queue.extend(queued);
        None
    }
}

impl Session {
    /// An OTA chunk request `v2/fw/request/{rid}/chunk/{i}` (payload: the chunk size in ASCII,
    /// or empty for the size used before, or the whole package): the chunk goes out on
    /// `v2/fw/response/{rid}/chunk/{i}` whatever the device subscribed to; a missing package
    /// or a chunk over the packet limit is answered on `v2/fw/error` and the connection closed,
    /// as ThingsBoard does.
    fn ota(&mut self, kind: OtaKind, rid: &str, idx: &str, payload: &[u8], ack: Option<u16>) -> Option<End> {
        let part = match kind {
            OtaKind::Firmware => "fw",
            OtaKind::Software => "sw",
        };
        if let Some(pkid) = ack {
            self.ack(pkid, PubAckCode::Success);
        }
        let text = String::from_utf8_lossy(payload);
        let size = match text.trim() {
            "" => self.ota_chunk_size,
            s => match s.parse::<u64>() {
                Ok(n) => n,
                Err(_) => {
                    return self.refuse(
                        &format!("v2/{part}/request/{rid}/chunk/{idx}"),
                        &PayloadError::InvalidJson("chunk size is not a number".into()),
                        None,
                    );
                }
            },
        };
        self.ota_chunk_size = size;
        let data = match idx.parse::<u64>() {
            Ok(i) => self.transport.hub.directory().and_then(|d| {
                thingraft_transport_common::ota_chunk(d.as_ref(), &self.s.device.device, kind, size, i)
            }),
            Err(_) => None,
        };
        let error = match data {
            None => "NOT_FOUND",
            Some(d) if d.len() + 64 + rid.len() + idx.len() > self.transport.config.max_packet_bytes => {
                "PAYLOAD_TOO_LARGE"
            }
            Some(d) => {
                let topic = format!("v2/{part}/response/{rid}/chunk/{idx}");
                let pkid = self.next_pkid();
                codec::write_publish(&mut self.wbuf, self.version, &topic, 1, pkid, &d);
                return None;
            }
        };
        tracing::info!(error, "OTA chunk request refused");
        let pkid = self.next_pkid();
        codec::write_publish(
            &mut self.wbuf,
            self.version,
            &format!("v2/{part}/error"),
            1,
            pkid,
            error.as_bytes(),
        );
        codec::write_disconnect(
            &mut self.wbuf,
            self.version,
            DisconnectCode::ImplementationSpecificError,
        );
        Some(End::Refused("OTA chunk refused"))
    }

    /// Opens claim windows through the registry; the PUBACK follows their commit.
    async fn claim(
        &mut self,
        claims: Vec<(thingraft_proto::records::DeviceRef, (String, i64))>,
        ack: Option<u16>,
    ) -> Option<End> {
        let Some(dir) = self.transport.hub.directory().cloned() else {
            codec::write_disconnect(
                &mut self.wbuf,
                self.version,
                DisconnectCode::ImplementationSpecificError,
            );
            return Some(End::Refused("registry not ready"));
        };
        let mut code = PubAckCode::Success;
        for (device, (secret, duration_ms)) in claims {
            match dir.claim(&device, secret, duration_ms).await {
                Ok(()) => {}
                // The device's own mistake: MQTT 5 hears "not authorized"; 3.1.1 has no way to
                // say it in a PUBACK, so it gets the PUBACK ThingsBoard sends too.
                Err(ClaimError::Refused(e)) => {
                    tracing::warn!(device = %device.name, error = %e, "claim window not opened");
                    code = PubAckCode::NotAuthorized;
                }
                Err(ClaimError::Failed(e)) => {
                    tracing::warn!(device = %device.name, error = %e, "claim not recorded");
                    codec::write_disconnect(
                        &mut self.wbuf,
                        self.version,
                        DisconnectCode::ImplementationSpecificError,
                    );
                    return Some(End::Refused("claim not recorded"));
                }
            }
        }
        if let Some(pkid) = ack {
            self.ack(pkid, code);
        }
        None
    }
}

/// A request id from a topic: a number.
fn request_id(id: &str) -> Result<u32, PayloadError> {
    id.parse::<u32>()
        .map_err(|_| PayloadError::InvalidJson(format!("request id {id:?} is not a number")))
}

/// The downlinks a subscription filter asks for, and in which topic family.
fn subscription(filter: &str) -> (u8, Family) {
    match filter {
        "v1/devices/me/attributes" => (SUB_ATTRIBUTES, Family::V1),
        "v2/a" => (SUB_ATTRIBUTES, Family::V2),
        "v2/a/j" => (SUB_ATTRIBUTES, Family::V2Json),
        "v2/a/p" => (SUB_ATTRIBUTES, Family::V2Proto),
        "v1/devices/me/rpc/request/+" => (SUB_RPC, Family::V1),
        "v2/r/req/+" => (SUB_RPC, Family::V2),
        "v2/r/req/j/+" => (SUB_RPC, Family::V2Json),
        "v2/r/req/p/+" => (SUB_RPC, Family::V2Proto),
        _ => (0, Family::V1),
    }
}

/// The transport's own answer to `getSessionLimits`, or `None` for any other RPC.
/// Gateways also get `gatewayRateLimits`.
fn session_limits_reply(payload: &[u8], config: &crate::MqttConfig, gateway: bool) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if v.get("method")?.as_str()? != "getSessionLimits" {
        return None;
    }
    let unlimited =
        serde_json::json!({"messages": null, "telemetryMessages": null, "telemetryDataPoints": null});
    let mut reply = serde_json::json!({
        "maxPayloadSize": config.max_packet_bytes,
        "maxInflightMessages": config.queued_messages_max,
        "rateLimits": unlimited,
    });
    if gateway {
        reply["gatewayRateLimits"] = unlimited;
    }
    Some(reply.to_string())
}

/// Appends queued records, each partition's in order and the partitions concurrently; returns
/// the first failure, and the PUBACKs owed once all are committed.
async fn append_all(log: &thingraft_log::LogHandle, batch: Vec<Queued>) -> AppendDone {
    let mut by_partition: Vec<(u32, Vec<Record>)> = Vec::new();
    let mut pkids = Vec::with_capacity(batch.len());
    let started = std::time::Instant::now();
    if let Some(q) = batch.first() {
        probe::rec(Stage::SessionQueue, started - q.at);
    }
    for q in batch {
        pkids.push(q.pkid);
        match by_partition.iter_mut().find(|(p, _)| *p == q.partition) {
            Some((_, recs)) => recs.push(q.record),
            None => by_partition.push((q.partition, vec![q.record])),
        }
    }
    let appends = by_partition
        .into_iter()
        .map(|(p, recs)| async move { log.append(p, recs).await.map(|_| ()) });
    let r = futures::future::join_all(appends)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .map(|_| ());
    probe::rec(Stage::SessionAppend, started.elapsed());
    (r, pkids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_classify_by_family_with_the_longer_prefix_first() {
        assert_eq!(classify("v2/t/j"), Topic::Telemetry(Format::Json));
        assert_eq!(classify("v2/t/p"), Topic::Telemetry(Format::Protobuf));
        assert_eq!(
            classify("v1/devices/me/telemetry"),
            Topic::Telemetry(Format::Profile)
        );
        assert_eq!(classify("v2/a"), Topic::Attributes(Format::Profile));
        assert_eq!(classify("v2/a/p"), Topic::Attributes(Format::Protobuf));
        assert_eq!(
            classify("v2/a/req/j/5"),
            Topic::AttributeRequest(Family::V2Json, "5")
        );
        assert_eq!(classify("v2/a/req/5"), Topic::AttributeRequest(Family::V2, "5"));
        assert_eq!(classify("v2/r/res/j/7"), Topic::RpcResponse(Format::Json, "7"));
        assert_eq!(
            classify("v2/r/res/p/7"),
            Topic::RpcResponse(Format::Protobuf, "7")
        );
        assert_eq!(
            classify("v2/a/req/p/1"),
            Topic::AttributeRequest(Family::V2Proto, "1")
        );
        assert_eq!(classify("v2/r/req/p/2"), Topic::ClientRpc(Family::V2Proto, "2"));
        assert_eq!(classify("v2/r/req/3"), Topic::ClientRpc(Family::V2, "3"));
        assert_eq!(
            classify("v1/devices/me/rpc/request/1"),
            Topic::ClientRpc(Family::V1, "1")
        );
        // Empty ids and deeper topics are unknown.
        assert_eq!(classify("v2/a/req/"), Topic::Unknown);
        assert_eq!(classify("v2/a/req/p/1/2"), Topic::Unknown);
        assert_eq!(classify("v2/t/x"), Topic::Unknown);
        assert_eq!(Family::V2Json.rpc_response("3"), "v2/r/res/j/3");
        assert_eq!(Family::V2Proto.rpc_request(3), "v2/r/req/p/3");
        assert_eq!(Family::V2Proto.attribute_response(4), "v2/a/res/p/4");
        assert_eq!(Family::V2.attribute_response(4), "v2/a/res/4");
    }
}
