//! Engine state transfer between replicas (decision 0018).
//!
//! A replica's store is a fold of its partitions' logs, rebuilt by reading the log again. That
//! stops working once retention has dropped records the store never applied: a node that lost
//! its data directory, or that stayed behind past the retention. Such a shard takes the state
//! of its partition from a peer replica instead, at a progress at or past the start of its own
//! log, and goes on reading the log from there.
//!
//! The exchange rides on the log's application messages (kind [`APP_KIND`]):
//! - `Prepare { partition, min_upto }`: the peer writes, from one consistent view of its store,
//!   every partition it holds to files of their own ([`Store::export`]), keeps them for
//!   [`EXPORT_TTL`] after their last use (the shards of a node that lost its data ask for all of
//!   them at once: one pass over the store answers them all), and answers `Ready` with the
//!   partition's progress, length and CRC — or `NotYet` when its own progress is below
//!   `min_upto`, saying whether it is stuck below its own log's start too;
//! - `Chunk { id, offset }`: [`CHUNK_BYTES`] of the file at a time;
//! - `Done`: the file can go.
//!
//! The taker checks length and CRC, replaces what its store holds of the partition
//! ([`Store::install`]) and starts the shard again. When no peer can ever give the state (none
//! holds a replica, or every one is stuck too), the partition's state below the log's start is
//! lost: the shard says so and goes on from the start ([`Store::skip_to`]).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thingraft_log::{LogHandle, NodeId};
use tokio::sync::watch;

use crate::store::{Export, Progress, Store};

/// The log's application message kind of engine state transfers.
pub const APP_KIND: u32 = 1;
/// Bytes of one `Chunk` answer.
const CHUNK_BYTES: u64 = 1 << 20;
/// How long an export is kept after its last use.
const EXPORT_TTL: Duration = Duration::from_secs(300);
/// A `Prepare` may scan the whole store.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a node taking a partition's state checks whether it leads the partition.
const HAND_OVER_CHECK: Duration = Duration::from_millis(500);
/// Test hook: with this variable set to a number of milliseconds, a taker waits that long
/// between fetching a partition's state and installing it, so that tests can look at a node
/// while it takes a state (`tests/tests/state_transfer.rs`).
pub const INSTALL_DELAY: &str = "THINGRAFT_FAULT_STATE_INSTALL_DELAY_MS";
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Prepare { partition: u32, min_upto: u64 },
    Chunk { partition: u32, id: u64, offset: u64 },
    Done { partition: u32, id: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Ready {
        id: u64,
        processed_upto: u64,
        len: u64,
        crc: u32,
    },
    /// This replica's progress is below what was asked; `stuck`: it is below its own log's
    /// start too, so it will not get there by reading the log.
    NotYet {
        processed_upto: u64,
        stuck: bool,
    },
    NoReplica,
    Chunk(Vec<u8>),
    Done,
}

struct Held {
    export: Export,
    used: Instant,
    /// Takers that were answered `Ready` with it and did not say `Done` yet.
    takers: u32,
}

/// Answers peers' state transfer requests from this node's store.
pub struct StateServer {
    log: LogHandle,
    store: Arc<Store>,
    dir: PathBuf,
    /// Exports by (partition, export id). A newer export never removes an older one that a
    /// taker may still be reading: exports go when their last taker is done, or unused for
    /// [`EXPORT_TTL`].
    held: std::sync::Mutex<HashMap<(u32, u64), Held>>,
    /// One export at a time; owned by the export's task, so a `Prepare` whose caller went away
    /// neither leaks its export nor lets a second one run beside it.
    exporting: Arc<tokio::sync::Mutex<()>>,
    next_id: AtomicU64,
}

impl StateServer {
    /// Starts answering; `dir` holds the exports (emptied now: what is there is from before).
    /// Must be called within a tokio runtime (it starts the sweep of unused exports).
    pub fn install(log: LogHandle, store: Arc<Store>, dir: PathBuf) -> anyhow::Result<Arc<StateServer>> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let s = Arc::new(StateServer {
            log: log.clone(),
            store,
            dir,
            held: Default::default(),
            exporting: Default::default(),
            // Ids from an earlier life of this node never name one of this life.
            next_id: AtomicU64::new(rand::random::<u32>() as u64 * 1_000_000),
        });
        let weak = Arc::downgrade(&s);
        log.set_app_handler(
            APP_KIND,
            Arc::new(move |body: Bytes| {
                let s = weak.upgrade();
                Box::pin(async move {
                    let s = s.ok_or("engine stopped")?;
                    let req: Request =
                        postcard::from_bytes(&body).map_err(|e| format!("bad state request: {e}"))?;
                    let reply = s.handle(req).await.map_err(|e| format!("{e:#}"))?;
                    Ok(Bytes::from(
                        postcard::to_stdvec(&reply).map_err(|e| e.to_string())?,
                    ))
                })
            }),
        );
        let weak = Arc::downgrade(&s);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXPORT_TTL / 5).await;
                match weak.upgrade() {
                    Some(s) => s.sweep(),
                    None => return,
                }
            }
        });
        Ok(s)
    }

    async fn handle(self: &Arc<Self>, req: Request) -> anyhow::Result<Reply> {
        match req {
            Request::Prepare { partition, min_upto } => self.prepare(partition, min_upto).await,
            Request::Chunk {
                partition,
                id,
                offset,
            } => {
                let path = {
                    let mut held = self.held.lock().expect("held lock");
                    let h = held
                        .get_mut(&(partition, id))
                        .ok_or_else(|| anyhow::anyhow!("export {id} of partition {partition} is gone"))?;
                    h.used = Instant::now();
                    h.export.path.clone()
                };
                let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                    let f = std::fs::File::open(path)?;
                    let len = f.metadata()?.len();
                    let n = len.saturating_sub(offset).min(CHUNK_BYTES) as usize;
                    let mut buf = vec![0u8; n];
                    f.read_exact_at(&mut buf, offset)?;
                    Ok(buf)
                })
                .await??;
                Ok(Reply::Chunk(bytes))
            }
            Request::Done { partition, id } => {
                let mut held = self.held.lock().expect("held lock");
                if let Some(h) = held.get_mut(&(partition, id)) {
                    h.takers = h.takers.saturating_sub(1);
                    if h.takers == 0
                        && let Some(h) = held.remove(&(partition, id))
                    {
                        drop(held);
                        remove_export(&h.export.path);
                    }
                }
                Ok(Reply::Done)
            }
        }
    }

    /// Drops exports unused for [`EXPORT_TTL`].
    fn sweep(&self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        self.held.lock().expect("held lock").retain(|_, h| {
            let keep = now.duration_since(h.used) < EXPORT_TTL;
            if !keep {
                gone.push(h.export.path.clone());
            }
            keep
        });
        for p in gone {
            remove_export(&p);
        }
    }

    /// The newest held export of `partition` at or past `min_upto`, taken by one more taker.
    fn ready(&self, partition: u32, min_upto: u64) -> Option<Reply> {
        let mut held = self.held.lock().expect("held lock");
        let (_, h) = held
            .iter_mut()
            .filter(|((p, _), h)| *p == partition && h.export.progress.processed_upto >= min_upto)
            .max_by_key(|((_, id), _)| *id)?;
        h.used = Instant::now();
        h.takers += 1;
        Some(Reply::Ready {
            id: h.export.id,
            processed_upto: h.export.progress.processed_upto,
            len: h.export.len,
            crc: h.export.crc,
        })
    }

    async fn prepare(self: &Arc<Self>, partition: u32, min_upto: u64) -> anyhow::Result<Reply> {
        if self.log.watch_partition(partition).is_err() {
            return Ok(Reply::NoReplica);
        }
        self.sweep();
        if let Some(r) = self.ready(partition, min_upto) {
            return Ok(r);
        }
        let not_yet = |processed_upto: u64| -> anyhow::Result<Reply> {
            let start = self.log.read(partition, 0, 0)?.start_offset;
            Ok(Reply::NotYet {
                processed_upto,
                stuck: processed_upto < start,
            })
        };
        // (A partition being installed here reads as progress 0: `Store::install`.)
        let now = self.store.progress(partition)?.processed_upto;
        if now < min_upto {
            return not_yet(now);
        }
        // The export runs in a task of its own: it finishes and is registered even if this
        // request is dropped.
        let this = self.clone();
        let guard = self.exporting.clone().lock_owned().await;
        tokio::spawn(async move {
            let _one = guard;
            if this.ready(partition, min_upto).is_some() {
                return Ok(()); // one that finished while this request waited serves it
            }
            this.export_all(partition).await
        })
        .await??;
        match self.ready(partition, min_upto) {
            Some(r) => Ok(r),
            None => not_yet(self.store.progress(partition)?.processed_upto),
        }
    }

    /// Exports every partition this node holds (asked for because of `partition`).
    async fn export_all(&self, partition: u32) -> anyhow::Result<()> {
        let parts: Vec<u32> = (0..self.log.partitions())
            .filter(|p| self.log.watch_partition(*p).is_ok())
            .collect();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(id.to_string());
        let (store, log, d) = (self.store.clone(), self.log.clone(), dir.clone());
        let started = Instant::now();
        let exports =
            tokio::task::spawn_blocking(move || store.export(&d, id, &parts, |k| log.partition_for_key(k)))
                .await?;
        let exports = match exports {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        tracing::info!(
            partition,
            export = id,
            partitions = exports.len(),
            bytes = exports.iter().map(|e| e.len).sum::<u64>(),
            ms = started.elapsed().as_millis() as u64,
            "engine state exported for a peer"
        );
        let mut held = self.held.lock().expect("held lock");
        for export in exports {
            // Taken (`takers`) only through `ready`; the others go with the sweep.
            held.insert(
                (export.partition, id),
                Held {
                    export,
                    used: Instant::now(),
                    takers: 0,
                },
            );
        }
        Ok(())
    }
}

/// Removes an export's file, and its directory once empty.
fn remove_export(path: &Path) {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir); // fails while other partitions' files are in it
    }
}

async fn call(log: &LogHandle, peer: NodeId, req: &Request, timeout: Duration) -> anyhow::Result<Reply> {
    let body = Bytes::from(postcard::to_stdvec(req)?);
    let reply = log.call_app(peer, APP_KIND, body, timeout).await?;
    Ok(postcard::from_bytes(&reply)?)
}

/// Fetches export `id` of `partition` from `peer` into `file`; checks its length and CRC.
async fn fetch(
    log: &LogHandle,
    peer: NodeId,
    partition: u32,
    id: u64,
    (len, crc): (u64, u32),
    file: &Path,
) -> anyhow::Result<()> {
    let f = std::fs::File::create(file)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut offset = 0u64;
    while offset < len {
        let Reply::Chunk(bytes) = call(
            log,
            peer,
            &Request::Chunk {
                partition,
                id,
                offset,
            },
            CALL_TIMEOUT,
        )
        .await?
        else {
            anyhow::bail!("peer {peer} answered a chunk request with something else");
        };
        anyhow::ensure!(
            !bytes.is_empty(),
            "peer {peer}'s export ended at {offset} of {len} bytes"
        );
        hasher.update(&bytes);
        f.write_all_at(&bytes, offset)?;
        offset += bytes.len() as u64;
    }
    anyhow::ensure!(
        offset == len,
        "peer {peer}'s export has {offset} bytes, not {len}"
    );
    anyhow::ensure!(hasher.finalize() == crc, "peer {peer}'s export fails its CRC");
    Ok(())
}

/// Until aborted: whenever this node leads `partition` (elected while it takes the partition's
/// state), hands the lead to `peer`, which has the state.
async fn hand_lead_to(log: LogHandle, partition: u32, peer: NodeId) {
    loop {
        if log.leader_term(partition).is_some() {
            match log.transfer_leader(partition, peer).await {
                Ok(true) => tracing::info!(
                    partition,
                    to = peer,
                    "handing the lead over while the partition's state is taken"
                ),
                Ok(false) => tracing::debug!(partition, peer, "peer not ready to take the lead yet"),
                Err(e) => tracing::warn!(partition, error = %e, "lead not handed over"),
            }
        }
        tokio::time::sleep(HAND_OVER_CHECK).await;
    }
}

/// Makes this replica's state of `partition` reach at least `need` (the start of its log):
/// from a peer replica's, or, when none can ever give it, by going on from `need` without it.
/// Returns early (with an error) at shutdown.
pub(crate) async fn restore(
    log: &LogHandle,
    store: &Arc<Store>,
    dir: &Path,
    partition: u32,
    need: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let me = log.node_id();
    let peers: Vec<NodeId> = log.member_ids().into_iter().filter(|id| *id != me).collect();
    let file = dir.join(format!("partition-{partition}"));
    let mut backoff = Duration::from_millis(500);
    let mut need = need;
    loop {
        // Retention may have moved on while this waited.
        need = need.max(log.read(partition, 0, 0)?.start_offset);
        // Whether every peer answered that it cannot ever give the state.
        let mut hopeless = true;
        for &peer in &peers {
            let req = Request::Prepare {
                partition,
                min_upto: need,
            };
            let answer = tokio::select! {
                a = call(log, peer, &req, PREPARE_TIMEOUT) => a,
                () = crate::stopped(shutdown) => anyhow::bail!("shutting down"),
            };
            match answer {
                Ok(Reply::Ready {
                    id,
                    processed_upto,
                    len,
                    crc,
                }) => {
                    // Leading the partition while taking its state, this node would propose no
                    // outcomes until it has it: the peer that has the state leads meanwhile.
                    let _hand_over =
                        crate::shard::AbortOnDrop(tokio::spawn(hand_lead_to(log.clone(), partition, peer)));
                    let started = Instant::now();
                    let fetched = tokio::select! {
                        f = fetch(log, peer, partition, id, (len, crc), &file) => f,
                        () = crate::stopped(shutdown) => anyhow::bail!("shutting down"),
                    };
                    if let Err(e) = fetched {
                        tracing::warn!(partition, peer, error = %e, "engine state transfer failed");
                        hopeless = false;
                        continue;
                    }
                    if let Some(ms) = std::env::var(INSTALL_DELAY).ok().and_then(|v| v.parse().ok()) {
                        tracing::warn!(
                            partition,
                            ms,
                            "{INSTALL_DELAY} is set: waiting before installing the state"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                            () = crate::stopped(shutdown) => anyhow::bail!("shutting down"),
                        }
                    }
                    let (s, f, l) = (store.clone(), file.clone(), log.clone());
                    let progress = Progress { processed_upto };
                    let keys = tokio::task::spawn_blocking(move || {
                        s.install(partition, &f, progress, |d| l.partition_for_key(d))
                    })
                    .await??;
                    let _ = std::fs::remove_file(&file);
                    let _ = call(log, peer, &Request::Done { partition, id }, CALL_TIMEOUT).await;
                    tracing::info!(
                        partition,
                        peer,
                        processed_upto,
                        keys,
                        bytes = len,
                        ms = started.elapsed().as_millis() as u64,
                        "engine state taken from a peer: the log no longer holds the records it was made of"
                    );
                    return Ok(());
                }
                Ok(Reply::NotYet {
                    processed_upto,
                    stuck,
                }) => {
                    tracing::info!(
                        partition,
                        peer,
                        processed_upto,
                        need,
                        stuck,
                        "peer cannot give the engine state yet"
                    );
                    hopeless &= stuck;
                }
                Ok(Reply::NoReplica) => {}
                Ok(other) => {
                    tracing::warn!(partition, peer, reply = ?other, "unexpected state transfer answer");
                    hopeless = false;
                }
                Err(e) => {
                    tracing::warn!(partition, peer, error = %e, "no engine state from peer");
                    hopeless = false;
                }
            }
        }
        if hopeless {
            tracing::error!(
                partition,
                need,
                "the log no longer holds this partition's records below {need} and no replica holds the \
                 state they made: devices' telemetry, attributes and RPCs from before are lost here; going on from {need}"
            );
            store.skip_to(partition, Progress { processed_upto: need })?;
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = crate::stopped(shutdown) => anyhow::bail!("shutting down"),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
