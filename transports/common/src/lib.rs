//! thingraft-transport-common: what the device transports (MQTT, HTTP, CoAP) share.
//!
//! - [`Hub`]: one per node. Credential lookups through a cache that registry changes
//!   invalidate, the table of open device sessions that downlinks are routed through, and the
//!   ingest records every transport appends.
//! - [`Session`]: one device session of any transport; it leaves the table when dropped.
//! - [`payload`]: request bodies that mean the same on every transport.
//!
//! Like every transport this depends on the log's append API and on the record formats in
//! `thingraft-proto`, never on the engine: credentials are read from the metadata map that
//! the registry writes.

pub mod payload;
pub mod proto_payload;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use thingraft_log::{LogError, LogHandle, Record};
use thingraft_proto::records::{
    Deliver, DeviceRef, DownlinkMsg, EntityId, Ingest, IngestMsg, PartitionRecord, SessionRef,
    is_credentials_key, token_key,
};
use tokio::sync::mpsc;

/// The `[transport]` section of the node's config: settings every device transport shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Credential lookups cached.
    pub credential_cache_entries: u64,
    /// A client-side RPC no rule chain answered gets `{"error":"timeout"}` after this long
    /// (ThingsBoard's `transport.client_side_rpc.timeout`).
    pub client_rpc_timeout_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            credential_cache_entries: 100_000,
            client_rpc_timeout_ms: 60_000,
        }
    }
}

/// Something for a device session to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Downlink {
    /// Send this to the device (a gateway's child, for a gateway session), in the transport's
    /// own form.
    Msg(EntityId, DownlinkMsg),
    /// The session's credentials were changed or deleted: close it (MQTT: DISCONNECT 0x98).
    Close,
}

/// The session wants shared-attribute updates.
pub const SUB_ATTRIBUTES: u8 = 1;
/// The session wants server-side RPC requests.
pub const SUB_RPC: u8 = 2;

/// Credentials a device authenticated with: the metadata-map key they are stored under
/// (`reg/token/..`, `reg/basic/..`, a certificate's key) and the device they named then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub key: Arc<str>,
    pub device: Arc<DeviceRef>,
}

struct SessionEntry {
    tx: mpsc::Sender<Downlink>,
    /// The credentials it authenticated with (a gateway's child: the gateway's).
    credentials: Credentials,
    /// `SUB_*` bits.
    subscriptions: Arc<AtomicU8>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Firmware or software, for OTA updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaKind {
    Firmware,
    Software,
}

/// The OTA package assigned to a device, as its downloads see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaInfo {
    pub title: String,
    pub version: String,
    pub size: u64,
    pub file_name: Option<String>,
}

/// What transports ask of the entity registry beyond credential lookups; the node implements it
/// with the engine's registry (transports never depend on the engine).
pub trait Directory: Send + Sync {
    /// Whether `device` is a gateway (its `additionalInfo.gateway` is true).
    fn is_gateway(&self, device: &EntityId) -> bool;

    /// The child device `name` of `gateway`, in the gateway's tenant; created on first sight
    /// with the device profile named `device_type` (created too if absent).
    fn child_device(
        &self,
        gateway: &DeviceRef,
        name: &str,
        device_type: &str,
    ) -> Pin<Box<dyn Future<Output = Result<DeviceRef, String>> + Send>>;

    /// Device provisioning: `request` is the device's JSON (`provisionDeviceKey`,
    /// `provisionDeviceSecret`, `deviceName`, `credentialsType`, ...); the answer is
    /// ThingsBoard's JSON with its `status` (SUCCESS, NOT_FOUND, FAILURE). `Err` when the request
    /// is not a JSON object.
    fn provision(&self, request: &[u8]) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

    /// Opens `device`'s claim window: for `duration_ms`, a customer user who knows `secret`
    /// may claim it.
    fn claim(
        &self,
        device: &DeviceRef,
        secret: String,
        duration_ms: i64,
    ) -> Pin<Box<dyn Future<Output = Result<(), ClaimError>> + Send>>;

    /// The OTA package of `kind` assigned to `device`, if its data is uploaded.
    fn ota_info(&self, device: &EntityId, kind: OtaKind) -> Option<OtaInfo>;

    /// `len` bytes of that package from `offset` (fewer at its end, none past it).
    fn ota_read(&self, device: &EntityId, kind: OtaKind, offset: u64, len: u64) -> Option<Vec<u8>>;

    /// The power mode `device`'s profile sets for CoAP (its `clientSettings`).
    fn coap_power_mode(&self, device: &EntityId) -> PowerMode;

    /// The custom MQTT topics `device`'s profile sets (ThingsBoard's MQTT transport
    /// configuration); `None` for the default topics.
    fn mqtt_topics(&self, device: &EntityId) -> Option<Arc<MqttTopics>>;

    /// The protobuf schemas `device`'s profile sets for `transport`; `None` when its payloads
    /// there are JSON.
    fn proto_schemas(
        &self,
        device: &EntityId,
        transport: proto_payload::DeviceTransport,
    ) -> Option<Arc<proto_payload::ProtoSchemas>>;
}

/// A device profile's MQTT topics (ThingsBoard's `deviceTelemetryTopic`,
/// `deviceAttributesTopic`, `deviceAttributesSubscribeTopic`: MQTT topic filters that take the
/// place of `v1/devices/me/telemetry` and `v1/devices/me/attributes`), and whether a payload
/// that fails validation is still acknowledged (`sendAckOnValidationException`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTopics {
    pub telemetry: String,
    pub attributes: String,
    pub attributes_subscribe: String,
    pub ack_invalid: bool,
}

impl MqttTopics {
    /// The topics of an MQTT transport configuration (JSON), with ThingsBoard's defaults for
    /// the ones it leaves out; `None` when all three are the defaults and invalid payloads
    /// are refused, so that such devices keep the plain path.
    pub fn of_config(t: &serde_json::Value) -> Option<MqttTopics> {
        // ThingsBoard's getters (`notBlankOrDefault`): a blank field is the default topic.
        let topic = |k: &str, default: &str| {
            t[k].as_str()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .unwrap_or(default)
                .to_string()
        };
        let m = MqttTopics {
            telemetry: topic("deviceTelemetryTopic", "v1/devices/me/telemetry"),
            attributes: topic("deviceAttributesTopic", "v1/devices/me/attributes"),
            attributes_subscribe: topic("deviceAttributesSubscribeTopic", "v1/devices/me/attributes"),
            ack_invalid: t["sendAckOnValidationException"].as_bool().unwrap_or(false),
        };
        let defaults = m.telemetry == "v1/devices/me/telemetry"
            && m.attributes == "v1/devices/me/attributes"
            && m.attributes_subscribe == "v1/devices/me/attributes";
        (!defaults || m.ack_invalid).then_some(m)
    }
}

/// Whether `filter` is a valid MQTT topic filter: not empty, `+` and `#` only as whole levels,
/// `#` only last.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "+" => true,
        "#" => i == levels.len() - 1,
        l => !l.contains('+') && !l.contains('#'),
    })
}

/// MQTT matching of a topic name against a topic filter (`+` one level, `#` the rest and the
/// parent level); wildcards at the first level do not match topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Device provisioning as ThingsBoard's MQTT and CoAP transports take it: a JSON request gets
/// the JSON answer; a payload that is not JSON is read as a `ProvisionDeviceRequestMsg` and
/// gets a `ProvisionDeviceResponseMsg`. `Err` when it is neither.
pub async fn provision(dir: &dyn Directory, payload: &[u8]) -> Result<Vec<u8>, String> {
    if serde_json::from_slice::<serde_json::Value>(payload).is_ok() {
        return dir.provision(payload).await.map(String::into_bytes);
    }
    let request = proto_payload::provision_request_json(payload).map_err(|e| e.to_string())?;
    let answer = dir.provision(request.as_bytes()).await?;
    Ok(proto_payload::provision_response(&answer))
}

/// A CoAP device's power mode (ThingsBoard's device profile `clientSettings`): when the
/// server may send it downlinks. Downlinks for a device that cannot take one now wait until it
/// can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerMode {
    /// Always reachable (DRX, or no setting).
    Drx,
    /// Reachable for `activity_ms` after each uplink (`psmActivityTimer`), then asleep until
    /// its next uplink.
    Psm { activity_ms: u64 },
    /// Reachable for `window_ms` (`pagingTransmissionWindow`) at the start of every `cycle_ms`
    /// (`edrxCycle`) counted from its last uplink.
    Edrx { cycle_ms: u64, window_ms: u64 },
}

impl PowerMode {
    /// The mode of a `clientSettings` object, with ThingsBoard's defaults (10 s activity timer
    /// and paging window, 81.92 s eDRX cycle).
    pub fn of_client_settings(settings: &serde_json::Value) -> PowerMode {
        let ms = |k: &str, default: u64| settings[k].as_u64().filter(|v| *v > 0).unwrap_or(default);
        match settings["powerMode"].as_str() {
            Some("PSM") => PowerMode::Psm {
                activity_ms: ms("psmActivityTimer", 10_000),
            },
            Some("E_DRX") => PowerMode::Edrx {
                cycle_ms: ms("edrxCycle", 81_920),
                window_ms: ms("pagingTransmissionWindow", 10_000),
            },
            _ => PowerMode::Drx,
        }
    }
}

/// Why a claim window was not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The device may not be claimed: it already belongs to a customer, or claiming is not
    /// allowed for it. The device's own answer (HTTP 400, CoAP 4.00, MQTT 5 "not authorized").
    #[error("claim refused: {0}")]
    Refused(String),
    /// The registry could not record it (no leader, shutting down, ...): try again.
    #[error("claim not recorded: {0}")]
    Failed(String),
}

/// A chunk of an OTA download as ThingsBoard's transports define it: chunk `index` of `size`
/// bytes each (`size` 0 or absent: the whole package).
pub fn ota_chunk(
    dir: &dyn Directory,
    device: &EntityId,
    kind: OtaKind,
    size: u64,
    index: u64,
) -> Option<Vec<u8>> {
    let info = dir.ota_info(device, kind)?;
    if size == 0 {
        return dir.ota_read(device, kind, 0, info.size);
    }
    dir.ota_read(device, kind, index.saturating_mul(size), size)
}

/// The device transports' shared state on one node.
pub struct Hub {
    pub log: LogHandle,
    pub config: TransportConfig,
    /// Open sessions by device, for downlinks.
    sessions: Mutex<HashMap<EntityId, HashMap<u64, SessionEntry>>>,
    /// credentials key (`reg/token/..`, `reg/basic/..`) → device (`None`: none).
    credentials: moka::sync::Cache<String, Option<Arc<DeviceRef>>>,
    session_seq: AtomicU64,
    directory: OnceLock<Arc<dyn Directory>>,
    /// True once this node's replica of the metadata map has caught up with the cluster (set
    /// by the node). Before that a credentials miss may be a device created while the node was
    /// down: the transports answer "server unavailable", never "not authorized".
    caught_up: tokio::sync::watch::Sender<bool>,
}

impl Hub {
    pub fn new(config: TransportConfig, log: LogHandle) -> Arc<Hub> {
        let credentials = moka::sync::Cache::new(config.credential_cache_entries);
        let hub = Arc::new(Hub {
            log,
            config,
            sessions: Mutex::default(),
            credentials,
            session_seq: AtomicU64::new(1),
            directory: OnceLock::new(),
            caught_up: tokio::sync::watch::Sender::new(false),
        });
        tokio::spawn(invalidate_on_changes(
            Arc::downgrade(&hub),
            hub.log.meta_changes(),
        ));
        hub
    }

    /// The credentials stored under the metadata-map `key`.
    pub fn lookup(&self, key: &str) -> Option<Credentials> {
        let mut read = None;
        let mut device = self.credentials.get_with_by_ref(key, || {
            let d = self.stored(key);
            read = Some(d.clone());
            d
        });
        // A value read here just before a change was applied may go into the cache just after
        // the change invalidated the key. The store shows the change by then: read it again,
        // and answer with what it holds now.
        if let Some(read) = read {
            let now = self.stored(key);
            if read != now {
                self.credentials.invalidate(key);
                device = now;
            }
        }
        Some(Credentials {
            key: key.into(),
            device: device?,
        })
    }

    /// The device the metadata map names under the credentials key `key`, read now.
    fn stored(&self, key: &str) -> Option<Arc<DeviceRef>> {
        self.log
            .meta_get(key)
            .and_then(|b| DeviceRef::decode(&b).ok())
            .map(Arc::new)
    }

    /// Marks this node's metadata replica as caught up (once, by the node).
    pub fn set_caught_up(&self) {
        self.caught_up.send_replace(true);
    }

    /// Whether a credentials miss is final: this node's metadata replica has caught up.
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Waits up to `max` for [`Hub::set_caught_up`]; whether it came.
    pub async fn wait_caught_up(&self, max: std::time::Duration) -> bool {
        let mut rx = self.caught_up.subscribe();
        matches!(tokio::time::timeout(max, rx.wait_for(|c| *c)).await, Ok(Ok(_)))
    }

    /// The credentials with this access token.
    pub fn by_token(&self, token: &str) -> Option<Credentials> {
        self.lookup(&token_key(token))
    }

    /// Installs the registry port (once, by the node).
    pub fn set_directory(&self, d: Arc<dyn Directory>) {
        let _ = self.directory.set(d);
    }

    /// The registry port; `None` until the node installed it.
    pub fn directory(&self) -> Option<&Arc<dyn Directory>> {
        self.directory.get()
    }

    /// Opens a session for `device`: downlinks for it arrive on the returned receiver (which
    /// holds up to `queue` of them) until the [`Session`] is dropped.
    pub fn open_session(
        self: &Arc<Self>,
        device: DeviceRef,
        credentials: Credentials,
        subscriptions: u8,
        queue: usize,
    ) -> (Session, mpsc::Receiver<Downlink>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (self.open_session_on(device, credentials, subscriptions, tx), rx)
    }

    /// Like [`Hub::open_session`], with downlinks sent to `tx`: a gateway's children share the
    /// gateway's channel.
    pub fn open_session_on(
        self: &Arc<Self>,
        device: DeviceRef,
        credentials: Credentials,
        subscriptions: u8,
        tx: mpsc::Sender<Downlink>,
    ) -> Session {
        let id = SessionRef {
            node: self.log.node_id(),
            session: self.session_seq.fetch_add(1, Ordering::Relaxed),
        };
        let subs = Arc::new(AtomicU8::new(subscriptions));
        let check = (credentials.clone(), tx.clone());
        self.sessions
            .lock()
            .expect("sessions lock")
            .entry(device.device)
            .or_default()
            .insert(
                id.session,
                SessionEntry {
                    tx,
                    credentials,
                    subscriptions: subs.clone(),
                },
            );
        // Credentials deleted or changed after the lookup and before the entry above went in: the
        // change notice may have scanned the table already. The map holds the change by the time
        // its notice is sent, so either that scan saw this session or this check sees the change.
        let (credentials, tx) = check;
        if self.stored(&credentials.key).as_ref() != Some(&credentials.device) {
            let _ = tx.try_send(Downlink::Close);
        }
        let partition = self.log.partition_for_key(&device.device);
        Session {
            hub: self.clone(),
            device,
            id,
            partition,
            subscriptions: subs,
        }
    }

    /// Hands a downlink to the device's sessions that want it (responses go to the session
    /// named, updates and RPCs to the subscribed ones); returns how many took it.
    pub fn deliver(&self, d: &Deliver) -> u32 {
        let needs = match d.msg {
            DownlinkMsg::AttributeUpdate { .. } => SUB_ATTRIBUTES,
            DownlinkMsg::AttributeResponse { .. } | DownlinkMsg::ClientRpcResponse { .. } => 0,
            DownlinkMsg::RpcRequest { .. } => SUB_RPC,
        };
        let m = self.sessions.lock().expect("sessions lock");
        let Some(sessions) = m.get(&d.device) else {
            return 0;
        };
        let mut n = 0;
        for (id, s) in sessions {
            if d.session.is_some_and(|want| want != *id) {
                continue;
            }
            if needs != 0 && s.subscriptions.load(Ordering::Relaxed) & needs == 0 {
                continue;
            }
            // A session whose queue is full is too slow to count as delivered.
            if s.tx.try_send(Downlink::Msg(d.device, d.msg.clone())).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Open sessions on this node.
    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .map(|s| s.len())
            .sum()
    }

    /// Closes every session that authenticated with credentials under `key` (every key, if
    /// `None`) that the metadata map no longer holds as they were: changed or deleted. A
    /// session that authenticated after the change stays open.
    fn close_changed_credentials(&self, key: Option<&str>) -> usize {
        let m = self.sessions.lock().expect("sessions lock");
        let mut now: HashMap<&str, Option<Arc<DeviceRef>>> = HashMap::new();
        let mut n = 0;
        for s in m.values().flat_map(|s| s.values()) {
            let k = &*s.credentials.key;
            if key.is_some_and(|key| key != k) {
                continue;
            }
            let stored = now.entry(k).or_insert_with(|| self.stored(k));
            if stored.as_ref() != Some(&s.credentials.device) {
                let _ = s.tx.try_send(Downlink::Close);
                n += 1;
            }
        }
        n
    }

    fn unregister(&self, device: &EntityId, session: u64) {
        let mut m = self.sessions.lock().expect("sessions lock");
        if let Some(s) = m.get_mut(device) {
            s.remove(&session);
            if s.is_empty() {
                m.remove(device);
            }
        }
    }
}

/// One device session of any transport. Dropping it takes it out of the session table.
pub struct Session {
    hub: Arc<Hub>,
    pub device: DeviceRef,
    pub id: SessionRef,
    /// The partition of the device's records.
    pub partition: u32,
    subscriptions: Arc<AtomicU8>,
}

impl Session {
    /// An ingest record from this session, stamped now.
    pub fn record(&self, msg: IngestMsg) -> Record {
        let ingest = Ingest {
            tenant: self.device.tenant,
            device: self.device.device,
            ts_ms: now_ms(),
            session: Some(self.id),
            msg,
        };
        Record::new(
            self.device.device.to_vec(),
            PartitionRecord::Ingest(ingest).encode(),
        )
    }

    /// Appends `msgs` as one append; returns once they are committed (DESIGN invariant 2).
    pub async fn submit(&self, msgs: Vec<IngestMsg>) -> Result<(), LogError> {
        let records = msgs.into_iter().map(|m| self.record(m)).collect();
        self.hub.log.append(self.partition, records).await.map(|_| ())
    }

    pub fn subscribe(&self, bits: u8) {
        self.subscriptions.fetch_or(bits, Ordering::Relaxed);
    }

    pub fn unsubscribe(&self, bits: u8) {
        self.subscriptions.fetch_and(!bits, Ordering::Relaxed);
    }

    pub fn subscriptions(&self) -> u8 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.unregister(&self.device.device, self.id.session);
    }
}

/// Drops cached credentials whose registry keys changed, and closes the sessions that used
/// them.
async fn invalidate_on_changes(
    hub: std::sync::Weak<Hub>,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Vec<String>>>,
) {
    loop {
        let changed = rx.recv().await;
        let Some(hub) = hub.upgrade() else { return };
        match changed {
            Ok(keys) if !keys.is_empty() => {
                for k in keys.iter() {
                    if is_credentials_key(k) {
                        hub.credentials.invalidate(k);
                        let closed = hub.close_changed_credentials(Some(k));
                        if closed > 0 {
                            tracing::info!(sessions = closed, "sessions closed: their credentials changed");
                        }
                    }
                }
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                hub.credentials.invalidate_all();
                let closed = hub.close_changed_credentials(None);
                if closed > 0 {
                    tracing::info!(sessions = closed, "sessions closed: their credentials changed");
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingraft_log::{LogConfig, LogNode, MetaOp, MetaTxn};

    /// A single-node log in `dir` (RocksDB on disk, gRPC on loopback).
    async fn log_node(dir: &std::path::Path) -> LogNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = LogConfig {
            advertise_addr: listener.local_addr().unwrap().to_string(),
            data_dir: dir.to_path_buf(),
            partitions: 1,
            ..LogConfig::default()
        };
        let node = LogNode::start(config, listener).await.unwrap();
        node.handle()
            .wait_for_leaders(std::time::Duration::from_secs(10))
            .await
            .unwrap();
        node
    }

    fn device(id: u8, password: &str) -> DeviceRef {
        DeviceRef {
            device: [id; 16],
            tenant: [9; 16],
            name: format!("device {id}"),
            device_type: "default".into(),
            password: password.into(),
        }
    }

    async fn write(log: &LogHandle, op: MetaOp) {
        log.meta_txn(MetaTxn {
            checks: Vec::new(),
            ops: vec![op],
        })
        .await
        .unwrap();
    }

    /// The value `f` gives once it gives one (within 5 s).
    async fn wait_for<T>(f: impl Fn() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "not within 5 s");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_notice_closes_only_the_sessions_whose_credentials_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let node = log_node(dir.path()).await;
        let log = node.handle();
        let hub = Hub::new(TransportConfig::default(), log.clone());
        let key = token_key("T1");
        write(&log, MetaOp::Put(key.clone(), device(1, "").encode().into())).await;
        let creds = hub.by_token("T1").expect("the new token authenticates");
        assert_eq!(*creds.device, device(1, ""));
        let (s1, mut rx1) = hub.open_session(device(1, ""), creds, 0, 4);

        // The notice of the token's creation, or of anything, reaching the hub after the device
        // authenticated with it changes nothing for its session.
        assert_eq!(hub.close_changed_credentials(Some(&key)), 0);
        assert_eq!(hub.close_changed_credentials(None), 0);
        assert!(rx1.try_recv().is_err(), "the session was told to close");

        // A changed password closes it.
        write(&log, MetaOp::Put(key.clone(), device(1, "new").encode().into())).await;
        assert_eq!(hub.close_changed_credentials(Some(&key)), 1);
        assert_eq!(rx1.recv().await, Some(Downlink::Close));
        drop(s1);

        // A session with the new credentials (once the cache has them) stays open until they
        // are deleted.
        let creds = wait_for(|| hub.by_token("T1").filter(|c| c.device.password == "new")).await;
        let (s2, mut rx2) = hub.open_session(device(1, "new"), creds, 0, 4);
        assert_eq!(hub.close_changed_credentials(Some(&key)), 0);
        write(&log, MetaOp::Delete(key.clone())).await;
        assert_eq!(hub.close_changed_credentials(None), 1);
        assert_eq!(rx2.recv().await, Some(Downlink::Close));
        // And the deleted token no longer authenticates.
        wait_for(|| hub.by_token("T1").is_none().then_some(())).await;

        // Credentials looked up just before they were deleted, whose session goes into the table
        // after the deletion's notice looked through it: the session is closed as it opens.
        let key2 = token_key("T2");
        write(&log, MetaOp::Put(key2.clone(), device(2, "").encode().into())).await;
        let stale = hub.by_token("T2").expect("the new token authenticates");
        write(&log, MetaOp::Delete(key2)).await;
        let (s3, mut rx3) = hub.open_session(device(2, ""), stale, 0, 4);
        assert_eq!(rx3.try_recv(), Ok(Downlink::Close));
        drop(s3);
        // Sessions hold the hub, and the hub the log.
        drop(s2);
        drop(hub);
        drop(log);
        node.shutdown().await;
    }

    #[test]
    fn topic_filters_match_as_mqtt_says() {
        assert!(topic_matches("sensors/+/telemetry", "sensors/7/telemetry"));
        assert!(!topic_matches("sensors/+/telemetry", "sensors/7/8/telemetry"));
        assert!(topic_matches("sensors/#", "sensors"));
        assert!(topic_matches("sensors/#", "sensors/a/b"));
        assert!(!topic_matches("sensors/+", "sensors"));
        assert!(!topic_matches("+/x", "$SYS/x"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(valid_topic_filter("sensors/+/t/#"));
        assert!(!valid_topic_filter("sensors/a+/t"));
        assert!(!valid_topic_filter("sensors/#/t"));
        assert!(!valid_topic_filter(""));
    }
}
