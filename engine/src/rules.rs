//! Rule chains, in ThingsBoard's metadata shape (nodes, `firstNodeIndex`, connections labelled
//! by relation type), and the executor that runs a message through one.
//!
//! This is the first piece of the rule engine (DESIGN road step 3). Today a chain sees the
//! client-side RPCs of devices (`TO_SERVER_RPC_REQUEST`); the shard saves telemetry and
//! attributes itself, as the default chain's save nodes would. The chain runs on the partition's
//! leader only, because its nodes may do non-deterministic work (the clock); what it produces is
//! a reply to the device's session, which changes no stored state.
//!
//! The node types known are ThingsBoard's message type switch, log and RPC call reply, and two
//! of thingraft's own that stand in for script nodes until JavaScript arrives: a filter on the
//! RPC method, and a transform that makes `{"time": String(new Date())}`. ThingsBoard's docs
//! build the same "reply with server time" chain with a script transform.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// The chain every tenant starts with: ThingsBoard's root chain for client-side RPC (log it),
/// plus a reply with the server time to `getTime`, which ThingsBoard's client examples call.
pub const DEFAULT_ROOT_CHAIN: &str = include_str!("rules/root_rule_chain.json");

/// Most node visits for one message, so that a chain with a cycle cannot run forever.
const STEPS_MAX: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChainDef {
    name: String,
    first_node_index: usize,
    nodes: Vec<NodeDef>,
    #[serde(default)]
    connections: Vec<ConnectionDef>,
}

#[derive(Debug, Clone, Deserialize)]
struct NodeDef {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default)]
    configuration: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionDef {
    from_index: usize,
    to_index: usize,
    #[serde(rename = "type")]
    relation: String,
}

#[derive(Debug, Clone)]
enum Node {
    MsgTypeSwitch,
    Log,
    RpcMethodFilter { methods: Vec<String> },
    ServerTime,
    RpcReply,
}

/// A validated rule chain.
#[derive(Debug, Clone)]
pub struct RuleChain {
    pub name: String,
    first: usize,
    nodes: Vec<(String, Node)>,
    /// Per node: (relation type, next node).
    out: Vec<Vec<(String, usize)>>,
}

/// A message on its way through a chain: ThingsBoard's type, data (JSON) and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleMsg {
    pub msg_type: &'static str,
    pub data: Value,
    pub metadata: BTreeMap<String, String>,
}

/// What running a message through a chain asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Answer the device's client-side RPC `request_id` with this JSON.
    RpcReply { request_id: u32, body: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("rule chain is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("rule chain {chain:?}: {what}")]
    Invalid { chain: String, what: String },
}

impl RuleChain {
    /// Reads and checks a chain: every node type known, every index in range.
    pub fn parse(json: &str) -> Result<RuleChain, ChainError> {
        let def: ChainDef = serde_json::from_str(json)?;
        let invalid = |what: String| ChainError::Invalid {
            chain: def.name.clone(),
            what,
        };
        let mut nodes = Vec::with_capacity(def.nodes.len());
        for n in &def.nodes {
            let node = match n.kind.as_str() {
                "org.thingsboard.rule.engine.filter.TbMsgTypeSwitchNode" => Node::MsgTypeSwitch,
                "org.thingsboard.rule.engine.action.TbLogNode" => Node::Log,
                "org.thingsboard.rule.engine.rpc.TbSendRPCReplyNode" => Node::RpcReply,
                "org.thingraft.rule.engine.transform.ServerTimeNode" => Node::ServerTime,
                "org.thingraft.rule.engine.filter.RpcMethodFilterNode" => {
                    let methods = n
                        .configuration
                        .get("methods")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
                        .ok_or_else(|| invalid(format!("node {:?} needs a \"methods\" list", n.name)))?;
                    Node::RpcMethodFilter { methods }
                }
                other => return Err(invalid(format!("node {:?}: unknown type {other}", n.name))),
            };
            nodes.push((n.name.clone(), node));
        }
        if def.first_node_index >= nodes.len() {
            return Err(invalid(format!(
                "firstNodeIndex {} is not a node",
                def.first_node_index
            )));
        }
        let mut out = vec![Vec::new(); nodes.len()];
        for c in &def.connections {
            if c.from_index >= nodes.len() || c.to_index >= nodes.len() {
                return Err(invalid(format!(
                    "connection {} -> {} names a node that does not exist",
                    c.from_index, c.to_index
                )));
            }
            out[c.from_index].push((c.relation.clone(), c.to_index));
        }
        Ok(RuleChain {
            name: def.name,
            first: def.first_node_index,
            nodes,
            out,
        })
    }

    /// The default root chain.
    pub fn default_root() -> RuleChain {
        RuleChain::parse(DEFAULT_ROOT_CHAIN).expect("the embedded root chain is valid")
    }

    /// Runs `msg` through the chain from its first node; `now_ms` is the clock the nodes read.
    /// A message goes to every node connected by the relation its node produced, as in
    /// ThingsBoard; a relation with no connection ends that path.
    pub fn run(&self, msg: RuleMsg, now_ms: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut todo = vec![(self.first, msg)];
        let mut steps = 0;
        while let Some((i, msg)) = todo.pop() {
            steps += 1;
            if steps > STEPS_MAX {
                tracing::warn!(chain = %self.name, "rule chain stopped after {STEPS_MAX} node visits");
                break;
            }
            let (name, node) = &self.nodes[i];
            let (relation, msg) = match node {
                Node::MsgTypeSwitch => (type_relation(msg.msg_type), msg),
                Node::Log => {
                    tracing::info!(chain = %self.name, node = %name, msg_type = msg.msg_type, data = %msg.data, "rule chain log");
                    ("Success", msg)
                }
                Node::RpcMethodFilter { methods } => {
                    let m = msg.data.get("method").and_then(Value::as_str).unwrap_or("");
                    (
                        if methods.iter().any(|x| x == m) {
                            "True"
                        } else {
                            "False"
                        },
                        msg,
                    )
                }
                Node::ServerTime => {
                    let data = serde_json::json!({ "time": js_date_string(now_ms) });
                    ("Success", RuleMsg { data, ..msg })
                }
                Node::RpcReply => match msg.metadata.get("requestId").and_then(|r| r.parse().ok()) {
                    Some(request_id) => {
                        effects.push(Effect::RpcReply {
                            request_id,
                            body: msg.data.to_string(),
                        });
                        ("Success", msg)
                    }
                    None => ("Failure", msg),
                },
            };
            for (r, next) in self.out[i].iter().rev() {
                if r == relation {
                    todo.push((*next, msg.clone()));
                }
            }
        }
        effects
    }
}

/// The relation ThingsBoard's message type switch gives a message type.
fn type_relation(msg_type: &str) -> &'static str {
    match msg_type {
        "POST_TELEMETRY_REQUEST" => "Post telemetry",
        "POST_ATTRIBUTES_REQUEST" => "Post attributes",
        "TO_SERVER_RPC_REQUEST" => "RPC Request from Device",
        "RPC_CALL_FROM_SERVER_TO_DEVICE" => "RPC Request to Device",
        "ACTIVITY_EVENT" => "Activity Event",
        "INACTIVITY_EVENT" => "Inactivity Event",
        "CONNECT_EVENT" => "Connect Event",
        "DISCONNECT_EVENT" => "Disconnect Event",
        _ => "Other",
    }
}

/// `String(new Date(ms))` as JavaScript prints it in UTC:
/// `Thu Nov 26 2026 21:13:45 GMT+0000 (Coordinated Universal Time)`.
pub fn js_date_string(ms: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{} {} {:02} {:04} {:02}:{:02}:{:02} GMT+0000 (Coordinated Universal Time)",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        year,
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(method: &str, request_id: &str) -> RuleMsg {
        RuleMsg {
            msg_type: "TO_SERVER_RPC_REQUEST",
            data: serde_json::json!({ "method": method, "params": {} }),
            metadata: BTreeMap::from([("requestId".to_string(), request_id.to_string())]),
        }
    }

    #[test]
    fn javascript_date_string_in_utc() {
        assert_eq!(
            js_date_string(0),
            "Thu Jan 01 1970 00:00:00 GMT+0000 (Coordinated Universal Time)"
        );
        // 2026-11-26T21:13:45.123Z
        assert_eq!(
            js_date_string(1_795_727_625_123),
            "Thu Nov 26 2026 21:13:45 GMT+0000 (Coordinated Universal Time)"
        );
        // 2024-02-29T23:59:59Z, a leap day.
        assert_eq!(
            js_date_string(1_709_251_199_000),
            "Thu Feb 29 2024 23:59:59 GMT+0000 (Coordinated Universal Time)"
        );
    }

    #[test]
    fn default_root_chain_replies_to_get_time_only() {
        let chain = RuleChain::default_root();
        let effects = chain.run(rpc("getTime", "7"), 1_795_727_625_123);
        assert_eq!(
            effects,
            vec![Effect::RpcReply {
                request_id: 7,
                body: r#"{"time":"Thu Nov 26 2026 21:13:45 GMT+0000 (Coordinated Universal Time)"}"#.into()
            }]
        );
        assert!(chain.run(rpc("setLevel", "8"), 0).is_empty());
        let telemetry = RuleMsg {
            msg_type: "POST_TELEMETRY_REQUEST",
            data: serde_json::json!({ "method": "getTime" }),
            metadata: BTreeMap::new(),
        };
        assert!(chain.run(telemetry, 0).is_empty());
    }

    #[test]
    fn a_reply_without_a_request_id_goes_to_failure() {
        let chain = RuleChain::default_root();
        let mut msg = rpc("getTime", "x");
        msg.metadata.clear();
        assert!(chain.run(msg, 0).is_empty());
    }

    #[test]
    fn invalid_chains_are_refused() {
        let unknown = r#"{"name":"c","firstNodeIndex":0,"nodes":[{"type":"x.Y","name":"n"}]}"#;
        assert!(matches!(
            RuleChain::parse(unknown),
            Err(ChainError::Invalid { .. })
        ));
        let dangling = r#"{"name":"c","firstNodeIndex":0,
            "nodes":[{"type":"org.thingsboard.rule.engine.action.TbLogNode","name":"n"}],
            "connections":[{"fromIndex":0,"toIndex":3,"type":"Success"}]}"#;
        assert!(matches!(
            RuleChain::parse(dangling),
            Err(ChainError::Invalid { .. })
        ));
        let no_first = r#"{"name":"c","firstNodeIndex":2,"nodes":[]}"#;
        assert!(matches!(
            RuleChain::parse(no_first),
            Err(ChainError::Invalid { .. })
        ));
        assert!(matches!(RuleChain::parse("{"), Err(ChainError::Json(_))));
    }

    #[test]
    fn a_cycle_stops() {
        let cycle = r#"{"name":"c","firstNodeIndex":0,
            "nodes":[{"type":"org.thingsboard.rule.engine.action.TbLogNode","name":"a"},
                     {"type":"org.thingsboard.rule.engine.rpc.TbSendRPCReplyNode","name":"b"}],
            "connections":[{"fromIndex":0,"toIndex":1,"type":"Success"},
                           {"fromIndex":1,"toIndex":0,"type":"Success"}]}"#;
        let chain = RuleChain::parse(cycle).expect("valid");
        let effects = chain.run(rpc("getTime", "1"), 0);
        // Every visit of the reply node answers; the visits are bounded.
        assert_eq!(effects.len(), STEPS_MAX / 2);
    }
}
