//! The sampled latency probe (`--latency-probe`).
//!
//! A second, deliberately light consumer on its own thread and its own librdkafka client,
//! assigned to one partition of `<prefix>.audio.inbound` (by default the first one a record
//! arrives on). It verifies nothing: per record it stamps the receipt time, then computes three
//! latencies and drops the record:
//!
//! - *send → receipt*, per chunk: receipt − the chunk's scheduled send time (the same
//!   definition the full verifier uses, so the two compare record for record on this
//!   partition);
//! - *gateway → receipt*, per record: receipt (unix µs) − the record's `received_at_us`
//!   header, the gateway's receive time: Kafka's share alone (gateway enqueue, linger,
//!   broker, fetch);
//! - *send → gateway*, per record: `received_at_us` − the scheduled send time of its first
//!   chunk: the WebSocket leg.
//!
//! Because it reads a small sample with nothing else to do, its figures are what a consumer
//! that keeps up would see; the difference to the full verifier is the harness's own lag.

use crate::consume::{
    assign_at_end, low_latency_consumer, Assignment, Clock, ConsumerLag, LagSampler, LagTracker,
};
use crate::stats::{new_histogram, Percentiles};
use crate::verify::{chunk_due, RegMsg, StreamReg, VerifyConfig, VerifyError};
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Which sample the probe reads.
#[derive(Debug, Clone, Default)]
pub struct ProbeConfig {
    /// Partition of `<prefix>.audio.inbound` to read; `None` = the first partition a record
    /// arrives on (a gateway that keeps its streams on a few partitions,
    /// `--partitions-per-instance`, leaves the others empty).
    pub partition: Option<i32>,
    /// Also summarise each window of this length (`--latency-window`), so a long run shows
    /// when its latency moved, not only its overall percentiles.
    pub window: Option<Duration>,
}

/// The probe's latency over one window of the run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProbeWindow {
    /// Window end, seconds since the probe started.
    pub end_s: f64,
    /// Scheduled send → probe receipt, chunks received in the window.
    pub send_to_receipt: Percentiles,
    /// Gateway receive → probe receipt, records received in the window.
    pub gateway_to_receipt: Percentiles,
}

/// What the probe measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProbeSummary {
    /// Topic read.
    pub topic: String,
    /// Partition read (-1: chosen automatically and no record ever arrived).
    pub partition: i32,
    /// Records read.
    pub records: u64,
    /// Chunks of this run's streams timed.
    pub chunks: u64,
    /// Records of streams this run does not know.
    pub foreign_records: u64,
    /// Records without the headers needed.
    pub malformed_records: u64,
    /// Scheduled send → probe receipt, per chunk.
    pub send_to_receipt: Percentiles,
    /// Gateway receive (`received_at_us`) → probe receipt, per record.
    pub gateway_to_receipt: Percentiles,
    /// Scheduled send → gateway receive, per record (first chunk).
    pub send_to_gateway: Percentiles,
    /// The probe consumer's own lag (should stay near zero).
    pub consumer_lag: ConsumerLag,
    /// The partition did not exist when the run started.
    pub missing: bool,
    /// Window length, seconds (0 = no windows).
    pub window_s: f64,
    /// Per window (`--latency-window`), in order; empty without windows.
    pub windows: Vec<ProbeWindow>,
}

/// Handle to the probe thread.
pub struct LatencyProbe {
    tx: mpsc::Sender<RegMsg>,
    stop: Arc<AtomicBool>,
    partition: Arc<AtomicI32>,
    thread: std::thread::JoinHandle<ProbeSummary>,
}

impl LatencyProbe {
    /// Assigns the probe's partition (or, automatic, every partition until the first record)
    /// at its high watermark and starts the thread. Blocking.
    pub fn start(
        cfg: &VerifyConfig,
        probe: &ProbeConfig,
        lag_every: Duration,
    ) -> Result<LatencyProbe, VerifyError> {
        let consumer: BaseConsumer = low_latency_consumer(&cfg.brokers, 5).create()?;
        let topic = format!("{}.audio.inbound", cfg.topic_prefix);
        let assignment = assign_at_end(&consumer, std::slice::from_ref(&topic), probe.partition)?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let partition = Arc::new(AtomicI32::new(probe.partition.unwrap_or(-1)));
        let partition2 = partition.clone();
        let mut summary = ProbeSummary {
            topic: topic.clone(),
            partition: probe.partition.unwrap_or(-1),
            missing: !assignment.missing_topics.is_empty(),
            window_s: probe.window.map_or(0.0, |w| w.as_secs_f64()),
            ..Default::default()
        };
        let brokers = cfg.brokers.clone();
        let window = probe.window;
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let mut p = Probe::new();
                if let Some(w) = window {
                    p.set_window(w);
                }
                let assignment = if assignment.missing_topics.is_empty() && probe_auto(&partition2)
                {
                    match lock_first_partition(&consumer, &topic, &rx, &stop2, &mut p) {
                        Some((part, next)) => {
                            partition2.store(part, Ordering::Relaxed);
                            summary.partition = part;
                            Assignment {
                                partitions: vec![(0, part, next)],
                                topics: vec![topic],
                                missing_topics: Vec::new(),
                            }
                        }
                        None => {
                            p.fill(&mut summary);
                            return summary;
                        }
                    }
                } else {
                    assignment
                };
                let tracker = Arc::new(LagTracker::new(&assignment));
                let sampler = LagSampler::start(&brokers, tracker.clone(), lag_every, "probe");
                probe_loop(&consumer, &tracker, &rx, &stop2, &mut p);
                p.fill(&mut summary);
                if let Ok(sampler) = sampler {
                    summary.consumer_lag = sampler.finish();
                }
                summary
            })
            .map_err(|e| {
                VerifyError::Kafka(rdkafka::error::KafkaError::ClientCreation(e.to_string()))
            })?;
        Ok(LatencyProbe {
            tx,
            stop,
            partition,
            thread,
        })
    }

    /// Where stream registrations go.
    pub fn sender(&self) -> mpsc::Sender<RegMsg> {
        self.tx.clone()
    }

    /// The partition the probe reads, -1 until an automatic choice is made.
    pub fn partition(&self) -> Arc<AtomicI32> {
        self.partition.clone()
    }

    /// Stops the probe and returns what it measured. Blocking.
    pub fn finish(self) -> ProbeSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn probe_auto(partition: &AtomicI32) -> bool {
    partition.load(Ordering::Relaxed) < 0
}

/// Automatic choice: reads every partition until the first record, times it, then keeps only
/// that partition (from the next offset). Returns the partition and that offset, or `None`
/// when stopped first.
fn lock_first_partition(
    consumer: &BaseConsumer,
    topic: &str,
    regs: &mpsc::Receiver<RegMsg>,
    stop: &AtomicBool,
    p: &mut Probe,
) -> Option<(i32, i64)> {
    while let Some((msg, at)) = next_record(consumer, regs, stop, p) {
        let (part, next) = (msg.partition(), msg.offset() + 1);
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, part, Offset::Offset(next))
            .is_err()
            || consumer.assign(&tpl).is_err()
        {
            continue;
        }
        time_record(&msg, at, regs, p);
        return Some((part, next));
    }
    None
}

/// The probe's accounting, separate from the Kafka loop so it can be tested.
#[derive(Debug)]
pub struct Probe {
    streams: HashMap<String, StreamReg>,
    clock: Clock,
    records: u64,
    chunks: u64,
    foreign: u64,
    malformed: u64,
    send_to_receipt: Histogram<u64>,
    gateway_to_receipt: Histogram<u64>,
    send_to_gateway: Histogram<u64>,
    window: Option<Window>,
}

/// The open window and the closed ones.
#[derive(Debug)]
struct Window {
    len: Duration,
    started: Instant,
    ends: Instant,
    send_to_receipt: Histogram<u64>,
    gateway_to_receipt: Histogram<u64>,
    closed: Vec<ProbeWindow>,
}

impl Window {
    /// Closes every window that ended by `now` (an empty one too: a stall shows as a window
    /// without records).
    fn advance(&mut self, now: Instant) {
        while now >= self.ends {
            self.close();
            self.ends += self.len;
        }
    }

    fn close(&mut self) {
        self.closed.push(ProbeWindow {
            end_s: (self.ends - self.started).as_secs_f64(),
            send_to_receipt: Percentiles::of(&self.send_to_receipt),
            gateway_to_receipt: Percentiles::of(&self.gateway_to_receipt),
        });
        self.send_to_receipt.reset();
        self.gateway_to_receipt.reset();
    }
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

fn us_clamped(v: i64) -> u64 {
    v.clamp(1, 3_600_000_000) as u64
}

impl Probe {
    /// Empty accounting, anchored to the clock now.
    pub fn new() -> Self {
        Probe {
            streams: HashMap::new(),
            clock: Clock::new(),
            records: 0,
            chunks: 0,
            foreign: 0,
            malformed: 0,
            send_to_receipt: new_histogram(),
            gateway_to_receipt: new_histogram(),
            send_to_gateway: new_histogram(),
            window: None,
        }
    }

    /// Also keeps percentiles per window of `len`, from now.
    pub fn set_window(&mut self, len: Duration) {
        let now = Instant::now();
        self.window = (!len.is_zero()).then(|| Window {
            len,
            started: now,
            ends: now + len,
            send_to_receipt: new_histogram(),
            gateway_to_receipt: new_histogram(),
            closed: Vec::new(),
        });
    }

    /// Closes the windows that ended by `now` (called on every poll, records or not).
    pub fn tick(&mut self, now: Instant) {
        if let Some(w) = &mut self.window {
            w.advance(now);
        }
    }

    /// Applies a registration (`Start` only matters).
    pub fn apply(&mut self, msg: RegMsg) {
        if let RegMsg::Start(r) = msg {
            self.streams.insert(r.sid.clone(), r);
        }
    }

    /// Whether `sid` is registered.
    pub fn knows(&self, sid: &str) -> bool {
        self.streams.contains_key(sid)
    }

    /// Times one record received at `at`: stream SID, `chunk`, `chunks` and
    /// `received_at_us` (gateway receive time, unix µs).
    pub fn record(
        &mut self,
        at: Instant,
        sid: &str,
        chunk: u64,
        chunks: u64,
        received_at_us: Option<i64>,
    ) {
        self.records += 1;
        let Some(reg) = self.streams.get(sid) else {
            self.foreign += 1;
            return;
        };
        let at_unix = self.clock.unix_us(at);
        if let Some(w) = &mut self.window {
            w.advance(at);
        }
        for c in chunk..chunk + chunks.max(1) {
            let due = chunk_due(reg, c);
            let v = us_clamped(at.saturating_duration_since(due).as_micros() as i64);
            let _ = self.send_to_receipt.record(v);
            if let Some(w) = &mut self.window {
                let _ = w.send_to_receipt.record(v);
            }
            self.chunks += 1;
        }
        if let Some(gw) = received_at_us {
            let v = us_clamped(at_unix - gw);
            let _ = self.gateway_to_receipt.record(v);
            if let Some(w) = &mut self.window {
                let _ = w.gateway_to_receipt.record(v);
            }
            let sent = self.clock.unix_us(chunk_due(reg, chunk));
            let _ = self.send_to_gateway.record(us_clamped(gw - sent));
        }
    }

    /// Counts a record that lacked the needed headers.
    pub fn malformed(&mut self) {
        self.records += 1;
        self.malformed += 1;
    }

    /// Writes the results into `s` (the open window is closed first, if it holds records).
    pub fn fill(&mut self, s: &mut ProbeSummary) {
        if let Some(w) = &mut self.window {
            w.advance(Instant::now());
            if !w.send_to_receipt.is_empty() {
                w.ends = Instant::now();
                w.close();
            }
            s.windows = std::mem::take(&mut w.closed);
        }
        s.records = self.records;
        s.chunks = self.chunks;
        s.foreign_records = self.foreign;
        s.malformed_records = self.malformed;
        s.send_to_receipt = Percentiles::of(&self.send_to_receipt);
        s.gateway_to_receipt = Percentiles::of(&self.gateway_to_receipt);
        s.send_to_gateway = Percentiles::of(&self.send_to_gateway);
    }
}

fn probe_loop(
    consumer: &BaseConsumer,
    tracker: &LagTracker,
    regs: &mpsc::Receiver<RegMsg>,
    stop: &AtomicBool,
    p: &mut Probe,
) {
    while let Some((msg, at)) = next_record(consumer, regs, stop, p) {
        tracker.received(0, msg.partition(), msg.offset());
        time_record(&msg, at, regs, p);
    }
}

/// Polls until a record arrives (returned with its receipt stamp) or `stop` is set (`None`),
/// applying stream registrations while idle.
fn next_record<'c>(
    consumer: &'c BaseConsumer,
    regs: &mpsc::Receiver<RegMsg>,
    stop: &AtomicBool,
    p: &mut Probe,
) -> Option<(rdkafka::message::BorrowedMessage<'c>, Instant)> {
    while !stop.load(Ordering::Relaxed) {
        let Some(res) = consumer.poll(Duration::from_millis(20)) else {
            while let Ok(m) = regs.try_recv() {
                p.apply(m);
            }
            p.tick(Instant::now());
            continue;
        };
        let at = Instant::now();
        if let Ok(msg) = res {
            return Some((msg, at));
        }
    }
    None
}

/// Reads the headers the probe needs from one record received at `at` and times it.
fn time_record(
    msg: &rdkafka::message::BorrowedMessage<'_>,
    at: Instant,
    regs: &mpsc::Receiver<RegMsg>,
    p: &mut Probe,
) {
    let mut sid = msg.key().and_then(|k| std::str::from_utf8(k).ok());
    let (mut chunk, mut chunks, mut gw) = (None, 1u64, None);
    if let Some(h) = msg.headers() {
        for i in 0..h.count() {
            let Some(hd) = h.try_get(i) else { continue };
            let Some(v) = hd.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                continue;
            };
            match hd.key {
                "chunk" => chunk = v.parse().ok(),
                "chunks" => chunks = v.parse().unwrap_or(1),
                "received_at_us" => gw = v.parse().ok(),
                "stream_sid" if sid.is_none() => sid = Some(v),
                _ => {}
            }
        }
    }
    match (sid, chunk) {
        (Some(sid), Some(chunk)) => {
            if !p.knows(sid) {
                while let Ok(m) = regs.try_recv() {
                    p.apply(m);
                }
            }
            p.record(at, sid, chunk, chunks, gw);
        }
        _ => p.malformed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_times_chunks_against_the_schedule_and_the_gateway_stamp() {
        let mut p = Probe::new();
        let start = Instant::now();
        p.apply(RegMsg::Start(StreamReg {
            sid: "MZp".into(),
            start,
            speed: 1.0,
            flood: false,
            offsets: [0, 0],
        }));
        // Chunk 11 was due 200 ms after start; received at 230 ms. The gateway stamped it
        // 5 ms after it was due.
        let at = start + Duration::from_millis(230);
        let gw = p.clock.unix_us(start + Duration::from_millis(205));
        p.record(at, "MZp", 11, 1, Some(gw));
        p.record(at, "MZother", 1, 1, Some(gw));
        p.malformed();
        let mut s = ProbeSummary::default();
        p.fill(&mut s);
        assert_eq!(
            (s.records, s.chunks, s.foreign_records, s.malformed_records),
            (3, 1, 1, 1)
        );
        let near = |v: f64, want: f64| (v - want).abs() < 0.1;
        assert!(
            near(s.send_to_receipt.max_ms, 30.0),
            "{:?}",
            s.send_to_receipt
        );
        assert!(
            near(s.gateway_to_receipt.max_ms, 25.0),
            "{:?}",
            s.gateway_to_receipt
        );
        assert!(
            near(s.send_to_gateway.max_ms, 5.0),
            "{:?}",
            s.send_to_gateway
        );
    }
}
