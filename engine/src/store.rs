//! The local store: every replica's fold of its partitions' committed outcomes, in RocksDB.
//!
//! It can be rebuilt from the log, so it is written without its WAL being synced: each write
//! batch carries the partition's progress with the data it produced, and after a crash the
//! shard re-reads the log from the progress that survived.
//!
//! Keys (device = 16-byte id; name = u16 length + UTF-8):
//! - `l` device name → latest telemetry value (ts, value)
//! - `h` device name ts → historical telemetry value
//! - `a` device scope name → attribute (last update ts, value)
//! - `p` partition → [`Progress`]
//! - `r` rpc uuid → [`RpcState`]; `q` device id(u32) → rpc uuid; `n` device → next rpc id

use std::path::Path;
use std::sync::Arc;

use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
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
}

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
        let mut o = Options::default();
        o.create_if_missing(true);
        o.set_max_background_jobs(2);
        Ok(Arc::new(Store {
            db: DB::open(&o, path)?,
        }))
    }

    pub fn progress(&self, partition: u32) -> anyhow::Result<Progress> {
        let mut k = vec![b'p'];
        k.extend_from_slice(&partition.to_be_bytes());
        Ok(match self.db.get(&k)? {
            Some(v) => decode(&v)?,
            None => Progress::default(),
        })
    }

    /// Writes a batch built with [`Batch`]; the WAL is not synced (see the module doc).
    pub fn write(&self, b: Batch) -> anyhow::Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(b.wb, &wo)?;
        Ok(())
    }

    /// Latest telemetry of a device: the given keys, or all keys when `keys` is empty.
    pub fn latest(&self, device: &EntityId, keys: &[String]) -> anyhow::Result<Vec<(String, TsValue)>> {
        if keys.is_empty() {
            let mut prefix = vec![b'l'];
            prefix.extend_from_slice(device);
            return names_after(&self.db, &prefix)?
                .into_iter()
                .map(|(n, v)| Ok((n, decode(&v)?)))
                .collect();
        }
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = self.db.get(name_key(b'l', device, &[], k))? {
                out.push((k.clone(), decode(&v)?));
            }
        }
        Ok(out)
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
        let base = name_key(b'h', device, &[], key);
        let mut lo = base.clone();
        lo.extend_from_slice(&ts_bytes(start_ts));
        let mut hi = base.clone();
        hi.extend_from_slice(&ts_bytes(end_ts));
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(lo.clone());
        ro.set_iterate_upper_bound(hi.clone());
        let mode = if desc {
            IteratorMode::End
        } else {
            IteratorMode::Start
        };
        let mut out = Vec::new();
        for kv in self.db.iterator_opt(mode, ro) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let ts = ts_from(&k[base.len()..]);
            out.push(TsValue {
                ts_ms: ts,
                value: decode(&v)?,
            });
        }
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

    pub fn rpc(&self, uuid: &EntityId) -> anyhow::Result<Option<RpcState>> {
        self.db.get(rpc_key(uuid))?.map(|v| decode(&v)).transpose()
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
}

/// Writes of one apply step, committed atomically by [`Store::write`].
#[derive(Default)]
pub struct Batch {
    wb: WriteBatch,
    /// Latest values written earlier in this batch: a later, older sample must not replace them.
    latest: std::collections::HashMap<Vec<u8>, i64>,
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
        let mut k = vec![b'p'];
        k.extend_from_slice(&partition.to_be_bytes());
        self.wb.put(k, encode(&p));
    }

    /// Saves one telemetry sample: history always, latest if it is not older than the stored one.
    pub fn telemetry(&mut self, store: &Store, device: &EntityId, key: &str, ts_ms: i64, value: &Value) {
        let mut hk = name_key(b'h', device, &[], key);
        hk.extend_from_slice(&ts_bytes(ts_ms));
        self.wb.put(hk, encode(value));
        let lk = name_key(b'l', device, &[], key);
        let current = match self.latest.get(&lk) {
            Some(ts) => Some(*ts),
            None => store
                .db
                .get(&lk)
                .ok()
                .flatten()
                .and_then(|v| decode::<TsValue>(&v).ok())
                .map(|t| t.ts_ms),
        };
        if current.is_none_or(|ts| ts_ms >= ts) {
            self.wb.put(
                &lk,
                encode(&TsValue {
                    ts_ms,
                    value: value.clone(),
                }),
            );
            self.latest.insert(lk, ts_ms);
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
        b.telemetry(&s, &d, "t", 20, &Value::Long(2));
        b.telemetry(&s, &d, "t", 10, &Value::Long(1));
        b.telemetry(&s, &d, "t", -5, &Value::Long(0));
        s.write(b).unwrap();
        let l = s.latest(&d, &[]).unwrap();
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
        let h = s.history(&d, "t", i64::MIN, i64::MAX, true, 10).unwrap();
        assert_eq!(h.iter().map(|x| x.ts_ms).collect::<Vec<_>>(), vec![20, 10, -5]);
        let h = s.history(&d, "t", 0, 20, false, 10).unwrap();
        assert_eq!(h.iter().map(|x| x.ts_ms).collect::<Vec<_>>(), vec![10]);
        assert!(s.latest(&[8u8; 16], &[]).unwrap().is_empty());
    }
}
