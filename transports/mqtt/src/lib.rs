//! thingraft-transport-mqtt: ThingsBoard's MQTT device API (3.1.1 and 5) over the replicated
//! log.
//!
//! - [`codec`]: MQTT 3.1.1 and 5 packets (on `mqttbytes`) behind one version-neutral type.
//! - [`session`]: one device connection: auth, publishes → ingest records, PUBACK after
//!   commit, downlinks.
//! - this file: [`Transport`] (listener, credential cache, session table).
//!
//! Like every transport it depends on the log's append API and on the record formats in
//! `thingraft-proto`, never on the engine: credentials are read from the metadata map that
//! the registry writes.

pub mod codec;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thingraft_log::LogHandle;
use thingraft_proto::records::{
    Deliver, DeviceRef, DownlinkMsg, EntityId, basic_key, mqtt_basic_hash, token_key,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::codec::{ConnackCode, Connect, DisconnectCode};

/// The `[mqtt]` section of the node's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the MQTT listener; empty disables it.
    pub listen: String,
    /// Largest packet accepted (ThingsBoard: 65536).
    pub max_packet_bytes: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Messages of one session waiting for their append; at this bound the session stops
    /// reading from its socket.
    pub queued_messages_max: usize,
    /// Credential lookups cached.
    pub credential_cache_entries: u64,
    /// A client-side RPC no rule chain answered gets `{"error":"timeout"}` after this long
    /// (ThingsBoard's `transport.client_side_rpc.timeout`).
    pub client_rpc_timeout_ms: u64,
    /// A session that saw packets but sent no message reports the device's activity this often
    /// (ThingsBoard's `transport.sessions.report_timeout`), so keep-alive pings keep it active.
    pub activity_report_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".into(),
            max_packet_bytes: 65536,
            connect_timeout_ms: 10_000,
            queued_messages_max: 100,
            credential_cache_entries: 100_000,
            client_rpc_timeout_ms: 60_000,
            activity_report_ms: 3_000,
        }
    }
}

impl MqttConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_packet_bytes >= 1024,
            "mqtt.max_packet_bytes must be >= 1024"
        );
        anyhow::ensure!(
            self.queued_messages_max >= 1,
            "mqtt.queued_messages_max must be >= 1"
        );
        anyhow::ensure!(
            self.connect_timeout_ms >= 100,
            "mqtt.connect_timeout_ms must be >= 100"
        );
        Ok(())
    }
}

/// Something for a device session to do, sent by the node.
#[derive(Debug, Clone)]
pub enum Downlink {
    Publish { topic: String, payload: bytes::Bytes },
    Close(DisconnectCode),
    CloseWith(DisconnectCode, String),
}

/// The session subscribed to shared-attribute updates.
pub(crate) const SUB_ATTRIBUTES: u8 = 1;
/// The session subscribed to server-side RPC.
pub(crate) const SUB_RPC: u8 = 2;

struct SessionEntry {
    tx: mpsc::Sender<Downlink>,
    /// The metadata-map key of the credentials it authenticated with.
    credentials_key: Arc<str>,
    /// `SUB_*` bits, kept by the session.
    subscriptions: Arc<AtomicU8>,
}

/// Open sessions by device, for downlinks.
#[derive(Default)]
pub struct Sessions {
    by_device: Mutex<HashMap<EntityId, HashMap<u64, SessionEntry>>>,
}

impl Sessions {
    fn register(
        &self,
        device: EntityId,
        session: u64,
        tx: mpsc::Sender<Downlink>,
        subscriptions: Arc<AtomicU8>,
        credentials_key: Arc<str>,
    ) {
        self.by_device
            .lock()
            .expect("sessions lock")
            .entry(device)
            .or_default()
            .insert(
                session,
                SessionEntry {
                    tx,
                    subscriptions,
                    credentials_key,
                },
            );
    }

    /// Closes every session that authenticated with the credentials under `key` (they were
    /// changed or deleted): ThingsBoard answers DISCONNECT 0x98.
    fn close_by_credentials(&self, key: &str) -> usize {
        let m = self.by_device.lock().expect("sessions lock");
        let mut n = 0;
        for s in m.values().flat_map(|s| s.values()) {
            if &*s.credentials_key == key {
                let _ =
                    s.tx.try_send(Downlink::Close(DisconnectCode::AdministrativeAction));
                n += 1;
            }
        }
        n
    }

    fn unregister(&self, device: &EntityId, session: u64) {
        let mut m = self.by_device.lock().expect("sessions lock");
        if let Some(s) = m.get_mut(device) {
            s.remove(&session);
            if s.is_empty() {
                m.remove(device);
            }
        }
    }

    /// Hands a downlink to the device's sessions that want it (responses go to the session
    /// named, updates and RPCs to the subscribed ones); returns how many took it.
    pub fn deliver(&self, d: &Deliver) -> u32 {
        let (topic, payload, needs) = match &d.msg {
            DownlinkMsg::AttributeUpdate(json) => {
                ("v1/devices/me/attributes".to_string(), json, SUB_ATTRIBUTES)
            }
            DownlinkMsg::AttributeResponse { request_id, json } => {
                (format!("v1/devices/me/attributes/response/{request_id}"), json, 0)
            }
            DownlinkMsg::RpcRequest { id, json } => {
                (format!("v1/devices/me/rpc/request/{id}"), json, SUB_RPC)
            }
        };
        let m = self.by_device.lock().expect("sessions lock");
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
            let msg = Downlink::Publish {
                topic: topic.clone(),
                payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            };
            // A session whose queue is full is too slow to count as delivered.
            if s.tx.try_send(msg).is_ok() {
                n += 1;
            }
        }
        n
    }

    pub fn count(&self) -> usize {
        self.by_device
            .lock()
            .expect("sessions lock")
            .values()
            .map(|s| s.len())
            .sum()
    }
}

/// The MQTT transport of one node.
pub struct Transport {
    pub config: MqttConfig,
    pub log: LogHandle,
    pub sessions: Sessions,
    /// credentials key (`reg/token/..`, `reg/basic/..`) → device (`None`: none); invalidated
    /// by registry changes.
    credentials: moka::sync::Cache<String, Option<Arc<DeviceRef>>>,
    session_seq: AtomicU64,
    pkid_seq: AtomicU16,
    shutdown: watch::Sender<bool>,
}

impl Transport {
    pub fn new(config: MqttConfig, log: LogHandle) -> Arc<Transport> {
        let credentials = moka::sync::Cache::new(config.credential_cache_entries);
        let t = Arc::new(Transport {
            config,
            log,
            sessions: Sessions::default(),
            credentials,
            session_seq: AtomicU64::new(1),
            pkid_seq: AtomicU16::new(1),
            shutdown: watch::channel(false).0,
        });
        tokio::spawn(invalidate_on_changes(Arc::downgrade(&t), t.log.meta_changes()));
        t
    }

    /// Accepts connections until [`Transport::shutdown`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        tokio::spawn(session::run(self.clone(), stream, peer));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                () = stopped(&mut stop) => return,
            }
        }
    }

    /// Closes the listener and every session.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    fn next_session_id(&self) -> u64 {
        self.session_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn next_pkid(&self) -> u16 {
        loop {
            let p = self.pkid_seq.fetch_add(1, Ordering::Relaxed);
            if p != 0 {
                return p;
            }
        }
    }

    fn lookup(&self, key: String) -> Option<Arc<DeviceRef>> {
        self.credentials.get_with(key.clone(), || {
            self.log
                .meta_get(&key)
                .and_then(|b| DeviceRef::decode(&b).ok())
                .map(Arc::new)
        })
    }

    /// Authenticates a CONNECT as ThingsBoard does: MQTT basic credentials by the hash of
    /// client id and user name, of the client id, of the user name (the stored password, if
    /// any, must match), then the user name as an access token. Returns the device and the
    /// credentials key; a refusal carries the CONNACK code of ThingsBoard's
    /// `ReturnCodeResolver`.
    fn authenticate(&self, c: &Connect) -> Result<(DeviceRef, String), ConnackCode> {
        let username = c.username.as_deref().unwrap_or("");
        let mut hashes = Vec::new();
        if !c.client_id.is_empty() && !username.is_empty() {
            hashes.push(mqtt_basic_hash(&c.client_id, username));
        }
        if !c.client_id.is_empty() {
            hashes.push(mqtt_basic_hash(&c.client_id, ""));
        }
        if !username.is_empty() {
            hashes.push(mqtt_basic_hash("", username));
        }
        for h in hashes {
            let key = basic_key(&h);
            if let Some(d) = self.lookup(key.clone()) {
                if d.password.is_empty() || c.password.as_deref() == Some(d.password.as_str()) {
                    return Ok(((*d).clone(), key));
                }
                return Err(ConnackCode::BadUserNamePassword);
            }
        }
        if !username.is_empty() {
            let key = token_key(username);
            if let Some(d) = self.lookup(key.clone()) {
                return Ok(((*d).clone(), key));
            }
        }
        let user = c.username.as_deref().is_some_and(|u| !u.is_empty());
        let pass = c.password.as_deref().is_some_and(|p| !p.is_empty());
        let client = !c.client_id.is_empty();
        Err(if (user && pass && client) || (user != pass) {
            ConnackCode::BadUserNamePassword
        } else if client && !user && !pass {
            ConnackCode::ClientIdNotValid
        } else {
            ConnackCode::NotAuthorized
        })
    }
}

/// Drops cached credentials whose registry keys changed.
async fn invalidate_on_changes(
    t: std::sync::Weak<Transport>,
    mut rx: tokio::sync::broadcast::Receiver<Arc<Vec<String>>>,
) {
    loop {
        let changed = rx.recv().await;
        let Some(t) = t.upgrade() else { return };
        match changed {
            Ok(keys) if !keys.is_empty() => {
                for k in keys.iter() {
                    if k.starts_with("reg/token/") || k.starts_with("reg/basic/") {
                        t.credentials.invalidate(k);
                        let closed = t.sessions.close_by_credentials(k);
                        if closed > 0 {
                            tracing::info!(sessions = closed, "sessions closed: their credentials changed");
                        }
                    }
                }
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                t.credentials.invalidate_all()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Resolves once `rx` reads true (or its sender is gone). The borrow of the value ends inside,
/// so callers' futures stay `Send`.
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
