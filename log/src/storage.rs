//! Storage for every Raft group of a node: the Raft log of all groups in one journal of segment
//! files (`segments`, decision 0013), everything else in one RocksDB database; one fsync thread
//! shared by all groups.
//!
//! | where | key | value |
//! |---|---|---|
//! | `raft-segments/` | group · index, in the journal's index | postcard [`Entry`] |
//! | `raft_state` | group (u32 BE) · tag | vote, last purged log id |
//! | `sm` | group · tag (· meta key) | applied state, snapshot record, metadata map |
//! | `sm` | group · first offset (u64 BE) | one applied batch: [`batch`] encoding |
//!
//! (The `raft_log` column family held the log before decision 0013; `Store::open` moves what
//! it finds there into the journal.)
//!
//! `append` encodes the entries, keeps them in the group's [`RecentEntries`] (where readers find
//! them at once) and hands them to the syncer thread. The syncer takes every append waiting, of
//! every group, writes them to the journal in one write, fsyncs once, and only then tells
//! openraft the entries are durable: group commit across all groups of the node, with one write
//! and one fsync per round instead of a write per append on the Raft cores' tasks.
//!
//! Entries handed over but not yet durable are "pending". Three rules keep that invisible:
//! - [`RecentEntries`] never drops a pending entry, so a read finds it there;
//! - `truncate_after` goes through the syncer, and `purge` and `get_log_state` first wait for
//!   every earlier append ([`SyncJob::Barrier`]), so they are in order with them;
//! - the state machine writes no applied state for an entry until that entry is durable here
//!   ([`Written`]), so a flushed `sm` never runs ahead of the local log (decision 0013).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::batch;
use crate::probe::{self, Stage};
use crate::segments::{Journal, Kind, Rec, SEGMENT_BYTES, Writer};
use crate::types::{
    Command, Entry, GroupId, LogId, MetaCheck, MetaOp, MetaTxn, Response, Snapshot, SnapshotData,
    SnapshotMeta, StoredMembership, TypeConfig, Vote,
};

const CF_RAFT_LOG: &str = "raft_log";
const CF_RAFT_STATE: &str = "raft_state";
/// Records and the applied state of every group: one column family, so one memtable flush
/// persists a consistent prefix of applies (they are written without the WAL).
const CF_SM: &str = "sm";

const TAG_VOTE: u8 = 0;
const TAG_PURGED: u8 = 2;

const TAG_APPLIED: u8 = 0;
const TAG_SNAPSHOT: u8 = 1;
const TAG_META_KV: u8 = 2;

/// How much of a partition's records a replica keeps; applied deterministically from entry
/// timestamps, so every replica trims the same batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub bytes_max: u64,
    pub age_ms_max: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            bytes_max: 1 << 30,
            age_ms_max: 7 * 24 * 3600 * 1000,
        }
    }
}

/// Counters of the shared fsync thread.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub fsyncs: AtomicU64,
    pub flushed_appends: AtomicU64,
    pub fsync_us_total: AtomicU64,
}

enum SyncJob {
    /// Entries of one group (index, postcard bytes) to write, then fsync; `callback` once
    /// durable.
    Append {
        group: GroupId,
        entries: Vec<(u64, Vec<u8>)>,
        last: u64,
        written: Arc<Written>,
        callback: IOFlushed<TypeConfig>,
    },
    /// Truncates a group's log from `from` on; answered once durable.
    Truncate {
        group: GroupId,
        from: u64,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
    /// Answered once every job sent before it is written.
    Barrier(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// Which entries of a group are pending: the indexes in `written_upto + 1 ..= appended_upto`
/// are handed to the syncer and not yet written and fsynced. `failed` is set when a write of
/// the syncer failed: what it held will never be written.
#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    appended_upto: u64,
    written_upto: u64,
    failed: bool,
}

#[derive(Debug)]
pub(crate) struct Written(watch::Sender<Pending>);

impl Written {
    fn new() -> Arc<Self> {
        Arc::new(Self(watch::channel(Pending::default()).0))
    }

    fn written_upto(&self) -> u64 {
        self.0.borrow().written_upto
    }

    /// Waits until every entry at or below `index` is written (or was never appended here);
    /// fails if the syncer's write failed.
    async fn wait_written(&self, index: u64) -> io::Result<()> {
        let mut rx = self.0.subscribe();
        let p = *rx
            .wait_for(|p| p.failed || p.written_upto >= index.min(p.appended_upto))
            .await
            .map_err(|_| io::Error::other("the log store is closed"))?;
        if p.failed {
            return Err(io::Error::other("writing the Raft log failed"));
        }
        Ok(())
    }
}

/// One node's RocksDB, its Raft log journal, the journal's fsync thread and its preparer.
pub struct Store {
    db: Arc<DB>,
    journal: Arc<Journal>,
    sync_tx: mpsc::Sender<SyncJob>,
    written: std::sync::Mutex<std::collections::HashMap<GroupId, Arc<Written>>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub sync_stats: Arc<SyncStats>,
}

impl Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.db.path()).finish()
    }
}

fn key(group: GroupId, n: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&n.to_be_bytes());
    k
}

fn tag_key(group: GroupId, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4] = tag;
    k
}

/// Keys of a group's state-machine metadata in `sm`: after every record key, which starts with
/// the group id (< 2^32 - 1).
fn sm_key(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0xffu8; 9];
    k[4..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

fn key_index(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[4..12]);
    u64::from_be_bytes(b)
}

fn key_group(k: &[u8]) -> GroupId {
    let mut b = [0u8; 4];
    b.copy_from_slice(&k[..4]);
    GroupId::from_be_bytes(b)
}

// openraft adds what failed (log, vote, state machine) and how; these keep the cause.
fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// Options every RocksDB database of a node starts from. RocksDB's info log stays at INFO: the
/// library as Debian builds it logs at DEBUG, a line for every WAL sync (a `write` per commit, and
/// a LOG file that grows without end); and it keeps at most 4 files of 16 MiB.
pub fn db_options() -> Options {
    let mut o = Options::default();
    o.set_log_level(rocksdb::LogLevel::Info);
    o.set_max_log_file_size(16 << 20);
    o.set_keep_log_file_num(4);
    o
}

impl Store {
    /// Opens (or creates) the node's database under `path`.
    pub fn open(path: &Path) -> anyhow::Result<Arc<Store>> {
        let mut opts = db_options();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Writers from many tasks meet in RocksDB's write thread; adaptive yield spins and
        // calls sched_yield while they wait, which burns the few cores we have.
        opts.set_enable_write_thread_adaptive_yield(false);
        let mut sm_opts = Options::default();
        sm_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RAFT_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT_STATE, Options::default()),
            ColumnFamilyDescriptor::new(CF_SM, sm_opts),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        // Every group's purged index: replay drops what is at or below it.
        let mut purged = std::collections::HashMap::new();
        let state = db
            .cf_handle(CF_RAFT_STATE)
            .expect("column family created at open");
        for kv in db.iterator_cf(state, IteratorMode::Start) {
            let (k, v) = kv?;
            if k.len() == 5 && k[4] == TAG_PURGED {
                let id: LogId = postcard::from_bytes(&v)?;
                purged.insert(key_group(&k), id.index);
            }
        }
        let opened = Journal::open(&path.join("raft-segments"), &purged, SEGMENT_BYTES)?;
        let (journal, mut writer) = (opened.journal, opened.writer);
        migrate_raft_log_cf(&db, &mut writer)?;
        let (sync_tx, sync_rx) = mpsc::channel();
        let sync_stats = Arc::new(SyncStats::default());
        let syncer = {
            let stats = sync_stats.clone();
            std::thread::Builder::new()
                .name("log-fsync".into())
                .spawn(move || run_syncer(writer, &sync_rx, &stats))?
        };
        let preparer = {
            let journal = journal.clone();
            std::thread::Builder::new()
                .name("log-segments".into())
                .spawn(move || journal.run_preparer())?
        };
        Ok(Arc::new(Store {
            db,
            journal,
            sync_tx,
            written: Default::default(),
            threads: std::sync::Mutex::new(vec![syncer, preparer]),
            sync_stats,
        }))
    }

    /// What is pending of `group`'s log, shared by its log store and state machine.
    fn written(&self, group: GroupId) -> Arc<Written> {
        self.written
            .lock()
            .expect("written lock")
            .entry(group)
            .or_insert_with(Written::new)
            .clone()
    }

    /// Waits until every job sent to the syncer before this call is written.
    async fn barrier(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.sync_tx
            .send(SyncJob::Barrier(tx))
            .map_err(|_| io::Error::other("the fsync thread has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the fsync thread has stopped"))
    }

    /// The Raft log storage of `group`.
    pub fn log_store(self: &Arc<Self>, group: GroupId) -> LogStore {
        LogStore {
            group,
            written: self.written(group),
            store: self.clone(),
            recent: Default::default(),
        }
    }

    /// The state machine of `group`, loaded from disk.
    pub fn state_machine(self: &Arc<Self>, group: GroupId, retention: Retention) -> io::Result<StateMachine> {
        StateMachine::load(self.clone(), group, retention)
    }

    /// Stops the fsync thread after it has flushed what it holds, and persists applied state.
    pub fn close(&self) {
        if let Err(e) = self.flush_applied() {
            tracing::warn!(error = %e, "flushing applied state at close");
        }
        let _ = self.sync_tx.send(SyncJob::Stop);
        self.journal.stop();
        if let Ok(mut threads) = self.threads.lock() {
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The four families are created in `open`; a missing one is a programming error.
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> io::Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(write_err)
    }

    /// A write to `sm` that skips the WAL: applied state is a fold of the Raft log, so after a
    /// crash it restarts from the last memtable flush and openraft re-applies the rest (log
    /// entries are purged only behind a snapshot, and building one flushes `sm` first).
    ///
    /// openraft 0.10 may apply an entry before this node's own fsync of it (it is durable on a
    /// quorum). A flushed `sm` still never runs ahead of the local log: `apply` writes nothing
    /// for an entry until the local fsync of it is done ([`Written`]). Decision 0013.
    fn write_applied(&self, batch: WriteBatch) -> io::Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo).map_err(write_err)
    }

    /// Persists every applied state written so far.
    fn flush_applied(&self) -> io::Result<()> {
        self.db.flush_cf(self.cf(CF_SM)).map_err(write_err)
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, cf: &str, k: &[u8]) -> io::Result<Option<T>> {
        match self.db.get_pinned_cf(self.cf(cf), k).map_err(read_err)? {
            None => Ok(None),
            Some(v) => postcard::from_bytes(&v).map(Some).map_err(read_err),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Moves the entries a node stored in the `raft_log` column family (before decision 0013) into
/// the journal, then deletes them there. Run again after a crash in between, it writes the same
/// entries again, which replay reads as the same log.
fn migrate_raft_log_cf(db: &DB, writer: &mut Writer) -> anyhow::Result<()> {
    let cf = db.cf_handle(CF_RAFT_LOG).expect("column family created at open");
    let mut recs = Vec::new();
    for kv in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = kv?;
        if k.len() != 12 {
            continue;
        }
        recs.push(Rec {
            kind: Kind::Entry,
            group: key_group(&k),
            index: key_index(&k),
            payload: v.to_vec(),
        });
        if recs.len() >= 4096 {
            writer.write(&std::mem::take(&mut recs))?;
        }
    }
    let moved = !recs.is_empty();
    writer.write(&recs)?;
    if moved || db.iterator_cf(cf, IteratorMode::Start).next().is_some() {
        let mut b = WriteBatch::default();
        b.delete_range_cf(cf, &[0u8; 12][..], &[0xffu8; 13][..]);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(b, &wo)?;
        tracing::info!("moved the raft log from RocksDB into the segment journal");
    }
    Ok(())
}

fn run_syncer(mut writer: Writer, rx: &mpsc::Receiver<SyncJob>, stats: &SyncStats) {
    let mut jobs = Vec::new();
    let mut barriers = Vec::new();
    loop {
        let mut stop = false;
        let mut take = |job| match job {
            SyncJob::Barrier(tx) => barriers.push(tx),
            SyncJob::Stop => stop = true,
            job => jobs.push(job),
        };
        match rx.recv() {
            Ok(job) => take(job),
            Err(_) => take(SyncJob::Stop),
        }
        while let Ok(job) = rx.try_recv() {
            take(job);
        }
        if !jobs.is_empty() {
            // One write for every job taken, in the order they were handed over (so each
            // group's entries in log order), then one fsync makes all of them durable.
            let started = std::time::Instant::now();
            let mut recs = Vec::new();
            for job in &mut jobs {
                match job {
                    SyncJob::Append { group, entries, .. } => {
                        recs.extend(std::mem::take(entries).into_iter().map(|(index, payload)| Rec {
                            kind: Kind::Entry,
                            group: *group,
                            index,
                            payload,
                        }))
                    }
                    SyncJob::Truncate { group, from, .. } => recs.push(Rec {
                        kind: Kind::Truncate,
                        group: *group,
                        index: *from,
                        payload: Vec::new(),
                    }),
                    SyncJob::Barrier(_) | SyncJob::Stop => {}
                }
            }
            let t0 = std::time::Instant::now();
            let res = writer.write(&recs);
            stats
                .fsync_us_total
                .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            probe::rec(Stage::Fsync, started.elapsed());
            for job in jobs.drain(..) {
                let r = match &res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::other(e.to_string())),
                };
                match job {
                    SyncJob::Append {
                        last,
                        written,
                        callback,
                        ..
                    } => {
                        stats.flushed_appends.fetch_add(1, Ordering::Relaxed);
                        written.0.send_modify(|p| match r {
                            Ok(()) => p.written_upto = last,
                            Err(_) => p.failed = true,
                        });
                        callback.io_completed(r);
                    }
                    SyncJob::Truncate { done, .. } => {
                        let _ = done.send(r);
                    }
                    SyncJob::Barrier(_) | SyncJob::Stop => {}
                }
            }
        }
        for tx in barriers.drain(..) {
            let _ = tx.send(());
        }
        if stop {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raft log

/// Raft log and vote of one group.
#[derive(Debug, Clone)]
pub struct LogStore {
    group: GroupId,
    written: Arc<Written>,
    store: Arc<Store>,
    recent: Arc<std::sync::Mutex<RecentEntries>>,
}

/// The newest entries of a group's log, so that replication and apply (which read back what
/// was just appended) do not go to RocksDB. Bounded by count and bytes, except that an entry
/// not yet written to RocksDB stays.
#[derive(Debug, Default)]
struct RecentEntries {
    entries: std::collections::VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    const ENTRIES_MAX: usize = 1024;
    const BYTES_MAX: usize = 16 << 20;

    fn push(&mut self, entry: Entry, bytes: usize, written_upto: u64) {
        if self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index + 1 != entry.log_id.index)
        {
            self.clear();
        }
        self.bytes += bytes;
        self.entries.push_back((entry, bytes));
        while (self.entries.len() > Self::ENTRIES_MAX || self.bytes > Self::BYTES_MAX)
            && self
                .entries
                .front()
                .is_some_and(|(e, _)| e.log_id.index <= written_upto)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, b)) = self.entries.pop_front() {
            self.bytes -= b;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops entries at `index` and after.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= index) {
            if let Some((_, b)) = self.entries.pop_back() {
                self.bytes -= b;
            }
        }
    }

    /// Drops entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(e, _)| e.log_id.index <= index) {
            self.pop_front();
        }
    }

    /// Entries `start..end` if all of them are here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        if start >= end {
            return Some(Vec::new());
        }
        let first = self.entries.front()?.0.log_id.index;
        let last = self.entries.back()?.0.log_id.index;
        if start < first || end > last + 1 {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let mut out;
        if start >= end {
            return Ok(Vec::new());
        }
        if end != u64::MAX
            && let Some(hit) = self.recent.lock().expect("recent entries lock").get(start, end)
        {
            return Ok(hit);
        }
        out = self.store.journal.entries(self.group, start, end)?;
        // The rest of the range may still be pending, and so only in the cache.
        // The journal and the cache together hold every entry: what the cache dropped is in the
        // journal, so below the cache's first entry the journal has all there is.
        let next = out.last().map_or(start, |e| e.log_id.index + 1);
        if next < end {
            let recent = self.recent.lock().expect("recent entries lock");
            if let (Some(first), Some(last)) = (
                recent.entries.front().map(|(e, _)| e.log_id.index),
                recent.entries.back().map(|(e, _)| e.log_id.index),
            ) && (out.is_empty() || next >= first)
                && let Some(rest) = recent.get(next.max(first), end.min(last + 1))
            {
                out.extend(rest);
            }
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.store.get(CF_RAFT_STATE, &tag_key(self.group, TAG_VOTE))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        self.store.barrier().await?;
        let last_purged: Option<LogId> = self.store.get(CF_RAFT_STATE, &tag_key(self.group, TAG_PURGED))?;
        let last = match self.store.journal.last_index(self.group) {
            Some(i) => self.store.journal.entry(self.group, i)?.map(|e| e.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let mut b = WriteBatch::default();
        let v = postcard::to_stdvec(vote).map_err(write_err)?;
        b.put_cf(self.store.cf(CF_RAFT_STATE), tag_key(self.group, TAG_VOTE), v);
        self.store.write(b, true)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let mut recent = Vec::new();
        for entry in entries {
            let v = postcard::to_stdvec(&entry).map_err(write_err)?;
            encoded.push((entry.log_id.index, v));
            recent.push((entry, encoded.last().map_or(0, |(_, v)| v.len())));
        }
        let Some(last) = recent.last().map(|(e, _)| e.log_id.index) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // Readable now (from the cache); written and durable once the syncer has done both.
        self.written.0.send_modify(|p| p.appended_upto = last);
        {
            let written_upto = self.written.written_upto();
            let mut r = self.recent.lock().expect("recent entries lock");
            for (entry, bytes) in recent {
                r.push(entry, bytes, written_upto);
            }
        }
        self.store
            .sync_tx
            .send(SyncJob::Append {
                group: self.group,
                entries: encoded,
                last,
                written: self.written.clone(),
                callback,
            })
            .map_err(|_| io::Error::other("the fsync thread has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        // Keeps `last_log_id` itself; `None` deletes every entry.
        let from = last_log_id.map_or(0, |l| l.index + 1);
        // Through the syncer, after every earlier append: none lands after the truncation.
        let (done, rx) = tokio::sync::oneshot::channel();
        self.store
            .sync_tx
            .send(SyncJob::Truncate {
                group: self.group,
                from,
                done,
            })
            .map_err(|_| io::Error::other("the fsync thread has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the fsync thread has stopped"))??;
        self.recent.lock().expect("recent entries lock").truncate(from);
        let keep = from.saturating_sub(1);
        self.written.0.send_modify(|p| {
            p.appended_upto = keep;
            p.written_upto = keep;
        });
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.store.barrier().await?;
        self.recent
            .lock()
            .expect("recent entries lock")
            .purge(log_id.index);
        // Synced before the journal may recycle what held the purged entries: replay must know
        // they are gone.
        let mut b = WriteBatch::default();
        let v = postcard::to_stdvec(&log_id).map_err(write_err)?;
        b.put_cf(self.store.cf(CF_RAFT_STATE), tag_key(self.group, TAG_PURGED), v);
        self.store.write(b, true)?;
        self.store.journal.purge(self.group, log_id.index);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// The applied state of a group, persisted with every applied batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Offset the next appended record will get.
    pub next_offset: u64,
    /// First offset still retained.
    pub start_offset: u64,
    /// Bytes of record batches retained.
    pub retained_bytes: u64,
    /// Leader-stamped time of the oldest retained batch (0: none).
    pub start_ts_ms: u64,
}

/// A built snapshot: its meta and the state it covers. Records need no copy: offsets are
/// immutable, so the snapshot's records are exactly the retained batches below `next_offset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta,
    next_offset: u64,
    meta_kv: Vec<(String, Bytes)>,
}

/// Checks that `data` is a snapshot payload, before it is handed to openraft (which stops the
/// group when installing fails).
pub fn validate_snapshot_payload(data: &[u8]) -> io::Result<()> {
    postcard::from_bytes::<SnapshotPayload>(data)
        .map(|_| ())
        .map_err(read_err)
}

/// The bytes sent to a follower that installs a snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    next_offset: u64,
    start_offset: u64,
    meta_kv: Vec<(String, Bytes)>,
    batches: Vec<(u64, Bytes)>,
}

/// What readers of a group share with its state machine.
#[derive(Debug)]
pub struct SmShared {
    pub applied: RwLock<AppliedState>,
    pub meta_kv: RwLock<BTreeMap<String, Bytes>>,
    /// Keys of the metadata map changed by each apply (for caches); a lagging receiver must
    /// assume everything changed.
    pub meta_changes: broadcast::Sender<Arc<Vec<String>>>,
    /// `next_offset` after each apply, for tail subscriptions.
    pub next_offset_tx: watch::Sender<u64>,
    /// Snapshots installed into this state machine since the node started.
    pub snapshots_installed: AtomicU64,
    /// The newest applied batches, so that reads at the tail (the engine shards' tails, which
    /// read every batch just after its apply) come from memory instead of a RocksDB iterator.
    recent: std::sync::Mutex<RecentBatches>,
}

/// The newest applied batches of a group, consecutive, with their first offsets.
#[derive(Debug, Default)]
struct RecentBatches {
    batches: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
}

/// At most this many batches, and bytes, per group in [`RecentBatches`] (the newest batch is
/// always kept).
const RECENT_BATCHES_MAX: usize = 256;
const RECENT_BYTES_MAX: usize = 1 << 20;

impl RecentBatches {
    fn push(&mut self, first: u64, batch: Bytes) {
        self.bytes += batch.len();
        self.batches.push_back((first, batch));
        while self.batches.len() > 1
            && (self.batches.len() > RECENT_BATCHES_MAX || self.bytes > RECENT_BYTES_MAX)
        {
            if let Some((_, b)) = self.batches.pop_front() {
                self.bytes -= b.len();
            }
        }
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
    }

    /// The batches from the one holding `offset` on, if that one is still here.
    fn from(&self, offset: u64) -> Option<impl Iterator<Item = &(u64, Bytes)>> {
        let first = self.batches.front()?.0;
        if offset < first {
            return None;
        }
        let i = self.batches.partition_point(|(f, _)| *f <= offset) - 1;
        Some(self.batches.iter().skip(i))
    }
}

/// Appends the records of stored batch `v` (first offset `first`) in `from..next` to `out`,
/// until it holds `max`; returns whether it does.
fn push_records(
    out: &mut Vec<StoredRecord>,
    first: u64,
    v: &Bytes,
    from: u64,
    next: u64,
    max: usize,
) -> io::Result<bool> {
    let decoded = batch::decode(v).map_err(read_err)?;
    for (i, rec) in decoded.records.into_iter().enumerate() {
        let offset = first + i as u64;
        if offset < from || offset >= next {
            continue;
        }
        out.push(StoredRecord {
            offset,
            timestamp_ms: decoded.ts_ms,
            key: rec.key,
            value: rec.value,
        });
        if out.len() == max {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A record read back from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub key: Bytes,
    pub value: Bytes,
}

/// Reads of one group's applied state; cheap to clone.
#[derive(Debug, Clone)]
pub struct SmReader {
    group: GroupId,
    store: Arc<Store>,
    pub shared: Arc<SmShared>,
}

impl SmReader {
    /// The applied state (copy).
    pub fn applied(&self) -> AppliedState {
        self.shared.applied.read().expect("applied lock").clone()
    }

    /// Committed records from `from_offset` (or the first retained one), at most `max`.
    pub fn read(&self, from_offset: u64, max: usize) -> io::Result<Vec<StoredRecord>> {
        let (start, next) = {
            let a = self.shared.applied.read().expect("applied lock");
            (a.start_offset, a.next_offset)
        };
        let from = from_offset.max(start);
        let mut out = Vec::new();
        if from >= next || max == 0 {
            return Ok(out);
        }
        {
            let recent = self.shared.recent.lock().expect("recent lock");
            if let Some(batches) = recent.from(from) {
                for (first, v) in batches {
                    if *first >= next || push_records(&mut out, *first, v, from, next, max)? {
                        break;
                    }
                }
                return Ok(out);
            }
        }
        let cf = self.store.cf(CF_SM);
        // The batch holding `from` is the last one whose first offset is <= from.
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(key(self.group, next).to_vec());
        let seek = key(self.group, from);
        let mut it = self.store.db.raw_iterator_cf_opt(cf, ro);
        it.seek_for_prev(seek);
        if !it.valid() || it.key().is_none_or(|k| k[..4] != self.group.to_be_bytes()) {
            it.seek(key(self.group, start));
        }
        while it.valid() && out.len() < max {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k[..4] != self.group.to_be_bytes() {
                break;
            }
            let first = key_index(k);
            // One copy of the stored batch; its records are slices of it.
            if push_records(&mut out, first, &Bytes::copy_from_slice(v), from, next, max)? {
                break;
            }
            it.next();
        }
        it.status().map_err(read_err)?;
        Ok(out)
    }

    /// A value of the metadata map.
    pub fn meta_get(&self, k: &str) -> Option<Bytes> {
        self.shared.meta_kv.read().expect("meta lock").get(k).cloned()
    }

    /// Entries of the metadata map whose key starts with `prefix`, in key order, at most `max`.
    pub fn meta_scan(&self, prefix: &str, max: usize) -> Vec<(String, Bytes)> {
        let kv = self.shared.meta_kv.read().expect("meta lock");
        kv.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(max)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A receiver of `next_offset` after each apply.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.next_offset_tx.subscribe()
    }
}

/// The index of the first check of `txn` that fails against the map (`kv` overlaid with
/// `pending`), or `None` if all hold.
fn check_txn(
    txn: &MetaTxn,
    kv: &BTreeMap<String, Bytes>,
    pending: &BTreeMap<String, Option<Bytes>>,
) -> Option<u32> {
    let get = |k: &str| match pending.get(k) {
        Some(v) => v.clone(),
        None => kv.get(k).cloned(),
    };
    txn.checks
        .iter()
        .position(|c| match c {
            MetaCheck::Absent(k) => get(k).is_some(),
            MetaCheck::Present(k) => get(k).is_none(),
            MetaCheck::Equals(k, v) => get(k).as_ref() != Some(v),
        })
        .map(|i| i as u32)
}

/// The state machine of one group: partition records (or the metadata map) in RocksDB.
#[derive(Debug, Clone)]
pub struct StateMachine {
    reader: SmReader,
    retention: Retention,
    written: Arc<Written>,
}

impl StateMachine {
    fn load(store: Arc<Store>, group: GroupId, retention: Retention) -> io::Result<Self> {
        let applied: AppliedState = store.get(CF_SM, &sm_key(group, TAG_APPLIED))?.unwrap_or_default();
        let mut meta_kv = BTreeMap::new();
        let prefix = sm_key(group, TAG_META_KV);
        for kv in store.db.prefix_iterator_cf(store.cf(CF_SM), prefix) {
            let (k, v) = kv.map_err(read_err)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            meta_kv.insert(name, Bytes::copy_from_slice(&v));
        }
        let (next_offset_tx, _) = watch::channel(applied.next_offset);
        let shared = Arc::new(SmShared {
            applied: RwLock::new(applied),
            meta_kv: RwLock::new(meta_kv),
            meta_changes: broadcast::channel(1024).0,
            next_offset_tx,
            snapshots_installed: AtomicU64::new(0),
            recent: std::sync::Mutex::new(RecentBatches::default()),
        });
        Ok(Self {
            written: store.written(group),
            reader: SmReader { group, store, shared },
            retention,
        })
    }

    /// The read side of this state machine.
    pub fn reader(&self) -> SmReader {
        self.reader.clone()
    }

    fn group(&self) -> GroupId {
        self.reader.group
    }

    fn store(&self) -> &Arc<Store> {
        &self.reader.store
    }

    /// Drops whole batches from the front while the partition is over its retention. Bounded per
    /// call; runs again on the next apply.
    fn trim(&self, st: &mut AppliedState, now_ms: u64, b: &mut WriteBatch) -> io::Result<()> {
        const TRIM_BATCHES_MAX: usize = 256;
        let store = self.store();
        let cf = store.cf(CF_SM);
        let mut it = store.db.raw_iterator_cf(cf);
        it.seek(key(self.group(), st.start_offset));
        let mut trimmed = 0;
        while it.valid() && trimmed < TRIM_BATCHES_MAX {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k[..4] != self.group().to_be_bytes() {
                break;
            }
            let first = key_index(k);
            let header = batch::header(v).map_err(read_err)?;
            let too_big = st.retained_bytes > self.retention.bytes_max;
            let too_old = now_ms.saturating_sub(header.ts_ms) > self.retention.age_ms_max;
            let end = first + u64::from(header.count);
            // Never trim the batch that holds the newest record.
            if !(too_big || too_old) || end >= st.next_offset {
                st.start_ts_ms = header.ts_ms;
                break;
            }
            b.delete_cf(cf, k);
            st.retained_bytes = st.retained_bytes.saturating_sub(v.len() as u64);
            st.start_offset = end;
            trimmed += 1;
            it.next();
        }
        Ok(())
    }

    fn snapshot_payload(&self, rec: &SnapshotRecord) -> io::Result<Vec<u8>> {
        let store = self.store();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(key(self.group(), rec.next_offset).to_vec());
        let from = key(self.group(), 0);
        let mut batches = Vec::new();
        let mut start_offset = None;
        for kv in store
            .db
            .iterator_cf_opt(store.cf(CF_SM), ro, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = kv.map_err(read_err)?;
            let first = key_index(&k);
            start_offset.get_or_insert(first);
            batches.push((first, Bytes::copy_from_slice(&v)));
        }
        let payload = SnapshotPayload {
            next_offset: rec.next_offset,
            start_offset: start_offset.unwrap_or(rec.next_offset),
            meta_kv: rec.meta_kv.clone(),
            batches,
        };
        postcard::to_stdvec(&payload).map_err(read_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let applied = self.reader.applied();
        let meta_kv: Vec<(String, Bytes)> = self
            .reader
            .shared
            .meta_kv
            .read()
            .expect("meta lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
        };
        let rec = SnapshotRecord {
            meta: meta.clone(),
            next_offset: applied.next_offset,
            meta_kv,
        };
        // Everything up to this snapshot must survive a crash before openraft purges the log
        // entries behind it.
        // A flush waits for disk; keep it off the async workers.
        let store = self.store().clone();
        tokio::task::spawn_blocking(move || store.flush_applied())
            .await
            .map_err(write_err)??;
        let mut b = WriteBatch::default();
        let v = postcard::to_stdvec(&rec).map_err(write_err)?;
        b.put_cf(self.store().cf(CF_SM), sm_key(self.group(), TAG_SNAPSHOT), v);
        self.store().write(b, true)?;
        // openraft keeps only the meta of a built snapshot; the data is produced when a
        // follower needs it (`get_current_snapshot`), so building costs O(1).
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(Vec::new()),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let a = self.reader.applied();
        Ok((a.last_applied, a.membership))
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut st = self.reader.applied();
        let group = self.group();
        let store = self.store().clone();
        let mut b = WriteBatch::default();
        // Answers go out only after the batch is written and visible to `read` and `tail`.
        let mut replies = Vec::new();
        let mut responders = Vec::new();
        // Writes of this apply call, visible to later transactions of the same call.
        let mut meta_updates: BTreeMap<String, Option<Bytes>> = BTreeMap::new();
        let mut latest_ts = None;
        let mut new_batches = Vec::new();
        // The stream must be drained: openraft checks that every entry it sent was applied.
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            if let Some(r) = responder {
                responders.push((r, replies.len()));
            }
            st.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Response::None),
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(entry.log_id), m);
                    replies.push(Response::None);
                }
                EntryPayload::Normal(Command::Append { batch: v }) => {
                    // Check the whole batch before it becomes part of the partition.
                    let h = batch::validate(&v).map_err(write_err)?;
                    replies.push(Response::Appended {
                        first_offset: st.next_offset,
                        count: h.count,
                    });
                    if h.count == 0 {
                        continue;
                    }
                    b.put_cf(store.cf(CF_SM), key(group, st.next_offset), &v);
                    new_batches.push((st.next_offset, v.clone()));
                    if st.retained_bytes == 0 {
                        st.start_ts_ms = h.ts_ms;
                    }
                    st.next_offset += u64::from(h.count);
                    st.retained_bytes += v.len() as u64;
                    latest_ts = Some(h.ts_ms);
                }
                EntryPayload::Normal(Command::MetaPut { key: k, value }) => {
                    let mut full = sm_key(group, TAG_META_KV).to_vec();
                    full.extend_from_slice(k.as_bytes());
                    b.put_cf(store.cf(CF_SM), full, &value);
                    meta_updates.insert(k, Some(value));
                    replies.push(Response::None);
                }
                EntryPayload::Normal(Command::MetaTxn(txn)) => {
                    let kv = self.reader.shared.meta_kv.read().expect("meta lock");
                    let verdict = check_txn(&txn, &kv, &meta_updates);
                    drop(kv);
                    if verdict.is_none() {
                        for op in txn.ops {
                            let mut full = sm_key(group, TAG_META_KV).to_vec();
                            full.extend_from_slice(op.key().as_bytes());
                            match op {
                                MetaOp::Put(k, v) => {
                                    b.put_cf(store.cf(CF_SM), full, &v);
                                    meta_updates.insert(k, Some(v));
                                }
                                MetaOp::Delete(k) => {
                                    b.delete_cf(store.cf(CF_SM), full);
                                    meta_updates.insert(k, None);
                                }
                            }
                        }
                    }
                    replies.push(Response::Txn {
                        applied: verdict.is_none(),
                        failed_check: verdict,
                    });
                }
            }
        }
        if let Some(ts) = latest_ts
            && (st.retained_bytes > self.retention.bytes_max
                || ts.saturating_sub(st.start_ts_ms) > self.retention.age_ms_max)
        {
            self.trim(&mut st, ts, &mut b)?;
        }
        let v = postcard::to_stdvec(&st).map_err(write_err)?;
        b.put_cf(store.cf(CF_SM), sm_key(group, TAG_APPLIED), v);
        // An entry committed by the other replicas may be applied before this one's syncer
        // has written it; its applied state waits for that write.
        if let Some(l) = st.last_applied {
            self.written.wait_written(l.index).await?;
        }
        // The batch is atomic and in one column family, so records and state never disagree.
        store.write_applied(b)?;
        let next = st.next_offset;
        // Before `next_offset` moves, so a reader that sees it finds the batches here or on disk.
        if !new_batches.is_empty() {
            let mut recent = self.reader.shared.recent.lock().expect("recent lock");
            for (first, v) in new_batches {
                recent.push(first, v);
            }
        }
        *self.reader.shared.applied.write().expect("applied lock") = st;
        if !meta_updates.is_empty() {
            let mut kv = self.reader.shared.meta_kv.write().expect("meta lock");
            let changed: Vec<String> = meta_updates.keys().cloned().collect();
            for (k, v) in meta_updates {
                match v {
                    Some(v) => kv.insert(k, v),
                    None => kv.remove(&k),
                };
            }
            drop(kv);
            let _ = self.reader.shared.meta_changes.send(Arc::new(changed));
        }
        self.reader.shared.next_offset_tx.send_replace(next);
        let mut replies: Vec<Option<Response>> = replies.into_iter().map(Some).collect();
        for (responder, i) in responders {
            responder.send(replies[i].take().unwrap_or_default());
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> io::Result<()> {
        let data = snapshot.into_inner();
        let payload: SnapshotPayload = postcard::from_bytes(&data).map_err(read_err)?;
        let group = self.group();
        let store = self.store().clone();
        let mut b = WriteBatch::default();
        b.delete_range_cf(store.cf(CF_SM), key(group, 0), key(group, u64::MAX));
        let kv_prefix = sm_key(group, TAG_META_KV);
        let mut kv_end = kv_prefix;
        kv_end[8] += 1;
        b.delete_range_cf(store.cf(CF_SM), kv_prefix, kv_end);
        let mut retained = 0u64;
        let mut start_ts_ms = 0;
        for (first, v) in &payload.batches {
            let h = batch::header(v).map_err(read_err)?;
            if retained == 0 {
                start_ts_ms = h.ts_ms;
            }
            b.put_cf(store.cf(CF_SM), key(group, *first), v);
            retained += v.len() as u64;
        }
        for (k, v) in &payload.meta_kv {
            let mut full = kv_prefix.to_vec();
            full.extend_from_slice(k.as_bytes());
            b.put_cf(store.cf(CF_SM), full, v);
        }
        let st = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            next_offset: payload.next_offset,
            start_offset: payload.start_offset,
            retained_bytes: retained,
            start_ts_ms,
        };
        b.put_cf(
            store.cf(CF_SM),
            sm_key(group, TAG_APPLIED),
            postcard::to_stdvec(&st).map_err(write_err)?,
        );
        let rec = SnapshotRecord {
            meta: meta.clone(),
            next_offset: payload.next_offset,
            meta_kv: payload.meta_kv.clone(),
        };
        b.put_cf(
            store.cf(CF_SM),
            sm_key(group, TAG_SNAPSHOT),
            postcard::to_stdvec(&rec).map_err(write_err)?,
        );
        store.write(b, true)?;
        let next = st.next_offset;
        // The batches applied after this one start at the snapshot's end; what is held now would
        // leave a gap.
        self.reader.shared.recent.lock().expect("recent lock").clear();
        *self.reader.shared.applied.write().expect("applied lock") = st;
        *self.reader.shared.meta_kv.write().expect("meta lock") = payload.meta_kv.into_iter().collect();
        // Anything may have changed.
        let _ = self.reader.shared.meta_changes.send(Arc::new(Vec::new()));
        self.reader.shared.next_offset_tx.send_replace(next);
        self.reader
            .shared
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let rec: Option<SnapshotRecord> = self.store().get(CF_SM, &sm_key(self.group(), TAG_SNAPSHOT))?;
        let Some(rec) = rec else { return Ok(None) };
        let data = self.snapshot_payload(&rec)?;
        Ok(Some(Snapshot {
            meta: rec.meta,
            snapshot: Cursor::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    fn batch_of(ts_ms: u64, n: usize, tag: &str) -> Bytes {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                key: Bytes::from(format!("{tag}-k{i}")),
                value: Bytes::from(format!("{tag}-v{i}")),
            })
            .collect();
        Bytes::from(batch::encode(ts_ms, &records))
    }

    /// Reads `from..next` (at most `max`) the way `SmReader::read` does from memory.
    fn read_recent(r: &RecentBatches, from: u64, next: u64, max: usize) -> Option<Vec<(u64, Bytes)>> {
        let mut out = Vec::new();
        for (first, v) in r.from(from)? {
            if *first >= next || push_records(&mut out, *first, v, from, next, max).unwrap() {
                break;
            }
        }
        Some(out.into_iter().map(|s| (s.offset, s.value)).collect())
    }

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: LogId {
                leader_id: openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 },
                index,
            },
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raft_log_left_in_rocksdb_moves_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A database as nodes before decision 0013 left it: group 5's entries in `raft_log`.
            let mut o = db_options();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            let db = DB::open_cf(&o, dir.path(), [CF_RAFT_LOG, CF_RAFT_STATE, CF_SM]).unwrap();
            let cf = db.cf_handle(CF_RAFT_LOG).unwrap();
            for i in 1..=3 {
                db.put_cf(cf, key(5, i), postcard::to_stdvec(&blank(i)).unwrap())
                    .unwrap();
            }
        }
        // Moved at the first open; the second finds them in the journal alone.
        for _ in 0..2 {
            let store = Store::open(dir.path()).unwrap();
            let mut log = store.log_store(5);
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
            let got = log.try_get_log_entries(1..4).await.unwrap();
            assert_eq!(
                got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
            let cf = store.db.cf_handle(CF_RAFT_LOG).unwrap();
            assert!(store.db.iterator_cf(cf, IteratorMode::Start).next().is_none());
            drop(log);
            store.close();
        }
    }

    #[test]
    fn recent_entries_keep_every_entry_not_yet_written() {
        let mut r = RecentEntries::default();
        let n = RecentEntries::ENTRIES_MAX as u64 + 10;
        // Nothing written yet: the cache grows past its bound rather than drop any of them.
        for i in 1..=n {
            r.push(blank(i), 10, 0);
        }
        assert_eq!(r.entries.len() as u64, n);
        assert!(r.get(1, n + 1).is_some());
        // Once written up to 5, only entries 1..=5 may go, and they do, oldest first.
        r.push(blank(n + 1), 10, 5);
        assert_eq!(r.entries.front().map(|(e, _)| e.log_id.index), Some(6));
        // Once everything is written, the bound holds again.
        r.push(blank(n + 2), 10, n + 2);
        assert_eq!(r.entries.len(), RecentEntries::ENTRIES_MAX);
        assert_eq!(r.entries.back().map(|(e, _)| e.log_id.index), Some(n + 2));
    }

    #[test]
    fn recent_batches_answer_reads_at_their_offsets() {
        let mut r = RecentBatches::default();
        // Batches of 3, 1 and 2 records at offsets 10, 13 and 14.
        r.push(10, batch_of(1, 3, "a"));
        r.push(13, batch_of(2, 1, "b"));
        r.push(14, batch_of(3, 2, "c"));
        // Before the first batch held: not answered from memory.
        assert!(read_recent(&r, 9, 16, 100).is_none());
        let all = read_recent(&r, 10, 16, 100).unwrap();
        let offsets: Vec<u64> = all.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![10, 11, 12, 13, 14, 15]);
        assert_eq!(all[4].1, Bytes::from("c-v0"));
        // From the middle of a batch, bounded by `max` and by `next`.
        let mid = read_recent(&r, 11, 16, 2).unwrap();
        assert_eq!(mid, vec![(11, Bytes::from("a-v1")), (12, Bytes::from("a-v2"))]);
        let upto = read_recent(&r, 12, 14, 100).unwrap();
        assert_eq!(upto.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![12, 13]);
        // Past the end: nothing.
        assert_eq!(read_recent(&r, 16, 16, 100).unwrap(), vec![]);
    }

    #[test]
    fn recent_batches_are_bounded_and_keep_the_newest() {
        let mut r = RecentBatches::default();
        for i in 0..(RECENT_BATCHES_MAX as u64 + 10) {
            r.push(i, batch_of(i, 1, "x"));
        }
        assert_eq!(r.batches.len(), RECENT_BATCHES_MAX);
        assert_eq!(r.batches.front().unwrap().0, 10);
        assert!(read_recent(&r, 9, 1000, 1).is_none());
        // One batch over the byte bound is still kept, alone.
        let big = Bytes::from(batch::encode(
            1,
            &[Record {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(vec![7u8; RECENT_BYTES_MAX + 1]),
            }],
        ));
        r.push(1000, big);
        assert_eq!(r.batches.len(), 1);
        assert_eq!(read_recent(&r, 1000, 1001, 10).unwrap().len(), 1);
        r.clear();
        assert!(read_recent(&r, 1000, 1001, 10).is_none());
        assert_eq!(r.bytes, 0);
    }
}
