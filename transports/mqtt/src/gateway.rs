//! ThingsBoard's gateway MQTT API (`v1/gateway/*`): one connection reports for many child
//! devices. Each child is a session of its own in the hub (so downlinks for it find the
//! gateway's connection), created on first sight through the registry port.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use thingraft_proto::device::{self, PayloadError};
use thingraft_proto::records::{DeviceRef, DownlinkMsg, EntityId, IngestMsg};
use thingraft_proto::tb;
use thingraft_transport_common::payload::rpc_request_with_id;
use thingraft_transport_common::proto_payload;
use thingraft_transport_common::{Credentials, Downlink, Hub, SUB_ATTRIBUTES, SUB_RPC, Session};
use tokio::sync::mpsc;

/// A gateway publish topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GatewayTopic {
    Connect,
    Disconnect,
    Telemetry,
    Attributes,
    AttributeRequest,
    Rpc,
    Claim,
}

impl GatewayTopic {
    pub fn of(topic: &str) -> Option<GatewayTopic> {
        Some(match topic {
            "v1/gateway/connect" => GatewayTopic::Connect,
            "v1/gateway/disconnect" => GatewayTopic::Disconnect,
            "v1/gateway/telemetry" => GatewayTopic::Telemetry,
            "v1/gateway/attributes" => GatewayTopic::Attributes,
            "v1/gateway/attributes/request" => GatewayTopic::AttributeRequest,
            "v1/gateway/rpc" => GatewayTopic::Rpc,
            "v1/gateway/claim" => GatewayTopic::Claim,
            _ => return None,
        })
    }
}

/// What a gateway publish asks for one child device.
#[derive(Debug, PartialEq)]
pub(crate) enum ChildOp {
    /// Connect the child (created with this device profile name if new).
    Connect(String),
    Disconnect,
    /// An ingest message from the child.
    Msg(IngestMsg),
    /// An attribute request with its id.
    AttributeRequest {
        msg: IngestMsg,
        id: u32,
    },
    /// Open the child's claim window: secret, duration.
    Claim(String, i64),
}

fn invalid(why: impl Into<String>) -> PayloadError {
    PayloadError::InvalidJson(why.into())
}

fn device_name(v: &Value) -> Result<String, PayloadError> {
    v.get("device")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .ok_or_else(|| invalid("gateway message without a device name"))
}

/// Parses a gateway publish into per-child operations, in payload order.
pub(crate) fn parse(topic: GatewayTopic, payload: &[u8]) -> Result<Vec<(String, ChildOp)>, PayloadError> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| invalid(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("gateway message must be a JSON object"))?;
    Ok(match topic {
        GatewayTopic::Connect => {
            let t = v
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .unwrap_or("default");
            vec![(device_name(&v)?, ChildOp::Connect(t.to_string()))]
        }
        GatewayTopic::Disconnect => vec![(device_name(&v)?, ChildOp::Disconnect)],
        GatewayTopic::Telemetry => {
            let now = thingraft_transport_common::now_ms();
            let mut out = Vec::new();
            for (name, values) in obj {
                if !values.is_array() {
                    // ThingsBoard skips (and logs) a device whose values are not an array.
                    tracing::warn!(device = %name, "gateway telemetry that is not an array skipped");
                    continue;
                }
                let groups = device::parse_telemetry(values.to_string().as_bytes(), now)?;
                out.push((name.clone(), ChildOp::Msg(IngestMsg::Telemetry(groups))));
            }
            out
        }
        GatewayTopic::Attributes => {
            let mut out = Vec::new();
            for (name, values) in obj {
                let attrs = device::parse_attributes(values.to_string().as_bytes())?;
                out.push((name.clone(), ChildOp::Msg(IngestMsg::ClientAttributes(attrs))));
            }
            out
        }
        GatewayTopic::AttributeRequest => {
            let id = v
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| invalid("attribute request without a numeric id"))?;
            let client = v.get("client").and_then(Value::as_bool).unwrap_or(false);
            let keys = match (v.get("key").and_then(Value::as_str), v.get("keys")) {
                (Some(k), _) => vec![k.to_string()],
                (None, Some(Value::Array(ks))) => {
                    ks.iter().filter_map(Value::as_str).map(String::from).collect()
                }
                _ => return Err(invalid("attribute request without key or keys")),
            };
            let (client_keys, shared_keys) = if client {
                (Some(keys), None)
            } else {
                (None, Some(keys))
            };
            let msg = IngestMsg::AttributeRequest {
                request_id: id,
                client_keys,
                shared_keys,
            };
            vec![(device_name(&v)?, ChildOp::AttributeRequest { msg, id })]
        }
        GatewayTopic::Claim => {
            let mut out = Vec::new();
            for (name, req) in obj {
                let (secret, duration_ms) = thingraft_transport_common::payload::claim_of(req)?;
                out.push((name.clone(), ChildOp::Claim(secret, duration_ms)));
            }
            out
        }
        GatewayTopic::Rpc => {
            let id = v
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| invalid("RPC reply without a numeric id"))?;
            let data = v.get("data").cloned().unwrap_or(Value::Null);
            vec![(
                device_name(&v)?,
                ChildOp::Msg(IngestMsg::RpcResponse {
                    id,
                    payload: data.to_string(),
                }),
            )]
        }
    })
}

fn bad_proto(message: &str, e: prost::DecodeError) -> PayloadError {
    PayloadError::InvalidProtobuf(format!("not a {message}: {e}"))
}

fn name_of(name: String) -> Result<String, PayloadError> {
    if name.is_empty() {
        Err(PayloadError::InvalidProtobuf(
            "gateway message without a device name".into(),
        ))
    } else {
        Ok(name)
    }
}

/// A protobuf key-value as a typed value; a `LONG`/`DOUBLE`/`BOOLEAN` takes its field, a
/// string stays a string (the type says so; no numeric cast as for JSON).
fn kv_value(kv: tb::KeyValueProto) -> (String, device::Value) {
    let value = match kv.r#type() {
        tb::KeyValueType::BooleanV => device::Value::Bool(kv.bool_v),
        tb::KeyValueType::LongV => device::Value::Long(kv.long_v),
        tb::KeyValueType::DoubleV => device::Value::Double(kv.double_v),
        tb::KeyValueType::StringV => device::Value::String(kv.string_v),
        tb::KeyValueType::JsonV => device::Value::Json(kv.json_v),
    };
    (kv.key, value)
}

/// [`parse`] for a gateway whose profile's payloads are protobuf: ThingsBoard's gateway
/// messages (`GatewayTelemetryMsg`, `GatewayAttributesMsg`, ...).
pub(crate) fn parse_proto(
    topic: GatewayTopic,
    payload: &[u8],
) -> Result<Vec<(String, ChildOp)>, PayloadError> {
    use prost::Message as _;
    Ok(match topic {
        GatewayTopic::Connect => {
            let m = tb::GatewayConnectMsg::decode(payload).map_err(|e| bad_proto("ConnectMsg", e))?;
            let t = if m.device_type.is_empty() {
                "default".to_string()
            } else {
                m.device_type
            };
            vec![(name_of(m.device_name)?, ChildOp::Connect(t))]
        }
        GatewayTopic::Disconnect => {
            let m = tb::GatewayDisconnectMsg::decode(payload).map_err(|e| bad_proto("DisconnectMsg", e))?;
            vec![(name_of(m.device_name)?, ChildOp::Disconnect)]
        }
        GatewayTopic::Telemetry => {
            let m =
                tb::GatewayTelemetryMsg::decode(payload).map_err(|e| bad_proto("GatewayTelemetryMsg", e))?;
            let now = thingraft_transport_common::now_ms();
            let mut out = Vec::new();
            for d in m.msg {
                let groups = d
                    .msg
                    .unwrap_or_default()
                    .ts_kv_list
                    .into_iter()
                    .map(|l| device::TsKv {
                        ts_ms: if l.ts > 0 { l.ts } else { now },
                        values: l.kv.into_iter().map(kv_value).collect(),
                    })
                    .filter(|g| !g.values.is_empty())
                    .collect();
                out.push((
                    name_of(d.device_name)?,
                    ChildOp::Msg(IngestMsg::Telemetry(groups)),
                ));
            }
            out
        }
        GatewayTopic::Attributes => {
            let m = tb::GatewayAttributesMsg::decode(payload)
                .map_err(|e| bad_proto("GatewayAttributesMsg", e))?;
            let mut out = Vec::new();
            for d in m.msg {
                let values = d.msg.unwrap_or_default().kv.into_iter().map(kv_value).collect();
                out.push((
                    name_of(d.device_name)?,
                    ChildOp::Msg(IngestMsg::ClientAttributes(values)),
                ));
            }
            out
        }
        GatewayTopic::AttributeRequest => {
            let m = tb::GatewayAttributesRequestMsg::decode(payload)
                .map_err(|e| bad_proto("GatewayAttributesRequestMsg", e))?;
            let id = u32::try_from(m.id)
                .map_err(|_| PayloadError::InvalidProtobuf("negative request id".into()))?;
            let (client_keys, shared_keys) = if m.client {
                (Some(m.keys), None)
            } else {
                (None, Some(m.keys))
            };
            let msg = IngestMsg::AttributeRequest {
                request_id: id,
                client_keys,
                shared_keys,
            };
            vec![(name_of(m.device_name)?, ChildOp::AttributeRequest { msg, id })]
        }
        GatewayTopic::Claim => {
            let m = tb::GatewayClaimMsg::decode(payload).map_err(|e| bad_proto("GatewayClaimMsg", e))?;
            let mut out = Vec::new();
            for d in m.msg {
                let c = d.claim_request.unwrap_or_default();
                let duration = if c.duration_ms > 0 {
                    c.duration_ms
                } else {
                    thingraft_transport_common::payload::CLAIM_DURATION_MS
                };
                out.push((name_of(d.device_name)?, ChildOp::Claim(c.secret_key, duration)));
            }
            out
        }
        GatewayTopic::Rpc => {
            let m = tb::GatewayRpcResponseMsg::decode(payload)
                .map_err(|e| bad_proto("GatewayRpcResponseMsg", e))?;
            let id =
                u32::try_from(m.id).map_err(|_| PayloadError::InvalidProtobuf("negative RPC id".into()))?;
            vec![(
                name_of(m.device_name)?,
                ChildOp::Msg(IngestMsg::RpcResponse { id, payload: m.data }),
            )]
        }
    })
}

/// The children of one gateway connection.
pub(crate) struct Gateway {
    /// The gateway session's downlink channel, shared by its children's sessions.
    tx: mpsc::Sender<Downlink>,
    /// The gateway's credentials, which its children's sessions go with.
    credentials: Credentials,
    children: HashMap<String, Session>,
    names: HashMap<EntityId, String>,
    /// Attribute requests waiting for their answer: (child, id).
    requests: std::collections::HashSet<(EntityId, u32)>,
}

impl Gateway {
    pub fn new(tx: mpsc::Sender<Downlink>, credentials: Credentials) -> Gateway {
        Gateway {
            tx,
            credentials,
            children: HashMap::new(),
            names: HashMap::new(),
            requests: std::collections::HashSet::new(),
        }
    }

    /// The child session of `name`, connecting it (and creating the device) if needed; the
    /// flag tells whether it was connected just now.
    pub async fn child(
        &mut self,
        hub: &Arc<Hub>,
        gateway: &DeviceRef,
        name: &str,
        device_type: &str,
    ) -> Result<(&Session, bool), String> {
        let fresh = !self.children.contains_key(name);
        if fresh {
            let dir = hub.directory().ok_or("the registry is not ready")?;
            let d = dir.child_device(gateway, name, device_type).await?;
            if d.tenant != gateway.tenant {
                return Err(format!("device {name:?} belongs to another tenant"));
            }
            // Its downlinks would come twice (as the gateway's and as a child's).
            if d.device == gateway.device {
                return Err(format!("device {name:?} is the gateway itself"));
            }
            self.names.insert(d.device, name.to_string());
            let s = hub.open_session_on(
                d,
                self.credentials.clone(),
                SUB_ATTRIBUTES | SUB_RPC,
                self.tx.clone(),
            );
            self.children.insert(name.to_string(), s);
        }
        Ok((&self.children[name], fresh))
    }

    /// Disconnects a child; its session, if it had one.
    pub fn remove(&mut self, name: &str) -> Option<Session> {
        let s = self.children.remove(name)?;
        self.names.remove(&s.device.device);
        Some(s)
    }

    /// The session of the connected child `device`.
    pub fn child_of(&self, device: &EntityId) -> Option<&Session> {
        self.children.get(self.names.get(device)?)
    }

    pub fn expect_response(&mut self, child: EntityId, id: u32) {
        // Bounded: a gateway that never reads its answers loses the oldest expectations.
        if self.requests.len() >= 10_000 {
            self.requests.clear();
        }
        self.requests.insert((child, id));
    }

    /// Every child session, leaving none (the gateway is gone).
    pub fn drain(&mut self) -> Vec<Session> {
        self.names.clear();
        self.children.drain().map(|(_, s)| s).collect()
    }

    /// A child's downlink as the gateway topic and payload it goes out on: JSON, or
    /// ThingsBoard's gateway protobuf messages when `protobuf`.
    pub fn downlink(
        &mut self,
        device: EntityId,
        msg: DownlinkMsg,
        protobuf: bool,
    ) -> Option<(&'static str, Vec<u8>)> {
        if let DownlinkMsg::AttributeResponse { request_id, .. } = &msg
            && !self.requests.remove(&(device, *request_id))
        {
            return None;
        }
        let name = self.names.get(&device)?.clone();
        if protobuf {
            return downlink_proto(name, &msg);
        }
        Some(match &msg {
            // The gateway API has no client-side RPC for its devices.
            DownlinkMsg::ClientRpcResponse { .. } => return None,
            DownlinkMsg::AttributeUpdate { .. } => {
                let data: Value = serde_json::from_str(&msg.json()).unwrap_or(Value::Null);
                (
                    "v1/gateway/attributes",
                    serde_json::json!({"device": name, "data": data}).to_string(),
                )
            }
            DownlinkMsg::RpcRequest { id, .. } => {
                let data: Value =
                    serde_json::from_str(&rpc_request_with_id(*id, &msg.json())).unwrap_or(Value::Null);
                (
                    "v1/gateway/rpc",
                    serde_json::json!({"device": name, "data": data}).to_string(),
                )
            }
            DownlinkMsg::AttributeResponse { request_id, .. } => {
                let json = msg.json();
                // The answer has one scope section (`client` or `shared`), as asked. As in
                // ThingsBoard's `JsonConverter.getJsonObjectForGateway`: one value found →
                // `value`, several → `values`, none → neither.
                let v: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
                let values = v
                    .as_object()
                    .and_then(|o| o.values().next())
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let mut out = serde_json::json!({"id": request_id, "device": name});
                match values.len() {
                    0 => {}
                    1 => out["value"] = values.values().next().cloned().unwrap_or(Value::Null),
                    _ => out["values"] = Value::Object(values),
                }
                ("v1/gateway/attributes/response", out.to_string())
            }
        })
        .map(|(topic, json)| (topic, json.into_bytes()))
    }
}

/// A child's downlink in ThingsBoard's gateway protobuf messages.
fn downlink_proto(device_name: String, msg: &DownlinkMsg) -> Option<(&'static str, Vec<u8>)> {
    use prost::Message as _;
    let inner = proto_payload::downlink(msg, None);
    Some(match msg {
        DownlinkMsg::ClientRpcResponse { .. } => return None,
        DownlinkMsg::AttributeUpdate { .. } => (
            "v1/gateway/attributes",
            tb::GatewayAttributeUpdateNotificationMsg {
                device_name,
                notification_msg: inner
                    .and_then(|b| tb::AttributeUpdateNotificationMsg::decode(b.as_slice()).ok()),
            }
            .encode_to_vec(),
        ),
        DownlinkMsg::AttributeResponse { .. } => (
            "v1/gateway/attributes/response",
            tb::GatewayAttributeResponseMsg {
                device_name,
                response_msg: inner.and_then(|b| tb::GetAttributeResponseMsg::decode(b.as_slice()).ok()),
            }
            .encode_to_vec(),
        ),
        DownlinkMsg::RpcRequest {
            id, method, params, ..
        } => (
            "v1/gateway/rpc",
            tb::GatewayDeviceRpcRequestMsg {
                device_name,
                rpc_request_msg: Some(tb::ToDeviceRpcRequestMsg {
                    request_id: *id as i32,
                    method_name: method.clone(),
                    params: params.clone(),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_payloads_parse_per_device_and_skip_non_arrays() {
        let ops = parse(
            GatewayTopic::Telemetry,
            br#"{"A":[{"ts":1,"values":{"t":1}}],"B":{"t":2},"C":[{"h":3}]}"#,
        )
        .unwrap();
        let names: Vec<&str> = ops.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["A", "C"]);
        assert_eq!(
            parse(GatewayTopic::Connect, br#"{"device":"A"}"#).unwrap(),
            vec![("A".to_string(), ChildOp::Connect("default".into()))]
        );
        assert!(parse(GatewayTopic::Connect, br#"{"type":"x"}"#).is_err());
        assert!(parse(GatewayTopic::Telemetry, b"[1]").is_err());
        let ops = parse(
            GatewayTopic::AttributeRequest,
            br#"{"id":4,"device":"A","client":true,"key":"fw"}"#,
        )
        .unwrap();
        assert!(matches!(&ops[0].1, ChildOp::AttributeRequest { id: 4, .. }));
    }
}
