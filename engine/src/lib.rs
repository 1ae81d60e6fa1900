//! thingraft-engine: what the platform does with committed device messages.
//!
//! - [`registry`]: tenants, users, device profiles, devices, credentials — in the metadata
//!   group's map.
//! - [`shard`]: per partition, processing at the leader (outcomes) and applying on every
//!   replica.
//! - [`connectivity`]: device activity, inactivity and the five connectivity attributes.
//! - [`rules`]: rule chains in ThingsBoard's shape and their executor (client-side RPC today).
//! - [`store`]: the local store (RocksDB) the shards fold into; latest values, history,
//!   attributes.
//! - [`state`]: a partition's store state taken from a peer replica when the log no longer
//!   holds the records it was made of.

pub mod connectivity;
pub mod ota;
pub mod registry;
pub mod relations;
pub mod rules;
pub mod shard;
pub mod state;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use thingraft_log::{Appended, LogError, LogHandle, Record};
use thingraft_proto::records::{Ingest, PartitionRecord};
use tokio::sync::watch;

pub use registry::Registry;

/// Where downlinks go: the node's transports and its peers'. `node: Some(id)` sends to that
/// node only; `None` to every node. Returns how many sessions took it.
pub trait Downlinks: Send + Sync + 'static {
    fn deliver(
        &self,
        node: Option<u64>,
        d: thingraft_proto::records::Deliver,
    ) -> futures::future::BoxFuture<'static, u32>;
}
pub use store::Store;

/// The `[engine]` section of the node's config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// A device silent this long becomes inactive (ThingsBoard's
    /// `state.defaultInactivityTimeoutInSec`; a device's `inactivityTimeout` server attribute
    /// overrides it).
    pub inactivity_timeout_ms: u64,
    /// How often a partition's leader looks for devices that went inactive.
    pub state_check_interval_ms: u64,
    /// Worker threads of the engine's own runtime, where every shard runs: apart from the
    /// transports and the log, so that a device's acknowledgement never waits in a queue behind
    /// the engine's work (decision 0012).
    pub threads: usize,
    /// How long a device has to acknowledge a server-side RPC a session sent it (an MQTT
    /// PUBACK, a CoAP ACK) before the partition's leader sends it again: a plain RPC until it
    /// expires, a persistent one at most `rpc_max_retries` times before it is FAILED
    /// (ThingsBoard's `transport.mqtt.timeout` and `actors.rpc.max_retries`).
    pub rpc_ack_timeout_ms: u64,
    pub rpc_max_retries: u32,
    /// The mean time between two outcomes a busy partition's leader proposes (decision 0021):
    /// a quiet partition gets its next few (up to 4) at once; a busy one gets one covering
    /// everything committed meanwhile every `outcome_interval_ms`: fewer, larger outcomes and
    /// store writes, for at most this much longer until a message is applied.
    pub outcome_interval_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            inactivity_timeout_ms: 600_000,
            state_check_interval_ms: 60_000,
            threads: 1,
            rpc_ack_timeout_ms: 10_000,
            rpc_max_retries: 5,
            outcome_interval_ms: 20,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.inactivity_timeout_ms > 0,
            "engine.inactivity_timeout_ms must be > 0"
        );
        anyhow::ensure!(
            self.state_check_interval_ms >= 100,
            "engine.state_check_interval_ms must be >= 100"
        );
        anyhow::ensure!((1..=64).contains(&self.threads), "engine.threads must be 1..=64");
        anyhow::ensure!(
            self.rpc_ack_timeout_ms >= 100,
            "engine.rpc_ack_timeout_ms must be >= 100"
        );
        anyhow::ensure!(
            self.outcome_interval_ms <= 1000,
            "engine.outcome_interval_ms must be <= 1000"
        );
        Ok(())
    }
}

/// The engine of one node: a shard for each partition replica it holds.
pub struct Engine {
    log: LogHandle,
    registry: Registry,
    store: Arc<Store>,
    applied: Vec<watch::Receiver<u64>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The engine's own runtime (its shards' tasks); `None` once shut down.
    runtime: Option<tokio::runtime::Runtime>,
    /// Answers peers' state transfers while the engine runs.
    _state_server: Arc<state::StateServer>,
}

/// The engine's API; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    pub log: LogHandle,
    pub registry: Registry,
    pub store: Arc<Store>,
    applied: Arc<Vec<watch::Receiver<u64>>>,
}

impl Engine {
    /// Opens the local store under `dir` and starts a shard for every partition replica here,
    /// on a runtime of the engine's own (`config.threads` workers). Callable from within the
    /// node's runtime.
    pub fn start(
        log: LogHandle,
        dir: &Path,
        downlinks: Arc<dyn Downlinks>,
        config: EngineConfig,
    ) -> anyhow::Result<Engine> {
        config.validate()?;
        std::fs::create_dir_all(dir)?;
        let store = Store::open(dir)?;
        // Beside the store: `<data>/state-transfer/{out,in}`.
        let transfer = dir.with_file_name("state-transfer");
        let state_server = state::StateServer::install(log.clone(), store.clone(), transfer.join("out"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .thread_name("engine")
            .enable_all()
            .build()?;
        let (shutdown, _) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut applied = Vec::new();
        // How ready each partition's shard is to lead it (decisions 0019 and 0020).
        let ready: Arc<Vec<AtomicU8>> = Arc::new((0..log.partitions()).map(|_| AtomicU8::new(0)).collect());
        {
            let ready = ready.clone();
            log.set_lead_ready(Arc::new(move |p| {
                shard::readiness(ready.get(p as usize).map_or(0, |r| r.load(Ordering::Relaxed)))
            }));
        }
        for p in 0..log.partitions() {
            let (tx, rx) = watch::channel(0);
            applied.push(rx);
            if log.watch_partition(p).is_err() {
                continue; // no replica of this partition here
            }
            let shard = shard::Shard {
                partition: p,
                log: log.clone(),
                store: store.clone(),
                applied_tx: tx,
                downlinks: downlinks.clone(),
                config: config.clone(),
                transfer_dir: transfer.join("in"),
                ready: ready.clone(),
            };
            tasks.push(runtime.spawn(shard.run(shutdown.subscribe())));
        }
        tasks.push(runtime.spawn(flush_periodically(
            store.clone(),
            store_flush_interval(log.config().retention.age_ms_max),
            shutdown.subscribe(),
        )));
        Ok(Engine {
            registry: Registry::new(log.clone()),
            log,
            store,
            applied,
            shutdown,
            tasks,
            runtime: Some(runtime),
            _state_server: state_server,
        })
    }

    pub fn handle(&self) -> EngineHandle {
        EngineHandle {
            log: self.log.clone(),
            registry: self.registry.clone(),
            store: self.store.clone(),
            applied: Arc::new(self.applied.clone()),
        }
    }

    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Not `drop(runtime)`: that blocks until its tasks end, which an async caller may not.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl EngineHandle {
    /// Appends an ingest record to its device's partition; returns once committed.
    pub async fn submit(&self, ingest: &Ingest) -> Result<Appended, LogError> {
        let p = self.log.partition_for_key(&ingest.device);
        let rec = PartitionRecord::Ingest(ingest.clone()).encode();
        self.log
            .append(p, vec![Record::new(ingest.device.to_vec(), rec)])
            .await
    }

    /// Waits until this replica's state of RPC `uuid` satisfies `done`, or until `deadline`;
    /// returns the last state seen.
    pub async fn wait_rpc(
        &self,
        device: &[u8; 16],
        uuid: &[u8; 16],
        deadline: tokio::time::Instant,
        done: impl Fn(&store::RpcState) -> bool,
    ) -> anyhow::Result<Option<store::RpcState>> {
        let p = self.log.partition_for_key(device) as usize;
        let mut rx = self
            .applied
            .get(p)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no replica of partition {p} here"))?;
        loop {
            rx.borrow_and_update();
            // Only an RPC of this device: a UUID taken by another device's RPC is not this one.
            let r = self.store.rpc(uuid)?.filter(|r| r.device == *device);
            if r.as_ref().is_some_and(&done) {
                return Ok(r);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(r),
            }
        }
    }

    /// Waits until this replica has applied the partition of `device` past `offset`.
    pub async fn wait_applied(&self, device: &[u8; 16], offset: u64, timeout: std::time::Duration) -> bool {
        let p = self.log.partition_for_key(device) as usize;
        let Some(rx) = self.applied.get(p) else {
            return false;
        };
        let mut rx = rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v > offset))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// How often the store is flushed. It is written without a WAL, so a crash loses what is only
/// in its memtables, and the shards read it again from the log; that works only while the log
/// still holds it. A quiet store could keep writes in memory longer than the retention's age
/// (a memtable flushes when full), so it is flushed at least every 10 minutes, and 4 times per
/// retention age when that is shorter.
fn store_flush_interval(retention_age_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis((retention_age_ms / 4).clamp(100, 600_000))
}

async fn flush_periodically(
    store: Arc<Store>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut shutdown) => return,
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "store flush failed; will try again"),
            Err(e) => tracing::warn!(error = %e, "store flush task failed"),
        }
    }
}

/// Resolves once `rx` reads true (or its sender is gone). The borrow of the value ends inside,
/// so callers' futures stay `Send`.
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
