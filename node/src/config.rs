//! The node's configuration: one typed [`NodeConfig`], each crate owning its section.
//!
//! Precedence: embedded defaults < config file (`--config`) < environment (`THINGRAFT_…`) < flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use thingraft_log::{LogConfig, NodeId};
use thingraft_transport_coap::CoapConfig;
use thingraft_transport_common::TransportConfig;
use thingraft_transport_http::HttpDeviceConfig;
use thingraft_transport_mqtt::MqttConfig;

/// The commented default configuration, as printed by `thingraft config print`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../thingraft.toml");

/// Everything a node is configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub log: LogConfig,
    pub engine: thingraft_engine::EngineConfig,
    pub transport: TransportConfig,
    pub mqtt: MqttConfig,
    pub http: HttpSection,
    pub coap: CoapConfig,
    pub security: SecuritySection,
    pub seed: SeedSection,
}

/// Platform security settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySection {
    /// Whether any unassigned device may open a claim window (ThingsBoard's
    /// `security.claim.allowClaimingByDefault`); when false, only devices whose server attribute
    /// `claimingAllowed` is `true` may.
    pub claim_allowed_by_default: bool,
}

impl Default for SecuritySection {
    fn default() -> Self {
        Self {
            claim_allowed_by_default: true,
        }
    }
}

/// The HTTP listener: the REST API and ThingsBoard's HTTP device API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Where the REST API and the HTTP device API listen; empty disables both.
    pub listen: String,
    /// The HTTP device API (`/api/v1/{token}/...`).
    pub device: HttpDeviceConfig,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            device: HttpDeviceConfig::default(),
        }
    }
}

/// Accounts created by the first start of a cluster (ThingsBoard's demo credentials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeedSection {
    pub sysadmin_email: String,
    pub sysadmin_password: String,
    pub tenant_admin_email: String,
    pub tenant_admin_password: String,
    pub customer_user_email: String,
    pub customer_user_password: String,
}

impl Default for SeedSection {
    fn default() -> Self {
        let s = thingraft_engine::registry::Seed::default();
        Self {
            sysadmin_email: s.sysadmin.0,
            sysadmin_password: s.sysadmin.1,
            tenant_admin_email: s.tenant_admin.0,
            tenant_admin_password: s.tenant_admin.1,
            customer_user_email: s.customer_user.0,
            customer_user_password: s.customer_user.1,
        }
    }
}

impl SeedSection {
    pub fn seed(&self) -> thingraft_engine::registry::Seed {
        thingraft_engine::registry::Seed {
            sysadmin: (self.sysadmin_email.clone(), self.sysadmin_password.clone()),
            tenant_admin: (
                self.tenant_admin_email.clone(),
                self.tenant_admin_password.clone(),
            ),
            customer_user: (
                self.customer_user_email.clone(),
                self.customer_user_password.clone(),
            ),
        }
    }
}

/// Settings of the node process itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Where the gRPC server (Raft between nodes, the log API) listens.
    pub grpc_listen: String,
    /// Worker threads of the log's own runtime (0: it shares the node's runtime).
    pub log_threads: usize,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            grpc_listen: "127.0.0.1:7400".into(),
            log_threads: 1,
        }
    }
}

/// Values given on the command line or in the environment; each overrides the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// This node's id (> 0).
    #[arg(long, env = "THINGRAFT_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// gRPC listen address (host:port).
    #[arg(long, env = "THINGRAFT_LISTEN")]
    pub listen: Option<String>,
    /// Address peers reach this node at; defaults to --listen.
    #[arg(long, env = "THINGRAFT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Data directory.
    #[arg(long, env = "THINGRAFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of partitions.
    #[arg(long, env = "THINGRAFT_PARTITIONS")]
    pub partitions: Option<u32>,
    /// The cluster's initial members: `1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403`.
    #[arg(long, env = "THINGRAFT_PEERS")]
    pub peers: Option<String>,
    /// MQTT listen address (host:port).
    #[arg(long, env = "THINGRAFT_MQTT_LISTEN")]
    pub mqtt_listen: Option<String>,
    /// REST API listen address (host:port).
    #[arg(long, env = "THINGRAFT_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// CoAP listen address (UDP host:port).
    #[arg(long, env = "THINGRAFT_COAP_LISTEN")]
    pub coap_listen: Option<String>,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer `{part}` is not id=host:port"))?;
        let id: NodeId = id.trim().parse().with_context(|| format!("peer id `{id}`"))?;
        anyhow::ensure!(addr.contains(':'), "peer address `{addr}` has no port");
        anyhow::ensure!(
            out.insert(id, addr.trim().to_string()).is_none(),
            "peer id {id} given twice"
        );
    }
    Ok(out)
}

impl NodeConfig {
    /// Defaults, then the file, then the overrides; validated.
    pub fn load(file: Option<&Path>, o: &Overrides) -> anyhow::Result<NodeConfig> {
        let mut c = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
            None => NodeConfig::default(),
        };
        if let Some(v) = o.node_id {
            c.log.node_id = v;
        }
        if let Some(v) = &o.listen {
            c.node.grpc_listen = v.clone();
            c.log.advertise_addr = v.clone();
        }
        if let Some(v) = &o.advertise {
            c.log.advertise_addr = v.clone();
        }
        if let Some(v) = &o.data_dir {
            c.log.data_dir = v.clone();
        }
        if let Some(v) = o.partitions {
            c.log.partitions = v;
        }
        if let Some(v) = &o.peers {
            c.log.members = parse_peers(v)?;
            if o.listen.is_none()
                && let Some(addr) = c.log.members.get(&c.log.node_id)
            {
                c.node.grpc_listen = addr.clone();
                c.log.advertise_addr = addr.clone();
            }
        }
        if let Some(v) = &o.mqtt_listen {
            c.mqtt.listen = v.clone();
        }
        if let Some(v) = &o.http_listen {
            c.http.listen = v.clone();
        }
        if let Some(v) = &o.coap_listen {
            c.coap.listen = v.clone();
        }
        c.log.validate()?;
        c.mqtt.validate()?;
        c.engine.validate()?;
        anyhow::ensure!(c.node.log_threads <= 64, "node.log_threads must be 0..=64");
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_file_equals_the_defaults() {
        let parsed: NodeConfig = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, NodeConfig::default());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("thingraft-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[log]\npartitions = 4\nnode_id = 2\n").unwrap();
        let o = Overrides {
            partitions: Some(8),
            ..Overrides::default()
        };
        let c = NodeConfig::load(Some(&f), &o).unwrap();
        assert_eq!(c.log.partitions, 8);
        assert_eq!(c.log.node_id, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<NodeConfig>("[log]\npartitons = 4\n").is_err());
    }

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1=127.0.0.1:1,2=127.0.0.1:2").unwrap();
        assert_eq!(p.len(), 2);
        assert!(parse_peers("1=nohost").is_err());
        assert!(parse_peers("x=127.0.0.1:1").is_err());
        assert!(parse_peers("1=a:1,1=b:2").is_err());
    }
}
