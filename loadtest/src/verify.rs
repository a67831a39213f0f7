//! End-to-end verification against the gateway's Kafka output.
//!
//! [`Ledger`] is the pure accounting: it is told what every stream sent (through a
//! [`Registrar`]) and fed the records read back, and counts per stream and track, by chunk
//! number: received, missing, duplicated, out of order, PCM mismatches (bit-exact against
//! the G.711 decode of what was sent) and end-to-end latency (receipt time − scheduled send
//! time of the chunk).
//!
//! [`KafkaVerifier`] keeps the measurement apart from the checking, so the harness does not
//! measure itself: a consume loop (`verify-rx`) assigned (no consumer group) to every
//! partition of `<prefix>.audio.inbound`, `<prefix>.audio.outbound` and `<prefix>.events` at
//! the high watermarks captured before the run starts only polls, stamps each record on
//! receipt and hands it over a bounded queue to the verification thread (`verify`), which
//! owns the ledger. How long records waited in that queue, whether the consume loop ever
//! blocked on it, and the consumer's broker-side lag (high watermark − position, sampled on a
//! separate client) are all reported ([`HarnessLag`]). With a [`ProbeConfig`], a separate
//! light consumer on one partition ([`crate::probe`]) times the same records without any
//! verification, and [`LatencyAttribution`] puts the two side by side.
//!
//! With [`VerifyOptions::after_load`] the consumer is not even assigned until the load has
//! ended: the start offsets are still the watermarks captured before the run, but nothing is
//! fetched while streams run, so a CPU measurement of the server is not shared with the
//! verifier's reading and the broker's serving of it (what a server that nobody reads back,
//! such as the Kafka floor, enjoys). Everything is still read and checked, after the load;
//! the verifier then measures no latency (the summary says so: `read_after_load`). A
//! [`ProbeConfig`] still runs live beside it: its one partition is the only thing read while
//! the load runs, so the latency figure comes from the light consumer alone (no
//! [`LatencyAttribution`] then: the verifier has no figure to compare).

use crate::audio::{ChunkTable, CHUNK_BYTES, ULAW_TO_PCM};
use crate::consume::{
    low_latency_consumer, plan_at_end_skipping, topic_index, ConsumerLag, LagSampler, LagTracker,
    RawRecord,
};
use crate::message::Track;
use crate::pacing::CHUNK_PERIOD;
use crate::probe::{LatencyProbe, ProbeConfig, ProbeSummary};
use crate::stats::{chart_buckets, new_histogram, Percentiles};
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Chunk numbers above this are counted as unexpected instead of being tracked (guards
/// memory against a corrupted header).
const MAX_TRACKED_CHUNK: u64 = 50_000_000;

/// What a stream tells the verifier when its media begins.
#[derive(Debug, Clone)]
pub struct StreamReg {
    /// Stream SID = Kafka record key.
    pub sid: String,
    /// Scheduled instant of chunk 1.
    pub start: Instant,
    /// Speed factor of the schedule.
    pub speed: f64,
    /// Flood mode: no schedule, latency is measured from `start`.
    pub flood: bool,
    /// Chunk-table offsets of the inbound and outbound audio.
    pub offsets: [usize; 2],
}

/// Messages from stream tasks (and the runner) to the verifier thread.
#[derive(Debug, Clone)]
pub enum RegMsg {
    /// A stream began sending media.
    Start(StreamReg),
    /// A stream ended after sending this many media chunks per track.
    Finished {
        /// Stream SID.
        sid: String,
        /// Chunks sent, `[inbound, outbound]`.
        sent: [u64; 2],
    },
    /// The server ended this stream first, normally (a `stop` record on a bidirectional
    /// stream): chunks sent after it stopped reading are not loss.
    ServerClosed {
        /// Stream SID.
        sid: String,
    },
    /// All streams are done: stop after `grace`, or sooner once nothing is missing.
    Finish {
        /// Longest wait for late records.
        grace: Duration,
    },
}

/// Sending side of the registration channels; cloned into every stream.
///
/// Unbounded by design: it carries two small messages per stream, so its size is bounded
/// by the number of streams, and a stream must never block on the verifier. Every message
/// goes to each listener (the verifier, and the latency probe when there is one).
#[derive(Debug, Clone)]
pub struct Registrar(Vec<mpsc::Sender<RegMsg>>);

impl Registrar {
    /// A registrar feeding `listeners`.
    pub fn new(listeners: Vec<mpsc::Sender<RegMsg>>) -> Self {
        Registrar(listeners)
    }

    fn send(&self, msg: RegMsg) {
        if let Some((last, rest)) = self.0.split_last() {
            for tx in rest {
                let _ = tx.send(msg.clone());
            }
            let _ = last.send(msg);
        }
    }

    /// Registers a stream's start.
    pub fn start(&self, reg: StreamReg) {
        self.send(RegMsg::Start(reg));
    }

    /// Reports what a stream sent in total.
    pub fn finished(&self, sid: String, sent: [u64; 2]) {
        self.send(RegMsg::Finished { sid, sent });
    }

    /// Reports that the server ended the stream first, normally (before `finished`).
    pub fn server_closed(&self, sid: String) {
        self.send(RegMsg::ServerClosed { sid });
    }
}

/// Instant at which chunk `chunk` (from 1) of a registered stream was scheduled to be sent
/// (the stream's start in flood mode, where there is no schedule).
pub fn chunk_due(reg: &StreamReg, chunk: u64) -> Instant {
    if reg.flood {
        return reg.start;
    }
    let period = CHUNK_PERIOD.as_nanos() as f64 / reg.speed;
    reg.start + Duration::from_nanos((chunk.saturating_sub(1) as f64 * period).round() as u64)
}

/// Set of received chunk indices (0-based), compacted below the first gap.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Every index below `base` has been seen.
    base: u64,
    /// Bit i of word w = index `base + 64 w + i` seen.
    words: VecDeque<u64>,
}

impl Seen {
    /// Marks `i`; false if it was already marked.
    fn insert(&mut self, i: u64) -> bool {
        if i < self.base {
            return false;
        }
        let rel = i - self.base;
        let w = (rel / 64) as usize;
        while self.words.len() <= w {
            self.words.push_back(0);
        }
        let bit = 1u64 << (rel % 64);
        if self.words[w] & bit != 0 {
            return false;
        }
        self.words[w] |= bit;
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
        }
        true
    }

    /// Number of marked indices below `n`.
    fn count_below(&self, n: u64) -> u64 {
        let mut c = self.base.min(n);
        for (w, word) in self.words.iter().enumerate() {
            let lo = self.base + 64 * w as u64;
            if lo >= n {
                break;
            }
            let take = (n - lo).min(64);
            let mask = if take == 64 {
                u64::MAX
            } else {
                (1u64 << take) - 1
            };
            c += (word & mask).count_ones() as u64;
        }
        c
    }
}

/// Per stream and track accounting.
#[derive(Debug, Default, Clone)]
struct TrackLedger {
    seen: Seen,
    max_chunk: u64,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    mismatched: u64,
    unexpected: u64,
}

#[derive(Debug)]
struct StreamLedger {
    reg: StreamReg,
    sent: Option<[u64; 2]>,
    tracks: [TrackLedger; 2],
    start_event: bool,
    end_event: bool,
    /// The server ended the stream first: an unread tail is not loss.
    server_closed: bool,
}

/// Payload encoding named by the `encoding` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Little-endian 16-bit PCM, 320 bytes per chunk.
    PcmS16le,
    /// Raw μ-law, 160 bytes per chunk.
    Mulaw,
}

/// One audio record as read from Kafka.
#[derive(Debug, Clone, Copy)]
pub struct AudioRecord<'a> {
    /// Record key / `stream_sid` header.
    pub sid: &'a str,
    /// `track` header.
    pub track: Track,
    /// `chunk` header: number of the first chunk in the record.
    pub chunk: u64,
    /// `chunks` header (default 1): chunks concatenated in the value.
    pub chunks: u64,
    /// `encoding` header.
    pub encoding: Encoding,
    /// Record value.
    pub payload: &'a [u8],
}

/// Totals for one track direction.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrackTotals {
    /// Chunks the streams sent.
    pub expected: u64,
    /// Distinct sent chunks read back.
    pub received: u64,
    /// Sent chunks never read back.
    pub missing: u64,
    /// Chunks read back more than once (extra copies).
    pub duplicated: u64,
    /// Chunks read back after a higher chunk number of the same stream and track.
    pub out_of_order: u64,
    /// Chunks whose audio differs from what was sent.
    pub pcm_mismatches: u64,
    /// Chunks read back that were never sent (number beyond what the stream sent).
    pub unexpected: u64,
    /// Chunks sent after the server ended the stream (a `stop` record) and never
    /// published: not expected, not missing.
    pub unread_after_server_close: u64,
}

/// Verification results of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifySummary {
    /// Streams that registered.
    pub streams: u64,
    /// Streams with a `start` event on the events topic.
    pub start_events: u64,
    /// Streams with a `stop` or `disconnect` event.
    pub end_events: u64,
    /// Sum of inbound and outbound.
    pub total: TrackTotals,
    /// Inbound only.
    pub inbound: TrackTotals,
    /// Outbound only.
    pub outbound: TrackTotals,
    /// Audio records read (a record may hold several chunks).
    pub audio_records: u64,
    /// Records that held more than one chunk.
    pub batched_records: u64,
    /// Records for streams of other runs (ignored).
    pub foreign_records: u64,
    /// Records with missing or unparsable headers.
    pub malformed_records: u64,
    /// Outbound records of audio the gateway played into calls (`source: playback`, the
    /// bidirectional recording): not uplink audio, counted here and not verified as such.
    pub playback_recorded_records: u64,
    /// End-to-end latency per chunk: receipt time (stamped by the consume loop before any
    /// checking) − scheduled send time. Includes the verifying consumer's own fetch lag.
    pub latency: Percentiles,
    /// Latency chart buckets `(upper ms, count)`.
    pub latency_buckets: Vec<(f64, u64)>,
    /// Events seen by `type`.
    pub events: BTreeMap<String, u64>,
    /// Sum of `frames_published` over stop/disconnect events.
    pub gateway_frames_published: u64,
    /// Sum of `frames_dropped` over stop/disconnect events.
    pub gateway_frames_dropped: u64,
    /// Consumer errors seen while polling.
    pub consumer_errors: u64,
    /// Topics that did not exist when the run started (not verified).
    pub missing_topics: Vec<String>,
    /// Inbound audio was not read (`--no-verify-inbound`): inbound totals are all zero.
    pub inbound_not_verified: bool,
    /// Latency is measured from stream start because the run was in flood mode.
    pub flood_latency_from_start: bool,
    /// Nothing was read while the load ran ([`VerifyOptions::after_load`]): every count is
    /// exact, `latency` is empty (not measured).
    pub read_after_load: bool,
    /// The verifying consumer's own lag: what part of `latency` is the harness.
    pub harness: HarnessLag,
    /// The full verifier's latency restricted to the latency probe's partition (the same
    /// records the probe timed); empty without a probe.
    pub latency_probe_partition: Percentiles,
    /// The sampled latency probe, when `--latency-probe` was given.
    pub probe: Option<ProbeSummary>,
    /// Probe against full verifier on the same records: how much of the end-to-end figure
    /// is the harness's own lag.
    pub attribution: Option<LatencyAttribution>,
}

/// How far behind the verifying consumer itself ran.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HarnessLag {
    /// Time records waited between receipt (stamp) and verification.
    pub receipt_to_verify: Percentiles,
    /// Capacity of the receipt → verification queue, records.
    pub queue_capacity: u64,
    /// Deepest the queue got, records.
    pub queue_max_depth: u64,
    /// Time the consume loop spent blocked on a full queue (stamps after that are late).
    pub receiver_blocked_ms: f64,
    /// Times the consume loop found the queue full.
    pub receiver_blocked_times: u64,
    /// Records the consume loop received (all topics).
    pub records_received: u64,
    /// Broker-side backlog of the consume loop, sampled against high watermarks.
    pub consumer_lag: ConsumerLag,
}

/// The probe's latency against the full verifier's on the same partition.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LatencyAttribution {
    /// Topic and partition both measured.
    pub sample: String,
    /// Chunks the probe timed.
    pub probe_count: u64,
    /// Chunks the full verifier timed on that partition.
    pub verifier_count: u64,
    /// Probe (light consumer, send → receipt), p50 ms.
    pub probe_p50_ms: f64,
    /// Probe p99 ms.
    pub probe_p99_ms: f64,
    /// Full verifier on the same partition (send → receipt), p50 ms.
    pub verifier_p50_ms: f64,
    /// Full verifier on the same partition, p99 ms.
    pub verifier_p99_ms: f64,
    /// Full verifier over all partitions, p50 ms.
    pub verifier_all_p50_ms: f64,
    /// Full verifier over all partitions, p99 ms.
    pub verifier_all_p99_ms: f64,
    /// verifier − probe at p50: the harness's own share, ms.
    pub harness_p50_ms: f64,
    /// verifier − probe at p99, ms.
    pub harness_p99_ms: f64,
    /// Gateway receive (`received_at_us`) → probe receipt, p50 ms: the Kafka path alone.
    pub gateway_to_receipt_p50_ms: f64,
    /// Gateway receive → probe receipt, p99 ms.
    pub gateway_to_receipt_p99_ms: f64,
}

impl LatencyAttribution {
    /// Compares `probe` with the verifier's figures of `summary`.
    pub fn of(summary: &VerifySummary, probe: &ProbeSummary) -> Self {
        let v = &summary.latency_probe_partition;
        let p = &probe.send_to_receipt;
        LatencyAttribution {
            sample: format!("{} partition {}", probe.topic, probe.partition),
            probe_count: p.count,
            verifier_count: v.count,
            probe_p50_ms: p.p50_ms,
            probe_p99_ms: p.p99_ms,
            verifier_p50_ms: v.p50_ms,
            verifier_p99_ms: v.p99_ms,
            verifier_all_p50_ms: summary.latency.p50_ms,
            verifier_all_p99_ms: summary.latency.p99_ms,
            harness_p50_ms: ((v.p50_ms - p.p50_ms) * 1000.0).round() / 1000.0,
            harness_p99_ms: ((v.p99_ms - p.p99_ms) * 1000.0).round() / 1000.0,
            gateway_to_receipt_p50_ms: probe.gateway_to_receipt.p50_ms,
            gateway_to_receipt_p99_ms: probe.gateway_to_receipt.p99_ms,
        }
    }
}

/// Pure accounting of what was sent against what was read back.
#[derive(Debug)]
pub struct Ledger {
    audio: Arc<ChunkTable>,
    streams: HashMap<String, StreamLedger>,
    latency: Histogram<u64>,
    /// Latency of inbound records per partition, kept while a probe runs; the summary reports
    /// the probe's partition (decided by the probe at any time, so every partition is kept:
    /// the verifier may see that partition's first records before the probe has chosen).
    latency_by_partition: Vec<Histogram<u64>>,
    /// The partition the latency probe read (-1: none), set before [`Ledger::summary`].
    pub probe_partition: i32,
    summary: VerifySummary,
    /// Live mirror of the latency histogram, when someone watches windows of it.
    mirror: Option<Arc<VerifyProgress>>,
}

impl Ledger {
    /// An empty ledger over the run's audio.
    pub fn new(audio: Arc<ChunkTable>) -> Self {
        Ledger {
            audio,
            streams: HashMap::new(),
            latency: new_histogram(),
            latency_by_partition: Vec::new(),
            probe_partition: -1,
            summary: VerifySummary::default(),
            mirror: None,
        }
    }

    /// Applies one registration message (not `Finish`).
    pub fn apply(&mut self, msg: RegMsg) {
        match msg {
            RegMsg::Start(reg) => {
                if reg.flood {
                    self.summary.flood_latency_from_start = true;
                }
                self.streams.insert(
                    reg.sid.clone(),
                    StreamLedger {
                        reg,
                        sent: None,
                        tracks: Default::default(),
                        start_event: false,
                        end_event: false,
                        server_closed: false,
                    },
                );
            }
            RegMsg::Finished { sid, mut sent } => {
                if self.summary.inbound_not_verified {
                    sent[0] = 0;
                }
                if let Some(s) = self.streams.get_mut(&sid) {
                    s.sent = Some(sent);
                }
            }
            RegMsg::ServerClosed { sid } => {
                if let Some(s) = self.streams.get_mut(&sid) {
                    s.server_closed = true;
                }
            }
            RegMsg::Finish { .. } => {}
        }
    }

    /// Whether `sid` is a stream of this run.
    pub fn knows(&self, sid: &str) -> bool {
        self.streams.contains_key(sid)
    }

    /// Accounts one audio record received at `at`.
    pub fn audio(&mut self, rec: AudioRecord<'_>, at: Instant) {
        self.audio_in(rec, at, None);
    }

    /// Accounts one audio record received at `at`; with `inbound_partition` (an inbound record
    /// while a probe runs) it also feeds that partition's latency histogram, from which the
    /// summary takes the probe's (the same records the probe times).
    pub fn audio_in(&mut self, rec: AudioRecord<'_>, at: Instant, inbound_partition: Option<i32>) {
        self.summary.audio_records += 1;
        let Some(s) = self.streams.get_mut(rec.sid) else {
            self.summary.foreign_records += 1;
            return;
        };
        if rec.chunks > 1 {
            self.summary.batched_records += 1;
        }
        let per_chunk = match rec.encoding {
            Encoding::PcmS16le => CHUNK_BYTES * 2,
            Encoding::Mulaw => CHUNK_BYTES,
        };
        let payload_ok = rec.payload.len() == per_chunk * rec.chunks as usize;
        let t = &mut s.tracks[rec.track.index()];
        for j in 0..rec.chunks {
            let chunk = rec.chunk + j;
            if chunk == 0 || chunk > MAX_TRACKED_CHUNK {
                t.unexpected += 1;
                continue;
            }
            if !t.seen.insert(chunk - 1) {
                t.duplicated += 1;
                continue;
            }
            t.received += 1;
            if chunk < t.max_chunk {
                t.out_of_order += 1;
            }
            t.max_chunk = t.max_chunk.max(chunk);
            // Audio check.
            let sent = self
                .audio
                .ulaw(s.reg.offsets[rec.track.index()] + chunk as usize - 1);
            let ok = payload_ok && {
                let got = &rec.payload[j as usize * per_chunk..(j as usize + 1) * per_chunk];
                match rec.encoding {
                    Encoding::Mulaw => got == sent,
                    Encoding::PcmS16le => got
                        .chunks_exact(2)
                        .zip(sent)
                        .all(|(p, &u)| i16::from_le_bytes([p[0], p[1]]) == ULAW_TO_PCM[u as usize]),
                }
            };
            if !ok {
                t.mismatched += 1;
            }
            if self.summary.read_after_load {
                continue; // read after the load: a receipt time says nothing about latency
            }
            // Latency against the schedule of this chunk.
            let due = chunk_due(&s.reg, chunk);
            let us = (at.saturating_duration_since(due).as_micros() as u64).clamp(1, 3_600_000_000);
            let _ = self.latency.record(us);
            if let Some(p) = inbound_partition.and_then(|p| usize::try_from(p).ok()) {
                while self.latency_by_partition.len() <= p {
                    self.latency_by_partition.push(new_histogram());
                }
                let _ = self.latency_by_partition[p].record(us);
            }
            if let Some(m) = &self.mirror {
                if let Ok(mut h) = m.latency.lock() {
                    let _ = h.record(us);
                }
            }
        }
    }

    /// Accounts one JSON event from the events topic.
    pub fn event(&mut self, value: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(value) else {
            self.summary.malformed_records += 1;
            return;
        };
        let sid = v.get("stream_sid").and_then(|s| s.as_str()).unwrap_or("");
        let Some(s) = self.streams.get_mut(sid) else {
            self.summary.foreign_records += 1;
            return;
        };
        let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("unknown");
        *self.summary.events.entry(kind.to_string()).or_default() += 1;
        match kind {
            "start" => s.start_event = true,
            "stop" | "disconnect" => {
                s.end_event = true;
                let num = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_u64().or_else(|| x.as_str()?.parse().ok()))
                        .unwrap_or(0)
                };
                self.summary.gateway_frames_published += num("frames_published");
                self.summary.gateway_frames_dropped += num("frames_dropped");
            }
            _ => {}
        }
    }

    /// Counts a record whose headers could not be parsed.
    pub fn malformed(&mut self) {
        self.summary.malformed_records += 1;
    }

    /// True when every registered stream has finished, every sent chunk was read back and
    /// an end event was seen for every stream.
    pub fn complete(&self) -> bool {
        self.streams.values().all(|s| {
            s.end_event
                && s.sent.is_some_and(|sent| {
                    (0..2).all(|t| {
                        let expect = if s.server_closed {
                            s.tracks[t].max_chunk.min(sent[t])
                        } else {
                            sent[t]
                        };
                        s.tracks[t].seen.count_below(expect) == expect
                    })
                })
        })
    }

    /// The latency histogram so far (µs).
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    /// Totals so far. Streams that never reported `Finished` count what they were seen to
    /// send as nothing expected.
    pub fn summary(&self) -> VerifySummary {
        let mut out = self.summary.clone();
        out.streams = self.streams.len() as u64;
        for s in self.streams.values() {
            out.start_events += s.start_event as u64;
            out.end_events += s.end_event as u64;
            let sent = s.sent.unwrap_or([0, 0]);
            for (t, tl) in s.tracks.iter().enumerate() {
                let got = tl.seen.count_below(sent[t]);
                let dst = if t == 0 {
                    &mut out.inbound
                } else {
                    &mut out.outbound
                };
                // A stream the server ended may leave a tail it never read; a gap below
                // the last chunk it published is still loss.
                let read_upto = tl.max_chunk.min(sent[t]);
                let tail = if s.server_closed && tl.seen.count_below(read_upto) == read_upto {
                    sent[t] - read_upto
                } else {
                    0
                };
                dst.expected += sent[t] - tail;
                dst.unread_after_server_close += tail;
                dst.received += got;
                dst.missing += sent[t] - tail - got;
                dst.duplicated += tl.duplicated;
                dst.out_of_order += tl.out_of_order;
                dst.pcm_mismatches += tl.mismatched;
                dst.unexpected += tl.unexpected + (tl.received - got);
            }
        }
        let (i, o) = (&out.inbound, &out.outbound);
        out.total = TrackTotals {
            expected: i.expected + o.expected,
            received: i.received + o.received,
            missing: i.missing + o.missing,
            duplicated: i.duplicated + o.duplicated,
            out_of_order: i.out_of_order + o.out_of_order,
            pcm_mismatches: i.pcm_mismatches + o.pcm_mismatches,
            unexpected: i.unexpected + o.unexpected,
            unread_after_server_close: i.unread_after_server_close + o.unread_after_server_close,
        };
        out.latency = Percentiles::of(&self.latency);
        out.latency_buckets = chart_buckets(&self.latency);
        if let Some(h) = usize::try_from(self.probe_partition)
            .ok()
            .and_then(|p| self.latency_by_partition.get(p))
        {
            out.latency_probe_partition = Percentiles::of(h);
        }
        out
    }
}

/// Errors setting up the consumer.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// librdkafka refused the configuration or an operation.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Verification settings.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// `host:port[,host:port]`.
    pub brokers: String,
    /// Topic prefix (`twilio` → `twilio.audio.inbound`, …).
    pub topic_prefix: String,
}

/// How the verifier measures itself, beyond what it reads.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Run the sampled latency probe beside the verifier.
    pub latency_probe: Option<ProbeConfig>,
    /// Interval of the consumer-lag samples.
    pub lag_every: Duration,
    /// Capacity of the receipt → verification queue, records. When it is full the consume
    /// loop waits (memory stays bounded) and the wait is reported.
    pub queue_capacity: usize,
    /// `fetch.wait.max.ms` of the verifier's consumer. The verifier is not the latency
    /// measurement (the probe is); a longer wait means fewer fetches for the broker to serve.
    pub fetch_wait_ms: u32,
    /// Read and verify `<prefix>.audio.inbound`. Off, inbound chunks are neither expected
    /// nor missing and the summary says so (`inbound_not_verified`): for runs that measure
    /// something else and cannot afford the broker load of a second full uplink reader.
    pub inbound_audio: bool,
    /// Assign the consumer only when the load has ended ([`KafkaVerifier::finish`]), then
    /// read and check everything from the watermarks captured at the start. Latency is not
    /// measured; the grace period counts from the last record read, not from the end of the
    /// load (reading a whole run back takes a while).
    pub after_load: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            latency_probe: None,
            lag_every: Duration::from_secs(1),
            queue_capacity: 65_536,
            fetch_wait_ms: 10,
            inbound_audio: true,
            after_load: false,
        }
    }
}

/// Live counters the verifier threads publish.
#[derive(Debug)]
pub struct VerifyProgress {
    /// Audio chunks verified so far.
    pub chunks_received: AtomicU64,
    /// Copy of the latency histogram (µs) for windowed percentiles (ramp steps).
    pub latency: Mutex<Histogram<u64>>,
    /// Records waiting between receipt and verification.
    pub queue_depth: AtomicU64,
    /// Consumer lag at the last sample, records (shared with the lag sampler).
    pub consumer_lag: Arc<AtomicI64>,
}

impl Default for VerifyProgress {
    fn default() -> Self {
        VerifyProgress {
            chunks_received: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            queue_depth: AtomicU64::new(0),
            consumer_lag: Arc::new(AtomicI64::new(0)),
        }
    }
}

/// Handle to the verifier threads: a consume loop that only stamps and copies records, a
/// verification thread that owns the [`Ledger`], a lag sampler, and optionally the probe.
pub struct KafkaVerifier {
    tx: mpsc::Sender<RegMsg>,
    /// Set when the load has ended: a deferred consume loop assigns and starts reading.
    go: Arc<AtomicBool>,
    progress: Arc<VerifyProgress>,
    thread: std::thread::JoinHandle<VerifySummary>,
    probe: Option<LatencyProbe>,
}

/// What the consume loop reports when it stops.
#[derive(Debug, Default)]
struct ReceiveStats {
    blocked: Duration,
    blocked_times: u64,
    errors: u64,
}

impl KafkaVerifier {
    /// [`KafkaVerifier::start_with`] with default options (no probe).
    pub fn start(cfg: &VerifyConfig, audio: Arc<ChunkTable>) -> Result<Self, VerifyError> {
        Self::start_with(cfg, audio, &VerifyOptions::default())
    }

    /// Connects, captures the high watermarks, assigns, and starts consuming. Blocking
    /// (metadata round trips): call it from `spawn_blocking` or before the runtime is busy.
    pub fn start_with(
        cfg: &VerifyConfig,
        audio: Arc<ChunkTable>,
        opts: &VerifyOptions,
    ) -> Result<Self, VerifyError> {
        let consumer: BaseConsumer =
            low_latency_consumer(&cfg.brokers, opts.fetch_wait_ms).create()?;
        let topics = vec![
            format!("{}.audio.inbound", cfg.topic_prefix),
            format!("{}.audio.outbound", cfg.topic_prefix),
            format!("{}.events", cfg.topic_prefix),
        ];
        // Topic 0 (inbound audio) is not read when its verification is off; the indices
        // stay as they are.
        let skip: &[usize] = if opts.inbound_audio { &[] } else { &[0] };
        let (assignment, tpl) = plan_at_end_skipping(&consumer, &topics, None, skip)?;
        // Deferred: assigned by the consume loop once `go` is set (see the module docs).
        let deferred = if opts.after_load {
            Some(tpl)
        } else {
            consumer.assign(&tpl)?;
            None
        };
        let go = Arc::new(AtomicBool::new(false));
        let tracker = Arc::new(LagTracker::new(&assignment));
        let sampler = LagSampler::start(&cfg.brokers, tracker.clone(), opts.lag_every, "verify")?;
        let probe = match &opts.latency_probe {
            Some(p) => Some(LatencyProbe::start(cfg, p, opts.lag_every)?),
            None => None,
        };

        let (tx, rx) = mpsc::channel();
        let progress = Arc::new(VerifyProgress {
            consumer_lag: sampler.live.clone(),
            ..Default::default()
        });
        let prog = progress.clone();
        let cap = opts.queue_capacity.max(1);
        let sampled = probe.as_ref().map(LatencyProbe::partition);
        let missing_topics = assignment.missing_topics.clone();
        let inbound_audio = opts.inbound_audio;
        let after_load = opts.after_load;
        let go_rx = go.clone();
        let thread = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                let (rec_tx, rec_rx) = mpsc::sync_channel::<RawRecord>(cap);
                let stop = Arc::new(AtomicBool::new(false));
                let rx_thread = {
                    let (stop, tracker, prog) = (stop.clone(), tracker.clone(), prog.clone());
                    std::thread::Builder::new()
                        .name("verify-rx".into())
                        .spawn(move || {
                            let mut st = ReceiveStats::default();
                            if let Some(tpl) = deferred {
                                if !wait_and_assign(&consumer, &tpl, &go_rx, &stop) {
                                    st.errors += 1;
                                    return st;
                                }
                            }
                            receive_loop(&consumer, &topics, &tracker, &rec_tx, &stop, &prog, st)
                        })
                };
                let mut ledger = Ledger::new(audio);
                ledger.summary.missing_topics = missing_topics;
                ledger.summary.inbound_not_verified = !inbound_audio;
                ledger.summary.read_after_load = after_load;
                ledger.mirror = Some(prog.clone());
                let Ok(rx_thread) = rx_thread else {
                    ledger.summary.consumer_errors += 1;
                    return ledger.summary();
                };
                let mut v = Verification {
                    ledger,
                    regs: rx,
                    deadline: None,
                    idle_grace: None,
                    progress: prog,
                    queue_delay: new_histogram(),
                    max_depth: 0,
                    sampled,
                };
                v.run(&rec_rx);
                // Stop the consume loop, then verify what it already stamped.
                stop.store(true, Ordering::Relaxed);
                while !rx_thread.is_finished() {
                    if let Ok(r) = rec_rx.recv_timeout(Duration::from_millis(10)) {
                        v.record(r);
                    }
                }
                while let Ok(r) = rec_rx.try_recv() {
                    v.record(r);
                }
                let rs = rx_thread.join().unwrap_or_default();
                v.ledger.probe_partition =
                    v.sampled.as_ref().map_or(-1, |p| p.load(Ordering::Relaxed));
                let mut summary = v.ledger.summary();
                summary.consumer_errors += rs.errors;
                summary.harness = HarnessLag {
                    receipt_to_verify: Percentiles::of(&v.queue_delay),
                    queue_capacity: cap as u64,
                    queue_max_depth: v.max_depth,
                    receiver_blocked_ms: rs.blocked.as_secs_f64() * 1000.0,
                    receiver_blocked_times: rs.blocked_times,
                    records_received: tracker.received.load(Ordering::Relaxed),
                    consumer_lag: sampler.finish(),
                };
                summary
            })
            .map_err(|e| {
                VerifyError::Kafka(rdkafka::error::KafkaError::ClientCreation(e.to_string()))
            })?;
        Ok(KafkaVerifier {
            tx,
            go,
            progress,
            thread,
            probe,
        })
    }

    /// A registrar for stream tasks (feeds the probe too, when there is one).
    pub fn registrar(&self) -> Registrar {
        let mut l = vec![self.tx.clone()];
        if let Some(p) = &self.probe {
            l.push(p.sender());
        }
        Registrar::new(l)
    }

    /// Live counters.
    pub fn progress(&self) -> Arc<VerifyProgress> {
        self.progress.clone()
    }

    /// Waits up to `grace` for outstanding records and returns the results. Blocking.
    pub fn finish(self, grace: Duration) -> VerifySummary {
        self.go.store(true, Ordering::Relaxed);
        let _ = self.tx.send(RegMsg::Finish { grace });
        let mut summary = self.thread.join().unwrap_or_default();
        if let Some(p) = self.probe {
            let ps = p.finish();
            if !summary.read_after_load {
                summary.attribution = Some(LatencyAttribution::of(&summary, &ps));
            }
            summary.probe = Some(ps);
        }
        summary
    }
}

/// A deferred consume loop's wait: assigns `tpl` once `go` is set. False when stopped first
/// or when the assignment fails.
fn wait_and_assign(
    consumer: &BaseConsumer,
    tpl: &TopicPartitionList,
    go: &AtomicBool,
    stop: &AtomicBool,
) -> bool {
    while !go.load(Ordering::Relaxed) {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    consumer.assign(tpl).is_ok()
}

/// The consume loop: poll, stamp, copy, hand over. Nothing else happens here.
fn receive_loop(
    consumer: &BaseConsumer,
    topics: &[String],
    tracker: &LagTracker,
    tx: &mpsc::SyncSender<RawRecord>,
    stop: &AtomicBool,
    progress: &VerifyProgress,
    mut st: ReceiveStats,
) -> ReceiveStats {
    while !stop.load(Ordering::Relaxed) {
        let Some(res) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let at = Instant::now();
        let msg = match res {
            Ok(m) => m,
            Err(_) => {
                st.errors += 1;
                continue;
            }
        };
        let topic = topic_index(topics, msg.topic()).unwrap_or(usize::MAX);
        tracker.received(topic, msg.partition(), msg.offset());
        let raw = RawRecord::capture(at, topic, &msg);
        drop(msg);
        progress.queue_depth.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(raw) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(raw)) => {
                let t = Instant::now();
                st.blocked_times += 1;
                if tx.send(raw).is_err() {
                    break;
                }
                st.blocked += t.elapsed();
            }
            Err(mpsc::TrySendError::Disconnected(_)) => break,
        }
    }
    st
}

/// The verification side: registrations, the ledger and the finish logic.
struct Verification {
    ledger: Ledger,
    regs: mpsc::Receiver<RegMsg>,
    deadline: Option<Instant>,
    /// After-load verification: the grace period, restarted by every record read.
    idle_grace: Option<Duration>,
    progress: Arc<VerifyProgress>,
    queue_delay: Histogram<u64>,
    max_depth: u64,
    /// Partition of the inbound topic (index 0) the latency probe reads (-1 until chosen);
    /// `Some` while a probe runs.
    sampled: Option<Arc<std::sync::atomic::AtomicI32>>,
}

impl Verification {
    fn drain_regs(&mut self) {
        while let Ok(m) = self.regs.try_recv() {
            match m {
                RegMsg::Finish { grace } => {
                    self.deadline = Some(Instant::now() + grace);
                    if self.ledger.summary.read_after_load {
                        self.idle_grace = Some(grace);
                    }
                }
                other => self.ledger.apply(other),
            }
        }
    }

    /// Verifies until told to finish and the grace period is over (or nothing is missing).
    fn run(&mut self, records: &mpsc::Receiver<RawRecord>) {
        let mut last_check = Instant::now();
        loop {
            self.drain_regs();
            if let Some(d) = self.deadline {
                let now = Instant::now();
                if now >= d {
                    break;
                }
                if now.duration_since(last_check) > Duration::from_millis(200) {
                    last_check = now;
                    if self.ledger.complete() {
                        break;
                    }
                }
            }
            match records.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => {
                    self.record(r);
                    if let (Some(g), Some(_)) = (self.idle_grace, self.deadline) {
                        self.deadline = Some(Instant::now() + g);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Verifies one stamped record.
    fn record(&mut self, raw: RawRecord) {
        let depth = self.progress.queue_depth.fetch_sub(1, Ordering::Relaxed);
        self.max_depth = self.max_depth.max(depth);
        let waited = Instant::now().saturating_duration_since(raw.at);
        let _ = self
            .queue_delay
            .record((waited.as_micros() as u64).clamp(1, 3_600_000_000));
        match raw.topic {
            2 => {
                // Registrations may lag the first records of a stream: drain them first.
                self.drain_regs();
                self.ledger.event(raw.payload());
            }
            1 if raw
                .headers()
                .any(|(k, v)| k == "source" && v == b"playback") =>
            {
                self.ledger.summary.playback_recorded_records += 1;
            }
            0 | 1 => {
                let topic_track = if raw.topic == 0 {
                    Track::Inbound
                } else {
                    Track::Outbound
                };
                match parse_audio(&raw, topic_track) {
                    Some(rec) => {
                        if !self.ledger.knows(rec.sid) {
                            self.drain_regs();
                        }
                        self.progress
                            .chunks_received
                            .fetch_add(rec.chunks, Ordering::Relaxed);
                        let inbound =
                            (raw.topic == 0 && self.sampled.is_some()).then_some(raw.partition);
                        self.ledger.audio_in(rec, raw.at, inbound);
                    }
                    None => self.ledger.malformed(),
                }
            }
            _ => self.ledger.malformed(),
        }
    }
}

/// Reads the contract's headers into an [`AudioRecord`].
pub fn parse_audio(raw: &RawRecord, topic_track: Track) -> Option<AudioRecord<'_>> {
    let mut sid = raw.key_str();
    let mut track = Some(topic_track);
    let mut chunk = None;
    let mut chunks = 1u64;
    let mut encoding = Encoding::PcmS16le;
    for (k, v) in raw.headers() {
        match k {
            "stream_sid" if sid.is_none() => sid = std::str::from_utf8(v).ok(),
            "track" => track = Track::parse(v).or(track),
            "chunk" => chunk = std::str::from_utf8(v).ok()?.parse().ok(),
            "chunks" => chunks = std::str::from_utf8(v).ok()?.parse().ok()?,
            "encoding" => {
                encoding = match v {
                    b"mulaw" => Encoding::Mulaw,
                    _ => Encoding::PcmS16le,
                }
            }
            _ => {}
        }
    }
    Some(AudioRecord {
        sid: sid?,
        track: track?,
        chunk: chunk?,
        chunks: chunks.max(1),
        encoding,
        payload: raw.payload(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::ulaw_to_pcm_le;

    fn table() -> Arc<ChunkTable> {
        let ulaw: Vec<u8> = (0..CHUNK_BYTES * 10).map(|i| (i * 7 % 256) as u8).collect();
        Arc::new(ChunkTable::new(&ulaw).expect("ten chunks"))
    }

    fn reg(sid: &str, start: Instant) -> StreamReg {
        StreamReg {
            sid: sid.into(),
            start,
            speed: 1.0,
            flood: false,
            offsets: [3, 8],
        }
    }

    fn pcm(t: &ChunkTable, idx: usize, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for j in 0..n {
            ulaw_to_pcm_le(t.ulaw(idx + j), &mut out);
        }
        out
    }

    fn rec<'a>(
        sid: &'a str,
        track: Track,
        chunk: u64,
        chunks: u64,
        payload: &'a [u8],
    ) -> AudioRecord<'a> {
        AudioRecord {
            sid,
            track,
            chunk,
            chunks,
            encoding: Encoding::PcmS16le,
            payload,
        }
    }

    #[test]
    fn seen_set_counts_and_compacts() {
        let mut s = Seen::default();
        for i in 0..200 {
            assert!(s.insert(i));
        }
        assert!(!s.insert(5));
        assert_eq!(s.base, 192);
        assert!(s.insert(300));
        assert_eq!(s.count_below(200), 200);
        assert_eq!(s.count_below(301), 201);
        assert_eq!(s.count_below(100), 100);
    }

    #[test]
    fn accounting_counts_every_kind_of_fault() {
        let t = table();
        let start = Instant::now();
        let mut l = Ledger::new(t.clone());
        l.apply(RegMsg::Start(reg("MZa", start)));
        // Inbound: 6 chunks sent. Receive 1, 2, 4, 3 (late), 2 again (dup), 5 with bad
        // audio; 6 never arrives.
        let at = start + Duration::from_millis(500);
        for c in [1u64, 2, 4, 3] {
            let p = pcm(&t, 3 + c as usize - 1, 1);
            l.audio(rec("MZa", Track::Inbound, c, 1, &p), at);
        }
        let p2 = pcm(&t, 3 + 1, 1);
        l.audio(rec("MZa", Track::Inbound, 2, 1, &p2), at);
        let mut bad = pcm(&t, 3 + 4, 1);
        bad[10] ^= 1;
        l.audio(rec("MZa", Track::Inbound, 5, 1, &bad), at);
        // Outbound: 4 chunks sent, all in one batched record (chunks = 4), plus a chunk 9
        // that was never sent.
        let p = pcm(&t, 8, 4);
        l.audio(rec("MZa", Track::Outbound, 1, 4, &p), at);
        let p9 = pcm(&t, 8 + 8, 1);
        l.audio(rec("MZa", Track::Outbound, 9, 1, &p9), at);
        // Records of other runs are ignored.
        l.audio(rec("MZother", Track::Inbound, 1, 1, &p2), at);
        l.apply(RegMsg::Finished {
            sid: "MZa".into(),
            sent: [6, 4],
        });
        let s = l.summary();
        assert_eq!(s.inbound.expected, 6);
        assert_eq!(s.inbound.received, 5);
        assert_eq!(s.inbound.missing, 1);
        assert_eq!(s.inbound.duplicated, 1);
        assert_eq!(s.inbound.out_of_order, 1);
        assert_eq!(s.inbound.pcm_mismatches, 1);
        assert_eq!(s.outbound.expected, 4);
        assert_eq!(s.outbound.received, 4);
        assert_eq!(s.outbound.missing, 0);
        assert_eq!(s.outbound.pcm_mismatches, 0);
        assert_eq!(s.outbound.unexpected, 1);
        assert_eq!(s.batched_records, 1);
        assert_eq!(s.foreign_records, 1);
        assert_eq!(s.total.missing, 1);
        assert_eq!(s.total.expected, 10);
        assert!(!l.complete());
    }

    #[test]
    fn inbound_not_verified_expects_no_inbound_chunks() {
        let t = table();
        let start = Instant::now();
        let mut l = Ledger::new(t.clone());
        l.summary.inbound_not_verified = true;
        l.apply(RegMsg::Start(reg("MZi", start)));
        let at = start + Duration::from_millis(500);
        // Outbound chunk 1 (the table offsets are those of the test above).
        let p = pcm(&t, 8, 1);
        l.audio(rec("MZi", Track::Outbound, 1, 1, &p), at);
        l.apply(RegMsg::Finished {
            sid: "MZi".into(),
            sent: [50, 2],
        });
        let s = l.summary();
        assert!(s.inbound_not_verified);
        assert_eq!(s.inbound.expected, 0);
        assert_eq!(s.inbound.missing, 0);
        // Outbound is still verified: one of two chunks arrived.
        assert_eq!(s.outbound.expected, 2);
        assert_eq!(s.outbound.received, 1);
        assert_eq!(s.outbound.missing, 1);
        assert_eq!(s.total.missing, 1);
    }

    #[test]
    fn mulaw_records_and_wrong_lengths() {
        let t = table();
        let start = Instant::now();
        let mut l = Ledger::new(t.clone());
        l.apply(RegMsg::Start(reg("MZb", start)));
        let raw = t.ulaw(3).to_vec();
        l.audio(
            AudioRecord {
                encoding: Encoding::Mulaw,
                ..rec("MZb", Track::Inbound, 1, 1, &raw)
            },
            start,
        );
        // A truncated PCM payload is a mismatch, not a panic.
        let short = pcm(&t, 4, 1)[..100].to_vec();
        l.audio(rec("MZb", Track::Inbound, 2, 1, &short), start);
        l.apply(RegMsg::Finished {
            sid: "MZb".into(),
            sent: [2, 0],
        });
        let s = l.summary();
        assert_eq!(s.inbound.received, 2);
        assert_eq!(s.inbound.pcm_mismatches, 1);
    }

    #[test]
    fn latency_is_against_the_chunk_schedule() {
        let t = table();
        let start = Instant::now();
        let mut l = Ledger::new(t.clone());
        l.apply(RegMsg::Start(reg("MZc", start)));
        // Chunk 51 is due 1 s after start; consumed 1.030 s after start → 30 ms.
        let p = pcm(&t, 3 + 50, 1);
        l.audio(
            rec("MZc", Track::Inbound, 51, 1, &p),
            start + Duration::from_millis(1030),
        );
        let h = l.latency();
        assert_eq!(h.len(), 1);
        let v = h.max();
        assert!((29_900..=30_100).contains(&v), "{v}");
    }

    #[test]
    fn a_tail_unread_after_the_server_ended_the_stream_is_not_loss() {
        let t = table();
        let start = Instant::now();
        let mut l = Ledger::new(t.clone());
        for sid in ["MZs", "MZg"] {
            l.apply(RegMsg::Start(reg(sid, start)));
        }
        // Both sent 6 chunks; the server ended both. MZs: 1..4 published, a clean tail of
        // 2. MZg: 1, 2, 4 published: chunk 3 is a gap below the last published, so loss.
        for (sid, chunks) in [("MZs", &[1u64, 2, 3, 4][..]), ("MZg", &[1, 2, 4])] {
            for &c in chunks {
                let p = pcm(&t, 3 + c as usize - 1, 1);
                l.audio(rec(sid, Track::Inbound, c, 1, &p), start);
            }
            l.apply(RegMsg::ServerClosed { sid: sid.into() });
            l.apply(RegMsg::Finished {
                sid: sid.into(),
                sent: [6, 0],
            });
            l.event(format!(r#"{{"type":"disconnect","stream_sid":"{sid}"}}"#).as_bytes());
        }
        let s = l.summary();
        assert_eq!(s.inbound.unread_after_server_close, 2);
        assert_eq!(s.inbound.expected, 4 + 6);
        assert_eq!(s.inbound.missing, 3);
        assert!(!l.complete());
    }

    #[test]
    fn events_are_counted() {
        let mut l = Ledger::new(table());
        l.apply(RegMsg::Start(reg("MZd", Instant::now())));
        l.event(br#"{"type":"start","stream_sid":"MZd"}"#);
        l.event(
            br#"{"type":"stop","stream_sid":"MZd","frames_published":10,"frames_dropped":"2"}"#,
        );
        l.event(br#"{"type":"stop","stream_sid":"MZzz"}"#);
        l.event(b"not json");
        l.apply(RegMsg::Finished {
            sid: "MZd".into(),
            sent: [0, 0],
        });
        let s = l.summary();
        assert_eq!(s.start_events, 1);
        assert_eq!(s.end_events, 1);
        assert_eq!(s.gateway_frames_published, 10);
        assert_eq!(s.gateway_frames_dropped, 2);
        assert_eq!(s.foreign_records, 1);
        assert_eq!(s.malformed_records, 1);
        assert!(l.complete());
    }
}
