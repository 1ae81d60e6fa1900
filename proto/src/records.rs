//! Records of the device partitions, shared by the transports (which append ingest records) and
//! the engine (which processes and applies them).
//!
//! A record's key is the 16-byte id of the entity it concerns (a device), so all of an entity's
//! records land in one partition, in order. Its value is a [`PartitionRecord`] in postcard form
//! behind a one-byte format version.

use serde::{Deserialize, Serialize};

use crate::device::{TsKv, Value};

/// First byte of every encoded record.
pub const FORMAT_V1: u8 = 1;

/// A 16-byte entity id (a UUID's bytes).
pub type EntityId = [u8; 16];

/// Where a device session lives: the node and that node's session number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionRef {
    pub node: u64,
    pub session: u64,
}

/// What a transport needs to know of a device it authenticated: stored in the metadata map
/// under `reg/token/<access token>` (and `reg/basic/<sha3 hex>` for MQTT basic credentials) by
/// the registry, read by the transports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRef {
    pub device: EntityId,
    pub tenant: EntityId,
    pub name: String,
    pub device_type: String,
    /// MQTT basic credentials: the stored password the client must match (empty: none).
    pub password: String,
}

impl DeviceRef {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encode")
    }

    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        postcard::from_bytes(b).map_err(|e| RecordError::Malformed(e.to_string()))
    }
}

/// Metadata-map key of an access token.
pub fn token_key(token: &str) -> String {
    format!("reg/token/{token}")
}

/// ThingsBoard's lookup hash of X.509 credentials: the SHA3-256 hex of the certificate's base64
/// text without PEM armour or line breaks (`EncryptionUtil.certTrimNewLines`).
pub fn x509_hash(certificate: &str) -> String {
    let trimmed: String = certificate
        .replace("-----BEGIN CERTIFICATE-----", "")
        .replace("-----END CERTIFICATE-----", "")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    sha3_hex(trimmed.as_bytes())
}

/// Metadata-map key of the X.509 credentials of a certificate (its DER bytes), as a TLS
/// connection presents it.
pub fn x509_key(der: &[u8]) -> String {
    use base64::Engine;
    x509_key_of_hash(&x509_hash(&base64::engine::general_purpose::STANDARD.encode(der)))
}

/// Metadata-map key of X.509 credentials, by their lookup hash.
pub fn x509_key_of_hash(hash: &str) -> String {
    format!("reg/x509/{hash}")
}

fn sha3_hex(b: &[u8]) -> String {
    use sha3::Digest;
    sha3::Sha3_256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Metadata-map key of MQTT basic credentials, by their lookup hash.
pub fn basic_key(hash: &str) -> String {
    format!("reg/basic/{hash}")
}

/// Whether a metadata-map key holds device credentials (an access token, MQTT basic or X.509
/// credentials), which transports look up and cache.
pub fn is_credentials_key(key: &str) -> bool {
    ["reg/token/", "reg/basic/", "reg/x509/"]
        .iter()
        .any(|p| key.starts_with(p))
}

/// ThingsBoard's lookup hash of MQTT basic credentials: the SHA3-256 hex of the non-empty
/// parts joined by `|` (client id, then user name).
pub fn mqtt_basic_hash(client_id: &str, user_name: &str) -> String {
    let parts: Vec<&str> = [client_id, user_name]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    sha3_hex(parts.join("|").as_bytes())
}

/// Attribute scopes, as ThingsBoard names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    Client,
    Server,
    Shared,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "CLIENT_SCOPE",
            Scope::Server => "SERVER_SCOPE",
            Scope::Shared => "SHARED_SCOPE",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "CLIENT_SCOPE" => Some(Scope::Client),
            "SERVER_SCOPE" => Some(Scope::Server),
            "SHARED_SCOPE" => Some(Scope::Shared),
            _ => None,
        }
    }

    pub fn tag(self) -> u8 {
        match self {
            Scope::Client => 1,
            Scope::Server => 2,
            Scope::Shared => 3,
        }
    }
}

/// One record of a device partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PartitionRecord {
    /// A device message or an API command, validated, as a transport or the REST API accepted it.
    Ingest(Ingest),
    /// What the partition's engine shard decided for the ingest records at offsets
    /// `from .. to` (records of other kinds in that range are skipped).
    Outcome(Outcome),
}

/// A message about one entity, stamped by the node that accepted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingest {
    pub tenant: EntityId,
    pub device: EntityId,
    /// When the accepting node received it (epoch ms); the time every replica uses for it.
    pub ts_ms: i64,
    /// The device session it came from, if any.
    pub session: Option<SessionRef>,
    pub msg: IngestMsg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IngestMsg {
    /// Device telemetry (`POST_TELEMETRY_REQUEST`), one group per timestamp.
    Telemetry(Vec<TsKv>),
    /// Device client attributes (`POST_ATTRIBUTES_REQUEST`).
    ClientAttributes(Vec<(String, Value)>),
    /// A session opened (MQTT CONNECT accepted).
    Connect,
    /// The session saw packets (PINGREQ, SUBSCRIBE, ...) that carried no message: the device is
    /// alive. Reported at most once per report period.
    Activity,
    /// A session closed.
    Disconnect,
    /// The partition's leader found the device silent past its inactivity timeout (at the
    /// record's time).
    Inactive,
    /// Telemetry saved through the REST API (bypasses the rule chain).
    SaveTelemetry(Vec<TsKv>),
    /// Attributes saved through the REST API.
    SaveAttributes {
        scope: Scope,
        values: Vec<(String, Value)>,
    },
    /// Attributes deleted through the REST API.
    DeleteAttributes { scope: Scope, keys: Vec<String> },
    /// Telemetry deleted through the REST API: `keys` in `[start_ts, end_ts)`, and their latest
    /// values when `delete_latest`.
    DeleteTelemetry {
        keys: Vec<String>,
        start_ts: i64,
        end_ts: i64,
        delete_latest: bool,
    },
    /// The device asks for attribute values (`None`: that scope was not asked for; both
    /// `None`: all client and shared attributes).
    AttributeRequest {
        request_id: u32,
        client_keys: Option<Vec<String>>,
        shared_keys: Option<Vec<String>>,
    },
    /// A server-side RPC, from the REST API. `params` is JSON text.
    RpcRequest {
        uuid: EntityId,
        method: String,
        params: String,
        oneway: bool,
        persistent: bool,
        expiration_ms: i64,
    },
    /// The device's reply to server-side RPC `id` (any text, usually JSON).
    RpcResponse { id: u32, payload: String },
    /// A client-side RPC from the device (`TO_SERVER_RPC_REQUEST`); `params` is JSON text.
    ClientRpc {
        request_id: u32,
        method: String,
        params: String,
    },
    /// What became of a server-side RPC, recorded by the partition's leader.
    RpcStatus { uuid: EntityId, status: RpcStatus },
}

/// ThingsBoard's RPC states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcStatus {
    Queued,
    Sent,
    Delivered,
    Successful,
    Timeout,
    Expired,
    Failed,
    Deleted,
}

impl RpcStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RpcStatus::Queued => "QUEUED",
            RpcStatus::Sent => "SENT",
            RpcStatus::Delivered => "DELIVERED",
            RpcStatus::Successful => "SUCCESSFUL",
            RpcStatus::Timeout => "TIMEOUT",
            RpcStatus::Expired => "EXPIRED",
            RpcStatus::Failed => "FAILED",
            RpcStatus::Deleted => "DELETED",
        }
    }

    /// Whether an RPC in this status may be recorded in `next`: a deletion ends any RPC not
    /// deleted yet; otherwise the status only moves forward, from QUEUED to SENT to DELIVERED
    /// to a final one, and never from a final one.
    pub fn may_become(self, next: RpcStatus) -> bool {
        let step = |s: RpcStatus| match s {
            RpcStatus::Queued => 0,
            RpcStatus::Sent => 1,
            RpcStatus::Delivered => 2,
            _ => 3,
        };
        match next {
            RpcStatus::Deleted => self != RpcStatus::Deleted,
            _ => step(next) > step(self),
        }
    }

    /// No later status replaces this one.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RpcStatus::Successful
                | RpcStatus::Timeout
                | RpcStatus::Expired
                | RpcStatus::Failed
                | RpcStatus::Deleted
        )
    }
}

/// A downlink from a partition's leader to a device's sessions on some node (carried by the
/// log's application messages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deliver {
    pub device: EntityId,
    /// Only this session (on the node that receives the message); `None`: every session.
    pub session: Option<u64>,
    pub msg: DownlinkMsg,
}

/// What a session sends to its device, typed: each transport renders it in the device's payload
/// format ([`DownlinkMsg::json`] for JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DownlinkMsg {
    /// Shared attributes changed: updated ones, or deleted names; to sessions subscribed to them.
    AttributeUpdate {
        updated: Vec<AttrKv>,
        deleted: Vec<String>,
    },
    /// The answer to an attribute request of that session: the attributes found in each scope.
    AttributeResponse {
        request_id: u32,
        client: Vec<AttrKv>,
        shared: Vec<AttrKv>,
    },
    /// A server-side RPC: its method and params (JSON text); to sessions subscribed to RPC.
    /// `uuid` names it for the session, which records DELIVERED under it once the device
    /// acknowledges it.
    RpcRequest {
        id: u32,
        method: String,
        params: String,
        uuid: EntityId,
    },
    /// A rule chain's answer to the session's client-side RPC `request_id` (JSON text).
    ClientRpcResponse { request_id: u32, body: String },
}

/// One attribute in a downlink: name, last update time, value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttrKv {
    pub key: String,
    pub ts_ms: i64,
    pub value: Value,
}

impl DownlinkMsg {
    /// The uuid of a server-side RPC request.
    pub fn rpc_uuid(&self) -> Option<EntityId> {
        match self {
            DownlinkMsg::RpcRequest { uuid, .. } => Some(*uuid),
            _ => None,
        }
    }

    /// The JSON payload ThingsBoard's JSON adaptor sends: `{"k":v,..}` or `{"deleted":[..]}`
    /// for an update, `{"client":{..},"shared":{..}}` (a scope without values left out) for a
    /// response, `{"method":..,"params":..}` for an RPC.
    pub fn json(&self) -> String {
        fn object(kvs: &[AttrKv]) -> serde_json::Value {
            serde_json::Value::Object(
                kvs.iter()
                    .map(|kv| (kv.key.clone(), kv.value.to_json()))
                    .collect(),
            )
        }
        match self {
            DownlinkMsg::AttributeUpdate { updated, deleted } => {
                if updated.is_empty() {
                    serde_json::json!({ "deleted": deleted }).to_string()
                } else {
                    object(updated).to_string()
                }
            }
            DownlinkMsg::AttributeResponse { client, shared, .. } => {
                let mut out = serde_json::Map::new();
                for (name, kvs) in [("client", client), ("shared", shared)] {
                    if !kvs.is_empty() {
                        out.insert(name.into(), object(kvs));
                    }
                }
                serde_json::Value::Object(out).to_string()
            }
            DownlinkMsg::RpcRequest { method, params, .. } => format!(
                "{{\"method\":{},\"params\":{}}}",
                serde_json::Value::String(method.clone()),
                params
            ),
            DownlinkMsg::ClientRpcResponse { body, .. } => body.clone(),
        }
    }
}

impl Deliver {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encode")
    }

    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        postcard::from_bytes(b).map_err(|e| RecordError::Malformed(e.to_string()))
    }
}

/// The outcome of processing a contiguous range of a partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub from: u64,
    pub to: u64,
    /// Raft term of the leader whose shard processed the range (diagnostics; fencing is by
    /// range: the first committed outcome covering an offset wins).
    pub term: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format {0}")]
    Format(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
}

impl PartitionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_V1];
        // Encoding plain data into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).expect("postcard encode"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.first() {
            None => Err(RecordError::Empty),
            Some(&FORMAT_V1) => {
                postcard::from_bytes(&bytes[1..]).map_err(|e| RecordError::Malformed(e.to_string()))
            }
            Some(&v) => Err(RecordError::Format(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_status_moves_only_forward_and_deletion_ends_any() {
        use RpcStatus::*;
        assert!(Queued.may_become(Sent));
        assert!(Sent.may_become(Delivered));
        assert!(Queued.may_become(Delivered));
        assert!(Delivered.may_become(Timeout));
        // A session's DELIVERED may be applied before the leader's SENT: SENT comes too late.
        assert!(!Delivered.may_become(Sent));
        assert!(!Sent.may_become(Sent));
        assert!(!Successful.may_become(Timeout));
        assert!(!Timeout.may_become(Delivered));
        assert!(Successful.may_become(Deleted));
        assert!(!Deleted.may_become(Deleted));
        assert!(!Deleted.may_become(Failed));
    }

    #[test]
    fn records_round_trip_and_reject_unknown_formats() {
        let r = PartitionRecord::Ingest(Ingest {
            tenant: [1; 16],
            device: [2; 16],
            ts_ms: 1_700_000_000_000,
            session: Some(SessionRef { node: 1, session: 7 }),
            msg: IngestMsg::Telemetry(vec![TsKv {
                ts_ms: 5,
                values: vec![("t".into(), Value::Long(25))],
            }]),
        });
        let b = r.encode();
        assert_eq!(PartitionRecord::decode(&b), Ok(r));
        assert_eq!(PartitionRecord::decode(&[]), Err(RecordError::Empty));
        assert_eq!(PartitionRecord::decode(&[9, 0]), Err(RecordError::Format(9)));
        assert!(matches!(
            PartitionRecord::decode(&[FORMAT_V1, 0xff]),
            Err(RecordError::Malformed(_))
        ));
    }

    #[test]
    fn every_kind_of_credentials_key_is_recognised() {
        assert!(is_credentials_key(&token_key("T")));
        assert!(is_credentials_key(&basic_key("abc")));
        assert!(is_credentials_key(&x509_key(b"der")));
        assert!(!is_credentials_key("reg/device/T"));
        assert!(!is_credentials_key("reg/tokens"));
    }
}
