//! thingraft-tests: fixtures for end-to-end tests over real sockets and real processes.
//!
//! - [`thingraft_bin`]: the `thingraft` binary, built on first use.
//! - [`ProcCluster`]: N `thingraft serve` processes on loopback; kill -9, restart, wipe.
//! - [`Rest`]: the REST API through `curl`, logged in.
//! - [`mosquitto_pub`]: Debian's MQTT client.
//! - [`Ledger`]: what a load generator was told (acked, failed, unknown), checked against the
//!   replicas' logs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use thingraft_log::{LogClient, NodeId, Record};

/// This package's directory (`tests/`) in the checkout the tests run from: `CARGO_MANIFEST_DIR`
/// as cargo and nextest set it when they run a test, else as it was at compile time. Not the
/// compile-time value first: checkouts at different paths that share a target directory (CI
/// clones and the cache they reuse) share artifacts too, since cargo leaves the path out of a
/// workspace member's artifact names, so a test binary built in a clone that is gone since
/// would look there.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `thingraft` binary of this workspace, built (once per test process) if needed — with
/// the same command and environment as `make test`: the `CARGO_*` variables cargo sets for
/// this test are removed first, because build scripts track some of them (ring's tracks
/// `CARGO_MANIFEST_DIR`), and with them set the first test rebuilt half the node for a minute
/// or two, then `make release` rebuilt it back.
pub fn thingraft_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("THINGRAFT_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = package_dir().join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .args([
                "build",
                "--quiet",
                "--release",
                "--manifest-path",
                manifest.to_str().expect("UTF-8 path"),
                "--bin",
                "thingraft",
                "--message-format=json",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build");
        assert!(out.status.success(), "cargo build of thingraft failed");
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().rev() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["reason"] == "compiler-artifact"
                && v["target"]["name"] == "thingraft"
                && let Some(exe) = v["executable"].as_str()
            {
                return PathBuf::from(exe);
            }
        }
        panic!("cargo build did not report the thingraft executable");
    })
    .clone()
}

/// `n` loopback ports free for both TCP and UDP (a node's CoAP listener is UDP, and a port the
/// kernel hands out as free for TCP may be some UDP client's ephemeral port).
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            held.push((port, tcp, udp));
        }
    }
    held.into_iter().map(|(port, ..)| port).collect()
}

/// The values of `key` in a history answer ([`Rest::history`]) that are whole numbers, in order.
pub fn numbers_of(history: &serde_json::Value, key: &str) -> Vec<u64> {
    history[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["value"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The partition of a device (its id's bytes hashed, as the transports do).
pub fn device_partition(device_id: &str, partitions: u32) -> u32 {
    let u = uuid::Uuid::parse_str(device_id).expect("a device id is a uuid");
    thingraft_log::placement::partition_for_key(u.as_bytes(), partitions)
}

/// A cluster of `thingraft serve` processes on loopback.
pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    /// gRPC address of each node.
    pub addrs: BTreeMap<NodeId, String>,
    /// MQTT address of each node.
    pub mqtt: BTreeMap<NodeId, String>,
    /// REST address of each node.
    pub http: BTreeMap<NodeId, String>,
    /// CoAP (UDP) address of each node.
    pub coap: BTreeMap<NodeId, String>,
    pub partitions: u32,
    /// A config file every node starts with (`--config`), if any.
    config: Option<PathBuf>,
    procs: HashMap<NodeId, Child>,
    /// Extra environment of a node's process, set by [`ProcCluster::restart_with_env`].
    env: HashMap<NodeId, Vec<(String, String)>>,
}

impl ProcCluster {
    /// Starts `n` nodes with `partitions` partitions and waits until every partition has a leader.
    pub async fn start(n: usize, partitions: u32) -> anyhow::Result<ProcCluster> {
        Self::start_with_config(n, partitions, None).await
    }

    /// Like [`ProcCluster::start`], with every node reading `config` (TOML) as its config file.
    pub async fn start_with_config(
        n: usize,
        partitions: u32,
        config: Option<&str>,
    ) -> anyhow::Result<ProcCluster> {
        let ports = free_ports(4 * n);
        let addrs_of = |k: usize| -> BTreeMap<NodeId, String> {
            (0..n)
                .map(|i| (i as NodeId + 1, format!("127.0.0.1:{}", ports[k * n + i])))
                .collect()
        };
        let mut c = ProcCluster {
            dir: tempfile::tempdir()?,
            addrs: addrs_of(0),
            mqtt: addrs_of(1),
            http: addrs_of(2),
            coap: addrs_of(3),
            partitions,
            config: None,
            procs: HashMap::new(),
            env: HashMap::new(),
        };
        if let Some(text) = config {
            let path = c.dir.path().join("config.toml");
            std::fs::write(&path, text)?;
            c.config = Some(path);
        }
        let ids: Vec<NodeId> = c.addrs.keys().copied().collect();
        for id in ids {
            c.spawn(id)?;
        }
        c.wait_ready(Duration::from_secs(30)).await?;
        // A partition's lead moves to its preferred replica within seconds of the start
        // (decision 0019): let it settle before a test looks at who leads what.
        if n > 1 {
            c.wait_preferred_leaders(Duration::from_secs(30)).await?;
        }
        Ok(c)
    }

    /// Waits until node 1 sees every partition led by its preferred replica (at once if it does
    /// not move leads back, `leader_rebalance_ms = 0`).
    pub async fn wait_preferred_leaders(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.client(1).await?.status(1).await?;
            let settled = s.leader_rebalance_ms == 0
                || s.groups
                    .iter()
                    .all(|g| g.preferred_leader == 0 || g.leader == g.preferred_leader);
            if settled {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "partitions not led by their preferred replicas: {:?}",
                s.groups
                    .iter()
                    .map(|g| (g.group, g.leader, g.preferred_leader))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    fn spawn(&mut self, id: NodeId) -> anyhow::Result<()> {
        let peers: Vec<String> = self.addrs.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let log = std::fs::File::create(self.dir.path().join(format!("n{id}.log")))?;
        let child = Command::new(thingraft_bin())
            .args(["serve", "--node-id", &id.to_string(), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--partitions", &self.partitions.to_string()])
            .args(["--mqtt-listen", &self.mqtt[&id], "--http-listen", &self.http[&id]])
            .args(["--coap-listen", &self.coap[&id]])
            .args(
                self.config
                    .iter()
                    .flat_map(|p| [std::ffi::OsStr::new("--config"), p.as_os_str()]),
            )
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.env.get(&id).into_iter().flatten().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning thingraft serve")?;
        self.procs.insert(id, child);
        Ok(())
    }

    /// Stops node `id` as an operator would (SIGTERM: it shuts down cleanly) and waits up to
    /// 30 s for it to exit.
    pub async fn stop(&mut self, id: NodeId) -> anyhow::Result<()> {
        let Some(c) = self.procs.get(&id) else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", c.id());
        self.wait_exit(id, Duration::from_secs(30))
            .await
            .context("the node did not stop within 30 s")?;
        Ok(())
    }

    /// `kill -9` of node `id`.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Starts node `id` again with the same flags and data directory.
    pub fn restart(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.restart_with_env(id, &[])
    }

    /// Starts node `id` again like [`ProcCluster::restart`], with `env` added to its environment
    /// (until its next restart).
    pub fn restart_with_env(&mut self, id: NodeId, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill(id);
        self.env.insert(
            id,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        );
        self.spawn(id)
    }

    /// Waits up to `timeout` for node `id`'s process to end by itself; its exit status, or
    /// `None` if it is still running (or was not started).
    pub async fn wait_exit(&mut self, id: NodeId, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.procs.get_mut(&id)?.try_wait().ok().flatten();
            if let Some(s) = status {
                self.procs.remove(&id);
                return Some(s);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes node `id`'s data directory (the node must be stopped).
    pub fn wipe(&mut self, id: NodeId) -> anyhow::Result<()> {
        assert!(!self.procs.contains_key(&id), "wipe a stopped node only");
        std::fs::remove_dir_all(self.data_dir(id)).context("wiping data dir")
    }

    /// The stderr log of node `id`, for failure messages.
    pub fn log_of(&self, id: NodeId) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{id}.log"))).unwrap_or_default()
    }

    /// A client through node `id`.
    pub async fn client(&self, id: NodeId) -> anyhow::Result<LogClient> {
        LogClient::connect(&self.addrs[&id]).await
    }

    /// Waits until every running node sees a leader for every group.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let running: Vec<NodeId> = self.procs.keys().copied().collect();
        for id in running {
            loop {
                let ok = match LogClient::connect(&self.addrs[&id]).await {
                    Ok(c) => match c.status(id).await {
                        Ok(s) => {
                            s.groups.len() as u32 == self.partitions + 1
                                && s.groups.iter().all(|g| g.leader != 0 && g.state != "Recovering")
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if ok {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "node {id} not ready in time; its log:\n{}",
                    self.log_of(id)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The preferred replica of `partition` (with the default replication factor of 3), which
    /// leads it whenever it is up and ready (decision 0019).
    pub fn preferred_leader(&self, partition: u32) -> NodeId {
        let ids: Vec<NodeId> = self.addrs.keys().copied().collect();
        thingraft_log::placement::partition_replicas(self.partitions, &ids, 3)[partition as usize][0]
    }

    /// The leader of `partition` as node `via` sees it.
    pub async fn leader_of(&self, via: NodeId, partition: u32) -> anyhow::Result<NodeId> {
        let c = self.client(via).await?;
        let s = c.status(via).await?;
        let g = s
            .groups
            .iter()
            .find(|g| g.group == partition + 1)
            .context("no such group")?;
        anyhow::ensure!(g.leader != 0, "partition {partition} has no leader");
        Ok(g.leader)
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The test harness shows a test's output only when it fails: then the end of each
        // node's log says what the nodes were doing (the temporary directory is gone after).
        let mut ids: Vec<NodeId> = self.addrs.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let log = self.log_of(id);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!("--- node {id}: last {} lines of its log ---", tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// How many lines of each node's log a dropped [`ProcCluster`] prints.
const LOG_TAIL_LINES: usize = 60;

/// What an append load was told.
#[derive(Debug, Default)]
pub struct Ledger {
    /// (partition, offset) → value of every acknowledged record.
    pub acked: HashMap<(u32, u64), String>,
    /// Values whose append failed with an error that certainly did not commit.
    pub failed: HashSet<String>,
    /// Values whose outcome is unknown (may or may not be in the log).
    pub unknown: HashSet<String>,
}

/// Runs `producers` tasks appending unique values (one record per append) until `stop` is set.
pub fn spawn_load(
    client: Arc<LogClient>,
    partitions: u32,
    producers: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..producers)
        .map(|w| {
            let (client, ledger, stop) = (client.clone(), ledger.clone(), stop.clone());
            tokio::spawn(async move {
                let partition = w as u32 % partitions;
                let mut seq = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let value = format!("w{w}-{seq}");
                    seq += 1;
                    let res = client
                        .append(partition, vec![Record::new(format!("k{w}"), value.clone())])
                        .await;
                    {
                        let mut l = ledger.lock().expect("ledger");
                        match res {
                            Ok(a) => {
                                assert_eq!(a.count, 1);
                                let prev = l.acked.insert((partition, a.first_offset), value);
                                assert!(
                                    prev.is_none(),
                                    "offset {partition}/{} acknowledged twice",
                                    a.first_offset
                                );
                            }
                            Err(e) if e.retriable() => {
                                l.failed.insert(value);
                            }
                            Err(_) => {
                                l.unknown.insert(value);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect()
}

/// Reads every record of `partition` from node `node`'s own replica.
pub async fn read_replica(
    client: &LogClient,
    node: NodeId,
    partition: u32,
) -> anyhow::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let r = client.read_from(node, partition, from, 10_000).await?;
        if r.records.is_empty() {
            return Ok(out);
        }
        for rec in r.records {
            anyhow::ensure!(
                rec.offset == from,
                "node {node} p{partition}: offset gap at {from} (got {})",
                rec.offset
            );
            out.push((rec.offset, String::from_utf8_lossy(&rec.value).into_owned()));
            from += 1;
        }
    }
}

/// Waits until every node has applied the same number of records in each partition, then checks
/// the replicas record by record and against the ledger:
/// - all replicas hold identical logs (same offsets, same values, in order);
/// - every acknowledged record is present, exactly once, at the offset it was acknowledged with;
/// - no value appears twice; no value whose append certainly failed appears at all.
///
/// Returns the number of records checked per replica.
pub async fn check_replicas(
    client: &LogClient,
    nodes: &[NodeId],
    partitions: u32,
    ledger: &Ledger,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Converged: every node reports the same next_offset for every partition, twice in a row.
    let mut last = None;
    loop {
        let mut offsets = Vec::new();
        for &n in nodes {
            let s = client.status(n).await;
            offsets.push(
                s.map(|s| {
                    s.groups
                        .iter()
                        .map(|g| (g.group, g.next_offset))
                        .collect::<Vec<_>>()
                })
                .ok(),
            );
        }
        let same = offsets.iter().all(|o| o.is_some() && *o == offsets[0]);
        if same && last.as_ref() == Some(&offsets) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "replicas did not converge: {offsets:?}"
        );
        last = Some(offsets);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut total = 0;
    for p in 0..partitions {
        let reference = read_replica(client, nodes[0], p).await?;
        for &n in &nodes[1..] {
            let other = read_replica(client, n, p).await?;
            anyhow::ensure!(
                other.len() == reference.len(),
                "p{p}: node {n} has {} records, node {} has {}",
                other.len(),
                nodes[0],
                reference.len()
            );
            for (a, b) in reference.iter().zip(&other) {
                anyhow::ensure!(a == b, "p{p}: replicas differ at offset {}: {a:?} vs {b:?}", a.0);
            }
        }
        let mut seen = HashSet::new();
        for (off, v) in &reference {
            anyhow::ensure!(
                seen.insert(v.clone()),
                "p{p}: value {v} appears twice (second at offset {off})"
            );
            anyhow::ensure!(
                !ledger.failed.contains(v),
                "p{p}: value {v} was reported failed but is in the log"
            );
        }
        total += reference.len();
    }
    for ((p, off), v) in &ledger.acked {
        let r = client.read_from(nodes[0], *p, *off, 1).await?;
        let got = r
            .records
            .first()
            .map(|x| String::from_utf8_lossy(&x.value).into_owned());
        anyhow::ensure!(
            got.as_deref() == Some(v.as_str()),
            "acked record p{p}@{off} = {v} is missing (found {got:?})"
        );
    }
    Ok(total)
}

/// The REST API of a node, called through `curl` as a user would.
#[derive(Clone)]
pub struct Rest {
    pub base: String,
    pub token: Option<String>,
}

impl Rest {
    /// Sends a persistent RPC `method` (one-way or two-way, 60 s timeout, no params) to
    /// `device`; its id.
    pub fn persistent_rpc(&self, device: &str, oneway: bool, method: &str) -> anyhow::Result<String> {
        let kind = if oneway { "oneway" } else { "twoway" };
        let body = serde_json::json!({"method": method, "params": {}, "persistent": true, "timeout": 60000});
        let (code, v) = self.call(
            "POST",
            &format!("/api/rpc/{kind}/{device}"),
            Some(&body.to_string()),
        )?;
        anyhow::ensure!(code == 200, "persistent RPC: {code} {v}");
        Ok(v["rpcId"].as_str().context("rpcId")?.to_string())
    }

    /// The persistent RPC `rpc_id`'s status once it is `want` (polled for up to 5 s), or the
    /// last one read.
    pub async fn rpc_status_becomes(&self, rpc_id: &str, want: &str) -> anyhow::Result<String> {
        let path = format!("/api/rpc/persistent/{rpc_id}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, v) = self.call("GET", &path, None)?;
            let status = v["status"].as_str().unwrap_or_default().to_string();
            if status == want || tokio::time::Instant::now() >= deadline {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn new(addr: &str) -> Rest {
        Rest {
            base: format!("http://{addr}"),
            token: None,
        }
    }

    /// Logs in as `user`, retrying while the node is still starting.
    pub async fn login(addr: &str, user: &str, password: &str) -> anyhow::Result<Rest> {
        let mut r = Rest::new(addr);
        let body = serde_json::json!({"username": user, "password": password}).to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match r.call("POST", "/api/auth/login", Some(&body)) {
                Ok((200, v)) => {
                    r.token = v["token"].as_str().map(String::from);
                    anyhow::ensure!(r.token.is_some(), "login reply without token: {v}");
                    return Ok(r);
                }
                other if std::time::Instant::now() > deadline => anyhow::bail!("login failed: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `method path` with an optional JSON body; returns the status and the parsed body
    /// (`Null` when empty, a string when not JSON).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-X",
            method,
            "-H",
            "Content-Type: application/json",
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(t) = &self.token {
            cmd.args(["-H", &format!("X-Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args(["--data-binary", b]);
        }
        cmd.arg(format!("{}{}", self.base, path));
        let out = cmd.output().context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let code: u16 = code
            .trim()
            .parse()
            .with_context(|| format!("curl output {text:?}"))?;
        anyhow::ensure!(code != 0, "no HTTP answer from {}", self.base);
        let v = if body.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_string()))
        };
        Ok((code, v))
    }

    /// Creates a device with the given access token; returns its id.
    pub fn create_device(&self, name: &str, token: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({"name": name, "type": "default"}).to_string();
        let (code, v) = self.call("POST", &format!("/api/device?accessToken={token}"), Some(&body))?;
        anyhow::ensure!(code == 200, "device create: {code} {v}");
        v["id"]["id"].as_str().map(String::from).context("device id")
    }

    /// The whole history of one telemetry key of a device, oldest first (values as ThingsBoard's
    /// strings).
    pub fn history(&self, device: &str, key: &str) -> anyhow::Result<serde_json::Value> {
        let (code, v) = self.call(
            "GET",
            &format!(
                "/api/plugins/telemetry/DEVICE/{device}/values/timeseries?keys={key}&startTs=0&endTs=4102444800000&limit=100000&orderBy=ASC"
            ),
            None,
        )?;
        anyhow::ensure!(code == 200, "history: {code} {v}");
        Ok(v)
    }

    /// Latest telemetry of a device (values as ThingsBoard's strings).
    pub fn latest(&self, device: &str) -> anyhow::Result<serde_json::Value> {
        let (code, v) = self.call(
            "GET",
            &format!("/api/plugins/telemetry/DEVICE/{device}/values/timeseries"),
            None,
        )?;
        anyhow::ensure!(code == 200, "latest: {code} {v}");
        Ok(v)
    }

    /// A device's attributes of `scope` (`CLIENT_SCOPE`, `SERVER_SCOPE`, `SHARED_SCOPE`) as
    /// `[{"key":..,"value":..,"lastUpdateTs":..}]`; `keys` (comma-separated) narrows them, all
    /// when empty.
    pub fn attributes(&self, device: &str, scope: &str, keys: &str) -> anyhow::Result<serde_json::Value> {
        let mut path = format!("/api/plugins/telemetry/DEVICE/{device}/values/attributes/{scope}");
        if !keys.is_empty() {
            path.push_str("?keys=");
            path.push_str(keys);
        }
        let (code, v) = self.call("GET", &path, None)?;
        anyhow::ensure!(code == 200, "{scope} attributes: {code} {v}");
        Ok(v)
    }

    /// A device's client attributes (`[{"key":..,"value":..,"lastUpdateTs":..}]`), polled until
    /// there are `count` of them or `timeout` passes (then as they are).
    pub async fn wait_client_attributes(
        &self,
        device: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.attributes(device, "CLIENT_SCOPE", "")?;
            if v.as_array().is_some_and(|a| a.len() == count) || std::time::Instant::now() > deadline {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `f` on the latest telemetry until it holds (true) or `timeout` passes (false).
    pub async fn wait_latest(
        &self,
        device: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.latest(device)?;
            if f(&v) || std::time::Instant::now() > deadline {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs Debian's `mosquitto_pub` against `addr` with `args`; returns its exit code (for MQTT 5
/// refusals it is the CONNACK reason code).
pub fn mosquitto_pub(addr: &str, args: &[&str]) -> anyhow::Result<i32> {
    let (host, port) = addr.rsplit_once(':').context("addr has no port")?;
    let out = Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port])
        .args(args)
        .output()
        .context("running mosquitto_pub (apt-get install mosquitto-clients)")?;
    Ok(out.status.code().unwrap_or(-1))
}

/// What libcoap's `coap-client` saw: the response code of the last response (`2.05`, `4.01`,
/// …), the message lines it printed (`v:1 t:ACK c:2.05 …`), and the payload.
#[derive(Debug, Clone)]
pub struct CoapOut {
    pub code: String,
    pub messages: Vec<String>,
    pub body: String,
}

/// Runs Debian's `coap-client-notls` (package `libcoap3-bin`) with `args` (the URI last) and
/// message tracing on.
pub fn coap_client(args: &[&str]) -> anyhow::Result<CoapOut> {
    coap_client_of("coap-client-notls", args)
}

/// [`coap_client`] with the OpenSSL build of `coap-client`, which speaks DTLS (`coaps://`).
pub fn coaps_client(args: &[&str]) -> anyhow::Result<CoapOut> {
    coap_client_of("coap-client-openssl", args)
}

fn coap_client_of(bin: &str, args: &[&str]) -> anyhow::Result<CoapOut> {
    let out = Command::new(bin)
        .arg("-v")
        .arg("6")
        .args(args)
        .output()
        .with_context(|| format!("running {bin} (apt-get install libcoap3-bin)"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut messages = Vec::new();
    let mut body = String::new();
    for line in text.lines() {
        // A payload is printed without a newline, so a message line may follow it on the same
        // line.
        let (payload, message) = match line.find("v:1 t:") {
            Some(i) => (&line[..i], Some(&line[i..])),
            None => (line, None),
        };
        if !payload.contains(" DEBG ") && !payload.contains(" INFO ") {
            body.push_str(payload);
        }
        if let Some(m) = message {
            messages.push(m.to_string());
        }
    }
    // The code of the last response: `c:` followed by `d.dd`.
    let code = messages
        .iter()
        .rev()
        .filter_map(|m| m.split_whitespace().find_map(|w| w.strip_prefix("c:")))
        .find(|c| c.len() == 4 && c.as_bytes()[1] == b'.' && c != &"0.00")
        .unwrap_or("")
        .to_string();
    Ok(CoapOut { code, messages, body })
}

/// An MQTT 5 client (rumqttc) authenticating with access token `token`.
pub fn v5_client(addr: &str, token: &str) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let (host, port) = addr.rsplit_once(':').expect("port");
    let mut o = rumqttc::v5::MqttOptions::new("", host, port.parse().expect("port number"));
    o.set_credentials(token, "");
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(Some(1 << 20));
    rumqttc::v5::AsyncClient::new(o, 16)
}

/// Polls the event loop until `f` picks a packet, or fails after 5 s.
pub async fn next_packet<T>(
    ev: &mut rumqttc::v5::EventLoop,
    f: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, ev.poll()).await??;
        if let rumqttc::v5::Event::Incoming(p) = e
            && let Some(t) = f(&p)
        {
            return Ok(t);
        }
    }
}

/// The reason code of the next PUBACK.
pub async fn next_puback(
    ev: &mut rumqttc::v5::EventLoop,
) -> anyhow::Result<rumqttc::v5::mqttbytes::v5::PubAckReason> {
    next_packet(ev, |p| match p {
        rumqttc::v5::mqttbytes::v5::Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await
}

/// The answer to a QoS 1 request (the next PUBLISH whose topic starts with `prefix`: its topic
/// and payload) and the request's PUBACK. MQTT does not order the two: the PUBACK waits for the
/// request's commit in its session, the answer comes from the engine once the request is applied.
pub async fn answer_and_puback(
    ev: &mut rumqttc::v5::EventLoop,
    prefix: &str,
) -> anyhow::Result<((String, Vec<u8>), rumqttc::v5::mqttbytes::v5::PubAckReason)> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let (mut answer, mut ack) = (None, None);
    while answer.is_none() || ack.is_none() {
        let (a, r) = next_packet(ev, |p| match p {
            Packet::Publish(p) if p.topic.starts_with(prefix.as_bytes()) => Some((
                Some((String::from_utf8_lossy(&p.topic).into_owned(), p.payload.to_vec())),
                None,
            )),
            Packet::PubAck(a) => Some((None, Some(a.reason))),
            _ => None,
        })
        .await?;
        answer = answer.or(a);
        ack = ack.or(r);
    }
    Ok((
        answer.expect("loop ends with it"),
        ack.expect("loop ends with it"),
    ))
}

/// Publishes `payload` on `topic` with QoS 1 and returns the reason code of the PUBACK.
pub async fn publish_qos1(
    client: &rumqttc::v5::AsyncClient,
    ev: &mut rumqttc::v5::EventLoop,
    topic: &str,
    payload: &str,
) -> anyhow::Result<rumqttc::v5::mqttbytes::v5::PubAckReason> {
    client
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload.to_string(),
        )
        .await?;
    next_puback(ev).await
}

/// A PUBLISH whose topic starts with `prefix`: its topic and JSON payload.
pub fn publish_on(
    p: &rumqttc::v5::mqttbytes::v5::Packet,
    prefix: &str,
) -> Option<(String, serde_json::Value)> {
    match p {
        rumqttc::v5::mqttbytes::v5::Packet::Publish(p) => {
            let t = String::from_utf8_lossy(&p.topic).into_owned();
            t.starts_with(prefix).then(|| {
                (
                    t,
                    serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null),
                )
            })
        }
        _ => None,
    }
}

/// A self-signed EC certificate for `cn` (valid for 127.0.0.1), made by `openssl` as
/// `<name>.pem` / `<name>.key` in `dir`.
pub fn certificate(dir: &std::path::Path, name: &str, cn: &str) -> anyhow::Result<()> {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem")))
        .args([
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .output()?;
    anyhow::ensure!(
        status.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(())
}

/// Asserts that `answer` is the default root chain's reply to `getTime`:
/// `{"time":"Thu Nov 26 2026 21:13:45 GMT+0000 (Coordinated Universal Time)"}` (JavaScript's
/// `String(new Date())` in UTC), within a minute of this machine's clock.
pub fn assert_server_time(answer: &serde_json::Value) {
    let obj = answer.as_object().expect("an object");
    assert_eq!(obj.len(), 1, "only `time`: {answer}");
    let s = obj["time"].as_str().expect("`time` is a string");
    let parts: Vec<&str> = s.split(' ').collect();
    assert_eq!(parts.len(), 9, "{s}");
    assert_eq!(
        &parts[5..],
        ["GMT+0000", "(Coordinated", "Universal", "Time)"],
        "{s}"
    );
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    let month = MONTHS.iter().position(|m| *m == parts[1]).expect("month name") as i64 + 1;
    let day: i64 = parts[2].parse().expect("day");
    let year: i64 = parts[3].parse().expect("year");
    let hms: Vec<i64> = parts[4].split(':').map(|x| x.parse().expect("h:m:s")).collect();
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    assert_eq!(parts[0], DAYS[days.rem_euclid(7) as usize], "weekday of {s}");
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!((now - secs).abs() <= 60, "{s} is not the time now ({now})");
}
