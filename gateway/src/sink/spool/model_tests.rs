//! The spool against a model (after Vector's disk-buffer model tests): proptest-generated
//! sequences of pushes, reads, put-backs, acknowledgements, spills, clean restarts, crashes
//! and damaged files run against the real [`Spool`] (memory and disk tiers, a real directory)
//! and a plain in-memory model of what must come out.
//!
//! The model knows, for every record ever pushed, whether it *must* come out again (not yet
//! settled, and either still in this process or guaranteed on disk), *may* (settled records
//! whose segment may not be deleted yet, records spilled by a non-forced maintain before a
//! crash), or *must not* (never pushed, or settled before a clean shutdown: a clean restart
//! repeats nothing). After every read it checks: nothing unknown or gone comes out, nothing
//! twice within one process lifetime, per-stream order holds, and at the end everything that
//! must come out came out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;

use super::{DiskConfig, FsyncPolicy, Spool, SpoolConfig, Ticket};
use crate::events::StreamIds;
use crate::metrics::Metrics;
use crate::sink::budget::Budget;
use crate::sink::record::{Kind, SpoolRecord};
use crate::sink::stream::StreamEntry;
use crate::sink::{AudioEncoding, Topics};

#[derive(Debug, Clone)]
enum Op {
    /// A record of stream `s` (audio, or an event when `event`), payload length `len`.
    Push { s: u8, event: bool, len: u16 },
    /// Take the head; `back`: the producer refuses it and it is put back.
    Pop { back: bool },
    /// Settle the `i`-th oldest record handed out.
    Ack { i: u8 },
    /// Drain-loop maintenance; `force`: time has moved past --spool-spill-after.
    Maintain { force: bool },
    /// Clean shutdown (records handed out and unsettled are persisted first) and restart.
    Restart,
    /// `kill -9` and restart.
    Crash,
    /// A crash, then the last segment file loses its last `cut` bytes (a torn write).
    CrashTorn { cut: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, prop::bool::weighted(0.1), 1u16..600)
            .prop_map(|(s, event, len)| Op::Push { s, event, len }),
        4 => Just(Op::Pop { back: false }),
        1 => Just(Op::Pop { back: true }),
        3 => any::<u8>().prop_map(|i| Op::Ack { i }),
        2 => any::<bool>().prop_map(|force| Op::Maintain { force }),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => (1u16..400).prop_map(|cut| Op::CrashTorn { cut }),
    ]
}

/// Record identity, carried in the payload's first 8 bytes.
type Id = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Queued in this process (any tier) or handed out and unsettled: must come out (again,
    /// after a restart).
    Must,
    /// Settled, or possibly lost in a crash: may come out again, need not.
    May,
    /// Settled in a lifetime that ended cleanly: must never come out again.
    Gone,
}

/// The segment files in `dir`, in id (replay) order.
fn segment_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spool"))
        .collect();
    segs.sort();
    segs
}

struct Harness {
    dir: PathBuf,
    topics: Topics,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    spool: Option<Spool>,
    streams: Vec<Arc<StreamEntry>>,
    next_id: Id,
    next_seq: [u64; 4],
    /// Everything ever pushed: id → (stream index, seq, fate).
    known: HashMap<Id, (u8, u64, Fate)>,
    /// Records handed out in this lifetime and not settled, oldest first.
    out: VecDeque<(Id, Ticket, SpoolRecord)>,
    /// Ids handed out in this lifetime (a second hand-out is a duplicate).
    seen: HashSet<Id>,
    /// Ids handed out in any lifetime.
    ever_seen: HashSet<Id>,
    /// Ids settled in this lifetime (gone for good if it ends cleanly and consumes).
    settled: HashSet<Id>,
    /// Extra copies of a record a clean shutdown that could not consume wrote (a disk
    /// hand-out of a stream that also had memory hand-outs is kept in the prefix for order
    /// and stays in its segment): it may come out that many more times per lifetime.
    extra: HashMap<Id, u32>,
    /// Hand-outs per id in this lifetime.
    count: HashMap<Id, u32>,
    /// Last seq first handed out per stream SID.
    last_fresh: HashMap<String, u64>,
    /// Ids pushed since the last forced maintain, in order (they may or may not be on disk).
    unforced: Vec<Id>,
}

impl Harness {
    fn new(tag: u64) -> Harness {
        let dir = std::env::temp_dir().join(format!(
            "gw-spool-model-{}-{tag}-{}",
            std::process::id(),
            crate::unix_micros()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let metrics = Metrics::new("model");
        let budget = Arc::new(Budget::new(
            1 << 30,
            1 << 20,
            0,
            prometheus::IntGauge::new("model_budget", "test").unwrap(),
        ));
        let mut h = Harness {
            dir,
            topics: Topics::new("model", AudioEncoding::PcmS16le),
            metrics,
            budget,
            spool: None,
            streams: Vec::new(),
            next_id: 1,
            next_seq: [0; 4],
            known: HashMap::new(),
            out: VecDeque::new(),
            seen: HashSet::new(),
            ever_seen: HashSet::new(),
            settled: HashSet::new(),
            extra: HashMap::new(),
            count: HashMap::new(),
            last_fresh: HashMap::new(),
            unforced: Vec::new(),
        };
        h.open();
        h
    }

    fn open(&mut self) {
        let cfg = SpoolConfig {
            disk: Some(DiskConfig {
                dir: self.dir.clone(),
                max_bytes: 64 << 20,
                // Small segments: many seals, deletions and partially settled segments.
                segment_bytes: 4096,
                fsync: FsyncPolicy::Never,
            }),
            memory_bytes: 2048,
            spill_after: std::time::Duration::from_secs(3600),
        };
        self.spool = Some(
            Spool::open(cfg, &self.topics, self.budget.clone(), self.metrics.clone())
                .expect("open spool"),
        );
        // New process: new stream entries (numbers are per process).
        let base = self.next_id * 16;
        self.streams = (0..4)
            .map(|i| {
                Arc::new(StreamEntry::new(
                    StreamIds {
                        stream_sid: format!("MZ{base}-{i}"),
                        call_sid: format!("CA{i}"),
                        account_sid: "AC".into(),
                    },
                    base + i,
                    3,
                ))
            })
            .collect();
        self.seen.clear();
        self.settled.clear();
        self.count.clear();
        self.out.clear();
        self.unforced.clear();
    }

    fn spool(&mut self) -> &mut Spool {
        self.spool.as_mut().unwrap()
    }

    fn push(&mut self, s: u8, event: bool, len: u16) {
        let id = self.next_id;
        self.next_id += 1;
        let seq = self.next_seq[s as usize];
        self.next_seq[s as usize] += 1;
        let mut payload = vec![(id % 251) as u8; (len as usize).max(8)];
        payload[..8].copy_from_slice(&id.to_le_bytes());
        let r = SpoolRecord {
            stream: Some(self.streams[s as usize].clone()),
            payload: payload.into(),
            seq,
            timestamp_ms: seq * 20,
            received_at_us: crate::unix_micros(),
            chunk: seq as u32,
            chunks: 1,
            slot: if event { 0 } else { 1 },
            kind: if event { Kind::Event } else { Kind::Audio },
            aux: 0,
            flags: 0,
        };
        self.budget.charge(r.compact_cost());
        self.spool().push(r);
        self.known.insert(id, (s, seq, Fate::Must));
        self.unforced.push(id);
    }

    /// Checks a record handed out; returns its id (None for a synthesized terminal).
    /// `register`: it is really taken (not put straight back).
    ///
    /// Duplicates: a record handed out before may come out again after a crash
    /// (at-least-once; consumers drop it by stream_sid + track + seq), never twice within one
    /// lifetime, and never once settled before a clean shutdown. Order is checked on first
    /// hand-outs: per stream, seq increases.
    fn check_out(&mut self, r: &SpoolRecord, register: bool) -> Option<Id> {
        if r.kind == Kind::Terminal {
            // Synthesized `disconnect` for a recovered stream: carries no id.
            assert!(r.stream.as_ref().is_some_and(|s| s.recovered));
            return None;
        }
        assert!(
            r.payload.len() >= 8,
            "payload shortened: {}",
            r.payload.len()
        );
        let id = Id::from_le_bytes(r.payload[..8].try_into().unwrap());
        let (_, seq, fate) = *self
            .known
            .get(&id)
            .unwrap_or_else(|| panic!("record {id} was never pushed"));
        assert_eq!(r.seq, seq, "record {id}: metadata");
        assert_ne!(
            fate,
            Fate::Gone,
            "record {id} settled before a clean shutdown came out again"
        );
        assert!(
            r.payload.iter().skip(8).all(|b| *b == (id % 251) as u8),
            "record {id}: payload damaged"
        );
        let sid = r.stream.as_ref().expect("stream").ids.stream_sid.clone();
        let n = self.count.get(&id).copied().unwrap_or(0);
        if n > 0 {
            assert!(
                n <= self.extra.get(&id).copied().unwrap_or(0),
                "record {id} handed out {} times in one lifetime",
                n + 1
            );
        } else if !self.ever_seen.contains(&id) {
            if let Some(last) = self.last_fresh.get(&sid) {
                assert!(seq > *last, "stream {sid}: seq {seq} after {last}");
            }
            if register {
                self.last_fresh.insert(sid, seq);
            }
        }
        if register {
            *self.count.entry(id).or_default() += 1;
            self.seen.insert(id);
            self.ever_seen.insert(id);
        }
        Some(id)
    }

    fn pop(&mut self, back: bool) {
        let topics = std::mem::replace(&mut self.topics, Topics::new("x", AudioEncoding::PcmS16le));
        let got = self.spool().pop(&topics);
        self.topics = topics;
        let Some((r, t)) = got else { return };
        let id = self.check_out(&r, !back);
        if back {
            // Put back at once, as the drain does when librdkafka refuses it.
            self.spool().push_front(r, t);
            return;
        }
        match id {
            Some(id) => self.out.push_back((id, t, r)),
            None => {
                // A synthesized terminal is settled at once.
                self.spool().ack(t);
            }
        }
    }

    fn ack(&mut self, i: u8) {
        if self.out.is_empty() {
            return;
        }
        let i = i as usize % self.out.len();
        let (id, t, r) = self.out.remove(i).unwrap();
        self.budget.credit(r.compact_cost());
        self.spool().ack(t);
        // Settled: may come back after a crash (its segment may still exist), need not.
        self.known.get_mut(&id).unwrap().2 = Fate::May;
        self.settled.insert(id);
    }

    fn maintain(&mut self, force: bool) {
        let now = crate::unix_micros() + if force { 7200 * 1_000_000 } else { 0 };
        self.spool().maintain(now);
        if force {
            // Everything queued in memory is on disk now (the disk is far from full).
            assert_eq!(self.spool().memory_records(), 0);
            self.unforced.clear();
        }
    }

    fn restart(&mut self) {
        // Clean shutdown: the unsettled hand-outs are older than the whole spool and come
        // out once more (from the prefix and, when nothing is consumed, possibly also from
        // their segments). When the segments read are consumed (not while an earlier process's
        // records are being recovered), what this lifetime settled never comes out again.
        let from_disk: Vec<Id> = self
            .out
            .iter()
            .filter(|(_, t, _)| t.is_disk())
            .map(|(id, _, _)| *id)
            .collect();
        let front: Vec<(SpoolRecord, Ticket)> =
            self.out.drain(..).map(|(_, t, r)| (r, t)).collect();
        let mut spool = self.spool.take().unwrap();
        let left = spool.persist(front, Vec::new());
        assert!(left.is_empty(), "{} records not persisted", left.len());
        if spool.consumed() {
            for id in &self.settled {
                self.known.get_mut(id).unwrap().2 = Fate::Gone;
            }
        } else {
            for id in from_disk {
                *self.extra.entry(id).or_default() += 1;
            }
        }
        drop(spool);
        self.open();
    }

    fn crash(&mut self, cut: u16) {
        // Records only in memory are lost; records guaranteed on disk and unsettled must
        // come back; disk hand-outs (their ticket says so) too.
        for id in std::mem::take(&mut self.unforced) {
            if let Some(k) = self.known.get_mut(&id) {
                k.2 = Fate::May;
            }
        }
        for (id, t, _) in &self.out {
            if !t.is_disk() {
                self.known.get_mut(id).unwrap().2 = Fate::May;
            }
        }
        // Everything queued before the last forced maintain is on disk, unless the torn
        // write below takes it.
        let spool = self.spool.take().unwrap();
        drop(spool);
        if cut > 0 {
            if let Some(last) = segment_files(&self.dir).last() {
                let len = std::fs::metadata(last).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
                f.set_len(len.saturating_sub(cut as u64)).unwrap();
                // A torn segment may lose any of its records: read it to see which remain.
                let bytes = std::fs::read(last).unwrap();
                let mut keep = HashSet::new();
                for f in super::segment::Frames::new(&bytes, super::segment::HEADER_LEN) {
                    match f {
                        Ok(super::segment::Frame::Record { payload, .. }) => {
                            keep.insert(Id::from_le_bytes(payload[..8].try_into().unwrap()));
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                // The ids that were in that file before the cut and are gone now: may-lose.
                let before = self.ids_in_file_before(last, &keep);
                for id in before {
                    self.known.get_mut(&id).unwrap().2 = Fate::May;
                }
            }
        }
        self.open();
    }

    /// Ids that must come back but are not in `keep`, among those the torn file could have
    /// held: we cannot read the lost tail, so every Must id not found in any other segment
    /// is relaxed.
    fn ids_in_file_before(&self, torn: &PathBuf, keep: &HashSet<Id>) -> Vec<Id> {
        let mut elsewhere = HashSet::new();
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let p = e.unwrap().path();
            if &p == torn || p.extension().is_none_or(|e| e != "spool") {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for f in super::segment::Frames::new(&bytes, super::segment::HEADER_LEN) {
                match f {
                    Ok(super::segment::Frame::Record { payload, .. }) => {
                        elsewhere.insert(Id::from_le_bytes(payload[..8].try_into().unwrap()));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        self.known
            .iter()
            .filter(|(id, k)| k.2 == Fate::Must && !keep.contains(id) && !elsewhere.contains(id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Drains everything and checks that every record that must come out did.
    fn finish(mut self) {
        let mut got: HashSet<Id> = self.out.iter().map(|(id, _, _)| *id).collect();
        let topics = Topics::new("model", AudioEncoding::PcmS16le);
        let mut n = 0;
        while let Some((r, t)) = self.spool().pop(&topics) {
            if let Some(id) = self.check_out(&r, true) {
                got.insert(id);
            }
            self.spool().ack(t);
            n += 1;
            assert!(n < 1_000_000, "spool never empties");
        }
        for (id, t, _) in self.out.drain(..) {
            let _ = id;
            self.spool.as_mut().unwrap().ack(t);
        }
        for (id, (_, _, fate)) in &self.known {
            if *fate == Fate::Must {
                assert!(
                    got.contains(id) || self.seen.contains(id),
                    "record {id} lost"
                );
            }
        }
        assert!(self.spool().is_empty());
        drop(self.spool.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn the_spool_agrees_with_the_model(ops in prop::collection::vec(op(), 1..300)) {
        static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut h = Harness::new(CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        for op in ops {
            match op {
                Op::Push { s, event, len } => h.push(s, event, len),
                Op::Pop { back } => h.pop(back),
                Op::Ack { i } => h.ack(i),
                Op::Maintain { force } => h.maintain(force),
                Op::Restart => h.restart(),
                Op::Crash => h.crash(0),
                Op::CrashTorn { cut } => h.crash(cut),
            }
        }
        h.finish();
    }
}

/// A clean shutdown in the middle of replaying a segment, then a restart: the next process
/// resumes after the last record read (nothing repeated, nothing lost), the stream gets one
/// terminal record, and its deliveries are those of the snapshot the shutdown wrote (which
/// includes what was delivered after the terminal record spilled) plus the new process's
/// (not overwritten by a snapshot read later).
#[test]
fn a_clean_restart_mid_segment_resumes_at_the_cursor_and_adds_to_the_snapshot() {
    use std::sync::atomic::Ordering::Relaxed;
    const N: u64 = 900;
    const READ_FIRST: u64 = 300;
    let mut h = Harness::new(u64::MAX);
    // One stream: N audio records, then its terminal record with a snapshot of its counters
    // (the earlier process delivered 7 chunks before the outage and dropped 2).
    let s = h.streams[0].clone();
    s.frames_received.store(N + 9, Relaxed);
    s.frames_accepted.store(N + 7, Relaxed);
    s.frames_delivered.store(7, Relaxed);
    s.drop_frames(crate::metrics::DropReason::ALL[0], 2);
    for _ in 0..N {
        h.push(0, false, 40);
    }
    let info = crate::events::TerminalInfo {
        kind: crate::events::EndKind::Stop,
        reason: "twilio_stop".into(),
        error_kind: None,
        close_code: None,
        at_us: 1,
        playback: None,
    };
    let json = serde_json::to_vec(&info).unwrap();
    let mut t = SpoolRecord::event(Some(s.clone()), crate::metrics::EventType::Stop, &json, 1);
    t.kind = Kind::Terminal;
    h.budget.charge(t.compact_cost());
    h.spool().push(t);
    h.maintain(true);
    // Read the first records back from disk and settle them (delivered by this process).
    let topics = Topics::new("model", AudioEncoding::PcmS16le);
    let mut first = Vec::new();
    for _ in 0..READ_FIRST {
        let (r, t) = h.spool().pop(&topics).expect("record");
        assert_eq!(r.kind, Kind::Audio);
        first.push(r.seq);
        r.stream
            .as_ref()
            .unwrap()
            .frames_delivered
            .fetch_add(1, Relaxed);
        h.spool().ack(t);
    }
    assert_eq!(first, (0..READ_FIRST).collect::<Vec<_>>());
    // Clean shutdown with nothing unsettled: the rest of the segment must come out once.
    let spool = h.spool.take().unwrap();
    let mut spool = spool;
    assert!(spool.persist(Vec::new(), Vec::new()).is_empty());
    assert!(spool.consumed());
    drop(spool);
    h.open();
    let mut seqs = Vec::new();
    let mut terminals = Vec::new();
    while let Some((r, t)) = h.spool().pop(&topics) {
        match r.kind {
            Kind::Audio => {
                seqs.push(r.seq);
                // What the drain does when Kafka acknowledges a chunk.
                let e = r.stream.as_ref().unwrap();
                e.frames_delivered.fetch_add(1, Relaxed);
            }
            Kind::Terminal => terminals.push(r),
            Kind::Event => panic!("no events were pushed"),
        }
        h.spool().ack(t);
    }
    assert_eq!(
        seqs,
        (READ_FIRST..N).collect::<Vec<_>>(),
        "resumed at the cursor"
    );
    assert_eq!(terminals.len(), 1, "one terminal record");
    let e = terminals[0].stream.as_ref().unwrap();
    assert!(e.recovered);
    assert_eq!(e.frames_received.load(Relaxed), N + 9, "snapshot's total");
    assert_eq!(e.frames_accepted.load(Relaxed), N + 7, "snapshot's total");
    assert_eq!(
        e.frames_delivered.load(Relaxed),
        7 + N,
        "the earlier processes' deliveries (snapshot at shutdown) plus this one's"
    );
    assert_eq!(e.dropped_total(), 2);
    assert!(h.spool().is_empty());
    let left: Vec<_> = std::fs::read_dir(&h.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "LOCK")
        .collect();
    assert!(left.is_empty(), "segments and cursor deleted: {left:?}");
    drop(h.spool.take());
    let _ = std::fs::remove_dir_all(&h.dir);
}

/// Cursor files that are not what a clean shutdown writes — garbage, an offset past the
/// segment's end, one inside its header, one for no segment — are not believed: the segment
/// is replayed whole (duplicates at worst, never a record skipped) and the files are removed.
#[test]
fn a_bad_cursor_replays_the_whole_segment_and_is_removed() {
    const N: u64 = 200;
    let mut h = Harness::new(u64::MAX - 1);
    for _ in 0..N {
        h.push(1, false, 40);
    }
    h.maintain(true);
    // Crash (nothing consumed), then plant bad cursors next to the segments.
    drop(h.spool.take());
    let segs = segment_files(&h.dir);
    assert!(segs.len() >= 3, "{segs:?}");
    let cursor = |seg: &PathBuf| seg.with_extension("cursor");
    let word = |at: u64| {
        let mut b = at.to_le_bytes().to_vec();
        b.extend_from_slice(&(at ^ super::disk::CURSOR_CHECK).to_le_bytes());
        b
    };
    std::fs::write(cursor(&segs[0]), b"not a cursor").unwrap();
    let len = std::fs::metadata(&segs[1]).unwrap().len();
    std::fs::write(cursor(&segs[1]), word(len + 1)).unwrap();
    std::fs::write(cursor(&segs[2]), word(3)).unwrap();
    std::fs::write(h.dir.join("seg-00000000deadbeef.cursor"), word(64)).unwrap();
    h.open();
    let topics = Topics::new("model", AudioEncoding::PcmS16le);
    let mut seqs = Vec::new();
    while let Some((r, t)) = h.spool().pop(&topics) {
        if r.kind == Kind::Audio {
            seqs.push(r.seq);
        }
        h.spool().ack(t);
    }
    assert_eq!(
        seqs,
        (0..N).collect::<Vec<_>>(),
        "every record, once, in order"
    );
    let left: Vec<String> = std::fs::read_dir(&h.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cursor"))
        .collect();
    assert!(left.is_empty(), "bad cursors removed: {left:?}");
    drop(h.spool.take());
    let _ = std::fs::remove_dir_all(&h.dir);
}
