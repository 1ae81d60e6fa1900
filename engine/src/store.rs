//! The local store: every replica's fold of its partitions' committed outcomes, in RocksDB.
//!
//! It can be rebuilt from the log, so it is written without its WAL being synced: each write
//! batch carries the partition's progress with the data it produced, and after a crash the
//! shard re-reads the log from the progress that survived. What retention dropped from the log
//! comes from a peer's store instead ([`Store::export`], [`Store::install`], decision 0018).
//!
//! Keys (device = 16-byte id; name = u16 length + UTF-8):
//! - `l` device → the device's latest telemetry: key → (ts, value)
//! - `h` device ts offset → the values of one sample group (one row per message and
//!   timestamp; a key written twice at one timestamp reads as the later write)
//! - `a` device scope name → attribute (last update ts, value)
//! - `p` partition → [`Progress`]
//! - `r` rpc uuid → [`RpcState`]; `q` device id(u32) → rpc uuid; `n` device → next rpc id

use std::path::Path;
use std::sync::Arc;

use rocksdb::{DB, Direction, IteratorMode, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use thingraft_proto::device::Value;
use thingraft_proto::records::{EntityId, RpcStatus, Scope};

/// How far a replica has folded a partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Every ingest record below this offset has been applied (or was covered by an outcome).
    pub processed_upto: u64,
}

/// A stored value and its timestamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TsValue {
    pub ts_ms: i64,
    pub value: Value,
}

/// A server-side RPC as every replica folds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcState {
    pub uuid: EntityId,
    pub device: EntityId,
    pub tenant: EntityId,
    /// The per-device sequence number the device sees in its topic.
    pub id: u32,
    pub method: String,
    /// JSON text.
    pub params: String,
    pub oneway: bool,
    pub persistent: bool,
    pub expiration_ms: i64,
    pub created_ms: i64,
    pub status: RpcStatus,
    /// The device's reply (SUCCESSFUL).
    pub response: Option<String>,
}

pub struct Store {
    db: DB,
    /// The latest telemetry of the devices written lately, as stored: a batch takes a device's
    /// map from here instead of reading and decoding it from RocksDB (which cost about as much
    /// as the rest of the batch), and gives it back once written. At most
    /// [`LATEST_CACHED_MAX`] devices; a device not here is read from RocksDB.
    latest_cache: std::sync::Mutex<std::collections::HashMap<EntityId, LatestMap>>,
}

/// Most devices whose latest telemetry [`Store`] keeps in memory.
const LATEST_CACHED_MAX: usize = 100_000;

fn rpc_key(uuid: &EntityId) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(uuid);
    k
}

fn rpc_id_key(device: &EntityId, id: u32) -> Vec<u8> {
    let mut k = vec![b'q'];
    k.extend_from_slice(device);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn rpc_seq_key(device: &EntityId) -> Vec<u8> {
    let mut k = vec![b'n'];
    k.extend_from_slice(device);
    k
}

fn name_key(prefix: u8, device: &EntityId, extra: &[u8], name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 16 + extra.len() + 2 + name.len() + 8);
    k.push(prefix);
    k.extend_from_slice(device);
    k.extend_from_slice(extra);
    k.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// Order-preserving encoding of a signed timestamp.
fn ts_bytes(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_from(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

fn decode<T: for<'a> Deserialize<'a>>(v: &[u8]) -> anyhow::Result<T> {
    Ok(postcard::from_bytes(v)?)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encode")
}

/// Names of the entries whose key starts with `prefix`, parsed from the name field after it.
fn names_after(db: &DB, prefix: &[u8]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for kv in db.iterator(IteratorMode::From(prefix, Direction::Forward)) {
        let (k, v) = kv?;
        if !k.starts_with(prefix) {
            break;
        }
        let rest = &k[prefix.len()..];
        if rest.len() < 2 {
            continue;
        }
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let name = String::from_utf8_lossy(&rest[2..2 + n.min(rest.len() - 2)]).into_owned();
        out.push((name, v.to_vec()));
    }
    Ok(out)
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Arc<Store>> {
        let mut o = thingraft_log::storage::db_options();
        o.create_if_missing(true);
        o.set_max_background_jobs(2);
        Ok(Arc::new(Store {
            db: DB::open(&o, path)?,
            latest_cache: Default::default(),
        }))
    }

    pub fn progress(&self, partition: u32) -> anyhow::Result<Progress> {
        Ok(match self.db.get(progress_key(partition))? {
            Some(v) => decode(&v)?,
            None => Progress::default(),
        })
    }

    /// Writes a batch built with [`Batch`]; the WAL is not synced (see the module doc).
    pub fn write(&self, mut b: Batch) -> anyhow::Result<()> {
        b.finish();
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        let Batch { wb, latest, .. } = b;
        self.db.write_opt(wb, &wo)?;
        self.keep_latest(latest);
        Ok(())
    }

    /// [`Store::write`] for async callers. The write runs on the calling worker, since a memtable
    /// insert is short and moving the worker to another thread (`block_in_place`) costs more
    /// than the write. When RocksDB would make the write wait (a write stall while flushes or
    /// compactions catch up), it answers `Incomplete` at once, and the write is made again in
    /// `block_in_place`, so that other tasks move off this worker while it waits.
    pub fn write_in_task(&self, mut b: Batch) -> anyhow::Result<()> {
        b.finish();
        let Batch { wb, latest, .. } = b;
        let data = wb.data().to_vec();
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        wo.set_no_slowdown(true);
        match self.db.write_opt(wb, &wo) {
            Ok(()) => {}
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
                tracing::debug!("store write stalled; waiting off the async worker");
                let mut wo = WriteOptions::default();
                wo.disable_wal(true);
                tokio::task::block_in_place(|| self.db.write_opt(WriteBatch::from_data(&data), &wo))?;
            }
            Err(e) => return Err(e.into()),
        }
        self.keep_latest(latest);
        Ok(())
    }

    /// A device's latest telemetry for a batch to change: taken from the cache, else read.
    fn take_latest(&self, device: &EntityId) -> LatestMap {
        let cached = self
            .latest_cache
            .lock()
            .expect("latest cache lock")
            .remove(device);
        cached.unwrap_or_else(|| self.latest_map(device).unwrap_or_default())
    }

    /// Gives the latest telemetry a batch wrote back to the cache.
    fn keep_latest(&self, written: std::collections::HashMap<EntityId, LatestMap>) {
        let mut cache = self.latest_cache.lock().expect("latest cache lock");
        for (d, m) in written {
            if cache.len() < LATEST_CACHED_MAX {
                cache.insert(d, m);
            }
        }
    }

    fn latest_map(&self, device: &EntityId) -> anyhow::Result<LatestMap> {
        Ok(match self.db.get(latest_key(device))? {
            Some(v) => decode(&v)?,
            None => LatestMap::new(),
        })
    }

    /// Latest telemetry of a device: the given keys, or all keys when `keys` is empty.
    pub fn latest(&self, device: &EntityId, keys: &[String]) -> anyhow::Result<Vec<(String, TsValue)>> {
        let mut m = self.latest_map(device)?;
        if keys.is_empty() {
            return Ok(m.into_iter().collect());
        }
        Ok(keys
            .iter()
            .filter_map(|k| m.remove(k).map(|v| (k.clone(), v)))
            .collect())
    }

    /// Telemetry of one key in `[start_ts, end_ts)`, newest first when `desc`, at most `limit`.
    pub fn history(
        &self,
        device: &EntityId,
        key: &str,
        start_ts: i64,
        end_ts: i64,
        desc: bool,
        limit: usize,
    ) -> anyhow::Result<Vec<TsValue>> {
        let mut lo = vec![b'h'];
        lo.extend_from_slice(device);
        let base = lo.len();
        let mut hi = lo.clone();
        lo.extend_from_slice(&ts_bytes(start_ts));
        hi.extend_from_slice(&ts_bytes(end_ts));
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(lo);
        ro.set_iterate_upper_bound(hi);
        let mode = if desc {
            IteratorMode::End
        } else {
            IteratorMode::Start
        };
        let mut out: Vec<TsValue> = Vec::new();
        // Rows of one timestamp come in offset order (reversed when `desc`); the value of the
        // latest offset is the one that counts.
        let mut group_ts: Option<i64> = None;
        let mut group_value: Option<Value> = None;
        let flush = |ts: Option<i64>, v: Option<Value>, out: &mut Vec<TsValue>| {
            if let (Some(ts_ms), Some(value)) = (ts, v) {
                out.push(TsValue { ts_ms, value });
            }
        };
        for kv in self.db.iterator_opt(mode, ro) {
            let (k, v) = kv?;
            let ts = ts_from(&k[base..base + 8]);
            if group_ts != Some(ts) {
                flush(group_ts, group_value.take(), &mut out);
                if out.len() >= limit {
                    return Ok(out);
                }
                group_ts = Some(ts);
            }
            let row: Vec<(String, Value)> = decode(&v)?;
            if let Some((_, val)) = row.into_iter().rev().find(|(n, _)| n == key)
                && (!desc || group_value.is_none())
            {
                group_value = Some(val);
            }
        }
        flush(group_ts, group_value, &mut out);
        out.truncate(limit);
        Ok(out)
    }

    /// Attributes of a device in one scope: the given keys, or all when `keys` is empty.
    pub fn attributes(
        &self,
        device: &EntityId,
        scope: Scope,
        keys: &[String],
    ) -> anyhow::Result<Vec<(String, TsValue)>> {
        if keys.is_empty() {
            let mut prefix = vec![b'a'];
            prefix.extend_from_slice(device);
            prefix.push(scope.tag());
            return names_after(&self.db, &prefix)?
                .into_iter()
                .map(|(n, v)| Ok((n, decode(&v)?)))
                .collect();
        }
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = self.db.get(name_key(b'a', device, &[scope.tag()], k))? {
                out.push((k.clone(), decode(&v)?));
            }
        }
        Ok(out)
    }

    /// Every device's server attributes with one of `names`: (device, name, value).
    pub fn server_attributes_named(&self, names: &[&str]) -> anyhow::Result<Vec<(EntityId, String, Value)>> {
        let mut out = Vec::new();
        for kv in self.db.iterator(IteratorMode::From(b"a", Direction::Forward)) {
            let (k, v) = kv?;
            if k.first() != Some(&b'a') {
                break;
            }
            // a · device(16) · scope(1) · len(2) · name
            if k.len() < 20 || k[17] != Scope::Server.tag() {
                continue;
            }
            let name = String::from_utf8_lossy(&k[20..]).into_owned();
            if !names.contains(&name.as_str()) {
                continue;
            }
            let mut device = [0u8; 16];
            device.copy_from_slice(&k[1..17]);
            let tv: TsValue = decode(&v)?;
            out.push((device, name, tv.value));
        }
        Ok(out)
    }

    pub fn rpc(&self, uuid: &EntityId) -> anyhow::Result<Option<RpcState>> {
        self.db.get(rpc_key(uuid))?.map(|v| decode(&v)).transpose()
    }

    /// Every RPC not yet in a final status whose device `mine` accepts (a new leader takes over
    /// the ones of its partition).
    pub fn open_rpcs(&self, mine: impl Fn(&EntityId) -> bool) -> anyhow::Result<Vec<RpcState>> {
        let mut out = Vec::new();
        for kv in self.db.iterator(IteratorMode::From(b"r", Direction::Forward)) {
            let (k, v) = kv?;
            if k.first() != Some(&b'r') {
                break;
            }
            let r: RpcState = decode(&v)?;
            if !r.status.is_final() && mine(&r.device) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// RPCs of a device, newest id first, at most `max`.
    pub fn rpcs_of(&self, device: &EntityId, max: usize) -> anyhow::Result<Vec<RpcState>> {
        let mut prefix = vec![b'q'];
        prefix.extend_from_slice(device);
        let mut out = Vec::new();
        for kv in self.db.iterator(IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let uuid: EntityId = decode(&v)?;
            if let Some(r) = self.rpc(&uuid)? {
                out.push(r);
            }
        }
        out.reverse();
        out.truncate(max);
        Ok(out)
    }

    /// Telemetry keys of a device.
    pub fn telemetry_keys(&self, device: &EntityId) -> anyhow::Result<Vec<String>> {
        Ok(self.latest(device, &[])?.into_iter().map(|(k, _)| k).collect())
    }

    /// Writes, from one consistent view of the store, what it holds of each partition in
    /// `parts` to a file of its own in `dir` (frames `key len u32 · value len u32 · key ·
    /// value`, big-endian lengths), and returns each partition's progress in that view. A
    /// partition's data and its progress are written in one batch, so the view has both or
    /// neither of every write. Decision 0018.
    pub fn export(
        &self,
        dir: &Path,
        id: u64,
        parts: &[u32],
        partition_of: impl Fn(&EntityId) -> u32,
    ) -> anyhow::Result<Vec<Export>> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let snap = self.db.snapshot();
        let mut out: std::collections::BTreeMap<
            u32,
            (Export, std::io::BufWriter<std::fs::File>, crc32fast::Hasher),
        > = std::collections::BTreeMap::new();
        for &p in parts {
            let path = dir.join(format!("partition-{p}"));
            let f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
            let progress = match snap.get(progress_key(p))? {
                Some(v) => decode(&v)?,
                None => Progress::default(),
            };
            let e = Export {
                id,
                partition: p,
                progress,
                path,
                len: 0,
                crc: 0,
                keys: 0,
            };
            out.insert(p, (e, f, crc32fast::Hasher::new()));
        }
        for kv in snap.iterator(IteratorMode::Start) {
            let (k, v) = kv?;
            let Some(device) = key_device(&k, &v)? else {
                continue;
            };
            let Some((e, f, crc)) = out.get_mut(&partition_of(&device)) else {
                continue;
            };
            let head = [(k.len() as u32).to_be_bytes(), (v.len() as u32).to_be_bytes()].concat();
            for part in [&head[..], &k, &v] {
                f.write_all(part)?;
                crc.update(part);
            }
            e.len += (head.len() + k.len() + v.len()) as u64;
            e.keys += 1;
        }
        let mut done = Vec::new();
        for (_, (mut e, f, crc)) in out {
            f.into_inner().map_err(|e| e.into_error())?;
            e.crc = crc.finalize();
            done.push(e);
        }
        Ok(done)
    }

    /// Replaces what this store holds of `partition` with an [`Store::export`] of a peer's
    /// (`file`, already checked), and sets the partition's progress to the export's. Until the
    /// end the partition's progress reads 0: the half-replaced state is never exported as a
    /// consistent one, and after a crash part-way (0 is below the log's start) the transfer is
    /// made again. Returns the keys written.
    pub fn install(
        &self,
        partition: u32,
        file: &Path,
        progress: Progress,
        partition_of: impl Fn(&EntityId) -> u32,
    ) -> anyhow::Result<u64> {
        use std::io::Read;
        const BATCH_BYTES: usize = 4 << 20;
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        // What is there now goes first: a key the export lacks must not survive it.
        let mut wb = WriteBatch::default();
        wb.put(progress_key(partition), encode(&Progress::default()));
        for kv in self.db.iterator(IteratorMode::Start) {
            let (k, v) = kv?;
            if key_device(&k, &v)?.is_some_and(|d| partition_of(&d) == partition) {
                wb.delete(&k);
                if wb.size_in_bytes() >= BATCH_BYTES {
                    self.db.write_opt(std::mem::take(&mut wb), &wo)?;
                }
            }
        }
        let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file)?);
        let mut keys = 0u64;
        let crash_after: Option<u64> = std::env::var(CRASH_IN_INSTALL).ok().and_then(|v| v.parse().ok());
        loop {
            let mut head = [0u8; 8];
            match r.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
            let klen = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            let vlen = u32::from_be_bytes(head[4..].try_into().expect("4 bytes")) as usize;
            let mut kv = vec![0u8; klen + vlen];
            r.read_exact(&mut kv)?;
            let (k, v) = kv.split_at(klen);
            let device =
                key_device(k, v)?.ok_or_else(|| anyhow::anyhow!("a progress key in a partition's state"))?;
            anyhow::ensure!(
                partition_of(&device) == partition,
                "a key of partition {} in the state of partition {partition}",
                partition_of(&device)
            );
            wb.put(k, v);
            keys += 1;
            if wb.size_in_bytes() >= BATCH_BYTES {
                self.db.write_opt(std::mem::take(&mut wb), &wo)?;
            }
            if crash_after == Some(keys) {
                // As if a memtable flush had made this much durable just before a crash.
                self.db.write_opt(std::mem::take(&mut wb), &wo)?;
                self.db.flush()?;
                tracing::error!(
                    partition,
                    keys,
                    "{CRASH_IN_INSTALL} is set: crashing on purpose part-way through an install"
                );
                std::process::abort();
            }
        }
        wb.put(progress_key(partition), encode(&progress));
        self.db.write_opt(wb, &wo)?;
        // Durable now, rather than transferred again after a crash.
        self.db.flush()?;
        // Cached latest values of the partition's devices are the old ones.
        self.latest_cache
            .lock()
            .expect("latest cache lock")
            .retain(|d, _| partition_of(d) != partition);
        Ok(keys)
    }

    /// Persists what is only in memory (the store is written without a WAL).
    pub fn flush(&self) -> anyhow::Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Sets a partition's progress alone: its records below are gone from the log and no
    /// replica holds the state they made (decision 0018).
    pub fn skip_to(&self, partition: u32, progress: Progress) -> anyhow::Result<()> {
        self.db.put(progress_key(partition), encode(&progress))?;
        self.db.flush()?;
        Ok(())
    }
}

/// One partition's part of a [`Store::export`].
#[derive(Debug, Clone)]
pub struct Export {
    /// The export (one pass over the store) this file is part of.
    pub id: u64,
    pub partition: u32,
    pub progress: Progress,
    pub path: std::path::PathBuf,
    pub len: u64,
    pub crc: u32,
    pub keys: u64,
}

fn progress_key(partition: u32) -> Vec<u8> {
    let mut k = vec![b'p'];
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The device a stored entry belongs to (and so its partition); `None` for a partition's
/// progress.
fn key_device(k: &[u8], v: &[u8]) -> anyhow::Result<Option<EntityId>> {
    match k.first() {
        Some(b'l' | b'h' | b'a' | b'q' | b'n') if k.len() >= 17 => {
            Ok(Some(k[1..17].try_into().expect("16 bytes")))
        }
        Some(b'r') => Ok(Some(decode::<RpcState>(v)?.device)),
        Some(b'p') => Ok(None),
        other => anyhow::bail!("a store key of an unknown kind {other:?}"),
    }
}

/// A device's latest telemetry, key → newest sample.
type LatestMap = std::collections::BTreeMap<String, TsValue>;

fn latest_key(device: &EntityId) -> Vec<u8> {
    let mut k = vec![b'l'];
    k.extend_from_slice(device);
    k
}

/// Test hook for a crash part-way through [`Store::install`]: with this variable set to K, the
/// install writes its first K keys, makes them durable (as a memtable flush at that moment
/// would) and aborts the process. `tests/tests/state_transfer.rs` checks that the node takes the
/// state again at its next start.
pub const CRASH_IN_INSTALL: &str = "THINGRAFT_FAULT_CRASH_IN_INSTALL_AFTER_KEYS";

/// Writes of one apply step, committed atomically by [`Store::write`].
#[derive(Default)]
pub struct Batch {
    wb: WriteBatch,
    /// Latest telemetry of the devices this batch touched, written once at the end.
    latest: std::collections::HashMap<EntityId, LatestMap>,
    /// History rows written (`Some`) or deleted (`None`) by this batch, written at the end in
    /// key order: a delete later in the batch must see the rows written before it.
    history: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// RPC state written earlier in this batch, read before the store.
    rpcs: std::collections::HashMap<EntityId, RpcState>,
    rpc_ids: std::collections::HashMap<(EntityId, u32), EntityId>,
    rpc_seqs: std::collections::HashMap<EntityId, u32>,
}

impl Batch {
    pub fn rpc(&self, store: &Store, uuid: &EntityId) -> Option<RpcState> {
        match self.rpcs.get(uuid) {
            Some(r) => Some(r.clone()),
            None => store.rpc(uuid).ok().flatten(),
        }
    }

    pub fn rpc_by_id(&self, store: &Store, device: &EntityId, id: u32) -> Option<RpcState> {
        let uuid = match self.rpc_ids.get(&(*device, id)) {
            Some(u) => *u,
            None => store
                .db
                .get(rpc_id_key(device, id))
                .ok()
                .flatten()
                .and_then(|v| decode(&v).ok())?,
        };
        self.rpc(store, &uuid)
    }

    /// The next RPC id of `device` (0 first), counted in the store.
    pub fn next_rpc_id(&mut self, store: &Store, device: &EntityId) -> u32 {
        let next = match self.rpc_seqs.get(device) {
            Some(n) => *n,
            None => store
                .db
                .get(rpc_seq_key(device))
                .ok()
                .flatten()
                .and_then(|v| decode(&v).ok())
                .unwrap_or(0),
        };
        self.rpc_seqs.insert(*device, next.wrapping_add(1));
        self.wb.put(rpc_seq_key(device), encode(&next.wrapping_add(1)));
        next
    }

    pub fn put_rpc(&mut self, r: RpcState) {
        self.wb.put(rpc_key(&r.uuid), encode(&r));
        self.wb.put(rpc_id_key(&r.device, r.id), encode(&r.uuid));
        self.rpc_ids.insert((r.device, r.id), r.uuid);
        self.rpcs.insert(r.uuid, r);
    }

    pub fn progress(&mut self, partition: u32, p: Progress) {
        self.wb.put(progress_key(partition), encode(&p));
    }

    /// Saves one group of telemetry values (one message, one timestamp) from the input at
    /// `offset`: a history row always, and each key's latest value unless a newer one is stored.
    pub fn telemetry(
        &mut self,
        store: &Store,
        device: &EntityId,
        ts_ms: i64,
        offset: u64,
        values: &[(String, Value)],
    ) {
        if values.is_empty() {
            return;
        }
        let mut hk = vec![b'h'];
        hk.extend_from_slice(device);
        hk.extend_from_slice(&ts_bytes(ts_ms));
        hk.extend_from_slice(&offset.to_be_bytes());
        self.history.insert(hk, Some(encode(&values)));
        let latest = self
            .latest
            .entry(*device)
            .or_insert_with(|| store.take_latest(device));
        for (k, v) in values {
            if latest.get(k).is_none_or(|cur| ts_ms >= cur.ts_ms) {
                latest.insert(
                    k.clone(),
                    TsValue {
                        ts_ms,
                        value: v.clone(),
                    },
                );
            }
        }
    }

    /// Deletes `keys` from the device's history rows in `[start_ts, end_ts)` (rows left empty
    /// go), and from its latest values when `delete_latest`.
    pub fn delete_telemetry(
        &mut self,
        store: &Store,
        device: &EntityId,
        keys: &[String],
        start_ts: i64,
        end_ts: i64,
        delete_latest: bool,
    ) -> anyhow::Result<()> {
        let mut lo = vec![b'h'];
        lo.extend_from_slice(device);
        let mut hi = lo.clone();
        lo.extend_from_slice(&ts_bytes(start_ts));
        hi.extend_from_slice(&ts_bytes(end_ts));
        // The rows in the range as this batch leaves them: the stored ones, then this batch's
        // own writes and deletes over them.
        let mut rows: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = std::collections::BTreeMap::new();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(lo.clone());
        ro.set_iterate_upper_bound(hi.clone());
        for kv in store.db.iterator_opt(IteratorMode::Start, ro) {
            let (k, v) = kv?;
            rows.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in self.history.range(lo..hi) {
            match v {
                Some(v) => rows.insert(k.clone(), v.clone()),
                None => rows.remove(k),
            };
        }
        for (k, v) in rows {
            let row: Vec<(String, Value)> = decode(&v)?;
            if !row.iter().any(|(n, _)| keys.contains(n)) {
                continue;
            }
            let kept: Vec<(String, Value)> = row.into_iter().filter(|(n, _)| !keys.contains(n)).collect();
            let row = (!kept.is_empty()).then(|| encode(&kept));
            self.history.insert(k, row);
        }
        if delete_latest {
            let latest = self
                .latest
                .entry(*device)
                .or_insert_with(|| store.take_latest(device));
            for k in keys {
                latest.remove(k);
            }
        }
        Ok(())
    }

    pub fn delete_attribute(&mut self, device: &EntityId, scope: Scope, key: &str) {
        self.wb.delete(name_key(b'a', device, &[scope.tag()], key));
    }

    /// Adds the latest-telemetry rows; call once before writing.
    pub fn finish(&mut self) {
        for (k, v) in std::mem::take(&mut self.history) {
            match v {
                Some(v) => self.wb.put(k, v),
                None => self.wb.delete(k),
            }
        }
        for (d, m) in &self.latest {
            self.wb.put(latest_key(d), encode(m));
        }
    }

    pub fn attribute(&mut self, device: &EntityId, scope: Scope, key: &str, ts_ms: i64, value: &Value) {
        self.wb.put(
            name_key(b'a', device, &[scope.tag()], key),
            encode(&TsValue {
                ts_ms,
                value: value.clone(),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_keeps_the_newest_sample_and_history_keeps_all() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = [7u8; 16];
        let mut b = Batch::default();
        b.telemetry(&s, &d, 20, 1, &[("t".into(), Value::Long(2))]);
        b.telemetry(&s, &d, 10, 2, &[("t".into(), Value::Long(1))]);
        b.telemetry(
            &s,
            &d,
            -5,
            3,
            &[("t".into(), Value::Long(0)), ("u".into(), Value::Bool(true))],
        );
        // The same timestamp again, later in the log: it wins for the key it carries.
        b.telemetry(&s, &d, 10, 4, &[("t".into(), Value::Long(11))]);
        s.write(b).unwrap();
        let l = s.latest(&d, &["t".to_string()]).unwrap();
        assert_eq!(
            l,
            vec![(
                "t".to_string(),
                TsValue {
                    ts_ms: 20,
                    value: Value::Long(2)
                }
            )]
        );
        assert_eq!(s.latest(&d, &[]).unwrap().len(), 2);
        let h = s.history(&d, "t", i64::MIN, i64::MAX, true, 10).unwrap();
        let got: Vec<(i64, Value)> = h.into_iter().map(|x| (x.ts_ms, x.value)).collect();
        assert_eq!(
            got,
            vec![(20, Value::Long(2)), (10, Value::Long(11)), (-5, Value::Long(0))]
        );
        let h = s.history(&d, "t", 0, 20, false, 10).unwrap();
        let got: Vec<(i64, Value)> = h.into_iter().map(|x| (x.ts_ms, x.value)).collect();
        assert_eq!(got, vec![(10, Value::Long(11))]);
        let h = s.history(&d, "t", i64::MIN, i64::MAX, false, 2).unwrap();
        assert_eq!(h.iter().map(|x| x.ts_ms).collect::<Vec<_>>(), vec![-5, 10]);
        assert_eq!(
            s.history(&d, "u", i64::MIN, i64::MAX, false, 10).unwrap().len(),
            1
        );
        assert!(s.latest(&[8u8; 16], &[]).unwrap().is_empty());
    }

    #[test]
    fn a_delete_sees_the_rows_written_before_it_in_the_same_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let d = [7u8; 16];
        let row = |t: i64, u: i64| {
            vec![
                ("t".to_string(), Value::Long(t)),
                ("u".to_string(), Value::Long(u)),
            ]
        };
        // One row stored before, one written in the batch; then two deletes of different keys.
        let mut b = Batch::default();
        b.telemetry(&s, &d, 10, 1, &row(1, 1));
        s.write(b).unwrap();
        let mut b = Batch::default();
        b.telemetry(&s, &d, 20, 2, &row(2, 2));
        b.delete_telemetry(&s, &d, &["t".to_string()], 0, 100, false)
            .unwrap();
        b.delete_telemetry(&s, &d, &["u".to_string()], 15, 100, false)
            .unwrap();
        // Written after the deletes: stays.
        b.telemetry(&s, &d, 30, 3, &row(3, 3));
        s.write(b).unwrap();
        let ts = |key: &str| -> Vec<i64> {
            s.history(&d, key, i64::MIN, i64::MAX, false, 10)
                .unwrap()
                .into_iter()
                .map(|x| x.ts_ms)
                .collect()
        };
        assert_eq!(ts("t"), vec![30]);
        assert_eq!(ts("u"), vec![10, 30]);
    }
}
