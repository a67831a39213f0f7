//! Counters shared by every stream task of a run.
//!
//! Streams update atomics and sharded histograms; the sampler, the progress line and the
//! final report only read them. Histograms are sharded by stream index so tasks on
//! different worker threads rarely touch the same lock.

use crate::playout::PlayoutStats;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Number of histogram shards.
const SHARDS: usize = 16;
/// Largest value a histogram records: one hour in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// A fresh microsecond histogram (1 µs to 1 h, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid")
}

/// A histogram split into shards behind separate locks.
#[derive(Debug)]
pub struct ShardedHistogram {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for ShardedHistogram {
    fn default() -> Self {
        ShardedHistogram {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl ShardedHistogram {
    /// Records `d` (saturating at one hour, at least 1 µs) in the shard for `key`.
    pub fn record(&self, key: usize, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        if let Ok(mut h) = self.shards[key % SHARDS].lock() {
            // Cannot fail: the value is clamped into the histogram's range.
            let _ = h.record(us);
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            if let Ok(h) = s.lock() {
                let _ = out.add(&*h);
            }
        }
        out
    }
}

/// Live counters of a run.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Streams whose task has begun connecting.
    pub streams_started: AtomicU64,
    /// Upgrades answered with 101.
    pub handshakes_ok: AtomicU64,
    /// Upgrades that failed (connect error, TLS error, non-101, timeout).
    pub handshake_errors: AtomicU64,
    /// Streams that sent `stop` and closed normally.
    pub streams_completed: AtomicU64,
    /// Streams that ended any other way after a successful handshake.
    pub streams_failed: AtomicU64,
    /// Connected streams right now (gauge).
    pub open_streams: AtomicI64,
    /// Text messages sent, all kinds.
    pub messages_sent: AtomicU64,
    /// `media` messages sent.
    pub media_sent: AtomicU64,
    /// WebSocket payload bytes sent.
    pub bytes_sent: AtomicU64,
    /// Frames received from the server (text, binary, ping, close).
    pub frames_received: AtomicU64,
    /// Streams the server closed before our `stop`.
    pub server_closed_early: AtomicU64,
    /// How late each tick's sends were against the schedule.
    pub send_lag: ShardedHistogram,
    /// Time from TCP connect start to the 101 response.
    pub handshake_latency: ShardedHistogram,
    /// Close codes received from the server, by code (0 = close frame without a code).
    pub close_codes: Mutex<BTreeMap<u16, u64>>,
    /// Failures by short reason.
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// The first full error message seen for each reason.
    pub error_examples: Mutex<BTreeMap<String, String>>,
    /// Bidirectional streams the server ended with 1000 before our `stop`.
    pub streams_stopped_by_server: AtomicU64,
    /// Downlink totals of the simulated Twilio playout (bidirectional streams).
    pub playout: Mutex<PlayoutStats>,
    /// Downlink frames Twilio would reject (bad JSON, wrong SID, binary, …).
    pub downlink_invalid: AtomicU64,
}

impl RunStats {
    /// Adds one stream's playout counters to the run's.
    pub fn add_playout(&self, p: &PlayoutStats) {
        if let Ok(mut t) = self.playout.lock() {
            t.media_frames += p.media_frames;
            t.media_bytes += p.media_bytes;
            t.marks += p.marks;
            t.clears += p.clears;
            t.echoed_played += p.echoed_played;
            t.echoed_cleared += p.echoed_cleared;
            t.marks_overflowed += p.marks_overflowed;
            t.bytes_cleared += p.bytes_cleared;
            t.max_buffered_ms = t.max_buffered_ms.max(p.max_buffered_ms);
        }
    }

    /// Counts one close code sent by the server.
    pub fn close_code(&self, code: u16) {
        if let Ok(mut m) = self.close_codes.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    /// Counts one failure under `reason` (short, low-cardinality text).
    pub fn error(&self, reason: String) {
        if let Ok(mut m) = self.errors.lock() {
            // Bounded: reasons are a small closed set, but guard against surprises.
            if m.len() < 64 || m.contains_key(&reason) {
                *m.entry(reason).or_default() += 1;
            } else {
                *m.entry("other".to_string()).or_default() += 1;
            }
        }
    }

    /// Keeps `detail` as the example of `reason` if it is the first one.
    pub fn error_example(&self, reason: &str, detail: String) {
        if let Ok(mut m) = self.error_examples.lock() {
            if m.len() < 64 && !m.contains_key(reason) {
                m.insert(reason.to_string(), detail);
            }
        }
    }

    /// Shorthand for a relaxed load.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Percentiles of a microsecond histogram, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    /// Number of values.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest value.
    pub max_ms: f64,
}

impl Percentiles {
    /// Summarises `h` (values in µs).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Histogram buckets for charts: `(upper bound in ms, count)`, about 40 linear buckets up
/// to the 99.9th percentile plus one overflow bucket.
pub fn chart_buckets(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let top = h.value_at_quantile(0.999).max(1);
    let n = 40u64;
    let width = top.div_ceil(n).max(1);
    let mut out = Vec::with_capacity(n as usize + 1);
    let mut lo = 0u64;
    for i in 1..=n {
        let hi = width * i;
        out.push((hi as f64 / 1000.0, h.count_between(lo + 1, hi)));
        lo = hi;
    }
    let over = h.len().saturating_sub(h.count_between(0, lo));
    out.push((h.max() as f64 / 1000.0, over));
    out
}
