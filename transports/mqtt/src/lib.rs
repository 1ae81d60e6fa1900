//! thingraft-transport-mqtt: ThingsBoard's MQTT device API (3.1.1 and 5) over the replicated
//! log.
//!
//! - [`codec`]: MQTT 3.1.1 and 5 packets (on `mqttbytes`) behind one version-neutral type.
//! - [`session`]: one device connection: auth, publishes → ingest records, PUBACK after
//!   commit, downlinks.
//! - `gateway`: the gateway API's child devices on a gateway's connection.
//! - `provision`: connections of devices provisioning themselves.
//! - this file: [`Transport`] (listener, CONNECT authentication).
//!
//! Credentials, the session table and ingest records come from `thingraft-transport-common`.

pub mod codec;
mod gateway;
mod provision;
pub mod session;
pub mod tls;

/// A device connection: plain TCP, or TLS over it.
pub(crate) type Stream = Box<dyn Io>;

pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use serde::{Deserialize, Serialize};
use thingraft_proto::records::{basic_key, mqtt_basic_hash};
use thingraft_transport_common::{Credentials, Hub};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::codec::{ConnackCode, Connect};

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
    /// A session that saw packets but sent no message reports the device's activity this often
    /// (ThingsBoard's `transport.sessions.report_timeout`), so keep-alive pings keep it active.
    pub activity_report_ms: u64,
    /// Address of the MQTT-over-TLS listener (ThingsBoard: 8883); empty disables it.
    pub tls_listen: String,
    /// The server's certificate chain and private key (PEM files), for `tls_listen`.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".into(),
            max_packet_bytes: 65536,
            connect_timeout_ms: 10_000,
            queued_messages_max: 100,
            activity_report_ms: 3_000,
            tls_listen: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
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
        anyhow::ensure!(
            self.tls_listen.is_empty() || (!self.tls_cert_file.is_empty() && !self.tls_key_file.is_empty()),
            "mqtt.tls_listen needs mqtt.tls_cert_file and mqtt.tls_key_file"
        );
        Ok(())
    }
}

/// The MQTT transport of one node.
pub struct Transport {
    pub config: MqttConfig,
    pub hub: Arc<Hub>,
    pkid_seq: AtomicU16,
    shutdown: watch::Sender<bool>,
}

impl Transport {
    pub fn new(config: MqttConfig, hub: Arc<Hub>) -> Arc<Transport> {
        Arc::new(Transport {
            config,
            hub,
            pkid_seq: AtomicU16::new(1),
            shutdown: watch::channel(false).0,
        })
    }

    /// Accepts connections until [`Transport::shutdown`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(listener, |t, stream, peer| {
            tokio::spawn(session::run(t, Box::new(stream), peer, None));
        })
        .await
    }

    /// Accepts TCP connections until [`Transport::shutdown`], handing each to `serve`.
    pub(crate) async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        serve: impl Fn(Arc<Self>, tokio::net::TcpStream, std::net::SocketAddr),
    ) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        serve(self.clone(), stream, peer);
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

    fn next_pkid(&self) -> u16 {
        loop {
            let p = self.pkid_seq.fetch_add(1, Ordering::Relaxed);
            if p != 0 {
                return p;
            }
        }
    }

    /// Authenticates a CONNECT as ThingsBoard does: MQTT basic credentials by the hash of
    /// client id and user name, of the client id, of the user name (the stored password, if
    /// any, must match), then the user name as an access token. Returns the credentials; a refusal carries the CONNACK code of ThingsBoard's
    /// `ReturnCodeResolver`.
    fn authenticate(&self, c: &Connect) -> Result<Credentials, ConnackCode> {
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
            if let Some(found) = self.hub.lookup(&key) {
                let stored = &found.device.password;
                if stored.is_empty() || c.password.as_deref() == Some(stored.as_str()) {
                    return Ok(found);
                }
                return Err(ConnackCode::BadUserNamePassword);
            }
        }
        if !username.is_empty()
            && let Some(found) = self.hub.by_token(username)
        {
            return Ok(found);
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

/// Resolves once `rx` reads true (or its sender is gone). The borrow of the value ends inside,
/// so callers' futures stay `Send`.
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
