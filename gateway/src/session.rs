//! The per-stream state machine, pure and free of I/O.
//!
//! A [`Session`] is owned by one connection task. It takes parsed messages and turns them into
//! audio records and events on a [`Publisher`]; the connection task turns its [`Flow`] and
//! [`SessionError`] results into WebSocket close frames. Keeping this I/O-free makes it
//! property-testable and fuzzable with an in-memory publisher.
//!
//! States: `AwaitingStart` (after `connected`, or nothing) → `Streaming` (after `start`) →
//! `Stopped` (after `stop`). `media`/`dtmf`/`mark` before `start`, a second `start` and any
//! message after `stop` are protocol errors. Sequence-number gaps/regressions and media
//! timestamp jumps are counted and reported as `sequence_gap` events, never fatal.

use thiserror::Error;

use crate::events::{EndKind, Event, EventBody, MediaFormatOut, StreamIds};
use crate::metrics::DropReason;
use crate::protocol::audio::{decode_base64_into, ulaw_to_pcm16le_into, PayloadError};
use crate::protocol::message::{Media, Message, Start};
use crate::protocol::{ParseError, Track};

/// What goes into the value of an audio record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioEncoding {
    /// Signed 16-bit little-endian PCM, 8 kHz mono (the default).
    PcmS16le,
    /// The raw G.711 μ-law bytes Twilio sent.
    Mulaw,
}

impl AudioEncoding {
    /// The `encoding` header value.
    pub fn header_value(self) -> &'static str {
        match self {
            AudioEncoding::PcmS16le => "pcm_s16le",
            AudioEncoding::Mulaw => "mulaw",
        }
    }
    /// Output bytes per μ-law input byte.
    fn bytes_per_sample(self) -> usize {
        match self {
            AudioEncoding::PcmS16le => 2,
            AudioEncoding::Mulaw => 1,
        }
    }
}

/// Settings a session needs; shared by all sessions of a process.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Consecutive chunks of one track concatenated into one record (≥ 1).
    pub frames_per_record: u32,
    /// Record value encoding.
    pub encoding: AudioEncoding,
    /// Cap on one decoded payload (bounded anyway by the WebSocket message cap).
    pub max_payload_bytes: usize,
    /// Cap on `sequence_gap` events per stream; beyond it anomalies are only counted.
    pub max_anomaly_events: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            frames_per_record: 1,
            encoding: AudioEncoding::PcmS16le,
            max_payload_bytes: 64 * 1024,
            max_anomaly_events: 100,
        }
    }
}

/// One audio record (one chunk, or `chunks` consecutive chunks of one track).
#[derive(Debug, Clone, Copy)]
pub struct AudioRecord<'a> {
    /// Stream identity (key and id headers).
    pub ids: &'a StreamIds,
    /// Which track (selects the topic).
    pub track: Track,
    /// `sequenceNumber` of the first chunk.
    pub seq: u64,
    /// `media.chunk` of the first chunk.
    pub chunk: u64,
    /// `media.timestamp` of the first chunk, ms.
    pub timestamp_ms: u64,
    /// Gateway receive time of the first chunk, unix µs.
    pub received_at_us: u64,
    /// Gateway receive time of the first chunk on the process's monotonic clock, µs (latency).
    pub received_mono_us: u64,
    /// Number of chunks in this record.
    pub chunks: u32,
    /// Value encoding.
    pub encoding: AudioEncoding,
    /// The record value.
    pub payload: &'a [u8],
}

/// Where a session's output goes: the Kafka sink in production, a recorder in tests.
pub trait Publisher {
    /// Hands over one audio record. `Err` means it was not accepted (the frames are dropped and
    /// counted by the caller with the reason).
    fn publish_audio(&mut self, record: &AudioRecord<'_>) -> Result<(), DropReason>;
    /// Hands over one event. Failures are counted by the publisher; events never block audio.
    fn publish_event(&mut self, event: &Event<'_>);
    /// Counts a protocol error of `kind` (metrics). Default: nothing.
    fn protocol_error(&mut self, _kind: &'static str) {}
    /// Counts a sequence anomaly of `kind` (metrics). Default: nothing.
    fn anomaly(&mut self, _kind: &'static str) {}
    /// Counts `n` frames dropped for `reason` (metrics). Default: nothing.
    fn frames_dropped(&mut self, _reason: DropReason, _n: u64) {}
    /// Counts `bytes` of decoded μ-law received (metrics). Default: nothing.
    fn media_received(&mut self, _bytes: usize) {}
}

/// A protocol error that ends the stream: close code, stable kind, and a reason for the close
/// frame and the `error` event.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{reason}")]
pub struct SessionError {
    /// WebSocket close code to send.
    pub close_code: u16,
    /// Stable label (one of `metrics::PROTOCOL_ERROR_KINDS`).
    pub kind: &'static str,
    /// Human-readable reason (≤ 123 bytes, fits a close frame).
    pub reason: String,
}

/// WebSocket close codes we use (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure (after `stop`).
    pub const NORMAL: u16 = 1000;
    /// Going away (shutdown, idle timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// WebSocket framing protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Unsupported data (binary frames).
    pub const UNSUPPORTED: u16 = 1003;
    /// Invalid payload data (not UTF-8, not JSON, not base64).
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (Twilio protocol state or field errors).
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// Try again later (Kafka backpressure with `--overflow disconnect`).
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

impl SessionError {
    /// Builds an error; the reason is truncated to fit a close frame.
    pub fn new(close_code: u16, kind: &'static str, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        SessionError {
            close_code,
            kind,
            reason,
        }
    }

    /// Maps a parser error to a close code.
    pub fn from_parse(e: ParseError) -> Self {
        let code = match e {
            ParseError::InvalidUtf8 | ParseError::InvalidJson => close_code::INVALID_DATA,
            _ => close_code::POLICY,
        };
        SessionError::new(code, e.kind(), e.to_string())
    }
}

/// What the connection should do after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// `stop` received: the stream is over; linger for the peer's close.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingStart,
    Streaming,
    Stopped,
}

/// Per-track state: the pending batch and timestamp tracking.
#[derive(Debug, Default)]
struct TrackState {
    /// Encoded audio of the chunks not yet published (empty when `frames_per_record` is 1).
    batch: Vec<u8>,
    /// Chunks in `batch`.
    batch_chunks: u32,
    /// Metadata of the first chunk in `batch`.
    first: Option<FirstChunk>,
    /// Timestamp (ms) the next chunk should carry if contiguous.
    next_ts: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct FirstChunk {
    seq: u64,
    chunk: u64,
    timestamp_ms: u64,
    received_at_us: u64,
    received_mono_us: u64,
}

/// Receive time of a message, taken once per frame by the connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    /// Unix time, µs.
    pub unix_us: u64,
    /// Process monotonic clock, µs.
    pub mono_us: u64,
}

/// The state of one Twilio stream.
pub struct Session {
    cfg: SessionConfig,
    state: State,
    ids: Option<StreamIds>,
    tracks_announced: Vec<Track>,
    last_seq: Option<u64>,
    tracks: [TrackState; Track::COUNT],
    /// Decoded μ-law of the current message (reused).
    ulaw: Vec<u8>,
    /// Encoded value of the current record when not batching (reused).
    record: Vec<u8>,
    frames_published: u64,
    frames_dropped: u64,
    anomaly_events: u32,
    ended: bool,
}

impl Session {
    /// A session waiting for `start`.
    pub fn new(cfg: SessionConfig) -> Self {
        Session {
            cfg: SessionConfig {
                frames_per_record: cfg.frames_per_record.max(1),
                ..cfg
            },
            state: State::AwaitingStart,
            ids: None,
            tracks_announced: Vec::new(),
            last_seq: None,
            tracks: Default::default(),
            ulaw: Vec::new(),
            record: Vec::new(),
            frames_published: 0,
            frames_dropped: 0,
            anomaly_events: 0,
            ended: false,
        }
    }

    /// Stream identity, once `start` arrived.
    pub fn ids(&self) -> Option<&StreamIds> {
        self.ids.as_ref()
    }

    /// True between `start` and the end.
    pub fn is_streaming(&self) -> bool {
        self.state == State::Streaming
    }

    /// True once `start` was seen (even if stopped since).
    pub fn has_started(&self) -> bool {
        self.ids.is_some()
    }

    /// Frames handed to the publisher so far.
    pub fn frames_published(&self) -> u64 {
        self.frames_published
    }

    /// Frames dropped so far.
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped
    }

    /// Handles one parsed message.
    pub fn handle<P: Publisher>(
        &mut self,
        msg: &Message<'_>,
        at: Received,
        out: &mut P,
    ) -> Result<Flow, SessionError> {
        if self.state == State::Stopped {
            return Err(SessionError::new(
                close_code::POLICY,
                "after_stop",
                format!("{} after stop", msg.event_label()),
            ));
        }
        if let Message::Connected { .. } = msg {
            return Ok(Flow::Continue);
        }
        if let Message::Start(start) = msg {
            return self.start(start, at, out);
        }
        if self.state == State::AwaitingStart {
            // Unknown events are tolerated in any state.
            if let Message::Unknown { .. } = msg {
                return Ok(Flow::Continue);
            }
            let label = msg.event_label();
            return Err(SessionError::new(
                close_code::POLICY,
                "media_before_start",
                format!("{label} before start"),
            ));
        }
        // Streaming from here on.
        if let (Some(sid), Some(ids)) = (msg.stream_sid(), self.ids.as_ref()) {
            if sid != ids.stream_sid {
                return Err(SessionError::new(
                    close_code::POLICY,
                    "stream_sid_mismatch",
                    "streamSid differs from start",
                ));
            }
        }
        if let Some(seq) = msg.seq() {
            self.check_seq(seq, at, out);
        }
        match msg {
            Message::Media(m) => {
                self.media(m, at, out)?;
                Ok(Flow::Continue)
            }
            Message::Dtmf { digit, track, .. } => {
                let ev = Event {
                    ids: self.ids.as_ref(),
                    at_us: at.unix_us,
                    body: EventBody::Dtmf {
                        digit,
                        track: *track,
                    },
                };
                out.publish_event(&ev);
                Ok(Flow::Continue)
            }
            Message::Mark { name, .. } => {
                let ev = Event {
                    ids: self.ids.as_ref(),
                    at_us: at.unix_us,
                    body: EventBody::Mark { name },
                };
                out.publish_event(&ev);
                Ok(Flow::Continue)
            }
            Message::Stop { .. } => {
                self.finish(EndKind::Stop, "stop", None, at, out);
                self.state = State::Stopped;
                Ok(Flow::Stopped)
            }
            Message::Unknown { .. } | Message::Connected { .. } | Message::Start(_) => {
                Ok(Flow::Continue)
            }
        }
    }

    fn start<P: Publisher>(
        &mut self,
        start: &Start<'_>,
        at: Received,
        out: &mut P,
    ) -> Result<Flow, SessionError> {
        if self.state != State::AwaitingStart {
            return Err(SessionError::new(
                close_code::POLICY,
                "duplicate_start",
                "duplicate start",
            ));
        }
        if let Some(mf) = &start.media_format {
            if mf.encoding != "audio/x-mulaw" || mf.sample_rate != 8000 || mf.channels != 1 {
                return Err(SessionError::new(
                    close_code::POLICY,
                    "unsupported_media_format",
                    format!(
                        "unsupported media format {} {} Hz {} ch",
                        mf.encoding, mf.sample_rate, mf.channels
                    ),
                ));
            }
        }
        if start.stream_sid.is_empty() || start.stream_sid.len() > 64 {
            return Err(SessionError::new(
                close_code::POLICY,
                "wrong_type",
                "streamSid must be 1-64 characters",
            ));
        }
        self.ids = Some(StreamIds {
            stream_sid: start.stream_sid.to_owned(),
            call_sid: start.call_sid.to_owned(),
            account_sid: start.account_sid.to_owned(),
        });
        self.tracks_announced = start.tracks.clone();
        self.state = State::Streaming;
        if let Some(seq) = start.seq {
            self.last_seq = Some(seq);
        }
        let params: Vec<(String, String)> = start
            .custom_parameters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mf = start.media_format.as_ref().map(|m| MediaFormatOut {
            encoding: m.encoding.to_owned(),
            sample_rate: m.sample_rate,
            channels: m.channels,
        });
        let ev = Event {
            ids: self.ids.as_ref(),
            at_us: at.unix_us,
            body: EventBody::Start {
                tracks: &self.tracks_announced,
                custom_parameters: &params,
                media_format: mf.as_ref(),
            },
        };
        out.publish_event(&ev);
        // Size the per-track buffers once, so steady streaming never reallocates.
        let per_record =
            160 * self.cfg.encoding.bytes_per_sample() * self.cfg.frames_per_record as usize;
        for t in &start.tracks {
            if self.cfg.frames_per_record > 1 {
                self.tracks[t.index()].batch.reserve(per_record);
            }
        }
        self.ulaw.reserve(160);
        self.record.reserve(320);
        Ok(Flow::Continue)
    }

    fn anomaly_event<P: Publisher>(
        &mut self,
        kind: &'static str,
        track: Option<Track>,
        expected: u64,
        got: u64,
        at: Received,
        out: &mut P,
    ) {
        out.anomaly(kind);
        if self.anomaly_events < self.cfg.max_anomaly_events {
            self.anomaly_events += 1;
            let ev = Event {
                ids: self.ids.as_ref(),
                at_us: at.unix_us,
                body: EventBody::SequenceGap {
                    kind,
                    track,
                    expected,
                    got,
                },
            };
            out.publish_event(&ev);
        }
    }

    fn check_seq<P: Publisher>(&mut self, seq: u64, at: Received, out: &mut P) {
        match self.last_seq {
            Some(last) if seq == last.wrapping_add(1) => self.last_seq = Some(seq),
            Some(last) if seq > last => {
                self.anomaly_event("seq_gap", None, last + 1, seq, at, out);
                self.last_seq = Some(seq);
            }
            Some(last) => {
                // Keep the high-water mark so one stray message does not cascade.
                self.anomaly_event("seq_regression", None, last + 1, seq, at, out);
            }
            None => self.last_seq = Some(seq),
        }
    }

    fn media<P: Publisher>(
        &mut self,
        m: &Media<'_>,
        at: Received,
        out: &mut P,
    ) -> Result<(), SessionError> {
        self.ulaw.clear();
        let n = match decode_base64_into(
            m.payload.as_bytes(),
            &mut self.ulaw,
            self.cfg.max_payload_bytes,
        ) {
            Ok(n) => n,
            Err(PayloadError::Empty) => {
                // Tolerated: nothing to publish, but the frame is accounted for.
                out.protocol_error("empty_payload");
                self.drop_frames(DropReason::EmptyPayload, 1, out);
                return Ok(());
            }
            Err(PayloadError::InvalidBase64) => {
                return Err(SessionError::new(
                    close_code::INVALID_DATA,
                    "invalid_base64",
                    "media.payload is not valid base64",
                ));
            }
            Err(PayloadError::TooLarge) => {
                return Err(SessionError::new(
                    close_code::TOO_BIG,
                    "payload_too_large",
                    "media.payload too large",
                ));
            }
        };
        out.media_received(n);
        let ti = m.track.index();
        // Timestamp continuity per track: a jump forward of more than one 20 ms chunk, or any
        // step backwards, is an anomaly; a pending batch is flushed first so every record's
        // samples are contiguous from its `timestamp_ms`.
        let expected = self.tracks[ti].next_ts;
        self.tracks[ti].next_ts = Some(m.timestamp_ms + (n as u64) / 8);
        if let Some(exp) = expected {
            if m.timestamp_ms > exp + 20 || m.timestamp_ms + 20 < exp {
                if self.tracks[ti].batch_chunks > 0 {
                    self.flush_track(m.track, out);
                }
                self.anomaly_event(
                    "timestamp_jump",
                    Some(m.track),
                    exp,
                    m.timestamp_ms,
                    at,
                    out,
                );
            }
        }
        let first = FirstChunk {
            seq: m.seq,
            chunk: m.chunk,
            timestamp_ms: m.timestamp_ms,
            received_at_us: at.unix_us,
            received_mono_us: at.mono_us,
        };
        if self.cfg.frames_per_record == 1 {
            self.record.clear();
            let encoding = self.cfg.encoding;
            let payload: &[u8] = match encoding {
                AudioEncoding::PcmS16le => {
                    ulaw_to_pcm16le_into(&self.ulaw, &mut self.record);
                    &self.record
                }
                AudioEncoding::Mulaw => &self.ulaw,
            };
            let Some(ids) = self.ids.as_ref() else {
                return Ok(());
            };
            let rec = AudioRecord {
                ids,
                track: m.track,
                seq: first.seq,
                chunk: first.chunk,
                timestamp_ms: first.timestamp_ms,
                received_at_us: first.received_at_us,
                received_mono_us: first.received_mono_us,
                chunks: 1,
                encoding,
                payload,
            };
            match out.publish_audio(&rec) {
                Ok(()) => self.frames_published += 1,
                Err(reason) => self.drop_frames(reason, 1, out),
            }
            return Ok(());
        }
        let ts = &mut self.tracks[ti];
        if ts.batch_chunks == 0 {
            ts.first = Some(first);
            ts.batch.clear();
        }
        match self.cfg.encoding {
            AudioEncoding::PcmS16le => ulaw_to_pcm16le_into(&self.ulaw, &mut ts.batch),
            AudioEncoding::Mulaw => ts.batch.extend_from_slice(&self.ulaw),
        }
        ts.batch_chunks += 1;
        if ts.batch_chunks >= self.cfg.frames_per_record {
            self.flush_track(m.track, out);
        }
        Ok(())
    }

    fn drop_frames<P: Publisher>(&mut self, reason: DropReason, n: u64, out: &mut P) {
        self.frames_dropped += n;
        out.frames_dropped(reason, n);
    }

    /// Publishes a track's pending batch, if any.
    fn flush_track<P: Publisher>(&mut self, track: Track, out: &mut P) {
        let ts = &mut self.tracks[track.index()];
        let chunks = ts.batch_chunks;
        let (Some(first), Some(ids)) = (ts.first.take(), self.ids.as_ref()) else {
            ts.batch_chunks = 0;
            return;
        };
        if chunks == 0 {
            return;
        }
        ts.batch_chunks = 0;
        let rec = AudioRecord {
            ids,
            track,
            seq: first.seq,
            chunk: first.chunk,
            timestamp_ms: first.timestamp_ms,
            received_at_us: first.received_at_us,
            received_mono_us: first.received_mono_us,
            chunks,
            encoding: self.cfg.encoding,
            payload: &ts.batch,
        };
        let result = out.publish_audio(&rec);
        ts.batch.clear();
        match result {
            Ok(()) => self.frames_published += chunks as u64,
            Err(reason) => self.drop_frames(reason, chunks as u64, out),
        }
    }

    fn finish<P: Publisher>(
        &mut self,
        kind: EndKind,
        reason: &str,
        error: Option<&SessionError>,
        at: Received,
        out: &mut P,
    ) {
        if self.ended {
            return;
        }
        self.ended = true;
        for t in [Track::Inbound, Track::Outbound] {
            self.flush_track(t, out);
        }
        // A connection that never sent `start` and ended without error is not a stream.
        if self.ids.is_none() && error.is_none() {
            return;
        }
        let ev = Event {
            ids: self.ids.as_ref(),
            at_us: at.unix_us,
            body: EventBody::End {
                kind,
                reason,
                error_kind: error.map(|e| e.kind),
                close_code: error.map(|e| e.close_code),
                frames_published: self.frames_published,
                frames_dropped: self.frames_dropped,
            },
        };
        out.publish_event(&ev);
    }

    /// Ends the stream because of a protocol error: flushes pending audio, publishes `error`.
    pub fn fail<P: Publisher>(&mut self, err: &SessionError, at: Received, out: &mut P) {
        out.protocol_error(err.kind);
        let reason = err.reason.clone();
        self.finish(EndKind::Error, &reason, Some(err), at, out);
        self.state = State::Stopped;
    }

    /// Ends the stream because the socket ended without `stop`: flushes pending audio,
    /// publishes `disconnect` with `reason`. No-op after `stop` or an error.
    pub fn disconnect<P: Publisher>(&mut self, reason: &str, at: Received, out: &mut P) {
        self.finish(EndKind::Disconnect, reason, None, at, out);
        self.state = State::Stopped;
    }
}

#[cfg(test)]
mod tests;
