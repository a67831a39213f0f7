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
//! timestamp discontinuities are counted and reported as `sequence_gap` events, never fatal.
//!
//! Audio records carry the μ-law bytes Twilio sent; the Kafka path converts them to the
//! configured output. A record's samples are always contiguous from its `timestamp_ms`: a
//! pending batch is cut at every timestamp that is not exactly where the previous chunk of the
//! track ended (see [`Session`]'s `media` handling and `docs/decisions.md`).

use thiserror::Error;

use crate::events::{EndKind, Event, EventBody, MediaFormatOut, StreamIds};
use crate::metrics::{AnomalyKind, DropReason, ProtocolErrorKind};
use crate::protocol::audio::{decode_base64_into, PayloadError};
use crate::protocol::message::{Media, Message, Start};
use crate::protocol::{ParseError, Track};

/// Settings a session needs; shared by all sessions of a process.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Consecutive chunks of one track concatenated into one record (≥ 1).
    pub frames_per_record: u32,
    /// Cap on one decoded payload (bounded anyway by the WebSocket message cap).
    pub max_payload_bytes: usize,
    /// Cap on `sequence_gap` events per stream; beyond it anomalies are only counted.
    pub max_anomaly_events: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            frames_per_record: 1,
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
    /// The μ-law bytes of the chunks, in order.
    pub payload: &'a [u8],
    /// `sink::record` flags (e.g. audio the gateway played into the call).
    pub flags: u8,
}

/// Where a session's output goes: the Kafka sink in production, a recorder in tests.
pub trait Publisher {
    /// Hands over one audio record. `Err` means it was not accepted (the frames are dropped and
    /// counted by the caller with the reason).
    fn publish_audio(&mut self, record: &AudioRecord<'_>) -> Result<(), DropReason>;
    /// Hands over one event. Failures are counted by the publisher; events never block audio.
    fn publish_event(&mut self, event: &Event<'_>);
    /// Counts a protocol error of `kind` (metrics). Default: nothing.
    fn protocol_error(&mut self, _kind: ProtocolErrorKind) {}
    /// Counts a sequence anomaly of `kind` (metrics). Default: nothing.
    fn anomaly(&mut self, _kind: AnomalyKind) {}
    /// Counts `n` frames dropped for `reason` (metrics). Default: nothing.
    fn frames_dropped(&mut self, _reason: DropReason, _n: u64) {}
    /// Counts one media chunk received with `bytes` of decoded μ-law (0 for an empty
    /// payload). Default: nothing.
    fn media_received(&mut self, _bytes: usize) {}
    /// One non-empty chunk of a started stream, for the output profiles (`sink::profiles`);
    /// called before the chunk's default-profile record. Default: nothing.
    fn profile_chunk(&mut self, _chunk: &crate::sink::profiles::ProfileChunk<'_>) {}
    /// Twilio echoed mark `name`: `Some(false)` when it came back because of a `clear` the
    /// gateway sent, `Some(true)` when its audio played, `None` when the gateway did not send
    /// it. Default: `None`.
    fn mark_played(&mut self, _name: &str) -> Option<bool> {
        None
    }
    /// The stream started (`ids`, announced `tracks`): where its playback goes, if the
    /// publisher offers playback. Called before the `start` event is published. Default:
    /// `None`.
    fn attach(
        &mut self,
        _ids: &StreamIds,
        _tracks: &[Track],
    ) -> Option<crate::playback::PlaybackRoute> {
        None
    }
}

/// A protocol error that ends the stream: close code, stable kind, and a reason for the close
/// frame and the `error` event.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{reason}")]
pub struct SessionError {
    /// WebSocket close code to send.
    pub close_code: u16,
    /// Stable kind (metric label and `error_kind` field).
    pub kind: ProtocolErrorKind,
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
    pub fn new(close_code: u16, kind: ProtocolErrorKind, reason: impl Into<String>) -> Self {
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

    /// Maps a parser error to a close code and kind.
    pub fn from_parse(e: ParseError) -> Self {
        let (code, kind) = match e {
            ParseError::InvalidUtf8 => (close_code::INVALID_DATA, ProtocolErrorKind::InvalidUtf8),
            ParseError::InvalidJson => (close_code::INVALID_DATA, ProtocolErrorKind::InvalidJson),
            ParseError::NotAnObject => (close_code::POLICY, ProtocolErrorKind::NotAnObject),
            ParseError::MissingField(_) => (close_code::POLICY, ProtocolErrorKind::MissingField),
            ParseError::WrongType(_) => (close_code::POLICY, ProtocolErrorKind::WrongType),
            ParseError::InvalidNumber(_) => (close_code::POLICY, ProtocolErrorKind::InvalidNumber),
            ParseError::InvalidTrack => (close_code::POLICY, ProtocolErrorKind::InvalidTrack),
            ParseError::StreamSidMismatch => {
                (close_code::POLICY, ProtocolErrorKind::StreamSidMismatch)
            }
            ParseError::DuplicateField(_) => {
                (close_code::POLICY, ProtocolErrorKind::DuplicateField)
            }
        };
        SessionError::new(code, kind, e.to_string())
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
    /// μ-law of the chunks not yet published (empty when `frames_per_record` is 1).
    batch: Vec<u8>,
    /// Chunks in `batch`.
    batch_chunks: u32,
    /// Metadata of the first chunk in `batch`.
    first: Option<FirstChunk>,
    /// Where the previous non-empty chunk of the track ended, in samples (8 per ms) since the
    /// stream started: where the next chunk must start to be contiguous.
    next_sample: Option<u64>,
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
    /// The last sequence number reported as a regression: when the next message continues
    /// from it, the stream's numbering really moved back (the high-water mark was a stray
    /// high number), and the check follows it instead of reporting every later message.
    regressed_at: Option<u64>,
    tracks: [TrackState; Track::COUNT],
    /// Decoded μ-law of the current message (reused).
    ulaw: Vec<u8>,
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
            regressed_at: None,
            tracks: Default::default(),
            ulaw: Vec::new(),
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

    /// True once the terminal event was published.
    pub fn has_ended(&self) -> bool {
        self.ended
    }

    /// Tracks announced in `start`.
    pub fn tracks(&self) -> &[Track] {
        &self.tracks_announced
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
                ProtocolErrorKind::AfterStop,
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
                ProtocolErrorKind::MediaBeforeStart,
                format!("{label} before start"),
            ));
        }
        // Streaming from here on.
        if let (Some(sid), Some(ids)) = (msg.stream_sid(), self.ids.as_ref()) {
            if sid != ids.stream_sid {
                return Err(SessionError::new(
                    close_code::POLICY,
                    ProtocolErrorKind::StreamSidMismatch,
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
                // Twilio echoes the marks the gateway sent; the publisher knows whether the
                // audio before it was played or cleared (bidirectional streams).
                let played = out.mark_played(name);
                let ev = Event {
                    ids: self.ids.as_ref(),
                    at_us: at.unix_us,
                    body: EventBody::Mark {
                        name,
                        played,
                        sent: played.map(|_| true),
                    },
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
                ProtocolErrorKind::DuplicateStart,
                "duplicate start",
            ));
        }
        if let Some(mf) = &start.media_format {
            if mf.encoding != "audio/x-mulaw" || mf.sample_rate != 8000 || mf.channels != 1 {
                return Err(SessionError::new(
                    close_code::POLICY,
                    ProtocolErrorKind::UnsupportedMediaFormat,
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
                ProtocolErrorKind::WrongType,
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
        let route = match self.ids.as_ref() {
            Some(ids) => out.attach(ids, &self.tracks_announced),
            None => None,
        };
        let ev = Event {
            ids: self.ids.as_ref(),
            at_us: at.unix_us,
            body: EventBody::Start {
                tracks: &self.tracks_announced,
                custom_parameters: &params,
                media_format: mf.as_ref(),
                playback: route.as_ref(),
            },
        };
        out.publish_event(&ev);
        // Size the per-track buffers once, so steady streaming never reallocates.
        if self.cfg.frames_per_record > 1 {
            for t in &start.tracks {
                self.tracks[t.index()]
                    .batch
                    .reserve(160 * self.cfg.frames_per_record as usize);
            }
        }
        self.ulaw.reserve(160);
        Ok(Flow::Continue)
    }

    fn anomaly_event<P: Publisher>(
        &mut self,
        kind: AnomalyKind,
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
        let regressed_at = self.regressed_at.take();
        match self.last_seq {
            Some(last) if seq == last.wrapping_add(1) => self.last_seq = Some(seq),
            Some(last) if seq > last => {
                self.anomaly_event(AnomalyKind::SeqGap, None, last + 1, seq, at, out);
                self.last_seq = Some(seq);
            }
            // Continues from the regressed number: the numbering moved back for good (the
            // high-water mark was one stray high number). Follow it, reported once already.
            Some(_) if regressed_at.is_some_and(|r| seq == r.wrapping_add(1)) => {
                self.last_seq = Some(seq);
            }
            Some(last) => {
                // Keep the high-water mark so one stray low message (a duplicate) does not
                // cascade; remember it in case the numbering continues from there.
                self.anomaly_event(AnomalyKind::SeqRegression, None, last + 1, seq, at, out);
                self.regressed_at = Some(seq);
            }
            None => self.last_seq = Some(seq),
        }
    }

    /// One `media` chunk.
    ///
    /// Timestamp continuity, per track, in samples (8 per ms): a chunk is contiguous when it
    /// starts exactly where the previous non-empty chunk of its track ended. Anything else — a
    /// gap of any size (a missing 20 ms chunk included), a duplicate, a step backwards, or the
    /// hole an empty payload leaves — cuts the pending batch, so every record's samples stay
    /// contiguous from its `timestamp_ms`, and is reported as a `timestamp_jump`. One tolerance:
    /// a chunk whose length is not a whole number of milliseconds ends between two millisecond
    /// marks, and Twilio's integer `timestamp` for the next chunk can only be the floor or the
    /// ceiling of that end; that is rounding, not an anomaly (the batch is still cut, because
    /// the record would otherwise misplace samples by up to 1 ms).
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
                // Tolerated: nothing to publish, but the chunk is accounted for. The track's
                // continuity point does not move, so the next chunk reports the hole.
                out.media_received(0);
                out.protocol_error(ProtocolErrorKind::EmptyPayload);
                self.drop_frames(DropReason::EmptyPayload, 1, out);
                return Ok(());
            }
            Err(PayloadError::InvalidBase64) => {
                return Err(SessionError::new(
                    close_code::INVALID_DATA,
                    ProtocolErrorKind::InvalidBase64,
                    "media.payload is not valid base64",
                ));
            }
            Err(PayloadError::TooLarge) => {
                return Err(SessionError::new(
                    close_code::TOO_BIG,
                    ProtocolErrorKind::PayloadTooLarge,
                    "media.payload too large",
                ));
            }
        };
        out.media_received(n);
        let ti = m.track.index();
        let start = m.timestamp_ms.saturating_mul(8);
        let expected = self.tracks[ti].next_sample;
        self.tracks[ti].next_sample = Some(start.saturating_add(n as u64));
        if let Some(exp) = expected {
            if start != exp {
                if self.tracks[ti].batch_chunks > 0 {
                    self.flush_track(m.track, out);
                }
                let rounding =
                    exp % 8 != 0 && (m.timestamp_ms == exp / 8 || m.timestamp_ms == exp / 8 + 1);
                if !rounding {
                    self.anomaly_event(
                        AnomalyKind::TimestampJump,
                        Some(m.track),
                        exp / 8,
                        m.timestamp_ms,
                        at,
                        out,
                    );
                }
            }
        }
        out.profile_chunk(&crate::sink::profiles::ProfileChunk {
            chunk: crate::profile::ChunkIn {
                track: m.track.index(),
                ulaw: &self.ulaw,
                timestamp_ms: m.timestamp_ms,
                seq: m.seq,
                chunk: m.chunk,
                contiguous: expected == Some(start),
            },
            received_at_us: at.unix_us,
        });
        let first = FirstChunk {
            seq: m.seq,
            chunk: m.chunk,
            timestamp_ms: m.timestamp_ms,
            received_at_us: at.unix_us,
            received_mono_us: at.mono_us,
        };
        if self.cfg.frames_per_record == 1 {
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
                payload: &self.ulaw,
                flags: 0,
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
        ts.batch.extend_from_slice(&self.ulaw);
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
            payload: &ts.batch,
            flags: 0,
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
