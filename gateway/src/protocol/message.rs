//! Parse one Twilio Media Streams JSON message in place.
//!
//! The frame payload is handed over as `&mut [u8]`: simd-json validates UTF-8, unescapes strings
//! inside that buffer and writes a *tape* (a flat list of nodes) that we walk once, picking the
//! fields we know and counting the others. The tape and simd-json's scratch buffers are
//! thread-local and reused, so parsing a `media` message allocates nothing.
//!
//! Strictness follows `docs/protocol.md`: every scalar Twilio documents as a string must be a
//! string (`sequenceNumber`, `chunk`, `timestamp` are decimal digits inside a string);
//! `mediaFormat.sampleRate`/`channels` are numbers. Unknown events and unknown fields are
//! tolerated and counted. Missing or wrongly typed *required* fields are errors.

use std::cell::RefCell;

use simd_json::{tape::Node, Buffers, ErrorType, StaticNode};
use thiserror::Error;

/// Which direction of the call a `media` message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Track {
    /// Audio from the caller (Twilio `inbound`).
    Inbound,
    /// Audio to the caller (Twilio `outbound`).
    Outbound,
}

impl Track {
    /// Number of distinct tracks; used to size per-track state arrays.
    pub const COUNT: usize = 2;

    /// Index into per-track arrays.
    pub fn index(self) -> usize {
        match self {
            Track::Inbound => 0,
            Track::Outbound => 1,
        }
    }

    /// The name used in `media.track`, `start.tracks` and our Kafka topics and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Inbound => "inbound",
            Track::Outbound => "outbound",
        }
    }

    fn from_wire(s: &str) -> Option<Track> {
        // `start.tracks` and `media.track` use `inbound`/`outbound`; accept the TwiML spelling
        // (`inbound_track`) too since Twilio uses it for `dtmf.track`.
        match s {
            "inbound" | "inbound_track" => Some(Track::Inbound),
            "outbound" | "outbound_track" => Some(Track::Outbound),
            _ => None,
        }
    }
}

/// `start.mediaFormat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFormat<'a> {
    /// `encoding`, e.g. `audio/x-mulaw`.
    pub encoding: &'a str,
    /// `sampleRate` (a JSON number).
    pub sample_rate: u64,
    /// `channels` (a JSON number).
    pub channels: u64,
}

/// The `start` message: the stream's identity and shape. Parsed once per stream, so it may
/// allocate (tracks, custom parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start<'a> {
    /// `sequenceNumber`, when present.
    pub seq: Option<u64>,
    /// `start.streamSid` (or the top-level `streamSid`).
    pub stream_sid: &'a str,
    /// `start.accountSid`.
    pub account_sid: &'a str,
    /// `start.callSid`.
    pub call_sid: &'a str,
    /// `start.tracks`, in the order sent.
    pub tracks: Vec<Track>,
    /// `start.customParameters`, in the order sent.
    pub custom_parameters: Vec<(&'a str, &'a str)>,
    /// `start.mediaFormat`, when present.
    pub media_format: Option<MediaFormat<'a>>,
}

/// The `media` message: 20 ms (usually) of one track's audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Media<'a> {
    /// `sequenceNumber`.
    pub seq: u64,
    /// Top-level `streamSid`, when present.
    pub stream_sid: Option<&'a str>,
    /// `media.track`.
    pub track: Track,
    /// `media.chunk`.
    pub chunk: u64,
    /// `media.timestamp`, ms since the stream started.
    pub timestamp_ms: u64,
    /// `media.payload`: base64 of raw μ-law bytes, still encoded.
    pub payload: &'a str,
}

/// One parsed inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `connected`: first message, no stream id.
    Connected {
        /// `protocol`, e.g. `Call`.
        protocol: Option<&'a str>,
        /// `version`, e.g. `1.0.0`.
        version: Option<&'a str>,
    },
    /// `start`.
    Start(Start<'a>),
    /// `media`.
    Media(Media<'a>),
    /// `dtmf`: a key press on a bidirectional stream.
    Dtmf {
        /// `sequenceNumber`, when present.
        seq: Option<u64>,
        /// `streamSid`, when present.
        stream_sid: Option<&'a str>,
        /// `dtmf.track` as sent (Twilio uses `inbound_track`).
        track: Option<&'a str>,
        /// `dtmf.digit`.
        digit: &'a str,
    },
    /// `mark`: echo of a mark we sent.
    Mark {
        /// `sequenceNumber`, when present.
        seq: Option<u64>,
        /// `streamSid`, when present.
        stream_sid: Option<&'a str>,
        /// `mark.name`.
        name: &'a str,
    },
    /// `stop`: the stream ended.
    Stop {
        /// `sequenceNumber`, when present.
        seq: Option<u64>,
        /// `streamSid`, when present.
        stream_sid: Option<&'a str>,
        /// `stop.accountSid`, when present.
        account_sid: Option<&'a str>,
        /// `stop.callSid`, when present.
        call_sid: Option<&'a str>,
    },
    /// An event we do not know; tolerated.
    Unknown {
        /// The `event` value.
        event: &'a str,
        /// `sequenceNumber`, when present and well formed.
        seq: Option<u64>,
        /// `streamSid`, when present.
        stream_sid: Option<&'a str>,
    },
}

impl Message<'_> {
    /// The `event` name as a static label (unknown events map to `unknown`).
    pub fn event_label(&self) -> &'static str {
        match self {
            Message::Connected { .. } => "connected",
            Message::Start(_) => "start",
            Message::Media(_) => "media",
            Message::Dtmf { .. } => "dtmf",
            Message::Mark { .. } => "mark",
            Message::Stop { .. } => "stop",
            Message::Unknown { .. } => "unknown",
        }
    }

    /// The message's `sequenceNumber`, if it has one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Message::Connected { .. } => None,
            Message::Start(s) => s.seq,
            Message::Media(m) => Some(m.seq),
            Message::Dtmf { seq, .. }
            | Message::Mark { seq, .. }
            | Message::Stop { seq, .. }
            | Message::Unknown { seq, .. } => *seq,
        }
    }

    /// The top-level `streamSid`, if present.
    pub fn stream_sid(&self) -> Option<&str> {
        match self {
            Message::Connected { .. } => None,
            Message::Start(s) => Some(s.stream_sid),
            Message::Media(m) => m.stream_sid,
            Message::Dtmf { stream_sid, .. }
            | Message::Mark { stream_sid, .. }
            | Message::Stop { stream_sid, .. }
            | Message::Unknown { stream_sid, .. } => *stream_sid,
        }
    }
}

/// A parsed message plus what we noticed while parsing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The message.
    pub message: Message<'a>,
    /// How many object keys we did not recognise (tolerated, counted in metrics).
    pub unknown_fields: u32,
}

/// Why a text frame is not a usable Twilio message. Each variant has a stable `kind()` used as a
/// metric label and in `error` events.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The frame is not valid UTF-8.
    #[error("invalid utf-8")]
    InvalidUtf8,
    /// The frame is not valid JSON.
    #[error("invalid json")]
    InvalidJson,
    /// The JSON document is not an object.
    #[error("message is not a json object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("wrong type for field {0}")]
    WrongType(&'static str),
    /// A string-typed number is not a non-negative decimal integer.
    #[error("invalid number in field {0}")]
    InvalidNumber(&'static str),
    /// `media.track` or an entry of `start.tracks` is not `inbound`/`outbound`.
    #[error("invalid track")]
    InvalidTrack,
    /// A `start` whose top-level `streamSid` and `start.streamSid` differ.
    #[error("streamSid differs from start.streamSid")]
    StreamSidMismatch,
    /// A field the gateway reads appears twice in one object (or a custom parameter name
    /// twice): which value would count is exactly what two parsers may disagree on.
    #[error("duplicate field {0}")]
    DuplicateField(&'static str),
}

impl ParseError {
    /// Stable label for metrics and events.
    pub fn kind(&self) -> &'static str {
        match self {
            ParseError::InvalidUtf8 => "invalid_utf8",
            ParseError::InvalidJson => "invalid_json",
            ParseError::NotAnObject => "not_an_object",
            ParseError::MissingField(_) => "missing_field",
            ParseError::WrongType(_) => "wrong_type",
            ParseError::InvalidNumber(_) => "invalid_number",
            ParseError::InvalidTrack => "invalid_track",
            ParseError::StreamSidMismatch => "stream_sid_mismatch",
            ParseError::DuplicateField(_) => "duplicate_field",
        }
    }
}

struct Scratch {
    buffers: Buffers,
    tape: Option<simd_json::tape::Tape<'static>>,
}

thread_local! {
    /// Per-worker-thread parser scratch: reused across all streams on this thread, so a stream
    /// costs no parser memory while idle and no allocation per message.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        buffers: Buffers::new(1024),
        tape: Some(simd_json::tape::Tape(Vec::with_capacity(64))),
    });
}

/// Parses one text frame in place. `input` is modified (strings are unescaped inside it) and
/// the returned message borrows from it.
pub fn parse(input: &mut [u8]) -> Result<Parsed<'_>, ParseError> {
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let Scratch { buffers, tape } = &mut *scratch;
        let mut t = match tape.take() {
            Some(t) => t.reset(),
            None => simd_json::tape::Tape(Vec::with_capacity(64)),
        };
        let result = match simd_json::fill_tape(input, buffers, &mut t) {
            Ok(()) => extract(&t.0),
            Err(e) => Err(match e.error() {
                ErrorType::InvalidUtf8 => ParseError::InvalidUtf8,
                _ => ParseError::InvalidJson,
            }),
        };
        *tape = Some(t.reset());
        result
    })
}

/// Index just past the value starting at `i`.
#[inline]
fn skip(nodes: &[Node<'_>], i: usize) -> usize {
    match nodes[i] {
        Node::Object { count, .. } | Node::Array { count, .. } => i + 1 + count,
        _ => i + 1,
    }
}

/// Iterates the `(key, value_index)` pairs of the object at `i`.
fn fields<'n, 'a>(nodes: &'n [Node<'a>], i: usize) -> impl Iterator<Item = (&'a str, usize)> + 'n {
    let len = match nodes.get(i) {
        Some(Node::Object { len, .. }) => *len,
        _ => 0,
    };
    let mut pos = i + 1;
    (0..len).filter_map(move |_| {
        let key = match nodes.get(pos)? {
            Node::String(k) => *k,
            _ => return None,
        };
        let value = pos + 1;
        if value >= nodes.len() {
            return None;
        }
        pos = skip(nodes, value);
        Some((key, value))
    })
}

#[inline]
fn string<'a>(nodes: &[Node<'a>], i: usize, field: &'static str) -> Result<&'a str, ParseError> {
    match nodes[i] {
        Node::String(s) => Ok(s),
        _ => Err(ParseError::WrongType(field)),
    }
}

/// Parses a Twilio string-typed number: 1–19 ASCII digits, nothing else.
#[inline]
pub fn parse_decimal(s: &str, field: &'static str) -> Result<u64, ParseError> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 19 {
        return Err(ParseError::InvalidNumber(field));
    }
    let mut v: u64 = 0;
    for &c in b {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return Err(ParseError::InvalidNumber(field));
        }
        v = v * 10 + d as u64;
    }
    Ok(v)
}

#[inline]
fn number_string(nodes: &[Node<'_>], i: usize, field: &'static str) -> Result<u64, ParseError> {
    parse_decimal(string(nodes, i, field)?, field)
}

/// Largest accepted `media.timestamp`: 2^53 − 1 ms (285,000 years). The timeline is kept in
/// samples (× 8, × 48 for 48 kHz profiles) with lengths added; any larger value would have to
/// saturate there and break jump detection and record contiguity, so it is refused here.
pub const MAX_TIMESTAMP_MS: u64 = (1 << 53) - 1;

fn media_timestamp(nodes: &[Node<'_>], i: usize) -> Result<u64, ParseError> {
    match number_string(nodes, i, "media.timestamp")? {
        ts if ts > MAX_TIMESTAMP_MS => Err(ParseError::InvalidNumber("media.timestamp")),
        ts => Ok(ts),
    }
}

fn json_uint(nodes: &[Node<'_>], i: usize, field: &'static str) -> Result<u64, ParseError> {
    match nodes[i] {
        Node::Static(StaticNode::U64(v)) => Ok(v),
        Node::Static(StaticNode::I64(v)) if v >= 0 => Ok(v as u64),
        Node::Static(StaticNode::I64(_)) => Err(ParseError::InvalidNumber(field)),
        _ => Err(ParseError::WrongType(field)),
    }
}

fn require<T>(v: Option<T>, field: &'static str) -> Result<T, ParseError> {
    v.ok_or(ParseError::MissingField(field))
}

/// Stores a known field's value; a second occurrence of the key in the same object is refused
/// (RFC 8259 leaves duplicate names' meaning open, so the gateway picks no winner).
#[inline]
fn set<T>(slot: &mut Option<T>, value: T, field: &'static str) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::DuplicateField(field));
    }
    *slot = Some(value);
    Ok(())
}

/// [`set`] for a string field: the value at `i` must be a string, named `field` in both errors.
#[inline]
fn set_string<'a>(
    slot: &mut Option<&'a str>,
    nodes: &[Node<'a>],
    i: usize,
    field: &'static str,
) -> Result<(), ParseError> {
    set(slot, string(nodes, i, field)?, field)
}

fn extract<'a>(nodes: &[Node<'a>]) -> Result<Parsed<'a>, ParseError> {
    if !matches!(nodes.first(), Some(Node::Object { .. })) {
        return Err(ParseError::NotAnObject);
    }
    // First pass over the top level: find `event` and the shared fields.
    let mut event = None;
    let mut seq_raw = None;
    let mut stream_sid = None;
    let mut body = None; // index of the object named after the event
    let mut protocol = None;
    let mut version = None;
    let mut unknown_fields = 0u32;
    // Which event bodies were seen (one bit each), to refuse a repeated one.
    let mut bodies = 0u8;
    for (key, v) in fields(nodes, 0) {
        match key {
            "event" => set_string(&mut event, nodes, v, "event")?,
            "sequenceNumber" => set(&mut seq_raw, v, "sequenceNumber")?,
            "streamSid" => set_string(&mut stream_sid, nodes, v, "streamSid")?,
            "protocol" => set(&mut protocol, v, "protocol")?,
            "version" => set(&mut version, v, "version")?,
            "start" | "media" | "dtmf" | "mark" | "stop" => {
                let (bit, name) = match key {
                    "start" => (1, "start"),
                    "media" => (2, "media"),
                    "dtmf" => (4, "dtmf"),
                    "mark" => (8, "mark"),
                    _ => (16, "stop"),
                };
                if bodies & bit != 0 {
                    return Err(ParseError::DuplicateField(name));
                }
                bodies |= bit;
                // Remember the first body; `body_for` below re-searches in the (never seen)
                // case of a message carrying another event's body first.
                if body.is_none() {
                    body = Some((key, v));
                }
            }
            _ => unknown_fields += 1,
        }
    }
    let event = require(event, "event")?;
    // Resolve the body for this event: search again only when the first body found was for
    // another event (never in real traffic).
    let body_for = |name: &'static str| -> Result<usize, ParseError> {
        if let Some((k, v)) = body {
            if k == name {
                return Ok(v);
            }
        }
        for (k, v) in fields(nodes, 0) {
            if k == name {
                return Ok(v);
            }
        }
        Err(ParseError::MissingField(name))
    };
    let seq = |required: bool| -> Result<Option<u64>, ParseError> {
        match seq_raw {
            Some(v) => number_string(nodes, v, "sequenceNumber").map(Some),
            None if required => Err(ParseError::MissingField("sequenceNumber")),
            None => Ok(None),
        }
    };

    let message = match event {
        "media" => {
            let b = body_for("media")?;
            if !matches!(nodes[b], Node::Object { .. }) {
                return Err(ParseError::WrongType("media"));
            }
            let (mut track, mut chunk, mut ts, mut payload) = (None, None, None, None);
            for (key, v) in fields(nodes, b) {
                match key {
                    "track" => set_string(&mut track, nodes, v, "media.track")?,
                    "chunk" => set(
                        &mut chunk,
                        number_string(nodes, v, "media.chunk")?,
                        "media.chunk",
                    )?,
                    "timestamp" => set(&mut ts, media_timestamp(nodes, v)?, "media.timestamp")?,
                    "payload" => set_string(&mut payload, nodes, v, "media.payload")?,
                    _ => unknown_fields += 1,
                }
            }
            let track =
                Track::from_wire(require(track, "media.track")?).ok_or(ParseError::InvalidTrack)?;
            Message::Media(Media {
                seq: seq(true)?.unwrap_or_default(),
                stream_sid,
                track,
                chunk: require(chunk, "media.chunk")?,
                timestamp_ms: require(ts, "media.timestamp")?,
                payload: require(payload, "media.payload")?,
            })
        }
        "start" => {
            let b = body_for("start")?;
            if !matches!(nodes[b], Node::Object { .. }) {
                return Err(ParseError::WrongType("start"));
            }
            let (mut inner_sid, mut account, mut call) = (None, None, None);
            let mut tracks = Vec::new();
            let mut have_tracks = false;
            let mut custom_parameters = Vec::new();
            let mut have_params = false;
            let mut media_format = None;
            for (key, v) in fields(nodes, b) {
                match key {
                    "streamSid" => set_string(&mut inner_sid, nodes, v, "start.streamSid")?,
                    "accountSid" => set_string(&mut account, nodes, v, "start.accountSid")?,
                    "callSid" => set_string(&mut call, nodes, v, "start.callSid")?,
                    "tracks" => {
                        let Node::Array { len, .. } = nodes[v] else {
                            return Err(ParseError::WrongType("start.tracks"));
                        };
                        if have_tracks {
                            return Err(ParseError::DuplicateField("start.tracks"));
                        }
                        have_tracks = true;
                        let mut p = v + 1;
                        for _ in 0..len {
                            let name = string(nodes, p, "start.tracks")?;
                            let t = Track::from_wire(name).ok_or(ParseError::InvalidTrack)?;
                            if !tracks.contains(&t) {
                                tracks.push(t);
                            }
                            p = skip(nodes, p);
                        }
                    }
                    "customParameters" => {
                        // `null` is a value too: `null` and an object side by side would be
                        // read as no parameters by a last-wins parser, as some by a first-wins one.
                        if have_params {
                            return Err(ParseError::DuplicateField("start.customParameters"));
                        }
                        have_params = true;
                        match nodes[v] {
                            Node::Object { .. } => {
                                for (name, pv) in fields(nodes, v) {
                                    let value = string(nodes, pv, "start.customParameters")?;
                                    custom_parameters.push((name, value));
                                }
                                // Sorted copy of the names: n log n however many a message holds.
                                let mut names: Vec<&str> =
                                    custom_parameters.iter().map(|(n, _)| *n).collect();
                                names.sort_unstable();
                                if names.windows(2).any(|w| w[0] == w[1]) {
                                    return Err(ParseError::DuplicateField(
                                        "start.customParameters",
                                    ));
                                }
                            }
                            Node::Static(StaticNode::Null) => {}
                            _ => return Err(ParseError::WrongType("start.customParameters")),
                        }
                    }
                    "mediaFormat" => {
                        if !matches!(nodes[v], Node::Object { .. }) {
                            return Err(ParseError::WrongType("start.mediaFormat"));
                        }
                        if media_format.is_some() {
                            return Err(ParseError::DuplicateField("start.mediaFormat"));
                        }
                        let (mut enc, mut rate, mut ch) = (None, None, None);
                        for (k, fv) in fields(nodes, v) {
                            match k {
                                "encoding" => {
                                    set_string(&mut enc, nodes, fv, "mediaFormat.encoding")?
                                }
                                "sampleRate" => set(
                                    &mut rate,
                                    json_uint(nodes, fv, "mediaFormat.sampleRate")?,
                                    "mediaFormat.sampleRate",
                                )?,
                                "channels" => set(
                                    &mut ch,
                                    json_uint(nodes, fv, "mediaFormat.channels")?,
                                    "mediaFormat.channels",
                                )?,
                                _ => unknown_fields += 1,
                            }
                        }
                        media_format = Some(MediaFormat {
                            encoding: require(enc, "mediaFormat.encoding")?,
                            sample_rate: require(rate, "mediaFormat.sampleRate")?,
                            channels: require(ch, "mediaFormat.channels")?,
                        });
                    }
                    _ => unknown_fields += 1,
                }
            }
            if !have_tracks {
                return Err(ParseError::MissingField("start.tracks"));
            }
            // Twilio sends the SID twice; which one would the stream be? Neither is guessed.
            if matches!((inner_sid, stream_sid), (Some(a), Some(b)) if a != b) {
                return Err(ParseError::StreamSidMismatch);
            }
            Message::Start(Start {
                seq: seq(false)?,
                stream_sid: require(inner_sid.or(stream_sid), "start.streamSid")?,
                account_sid: require(account, "start.accountSid")?,
                call_sid: require(call, "start.callSid")?,
                tracks,
                custom_parameters,
                media_format,
            })
        }
        "dtmf" => {
            let b = body_for("dtmf")?;
            if !matches!(nodes[b], Node::Object { .. }) {
                return Err(ParseError::WrongType("dtmf"));
            }
            let (mut track, mut digit) = (None, None);
            for (key, v) in fields(nodes, b) {
                match key {
                    "track" => set_string(&mut track, nodes, v, "dtmf.track")?,
                    "digit" => set_string(&mut digit, nodes, v, "dtmf.digit")?,
                    _ => unknown_fields += 1,
                }
            }
            Message::Dtmf {
                seq: seq(false)?,
                stream_sid,
                track,
                digit: require(digit, "dtmf.digit")?,
            }
        }
        "mark" => {
            let b = body_for("mark")?;
            if !matches!(nodes[b], Node::Object { .. }) {
                return Err(ParseError::WrongType("mark"));
            }
            let mut name = None;
            for (key, v) in fields(nodes, b) {
                match key {
                    "name" => set_string(&mut name, nodes, v, "mark.name")?,
                    _ => unknown_fields += 1,
                }
            }
            Message::Mark {
                seq: seq(false)?,
                stream_sid,
                name: require(name, "mark.name")?,
            }
        }
        "stop" => {
            let (mut account_sid, mut call_sid) = (None, None);
            if let Ok(b) = body_for("stop") {
                match nodes[b] {
                    Node::Object { .. } => {
                        for (key, v) in fields(nodes, b) {
                            match key {
                                "accountSid" => {
                                    set_string(&mut account_sid, nodes, v, "stop.accountSid")?
                                }
                                "callSid" => set_string(&mut call_sid, nodes, v, "stop.callSid")?,
                                _ => unknown_fields += 1,
                            }
                        }
                    }
                    _ => return Err(ParseError::WrongType("stop")),
                }
            }
            Message::Stop {
                seq: seq(false)?,
                stream_sid,
                account_sid,
                call_sid,
            }
        }
        "connected" => {
            let protocol = protocol.map(|v| string(nodes, v, "protocol")).transpose()?;
            let version = version.map(|v| string(nodes, v, "version")).transpose()?;
            Message::Connected { protocol, version }
        }
        other => Message::Unknown {
            event: other,
            seq: seq(false).ok().flatten(),
            stream_sid,
        },
    };
    // `protocol`/`version` are only known on `connected`.
    if !matches!(message, Message::Connected { .. }) {
        unknown_fields += protocol.is_some() as u32 + version.is_some() as u32;
    }
    Ok(Parsed {
        message,
        unknown_fields,
    })
}

#[cfg(test)]
mod tests;
