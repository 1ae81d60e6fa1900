//! The Raft log of every group of a node, in segment files of our own (decision 0013).
//!
//! One journal takes the entries of all groups, so one write and one `fdatasync` make a round of
//! appends of every group durable (group commit across groups, as the RocksDB WAL did). The
//! journal is a sequence of segments; only the newest, the *head*, is written. A segment is a
//! file of [`SEGMENT_BYTES`] that was written with zeros before its first use, or that held an
//! older segment: `fdatasync` after overwriting blocks that are already written costs about half
//! of one after appending to a file or writing into `fallocate`d space on the disks measured
//! here (BENCHMARKS.md), and no file is created, grown or deleted on the write path.
//!
//! Layout of a segment:
//! - a 4 KiB header: magic, the segment's sequence number, CRC;
//! - records: `len u32 · crc u32 · kind u8 · group u32 · index u64 · payload`, little-endian,
//!   where `len` counts from `kind` on and the CRC covers the segment's sequence number and
//!   everything from `kind` on. A record left from a segment's earlier life fails its CRC, so
//!   reading a segment stops at the first record that is torn, zero or from an older life.
//!
//! Record kinds:
//! - `Entry`: a Raft entry at `index`. At an index the group already holds, it truncates the
//!   group's log from there first (openraft truncates before it overwrites; this keeps replay
//!   right even without that).
//! - `Copy`: an entry copied forward unchanged from an older segment, so that an idle group does
//!   not keep old segments alive; it replaces the entry in place and never truncates.
//! - `Truncate`: the group's log loses every entry at `index` and after.
//!
//! Purges are not in the journal: the purged log id is kept (synced) in RocksDB, and replay drops
//! what is at or below it. Segments are recycled oldest first, and only when no live entry
//! remains in them, so replaying what is left gives the same logs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::types::{Entry, GroupId};

/// Bytes of a segment: records go to the next one when a round would not fit.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"TRFTSEG1";
/// `len` and `crc`.
const FRAME: usize = 8;
/// `kind`, `group`, `index`.
const BODY_HEAD: usize = 13;
/// Spare segments kept ready; more recycled ones are deleted.
const SPARES_MAX: usize = 2;
/// A spare written with zeros is this small, and at most one is written per
/// `ZERO_SPARE_EVERY` (at most 16 MB/s of zeros): a node that writes little (1 in flight, tens
/// of thousands of messages a second) then always writes into pre-written blocks, while a node
/// that writes faster does not double its disk writes with zeros. It appends to empty spares
/// (the slower fsync) in between, until purges let it recycle full segments.
const ZERO_SPARE_BYTES: u64 = 4 << 20;
const ZERO_SPARE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// With more segments than this besides the head, the groups that pin the oldest are copied
/// forward if all of their live entries together take at most a quarter of a segment: copying
/// frees a whole segment for at most a quarter of its bytes, and never re-copies a busy log.
const COPY_SEGMENTS: usize = 4;
/// And at most this many bytes at one roll, and a quarter of the oldest segment's size: the copy
/// is made on the fsync thread, in the way of every partition's commits. Copying whole busy logs
/// of up to 16 MiB forward out of 4 MiB segments stalled every acknowledgement for 40–100 ms at
/// 50,000 msg/s (BENCHMARKS.md, 2026-11-28).
const COPY_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Entry = 1,
    Copy = 2,
    Truncate = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Kind::Entry),
            2 => Some(Kind::Copy),
            3 => Some(Kind::Truncate),
            _ => None,
        }
    }
}

/// Where an entry's record is: its segment, offset and length (frame included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    seg: u64,
    off: u64,
    len: u32,
}

/// One record to write.
#[derive(Debug)]
pub(crate) struct Rec {
    pub kind: Kind,
    pub group: GroupId,
    pub index: u64,
    pub payload: Vec<u8>,
}

impl Rec {
    fn size(&self) -> u64 {
        (FRAME + BODY_HEAD + self.payload.len()) as u64
    }
}

fn crc(seq: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(body);
    h.finalize()
}

fn encode(buf: &mut Vec<u8>, seq: u64, r: &Rec) {
    let start = buf.len();
    let body = BODY_HEAD + r.payload.len();
    buf.extend_from_slice(&(body as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(r.kind as u8);
    buf.extend_from_slice(&r.group.to_le_bytes());
    buf.extend_from_slice(&r.index.to_le_bytes());
    buf.extend_from_slice(&r.payload);
    let c = crc(seq, &buf[start + FRAME..]);
    buf[start + 4..start + FRAME].copy_from_slice(&c.to_le_bytes());
}

struct Decoded<'a> {
    kind: Kind,
    group: GroupId,
    index: u64,
    payload: &'a [u8],
    len: usize,
}

/// The record at the start of `buf`, if it is whole and of segment `seq`.
fn decode(seq: u64, buf: &[u8]) -> Option<Decoded<'_>> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    if len < BODY_HEAD {
        return None;
    }
    let want = u32::from_le_bytes(buf.get(4..FRAME)?.try_into().ok()?);
    let body = buf.get(FRAME..FRAME + len)?;
    if crc(seq, body) != want {
        return None;
    }
    Some(Decoded {
        kind: Kind::from_u8(body[0])?,
        group: GroupId::from_le_bytes(body[1..5].try_into().ok()?),
        index: u64::from_le_bytes(body[5..13].try_into().ok()?),
        payload: &body[BODY_HEAD..],
        len: FRAME + len,
    })
}

fn header(seq: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    let c = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    h
}

/// The sequence number in a segment's header, or `None` for a spare (or a torn header).
fn read_header(f: &File) -> io::Result<Option<u64>> {
    let mut h = [0u8; 20];
    match f.read_exact_at(&mut h, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let valid = &h[..8] == MAGIC && crc32fast::hash(&h[..16]).to_le_bytes() == h[16..20];
    Ok(valid.then(|| u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"))))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

// ---------------------------------------------------------------------------------------------
// Index

/// Where each entry of a group's log is: `locs[i]` holds entry `first + i`.
#[derive(Debug, Default)]
struct GroupLog {
    first: u64,
    locs: VecDeque<Loc>,
}

impl GroupLog {
    fn last(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64 - 1)
    }
}

#[derive(Debug)]
struct Seg {
    file: Arc<File>,
    path: PathBuf,
    /// Live entries in this segment, per group.
    live: HashMap<GroupId, u32>,
}

/// The logs of all groups and the segments that hold them.
#[derive(Debug, Default)]
struct Index {
    groups: HashMap<GroupId, GroupLog>,
    segs: BTreeMap<u64, Seg>,
}

impl Index {
    fn unpin(segs: &mut BTreeMap<u64, Seg>, group: GroupId, loc: Loc) {
        if let Some(s) = segs.get_mut(&loc.seg)
            && let Some(n) = s.live.get_mut(&group)
        {
            *n -= 1;
            if *n == 0 {
                s.live.remove(&group);
            }
        }
    }

    fn pin(segs: &mut BTreeMap<u64, Seg>, group: GroupId, loc: Loc) {
        if let Some(s) = segs.get_mut(&loc.seg) {
            *s.live.entry(group).or_default() += 1;
        }
    }

    fn put(&mut self, kind: Kind, group: GroupId, index: u64, loc: Loc) {
        let log = self.groups.entry(group).or_default();
        match (kind, log.last()) {
            (Kind::Truncate, _) => {
                Self::truncate_log(&mut self.segs, group, log, index);
                return;
            }
            // A copy of an entry purged since it was read: nothing to keep.
            (Kind::Copy, _) if index < log.first => return,
            (Kind::Copy, Some(last)) if index <= last => {
                let slot = &mut log.locs[(index - log.first) as usize];
                let old = std::mem::replace(slot, loc);
                Self::unpin(&mut self.segs, group, old);
                Self::pin(&mut self.segs, group, loc);
                return;
            }
            (_, Some(last)) if index == last + 1 => {}
            (Kind::Entry, Some(last)) if index >= log.first && index <= last => {
                Self::truncate_log(&mut self.segs, group, log, index);
            }
            // An empty log, or one the record does not continue: entries before a gap are
            // below the purged index (a snapshot was installed), so the log restarts here.
            _ => {
                Self::truncate_log(&mut self.segs, group, log, 0);
                log.first = index;
            }
        }
        log.locs.push_back(loc);
        Self::pin(&mut self.segs, group, loc);
    }

    fn truncate_log(segs: &mut BTreeMap<u64, Seg>, group: GroupId, log: &mut GroupLog, from: u64) {
        while let Some(last) = log.last()
            && last >= from
        {
            let loc = log.locs.pop_back().expect("non-empty");
            Self::unpin(segs, group, loc);
        }
    }

    fn purge(&mut self, group: GroupId, upto: u64) {
        let Some(log) = self.groups.get_mut(&group) else {
            return;
        };
        while log.first <= upto
            && let Some(loc) = log.locs.pop_front()
        {
            Self::unpin(&mut self.segs, group, loc);
            log.first += 1;
        }
        if log.locs.is_empty() {
            log.first = upto + 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Journal

/// A file ready to become the head: pre-written (zeros, or an older segment), or empty (its
/// directory entry already synced, so that the writer never creates a file itself).
#[derive(Debug)]
struct Spare {
    path: PathBuf,
    file: File,
    prewritten: bool,
}

/// The shared part of the journal: the index, read by every group's log store, and the spares.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    index: Mutex<Index>,
    spares: Mutex<Vec<Spare>>,
    next_file: AtomicU64,
    /// When the last spare of zeros was written.
    zeroed_at: Mutex<Option<std::time::Instant>>,
    head_seq: AtomicU64,
    wake: Condvar,
    wake_lock: Mutex<()>,
    stop: AtomicBool,
}

/// What `Journal::open` found: the journal, and the head to go on writing in.
pub(crate) struct Opened {
    pub journal: Arc<Journal>,
    pub writer: Writer,
}

impl Journal {
    /// Opens the journal in `dir`, replays every segment and drops what `purged` says is gone.
    pub fn open(dir: &Path, purged: &HashMap<GroupId, u64>, segment_bytes: u64) -> io::Result<Opened> {
        fs::create_dir_all(dir)?;
        let mut live = Vec::new();
        let mut spares = Vec::new();
        let mut next_file = 0u64;
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            let Some(n) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("seg-"))
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            next_file = next_file.max(n + 1);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            match read_header(&file)? {
                Some(seq) => live.push((seq, path, file)),
                None => {
                    let prewritten = file.metadata()?.len() > HEADER;
                    spares.push(Spare {
                        path,
                        file,
                        prewritten,
                    })
                }
            }
        }
        live.sort_by_key(|(seq, ..)| *seq);
        let mut index = Index::default();
        let mut head = None;
        for (seq, path, file) in live {
            let file = Arc::new(file);
            let len = file.metadata()?.len();
            let mut buf = vec![0u8; len.saturating_sub(HEADER) as usize];
            file.read_exact_at(&mut buf, HEADER)?;
            index.segs.insert(
                seq,
                Seg {
                    file: file.clone(),
                    path,
                    live: HashMap::new(),
                },
            );
            let mut pos = 0usize;
            while let Some(d) = decode(seq, &buf[pos..]) {
                let loc = Loc {
                    seg: seq,
                    off: HEADER + pos as u64,
                    len: d.len as u32,
                };
                index.put(d.kind, d.group, d.index, loc);
                pos += d.len;
            }
            // Pre-written space after the records: it was a spare (or a recycled segment).
            let off = HEADER + pos as u64;
            let prewritten = len > off;
            head = Some(Head {
                seq,
                file,
                off,
                cap: if prewritten { len } else { segment_bytes },
                prewritten,
            });
        }
        for (&group, &upto) in purged {
            index.purge(group, upto);
        }
        for (&group, log) in &index.groups {
            let want = purged.get(&group).map_or(0, |p| p + 1);
            if !log.locs.is_empty() && log.first > want.max(1) && log.first != want {
                return Err(io::Error::other(format!(
                    "raft log of group {group} starts at {} but its purged index says {want}",
                    log.first
                )));
            }
        }
        let journal = Arc::new(Journal {
            dir: dir.to_path_buf(),
            segment_bytes,
            head_seq: AtomicU64::new(head.as_ref().map_or(0, |h| h.seq)),
            index: Mutex::new(index),
            spares: Mutex::new(spares),
            next_file: AtomicU64::new(next_file),
            zeroed_at: Mutex::new(None),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        Ok(Opened {
            writer: Writer {
                journal: journal.clone(),
                head,
                failed: false,
            },
            journal,
        })
    }

    /// Index of the last entry of `group`, if it has any.
    pub fn last_index(&self, group: GroupId) -> Option<u64> {
        self.index
            .lock()
            .expect("journal index")
            .groups
            .get(&group)?
            .last()
    }

    /// The entry at `index` of `group`, if the journal holds it.
    pub fn entry(&self, group: GroupId, index: u64) -> io::Result<Option<Entry>> {
        Ok(self.entries(group, index, index + 1)?.pop())
    }

    /// The entries in `start..end` of `group` that the journal holds, in order (they are
    /// contiguous).
    pub fn entries(&self, group: GroupId, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        let reads: Vec<(u64, Loc, Arc<File>)> = {
            let idx = self.index.lock().expect("journal index");
            let Some(log) = idx.groups.get(&group) else {
                return Ok(Vec::new());
            };
            let Some(last) = log.last() else {
                return Ok(Vec::new());
            };
            let (from, to) = (start.max(log.first), end.min(last + 1));
            if from >= to {
                return Ok(Vec::new());
            }
            (from..to)
                .map(|i| {
                    let loc = log.locs[(i - log.first) as usize];
                    let file = idx.segs.get(&loc.seg).map(|s| s.file.clone());
                    file.map(|f| (i, loc, f))
                        .ok_or_else(|| io::Error::other(format!("segment {} of entry {i} is gone", loc.seg)))
                })
                .collect::<io::Result<_>>()?
        };
        let mut out = Vec::with_capacity(reads.len());
        let mut buf = Vec::new();
        for (i, loc, file) in reads {
            buf.resize(loc.len as usize, 0);
            file.read_exact_at(&mut buf, loc.off)?;
            let d = decode(loc.seg, &buf)
                .filter(|d| d.group == group && d.index == i)
                .ok_or_else(|| io::Error::other(format!("entry {i} of group {group} was overwritten")))?;
            let entry: Entry = postcard::from_bytes(d.payload).map_err(io::Error::other)?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Drops the entries of `group` up to `upto`: its purged index must already be durable, since
    /// the segments they free are recycled.
    pub fn purge(&self, group: GroupId, upto: u64) {
        self.index.lock().expect("journal index").purge(group, upto);
        self.wake();
    }

    fn wake(&self) {
        let _g = self.wake_lock.lock().expect("wake lock");
        self.wake.notify_one();
    }

    /// Stops the preparer thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake();
    }

    fn new_file(&self) -> io::Result<(PathBuf, File)> {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("seg-{n:08}.log"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Runs on its own thread, every `ZERO_SPARE_EVERY` or when the writer has taken a spare
    /// (or a purge freed entries): recycles segments nothing lives in any more, and keeps a
    /// spare ready (`prepare`).
    pub fn run_preparer(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.recycle().and_then(|()| self.prepare()) {
                tracing::warn!(error = %e, "preparing raft log segments");
            }
            let g = self.wake_lock.lock().expect("wake lock");
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let _ = self.wake.wait_timeout(g, ZERO_SPARE_EVERY).expect("wake lock");
        }
    }

    /// Recycles the oldest segments while nothing lives in them.
    fn recycle(&self) -> io::Result<()> {
        loop {
            let seg = {
                let mut idx = self.index.lock().expect("journal index");
                let head = self.head_seq.load(Ordering::Acquire);
                let Some((&seq, s)) = idx.segs.first_key_value() else {
                    return Ok(());
                };
                if seq >= head || !s.live.is_empty() {
                    return Ok(());
                }
                idx.segs.remove(&seq).expect("present")
            };
            // Readers that still hold the file find records of the old sequence failing their
            // CRC once it is rewritten; they only ever ask for entries that were live.
            seg.file.write_all_at(&[0u8; HEADER as usize], 0)?;
            seg.file.sync_data()?;
            let file = Arc::try_unwrap(seg.file).or_else(|f| f.try_clone());
            let mut spares = self.spares.lock().expect("spares");
            if spares.len() < SPARES_MAX {
                spares.push(Spare {
                    path: seg.path,
                    file: file?,
                    prewritten: true,
                });
            } else {
                drop(spares);
                fs::remove_file(&seg.path)?;
            }
        }
    }

    /// Keeps a spare ready: an empty file whenever there is no spare at all, and a small one of
    /// zeros when there is no pre-written one (at most one per `ZERO_SPARE_EVERY`).
    fn prepare(&self) -> io::Result<()> {
        let (any, prewritten) = {
            let spares = self.spares.lock().expect("spares");
            (!spares.is_empty(), spares.iter().any(|s| s.prewritten))
        };
        if !any {
            let (path, file) = self.new_file()?;
            sync_dir(&self.dir)?;
            self.spares.lock().expect("spares").push(Spare {
                path,
                file,
                prewritten: false,
            });
        }
        if prewritten
            || self
                .zeroed_at
                .lock()
                .expect("zeroed at")
                .is_some_and(|t| t.elapsed() < ZERO_SPARE_EVERY)
        {
            return Ok(());
        }
        *self.zeroed_at.lock().expect("zeroed at") = Some(std::time::Instant::now());
        let size = ZERO_SPARE_BYTES.min(self.segment_bytes);
        let (path, file) = self.new_file()?;
        // In steps of 1 MiB, each synced, with a pause between: the fsync thread's small writes
        // never queue behind tens of MiB of zeros.
        let zeros = vec![0u8; (1 << 20).min(size as usize)];
        let mut off = 0;
        while off < size {
            if self.stop.load(Ordering::Relaxed) {
                drop(file);
                return fs::remove_file(&path);
            }
            let n = zeros.len().min((size - off) as usize);
            file.write_all_at(&zeros[..n], off)?;
            file.sync_data()?;
            off += n as u64;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.spares.lock().expect("spares").push(Spare {
            path,
            file,
            prewritten: true,
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

#[derive(Debug)]
struct Head {
    seq: u64,
    file: Arc<File>,
    off: u64,
    /// Where a round no longer fits: the pre-written length, or the nominal segment size.
    cap: u64,
    /// Whether the file was written in full before (zeros or an older segment): appending to a
    /// file that is not costs a slower fsync, so the writer moves on as soon as a spare is ready.
    prewritten: bool,
}

/// The only writer of the journal: the fsync thread.
#[derive(Debug)]
pub(crate) struct Writer {
    journal: Arc<Journal>,
    head: Option<Head>,
    failed: bool,
}

impl Writer {
    /// Writes `recs` in order, makes them durable, and indexes them. After a failed write or
    /// fsync the writer refuses all further writes: what reached the disk is unknown.
    pub fn write(&mut self, recs: &[Rec]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other("an earlier write of the raft log failed"));
        }
        let r = self.write_inner(recs);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn write_inner(&mut self, recs: &[Rec]) -> io::Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let need: u64 = recs.iter().map(Rec::size).sum();
        let roll = match &self.head {
            None => true,
            Some(h) => {
                let full = h.off > HEADER && h.off + need > h.cap;
                full || (!h.prewritten
                    && self
                        .journal
                        .spares
                        .lock()
                        .expect("spares")
                        .iter()
                        .any(|s| s.prewritten))
            }
        };
        let mut copies = Vec::new();
        let mut new_file = false;
        if roll {
            new_file = self.roll()?;
            copies = self.copies_forward();
        }
        let head = self.head.as_mut().expect("a head after roll");
        let mut buf = Vec::with_capacity((need + HEADER) as usize);
        let start = if head.off == HEADER {
            buf.extend_from_slice(&header(head.seq));
            0
        } else {
            head.off
        };
        let mut locs = Vec::with_capacity(recs.len() + copies.len());
        for r in copies.iter().chain(recs) {
            let off = start + buf.len() as u64;
            encode(&mut buf, head.seq, r);
            locs.push(Loc {
                seg: head.seq,
                off,
                len: (start + buf.len() as u64 - off) as u32,
            });
        }
        head.file.write_all_at(&buf, start)?;
        head.file.sync_data()?;
        if new_file {
            // A file created here: its name must be durable too.
            head.file.sync_all()?;
            sync_dir(&self.journal.dir)?;
        }
        head.off = start + buf.len() as u64;
        if head.off > head.cap {
            // A round larger than a segment grew the file: its fsyncs are of the slow kind.
            head.prewritten = false;
        }
        let mut idx = self.journal.index.lock().expect("journal index");
        for (r, loc) in copies.iter().chain(recs).zip(locs) {
            idx.put(r.kind, r.group, r.index, loc);
        }
        drop(idx);
        if roll {
            // A spare was taken, and copies may have freed the oldest segment. Otherwise the
            // preparer runs on its own clock: a wake-up per round would cost a context switch
            // per fsync at high rates.
            self.journal.wake();
        }
        Ok(())
    }

    /// Starts a new head: a spare if one is ready, else a new file. Returns whether the file is
    /// new (its directory entry still to be synced).
    fn roll(&mut self) -> io::Result<bool> {
        // A pre-written spare if there is one, else an empty one, else a file made here.
        let spare = {
            let mut spares = self.journal.spares.lock().expect("spares");
            let i = spares
                .iter()
                .position(|s| s.prewritten)
                .or(spares.len().checked_sub(1));
            i.map(|i| spares.swap_remove(i))
        };
        let mut made_here = false;
        let (path, file, prewritten) = match spare {
            Some(s) => (s.path, s.file, s.prewritten),
            None => {
                let (p, f) = self.journal.new_file()?;
                made_here = true;
                (p, f, false)
            }
        };
        let cap = if prewritten {
            file.metadata()?.len().max(HEADER + 1)
        } else {
            self.journal.segment_bytes
        };
        let seq = self.head.as_ref().map_or(0, |h| h.seq) + 1;
        let file = Arc::new(file);
        self.journal.index.lock().expect("journal index").segs.insert(
            seq,
            Seg {
                file: file.clone(),
                path,
                live: HashMap::new(),
            },
        );
        self.journal.head_seq.store(seq, Ordering::Release);
        self.head = Some(Head {
            seq,
            file,
            off: HEADER,
            cap,
            prewritten,
        });
        Ok(made_here)
    }

    /// Copies of the live entries of groups that keep the oldest segment alive, when there are
    /// many segments and those groups' logs are small: an idle group's few entries would
    /// otherwise keep every later segment.
    ///
    /// Copies only save disk, so a read that fails (a purge freed and recycled the segment since
    /// the plan) skips that group instead of failing the write.
    fn copies_forward(&self) -> Vec<Rec> {
        let plan: Vec<(GroupId, u64, u64, u64)> = {
            let idx = self.journal.index.lock().expect("journal index");
            if idx.segs.len().saturating_sub(1) <= COPY_SEGMENTS {
                return Vec::new();
            }
            let Some((_, oldest)) = idx.segs.first_key_value() else {
                return Vec::new();
            };
            let plan: Vec<_> = oldest
                .live
                .keys()
                .filter_map(|g| {
                    let log = idx.groups.get(g)?;
                    let last = log.last()?;
                    let bytes: u64 = log.locs.iter().map(|l| u64::from(l.len)).sum();
                    Some((*g, log.first, last, bytes))
                })
                .collect();
            let oldest_bytes = oldest.file.metadata().map_or(u64::MAX, |m| m.len());
            let budget = (self.journal.segment_bytes.min(oldest_bytes) / 4).min(COPY_BYTES_MAX);
            if plan.iter().map(|p| p.3).sum::<u64>() > budget {
                return Vec::new();
            }
            plan
        };
        let mut out = Vec::new();
        for (group, first, last, bytes) in plan {
            tracing::debug!(group, first, last, bytes, "copying a group's raft log forward");
            let entries = match self.journal.entries(group, first, last + 1) {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(group, error = %e, "not copied forward");
                    continue;
                }
            };
            // A purge since the plan may have dropped the first few: each copy names its own.
            for e in entries {
                if let Ok(payload) = postcard::to_stdvec(&e) {
                    out.push(Rec {
                        kind: Kind::Copy,
                        group,
                        index: e.log_id.index,
                        payload,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LogId;
    use openraft::EntryPayload;

    fn entry(term: u64, index: u64) -> Vec<u8> {
        entry_with(term, index, EntryPayload::Blank)
    }

    fn entry_with(
        term: u64,
        index: u64,
        payload: <crate::types::TypeConfig as openraft::RaftTypeConfig>::Payload,
    ) -> Vec<u8> {
        let e = Entry {
            log_id: LogId {
                leader_id: openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 },
                index,
            },
            payload,
        };
        postcard::to_stdvec(&e).unwrap()
    }

    /// Opens the journal in `dir` with segments of `size` bytes and these purged indexes.
    fn open(dir: &tempfile::TempDir, purged: &[(GroupId, u64)], size: u64) -> Opened {
        Journal::open(dir.path(), &purged.iter().copied().collect(), size).unwrap()
    }

    fn rec(kind: Kind, group: GroupId, index: u64, term: u64) -> Rec {
        let payload = if kind == Kind::Truncate {
            Vec::new()
        } else {
            entry(term, index)
        };
        Rec {
            kind,
            group,
            index,
            payload,
        }
    }

    fn terms(j: &Journal, group: GroupId) -> Vec<(u64, u64)> {
        let idx = j.index.lock().unwrap();
        let Some(log) = idx.groups.get(&group) else {
            return Vec::new();
        };
        let (first, last) = (log.first, log.last());
        drop(idx);
        let Some(last) = last else { return Vec::new() };
        j.entries(group, first, last + 1)
            .unwrap()
            .into_iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    #[test]
    fn replay_gives_the_logs_that_were_written() {
        let dir = tempfile::tempdir().unwrap();
        let purged = [(2, 1)];
        {
            let mut o = open(&dir, &[], SEGMENT_BYTES);
            let w = &mut o.writer;
            w.write(&[rec(Kind::Entry, 1, 1, 1), rec(Kind::Entry, 2, 1, 1)])
                .unwrap();
            w.write(&[
                rec(Kind::Entry, 1, 2, 1),
                rec(Kind::Entry, 1, 3, 1),
                rec(Kind::Entry, 2, 2, 1),
            ])
            .unwrap();
            // A new leader overwrites 2..: explicit truncation, then an overwrite without one.
            w.write(&[
                rec(Kind::Truncate, 1, 2, 0),
                rec(Kind::Entry, 1, 2, 2),
                rec(Kind::Entry, 1, 3, 2),
            ])
            .unwrap();
            w.write(&[rec(Kind::Entry, 1, 3, 3), rec(Kind::Copy, 2, 2, 1)])
                .unwrap();
            assert_eq!(terms(&o.journal, 1), vec![(1, 1), (2, 2), (3, 3)]);
        }
        let o = open(&dir, &purged, SEGMENT_BYTES);
        assert_eq!(terms(&o.journal, 1), vec![(1, 1), (2, 2), (3, 3)]);
        assert_eq!(terms(&o.journal, 2), vec![(2, 1)]);
    }

    #[test]
    fn a_torn_tail_ends_the_log_and_writing_goes_on_after_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut o = open(&dir, &[], SEGMENT_BYTES);
            o.writer
                .write(&[rec(Kind::Entry, 1, 1, 1), rec(Kind::Entry, 1, 2, 1)])
                .unwrap();
        }
        let path = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let len = fs::metadata(&path).unwrap().len();
        // Tear the last record: cut its last byte.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let mut o = open(&dir, &[], SEGMENT_BYTES);
        assert_eq!(terms(&o.journal, 1), vec![(1, 1)]);
        o.writer.write(&[rec(Kind::Entry, 1, 2, 2)]).unwrap();
        drop(o);
        let o = open(&dir, &[], SEGMENT_BYTES);
        assert_eq!(terms(&o.journal, 1), vec![(1, 1), (2, 2)]);
    }

    #[test]
    fn records_of_a_recycled_segments_earlier_life_are_not_replayed() {
        let (dir, small) = (tempfile::tempdir().unwrap(), HEADER + 60);
        let mut o = open(&dir, &[], small);
        o.writer
            .write(&[rec(Kind::Entry, 1, 1, 1), rec(Kind::Entry, 1, 2, 1)])
            .unwrap();
        // Does not fit: a second segment, in a new file.
        o.writer.write(&[rec(Kind::Entry, 1, 3, 1)]).unwrap();
        assert_eq!(o.journal.index.lock().unwrap().segs.len(), 2);
        // Entries 1 and 2 purged: the first segment is recycled into a spare...
        o.journal.purge(1, 2);
        o.journal.recycle().unwrap();
        assert_eq!(o.journal.spares.lock().unwrap().len(), 1);
        // ... which the next write moves to (the head was not pre-written), over the old records.
        o.writer.write(&[rec(Kind::Entry, 1, 4, 2)]).unwrap();
        assert!(o.journal.spares.lock().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        drop(o);
        let o = open(&dir, &[(1, 2)], small);
        assert_eq!(terms(&o.journal, 1), vec![(3, 1), (4, 2)]);
    }

    /// An entry of `group` at `index` carrying `bytes` of records.
    fn big(group: GroupId, index: u64, bytes: usize) -> Rec {
        let batch = vec![7u8; bytes].into();
        Rec {
            kind: Kind::Entry,
            group,
            index,
            payload: entry_with(
                1,
                index,
                EntryPayload::Normal(crate::types::Command::Append { batch }),
            ),
        }
    }

    #[test]
    fn a_log_over_the_copy_bound_is_not_copied_forward() {
        // Segments of 8 MiB: a quarter of one (2 MiB) is more than `COPY_BYTES_MAX` (1 MiB).
        let (dir, size) = (tempfile::tempdir().unwrap(), 8 << 20);
        let mut o = open(&dir, &[], size);
        // Group 2 writes 1.5 MiB and keeps it; group 1 writes on and purges behind itself.
        for i in 1..=3 {
            o.writer.write(&[big(2, i, 512 << 10)]).unwrap();
        }
        for i in 1..=48 {
            o.writer.write(&[big(1, i, 1 << 20)]).unwrap();
            if i > 1 {
                o.journal.purge(1, i - 1);
            }
            o.journal.recycle().unwrap();
        }
        let idx = o.journal.index.lock().unwrap();
        assert!(idx.segs.len() > COPY_SEGMENTS + 1, "{} segments", idx.segs.len());
        // Group 2's entries were never copied: they are still in the oldest segment.
        let oldest = *idx.segs.keys().next().unwrap();
        let segs: Vec<u64> = idx.groups[&2].locs.iter().map(|l| l.seg).collect();
        assert_eq!(segs, vec![oldest; 3]);
    }

    #[test]
    fn an_idle_group_is_copied_forward_and_old_segments_are_recycled() {
        let (dir, small) = (tempfile::tempdir().unwrap(), HEADER + 60);
        let mut o = open(&dir, &[], small);
        // Group 2 writes once and then stays idle; group 1 writes on and purges behind itself.
        o.writer.write(&[rec(Kind::Entry, 2, 1, 1)]).unwrap();
        for i in 1..40 {
            o.writer.write(&[rec(Kind::Entry, 1, i, 1)]).unwrap();
            if i > 1 {
                o.journal.purge(1, i - 1);
            }
            o.journal.recycle().unwrap();
        }
        let segs = o.journal.index.lock().unwrap().segs.len();
        assert!(segs <= COPY_SEGMENTS + 2, "{segs} segments live");
        drop(o);
        let o = open(&dir, &[(1, 38)], small);
        assert_eq!(terms(&o.journal, 2), vec![(1, 1)]);
        assert_eq!(o.journal.last_index(1), Some(39));
    }
}
