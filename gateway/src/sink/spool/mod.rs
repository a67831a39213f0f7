//! The spool: records that do not fit in librdkafka's window wait here, in order.
//!
//! One FIFO queue in two tiers. The **memory tier** holds records in their compact form
//! ([`SpoolRecord`]: payload + 64 bytes), charged to the in-flight budget. With `--spool-dir`,
//! the **disk tier** ([`disk::DiskTier`]) takes the memory tier's *oldest* records once the
//! memory tier holds more than `--spool-memory-bytes` or its head is older than
//! `--spool-spill-after`, so the disk tier is always the older part of the queue and reading
//! it first keeps the order. Records read back from disk carry a [`Ticket`] (their segment) that
//! the drain hands back when Kafka settles them; a segment is deleted only when every record
//! in it is settled, or at a clean shutdown once its unsettled ones are in the prefix
//! ([`Spool::persist`]).
//!
//! Per-stream order needs nothing more: the drain routes a record to the window only while
//! its stream has nothing in the spool (see [`super::drain`]), and the spool never reorders.
//!
//! Memory: the memory tier is bounded by the budget's queued account (admission control);
//! records decoded from disk are charged to it too while they wait. The disk tier adds one
//! segment being read (at most 8 MiB) and a write buffer. The segment format is in
//! [`segment`].

pub mod disk;
pub mod inspect;
#[cfg(test)]
mod model_tests;
pub mod segment;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::budget::Budget;
use super::record::SpoolRecord;
use super::Topics;
use crate::metrics::{Metrics, SpoolTier};

pub use disk::{DiskConfig, FsyncPolicy, SpoolError};

/// Where a record handed out by the spool came from: `Ticket::MEMORY`, or the disk segment
/// that must not be deleted before the record is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl Ticket {
    /// A record that never was on disk (nothing to acknowledge).
    pub const MEMORY: Ticket = Ticket(0);

    /// Whether the record came from a disk segment.
    pub fn is_disk(self) -> bool {
        self.0 != 0
    }
}

/// Settings of the spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The disk tier (`--spool-dir`), if any.
    pub disk: Option<DiskConfig>,
    /// `--spool-memory-bytes`: with a disk tier, the memory tier spills above this.
    pub memory_bytes: u64,
    /// `--spool-spill-after`: with a disk tier, records older than this spill even below the
    /// memory threshold (bounds what a `kill -9` can take from the memory tier).
    pub spill_after: Duration,
}

impl SpoolConfig {
    /// Memory tier only.
    pub fn memory_only() -> SpoolConfig {
        SpoolConfig {
            disk: None,
            memory_bytes: 32 << 20,
            spill_after: Duration::from_secs(1),
        }
    }
}

/// Records decoded from disk ahead of need (bounded look-ahead).
const READ_AHEAD: usize = 256;
/// Most records spilled per call (keeps one drain iteration short).
const SPILL_BATCH: usize = 16_384;

/// The spool; see the module docs. Owned by the drain thread.
pub struct Spool {
    memory: VecDeque<SpoolRecord>,
    memory_bytes: u64,
    /// The queue's head: records decoded from disk, or put back by the drain.
    staged: VecDeque<(SpoolRecord, Ticket)>,
    disk: Option<disk::DiskTier>,
    memory_target: u64,
    spill_after_us: u64,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    /// The last [`Spool::persist`] consumed the segments it had read.
    consumed: bool,
}

impl Spool {
    /// Opens the spool (and its directory: records an earlier process left are read first).
    pub fn open(
        cfg: SpoolConfig,
        topics: &Topics,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
    ) -> Result<Spool, SpoolError> {
        let disk = match cfg.disk {
            Some(d) => Some(disk::DiskTier::open(d, topics, metrics.clone())?),
            None => None,
        };
        Ok(Spool {
            memory: VecDeque::new(),
            memory_bytes: 0,
            staged: VecDeque::new(),
            disk,
            memory_target: cfg.memory_bytes,
            spill_after_us: cfg.spill_after.as_micros() as u64,
            budget,
            metrics,
            consumed: false,
        })
    }

    /// Appends a record (already charged to the budget) at the tail.
    pub fn push(&mut self, r: SpoolRecord) {
        self.memory_bytes += r.compact_cost();
        self.memory.push_back(r);
    }

    /// Puts a record back at the head (the producer could not take it now).
    ///
    /// A record from the memory tier goes back to the memory tier's head, where it can still
    /// spill: it was popped only because nothing was staged or on disk (see [`Spool::pop`]),
    /// and it goes back before the next spill, so it is still the oldest record there.
    pub fn push_front(&mut self, r: SpoolRecord, t: Ticket) {
        if t.is_disk() || !self.staged.is_empty() {
            self.staged.push_front((r, t));
        } else {
            self.memory_bytes += r.compact_cost();
            self.memory.push_front(r);
        }
    }

    /// Fills the look-ahead from disk when the head is there.
    fn fill(&mut self, topics: &Topics) {
        if !self.staged.is_empty() {
            return;
        }
        let Some(d) = self.disk.as_mut() else { return };
        if d.is_empty() {
            return;
        }
        while self.staged.len() < READ_AHEAD {
            let Some((r, ticket)) = d.read(topics) else {
                break;
            };
            // In memory again: charged like any queued record until it is produced.
            self.budget.charge(r.compact_cost());
            self.staged.push_back((r, Ticket(ticket)));
        }
    }

    /// The oldest record.
    pub fn front(&mut self, topics: &Topics) -> Option<&SpoolRecord> {
        self.fill(topics);
        match self.staged.front() {
            Some((r, _)) => Some(r),
            None => self.memory.front(),
        }
    }

    /// Takes the oldest record.
    pub fn pop(&mut self, topics: &Topics) -> Option<(SpoolRecord, Ticket)> {
        self.fill(topics);
        if let Some(x) = self.staged.pop_front() {
            return Some(x);
        }
        let r = self.memory.pop_front()?;
        self.memory_bytes -= r.compact_cost();
        Some((r, Ticket::MEMORY))
    }

    /// A record handed out with `t` is settled: its segment may go.
    pub fn ack(&mut self, t: Ticket) {
        if t.is_disk() {
            if let Some(d) = self.disk.as_mut() {
                d.ack(t.0);
            }
        }
    }

    /// Nothing queued in any tier.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
            && self.memory.is_empty()
            && self.disk.as_ref().is_none_or(disk::DiskTier::is_empty)
    }

    /// Whether a disk tier is configured.
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// Records in the memory tier.
    pub fn memory_records(&self) -> usize {
        self.memory.len()
    }

    /// Moves the memory tier's oldest records to disk while it is above its threshold or its
    /// head is older than `--spool-spill-after`, then refreshes the gauges. Called once per
    /// drain iteration.
    pub fn maintain(&mut self, now_us: u64) {
        if let Some(d) = self.disk.as_mut() {
            let mut n = 0;
            let mut bytes = self.memory_bytes;
            let over = bytes > self.memory_target;
            // Above the threshold: spill down to 90 % of it; and anything too old.
            let low = self.memory_target / 10 * 9;
            for r in self.memory.iter() {
                let old = now_us.saturating_sub(r.received_at_us) > self.spill_after_us;
                if n >= SPILL_BATCH || !((over && bytes > low) || old) {
                    break;
                }
                bytes -= r.compact_cost();
                n += 1;
            }
            if n > 0 {
                let written = d.spill(&self.memory, n);
                for r in self.memory.drain(..written) {
                    let c = r.compact_cost();
                    self.memory_bytes -= c;
                    self.budget.credit(c);
                }
            }
        }
        self.publish(now_us);
    }

    /// Shutdown: writes what is still queued to disk for the next process. `front` holds the
    /// records older than the whole spool (librdkafka's unacknowledged window in produce
    /// order, then the drain's rescued records) and `parked` the terminal records waiting for
    /// them: they go to a segment read before all others, with the records decoded from disk
    /// ahead of need and fresh counters snapshots. When that prefix is written whole and no
    /// earlier process's records are being recovered, the segments already read are consumed
    /// ([`disk::DiskTier::consume_read`]): a clean restart neither loses nor repeats a record.
    /// Returns the records that could not be written and are nowhere else (no disk tier, or it
    /// is full), for the caller to count.
    pub fn persist(
        &mut self,
        front: Vec<(SpoolRecord, Ticket)>,
        parked: Vec<(SpoolRecord, Ticket)>,
    ) -> Vec<SpoolRecord> {
        self.consumed = false;
        let Some(d) = self.disk.as_mut() else {
            let mut left: Vec<SpoolRecord> = front.into_iter().map(|(r, _)| r).collect();
            left.extend(self.staged.drain(..).map(|(r, _)| r));
            left.extend(parked.into_iter().map(|(r, _)| r));
            left.extend(self.memory.drain(..));
            self.memory_bytes = 0;
            return left;
        };
        // The head of the spool, oldest first, each with whether it is still in a disk
        // segment (read from one and not settled).
        let mut head: Vec<(SpoolRecord, bool)> =
            front.into_iter().map(|(r, t)| (r, t.is_disk())).collect();
        head.extend(self.staged.drain(..).map(|(r, t)| (r, t.is_disk())));
        // Synthesised terminals: in no segment; charged like any queued record from here on.
        for r in d.take_pending() {
            self.budget.charge(r.compact_cost());
            head.push((r, false));
        }
        head.extend(parked.into_iter().map(|(r, t)| (r, t.is_disk())));
        // Consuming: everything goes to the prefix and the segments read are consumed once
        // it is complete. Otherwise (recovering an earlier process, or no room for all of it)
        // the segments are replayed whole and records still in them stay only there, unless
        // their stream also has records only in the prefix (see below).
        let (mut records, in_segment): (VecDeque<SpoolRecord>, Vec<bool>) =
            head.into_iter().unzip();
        let mut consume = d.may_consume();
        let mut written = 0;
        // Of what goes to the prefix, which records are also still in a segment.
        let mut also_in_segment = in_segment.clone();
        if consume {
            let (n, snapshots) = d.write_prefix(&records, true);
            if n == records.len() && snapshots {
                written = n;
            } else {
                d.discard_prefix();
                consume = false;
            }
        }
        if !consume {
            // A stream with records only in the prefix keeps its in-segment ones there too
            // (a copy stays in the segment): the prefix is read first, and its newer records
            // must not overtake the older ones replayed from the segment.
            let mixed: std::collections::HashSet<u64> = records
                .iter()
                .zip(&in_segment)
                .filter(|(_, seg)| !**seg)
                .filter_map(|(r, _)| r.stream.as_ref().map(|e| e.number))
                .collect();
            let mut keep = VecDeque::with_capacity(records.len());
            also_in_segment.clear();
            for (r, seg) in records.drain(..).zip(in_segment) {
                let ordered = r.stream.as_ref().is_some_and(|e| mixed.contains(&e.number));
                if seg && !ordered {
                    self.budget.credit(r.compact_cost());
                } else {
                    keep.push_back(r);
                    also_in_segment.push(seg);
                }
            }
            records = keep;
            written = d.write_prefix(&records, false).0;
        }
        let mut left = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            if i < written || (!consume && also_in_segment[i]) {
                // Written, or not written but still in its segment (replayed whole).
                self.budget.credit(r.compact_cost());
            } else {
                // The caller credits (and counts) what it gets back.
                left.push(r);
            }
        }
        let n = self.memory.len();
        let written = d.spill(&self.memory, n);
        for r in self.memory.drain(..written) {
            self.memory_bytes -= r.compact_cost();
            self.budget.credit(r.compact_cost());
        }
        left.extend(self.memory.drain(..));
        self.memory_bytes = 0;
        d.close();
        self.consumed = consume;
        if consume {
            d.consume_read();
        }
        d.publish();
        left
    }

    /// Whether the last [`Spool::persist`] consumed the segments it had read (a clean restart
    /// then repeats nothing); false while an earlier process's records were being recovered,
    /// or when the prefix could not take everything.
    pub fn consumed(&self) -> bool {
        self.consumed
    }

    /// Whether the disk tier is above `fraction` of `--spool-max-bytes`.
    pub fn over_watermark(&self, fraction: f64) -> bool {
        self.disk
            .as_ref()
            .is_some_and(|d| d.bytes() as f64 > d.max_bytes() as f64 * fraction)
    }

    fn publish(&self, now_us: u64) {
        let m = &self.metrics.spool;
        m.bytes[SpoolTier::Memory].set(self.memory_bytes as i64);
        // Staged records read from disk are still in their segments: they count there.
        let staged_memory = self.staged.iter().filter(|(_, t)| !t.is_disk()).count();
        m.records[SpoolTier::Memory].set((self.memory.len() + staged_memory) as i64);
        let oldest = self
            .staged
            .front()
            .map(|(r, _)| r.received_at_us)
            .or_else(|| self.disk.as_ref().and_then(disk::DiskTier::oldest_us))
            .or_else(|| self.memory.front().map(|r| r.received_at_us));
        m.oldest_age_ms
            .set(oldest.map_or(0, |t| now_us.saturating_sub(t) / 1000) as i64);
        if let Some(d) = &self.disk {
            d.publish();
            // Decoded ahead but not yet produced: still records of the disk tier.
            let staged_disk = self.staged.len() - staged_memory;
            m.records[SpoolTier::Disk].set((d.unread_records() + staged_disk as u64) as i64);
        }
    }
}
