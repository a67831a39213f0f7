//! The spool's disk tier: checksummed segment files in `--spool-dir`.
//!
//! Records spill from the memory tier's head to the tail of the active (write) segment; the
//! reader loads the oldest sealed segment whole and hands its records back in order. A
//! segment is deleted once every record read from it is settled (acknowledged by Kafka,
//! failed, or dropped and counted), so after `kill -9` anything not yet settled is still on
//! disk and is produced again by the next process: delivery is at-least-once around a crash.
//!
//! Durability: records are written with `write(2)` in the drain iteration in which they
//! spill, so a process crash loses nothing that reached the disk tier. Power loss can lose what
//! the kernel had not written back: `--spool-fsync always` syncs each write (on the drain
//! thread), `--spool-fsync 1s` (the default) syncs from a helper thread once per interval, and
//! `never` leaves it to the kernel. New segment files also sync their directory entry.
//!
//! Files: `seg-<id, 16 hex digits>.spool`; a corrupt segment is renamed `*.spool.corrupt` once
//! its readable part is settled; `LOCK` (an `flock`) keeps two processes off one directory;
//! `seg-<id>.cursor` (16 bytes) says where the next process resumes reading a segment a clean
//! shutdown left half read (see [`DiskTier::consume_read`]). Anything else in the directory is
//! counted as foreign and left alone.
//!
//! A clean shutdown repeats nothing: every record already read from disk is then either
//! settled or rewritten into the shutdown's prefix segment, so the segments read are deleted
//! and the one being read resumes after its cursor. Not while an earlier process's segments
//! are being recovered, nor when the disk has no room for the prefix: then, as after a crash,
//! segments are replayed whole (at-least-once).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::segment::{self, Corrupt, Frame, Frames, Header, RecordMeta, HEADER_LEN};
use crate::events::{EndKind, StreamIds, TerminalInfo};
use crate::log_limit::LogLimiter;
use crate::metrics::{CorruptReason, DiskOp, DropReason, LogSite, Metrics};
use crate::sink::record::{Kind, SpoolRecord, FLAG_PLAYBACK};
use crate::sink::stream::StreamEntry;
use crate::sink::Topics;

/// When segment writes are made durable against power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Never: the kernel writes back on its own schedule (a process crash still loses
    /// nothing written).
    Never,
    /// After every write, on the drain thread.
    Always,
    /// Once per interval, from a helper thread.
    Every(Duration),
}

impl FsyncPolicy {
    /// Parses `always`, `never`, or an interval (`1s`, `250ms`).
    pub fn parse(s: &str) -> Option<FsyncPolicy> {
        match s {
            "always" => Some(FsyncPolicy::Always),
            "never" => Some(FsyncPolicy::Never),
            other => crate::config::parse_duration(other)
                .ok()
                .filter(|d| !d.is_zero())
                .map(FsyncPolicy::Every),
        }
    }

    /// The flag value.
    pub fn describe(self) -> String {
        match self {
            FsyncPolicy::Never => "never".into(),
            FsyncPolicy::Always => "always".into(),
            FsyncPolicy::Every(d) => format!("{}ms", d.as_millis()),
        }
    }
}

/// Settings of the disk tier.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// `--spool-dir`.
    pub dir: PathBuf,
    /// `--spool-max-bytes`: segment files never exceed it together.
    pub max_bytes: u64,
    /// Size at which a segment is sealed and the next one started.
    pub segment_bytes: u64,
    /// `--spool-fsync`.
    pub fsync: FsyncPolicy,
}

impl DiskConfig {
    /// Segment size for a disk limit: 8 MiB, or an eighth of a small limit (at least 64 KiB).
    pub fn segment_bytes_for(max_bytes: u64) -> u64 {
        (max_bytes / 8).clamp(64 << 10, 8 << 20)
    }
}

/// Errors opening the spool directory (start-up; the gateway exits with them).
#[derive(Debug, Error)]
pub enum SpoolError {
    /// The directory cannot be created, listed or locked.
    #[error("spool directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: String,
        /// The failure.
        source: std::io::Error,
    },
    /// Another process holds the directory's lock.
    #[error("spool directory {0} is in use by another process (its LOCK is held)")]
    Locked(String),
}

static DISK_ERROR_LOG: LogLimiter = LogLimiter::new(LogSite::Spool, 10, 10_000);

/// One segment file in use.
#[derive(Debug)]
struct SegmentState {
    path: PathBuf,
    bytes: u64,
    /// Records read from it and not yet settled.
    outstanding: u64,
    /// Every record in it was read (or the rest was skipped).
    read: bool,
    /// The rest was skipped as corrupt: moved aside instead of deleted.
    corrupt: bool,
    /// Written by an earlier process.
    recovered: bool,
    /// Records written by this process and not read yet.
    unread_records: u64,
    /// Receive time of its first record (this process's segments), unix µs.
    first_us: u64,
    /// Records before this offset were handled by an earlier process that shut down cleanly
    /// (its cursor file); 0: none.
    skip_to: usize,
}

/// The active segment.
struct Writer {
    id: u64,
    file: Arc<File>,
    /// Bytes known to be in the file.
    bytes: u64,
    /// Streams whose descriptor is in this segment.
    described: HashSet<u64>,
}

/// The segment being read, loaded whole.
struct Reading {
    id: u64,
    buf: Vec<u8>,
    at: usize,
    epoch: u64,
    recovered: bool,
    /// Writer's slot → this configuration's slot (`u8::MAX`: unroutable).
    slot_map: Vec<u8>,
    /// Streams of this segment with an entry (this process's, or recovered ones that have
    /// records to replay).
    streams: HashMap<u64, Arc<StreamEntry>>,
    /// Streams described by an earlier process: an entry is made when a record of theirs is
    /// replayed, so a stream whose records all lie before the cursor is not recovered.
    described: HashMap<u64, StreamIds>,
    /// Records before this offset are skipped (the segment's cursor).
    skip_to: usize,
}

/// A reading's epoch, stream entries and descriptors.
type ReadingStreams<'a> = (
    u64,
    &'a mut HashMap<u64, Arc<StreamEntry>>,
    &'a HashMap<u64, StreamIds>,
);

/// A stream of this process with records on disk: the tier holds its entry while they are.
struct OwnStream {
    entry: Arc<StreamEntry>,
    on_disk: u64,
}

/// A stream an earlier process spooled.
struct RecoveredStream {
    entry: Arc<StreamEntry>,
    /// Its terminal record was recovered.
    terminal: bool,
    /// Its counters were recovered (else the counts are what the spool held).
    counters: bool,
    /// The latest snapshot applied (field by field, the highest seen).
    applied: segment::Counters,
}

/// Records the helper thread syncs (`--spool-fsync <interval>`).
struct Syncer {
    dirty: Mutex<Vec<Arc<File>>>,
    dir_dirty: AtomicBool,
    stop: AtomicBool,
}

/// Numbers given to recovered streams (far from this process's own numbering).
const RECOVERED_NUMBERS: u64 = 1 << 62;

/// The disk tier; see the module docs.
pub struct DiskTier {
    cfg: DiskConfig,
    metrics: Arc<Metrics>,
    epoch: u64,
    next_id: u64,
    _lock: File,
    dir_file: Option<Arc<File>>,
    segments: BTreeMap<u64, SegmentState>,
    /// Sealed segments not yet read, oldest first.
    unread: VecDeque<u64>,
    writer: Option<Writer>,
    reading: Option<Reading>,
    bytes: u64,
    /// Records of this process on disk and not read yet.
    records: u64,
    own: HashMap<u64, OwnStream>,
    /// Streams of earlier processes, by (epoch, number): two connections that presented the
    /// same SIDs stay two streams.
    recovered: HashMap<(u64, u64), RecoveredStream>,
    /// Recovered segments not read yet (synthesised terminals wait for them).
    recovered_left: usize,
    next_recovered: u64,
    /// Slot → topic name of this configuration.
    topic_names: Vec<String>,
    wbuf: Vec<u8>,
    /// No spill before this instant (after a write error).
    blocked_until: Option<Instant>,
    /// The last spill found no room (counts transitions into "full").
    full: bool,
    syncer: Option<Arc<Syncer>>,
    sync_thread: Option<std::thread::JoinHandle<()>>,
    /// Synthesised terminal records waiting to be handed out.
    out: VecDeque<SpoolRecord>,
    /// Writing a prefix segment (no size limit per segment; see [`Self::write_prefix`]).
    prefix: bool,
    /// Segments the last [`Self::write_prefix`] created.
    prefix_ids: Vec<u64>,
}

/// Lowest segment id taken from a directory listing: 0 is no segment
/// ([`super::Ticket::MEMORY`]); a gateway never gets near it (it starts at [`FIRST_ID`] and
/// prefix segments take ids below the lowest in use, never below this one), so a lower one
/// is a foreign file.
pub(super) const MIN_ID: u64 = 1;

/// Id of the first segment of an empty directory: prefix segments (written at shutdown,
/// read before everything else) take ids below the lowest one in use.
const FIRST_ID: u64 = 1 << 40;

fn random_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::unix_micros());
    h.write_u32(std::process::id());
    h.finish() | 1
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:016x}.spool")
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    parse_id(name.strip_prefix("seg-")?.strip_suffix(".spool")?)
}

fn parse_id(hex: &str) -> Option<u64> {
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

pub(super) fn cursor_name(id: u64) -> String {
    format!("seg-{id:016x}.cursor")
}

pub(super) fn parse_cursor_name(name: &str) -> Option<u64> {
    parse_id(name.strip_prefix("seg-")?.strip_suffix(".cursor")?)
}

/// Check word of a cursor file (its offset XOR this): a torn or foreign file is not believed.
pub(super) const CURSOR_CHECK: u64 = 0x5350_4f4f_4c43_5552;

/// The offset a cursor file holds, if it is well formed.
pub(super) fn read_cursor(path: &Path) -> Option<u64> {
    let b = std::fs::read(path).ok()?;
    let b: [u8; 16] = b.as_slice().try_into().ok()?;
    let at = u64::from_le_bytes(b[..8].try_into().ok()?);
    let check = u64::from_le_bytes(b[8..].try_into().ok()?);
    (check == at ^ CURSOR_CHECK).then_some(at)
}

fn dir_error(dir: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Dir {
        dir: dir.display().to_string(),
        source,
    }
}

impl DiskTier {
    /// Opens (creating it if needed) and locks the spool directory and lists what an earlier
    /// process left there; those segments are read before anything this process spills.
    pub fn open(
        cfg: DiskConfig,
        topics: &Topics,
        metrics: Arc<Metrics>,
    ) -> Result<DiskTier, SpoolError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| dir_error(&dir, e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| dir_error(&dir, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            return Err(SpoolError::Locked(dir.display().to_string()));
        }
        let dir_file = File::open(&dir).ok().map(Arc::new);
        let mut segments = BTreeMap::new();
        let mut bytes = 0;
        let mut foreign = Vec::new();
        let mut quarantined = 0;
        let mut cursors = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| dir_error(&dir, e))? {
            let entry = entry.map_err(|e| dir_error(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "LOCK" {
                continue;
            }
            if let Some(id) = parse_segment_name(&name).filter(|id| *id >= MIN_ID) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                bytes += len;
                segments.insert(
                    id,
                    SegmentState {
                        path: entry.path(),
                        bytes: len,
                        outstanding: 0,
                        read: false,
                        corrupt: false,
                        recovered: true,
                        unread_records: 0,
                        first_us: 0,
                        skip_to: 0,
                    },
                );
            } else if name.ends_with(".spool.corrupt") {
                quarantined += 1;
            } else if let Some(id) = parse_cursor_name(&name) {
                cursors.push((id, entry.path()));
            } else {
                foreign.push(name);
            }
        }
        for (id, path) in cursors {
            match (segments.get_mut(&id), read_cursor(&path)) {
                (Some(seg), Some(at)) if at >= HEADER_LEN as u64 && at <= seg.bytes => {
                    seg.skip_to = at as usize;
                }
                (seg, _) => {
                    if seg.is_some() {
                        // Replaying the whole segment can duplicate, never lose.
                        tracing::warn!(path = %path.display(), "unreadable spool cursor: its segment is replayed whole");
                    }
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if !foreign.is_empty() {
            tracing::warn!(dir = %dir.display(), files = ?foreign.iter().take(5).collect::<Vec<_>>(), count = foreign.len(), "files in the spool directory that are not spool segments: ignored");
        }
        let next_id = segments.keys().next_back().map_or(FIRST_ID, |id| id + 1);
        let unread: VecDeque<u64> = segments.keys().copied().collect();
        if !unread.is_empty() {
            tracing::warn!(dir = %dir.display(), segments = unread.len(), bytes, "spool holds records from an earlier process: they are produced before new ones");
        }
        let m = &metrics.spool;
        m.foreign_files.set(foreign.len() as i64);
        m.quarantined.set(quarantined);
        m.max_bytes.set(cfg.max_bytes as i64);
        let (syncer, sync_thread) = match cfg.fsync {
            FsyncPolicy::Every(interval) => {
                let s = Arc::new(Syncer {
                    dirty: Mutex::new(Vec::new()),
                    dir_dirty: AtomicBool::new(false),
                    stop: AtomicBool::new(false),
                });
                let (s2, dir2, m2) = (s.clone(), dir_file.clone(), metrics.clone());
                let t = std::thread::Builder::new()
                    .name("spool-fsync".into())
                    .spawn(move || sync_loop(&s2, dir2.as_deref(), &m2, interval))
                    .map_err(|e| dir_error(&dir, e))?;
                (Some(s), Some(t))
            }
            _ => (None, None),
        };
        let recovered_left = unread.len();
        let tier = DiskTier {
            cfg,
            metrics,
            epoch: random_epoch(),
            next_id,
            _lock: lock,
            dir_file,
            segments,
            unread,
            writer: None,
            reading: None,
            bytes,
            records: 0,
            own: HashMap::new(),
            recovered: HashMap::new(),
            recovered_left,
            next_recovered: RECOVERED_NUMBERS,
            topic_names: topics.names(),
            wbuf: Vec::with_capacity(256 << 10),
            blocked_until: None,
            full: false,
            syncer,
            sync_thread,
            out: VecDeque::new(),
            prefix: false,
            prefix_ids: Vec::new(),
        };
        tier.publish();
        Ok(tier)
    }

    /// Nothing to read: no unread segment, no records in the active one, nothing pending.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
            && self.reading.is_none()
            && self.unread.is_empty()
            && self.records == 0
            && self.recovered_left == 0
            && self.recovered.is_empty()
    }

    /// Bytes of segment files in use.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `--spool-max-bytes`.
    pub fn max_bytes(&self) -> u64 {
        self.cfg.max_bytes
    }

    /// Receive time of the oldest record on disk, when known (unix µs).
    pub fn oldest_us(&self) -> Option<u64> {
        self.segments
            .values()
            .find(|s| !s.read && s.first_us > 0)
            .map(|s| s.first_us)
    }

    /// Writes records from the front of `queue` to the disk tier, at most `max` of them, and
    /// returns how many are now in a segment file (the caller removes that many from the
    /// front). Stops early when the tier is full or a write fails (counted, and retried after
    /// a second); records not written stay where they are.
    pub fn spill(&mut self, queue: &VecDeque<SpoolRecord>, max: usize) -> usize {
        if let Some(t) = self.blocked_until {
            if Instant::now() < t {
                return 0;
            }
            self.blocked_until = None;
        }
        let mut done = 0;
        while done < max.min(queue.len()) {
            if self.writer.is_none() && !self.start_segment() {
                break;
            }
            let (n, full) = self.stage(queue.range(done..max.min(queue.len())));
            if n > 0 {
                if !self.commit(queue.range(done..done + n)) {
                    break;
                }
                done += n;
            }
            if full {
                if !self.full {
                    self.full = true;
                    self.metrics.spool.full.inc();
                    tracing::warn!(
                        bytes = self.bytes,
                        max = self.cfg.max_bytes,
                        "spool disk tier full: records stay in memory (overflow policy applies when that is full too)"
                    );
                }
                break;
            }
            self.full = false;
            if !self.prefix && (n == 0 || self.writer_bytes() >= self.cfg.segment_bytes) {
                self.seal();
            }
        }
        self.publish();
        done
    }

    fn writer_bytes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.bytes)
    }

    /// Creates the next segment file and writes its header and topics table.
    fn start_segment(&mut self) -> bool {
        let id = if self.prefix {
            let lowest = self.segments.keys().next().copied().unwrap_or(self.next_id);
            let lowest = lowest.min(self.next_id);
            if lowest <= MIN_ID {
                // No id left below it that a restart would read (a planted file): no prefix.
                return false;
            }
            lowest - 1
        } else {
            self.next_id
        };
        let path = self.cfg.dir.join(segment_name(id));
        let mut head = segment::encode_header(Header {
            epoch: self.epoch,
            segment: id,
        })
        .to_vec();
        segment::encode_topics(
            &mut head,
            self.topic_names
                .iter()
                .enumerate()
                .map(|(i, n)| (i as u8, n.as_str())),
        );
        if self.bytes + head.len() as u64 > self.cfg.max_bytes {
            return false;
        }
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&head).map(|()| f));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                self.disk_error(DiskOp::Create, &path, &e);
                let _ = std::fs::remove_file(&path);
                return false;
            }
        };
        if self.prefix {
            self.prefix_ids.push(id);
        } else {
            self.next_id += 1;
        }
        self.bytes += head.len() as u64;
        self.segments.insert(
            id,
            SegmentState {
                path,
                bytes: head.len() as u64,
                outstanding: 0,
                read: false,
                corrupt: false,
                recovered: false,
                unread_records: 0,
                first_us: 0,
                skip_to: 0,
            },
        );
        let file = Arc::new(file);
        match self.cfg.fsync {
            FsyncPolicy::Always => {
                self.sync_file(&file);
                if let Some(d) = &self.dir_file {
                    self.sync_file(d);
                }
            }
            FsyncPolicy::Every(_) => {
                if let Some(s) = &self.syncer {
                    s.dir_dirty.store(true, Ordering::Relaxed);
                }
            }
            FsyncPolicy::Never => {}
        }
        self.writer = Some(Writer {
            id,
            file,
            bytes: head.len() as u64,
            described: HashSet::new(),
        });
        true
    }

    /// Encodes records into the write buffer while the segment and the tier have room.
    /// Returns how many, and whether the tier is full.
    fn stage<'a>(&mut self, records: impl Iterator<Item = &'a SpoolRecord>) -> (usize, bool) {
        let Some(w) = self.writer.as_mut() else {
            return (0, false);
        };
        self.wbuf.clear();
        let mut n = 0;
        let mut full = false;
        for r in records {
            let mark = self.wbuf.len();
            let mut described = None;
            if let Some(s) = &r.stream {
                if w.described.insert(s.number) {
                    segment::encode_stream(
                        &mut self.wbuf,
                        s.number,
                        [&s.ids.stream_sid, &s.ids.call_sid, &s.ids.account_sid],
                    );
                    described = Some(s.number);
                }
                if r.kind == Kind::Terminal {
                    segment::encode_counters(&mut self.wbuf, &snapshot(s));
                }
            }
            segment::encode_record(&mut self.wbuf, &meta_of(r), &r.payload);
            if self.bytes + self.wbuf.len() as u64 > self.cfg.max_bytes {
                // Not this one: take its frames (and its descriptor) back out.
                self.wbuf.truncate(mark);
                if let Some(d) = described {
                    w.described.remove(&d);
                }
                full = true;
                break;
            }
            n += 1;
            if !self.prefix && w.bytes + self.wbuf.len() as u64 >= self.cfg.segment_bytes {
                break;
            }
        }
        (n, full)
    }

    /// Writes the staged buffer. On failure the file is cut back to its last good length
    /// and the tier pauses for a second.
    fn commit<'a>(&mut self, records: impl Iterator<Item = &'a SpoolRecord>) -> bool {
        let Some(w) = self.writer.as_mut() else {
            return false;
        };
        let result = (&*w.file).write_all(&self.wbuf);
        if let Err(e) = result {
            let good = w.bytes;
            let cut = w.file.set_len(good);
            let path = self
                .segments
                .get(&w.id)
                .map(|s| s.path.clone())
                .unwrap_or_default();
            // Descriptors of this batch are not in the file: describe again next time.
            w.described.clear();
            if cut.is_err() {
                // The tail cannot be cut: seal the segment as it is (the reader stops at the
                // torn frame) and start a new one later.
                self.seal();
            }
            self.disk_error(DiskOp::Write, &path, &e);
            if !self.full {
                self.full = true;
                self.metrics.spool.full.inc();
            }
            self.blocked_until = Some(Instant::now() + Duration::from_secs(1));
            return false;
        }
        let written = self.wbuf.len() as u64;
        w.bytes += written;
        let id = w.id;
        let file = w.file.clone();
        self.bytes += written;
        let mut count = 0u64;
        let mut first_us = 0;
        for r in records {
            if first_us == 0 {
                first_us = r.received_at_us.max(1);
            }
            count += 1;
            if let Some(s) = &r.stream {
                self.own
                    .entry(s.number)
                    .or_insert_with(|| OwnStream {
                        entry: s.clone(),
                        on_disk: 0,
                    })
                    .on_disk += 1;
            }
        }
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.bytes += written;
            seg.unread_records += count;
            if seg.first_us == 0 {
                seg.first_us = first_us;
            }
        }
        self.records += count;
        self.metrics.spool.spilled.inc_by(count);
        match self.cfg.fsync {
            FsyncPolicy::Always => self.sync_file(&file),
            FsyncPolicy::Every(_) => {
                if let Some(s) = &self.syncer {
                    let mut d = s.dirty.lock().unwrap_or_else(|e| e.into_inner());
                    if !d.last().is_some_and(|f| Arc::ptr_eq(f, &file)) {
                        d.push(file);
                    }
                }
            }
            FsyncPolicy::Never => {}
        }
        true
    }

    /// Closes the active segment: it becomes readable.
    fn seal(&mut self) {
        if let Some(w) = self.writer.take() {
            if self.prefix {
                self.unread.push_front(w.id);
            } else {
                self.unread.push_back(w.id);
            }
        }
    }

    /// Writes `records` into one new segment that is read before every other one: at
    /// shutdown, the records older than everything spooled (in librdkafka's window, rescued,
    /// parked) keep their place for the next process. With `snapshots`, then a fresh snapshot
    /// of the counters of every stream of this process with records on disk: deliveries made
    /// since a stream's terminal record spilled (with its older snapshot) are not lost. The
    /// segment is synced unless the policy is `never`. Returns how many records were written
    /// and whether the snapshots were (always true without `snapshots`).
    pub fn write_prefix(
        &mut self,
        records: &VecDeque<SpoolRecord>,
        snapshots: bool,
    ) -> (usize, bool) {
        self.seal();
        self.blocked_until = None;
        self.prefix = true;
        self.prefix_ids.clear();
        let written = if records.is_empty() {
            0
        } else {
            self.spill(records, records.len())
        };
        let snapshots_written = !snapshots
            || self.own.is_empty()
            || ((self.writer.is_some() || self.start_segment()) && self.write_snapshots());
        if let Some(w) = &self.writer {
            if self.cfg.fsync != FsyncPolicy::Never {
                self.sync_file(&w.file);
            }
        }
        self.seal();
        self.prefix = false;
        (written, snapshots_written)
    }

    /// Appends a counters snapshot of each of this process's streams with records on disk to
    /// the active segment. False when they could not be written (no room, a write error).
    fn write_snapshots(&mut self) -> bool {
        let Some(w) = self.writer.as_mut() else {
            return false;
        };
        self.wbuf.clear();
        for o in self.own.values() {
            let s = &o.entry;
            if w.described.insert(s.number) {
                segment::encode_stream(
                    &mut self.wbuf,
                    s.number,
                    [&s.ids.stream_sid, &s.ids.call_sid, &s.ids.account_sid],
                );
            }
            segment::encode_counters(&mut self.wbuf, &snapshot(s));
        }
        if self.bytes + self.wbuf.len() as u64 > self.cfg.max_bytes {
            return false;
        }
        if let Err(e) = (&*w.file).write_all(&self.wbuf) {
            let (id, good) = (w.id, w.bytes);
            let _ = w.file.set_len(good);
            w.described.clear();
            let path = self.cfg.dir.join(segment_name(id));
            self.disk_error(DiskOp::Write, &path, &e);
            return false;
        }
        let n = self.wbuf.len() as u64;
        w.bytes += n;
        self.bytes += n;
        if let Some(seg) = self.segments.get_mut(&w.id) {
            seg.bytes += n;
        }
        true
    }

    /// Deletes the prefix segments [`Self::write_prefix`] just wrote (they could not take
    /// everything: the caller writes a smaller prefix, without snapshots).
    pub fn discard_prefix(&mut self) {
        for id in std::mem::take(&mut self.prefix_ids) {
            self.unread.retain(|u| *u != id);
            if let Some(seg) = self.segments.remove(&id) {
                self.bytes = self.bytes.saturating_sub(seg.bytes);
                if let Err(e) = std::fs::remove_file(&seg.path) {
                    self.disk_error(DiskOp::Delete, &seg.path, &e);
                }
            }
        }
    }

    /// Whether segments may be consumed at a clean shutdown: not while records of an earlier
    /// process are being recovered (their streams' state lives in those segments until they
    /// are read to the end; the next process replays them whole, as after a crash).
    pub fn may_consume(&self) -> bool {
        self.recovered_left == 0 && self.recovered.is_empty()
    }

    fn sync_file(&self, f: &File) {
        if let Err(e) = f.sync_data() {
            self.disk_error(DiskOp::Sync, &self.cfg.dir, &e);
        }
    }

    fn disk_error(&self, op: DiskOp, path: &Path, e: &std::io::Error) {
        self.metrics.spool.disk_errors[op].inc();
        if let Some(suppressed) = DISK_ERROR_LOG.check(&self.metrics) {
            tracing::error!(op = op.as_str(), path = %path.display(), error = %e, suppressed, "spool disk error");
        }
    }

    /// The next record in spool order, with its ticket (its segment id): records of the
    /// oldest segment first, then synthesised terminal events for recovered streams that had
    /// none, then younger segments. `None` when the disk tier has nothing to read.
    pub fn read(&mut self, topics: &Topics) -> Option<(SpoolRecord, u64)> {
        loop {
            if let Some(r) = self.out.pop_front() {
                return Some((r, 0));
            }
            if self.reading.is_none() && !self.open_next() {
                if self.out.is_empty() {
                    return None;
                }
                continue;
            }
            let mut reading = self.reading.take()?;
            match self.next_record(&mut reading, topics) {
                Some(r) => {
                    self.reading = Some(reading);
                    return Some(r);
                }
                None => {
                    // The segment is read (or its rest skipped).
                    let id = reading.id;
                    if let Some(s) = self.segments.get_mut(&id) {
                        s.read = true;
                    }
                    self.release(id);
                    if reading.recovered {
                        self.recovered_segment_done();
                    }
                }
            }
        }
    }

    /// Loads the next unread segment (sealing the active one if it is the only one left).
    /// False when there is nothing left to read.
    fn open_next(&mut self) -> bool {
        loop {
            if self.recovered_left == 0 && !self.recovered.is_empty() {
                self.finish_recovered();
                if !self.out.is_empty() {
                    // Handed out before anything younger.
                    return false;
                }
            }
            let id = match self.unread.pop_front() {
                Some(id) => id,
                None => {
                    if self.writer.as_ref().is_some_and(|w| {
                        self.segments
                            .get(&w.id)
                            .is_some_and(|s| s.unread_records > 0)
                    }) {
                        self.seal();
                        continue;
                    }
                    return false;
                }
            };
            let Some(seg) = self.segments.get(&id) else {
                continue;
            };
            let recovered = seg.recovered;
            let path = seg.path.clone();
            let fail = |tier: &mut DiskTier, reason: CorruptReason| {
                tier.metrics.spool.corrupt[reason].inc();
                if let Some(s) = tier.segments.get_mut(&id) {
                    s.read = true;
                    s.corrupt = true;
                }
                tier.release(id);
                if recovered {
                    tier.recovered_segment_done();
                }
            };
            let buf = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    self.disk_error(DiskOp::Read, &path, &e);
                    fail(self, CorruptReason::Unreadable);
                    continue;
                }
            };
            let header = match segment::decode_header(&buf) {
                Ok(h) if h.segment == id => h,
                Ok(_) | Err(Corrupt::Header) => {
                    tracing::error!(path = %path.display(), "spool segment with an invalid header: skipped and moved aside");
                    fail(self, CorruptReason::Header);
                    continue;
                }
                Err(Corrupt::Version(v)) => {
                    tracing::error!(path = %path.display(), version = v, "spool segment of an unknown format version: skipped and moved aside");
                    fail(self, CorruptReason::Version);
                    continue;
                }
                Err(_) => {
                    fail(self, CorruptReason::Header);
                    continue;
                }
            };
            let skip_to = self.segments.get(&id).map_or(0, |s| s.skip_to);
            self.reading = Some(Reading {
                id,
                buf,
                at: HEADER_LEN,
                skip_to,
                described: HashMap::new(),
                epoch: header.epoch,
                recovered,
                slot_map: Vec::new(),
                streams: HashMap::new(),
            });
            return true;
        }
    }

    /// Decodes frames of `reading` up to its next record.
    fn next_record(
        &mut self,
        reading: &mut Reading,
        topics: &Topics,
    ) -> Option<(SpoolRecord, u64)> {
        let own_epoch = reading.epoch == self.epoch && !reading.recovered;
        loop {
            let start = reading.at;
            let mut frames = Frames::new(&reading.buf, reading.at);
            let frame = frames.next();
            let next_at = frames.offset();
            let frame = match frame {
                None => return None,
                Some(Err(c)) => {
                    let reason = match c {
                        Corrupt::Checksum => CorruptReason::Checksum,
                        Corrupt::Truncated => CorruptReason::Truncated,
                        Corrupt::Malformed => CorruptReason::Malformed,
                        Corrupt::Header => CorruptReason::Header,
                        Corrupt::Version(_) => CorruptReason::Version,
                    };
                    self.metrics.spool.corrupt[reason].inc();
                    if let Some(s) = self.segments.get_mut(&reading.id) {
                        s.corrupt = true;
                    }
                    tracing::error!(
                        segment = reading.id,
                        offset = reading.at,
                        reason = reason.as_str(),
                        "spool segment damaged: the rest of it is skipped"
                    );
                    return None;
                }
                Some(Ok(f)) => f,
            };
            reading.at = next_at;
            match frame {
                Frame::Topics(table) => {
                    reading.slot_map = vec![u8::MAX; 256];
                    for (slot, name) in table {
                        if let Some(ours) = self.topic_names.iter().position(|n| n == name) {
                            reading.slot_map[slot as usize] = ours as u8;
                        }
                    }
                }
                Frame::Stream { number, sids } => {
                    let own = if own_epoch {
                        self.own.get(&number).map(|o| o.entry.clone())
                    } else {
                        None
                    };
                    match own {
                        Some(entry) => {
                            reading.streams.insert(number, entry);
                        }
                        None => {
                            reading.described.insert(
                                number,
                                StreamIds {
                                    stream_sid: sids[0].to_owned(),
                                    call_sid: sids[1].to_owned(),
                                    account_sid: sids[2].to_owned(),
                                },
                            );
                        }
                    }
                }
                // Before the cursor: handled by the process that wrote the cursor.
                Frame::Counters(_) | Frame::Record { .. } if start < reading.skip_to => {}
                Frame::Counters(c) => {
                    let entry = if own_epoch {
                        None
                    } else {
                        self.recovered_entry(reading, topics.len(), c.stream)
                    };
                    let key = (reading.epoch, c.stream);
                    if let Some(r) = entry.and_then(|_| self.recovered.get_mut(&key)) {
                        restore(&r.entry, &mut r.applied, !r.counters, &c);
                        r.counters = true;
                    }
                }
                Frame::Record { meta, payload } => {
                    if !own_epoch && meta.stream != segment::NO_STREAM {
                        let (streams, described) = (&mut reading.streams, &reading.described);
                        self.recovered_entry_in(
                            (reading.epoch, streams, described),
                            topics.len(),
                            meta.stream,
                        );
                    }
                    return Some(self.record(reading, own_epoch, &meta, payload));
                }
            }
        }
    }

    /// The entry of stream `number` of an earlier process's segment, made (once per stream
    /// and epoch) the first time a record or snapshot of it is replayed.
    fn recovered_entry(
        &mut self,
        reading: &mut Reading,
        slots: usize,
        number: u64,
    ) -> Option<Arc<StreamEntry>> {
        let (streams, described) = (&mut reading.streams, &reading.described);
        self.recovered_entry_in((reading.epoch, streams, described), slots, number)
    }

    /// [`Self::recovered_entry`] on a reading's parts (its buffer may be borrowed).
    fn recovered_entry_in(
        &mut self,
        (epoch, streams, described): ReadingStreams<'_>,
        slots: usize,
        number: u64,
    ) -> Option<Arc<StreamEntry>> {
        if let Some(e) = streams.get(&number) {
            return Some(e.clone());
        }
        let ids = described.get(&number)?;
        let next = &mut self.next_recovered;
        let entry = self
            .recovered
            .entry((epoch, number))
            .or_insert_with(|| {
                *next += 1;
                RecoveredStream {
                    entry: Arc::new(StreamEntry::recovered(ids.clone(), *next, slots)),
                    terminal: false,
                    counters: false,
                    applied: segment::Counters::default(),
                }
            })
            .entry
            .clone();
        streams.insert(number, entry.clone());
        Some(entry)
    }

    fn record(
        &mut self,
        reading: &Reading,
        own_epoch: bool,
        meta: &RecordMeta,
        payload: &[u8],
    ) -> (SpoolRecord, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let stream = if meta.stream == segment::NO_STREAM {
            None
        } else {
            reading.streams.get(&meta.stream).cloned().or_else(|| {
                own_epoch
                    .then(|| self.own.get(&meta.stream).map(|o| o.entry.clone()))
                    .flatten()
            })
        };
        let kind = match meta.kind {
            0 => Kind::Audio,
            1 => Kind::Event,
            _ => Kind::Terminal,
        };
        let slot = reading
            .slot_map
            .get(meta.slot as usize)
            .copied()
            .unwrap_or(u8::MAX);
        let m = &self.metrics.spool;
        m.replayed.inc();
        if own_epoch {
            self.records = self.records.saturating_sub(1);
            if let Some(s) = &stream {
                if let Some(o) = self.own.get_mut(&s.number) {
                    o.on_disk -= 1;
                    if o.on_disk == 0 {
                        self.own.remove(&s.number);
                    }
                }
            }
            if let Some(seg) = self.segments.get_mut(&reading.id) {
                seg.unread_records = seg.unread_records.saturating_sub(1);
            }
        } else {
            m.recovered.inc();
            if let Some(s) = &stream {
                let rs = self.recovered.get_mut(&(reading.epoch, meta.stream));
                match kind {
                    Kind::Audio => {
                        // The terminal event waits for these like for any audio.
                        s.outstanding.fetch_add(1, Relaxed);
                        let chunks = meta.chunks as u64;
                        if meta.flags & FLAG_PLAYBACK != 0 {
                            s.playback_recorded.fetch_add(chunks, Relaxed);
                        } else if meta.flags & crate::sink::record::FLAG_PROFILE != 0 {
                            // A profile's rendering of chunks counted as audio already.
                        } else if rs.as_ref().is_some_and(|r| !r.counters) {
                            // No snapshot (the stream was cut by the crash): count what the
                            // spool held.
                            s.frames_received.fetch_add(chunks, Relaxed);
                            s.frames_accepted.fetch_add(chunks, Relaxed);
                        }
                    }
                    Kind::Terminal => {
                        if let Some(r) = rs {
                            r.terminal = true;
                        }
                    }
                    Kind::Event => {}
                }
            }
        }
        if let Some(seg) = self.segments.get_mut(&reading.id) {
            seg.outstanding += 1;
        }
        let r = SpoolRecord {
            stream,
            payload: payload.into(),
            seq: meta.seq,
            timestamp_ms: meta.timestamp_ms,
            received_at_us: meta.received_at_us,
            chunk: meta.chunk,
            chunks: meta.chunks,
            slot,
            kind,
            aux: meta.aux,
            flags: meta.flags,
        };
        (r, reading.id)
    }

    /// Recovered streams whose terminal record was not in the spool (the process died while
    /// they were open) get a `disconnect` event with reason `gateway_restart`.
    fn finish_recovered(&mut self) {
        for (_, r) in self.recovered.drain() {
            if r.terminal {
                continue;
            }
            let info = TerminalInfo {
                kind: EndKind::Disconnect,
                reason: "gateway_restart".into(),
                error_kind: None,
                close_code: None,
                at_us: crate::unix_micros(),
                playback: None,
            };
            let json = serde_json::to_vec(&info).unwrap_or_default();
            let mut t = SpoolRecord::event(
                Some(r.entry),
                crate::metrics::EventType::Disconnect,
                &json,
                info.at_us,
            );
            t.kind = Kind::Terminal;
            self.out.push_back(t);
        }
    }

    /// A record read from segment `ticket` is settled (delivered, failed or dropped).
    pub fn ack(&mut self, ticket: u64) {
        if let Some(s) = self.segments.get_mut(&ticket) {
            s.outstanding = s.outstanding.saturating_sub(1);
            self.release(ticket);
        }
    }

    /// One more of an earlier process's segments is read; after the last one, those held
    /// back (read and settled) are released.
    fn recovered_segment_done(&mut self) {
        self.recovered_left = self.recovered_left.saturating_sub(1);
        if self.recovered_left == 0 {
            let held: Vec<u64> = self
                .segments
                .iter()
                .filter(|(_, s)| s.recovered && s.read)
                .map(|(id, _)| *id)
                .collect();
            for id in held {
                self.release(id);
            }
        }
    }

    /// Deletes (or, when corrupt, moves aside) a segment that is read and settled.
    fn release(&mut self, id: u64) {
        let Some(s) = self.segments.get(&id) else {
            return;
        };
        if !s.read || s.outstanding > 0 {
            return;
        }
        if s.recovered && self.recovered_left > 0 {
            // An earlier process's segments stay until all of them are read: until then its
            // streams' state (terminal or not, counters) is only known from them, and a
            // shutdown before the end leaves them to be replayed whole.
            return;
        }
        let Some(s) = self.segments.remove(&id) else {
            return;
        };
        self.bytes = self.bytes.saturating_sub(s.bytes);
        if s.skip_to > 0 {
            let _ = std::fs::remove_file(self.cfg.dir.join(cursor_name(id)));
        }
        if s.corrupt {
            let mut aside = s.path.clone().into_os_string();
            aside.push(".corrupt");
            match std::fs::rename(&s.path, &aside) {
                Ok(()) => self.metrics.spool.quarantined.inc(),
                Err(e) => self.disk_error(DiskOp::Rename, &s.path, &e),
            }
        } else if let Err(e) = std::fs::remove_file(&s.path) {
            self.disk_error(DiskOp::Delete, &s.path, &e);
        }
        self.publish();
    }

    /// Synthesised terminal records not handed out yet (shutdown: they go to the prefix).
    pub fn take_pending(&mut self) -> VecDeque<SpoolRecord> {
        std::mem::take(&mut self.out)
    }

    /// Clean shutdown, after [`Self::write_prefix`] wrote every record handed out or decoded
    /// ahead and [`Self::close`] made it durable: nothing read from a segment is needed from it
    /// any more. Segments read to the end are deleted (whatever is unsettled in them is in the
    /// prefix now); the one being read gets a cursor file, so the next process resumes after
    /// the last record read instead of replaying (and duplicating) the segment's start.
    pub fn consume_read(&mut self) {
        if self.cfg.fsync != FsyncPolicy::Never {
            // The prefix's directory entry first: it replaces what is deleted below.
            if let Some(d) = &self.dir_file {
                self.sync_file(d);
            }
        }
        if let Some(r) = self.reading.take() {
            let end = Frames::new(&r.buf, r.at).next().is_none();
            if end {
                if let Some(s) = self.segments.get_mut(&r.id) {
                    s.read = true;
                }
            } else if r.at > r.skip_to {
                let path = self.cfg.dir.join(cursor_name(r.id));
                let at = r.at as u64;
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&at.to_le_bytes());
                b[8..].copy_from_slice(&(at ^ CURSOR_CHECK).to_le_bytes());
                let written = File::create(&path).and_then(|mut f| {
                    f.write_all(&b)?;
                    if self.cfg.fsync != FsyncPolicy::Never {
                        f.sync_data()?;
                    }
                    Ok(())
                });
                if let Err(e) = written {
                    // The segment is replayed whole next time: duplicates, no loss.
                    self.disk_error(DiskOp::Write, &path, &e);
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let read: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| s.read)
            .map(|(id, _)| *id)
            .collect();
        for id in read {
            if let Some(s) = self.segments.get_mut(&id) {
                s.outstanding = 0;
            }
            self.release(id);
        }
        if self.cfg.fsync != FsyncPolicy::Never {
            if let Some(d) = &self.dir_file {
                self.sync_file(d);
            }
        }
    }

    /// Drops what the tier holds in memory for records not read yet: used at shutdown after
    /// everything is written. Syncs the active segment unless the policy is `never`.
    pub fn close(&mut self) {
        if let Some(w) = &self.writer {
            if self.cfg.fsync != FsyncPolicy::Never {
                self.sync_file(&w.file);
            }
        }
        if let Some(s) = &self.syncer {
            s.stop.store(true, Ordering::Relaxed);
        }
        if let Some(t) = self.sync_thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }

    /// Updates the tier's gauges.
    pub fn publish(&self) {
        let m = &self.metrics.spool;
        m.bytes[crate::metrics::SpoolTier::Disk].set(self.bytes as i64);
        m.records[crate::metrics::SpoolTier::Disk].set(self.records as i64);
        m.segments.set(self.segments.len() as i64);
    }

    /// Records written (or recovered) and not read back yet.
    pub fn unread_records(&self) -> u64 {
        self.records
    }

    /// Whether the directory holds records from an earlier process still to be read.
    pub fn recovering(&self) -> bool {
        self.recovered_left > 0
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.close();
    }
}

/// The helper thread of `--spool-fsync <interval>`.
fn sync_loop(s: &Syncer, dir: Option<&File>, metrics: &Metrics, interval: Duration) {
    loop {
        std::thread::park_timeout(interval);
        let files = std::mem::take(&mut *s.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        for f in &files {
            if f.sync_data().is_err() {
                metrics.spool.disk_errors[DiskOp::Sync].inc();
            }
        }
        if s.dir_dirty.swap(false, Ordering::Relaxed) {
            if let Some(d) = dir {
                if d.sync_all().is_err() {
                    metrics.spool.disk_errors[DiskOp::Sync].inc();
                }
            }
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

fn meta_of(r: &SpoolRecord) -> RecordMeta {
    RecordMeta {
        stream: r.stream.as_ref().map_or(segment::NO_STREAM, |s| s.number),
        seq: r.seq,
        timestamp_ms: r.timestamp_ms,
        received_at_us: r.received_at_us,
        chunk: r.chunk,
        chunks: r.chunks,
        slot: r.slot,
        kind: r.kind as u8,
        aux: r.aux,
        flags: r.flags,
    }
}

fn snapshot(s: &StreamEntry) -> segment::Counters {
    use std::sync::atomic::Ordering::Relaxed;
    segment::Counters {
        stream: s.number,
        received: s.frames_received.load(Relaxed),
        accepted: s.frames_accepted.load(Relaxed),
        delivered: s.frames_delivered.load(Relaxed),
        playback: [
            s.playback_recorded.load(Relaxed),
            s.playback_delivered.load(Relaxed),
            s.playback_dropped.load(Relaxed),
        ],
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.index() as u8, s.dropped(*r)))
            .filter(|(_, n)| *n > 0)
            .collect(),
    }
}

/// Applies a recovered snapshot of a stream's counters. The earlier process's totals
/// (received, accepted, played audio recorded) replace what was counted from the spool's
/// records; its outcomes (delivered, dropped) are added to what this process settled since.
/// A stream can have several snapshots (a terminal rewritten at shutdown): each field takes
/// the highest, whatever the order they are read in.
fn restore(s: &StreamEntry, applied: &mut segment::Counters, first: bool, c: &segment::Counters) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let replace = |a: &AtomicU64, prev: &mut u64, new: u64| {
        if first || new > *prev {
            a.store(new, Relaxed);
            *prev = new;
        }
    };
    let add = |a: &AtomicU64, prev: &mut u64, new: u64| {
        if new > *prev {
            a.fetch_add(new - *prev, Relaxed);
            *prev = new;
        }
    };
    replace(&s.frames_received, &mut applied.received, c.received);
    replace(&s.frames_accepted, &mut applied.accepted, c.accepted);
    replace(
        &s.playback_recorded,
        &mut applied.playback[0],
        c.playback[0],
    );
    add(&s.frames_delivered, &mut applied.delivered, c.delivered);
    add(
        &s.playback_delivered,
        &mut applied.playback[1],
        c.playback[1],
    );
    add(&s.playback_dropped, &mut applied.playback[2], c.playback[2]);
    for (reason, n) in &c.drops {
        let i = applied.drops.iter().position(|(r, _)| r == reason);
        let prev = i.map_or(0, |i| applied.drops[i].1);
        if *n > prev {
            s.add_dropped(*reason as usize, n - prev);
            match i {
                Some(i) => applied.drops[i].1 = *n,
                None => applied.drops.push((*reason, *n)),
            }
        }
    }
}
