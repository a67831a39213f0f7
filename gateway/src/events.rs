//! Records for the events topic (`<prefix>.events`): one JSON object per stream lifecycle
//! event, keyed by `streamSid`. The field names here are the public contract (README).
//!
//! - [`Event`] / [`write_json`]: events as the session produces them (`start`, `dtmf`, `mark`,
//!   `sequence_gap`, and the session's view of the end).
//! - [`TerminalInfo`] / [`render_terminal`]: the terminal event (`stop`, `disconnect`,
//!   `error`) as published. The session knows why the stream ended; the Kafka path knows what
//!   became of its audio (delivered, dropped by reason, where it landed), so the terminal event
//!   is rendered by the drain thread once every audio record of the stream is resolved.
//! - [`status_json`]: `status` records from Twilio's statusCallback.

use serde::{Deserialize, Serialize};

use crate::metrics::{EventType, ProtocolErrorKind};
use crate::protocol::Track;

/// The stream identity every event carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamIds {
    /// Twilio `streamSid` (`MZ…`); also the Kafka key.
    pub stream_sid: String,
    /// Twilio `callSid` (`CA…`).
    pub call_sid: String,
    /// Twilio `accountSid` (`AC…`).
    pub account_sid: String,
}

/// `start.mediaFormat` as published.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MediaFormatOut {
    /// e.g. `audio/x-mulaw`.
    pub encoding: String,
    /// e.g. 8000.
    pub sample_rate: u64,
    /// e.g. 1.
    pub channels: u64,
}

/// The type-specific part of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody<'a> {
    /// `start`.
    Start {
        /// Tracks announced in `start.tracks`.
        tracks: &'a [Track],
        /// `start.customParameters`, in order.
        custom_parameters: &'a [(String, String)],
        /// `start.mediaFormat`, if sent.
        media_format: Option<&'a MediaFormatOut>,
        /// Where to write this stream's playback (bidirectional streams).
        playback: Option<&'a crate::playback::PlaybackRoute>,
    },
    /// `dtmf`.
    Dtmf {
        /// The key pressed.
        digit: &'a str,
        /// `dtmf.track` as sent.
        track: Option<&'a str>,
    },
    /// `mark`: Twilio's echo of a mark the gateway sent, or a mark a clear discarded.
    Mark {
        /// The mark's name.
        name: &'a str,
        /// Whether the audio before it played (`false`: returned by, or discarded for, a
        /// `clear`); absent for marks the gateway did not send.
        played: Option<bool>,
        /// `false` for a mark a clear discarded before it reached Twilio (no echo will come).
        sent: Option<bool>,
    },
    /// The terminal event of a stream: `stop`, `disconnect` or `error`.
    End {
        /// Which of the three.
        kind: EndKind,
        /// Human-readable reason (`stop`, `closed_by_peer`, `idle_timeout`, the protocol error…).
        reason: &'a str,
        /// Machine-readable error kind for `error`.
        error_kind: Option<ProtocolErrorKind>,
        /// WebSocket close code we sent, if any.
        close_code: Option<u16>,
        /// Frames handed to Kafka for this stream.
        frames_published: u64,
        /// Frames of this stream not handed to Kafka (each counted by reason in metrics).
        frames_dropped: u64,
    },
    /// A sequence-number gap/regression or a media timestamp jump.
    SequenceGap {
        /// `seq_gap`, `seq_regression` or `timestamp_jump`.
        kind: crate::metrics::AnomalyKind,
        /// The track for `timestamp_jump`.
        track: Option<Track>,
        /// What we expected (next sequence number, or next timestamp in ms).
        expected: u64,
        /// What arrived.
        got: u64,
    },
}

/// Which terminal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndKind {
    /// Twilio sent `stop`.
    Stop,
    /// The socket ended without `stop` (peer close, reset, idle timeout, shutdown).
    Disconnect,
    /// We closed the stream because of a protocol error.
    Error,
}

impl EndKind {
    /// The event type it is published as.
    pub fn event_type(self) -> EventType {
        match self {
            EndKind::Stop => EventType::Stop,
            EndKind::Disconnect => EventType::Disconnect,
            EndKind::Error => EventType::Error,
        }
    }
}

impl EventBody<'_> {
    /// The event type (its `type` field).
    pub fn event_type(&self) -> EventType {
        match self {
            EventBody::Start { .. } => EventType::Start,
            EventBody::Dtmf { .. } => EventType::Dtmf,
            EventBody::Mark { .. } => EventType::Mark,
            EventBody::End { kind, .. } => kind.event_type(),
            EventBody::SequenceGap { .. } => EventType::SequenceGap,
        }
    }

    /// The `type` field.
    pub fn type_name(&self) -> &'static str {
        self.event_type().as_str()
    }
}

/// One event as handed to a publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// Stream identity; `None` before `start` (then the record has no key and null SIDs).
    pub ids: Option<&'a StreamIds>,
    /// Unix time of the event, µs.
    pub at_us: u64,
    /// Type-specific fields.
    pub body: EventBody<'a>,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    stream_sid: Option<&'a str>,
    call_sid: Option<&'a str>,
    account_sid: Option<&'a str>,
    gateway: &'a str,
    at_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracks: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    media_format: Option<&'a MediaFormatOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    track: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    played: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    playback: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    close_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frames_published: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frames_dropped: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind_detail: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    got: Option<u64>,
}

/// Serialises `ev` as the events-topic JSON value into `out` (cleared first).
pub fn write_json(ev: &Event<'_>, gateway: &str, out: &mut Vec<u8>) {
    out.clear();
    let mut w = Wire {
        kind: ev.body.type_name(),
        stream_sid: ev.ids.map(|i| i.stream_sid.as_str()),
        call_sid: ev.ids.map(|i| i.call_sid.as_str()),
        account_sid: ev.ids.map(|i| i.account_sid.as_str()),
        gateway,
        at_us: ev.at_us,
        tracks: None,
        custom_parameters: None,
        media_format: None,
        digit: None,
        track: None,
        name: None,
        played: None,
        sent: None,
        playback: None,
        reason: None,
        error_kind: None,
        close_code: None,
        frames_published: None,
        frames_dropped: None,
        kind_detail: None,
        expected: None,
        got: None,
    };
    match &ev.body {
        EventBody::Start {
            tracks,
            custom_parameters,
            media_format,
            playback,
        } => {
            w.playback =
                playback.map(|p| serde_json::json!({"topic": p.topic, "partition": p.partition}));
            w.tracks = Some(tracks.iter().map(|t| t.as_str()).collect());
            w.custom_parameters = Some(
                custom_parameters
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            );
            w.media_format = *media_format;
        }
        EventBody::Dtmf { digit, track } => {
            w.digit = Some(digit);
            w.track = *track;
        }
        EventBody::Mark { name, played, sent } => {
            w.name = Some(name);
            w.played = *played;
            w.sent = *sent;
        }
        EventBody::End {
            reason,
            error_kind,
            close_code,
            frames_published,
            frames_dropped,
            ..
        } => {
            w.reason = Some(reason);
            w.error_kind = error_kind.map(ProtocolErrorKind::as_str);
            w.close_code = *close_code;
            w.frames_published = Some(*frames_published);
            w.frames_dropped = Some(*frames_dropped);
        }
        EventBody::SequenceGap {
            kind,
            track,
            expected,
            got,
        } => {
            w.kind_detail = Some(kind.as_str());
            w.track = track.map(Track::as_str);
            w.expected = Some(*expected);
            w.got = Some(*got);
        }
    }
    // Serialising plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &w);
}

/// What the session knows about a stream's end; carried through the Kafka path (and the spool)
/// as JSON until the terminal event is rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalInfo {
    /// `stop`, `disconnect` or `error`.
    pub kind: EndKind,
    /// Why (see the README's table of reasons).
    pub reason: String,
    /// Protocol error kind (`error` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// Close code the gateway sent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    /// When the stream ended, unix µs.
    pub at_us: u64,
    /// Bidirectional streams: what the gateway played into the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playback: Option<serde_json::Value>,
}

/// Where a stream's records landed on one topic (the replay index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayEntry {
    /// Topic name.
    pub topic: String,
    /// `inbound`, `outbound` (audio) or `events`.
    pub track: &'static str,
    /// Partition of every record of the stream on this topic.
    pub partition: i32,
    /// Offset of the first delivered record.
    pub first_offset: i64,
    /// Offset of the last delivered record.
    pub last_offset: i64,
    /// Records delivered.
    pub records: u64,
}

/// The audio accounting of a finished stream. Every media chunk received is either delivered
/// or dropped: `frames_received == frames_delivered + frames_dropped`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminalCounts {
    /// Media chunks received.
    pub frames_received: u64,
    /// Chunks accepted into the Kafka path.
    pub frames_published: u64,
    /// Chunks acknowledged by Kafka.
    pub frames_delivered: u64,
    /// Chunks not delivered, by reason (only non-zero reasons).
    pub drops: Vec<(&'static str, u64)>,
    /// The stream was recovered from the spool after a restart: the counts cover what the
    /// spool held (see the README's spool section).
    pub recovered: bool,
}

/// Renders the terminal event into `out` (cleared first).
pub fn render_terminal(
    info: &TerminalInfo,
    ids: Option<&StreamIds>,
    gateway: &str,
    counts: &TerminalCounts,
    replay: &[ReplayEntry],
    out: &mut Vec<u8>,
) {
    out.clear();
    let mut v = serde_json::json!({
        "type": info.kind.event_type().as_str(),
        "stream_sid": ids.map(|i| i.stream_sid.as_str()),
        "call_sid": ids.map(|i| i.call_sid.as_str()),
        "account_sid": ids.map(|i| i.account_sid.as_str()),
        "gateway": gateway,
        "at_us": info.at_us,
        "reason": info.reason,
        "frames_received": counts.frames_received,
        "frames_published": counts.frames_published,
        "frames_delivered": counts.frames_delivered,
        "frames_dropped": counts.drops.iter().map(|d| d.1).sum::<u64>(),
        "drops": counts.drops.iter().map(|(k, n)| ((*k).to_owned(), serde_json::Value::from(*n)))
            .collect::<serde_json::Map<_, _>>(),
        "replay": replay,
    });
    if let Some(map) = v.as_object_mut() {
        if let Some(k) = &info.error_kind {
            map.insert("error_kind".into(), k.as_str().into());
        }
        if let Some(c) = info.close_code {
            map.insert("close_code".into(), c.into());
        }
        if let Some(p) = &info.playback {
            map.insert("playback".into(), p.clone());
        }
        if counts.recovered {
            map.insert("recovered".into(), true.into());
        }
    }
    // Serialising a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &v);
}

/// Fields of a `status` record (Twilio's statusCallback; absent fields are `null`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusFields<'a> {
    /// `StreamSid` (also the key).
    pub stream_sid: &'a str,
    /// `CallSid`.
    pub call_sid: Option<&'a str>,
    /// `AccountSid`.
    pub account_sid: Option<&'a str>,
    /// `StreamEvent`.
    pub stream_event: Option<&'a str>,
    /// `StreamError`.
    pub stream_error: Option<&'a str>,
    /// `StreamName`.
    pub stream_name: Option<&'a str>,
    /// `Timestamp`.
    pub timestamp: Option<&'a str>,
}

/// The `status` record value.
pub fn status_json(f: &StatusFields<'_>, gateway: &str, at_us: u64) -> Vec<u8> {
    serde_json::json!({
        "type": EventType::Status.as_str(),
        "stream_sid": f.stream_sid,
        "call_sid": f.call_sid,
        "account_sid": f.account_sid,
        "stream_event": f.stream_event,
        "stream_error": f.stream_error,
        "stream_name": f.stream_name,
        "timestamp": f.timestamp,
        "gateway": gateway,
        "at_us": at_us,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> StreamIds {
        StreamIds {
            stream_sid: "MZ1".into(),
            call_sid: "CA1".into(),
            account_sid: "AC1".into(),
        }
    }

    fn json(ev: &Event<'_>) -> serde_json::Value {
        let mut out = Vec::new();
        write_json(ev, "gw-1", &mut out);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn start_event_fields() {
        let ids = ids();
        let params = vec![
            ("From".to_string(), "+1 <555>".to_string()),
            ("A".to_string(), "b".to_string()),
        ];
        let mf = MediaFormatOut {
            encoding: "audio/x-mulaw".into(),
            sample_rate: 8000,
            channels: 1,
        };
        let v = json(&Event {
            ids: Some(&ids),
            at_us: 42,
            body: EventBody::Start {
                tracks: &[Track::Inbound, Track::Outbound],
                custom_parameters: &params,
                media_format: Some(&mf),
                playback: None,
            },
        });
        assert_eq!(
            v,
            serde_json::json!({
                "type": "start", "stream_sid": "MZ1", "call_sid": "CA1", "account_sid": "AC1",
                "gateway": "gw-1", "at_us": 42, "tracks": ["inbound", "outbound"],
                "custom_parameters": {"From": "+1 <555>", "A": "b"},
                "media_format": {"encoding": "audio/x-mulaw", "sample_rate": 8000, "channels": 1}
            })
        );
    }

    #[test]
    fn end_events_fields() {
        let ids = ids();
        let v = json(&Event {
            ids: Some(&ids),
            at_us: 1,
            body: EventBody::End {
                kind: EndKind::Error,
                reason: "media before start",
                error_kind: Some(ProtocolErrorKind::MediaBeforeStart),
                close_code: Some(1008),
                frames_published: 3,
                frames_dropped: 1,
            },
        });
        assert_eq!(v["type"], "error");
        assert_eq!(v["reason"], "media before start");
        assert_eq!(v["error_kind"], "media_before_start");
        assert_eq!(v["close_code"], 1008);
        assert_eq!(v["frames_published"], 3);
        assert_eq!(v["frames_dropped"], 1);
        let v = json(&Event {
            ids: None,
            at_us: 1,
            body: EventBody::End {
                kind: EndKind::Disconnect,
                reason: "closed_by_peer",
                error_kind: None,
                close_code: None,
                frames_published: 0,
                frames_dropped: 0,
            },
        });
        assert_eq!(v["type"], "disconnect");
        assert!(v["stream_sid"].is_null());
        assert!(v.get("close_code").is_none());
    }
}
