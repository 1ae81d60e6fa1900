//! Protobuf device payloads: a device profile's proto schemas (ThingsBoard's
//! `transportPayloadTypeConfiguration` with `transportPayloadType: PROTOBUF`).
//!
//! A schema is proto3 text; its last top-level message is the payload's type, as in ThingsBoard
//! (`DynamicProtoUtils.getDynamicMessageBuilder`). A payload is decoded with it and printed as
//! JSON the way protobuf-java's `JsonFormat.printer().includingDefaultValueFields()` prints it,
//! then typed by the same rules as a JSON payload (`thingraft_proto::device`). So a protobuf
//! device stores exactly what ThingsBoard would store for it.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};
use protox::file::{File, FileResolver};
use thingraft_proto::device::PayloadError;
use thingraft_proto::records::{AttrKv, DownlinkMsg};
use thingraft_proto::tb;

/// The transports a device profile's `transportConfiguration` can be for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTransport {
    Mqtt,
    Coap,
}

impl DeviceTransport {
    /// ThingsBoard's name of it (the configuration's `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceTransport::Mqtt => "MQTT",
            DeviceTransport::Coap => "COAP",
        }
    }
}

/// The `transportPayloadTypeConfiguration` of a profile's `transportConfiguration`, with the
/// transport it is for: MQTT keeps it at the top, CoAP in `coapDeviceTypeConfiguration`.
/// `None` for the DEFAULT type (and any other).
pub fn payload_config(transport_config: &serde_json::Value) -> Option<(DeviceTransport, &serde_json::Value)> {
    match transport_config["type"].as_str()? {
        "MQTT" => Some((
            DeviceTransport::Mqtt,
            &transport_config["transportPayloadTypeConfiguration"],
        )),
        "COAP" => Some((
            DeviceTransport::Coap,
            &transport_config["coapDeviceTypeConfiguration"]["transportPayloadTypeConfiguration"],
        )),
        _ => None,
    }
}

/// The protobuf schemas of a profile's `transportConfiguration` for `transport`: `Ok(None)`
/// when its payloads there are JSON (or it is for another transport).
pub fn schemas_for(
    transport_config: &serde_json::Value,
    transport: DeviceTransport,
) -> Result<Option<ProtoSchemas>, SchemaError> {
    match payload_config(transport_config) {
        Some((t, payload)) if t == transport => match payload["transportPayloadType"].as_str() {
            None | Some("JSON") => Ok(None),
            Some("PROTOBUF") => ProtoSchemas::from_config(payload).map(Some),
            Some(other) => Err(SchemaError(format!("Unknown transport payload type {other}"))),
        },
        _ => Ok(None),
    }
}

/// The format a device message is in: the device profile's, or one its topic forces
/// (MQTT's `v2/../j` and `v2/../p`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Profile,
    Json,
    Protobuf,
}

/// What an uplink payload is, for the schema that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    Telemetry,
    Attributes,
    RpcResponse,
}

/// The JSON text an uplink payload means: as it is when it is JSON; decoded with the device's
/// schema when it is protobuf — or when the profile says protobuf, and then, if the profile
/// allows JSON too (`enableCompatibilityWithJsonPayloadFormat`), as JSON when it does not
/// decode.
pub fn uplink_json<'a>(
    schemas: Option<&ProtoSchemas>,
    format: Format,
    kind: Uplink,
    payload: &'a [u8],
) -> Result<Cow<'a, [u8]>, PayloadError> {
    let schemas = match (format, schemas) {
        (Format::Json, _) | (Format::Profile, None) => return Ok(Cow::Borrowed(payload)),
        (Format::Protobuf, None) => {
            return Err(PayloadError::InvalidProtobuf(
                ProtoPayloadError::NoSchema.to_string(),
            ));
        }
        (_, Some(s)) => s,
    };
    let decoded = match kind {
        Uplink::Telemetry => schemas.telemetry_json(payload),
        Uplink::Attributes => schemas.attributes_json(payload),
        Uplink::RpcResponse => schemas.rpc_response_json(payload),
    };
    match decoded {
        Ok(json) => Ok(Cow::Owned(json.into_bytes())),
        Err(_) if format == Format::Profile && schemas.json_fallback => Ok(Cow::Borrowed(payload)),
        Err(e) => Err(PayloadError::InvalidProtobuf(e.to_string())),
    }
}

/// Whether a request or reply in `format` from a device with `schemas` is protobuf.
pub fn is_protobuf(schemas: Option<&ProtoSchemas>, format: Format) -> bool {
    match format {
        Format::Json => false,
        Format::Protobuf => true,
        Format::Profile => schemas.is_some(),
    }
}

fn bad(message: &str, e: impl std::fmt::Display) -> PayloadError {
    PayloadError::InvalidProtobuf(format!("not a {message}: {e}"))
}

/// A protobuf attribute request (`GetAttributeRequestMsg`) as the key lists of a JSON one: a
/// scope without names is not asked for, and a request naming none asks for all.
pub fn attribute_request(payload: &[u8]) -> Result<crate::payload::KeyLists, PayloadError> {
    let m = tb::GetAttributeRequestMsg::decode(payload).map_err(|e| bad("GetAttributeRequestMsg", e))?;
    let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let shared = some(m.shared_attribute_names);
    let client = if m.only_shared {
        None
    } else {
        some(m.client_attribute_names)
    };
    Ok((client, shared))
}

/// A protobuf claim request (`ClaimDeviceMsg`): the secret, and the duration (the default when
/// not above 0), as [`crate::payload::parse_claim`] reads the JSON one.
pub fn claim(payload: &[u8]) -> Result<(String, i64), PayloadError> {
    let m = tb::ClaimDeviceMsg::decode(payload).map_err(|e| bad("ClaimDeviceMsg", e))?;
    let duration = if m.duration_ms > 0 {
        m.duration_ms
    } else {
        crate::payload::CLAIM_DURATION_MS
    };
    Ok((m.secret_key, duration))
}

/// A protobuf provisioning request (`ProvisionDeviceRequestMsg`) as the JSON request the
/// [`crate::Directory`] takes.
pub fn provision_request_json(payload: &[u8]) -> Result<String, PayloadError> {
    let m =
        tb::ProvisionDeviceRequestMsg::decode(payload).map_err(|e| bad("ProvisionDeviceRequestMsg", e))?;
    let kind = m.credentials_type();
    let creds = m.provision_device_credentials_msg.unwrap_or_default();
    let data = m.credentials_data_proto.unwrap_or_default();
    let mut v = serde_json::json!({
        "deviceName": m.device_name,
        "provisionDeviceKey": creds.provision_device_key,
        "provisionDeviceSecret": creds.provision_device_secret,
        "credentialsType": kind.as_str_name(),
    });
    match kind {
        tb::CredentialsType::AccessToken => {
            if let Some(t) = data.validate_device_token_request_msg {
                v["token"] = t.token.into();
            }
        }
        tb::CredentialsType::X509Certificate => {
            if let Some(x) = data.validate_device_x509_cert_request_msg {
                v["hash"] = x.hash.into();
            }
        }
        tb::CredentialsType::MqttBasic => {
            if let Some(b) = data.validate_basic_mqtt_cred_request_msg {
                v["clientId"] = b.client_id.into();
                v["username"] = b.user_name.into();
                v["password"] = b.password.into();
            }
        }
        tb::CredentialsType::Lwm2mCredentials => {}
    }
    Ok(v.to_string())
}

/// The directory's JSON provisioning answer as a `ProvisionDeviceResponseMsg`; MQTT basic
/// credentials travel as their JSON text, as in ThingsBoard.
pub fn provision_response(answer: &str) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_str(answer).unwrap_or_default();
    let status = v["status"]
        .as_str()
        .and_then(tb::ResponseStatus::from_str_name)
        .unwrap_or(tb::ResponseStatus::Failure);
    let kind = v["credentialsType"]
        .as_str()
        .and_then(tb::CredentialsType::from_str_name)
        .unwrap_or_default();
    let value = match &v["credentialsValue"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut m = tb::ProvisionDeviceResponseMsg {
        credentials_value: value,
        ..Default::default()
    };
    m.set_status(status);
    m.set_credentials_type(kind);
    m.encode_to_vec()
}

/// A protobuf client-side RPC (`ToServerRpcRequestMsg`) as the JSON `{"method":..,"params":..}`
/// the JSON API takes; `params` that are not JSON text stay a string.
pub fn client_rpc_json(payload: &[u8]) -> Result<String, PayloadError> {
    let m = tb::ToServerRpcRequestMsg::decode(payload).map_err(|e| bad("ToServerRpcRequestMsg", e))?;
    let params =
        serde_json::from_str::<serde_json::Value>(&m.params).unwrap_or(serde_json::Value::String(m.params));
    Ok(serde_json::json!({"method": m.method_name, "params": params}).to_string())
}

/// The answer to a protobuf client-side RPC (`ToServerRpcResponseMsg`): a JSON reply, or an
/// error such as `timeout`.
pub fn client_rpc_response(request_id: u32, payload: &str, error: &str) -> Vec<u8> {
    tb::ToServerRpcResponseMsg {
        request_id: request_id as i32,
        payload: payload.to_string(),
        error: error.to_string(),
    }
    .encode_to_vec()
}

fn ts_kv(kv: &AttrKv) -> tb::TsKvProto {
    use thingraft_proto::device::Value as V;
    let mut p = tb::KeyValueProto {
        key: kv.key.clone(),
        ..Default::default()
    };
    let kind = match &kv.value {
        V::Bool(b) => {
            p.bool_v = *b;
            tb::KeyValueType::BooleanV
        }
        V::Long(n) => {
            p.long_v = *n;
            tb::KeyValueType::LongV
        }
        V::Double(d) => {
            p.double_v = *d;
            tb::KeyValueType::DoubleV
        }
        V::String(t) => {
            p.string_v = t.clone();
            tb::KeyValueType::StringV
        }
        V::Json(t) => {
            p.json_v = t.clone();
            tb::KeyValueType::JsonV
        }
    };
    p.set_type(kind);
    tb::TsKvProto {
        ts: kv.ts_ms,
        kv: Some(p),
    }
}

/// A downlink as a protobuf device gets it: ThingsBoard's fixed messages for attributes
/// (`AttributeUpdateNotificationMsg`, `GetAttributeResponseMsg`), the profile's RPC request
/// message for an RPC, `ToServerRpcResponseMsg` for a client-side RPC's answer — `None` when the device has no such schema (ThingsBoard cannot send it
/// either).
pub fn downlink(msg: &DownlinkMsg, schemas: Option<&ProtoSchemas>) -> Option<Vec<u8>> {
    Some(match msg {
        DownlinkMsg::AttributeUpdate { updated, deleted } => tb::AttributeUpdateNotificationMsg {
            shared_updated: updated.iter().map(ts_kv).collect(),
            shared_deleted: deleted.clone(),
        }
        .encode_to_vec(),
        DownlinkMsg::AttributeResponse {
            request_id,
            client,
            shared,
        } => tb::GetAttributeResponseMsg {
            request_id: *request_id as i32,
            client_attribute_list: client.iter().map(ts_kv).collect(),
            shared_attribute_list: shared.iter().map(ts_kv).collect(),
            is_multiple_attributes_request: client.len() + shared.len() > 1,
            error: String::new(),
            shared_state_msg: false,
        }
        .encode_to_vec(),
        DownlinkMsg::RpcRequest {
            id, method, params, ..
        } => schemas?.rpc_request(*id, method, params),
        DownlinkMsg::ClientRpcResponse { request_id, body } => client_rpc_response(*request_id, body, ""),
    })
}

/// Why a profile's protobuf settings were refused (the REST answer's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// Why a protobuf payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoPayloadError {
    /// The device's profile has no protobuf schemas (a `p` topic on a JSON device).
    #[error("the device profile has no protobuf schema for this payload")]
    NoSchema,
    /// The bytes are not a message of the schema's type.
    #[error("payload is not a valid {message} message: {reason}")]
    Decode { message: String, reason: String },
}

/// The compiled schemas of one device profile.
#[derive(Debug, Clone)]
pub struct ProtoSchemas {
    pub telemetry: MessageDescriptor,
    pub attributes: MessageDescriptor,
    pub rpc_request: MessageDescriptor,
    pub rpc_response: MessageDescriptor,
    /// `enableCompatibilityWithJsonPayloadFormat`: a payload that is not protobuf is tried as
    /// JSON.
    pub json_fallback: bool,
    /// `useJsonPayloadFormatForDefaultDownlinkTopics`: the v1 downlink topics stay JSON.
    pub json_default_downlinks: bool,
}

/// ThingsBoard's names of the four schemas, as its error messages use them.
const TELEMETRY: &str = "telemetry proto schema";
const ATTRIBUTES: &str = "attributes proto schema";
const RPC_REQUEST: &str = "rpc request proto schema";
const RPC_RESPONSE: &str = "rpc response proto schema";

impl ProtoSchemas {
    /// Compiles a `transportPayloadTypeConfiguration` object whose `transportPayloadType` is
    /// `PROTOBUF`. Every schema must be given, be proto3 and define a message; the RPC request
    /// message must have `method`, `requestId` and `params` (ThingsBoard's checks).
    pub fn from_config(config: &serde_json::Value) -> Result<ProtoSchemas, SchemaError> {
        let schema = |field: &str, name: &str| -> Result<MessageDescriptor, SchemaError> {
            compile(config[field].as_str().unwrap_or_default(), name)
        };
        let rpc_request = schema("deviceRpcRequestProtoSchema", RPC_REQUEST)?;
        for field in ["method", "requestId", "params"] {
            if rpc_request.get_field_by_name(field).is_none() {
                return Err(SchemaError(format!(
                    "[Transport Configuration] invalid {RPC_REQUEST} provided! Failed to get field \
                     descriptor for field: {field}!"
                )));
            }
        }
        Ok(ProtoSchemas {
            telemetry: schema("deviceTelemetryProtoSchema", TELEMETRY)?,
            attributes: schema("deviceAttributesProtoSchema", ATTRIBUTES)?,
            rpc_request,
            rpc_response: schema("deviceRpcResponseProtoSchema", RPC_RESPONSE)?,
            json_fallback: config["enableCompatibilityWithJsonPayloadFormat"].as_bool() == Some(true),
            json_default_downlinks: config["useJsonPayloadFormatForDefaultDownlinkTopics"].as_bool()
                == Some(true),
        })
    }

    /// A telemetry payload as the JSON text it means.
    pub fn telemetry_json(&self, payload: &[u8]) -> Result<String, ProtoPayloadError> {
        to_json(&self.telemetry, payload)
    }

    /// A client-attributes payload as the JSON text it means.
    pub fn attributes_json(&self, payload: &[u8]) -> Result<String, ProtoPayloadError> {
        to_json(&self.attributes, payload)
    }

    /// A device's reply to a server-side RPC as the JSON text it means.
    pub fn rpc_response_json(&self, payload: &[u8]) -> Result<String, ProtoPayloadError> {
        to_json(&self.rpc_response, payload)
    }

    /// A server-side RPC request in the profile's RPC request message: `method`, `requestId`
    /// and `params` (the JSON text of the caller's params), as ThingsBoard's
    /// `ProtoConverter.convertToRpcRequest` fills them. Fields of other names stay unset.
    pub fn rpc_request(&self, id: u32, method: &str, params: &str) -> Vec<u8> {
        let desc = &self.rpc_request;
        let mut msg = DynamicMessage::new(desc.clone());
        let fields = [
            ("method", Value::String(method.to_string())),
            ("requestId", Value::I32(id as i32)),
            ("params", Value::String(params.to_string())),
        ];
        for (name, value) in fields {
            if let Some(f) = desc.get_field_by_name(name) {
                // A field of another type than ThingsBoard's (say `int64 requestId`) gets the
                // value converted where that is lossless, and is left unset otherwise.
                if let Some(v) = convert(&value, &f) {
                    msg.set_field(&f, v);
                }
            }
        }
        msg.encode_to_vec()
    }
}

/// A value for field `f` of another scalar kind, where the conversion keeps it.
fn convert(v: &Value, f: &FieldDescriptor) -> Option<Value> {
    if f.is_list() || f.is_map() {
        return None;
    }
    let n = match v {
        Value::I32(n) => i64::from(*n),
        other => return (f.kind() == Kind::String).then(|| other.clone()),
    };
    Some(match f.kind() {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(i32::try_from(n).ok()?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(n),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(u32::try_from(n).ok()?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(u64::try_from(n).ok()?),
        Kind::String => Value::String(n.to_string()),
        _ => return None,
    })
}

/// Compiles one schema; its last top-level message is the payload type.
pub fn compile(schema: &str, name: &str) -> Result<MessageDescriptor, SchemaError> {
    let compact: String = schema.chars().filter(|c| !c.is_whitespace()).collect();
    if !compact.contains("syntax=\"proto3\";") {
        return Err(SchemaError(format!(
            "[Transport Configuration] invalid schema syntax provided for {name}! Only proto3 \
             syntax allowed!"
        )));
    }
    let file_name = format!("{}.proto", name.replace(' ', "_"));
    let resolver = OneFile {
        name: file_name.clone(),
        source: schema.to_string(),
    };
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_source_info(false);
    compiler.open_file(&file_name).map_err(|e| {
        SchemaError(format!(
            "[Transport Configuration] failed to parse {name} due to: {e}"
        ))
    })?;
    let pool = compiler.descriptor_pool();
    pool.get_file_by_name(&file_name)
        .and_then(|f| f.messages().last())
        .ok_or_else(|| {
            SchemaError(format!(
                "[Transport Configuration] invalid {name} provided! At least one Message \
                 definition should exists!"
            ))
        })
}

/// A file resolver that knows one in-memory file: a schema may not import others.
struct OneFile {
    name: String,
    source: String,
}

impl FileResolver for OneFile {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == self.name {
            File::from_source(name, &self.source)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn to_json(desc: &MessageDescriptor, payload: &[u8]) -> Result<String, ProtoPayloadError> {
    let msg = DynamicMessage::decode(desc.clone(), payload).map_err(|e| ProtoPayloadError::Decode {
        message: desc.name().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = String::new();
    message_json(&msg, &mut out);
    Ok(out)
}

/// Prints a message as `JsonFormat.printer().includingDefaultValueFields()` does: fields by
/// their JSON (lowerCamelCase) names, in field order; fields without presence also when they
/// hold their default value; unset fields with presence (messages, `optional`, `oneof`) left
/// out.
fn message_json(msg: &DynamicMessage, out: &mut String) {
    out.push('{');
    let mut first = true;
    for field in prost_reflect::ReflectMessage::descriptor(msg).fields() {
        if field.supports_presence() && !msg.has_field(&field) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        string_json(field.json_name(), out);
        out.push(':');
        field_json(&msg.get_field(&field), &field, out);
    }
    out.push('}');
}

fn field_json(v: &Value, field: &FieldDescriptor, out: &mut String) {
    match v {
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                value_json(item, &field.kind(), out);
            }
            out.push(']');
        }
        Value::Map(entries) => {
            let value_kind = match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                other => other,
            };
            // Sorted keys, so the text is the same for the same map.
            let mut entries: Vec<_> = entries.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let key = match k {
                    MapKey::Bool(b) => b.to_string(),
                    MapKey::I32(n) => n.to_string(),
                    MapKey::I64(n) => n.to_string(),
                    MapKey::U32(n) => n.to_string(),
                    MapKey::U64(n) => n.to_string(),
                    MapKey::String(s) => s.clone(),
                };
                string_json(&key, out);
                out.push(':');
                value_json(v, &value_kind, out);
            }
            out.push('}');
        }
        single => value_json(single, &field.kind(), out),
    }
}

fn value_json(v: &Value, kind: &Kind, out: &mut String) {
    match v {
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::I32(n) => {
            let _ = write!(out, "{n}");
        }
        Value::U32(n) => {
            let _ = write!(out, "{n}");
        }
        // 64-bit integers are JSON strings in protobuf's mapping.
        Value::I64(n) => {
            let _ = write!(out, "\"{n}\"");
        }
        Value::U64(n) => {
            let _ = write!(out, "\"{n}\"");
        }
        // Shortest text that reads back as the same float, as Java's `Float.toString`.
        Value::F32(f) if f.is_finite() => {
            let _ = write!(out, "{f:?}");
        }
        Value::F64(d) if d.is_finite() => {
            let _ = write!(out, "{d:?}");
        }
        Value::F32(f) => non_finite(f64::from(*f), out),
        Value::F64(d) => non_finite(*d, out),
        Value::String(s) => string_json(s, out),
        Value::Bytes(b) => string_json(&base64::engine::general_purpose::STANDARD.encode(b), out),
        Value::EnumNumber(n) => match kind {
            Kind::Enum(e) => match e.get_value(*n) {
                Some(ev) => string_json(ev.name(), out),
                None => {
                    let _ = write!(out, "{n}");
                }
            },
            _ => {
                let _ = write!(out, "{n}");
            }
        },
        Value::Message(m) => message_json(m, out),
        Value::List(_) | Value::Map(_) => out.push_str("null"),
    }
}

fn non_finite(d: f64, out: &mut String) {
    out.push_str(if d.is_nan() {
        "\"NaN\""
    } else if d > 0.0 {
        "\"Infinity\""
    } else {
        "\"-Infinity\""
    });
}

fn string_json(s: &str, out: &mut String) {
    out.push_str(&serde_json::Value::String(s.to_string()).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    const TELEMETRY_SCHEMA: &str = r#"syntax ="proto3";
package telemetry;

message SensorDataReading {
  optional double temperature = 1;
  optional double humidity = 2;
  InnerObject innerObject = 3;
  int64 counter = 4;
  repeated string tags = 5;
  bytes raw = 6;
  Mode mode = 7;
  float ratio = 8;

  enum Mode { IDLE = 0; RUNNING = 1; }

  message InnerObject {
    optional string key1 = 1;
    optional bool key2 = 2;
  }
}"#;

    fn config(telemetry: &str) -> serde_json::Value {
        serde_json::json!({
            "transportPayloadType": "PROTOBUF",
            "deviceTelemetryProtoSchema": telemetry,
            "deviceAttributesProtoSchema": "syntax =\"proto3\"; message A { string firmwareVersion = 1; }",
            "deviceRpcRequestProtoSchema": "syntax =\"proto3\"; message R { optional string method = 1; optional int32 requestId = 2; optional string params = 3; }",
            "deviceRpcResponseProtoSchema": "syntax =\"proto3\"; message P { optional string payload = 1; }",
        })
    }

    fn encode(desc: &MessageDescriptor, json: &str) -> Vec<u8> {
        let mut de = serde_json::Deserializer::from_str(json);
        let msg = DynamicMessage::deserialize(desc.clone(), &mut de).expect("test message");
        prost::Message::encode_to_vec(&msg)
    }

    #[test]
    fn prints_as_java_json_format_with_default_values() {
        let s = ProtoSchemas::from_config(&config(TELEMETRY_SCHEMA)).expect("schemas");
        assert_eq!(s.telemetry.name(), "SensorDataReading");
        let bytes = encode(
            &s.telemetry,
            r#"{"temperature":25,"innerObject":{"key1":"a"},"counter":"7","tags":["x"],"raw":"AQI=","mode":"RUNNING","ratio":0.1}"#,
        );
        assert_eq!(
            s.telemetry_json(&bytes).expect("decodes"),
            r#"{"temperature":25.0,"innerObject":{"key1":"a"},"counter":"7","tags":["x"],"raw":"AQI=","mode":"RUNNING","ratio":0.1}"#
        );
        // Unset: `optional` and message fields are left out, the others print their defaults.
        assert_eq!(
            s.telemetry_json(&[]).expect("empty message"),
            r#"{"counter":"0","tags":[],"raw":"","mode":"IDLE","ratio":0.0}"#
        );
    }

    #[test]
    fn refuses_bytes_that_are_not_the_message() {
        let s = ProtoSchemas::from_config(&config(TELEMETRY_SCHEMA)).expect("schemas");
        let err = s.telemetry_json(&[0xff, 0xff, 0xff]).expect_err("garbage");
        assert!(matches!(err, ProtoPayloadError::Decode { .. }), "{err:?}");
    }

    #[test]
    fn refuses_schemas_as_thingsboard_does() {
        let proto2 = ProtoSchemas::from_config(&config(
            "syntax = \"proto2\"; message M { optional int32 a = 1; }",
        ));
        assert!(
            proto2
                .expect_err("proto2")
                .0
                .contains("Only proto3 syntax allowed")
        );
        let broken = ProtoSchemas::from_config(&config("syntax = \"proto3\"; message M { int32 a = ; }"));
        assert!(
            broken
                .expect_err("syntax error")
                .0
                .contains("failed to parse telemetry proto schema")
        );
        let empty = ProtoSchemas::from_config(&config("syntax = \"proto3\"; enum E { A = 0; }"));
        assert!(empty.expect_err("no message").0.contains("At least one Message"));
        let mut no_method = config(TELEMETRY_SCHEMA);
        no_method["deviceRpcRequestProtoSchema"] =
            "syntax =\"proto3\"; message R { string params = 3; }".into();
        let err = ProtoSchemas::from_config(&no_method).expect_err("rpc request without method");
        assert!(err.0.contains("field: method"), "{err}");
    }

    #[test]
    fn rpc_request_fills_method_id_and_params() {
        let s = ProtoSchemas::from_config(&config(TELEMETRY_SCHEMA)).expect("schemas");
        let bytes = s.rpc_request(3, "setGpio", r#"{"pin":4}"#);
        let msg = DynamicMessage::decode(s.rpc_request.clone(), bytes.as_slice()).expect("decodes");
        let mut out = String::new();
        message_json(&msg, &mut out);
        assert_eq!(
            out,
            r#"{"method":"setGpio","requestId":3,"params":"{\"pin\":4}"}"#
        );
    }
}
