//! Request bodies that mean the same on every transport.

use thingraft_proto::device::PayloadError;
use thingraft_proto::records::IngestMsg;

/// Requested client and shared attribute keys (`None`: the scope was not named).
pub type KeyLists = (Option<Vec<String>>, Option<Vec<String>>);

fn key_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// An attribute request body: `{"clientKeys":"a,b","sharedKeys":"c,d"}` (both optional,
/// comma-separated strings); an empty body asks for everything.
pub fn parse_attribute_request(payload: &[u8]) -> Result<KeyLists, PayloadError> {
    let v: serde_json::Value = if payload.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(payload).map_err(|e| PayloadError::InvalidJson(e.to_string()))?
    };
    if !v.is_object() {
        return Err(PayloadError::InvalidJson(
            "attribute request must be a JSON object".into(),
        ));
    }
    let list = |k: &str| v.get(k).and_then(|x| x.as_str()).map(key_list);
    Ok((list("clientKeys"), list("sharedKeys")))
}

/// The same request given as URL query parameters (`?clientKeys=a,b&sharedKeys=c`), as the
/// HTTP and CoAP APIs take it. A repeated parameter adds its keys (`?sharedKeys=a&sharedKeys=b`,
/// as Python's `requests` sends a list; Spring joins them the same way).
pub fn attribute_request_from_query<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> KeyLists {
    let (mut client, mut shared): KeyLists = (None, None);
    for (k, v) in params {
        let list = match k {
            "clientKeys" => &mut client,
            "sharedKeys" => &mut shared,
            _ => continue,
        };
        list.get_or_insert_with(Vec::new).extend(key_list(v));
    }
    (client, shared)
}

/// A client-side RPC body `{"method":"m","params":..}` as the ingest message for request
/// `request_id`.
pub fn parse_client_rpc(request_id: u32, payload: &[u8]) -> Result<IngestMsg, PayloadError> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
    let method = v
        .get("method")
        .and_then(|m| m.as_str())
        .ok_or_else(|| PayloadError::InvalidJson("client RPC without a method".into()))?;
    let params = v.get("params").cloned().unwrap_or(serde_json::Value::Null);
    Ok(IngestMsg::ClientRpc {
        request_id,
        method: method.to_string(),
        params: params.to_string(),
    })
}

/// A device's reply to server-side RPC `id`: any payload, kept as text.
pub fn rpc_response(id: u32, payload: &[u8]) -> IngestMsg {
    IngestMsg::RpcResponse {
        id,
        payload: String::from_utf8_lossy(payload).into_owned(),
    }
}

/// A server-side RPC as the HTTP and CoAP APIs show it: `{"id":N,"method":..,"params":..}`.
pub fn rpc_request_with_id(id: u32, json: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Object(m)) => {
            let mut out = serde_json::Map::new();
            out.insert("id".into(), id.into());
            out.extend(m);
            serde_json::Value::Object(out).to_string()
        }
        _ => json.to_string(),
    }
}

/// ThingsBoard's claim window when the device names none (`security.claim.duration`).
pub const CLAIM_DURATION_MS: i64 = 86_400_000;

/// A device's claim request `{"secretKey":"s","durationMs":60000}`; both optional, and an
/// empty body means both defaults.
pub fn parse_claim(payload: &[u8]) -> Result<(String, i64), PayloadError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok((String::new(), CLAIM_DURATION_MS));
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
    claim_of(&v)
}

/// The claim request in an already parsed JSON value (the gateway's per-device form).
pub fn claim_of(v: &serde_json::Value) -> Result<(String, i64), PayloadError> {
    if !v.is_object() {
        return Err(PayloadError::InvalidJson(
            "claim request must be a JSON object".into(),
        ));
    }
    let secret = v
        .get("secretKey")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string();
    let duration = v
        .get("durationMs")
        .and_then(serde_json::Value::as_i64)
        .filter(|d| *d > 0)
        .unwrap_or(CLAIM_DURATION_MS);
    Ok((secret, duration))
}

/// The answer to a client-side RPC that nothing answered in time.
pub const CLIENT_RPC_TIMEOUT: &str = r#"{"error":"timeout"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_requests_in_body_and_query_form_agree() {
        let body = parse_attribute_request(br#"{"clientKeys":"a, b","sharedKeys":""}"#).unwrap();
        let query = attribute_request_from_query([("clientKeys", "a,b"), ("sharedKeys", "")]);
        assert_eq!(body, (Some(vec!["a".into(), "b".into()]), Some(vec![])));
        assert_eq!(body, query);
        assert_eq!(parse_attribute_request(b" ").unwrap(), (None, None));
        let repeated = attribute_request_from_query([("sharedKeys", "a"), ("sharedKeys", "b,c")]);
        assert_eq!(repeated, (None, Some(vec!["a".into(), "b".into(), "c".into()])));
        assert!(parse_attribute_request(b"[1]").is_err());
        assert!(parse_attribute_request(b"{").is_err());
    }

    #[test]
    fn rpc_requests_gain_their_id_first() {
        assert_eq!(
            rpc_request_with_id(3, r#"{"method":"m","params":{"a":1}}"#),
            r#"{"id":3,"method":"m","params":{"a":1}}"#
        );
    }

    #[test]
    fn client_rpc_needs_a_method() {
        assert!(parse_client_rpc(1, br#"{"params":{}}"#).is_err());
        assert_eq!(
            parse_client_rpc(1, br#"{"method":"getTime","params":{}}"#).unwrap(),
            IngestMsg::ClientRpc {
                request_id: 1,
                method: "getTime".into(),
                params: "{}".into()
            }
        );
    }
}
