//! Per-stream state shared by a connection and the drain thread.
//!
//! A [`StreamEntry`] is created when a stream's `start` arrives and is held (`Arc`) by the
//! connection's publisher and by every one of the stream's records still queued or in flight.
//! It carries the stream's identity (so records do not copy SIDs) and its delivery accounting:
//! the connection counts what it accepts and what it drops at admission, the drain thread counts
//! what Kafka acknowledged, what failed and what was evicted, and the terminal event is rendered
//! from these counters once every audio record of the stream is resolved. Counters are relaxed
//! atomics: each is written by one side at a time and read when the stream is over.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::events::StreamIds;
use crate::metrics::DropReason;

/// Where one topic's records of a stream landed: the replay index of the terminal event.
#[derive(Debug)]
pub struct TopicIndex {
    /// Partition of the stream's records on this topic (-1 = none delivered).
    pub partition: AtomicI64,
    /// Offset of the first delivered record (-1 = none).
    pub first: AtomicI64,
    /// Offset of the last delivered record (-1 = none).
    pub last: AtomicI64,
    /// Records delivered on this topic.
    pub records: AtomicU64,
}

impl Default for TopicIndex {
    fn default() -> Self {
        TopicIndex {
            partition: AtomicI64::new(-1),
            first: AtomicI64::new(-1),
            last: AtomicI64::new(-1),
            records: AtomicU64::new(0),
        }
    }
}

impl TopicIndex {
    /// Records a delivered record at `partition`/`offset` (drain thread only).
    pub fn delivered(&self, partition: i32, offset: i64) {
        self.partition.store(partition as i64, Ordering::Relaxed);
        if self.first.load(Ordering::Relaxed) < 0 {
            self.first.store(offset, Ordering::Relaxed);
        }
        if offset > self.last.load(Ordering::Relaxed) {
            self.last.store(offset, Ordering::Relaxed);
        }
        self.records.fetch_add(1, Ordering::Relaxed);
    }
}

/// One stream's identity and accounting.
#[derive(Debug)]
pub struct StreamEntry {
    /// Twilio SIDs.
    pub ids: StreamIds,
    /// Process-unique number (spool segments refer to streams by it).
    pub number: u64,
    /// Media chunks received (empty payloads included).
    pub frames_received: AtomicU64,
    /// Chunks accepted into the Kafka path.
    pub frames_accepted: AtomicU64,
    /// Chunks acknowledged by Kafka.
    pub frames_delivered: AtomicU64,
    /// Chunks not delivered, by reason.
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Audio records accepted and not yet resolved (acknowledged, failed or evicted).
    pub outstanding: AtomicU64,
    /// Records of this stream waiting in the spool (drain thread only): while non-zero, new
    /// records of the stream queue behind them.
    pub backlog: AtomicU64,
    /// Frames of played audio (bidirectional streams) accepted for the outbound topic.
    pub playback_recorded: AtomicU64,
    /// Frames of played audio acknowledged by Kafka.
    pub playback_delivered: AtomicU64,
    /// Frames of played audio not recorded (budget full, delivery failed).
    pub playback_dropped: AtomicU64,
    /// Replay index per topic slot.
    pub index: Vec<TopicIndex>,
    /// Recovered from the spool after a restart (its terminal event says so).
    pub recovered: bool,
}

impl StreamEntry {
    /// A fresh entry with `slots` topic slots.
    pub fn new(ids: StreamIds, number: u64, slots: usize) -> StreamEntry {
        StreamEntry {
            ids,
            number,
            frames_received: AtomicU64::new(0),
            frames_accepted: AtomicU64::new(0),
            frames_delivered: AtomicU64::new(0),
            dropped: Default::default(),
            outstanding: AtomicU64::new(0),
            backlog: AtomicU64::new(0),
            playback_recorded: AtomicU64::new(0),
            playback_delivered: AtomicU64::new(0),
            playback_dropped: AtomicU64::new(0),
            index: (0..slots).map(|_| TopicIndex::default()).collect(),
            recovered: false,
        }
    }

    /// An entry for a stream an earlier process spooled (see [`super::spool`]).
    pub fn recovered(ids: StreamIds, number: u64, slots: usize) -> StreamEntry {
        StreamEntry {
            recovered: true,
            ..StreamEntry::new(ids, number, slots)
        }
    }

    /// Adds `n` chunks dropped for the reason with index `reason` (restoring a spooled
    /// snapshot; an unknown index is ignored).
    pub fn add_dropped(&self, reason: usize, n: u64) {
        if let Some(d) = self.dropped.get(reason) {
            d.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `n` chunks of this stream dropped for `reason`.
    pub fn drop_frames(&self, reason: DropReason, n: u64) {
        self.dropped[reason.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Chunks dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    /// Chunks dropped for any reason so far.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    /// Stream SID bytes (the Kafka key).
    pub fn key(&self) -> &[u8] {
        self.ids.stream_sid.as_bytes()
    }
}
