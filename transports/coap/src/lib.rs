//! thingraft-transport-coap: ThingsBoard's CoAP device API over the replicated log, on
//! coap-lite's codec and a tokio UDP socket.
//!
//! - this file: the message layer coap-lite leaves to us (RFC 7252 §4): duplicate detection of
//!   incoming messages, retransmission of our confirmable ones, piggybacked responses within
//!   `piggyback_timeout_ms` or else an empty ACK and a separate response; block-wise transfer
//!   through coap-lite's `BlockHandler`.
//! - [`resources`]: the device API (`/api/v1/{token}/...`), Observe on attributes and RPC.
//! - [`dtls`]: CoAP over DTLS (OpenSSL), with X.509 client certificates as credentials.
//!
//! Credentials, sessions and ingest records come from `thingraft-transport-common`, as for
//! every transport. A write is answered 2.01 only after its record is committed.

pub mod dtls;
mod resources;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coap_lite::{
    BlockHandler, BlockHandlerConfig, CoapRequest, ContentFormat, MessageClass, MessageType, Packet,
    ResponseType,
};
use serde::{Deserialize, Serialize};
use thingraft_transport_common::Hub;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, watch};

/// The `[coap]` section of the node's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// UDP address of the CoAP listener; empty disables it.
    pub listen: String,
    /// An answer not ready this soon goes as an empty ACK now and a separate response later
    /// (ThingsBoard's `transport.coap.piggyback_timeout`).
    pub piggyback_timeout_ms: u64,
    /// RFC 7252 ACK_TIMEOUT: first wait for the ACK of a confirmable message we send.
    pub ack_timeout_ms: u64,
    /// RFC 7252 MAX_RETRANSMIT.
    pub max_retransmit: u32,
    /// A device observing with non-confirmable requests is pinged (an empty confirmable
    /// message, RFC 7252 §4.3) this often; one that answers nothing is gone, and its
    /// observations end (RFC 7641 §4.5: the server checks that the client is still there).
    /// Devices in a power-saving mode are not pinged: they wait for their uplinks.
    pub observe_check_ms: u64,
    /// Largest request payload, after block-wise reassembly.
    pub max_payload_bytes: usize,
    /// Largest message we send; longer responses go block-wise (Block2).
    pub max_message_bytes: usize,
    /// Incoming message ids remembered for duplicate detection (each for EXCHANGE_LIFETIME).
    pub dedup_entries: usize,
    /// The socket's receive buffer (the kernel caps it at `net.core.rmem_max`): bursts from
    /// many devices wait there instead of being dropped.
    pub recv_buffer_bytes: usize,
    /// UDP address of CoAP over DTLS (ThingsBoard's CoAPS, 5684); empty disables it. It needs
    /// the server's certificate chain and key (PEM).
    pub dtls_listen: String,
    pub dtls_cert_file: String,
    pub dtls_key_file: String,
    /// DTLS sessions kept; beyond it the longest-idle one is dropped.
    pub dtls_sessions_max: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5683".into(),
            piggyback_timeout_ms: 500,
            ack_timeout_ms: 2000,
            max_retransmit: 4,
            observe_check_ms: 300_000,
            max_payload_bytes: 65536,
            max_message_bytes: 1152,
            dedup_entries: 100_000,
            recv_buffer_bytes: 4 << 20,
            dtls_listen: String::new(),
            dtls_cert_file: String::new(),
            dtls_key_file: String::new(),
            dtls_sessions_max: 100_000,
        }
    }
}

/// Binds the CoAP socket of `config.listen` with its receive buffer.
pub fn bind(config: &CoapConfig) -> std::io::Result<UdpSocket> {
    bind_addr(&config.listen, config)
}

/// Binds a CoAP socket on `listen` with the receive buffer of `config`.
pub fn bind_addr(listen: &str, config: &CoapConfig) -> std::io::Result<UdpSocket> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(e) = s.set_recv_buffer_size(config.recv_buffer_bytes) {
        tracing::warn!(error = %e, "CoAP receive buffer size not set");
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// RFC 7252 EXCHANGE_LIFETIME: how long a message id is remembered.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// A request already seen: still being handled, or the bytes answered to it.
enum Seen {
    InProgress,
    Answered(Vec<u8>),
}

/// Remembered message ids, oldest first, bounded.
#[derive(Default)]
struct Dedup {
    seen: HashMap<(SocketAddr, u16), Seen>,
    order: VecDeque<(tokio::time::Instant, (SocketAddr, u16))>,
}

impl Dedup {
    fn expire(&mut self, max: usize) {
        let now = tokio::time::Instant::now();
        while let Some((at, key)) = self.order.front() {
            if self.order.len() > max || now.duration_since(*at) > EXCHANGE_LIFETIME {
                self.seen.remove(key);
                self.order.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Our confirmable messages awaiting their ACK (true) or RST (false), by peer and message id.
type Pending = HashMap<(SocketAddr, u16), oneshot::Sender<bool>>;

/// What the CoAP messages travel on: plain UDP, or DTLS sessions on UDP.
enum Link {
    Plain(UdpSocket),
    Dtls(dtls::Dtls),
}

/// The CoAP transport of one node (one per listener: plain CoAP, CoAP over DTLS).
pub struct Transport {
    pub config: CoapConfig,
    pub hub: Arc<Hub>,
    link: Link,
    dedup: Mutex<Dedup>,
    pending: Mutex<Pending>,
    blocks: Mutex<BlockHandler<SocketAddr>>,
    /// Active observations by (peer, token); aborting the handle ends one.
    observations: Mutex<HashMap<(SocketAddr, Vec<u8>), tokio::task::AbortHandle>>,
    /// Our latest non-confirmable answers and notifications: (peer, message id) → token. A
    /// device that rejects one with RST ends its observation (RFC 7641 §3.6).
    sent_non: Mutex<SentNon>,
    next_mid: AtomicU16,
    shutdown: watch::Sender<bool>,
    /// Each device's last uplink, and a wake-up for the downlinks waiting for it (power-saving
    /// devices).
    uplinks: Mutex<HashMap<thingraft_proto::records::EntityId, Uplink>>,
}

/// Non-confirmable messages sent lately, by (peer, message id), with their tokens; the oldest
/// go first beyond [`SENT_NON_MAX`].
#[derive(Default)]
struct SentNon {
    tokens: HashMap<(SocketAddr, u16), Vec<u8>>,
    order: std::collections::VecDeque<(SocketAddr, u16)>,
}

/// Most non-confirmable messages remembered for a rejection (RST).
const SENT_NON_MAX: usize = 65_536;

/// A device's last uplink and the wake-up of downlinks waiting for the next.
struct Uplink {
    at: tokio::time::Instant,
    wake: Arc<tokio::sync::Notify>,
}

/// Devices whose last uplink is remembered; past it the table starts over (a device not in it
/// counts as reachable).
const UPLINKS_MAX: usize = 1 << 20;

impl Transport {
    pub fn new(config: CoapConfig, hub: Arc<Hub>, socket: UdpSocket) -> Arc<Transport> {
        Transport::with_link(config, hub, Link::Plain(socket))
    }

    /// CoAP over DTLS on `socket`, with the context of [`dtls::context`].
    pub fn new_dtls(
        config: CoapConfig,
        hub: Arc<Hub>,
        socket: UdpSocket,
        ctx: openssl::ssl::SslContext,
    ) -> Arc<Transport> {
        let sessions_max = config.dtls_sessions_max;
        Transport::with_link(
            config,
            hub,
            Link::Dtls(dtls::Dtls::new(ctx, socket, sessions_max)),
        )
    }

    fn with_link(config: CoapConfig, hub: Arc<Hub>, link: Link) -> Arc<Transport> {
        let blocks = BlockHandler::new(BlockHandlerConfig {
            max_total_message_size: config.max_message_bytes,
            cache_expiry_duration: Duration::from_secs(120),
        });
        let seed = (thingraft_transport_common::now_ms() as u64 & 0xffff) as u16;
        Arc::new(Transport {
            config,
            hub,
            link,
            dedup: Mutex::default(),
            pending: Mutex::default(),
            blocks: Mutex::new(blocks),
            observations: Mutex::default(),
            sent_non: Mutex::default(),
            next_mid: AtomicU16::new(seed),
            shutdown: watch::channel(false).0,
            uplinks: Mutex::default(),
        })
    }

    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    fn mid(&self) -> u16 {
        self.next_mid.fetch_add(1, Ordering::Relaxed)
    }

    /// Receives datagrams until [`Transport::shutdown`].
    pub async fn serve(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let mut buf = vec![0u8; 65536];
        let socket = match &self.link {
            Link::Plain(s) => s,
            Link::Dtls(d) => &d.socket,
        };
        loop {
            let (n, peer) = tokio::select! {
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "CoAP receive failed");
                        continue;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            let messages = match &self.link {
                Link::Plain(_) => vec![buf[..n].to_vec()],
                Link::Dtls(d) => d.receive(&buf[..n], peer).await,
            };
            for m in messages {
                match Packet::from_bytes(&m) {
                    Ok(p) => self.clone().on_packet(p, peer).await,
                    Err(e) => tracing::info!(%peer, error = %e, "malformed CoAP message dropped"),
                }
            }
        }
    }

    /// Sends one CoAP message's bytes to `peer` (through its DTLS session on CoAPS).
    async fn send_raw(&self, bytes: &[u8], peer: SocketAddr) -> std::io::Result<()> {
        match &self.link {
            Link::Plain(s) => s.send_to(bytes, peer).await.map(drop),
            Link::Dtls(d) => d.send(bytes, peer).await,
        }
    }

    /// Records an uplink of `device` (any request of it): a power-saving device is reachable
    /// now, and downlinks waiting for it go.
    pub(crate) fn uplink(&self, device: &thingraft_proto::records::EntityId) {
        let mut u = self.uplinks.lock().expect("uplinks");
        if u.len() >= UPLINKS_MAX && !u.contains_key(device) {
            u.clear();
        }
        let now = tokio::time::Instant::now();
        let e = u.entry(*device).or_insert_with(|| Uplink {
            at: now,
            wake: Arc::default(),
        });
        e.at = now;
        e.wake.notify_waiters();
    }

    /// Waits until `device` may get a downlink under `mode` (at once for DRX, or for a device
    /// whose last uplink is not known).
    pub(crate) async fn reachable(
        &self,
        device: &thingraft_proto::records::EntityId,
        mode: thingraft_transport_common::PowerMode,
    ) {
        use thingraft_transport_common::PowerMode;
        if mode == PowerMode::Drx {
            return;
        }
        loop {
            let Some(wake) = self
                .uplinks
                .lock()
                .expect("uplinks")
                .get(device)
                .map(|u| u.wake.clone())
            else {
                return;
            };
            // Registered before the last uplink is read, so an uplink in between is not missed.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let Some(last) = self.uplinks.lock().expect("uplinks").get(device).map(|u| u.at) else {
                return;
            };
            let now = tokio::time::Instant::now();
            let since = now.duration_since(last);
            let next_window = match mode {
                PowerMode::Drx => return,
                PowerMode::Psm { activity_ms } if since <= Duration::from_millis(activity_ms) => return,
                PowerMode::Psm { .. } => None,
                PowerMode::Edrx { cycle_ms, window_ms } => {
                    let cycle = u128::from(cycle_ms.max(1));
                    let pos = since.as_millis() % cycle;
                    if pos <= u128::from(window_ms) {
                        return;
                    }
                    Some(now + Duration::from_millis((cycle - pos) as u64))
                }
            };
            match next_window {
                Some(at) => {
                    tokio::select! {
                        () = &mut woken => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => woken.await,
            }
        }
    }

    /// The credentials key of the client certificate `peer` presented over DTLS, if any.
    pub(crate) fn peer_credentials(&self, peer: SocketAddr) -> Option<String> {
        match &self.link {
            Link::Plain(_) => None,
            Link::Dtls(d) => d.credentials(peer),
        }
    }

    async fn on_packet(self: Arc<Self>, p: Packet, peer: SocketAddr) {
        let mid = p.header.message_id;
        match (p.header.code, p.header.get_type()) {
            (_, MessageType::Acknowledgement) | (_, MessageType::Reset) => {
                let acked = p.header.get_type() == MessageType::Acknowledgement;
                if let Some(tx) = self.pending.lock().expect("pending").remove(&(peer, mid)) {
                    let _ = tx.send(acked);
                } else if !acked
                    && let Some(token) = self
                        .sent_non
                        .lock()
                        .expect("sent_non")
                        .tokens
                        .remove(&(peer, mid))
                {
                    // A rejected notification: the device no longer has that observation.
                    tracing::info!(%peer, mid, "CoAP notification rejected (RST); observation ended");
                    self.cancel_observation(peer, &token);
                }
            }
            (MessageClass::Empty, MessageType::Confirmable) => {
                // A CoAP ping: answered with RST.
                self.send(&empty(MessageType::Reset, mid), peer).await;
            }
            (MessageClass::Request(_), t) => {
                let repeat = {
                    let mut d = self.dedup.lock().expect("dedup");
                    d.expire(self.config.dedup_entries);
                    match d.seen.get(&(peer, mid)) {
                        Some(Seen::Answered(bytes)) => Some(Some(bytes.clone())),
                        Some(Seen::InProgress) => Some(None),
                        None => {
                            d.seen.insert((peer, mid), Seen::InProgress);
                            d.order.push_back((tokio::time::Instant::now(), (peer, mid)));
                            None
                        }
                    }
                };
                match repeat {
                    Some(Some(bytes)) => {
                        tracing::debug!(%peer, mid, "duplicate CoAP request: answer repeated");
                        let _ = self.send_raw(&bytes, peer).await;
                        return;
                    }
                    Some(None) => {
                        tracing::debug!(%peer, mid, "duplicate CoAP request still in progress");
                        return;
                    }
                    None => {}
                }
                let confirmable = t == MessageType::Confirmable;
                tokio::spawn(self.handle(p, peer, confirmable));
            }
            _ => tracing::debug!(%peer, mid, "unexpected CoAP message ignored"),
        }
    }

    /// Handles one request: block-wise first, then the resource; answers piggybacked or, after
    /// `piggyback_timeout_ms`, with an empty ACK and a separate response.
    async fn handle(self: Arc<Self>, p: Packet, peer: SocketAddr, confirmable: bool) {
        let mid = p.header.message_id;
        let mut req: CoapRequest<SocketAddr> = CoapRequest::from_packet(p, peer);
        let blocked = self.blocks.lock().expect("blocks").intercept_request(&mut req);
        match blocked {
            Ok(true) => {
                if let Some(r) = req.response.take() {
                    self.answer(&r.message, peer, mid).await;
                }
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::info!(%peer, error = ?e, "block-wise request refused");
                if req.apply_from_error(e)
                    && let Some(r) = req.response.take()
                {
                    self.answer(&r.message, peer, mid).await;
                }
                return;
            }
        }
        let responder = Responder {
            t: self.clone(),
            peer,
            mid,
            token: req.message.get_token().to_vec(),
            confirmable,
            state: Arc::new(tokio::sync::Mutex::new(Answer::Pending)),
        };
        // The empty ACK if the answer takes longer than the piggyback timeout.
        let late = {
            let r = responder.clone();
            let wait = Duration::from_millis(self.config.piggyback_timeout_ms);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                r.ack_empty().await;
            })
        };
        let reply = resources::handle(&self, &mut req, &responder).await;
        if let Some(reply) = reply {
            let mut msg = reply.into_packet(&req.message);
            // Block2 for a long answer (only piggybacked answers can be continued).
            req.response = coap_lite::CoapResponse::new(&req.message);
            if let Some(r) = req.response.as_mut() {
                std::mem::swap(&mut r.message, &mut msg);
            }
            if let Err(e) = self.blocks.lock().expect("blocks").intercept_response(&mut req) {
                tracing::warn!(error = ?e, "block-wise response failed");
            }
            if let Some(r) = req.response.take() {
                responder.respond(r.message).await;
            }
            late.abort();
        }
        // No answer yet (an observation whose first notification comes later, a separate
        // response under way): `late` still acknowledges a confirmable request once the
        // piggyback timeout has passed without one, so the device stops retransmitting it.
    }

    /// Sends a piggybacked answer and remembers it for duplicates.
    async fn answer(&self, msg: &Packet, peer: SocketAddr, mid: u16) {
        match msg.to_bytes() {
            Ok(bytes) => {
                // Remembered before it is sent: a retransmission that races the answer must find
                // it, or it would be taken for a request still in progress and go unanswered.
                self.remember(peer, mid, bytes.clone());
                let _ = self.send_raw(&bytes, peer).await;
            }
            Err(e) => tracing::warn!(error = ?e, "CoAP answer not encodable"),
        }
    }

    /// Notes a non-confirmable message with `token` sent to `peer` under `mid`.
    fn sent_non(&self, peer: SocketAddr, mid: u16, token: &[u8]) {
        let mut s = self.sent_non.lock().expect("sent_non");
        if s.order.len() >= SENT_NON_MAX
            && let Some(old) = s.order.pop_front()
        {
            s.tokens.remove(&old);
        }
        s.order.push_back((peer, mid));
        s.tokens.insert((peer, mid), token.to_vec());
    }

    fn remember(&self, peer: SocketAddr, mid: u16, bytes: Vec<u8>) {
        if let Some(s) = self.dedup.lock().expect("dedup").seen.get_mut(&(peer, mid)) {
            *s = Seen::Answered(bytes);
        }
    }

    async fn send(&self, msg: &Packet, peer: SocketAddr) {
        match msg.to_bytes() {
            Ok(bytes) => {
                if let Err(e) = self.send_raw(&bytes, peer).await {
                    tracing::debug!(%peer, error = %e, "CoAP send failed");
                }
            }
            Err(e) => tracing::warn!(error = ?e, "CoAP message not encodable"),
        }
    }

    /// Sends a confirmable message and retransmits it with exponential back-off until it is
    /// acknowledged (true), reset or never acknowledged (false).
    async fn send_confirmable(&self, msg: Packet, peer: SocketAddr) -> bool {
        self.exchange(msg, peer).await.unwrap_or(false)
    }

    /// A CoAP ping (an empty confirmable message): whether `peer` answered it at all (with the
    /// RST a ping gets, or an ACK).
    pub(crate) async fn ping(&self, peer: SocketAddr) -> bool {
        self.exchange(empty(MessageType::Confirmable, 0), peer)
            .await
            .is_some()
    }

    /// Sends a confirmable message, retransmitting it with exponential back-off: `Some(true)`
    /// when acknowledged, `Some(false)` when reset, `None` when nothing came back.
    async fn exchange(&self, mut msg: Packet, peer: SocketAddr) -> Option<bool> {
        let mid = self.mid();
        msg.header.message_id = mid;
        msg.header.set_type(MessageType::Confirmable);
        let Ok(bytes) = msg.to_bytes() else {
            tracing::warn!("CoAP message not encodable");
            return None;
        };
        let (tx, mut rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert((peer, mid), tx);
        let mut wait = Duration::from_millis(self.config.ack_timeout_ms);
        for _ in 0..=self.config.max_retransmit {
            let _ = self.send_raw(&bytes, peer).await;
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(Ok(acked)) => return Some(acked),
                Ok(Err(_)) => return None,
                Err(_) => wait *= 2,
            }
        }
        self.pending.lock().expect("pending").remove(&(peer, mid));
        tracing::info!(%peer, mid, "CoAP message never acknowledged");
        None
    }

    fn observe(&self, peer: SocketAddr, token: Vec<u8>, h: tokio::task::AbortHandle) {
        if let Some(old) = self
            .observations
            .lock()
            .expect("observations")
            .insert((peer, token), h)
        {
            old.abort();
        }
    }

    fn cancel_observation(&self, peer: SocketAddr, token: &[u8]) {
        if let Some(h) = self
            .observations
            .lock()
            .expect("observations")
            .remove(&(peer, token.to_vec()))
        {
            h.abort();
        }
    }

    /// Observations open now.
    pub fn observation_count(&self) -> usize {
        self.observations.lock().expect("observations").len()
    }
}

fn empty(t: MessageType, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(t);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p
}

/// An answer of the device API: code, payload with its content format, Observe sequence
/// number.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub code: ResponseType,
    pub payload: Option<(Vec<u8>, ContentFormat)>,
    pub observe: Option<u32>,
}

impl Reply {
    pub fn code(code: ResponseType) -> Reply {
        Reply {
            code,
            payload: None,
            observe: None,
        }
    }

    pub fn json(code: ResponseType, body: String) -> Reply {
        Reply {
            code,
            payload: Some((body.into_bytes(), ContentFormat::ApplicationJSON)),
            observe: None,
        }
    }

    pub fn bytes(code: ResponseType, body: Vec<u8>) -> Reply {
        Reply {
            code,
            payload: Some((body, ContentFormat::ApplicationOctetStream)),
            observe: None,
        }
    }

    /// The response packet to `request` (type and message id are set by whoever sends it).
    fn into_packet(self, request: &Packet) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.code = MessageClass::Response(self.code);
        p.set_token(request.get_token().to_vec());
        if let Some(seq) = self.observe {
            p.set_observe_value(seq & 0xff_ffff);
        }
        if let Some((body, format)) = self.payload {
            p.set_content_format(format);
            p.payload = body;
        }
        p
    }
}

enum Answer {
    Pending,
    /// The empty ACK went out; the answer goes separately.
    EmptyAcked,
    Answered,
}

/// Sends the answers to one request: the first piggybacked if still possible, later ones (an
/// Observe's notifications) as separate messages of the request's type.
#[derive(Clone)]
pub(crate) struct Responder {
    t: Arc<Transport>,
    pub peer: SocketAddr,
    mid: u16,
    pub token: Vec<u8>,
    confirmable: bool,
    state: Arc<tokio::sync::Mutex<Answer>>,
}

impl Responder {
    /// Whether the request being answered was confirmable.
    pub(crate) fn confirmable(&self) -> bool {
        self.confirmable
    }

    async fn ack_empty(&self) {
        let mut st = self.state.lock().await;
        if self.confirmable && matches!(*st, Answer::Pending) {
            let ack = empty(MessageType::Acknowledgement, self.mid);
            if let Ok(bytes) = ack.to_bytes() {
                self.t.remember(self.peer, self.mid, bytes.clone());
                let _ = self.t.send_raw(&bytes, self.peer).await;
            }
            *st = Answer::EmptyAcked;
        }
    }

    /// Sends `msg` (a response packet); false if the peer reset it or never acknowledged it.
    async fn respond(&self, mut msg: Packet) -> bool {
        let mut st = self.state.lock().await;
        match *st {
            Answer::Pending if self.confirmable => {
                msg.header.set_type(MessageType::Acknowledgement);
                msg.header.message_id = self.mid;
                *st = Answer::Answered;
                drop(st);
                self.t.answer(&msg, self.peer, self.mid).await;
                true
            }
            _ if self.confirmable => {
                *st = Answer::Answered;
                drop(st);
                self.t.send_confirmable(msg, self.peer).await
            }
            _ => {
                msg.header.set_type(MessageType::NonConfirmable);
                msg.header.message_id = self.t.mid();
                self.t.sent_non(self.peer, msg.header.message_id, &self.token);
                if matches!(*st, Answer::Pending) {
                    // Remembered so that a repeated request gets the same answer.
                    if let Ok(bytes) = msg.to_bytes() {
                        self.t.remember(self.peer, self.mid, bytes);
                    }
                }
                *st = Answer::Answered;
                drop(st);
                self.t.send(&msg, self.peer).await;
                true
            }
        }
    }

    /// Sends a reply built for `request`.
    pub async fn send(&self, reply: Reply, request: &Packet) -> bool {
        self.respond(reply.into_packet(request)).await
    }
}
