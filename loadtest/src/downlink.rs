//! Downlink verification of bidirectional streams: what the echo bot wrote to
//! `<prefix>.playback` against what the simulated Twilio received on each socket.
//!
//! Everything arrives on one bounded channel as [`DlMsg`]s, each stamped at its source before
//! anything was checked: the bot stamps a playback record right before producing it (and puts
//! the message on the channel *before* the record can exist in Kafka, so a stream's
//! `Produced` always precedes what it causes), the simulator's reader stamps every frame as it
//! comes off the socket, the writer stamps each mark echo before it is written, and the bot
//! forwards the gateway's `mark` and terminal events. [`DownlinkVerifier`] owns the
//! [`DownlinkLedger`] on its own thread and reports how long messages waited for it.
//!
//! The ledger follows each stream through *epochs* separated by clears. Within an epoch the
//! produced media, converted to the μ-law the gateway must send (μ-law records pass through,
//! PCM records through this harness's own G.711 encoder, [`crate::audio::ulaw_encode`]), is
//! one byte string, and the received frames must be a prefix of it, bit-exact: a clear
//! discards a suffix. Frames are at most 160 bytes and never span two records (a record's last
//! frame may be short). A mark frame must arrive after exactly the media bytes that preceded
//! it in the topic — or, when a clear discarded some of those, right at the clear (before the
//! clear frame with nothing after it, or right after it). Each echo the simulator sends must
//! come back from the gateway as a `mark` event with the same `played` flag. A `stop` record
//! must end the socket with close code 1000 and a `disconnect` event with reason
//! `stopped_by_control`. Playback latency = first frame of a record received − record
//! produced, on the monotonic clock of this one process.
//!
//! Memory is bounded per stream: only produced bytes not yet received are kept, and a stream
//! whose backlog passes [`MAX_PENDING_BYTES`] stops being verified (and is counted).

use crate::audio::{ulaw_encode, ULAW_TO_PCM};
use crate::stats::{chart_buckets, new_histogram, Percentiles};
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// μ-law bytes of one full outbound frame (20 ms).
pub const FRAME_BYTES: usize = 160;
/// Produced-but-not-received bytes one stream may hold before it is no longer verified
/// (~2 minutes of audio).
pub const MAX_PENDING_BYTES: usize = 1 << 20;
/// A playback item produced at least this long before its stream ended and never received
/// counts as lost; younger ones were still in flight when the socket closed.
pub const IN_FLIGHT_WINDOW: Duration = Duration::from_secs(2);
/// A `played` flag that disagrees with the simulator within this long of a clear frame
/// (either side) is a race the protocol allows: the gateway sent the clear before the echo
/// reached it, or the mark followed media the clear discarded.
pub const CLEAR_RACE_WINDOW: Duration = Duration::from_millis(100);

/// Encoding of a playback record's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaybackEncoding {
    /// Little-endian signed 16-bit PCM, 8 kHz (the gateway encodes it to μ-law).
    PcmS16le,
    /// Raw μ-law (passed through).
    Mulaw,
}

impl PlaybackEncoding {
    /// The `encoding` header value.
    pub fn header(self) -> &'static str {
        match self {
            PlaybackEncoding::PcmS16le => "pcm_s16le",
            PlaybackEncoding::Mulaw => "mulaw",
        }
    }
}

/// One record the bot wrote to the playback topic.
#[derive(Debug, Clone)]
pub enum Produced {
    /// Audio.
    Media {
        /// The record value.
        payload: Vec<u8>,
        /// Its encoding.
        encoding: PlaybackEncoding,
    },
    /// A mark.
    Mark {
        /// Its name.
        name: String,
    },
    /// A clear.
    Clear,
    /// A stop.
    Stop,
}

/// One frame the simulated Twilio received.
#[derive(Debug, Clone)]
pub enum RxItem {
    /// `media`, payload base64-decoded.
    Media {
        /// μ-law bytes.
        ulaw: Vec<u8>,
    },
    /// `mark`.
    Mark {
        /// Its name.
        name: String,
    },
    /// `clear`.
    Clear,
    /// Anything else (not JSON, unknown event, wrong `streamSid`, bad base64, binary frame).
    Invalid {
        /// Short reason.
        reason: &'static str,
    },
}

/// What the gateway published on `<prefix>.events` about a stream, as the bot read it.
#[derive(Debug, Clone)]
pub enum GatewayEvent {
    /// `start`; whether it carried a `playback` route.
    Start {
        /// `playback.partition` was present.
        routed: bool,
    },
    /// `mark` (an echo the gateway got back).
    Mark {
        /// Mark name.
        name: String,
        /// The `played` field (`None` when absent).
        played: Option<bool>,
    },
    /// `stop`, `disconnect` or `error`.
    End {
        /// Event type.
        kind: String,
        /// `reason`, if any.
        reason: Option<String>,
        /// The `playback` summary object, if any.
        playback: Option<serde_json::Value>,
    },
}

/// Messages into the downlink verifier. `stream` is the stream index of this run.
#[derive(Debug, Clone)]
pub enum DlMsg {
    /// The bot is about to produce this record (stamped right before `produce`).
    Produced {
        /// Stream index.
        stream: u64,
        /// Stamp.
        at: Instant,
        /// The record.
        item: Produced,
    },
    /// The stream's last `Produced` could not be enqueued: forget it.
    Unproduced {
        /// Stream index.
        stream: u64,
    },
    /// A gateway event, stamped when the bot received it.
    Gateway {
        /// Stream index.
        stream: u64,
        /// Stamp.
        at: Instant,
        /// The event.
        event: GatewayEvent,
    },
    /// A frame received by the simulator, stamped before parsing.
    Rx {
        /// Stream index.
        stream: u64,
        /// Stamp.
        at: Instant,
        /// The frame.
        item: RxItem,
    },
    /// The simulator is about to echo a mark.
    Echo {
        /// Stream index.
        stream: u64,
        /// Stamp.
        at: Instant,
        /// Mark name.
        name: String,
        /// Its audio played (false: cut by a clear).
        played: bool,
    },
    /// A simulated stream is over.
    StreamEnd {
        /// Stream index.
        stream: u64,
        /// Stamp.
        at: Instant,
        /// We sent `stop` and closed first.
        we_stopped: bool,
        /// Close code the server sent, if any.
        server_close: Option<u16>,
    },
    /// No more messages: summarise.
    Finish,
}

impl DlMsg {
    fn stamp(&self) -> Option<Instant> {
        match self {
            DlMsg::Produced { at, .. }
            | DlMsg::Gateway { at, .. }
            | DlMsg::Rx { at, .. }
            | DlMsg::Echo { at, .. }
            | DlMsg::StreamEnd { at, .. } => Some(*at),
            DlMsg::Unproduced { .. } | DlMsg::Finish => None,
        }
    }
}

/// Sending side of the downlink channel: bounded, cloned into the bot and every stream.
#[derive(Debug, Clone)]
pub struct DownlinkSender {
    tx: mpsc::Sender<DlMsg>,
    waits: Arc<AtomicU64>,
}

/// Receiving side, for tests that drive the simulator without a verifier thread.
#[derive(Debug)]
pub struct DownlinkReceiver(pub mpsc::Receiver<DlMsg>);

/// A bounded downlink channel of `capacity` messages.
pub fn channel(capacity: usize) -> (DownlinkSender, DownlinkReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        DownlinkSender {
            tx,
            waits: Arc::new(AtomicU64::new(0)),
        },
        DownlinkReceiver(rx),
    )
}

impl DownlinkSender {
    /// Sends from a task; waits (and counts the wait) only when the channel is full.
    pub async fn send(&self, m: DlMsg) {
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                let _ = self.tx.send(m).await;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Sends from a plain thread (never from inside the runtime).
    pub fn blocking_send(&self, m: DlMsg) {
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                let _ = self.tx.blocking_send(m);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Times a sender found the channel full.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Messages queued now.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// The reference G.711 μ-law encoding of little-endian PCM16 (odd trailing byte ignored).
pub fn reference_ulaw(pcm_le: &[u8]) -> Vec<u8> {
    pcm_le
        .chunks_exact(2)
        .map(|s| ulaw_encode(i16::from_le_bytes([s[0], s[1]])))
        .collect()
}

/// Whether two μ-law codes are neighbours (one quantisation step apart, or the two zeros).
fn near(a: u8, b: u8) -> bool {
    let (da, db) = (ULAW_TO_PCM[a as usize], ULAW_TO_PCM[b as usize]);
    da == db || ((a ^ b) & 0x80 == 0 && a.abs_diff(b) == 1)
}

/// Produced records.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProducedCounts {
    /// Media records.
    pub media_records: u64,
    /// Of which PCM.
    pub pcm_records: u64,
    /// Of which μ-law.
    pub mulaw_records: u64,
    /// μ-law bytes the gateway must send for them.
    pub media_bytes: u64,
    /// Marks.
    pub marks: u64,
    /// Clears.
    pub clears: u64,
    /// Stops.
    pub stops: u64,
    /// Records announced but not enqueued (producer queue full), forgotten again.
    pub retracted: u64,
    /// PCM records of odd length (last byte cannot be a sample).
    pub odd_pcm_records: u64,
    /// Records produced after the stream had ended (not checked).
    pub after_end: u64,
}

/// Received frames.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReceivedCounts {
    /// `media` frames.
    pub media_frames: u64,
    /// μ-law bytes in them.
    pub media_bytes: u64,
    /// `mark` frames.
    pub marks: u64,
    /// `clear` frames.
    pub clears: u64,
    /// Frames Twilio would reject (31951/31950), by reason.
    pub invalid: BTreeMap<String, u64>,
}

/// Audio checks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AudioCheck {
    /// Received bytes equal to what was produced.
    pub bytes_matched: u64,
    /// Received bytes that differ (after a mismatch the rest of the epoch is compared at the
    /// same positions).
    pub bytes_mismatched: u64,
    /// Of the mismatches in PCM records, those one quantisation step off the reference
    /// encoder (an encoder that rounds differently, not corrupted audio).
    pub pcm_near_misses: u64,
    /// Bytes received beyond what was produced in their epoch.
    pub bytes_unexpected: u64,
    /// Frames longer than 160 bytes, spanning two records, or short but not at a record's end.
    pub frames_misframed: u64,
    /// Produced bytes a clear discarded before they were sent.
    pub bytes_discarded_by_clear: u64,
    /// Media records entirely discarded by a clear.
    pub records_discarded_by_clear: u64,
    /// Records never (fully) received though produced ≥ 2 s before their stream ended.
    pub records_lost: u64,
    /// Records not received that were produced in the last 2 s of their stream.
    pub records_in_flight_at_end: u64,
    /// Records produced before a `stop` and not sent before the close.
    pub records_cut_by_stop: u64,
}

/// Mark placement checks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MarkCheck {
    /// Arrived after exactly the media that preceded them in the topic.
    pub in_place: u64,
    /// Arrived early because a clear discarded media before them, with nothing after them
    /// before the clear frame.
    pub early_at_clear: u64,
    /// Arrived right after the clear frame that discarded media before them.
    pub after_clear: u64,
    /// Arrived anywhere else.
    pub misplaced: u64,
    /// Produced ≥ 2 s before the stream ended and never received (no clear in between).
    pub missing: u64,
    /// Not received, produced in the last 2 s of the stream.
    pub in_flight_at_end: u64,
    /// Behind media a clear discarded, and not forwarded at all (the contract allows it).
    pub dropped_at_clear: u64,
    /// Received but never produced in that epoch.
    pub unexpected: u64,
}

/// Clear checks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClearCheck {
    /// Clear frames matched to produced clears.
    pub received: u64,
    /// Clear frames with no produced clear pending.
    pub unexpected: u64,
    /// Produced ≥ 2 s before the stream ended, never received.
    pub missing: u64,
    /// Not received, produced in the last 2 s of the stream.
    pub in_flight_at_end: u64,
}

/// Mark echoes and the gateway's `mark` events.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EchoCheck {
    /// Echoes after the audio played.
    pub played: u64,
    /// Echoes because a clear emptied the buffer.
    pub unplayed: u64,
    /// Gateway `mark` events with the same `played` flag as the echo.
    pub events_matched: u64,
    /// Gateway events whose `played` disagrees with the echo.
    pub events_played_mismatch: u64,
    /// Disagreements within 100 ms of a clear frame (a race the protocol allows).
    pub events_played_mismatch_near_clear: u64,
    /// `played:false` events for marks a clear kept from being forwarded (no echo possible;
    /// the gateway reports them itself).
    pub events_for_unforwarded_marks: u64,
    /// Gateway events without a `played` field.
    pub events_without_played: u64,
    /// Echoes the gateway never reported.
    pub events_missing: u64,
    /// Gateway events with no echo.
    pub events_unexpected: u64,
}

/// `stop` records and how streams ended.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StopCheck {
    /// Streams the bot stopped.
    pub produced: u64,
    /// ... whose socket the gateway closed with 1000.
    pub closed_1000: u64,
    /// ... closed otherwise (or not by the server).
    pub wrong_close: u64,
    /// ... with a `disconnect` event, reason `stopped_by_control`.
    pub stopped_by_control_events: u64,
    /// ... with another terminal event.
    pub wrong_end_events: u64,
    /// Streams without a stop record that the server closed before our `stop`.
    pub unexpected_server_closes: u64,
}

/// What the gateway published, as far as the downlink is concerned.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GatewayEvents {
    /// `start` events with a `playback` route.
    pub starts_routed: u64,
    /// `start` events without one (the gateway does not do bidirectional streams).
    pub starts_unrouted: u64,
    /// Terminal events.
    pub end_events: u64,
    /// Terminal events that carried a `playback` summary.
    pub end_events_with_playback: u64,
    /// Sum over terminal events of each numeric field of `playback`.
    pub playback_totals: BTreeMap<String, f64>,
}

/// Downlink verification results.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DownlinkSummary {
    /// Streams with any downlink activity.
    pub streams: u64,
    /// What the bot produced.
    pub produced: ProducedCounts,
    /// What the simulator received.
    pub received: ReceivedCounts,
    /// Audio.
    pub audio: AudioCheck,
    /// Mark placement.
    pub marks: MarkCheck,
    /// Clears.
    pub clears: ClearCheck,
    /// Echoes and `mark` events.
    pub echoes: EchoCheck,
    /// Stops and closes.
    pub stops: StopCheck,
    /// Gateway events.
    pub gateway_events: GatewayEvents,
    /// Playback record produced → its first frame received.
    pub playback_latency: Percentiles,
    /// Chart buckets of the playback latency `(upper ms, count)`.
    pub playback_latency_buckets: Vec<(f64, u64)>,
    /// Clear produced → clear frame received.
    pub clear_latency: Percentiles,
    /// Mark produced → mark frame received.
    pub mark_latency: Percentiles,
    /// Message stamped → verified (the verifier's own queueing).
    pub stamp_to_verify: Percentiles,
    /// Times a sender found the downlink queue full (its later stamps are late).
    pub queue_waits: u64,
    /// Streams whose backlog passed the memory bound (no longer verified).
    pub unverifiable_streams: u64,
    /// First example of each fault.
    pub examples: BTreeMap<String, String>,
    /// Sum of every fault counter (0 = clean).
    pub faults: u64,
}

impl DownlinkSummary {
    fn count_faults(&mut self) {
        let a = &self.audio;
        let m = &self.marks;
        let e = &self.echoes;
        let s = &self.stops;
        self.faults = a.bytes_mismatched
            + a.bytes_unexpected
            + a.frames_misframed
            + a.records_lost
            + m.misplaced
            + m.missing
            + m.unexpected
            + self.clears.unexpected
            + self.clears.missing
            + e.events_played_mismatch
            + e.events_without_played
            + e.events_missing
            + e.events_unexpected
            + s.wrong_close
            + s.wrong_end_events
            + s.unexpected_server_closes
            + self.received.invalid.values().sum::<u64>()
            + self.unverifiable_streams;
    }
}

/// A produced media record, in epoch byte coordinates.
#[derive(Debug)]
struct PRec {
    start: u64,
    end: u64,
    at: Instant,
    pcm: bool,
}

/// A produced mark.
#[derive(Debug)]
struct PMark {
    offset: u64,
    name: String,
    at: Instant,
}

/// The stretch of a stream between two clears.
#[derive(Debug, Default)]
struct Epoch {
    /// Produced bytes not yet received: epoch offsets `base..produced`.
    expected: VecDeque<u8>,
    base: u64,
    produced: u64,
    /// Produced records not fully received, in order.
    records: VecDeque<PRec>,
    /// Produced marks not yet received, in order.
    marks: VecDeque<PMark>,
    /// The clear that closes this epoch, when produced.
    clear_at: Option<Instant>,
    /// Bytes received in this epoch.
    rx: u64,
    /// Marks received before their offset (fine only if a clear follows at once).
    early: Vec<String>,
}

/// What was produced last (so a failed enqueue can be retracted).
#[derive(Debug, Clone, Copy)]
enum Last {
    Media(u64),
    Mark,
    Clear,
    Stop,
}

#[derive(Debug)]
struct StreamDl {
    /// Front: the epoch being received; back: the epoch being produced.
    epochs: VecDeque<Epoch>,
    /// Marks of the last cleared epoch not received before its clear frame.
    leftover: Vec<PMark>,
    /// Names of marks a clear kept from being forwarded (bounded), for `played:false`
    /// events the gateway may publish for them.
    unforwarded: VecDeque<String>,
    media_since_clear: bool,
    /// Echoes awaiting the gateway's event: name → (played, at).
    echoes: HashMap<String, (bool, Instant)>,
    /// Receipt times of the last few clear frames.
    recent_clears: VecDeque<Instant>,
    stop_at: Option<Instant>,
    last: Option<Last>,
    pending_bytes: usize,
    ended: bool,
    broken: bool,
}

impl Default for StreamDl {
    fn default() -> Self {
        StreamDl {
            epochs: VecDeque::from([Epoch::default()]),
            leftover: Vec::new(),
            unforwarded: VecDeque::new(),
            media_since_clear: false,
            echoes: HashMap::new(),
            recent_clears: VecDeque::new(),
            stop_at: None,
            last: None,
            pending_bytes: 0,
            ended: false,
            broken: false,
        }
    }
}

/// Pure downlink accounting (see the module docs).
#[derive(Debug)]
pub struct DownlinkLedger {
    streams: HashMap<u64, StreamDl>,
    s: DownlinkSummary,
    playback_latency: Histogram<u64>,
    clear_latency: Histogram<u64>,
    mark_latency: Histogram<u64>,
    stamp_to_verify: Histogram<u64>,
    max_pending_bytes: usize,
}

impl Default for DownlinkLedger {
    fn default() -> Self {
        Self::new()
    }
}

/// The marks left over from the last clear were not forwarded: count them and remember
/// their names (at most 1024 per stream) for `played:false` events about them.
fn drop_leftover(s: &mut DownlinkSummary, st: &mut StreamDl) {
    s.marks.dropped_at_clear += st.leftover.len() as u64;
    for m in st.leftover.drain(..) {
        if st.unforwarded.len() >= 1024 {
            st.unforwarded.pop_front();
        }
        st.unforwarded.push_back(m.name);
    }
}

/// Keeps the first example of each fault kind (at most 64 kinds).
fn example(s: &mut DownlinkSummary, kind: &str, text: impl FnOnce() -> String) {
    if s.examples.len() < 64 && !s.examples.contains_key(kind) {
        s.examples.insert(kind.to_string(), text());
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_micros() as u64).clamp(1, 3_600_000_000));
}

impl DownlinkLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        DownlinkLedger {
            streams: HashMap::new(),
            s: DownlinkSummary::default(),
            playback_latency: new_histogram(),
            clear_latency: new_histogram(),
            mark_latency: new_histogram(),
            stamp_to_verify: new_histogram(),
            max_pending_bytes: MAX_PENDING_BYTES,
        }
    }

    /// The same with a different per-stream memory bound (tests).
    pub fn with_max_pending_bytes(max: usize) -> Self {
        DownlinkLedger {
            max_pending_bytes: max,
            ..Self::new()
        }
    }

    /// Applies one message, verified at `now`.
    pub fn apply(&mut self, msg: DlMsg, now: Instant) {
        if let Some(at) = msg.stamp() {
            record(&mut self.stamp_to_verify, now.saturating_duration_since(at));
        }
        match msg {
            DlMsg::Produced { stream, at, item } => self.produced(stream, at, item),
            DlMsg::Unproduced { stream } => self.unproduced(stream),
            DlMsg::Gateway { stream, at, event } => self.gateway(stream, at, event),
            DlMsg::Rx { stream, at, item } => self.rx(stream, at, item),
            DlMsg::Echo {
                stream,
                at,
                name,
                played,
            } => {
                if played {
                    self.s.echoes.played += 1;
                } else {
                    self.s.echoes.unplayed += 1;
                }
                let st = self.streams.entry(stream).or_default();
                st.echoes.insert(name, (played, at));
            }
            DlMsg::StreamEnd {
                stream,
                at,
                we_stopped,
                server_close,
            } => self.stream_end(stream, at, we_stopped, server_close),
            DlMsg::Finish => {}
        }
    }

    fn produced(&mut self, stream: u64, at: Instant, item: Produced) {
        let max = self.max_pending_bytes;
        let st = self.streams.entry(stream).or_default();
        if st.ended {
            self.s.produced.after_end += 1;
            st.last = None;
            return;
        }
        match item {
            Produced::Media { payload, encoding } => {
                self.s.produced.media_records += 1;
                let pcm = encoding == PlaybackEncoding::PcmS16le;
                let ulaw = if pcm {
                    self.s.produced.pcm_records += 1;
                    if payload.len() % 2 == 1 {
                        self.s.produced.odd_pcm_records += 1;
                    }
                    reference_ulaw(&payload)
                } else {
                    self.s.produced.mulaw_records += 1;
                    payload
                };
                let n = ulaw.len() as u64;
                self.s.produced.media_bytes += n;
                st.last = Some(Last::Media(n));
                if st.broken {
                    return;
                }
                st.pending_bytes += ulaw.len();
                if st.pending_bytes > max {
                    st.broken = true;
                    st.epochs.clear();
                    st.leftover.clear();
                    self.s.unverifiable_streams += 1;
                    return;
                }
                let e = st.epochs.back_mut().expect("a stream always has an epoch");
                e.records.push_back(PRec {
                    start: e.produced,
                    end: e.produced + n,
                    at,
                    pcm,
                });
                e.expected.extend(ulaw);
                e.produced += n;
            }
            Produced::Mark { name } => {
                self.s.produced.marks += 1;
                st.last = Some(Last::Mark);
                if let Some(e) = st.epochs.back_mut() {
                    e.marks.push_back(PMark {
                        offset: e.produced,
                        name,
                        at,
                    });
                }
            }
            Produced::Clear => {
                self.s.produced.clears += 1;
                st.last = Some(Last::Clear);
                if !st.broken {
                    if let Some(e) = st.epochs.back_mut() {
                        e.clear_at = Some(at);
                    }
                    st.epochs.push_back(Epoch::default());
                }
            }
            Produced::Stop => {
                self.s.produced.stops += 1;
                st.last = Some(Last::Stop);
                st.stop_at = Some(at);
            }
        }
    }

    fn unproduced(&mut self, stream: u64) {
        let Some(st) = self.streams.get_mut(&stream) else {
            return;
        };
        let Some(last) = st.last.take() else { return };
        self.s.produced.retracted += 1;
        match last {
            Last::Media(n) => {
                self.s.produced.media_records -= 1;
                self.s.produced.media_bytes -= n;
                if let Some(e) = st.epochs.back_mut() {
                    if let Some(r) = e.records.pop_back() {
                        if r.pcm {
                            self.s.produced.pcm_records -= 1;
                        } else {
                            self.s.produced.mulaw_records -= 1;
                        }
                        let keep = e.expected.len().saturating_sub(n as usize);
                        e.expected.truncate(keep);
                        e.produced -= n;
                        st.pending_bytes = st.pending_bytes.saturating_sub(n as usize);
                    }
                }
            }
            Last::Mark => {
                self.s.produced.marks -= 1;
                if let Some(e) = st.epochs.back_mut() {
                    e.marks.pop_back();
                }
            }
            Last::Clear => {
                self.s.produced.clears -= 1;
                if st.epochs.len() > 1 {
                    st.epochs.pop_back();
                    if let Some(e) = st.epochs.back_mut() {
                        e.clear_at = None;
                    }
                }
            }
            Last::Stop => {
                self.s.produced.stops -= 1;
                st.stop_at = None;
            }
        }
    }

    fn gateway(&mut self, stream: u64, _at: Instant, event: GatewayEvent) {
        let st = self.streams.entry(stream).or_default();
        match event {
            GatewayEvent::Start { routed } => {
                if routed {
                    self.s.gateway_events.starts_routed += 1;
                } else {
                    self.s.gateway_events.starts_unrouted += 1;
                }
            }
            GatewayEvent::Mark { name, played } => {
                let Some((echoed, echo_at)) = st.echoes.remove(&name) else {
                    if played == Some(false) {
                        if let Some(i) = st.unforwarded.iter().position(|n| *n == name) {
                            st.unforwarded.remove(i);
                            self.s.echoes.events_for_unforwarded_marks += 1;
                            return;
                        }
                        if let Some(i) = st.leftover.iter().position(|m| m.name == name) {
                            st.leftover.remove(i);
                            self.s.marks.dropped_at_clear += 1;
                            self.s.echoes.events_for_unforwarded_marks += 1;
                            return;
                        }
                    }
                    self.s.echoes.events_unexpected += 1;
                    example(&mut self.s, "mark_event_unexpected", || {
                        format!("stream {stream}: mark event {name:?} without an echo")
                    });
                    return;
                };
                match played {
                    None => {
                        self.s.echoes.events_without_played += 1;
                        example(&mut self.s, "mark_event_without_played", || {
                            format!("stream {stream}: mark event {name:?} has no played field")
                        });
                    }
                    Some(p) if p == echoed => self.s.echoes.events_matched += 1,
                    Some(p) => {
                        let near_clear = echoed
                            && !p
                            && st.recent_clears.iter().any(|&c| {
                                let gap = if c >= echo_at {
                                    c.duration_since(echo_at)
                                } else {
                                    echo_at.duration_since(c)
                                };
                                gap <= CLEAR_RACE_WINDOW
                            });
                        if near_clear {
                            self.s.echoes.events_played_mismatch_near_clear += 1;
                        } else {
                            self.s.echoes.events_played_mismatch += 1;
                            example(&mut self.s, "mark_played_mismatch", || {
                                format!(
                                    "stream {stream}: mark {name:?} echoed played={echoed}, gateway says played={p}"
                                )
                            });
                        }
                    }
                }
            }
            GatewayEvent::End {
                kind,
                reason,
                playback,
            } => {
                self.s.gateway_events.end_events += 1;
                if let Some(serde_json::Value::Object(m)) = &playback {
                    self.s.gateway_events.end_events_with_playback += 1;
                    for (k, v) in m {
                        if let Some(x) = v.as_f64() {
                            *self
                                .s
                                .gateway_events
                                .playback_totals
                                .entry(k.clone())
                                .or_default() += x;
                        }
                    }
                }
                if st.stop_at.is_some() {
                    if kind == "disconnect" && reason.as_deref() == Some("stopped_by_control") {
                        self.s.stops.stopped_by_control_events += 1;
                    } else {
                        self.s.stops.wrong_end_events += 1;
                        example(&mut self.s, "stop_wrong_end_event", || {
                            format!("stream {stream}: stopped by a stop record, terminal event {kind} reason {reason:?}")
                        });
                    }
                }
            }
        }
    }

    fn rx(&mut self, stream: u64, at: Instant, item: RxItem) {
        let st = self.streams.entry(stream).or_default();
        match item {
            RxItem::Invalid { reason } => {
                *self
                    .s
                    .received
                    .invalid
                    .entry(reason.to_string())
                    .or_default() += 1;
                example(&mut self.s, &format!("invalid_{reason}"), || {
                    format!("stream {stream}: {reason}")
                });
            }
            RxItem::Media { ulaw } => {
                self.s.received.media_frames += 1;
                self.s.received.media_bytes += ulaw.len() as u64;
                if st.broken || st.ended {
                    return;
                }
                Self::rx_media(
                    &mut self.s,
                    &mut self.playback_latency,
                    st,
                    stream,
                    at,
                    &ulaw,
                );
            }
            RxItem::Mark { name } => {
                self.s.received.marks += 1;
                if st.broken || st.ended {
                    return;
                }
                Self::rx_mark(&mut self.s, &mut self.mark_latency, st, stream, at, name);
            }
            RxItem::Clear => {
                self.s.received.clears += 1;
                st.recent_clears.push_back(at);
                if st.recent_clears.len() > 8 {
                    st.recent_clears.pop_front();
                }
                if st.broken || st.ended {
                    return;
                }
                Self::rx_clear(&mut self.s, &mut self.clear_latency, st, stream, at);
            }
        }
    }

    fn rx_media(
        s: &mut DownlinkSummary,
        lat: &mut Histogram<u64>,
        st: &mut StreamDl,
        stream: u64,
        at: Instant,
        ulaw: &[u8],
    ) {
        st.media_since_clear = true;
        drop_leftover(s, st);
        let e = st.epochs.front_mut().expect("a stream always has an epoch");
        if !e.early.is_empty() {
            s.marks.misplaced += e.early.len() as u64;
            let names = std::mem::take(&mut e.early);
            example(s, "mark_misplaced", || {
                format!("stream {stream}: marks {names:?} arrived before media of their epoch")
            });
        }
        let n = ulaw.len() as u64;
        let mut off = e.rx;
        let mut i = 0usize;
        let mut segments = 0;
        let mut at_record_end = false;
        while (i as u64) < n {
            while e.records.front().is_some_and(|r| r.end <= off) {
                e.records.pop_front();
            }
            let Some(r) = e.records.front() else {
                s.audio.bytes_unexpected += n - i as u64;
                example(s, "bytes_unexpected", || {
                    format!(
                        "stream {stream}: {} bytes received beyond the {} produced in the epoch",
                        n - i as u64,
                        e.produced
                    )
                });
                break;
            };
            if r.start == off {
                record(lat, at.saturating_duration_since(r.at));
            }
            let take = ((n - i as u64).min(r.end - off)) as usize;
            let pcm = r.pcm;
            let end = r.end;
            for &got in &ulaw[i..i + take] {
                let want = e.expected.pop_front().unwrap_or(!got);
                if got == want {
                    s.audio.bytes_matched += 1;
                } else {
                    s.audio.bytes_mismatched += 1;
                    if pcm && near(got, want) {
                        s.audio.pcm_near_misses += 1;
                    }
                    example(s, "bytes_mismatched", || {
                        format!(
                                "stream {stream}: epoch byte {off}: got {got:#04x}, produced {want:#04x} ({})",
                                if pcm { "pcm record" } else { "mulaw record" }
                            )
                    });
                }
            }
            e.base += take as u64;
            st.pending_bytes = st.pending_bytes.saturating_sub(take);
            off += take as u64;
            i += take;
            segments += 1;
            at_record_end = off == end;
        }
        e.rx += n;
        // Bytes beyond what was produced are counted above, not as framing.
        let misframed = n == 0
            || (segments > 0
                && (n as usize > FRAME_BYTES
                    || segments > 1
                    || (n as usize != FRAME_BYTES && !at_record_end)));
        if misframed {
            s.audio.frames_misframed += 1;
            example(s, "frame_misframed", || {
                format!(
                    "stream {stream}: frame of {n} bytes at epoch byte {} spans {segments} records",
                    e.rx - n
                )
            });
        }
    }

    fn rx_mark(
        s: &mut DownlinkSummary,
        lat: &mut Histogram<u64>,
        st: &mut StreamDl,
        stream: u64,
        at: Instant,
        name: String,
    ) {
        if !st.media_since_clear {
            if let Some(i) = st.leftover.iter().position(|m| m.name == name) {
                let m = st.leftover.remove(i);
                record(lat, at.saturating_duration_since(m.at));
                s.marks.after_clear += 1;
                return;
            }
        }
        let e = st.epochs.front_mut().expect("a stream always has an epoch");
        let Some(i) = e.marks.iter().position(|m| m.name == name) else {
            s.marks.unexpected += 1;
            example(s, "mark_unexpected", || {
                format!("stream {stream}: mark {name:?} not produced in the current epoch")
            });
            return;
        };
        let Some(m) = e.marks.remove(i) else { return };
        record(lat, at.saturating_duration_since(m.at));
        match e.rx.cmp(&m.offset) {
            std::cmp::Ordering::Equal => s.marks.in_place += 1,
            std::cmp::Ordering::Less => e.early.push(name),
            std::cmp::Ordering::Greater => {
                s.marks.misplaced += 1;
                example(s, "mark_misplaced", || {
                    format!(
                        "stream {stream}: mark {name:?} after {} bytes, produced after {}",
                        e.rx, m.offset
                    )
                });
            }
        }
    }

    fn rx_clear(
        s: &mut DownlinkSummary,
        lat: &mut Histogram<u64>,
        st: &mut StreamDl,
        stream: u64,
        at: Instant,
    ) {
        let e = st.epochs.front_mut().expect("a stream always has an epoch");
        let Some(produced_at) = e.clear_at else {
            s.clears.unexpected += 1;
            example(s, "clear_unexpected", || {
                format!("stream {stream}: clear frame with no clear produced")
            });
            return;
        };
        s.clears.received += 1;
        record(lat, at.saturating_duration_since(produced_at));
        s.marks.early_at_clear += e.early.len() as u64;
        s.audio.bytes_discarded_by_clear += e.produced.saturating_sub(e.rx);
        s.audio.records_discarded_by_clear +=
            e.records.iter().filter(|r| r.start >= e.rx).count() as u64;
        st.pending_bytes = st.pending_bytes.saturating_sub(e.expected.len());
        let done = st.epochs.pop_front().unwrap_or_default();
        drop_leftover(s, st);
        st.leftover = done.marks.into_iter().collect();
        st.media_since_clear = false;
        if st.epochs.is_empty() {
            st.epochs.push_back(Epoch::default());
        }
    }

    fn stream_end(&mut self, stream: u64, at: Instant, we_stopped: bool, close: Option<u16>) {
        let st = self.streams.entry(stream).or_default();
        if st.ended {
            return;
        }
        if st.stop_at.is_some() {
            if close == Some(1000) {
                self.s.stops.closed_1000 += 1;
            } else {
                self.s.stops.wrong_close += 1;
                example(&mut self.s, "stop_wrong_close", || {
                    format!("stream {stream}: stop record produced, close code {close:?}")
                });
            }
        } else if !we_stopped && close.is_some() {
            self.s.stops.unexpected_server_closes += 1;
            example(&mut self.s, "unexpected_server_close", || {
                format!("stream {stream}: server closed with {close:?} without a stop record")
            });
        }
        Self::finalize(&mut self.s, st, stream, at);
    }

    /// Classifies what a stream never received, once it is over.
    fn finalize(s: &mut DownlinkSummary, st: &mut StreamDl, stream: u64, end: Instant) {
        st.ended = true;
        let young = |t: Instant| end.saturating_duration_since(t) < IN_FLIGHT_WINDOW;
        drop_leftover(s, st);
        for e in st.epochs.drain(..) {
            s.marks.misplaced += e.early.len() as u64;
            for r in &e.records {
                if r.end <= e.rx {
                    continue;
                }
                if st.stop_at.is_some_and(|stop| r.at <= stop) {
                    s.audio.records_cut_by_stop += 1;
                } else if young(r.at) || st.stop_at.is_some() {
                    s.audio.records_in_flight_at_end += 1;
                } else {
                    s.audio.records_lost += 1;
                    example(s, "records_lost", || {
                        format!(
                                "stream {stream}: record at epoch bytes {}..{} produced {:?} before the end, never received",
                                r.start,
                                r.end,
                                end.saturating_duration_since(r.at)
                            )
                    });
                }
            }
            for m in &e.marks {
                if young(m.at) || st.stop_at.is_some() {
                    s.marks.in_flight_at_end += 1;
                } else {
                    s.marks.missing += 1;
                    example(s, "mark_missing", || {
                        format!("stream {stream}: mark {:?} never received", m.name)
                    });
                }
            }
            if let Some(c) = e.clear_at {
                if young(c) || st.stop_at.is_some() {
                    s.clears.in_flight_at_end += 1;
                } else {
                    s.clears.missing += 1;
                    example(s, "clear_missing", || {
                        format!("stream {stream}: a clear was never received")
                    });
                }
            }
        }
        st.pending_bytes = 0;
    }

    /// Ends the run: streams still open are finalized now; echoes the gateway never reported
    /// are counted.
    pub fn finish(&mut self, now: Instant) {
        for (&id, st) in self.streams.iter_mut() {
            if !st.ended && !st.broken {
                Self::finalize(&mut self.s, st, id, now);
            }
            self.s.echoes.events_missing += st.echoes.len() as u64;
            if let Some(name) = st.echoes.keys().next() {
                example(&mut self.s, "mark_event_missing", || {
                    format!("stream {id}: echo {name:?} never reported by the gateway")
                });
            }
            st.echoes.clear();
        }
    }

    /// The results so far.
    pub fn summary(&self) -> DownlinkSummary {
        let mut out = self.s.clone();
        out.streams = self.streams.len() as u64;
        out.stops.produced = out.produced.stops;
        out.playback_latency = Percentiles::of(&self.playback_latency);
        out.playback_latency_buckets = chart_buckets(&self.playback_latency);
        out.clear_latency = Percentiles::of(&self.clear_latency);
        out.mark_latency = Percentiles::of(&self.mark_latency);
        out.stamp_to_verify = Percentiles::of(&self.stamp_to_verify);
        out.count_faults();
        out
    }
}

/// The downlink verifier thread.
pub struct DownlinkVerifier {
    tx: DownlinkSender,
    thread: std::thread::JoinHandle<DownlinkSummary>,
}

impl DownlinkVerifier {
    /// Starts the thread with a queue of `capacity` messages.
    pub fn start(capacity: usize) -> std::io::Result<DownlinkVerifier> {
        let (tx, DownlinkReceiver(mut rx)) = channel(capacity);
        let thread = std::thread::Builder::new()
            .name("downlink".into())
            .spawn(move || {
                let mut l = DownlinkLedger::new();
                while let Some(m) = rx.blocking_recv() {
                    if matches!(m, DlMsg::Finish) {
                        break;
                    }
                    l.apply(m, Instant::now());
                }
                l.finish(Instant::now());
                l.summary()
            })?;
        Ok(DownlinkVerifier { tx, thread })
    }

    /// The sender for the bot and the streams.
    pub fn sender(&self) -> DownlinkSender {
        self.tx.clone()
    }

    /// Verifies what is queued and returns the results. Blocking.
    pub fn finish(self) -> DownlinkSummary {
        self.tx.blocking_send(DlMsg::Finish);
        let waits = self.tx.waits();
        let mut s = self.thread.join().unwrap_or_default();
        s.queue_waits = waits;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::ULAW_TO_PCM;

    /// G.711 μ-law from its segment table: the biased magnitude falls in segment `s` when it
    /// lies in `[128 << s, 256 << s)`, which is cut into 16 equal steps; the code is sign,
    /// segment and step, bit-inverted. Written as interval search, not bit tricks.
    fn g711_by_definition(x: i16) -> u8 {
        let biased = (x as i32).abs().min(32635) + 0x84;
        let sign = if x < 0 { 0x80u8 } else { 0 };
        for seg in 0..8u8 {
            let (lo, hi) = (128i32 << seg, 256i32 << seg);
            if (lo..hi).contains(&biased) {
                let step = ((biased - lo) / (8 << seg)) as u8;
                return !(sign | (seg << 4) | step);
            }
        }
        unreachable!("biased magnitude {biased} is below 32768")
    }

    #[test]
    fn reference_encoder_is_g711() {
        for x in i16::MIN..=i16::MAX {
            assert_eq!(ulaw_encode(x), g711_by_definition(x), "sample {x}");
        }
        // Decoding the reference encoding lands within half a step (clip level aside).
        for x in -32000i16..=32000 {
            let d = ULAW_TO_PCM[ulaw_encode(x) as usize] as i32;
            let seg = ((!ulaw_encode(x)) >> 4) & 7;
            assert!((d - x as i32).abs() <= (4 << seg) + 1, "{x} → {d}");
        }
    }

    fn pcm_of(ulaw: &[u8]) -> Vec<u8> {
        ulaw.iter()
            .flat_map(|&u| ULAW_TO_PCM[u as usize].to_le_bytes())
            .collect()
    }

    /// A driver for synthetic sequences: time in ms from a base instant.
    struct Sim {
        l: DownlinkLedger,
        t0: Instant,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                l: DownlinkLedger::new(),
                t0: Instant::now(),
            }
        }
        fn t(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn produce(&mut self, ms: u64, item: Produced) {
            let at = self.t(ms);
            self.l.apply(
                DlMsg::Produced {
                    stream: 1,
                    at,
                    item,
                },
                at,
            );
        }
        fn media(&mut self, ms: u64, ulaw: &[u8], pcm: bool) {
            let (payload, encoding) = if pcm {
                (pcm_of(ulaw), PlaybackEncoding::PcmS16le)
            } else {
                (ulaw.to_vec(), PlaybackEncoding::Mulaw)
            };
            self.produce(ms, Produced::Media { payload, encoding });
        }
        fn rx(&mut self, ms: u64, item: RxItem) {
            let at = self.t(ms);
            self.l.apply(
                DlMsg::Rx {
                    stream: 1,
                    at,
                    item,
                },
                at,
            );
        }
        fn frames(&mut self, ms: u64, ulaw: &[u8]) {
            for f in ulaw.chunks(FRAME_BYTES) {
                self.rx(ms, RxItem::Media { ulaw: f.to_vec() });
            }
        }
        fn gw(&mut self, ms: u64, event: GatewayEvent) {
            let at = self.t(ms);
            self.l.apply(
                DlMsg::Gateway {
                    stream: 1,
                    at,
                    event,
                },
                at,
            );
        }
        fn echo(&mut self, ms: u64, name: &str, played: bool) {
            let at = self.t(ms);
            self.l.apply(
                DlMsg::Echo {
                    stream: 1,
                    at,
                    name: name.into(),
                    played,
                },
                at,
            );
        }
        fn end(&mut self, ms: u64, we_stopped: bool, close: Option<u16>) -> DownlinkSummary {
            let at = self.t(ms);
            self.l.apply(
                DlMsg::StreamEnd {
                    stream: 1,
                    at,
                    we_stopped,
                    server_close: close,
                },
                at,
            );
            self.l.finish(at);
            self.l.summary()
        }
    }

    fn audio(n: usize, seed: u8) -> Vec<u8> {
        // Avoid 0x7F: the reference encoder maps it to 0xFF (both are zero).
        (0..n)
            .map(|i| {
                let b = (i as u8).wrapping_mul(37).wrapping_add(seed);
                if b == 0x7F {
                    0x7E
                } else {
                    b
                }
            })
            .collect()
    }

    fn mark(name: &str) -> Produced {
        Produced::Mark { name: name.into() }
    }

    fn rx_mark(name: &str) -> RxItem {
        RxItem::Mark { name: name.into() }
    }

    #[test]
    fn clean_stream_with_pcm_mulaw_and_marks_in_place() {
        let mut s = Sim::new();
        let a = audio(320, 1);
        let b = audio(100, 2);
        s.media(0, &a, true);
        s.produce(0, mark("m1"));
        s.media(1, &b, false);
        s.produce(1, mark("m2"));
        s.frames(30, &a);
        s.rx(31, rx_mark("m1"));
        s.frames(40, &b);
        s.rx(41, rx_mark("m2"));
        s.echo(60, "m1", true);
        s.echo(80, "m2", true);
        for n in ["m1", "m2"] {
            s.gw(
                90,
                GatewayEvent::Mark {
                    name: n.into(),
                    played: Some(true),
                },
            );
        }
        let r = s.end(5000, true, Some(1000));
        assert_eq!(r.faults, 0, "{r:#?}");
        assert_eq!(r.audio.bytes_matched, 420);
        assert_eq!(r.marks.in_place, 2);
        assert_eq!(r.echoes.events_matched, 2);
        assert_eq!(r.received.media_frames, 3);
        assert_eq!((r.produced.pcm_records, r.produced.mulaw_records), (1, 1));
        // Latency: first frame of each record − its produce stamp.
        assert_eq!(r.playback_latency.count, 2);
        assert!(
            (r.playback_latency.max_ms - 39.0).abs() < 0.1,
            "{:?}",
            r.playback_latency
        );
        assert_eq!(r.mark_latency.count, 2);
    }

    #[test]
    fn pcm_is_held_to_the_reference_encoder_bit_for_bit() {
        let mut s = Sim::new();
        // Linear samples that are not μ-law levels: the gateway must quantise exactly like
        // the reference.
        let pcm: Vec<u8> = (0..160i32)
            .flat_map(|i| ((i * 201 - 16000) as i16).to_le_bytes())
            .collect();
        s.produce(
            0,
            Produced::Media {
                payload: pcm.clone(),
                encoding: PlaybackEncoding::PcmS16le,
            },
        );
        let mut got = reference_ulaw(&pcm);
        // An encoder that rounds one sample to the neighbouring level: a near miss.
        got[5] = if got[5] & 0x0F == 0x0F {
            got[5] - 1
        } else {
            got[5] + 1
        };
        // A corrupted byte: a plain mismatch.
        got[9] ^= 0x40;
        s.frames(10, &got);
        let r = s.end(100, true, Some(1000));
        assert_eq!(r.audio.bytes_mismatched, 2);
        assert_eq!(r.audio.pcm_near_misses, 1);
        assert_eq!(r.audio.bytes_matched, 158);
        assert!(r.faults > 0);
        assert!(r.examples.contains_key("bytes_mismatched"));
    }

    #[test]
    fn clear_discards_a_suffix_and_marks_around_it_are_placed() {
        let mut s = Sim::new();
        let a = audio(480, 3); // 3 frames
        let b = audio(480, 4);
        let c = audio(160, 5);
        s.media(0, &a, false);
        s.produce(0, mark("m1")); // after 480
        s.media(0, &b, false);
        s.produce(0, mark("m2")); // after 960: its media will be cut by the clear
        s.produce(0, mark("m3")); // also after 960: never forwarded
        s.produce(5, Produced::Clear);
        s.media(6, &c, true);
        s.produce(6, mark("m4"));
        // Gateway: all of a, m1, one frame of b; then the clear discards the rest of b; m2
        // is forwarded right after the clear frame, m3 is dropped.
        s.frames(10, &a);
        s.rx(10, rx_mark("m1"));
        s.frames(11, &b[..160]);
        s.rx(12, RxItem::Clear);
        s.rx(12, rx_mark("m2"));
        s.frames(20, &c);
        s.rx(20, rx_mark("m4"));
        // The simulator echoed m1 as played before the clear; the gateway must agree.
        s.echo(15, "m1", true);
        s.echo(16, "m4", false); // wrong on purpose: the gateway says played
        s.gw(
            17,
            GatewayEvent::Mark {
                name: "m1".into(),
                played: Some(true),
            },
        );
        s.gw(
            30,
            GatewayEvent::Mark {
                name: "m4".into(),
                played: Some(true),
            },
        );
        let r = s.end(5000, true, Some(1000));
        assert_eq!(r.audio.bytes_mismatched, 0, "{r:#?}");
        assert_eq!(r.audio.bytes_matched, 480 + 160 + 160);
        assert_eq!(r.audio.bytes_discarded_by_clear, 320);
        assert_eq!(r.audio.records_discarded_by_clear, 0);
        assert_eq!(r.clears.received, 1);
        assert_eq!(r.clear_latency.count, 1);
        assert_eq!(r.marks.in_place, 2); // m1, m4
        assert_eq!(r.marks.after_clear, 1); // m2
        assert_eq!(r.marks.dropped_at_clear, 1); // m3
        assert_eq!(r.marks.misplaced + r.marks.missing + r.marks.unexpected, 0);
        assert_eq!(r.audio.frames_misframed, 0);
        assert_eq!(r.echoes.events_matched, 1);
        assert_eq!(r.echoes.events_played_mismatch, 1);
        assert_eq!(r.faults, 1);
    }

    #[test]
    fn a_mark_sent_early_at_a_clear_is_fine_but_not_before_more_media() {
        let mut s = Sim::new();
        let a = audio(320, 6);
        s.media(0, &a, false);
        s.produce(0, mark("early"));
        s.produce(1, Produced::Clear);
        s.media(2, &a, false);
        s.produce(2, mark("bad"));
        s.media(2, &a, false);
        s.produce(3, Produced::Clear);
        // Epoch 0: one frame, the mark (early: 160 < 320), then the clear: fine.
        s.frames(10, &a[..160]);
        s.rx(10, rx_mark("early"));
        s.rx(11, RxItem::Clear);
        // Epoch 1: mark after 160 of its 320 bytes, then more media: misplaced.
        s.frames(12, &a[..160]);
        s.rx(12, rx_mark("bad"));
        s.frames(12, &a[160..]);
        s.rx(13, RxItem::Clear);
        let r = s.end(5000, true, Some(1000));
        assert_eq!(r.marks.early_at_clear, 1);
        assert_eq!(r.marks.misplaced, 1);
        assert_eq!(r.audio.bytes_discarded_by_clear, 160 + 320);
        assert_eq!(r.audio.records_discarded_by_clear, 1);
        assert_eq!(r.clears.received, 2);
    }

    #[test]
    fn unplayed_marks_at_a_clear_need_played_false_from_the_gateway() {
        let mut s = Sim::new();
        let a = audio(1600, 7);
        s.media(0, &a, false);
        s.produce(0, mark("p"));
        s.media(0, &a, false);
        s.produce(0, mark("q"));
        s.produce(500, Produced::Clear);
        s.frames(10, &a);
        s.rx(10, rx_mark("p"));
        s.frames(10, &a);
        s.rx(10, rx_mark("q"));
        // p played at 210 ms; q was pending when the clear arrived at 510 ms.
        s.echo(210, "p", true);
        s.rx(510, RxItem::Clear);
        s.echo(510, "q", false);
        s.gw(
            220,
            GatewayEvent::Mark {
                name: "p".into(),
                played: Some(true),
            },
        );
        s.gw(
            520,
            GatewayEvent::Mark {
                name: "q".into(),
                played: Some(false),
            },
        );
        // An echo right before a clear frame that the gateway counts as unplayed: a race.
        s.produce(600, mark("r"));
        s.rx(610, rx_mark("r"));
        s.echo(611, "r", true);
        s.produce(612, Produced::Clear);
        s.rx(650, RxItem::Clear);
        s.gw(
            660,
            GatewayEvent::Mark {
                name: "r".into(),
                played: Some(false),
            },
        );
        // The gateway reports a mark it never got an echo for, and none for another echo.
        s.gw(
            700,
            GatewayEvent::Mark {
                name: "ghost".into(),
                played: Some(true),
            },
        );
        s.echo(710, "lost", true);
        let r = s.end(5000, true, Some(1000));
        assert_eq!(r.echoes.played, 3);
        assert_eq!(r.echoes.unplayed, 1);
        assert_eq!(r.echoes.events_matched, 2);
        assert_eq!(r.echoes.events_played_mismatch_near_clear, 1);
        assert_eq!(r.echoes.events_played_mismatch, 0);
        assert_eq!(r.echoes.events_unexpected, 1);
        assert_eq!(r.echoes.events_missing, 1);
        assert_eq!(r.faults, 2, "{r:#?}");
    }

    #[test]
    fn played_false_events_for_marks_a_clear_kept_back_are_accepted() {
        let mut s = Sim::new();
        let a = audio(320, 12);
        s.media(0, &a, false);
        s.produce(0, mark("kept-back"));
        s.produce(0, mark("also-kept-back"));
        s.produce(1, Produced::Clear);
        s.media(2, &a, false);
        s.produce(2, mark("after"));
        s.frames(10, &a[..160]);
        s.rx(11, RxItem::Clear);
        // The gateway reports one kept-back mark before any new media arrives...
        s.gw(
            12,
            GatewayEvent::Mark {
                name: "kept-back".into(),
                played: Some(false),
            },
        );
        s.frames(13, &a);
        // ...and the other after.
        s.gw(
            14,
            GatewayEvent::Mark {
                name: "also-kept-back".into(),
                played: Some(false),
            },
        );
        // A mark echoed right after the clear that the gateway calls unplayed: a race.
        s.rx(15, rx_mark("after"));
        s.echo(15, "after", true);
        s.gw(
            30,
            GatewayEvent::Mark {
                name: "after".into(),
                played: Some(false),
            },
        );
        let r = s.end(5000, true, Some(1000));
        assert_eq!(r.echoes.events_for_unforwarded_marks, 2);
        assert_eq!(r.marks.dropped_at_clear, 2);
        assert_eq!(r.echoes.events_played_mismatch_near_clear, 1);
        assert_eq!(r.faults, 0, "{r:#?}");
    }

    #[test]
    fn misframing_loss_and_unexpected_bytes_are_faults() {
        let mut s = Sim::new();
        let a = audio(200, 8);
        let b = audio(200, 9);
        s.media(0, &a, false);
        s.media(0, &b, false);
        // One frame spanning both records, one short frame not at a record end.
        s.rx(
            10,
            RxItem::Media {
                ulaw: a[..160].to_vec(),
            },
        );
        s.rx(
            10,
            RxItem::Media {
                ulaw: [&a[160..], &b[..120]].concat(),
            },
        );
        s.rx(
            10,
            RxItem::Media {
                ulaw: b[120..150].to_vec(),
            },
        );
        s.rx(
            10,
            RxItem::Media {
                ulaw: b[150..].to_vec(),
            },
        );
        s.rx(
            10,
            RxItem::Media {
                ulaw: vec![1, 2, 3],
            },
        );
        s.rx(11, rx_mark("nope"));
        s.rx(11, RxItem::Clear);
        s.rx(
            11,
            RxItem::Invalid {
                reason: "binary_frame",
            },
        );
        // A record produced long before the end and never received; one in flight.
        s.media(100, &a, false);
        s.produce(200, mark("old"));
        s.media(4500, &b, false);
        let r = s.end(5000, true, Some(1000));
        assert_eq!(r.audio.frames_misframed, 2);
        assert_eq!(r.audio.bytes_unexpected, 3);
        assert_eq!(r.audio.records_lost, 1);
        assert_eq!(r.audio.records_in_flight_at_end, 1);
        assert_eq!(r.marks.missing, 1);
        assert_eq!(r.marks.unexpected, 1);
        assert_eq!(r.clears.unexpected, 1);
        assert_eq!(r.received.invalid.get("binary_frame"), Some(&1));
        assert_eq!(r.audio.bytes_matched, 400);
    }

    #[test]
    fn stops_need_close_1000_and_a_stopped_by_control_event() {
        let mut s = Sim::new();
        let a = audio(320, 10);
        s.media(0, &a, false);
        s.produce(100, Produced::Stop);
        s.frames(10, &a[..160]);
        s.gw(
            200,
            GatewayEvent::End {
                kind: "disconnect".into(),
                reason: Some("stopped_by_control".into()),
                playback: Some(serde_json::json!({"frames_sent": 1, "marks_sent": 0, "note": "x"})),
            },
        );
        let r = s.end(150, false, Some(1000));
        assert_eq!(r.stops.produced, 1);
        assert_eq!(r.stops.closed_1000, 1);
        assert_eq!(r.stops.stopped_by_control_events, 1);
        assert_eq!(r.audio.records_cut_by_stop, 1);
        assert_eq!(r.faults, 0, "{r:#?}");

        // A stream closed by the server without a stop record, and a stop closed wrongly.
        let mut l = DownlinkLedger::new();
        let now = Instant::now();
        l.apply(
            DlMsg::StreamEnd {
                stream: 2,
                at: now,
                we_stopped: false,
                server_close: Some(1011),
            },
            now,
        );
        l.apply(
            DlMsg::Produced {
                stream: 3,
                at: now,
                item: Produced::Stop,
            },
            now,
        );
        l.apply(
            DlMsg::Gateway {
                stream: 3,
                at: now,
                event: GatewayEvent::End {
                    kind: "stop".into(),
                    reason: Some("stop".into()),
                    playback: None,
                },
            },
            now,
        );
        l.apply(
            DlMsg::StreamEnd {
                stream: 3,
                at: now,
                we_stopped: false,
                server_close: Some(1001),
            },
            now,
        );
        l.finish(now);
        let r = l.summary();
        assert_eq!(r.stops.unexpected_server_closes, 1);
        assert_eq!(r.stops.wrong_close, 1);
        assert_eq!(r.stops.wrong_end_events, 1);
        assert_eq!(r.faults, 3);
    }

    #[test]
    fn terminal_event_playback_summaries_are_totalled() {
        let mut s = Sim::new();
        s.produce(0, Produced::Stop);
        s.gw(
            1,
            GatewayEvent::End {
                kind: "disconnect".into(),
                reason: Some("stopped_by_control".into()),
                playback: Some(
                    serde_json::json!({"frames_sent": 10, "marks_sent": 2, "note": "x"}),
                ),
            },
        );
        s.gw(2, GatewayEvent::Start { routed: true });
        let r = s.end(10, false, Some(1000));
        assert_eq!(r.stops.stopped_by_control_events, 1);
        assert_eq!(r.gateway_events.end_events_with_playback, 1);
        assert_eq!(
            r.gateway_events.playback_totals.get("frames_sent"),
            Some(&10.0)
        );
        assert_eq!(r.gateway_events.playback_totals.get("note"), None);
        assert_eq!(r.gateway_events.starts_routed, 1);
        assert_eq!(r.faults, 0);
    }

    #[test]
    fn retracted_records_and_the_memory_bound() {
        let mut s = Sim::new();
        let a = audio(160, 11);
        s.media(0, &a, false);
        s.media(1, &a, false);
        s.l.apply(DlMsg::Unproduced { stream: 1 }, s.t(1));
        s.frames(10, &a);
        let r = s.end(100, true, Some(1000));
        assert_eq!(r.produced.retracted, 1);
        assert_eq!(r.produced.media_records, 1);
        assert_eq!(r.audio.bytes_matched, 160);
        assert_eq!(r.faults, 0);

        let mut l = DownlinkLedger::with_max_pending_bytes(300);
        let now = Instant::now();
        for _ in 0..2 {
            l.apply(
                DlMsg::Produced {
                    stream: 9,
                    at: now,
                    item: Produced::Media {
                        payload: a.clone(),
                        encoding: PlaybackEncoding::Mulaw,
                    },
                },
                now,
            );
        }
        l.finish(now);
        assert_eq!(l.summary().unverifiable_streams, 1);
    }
}
