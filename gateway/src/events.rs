//! Records for the events topic (`<prefix>.events`): one JSON object per stream lifecycle
//! event, keyed by `streamSid`. The field names here are the public contract (README).

use serde::Serialize;

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
    },
    /// `dtmf`.
    Dtmf {
        /// The key pressed.
        digit: &'a str,
        /// `dtmf.track` as sent.
        track: Option<&'a str>,
    },
    /// `mark`.
    Mark {
        /// The mark's name.
        name: &'a str,
    },
    /// The terminal event of a stream: `stop`, `disconnect` or `error`.
    End {
        /// Which of the three.
        kind: EndKind,
        /// Human-readable reason (`stop`, `closed_by_peer`, `idle_timeout`, the protocol error…).
        reason: &'a str,
        /// Machine-readable error kind for `error` (one of the protocol error kinds).
        error_kind: Option<&'static str>,
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
        kind: &'static str,
        /// The track for `timestamp_jump`.
        track: Option<Track>,
        /// What we expected (next sequence number, or next timestamp in ms).
        expected: u64,
        /// What arrived.
        got: u64,
    },
}

/// Which terminal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// Twilio sent `stop`.
    Stop,
    /// The socket ended without `stop` (peer close, reset, idle timeout, shutdown).
    Disconnect,
    /// We closed the stream because of a protocol error.
    Error,
}

impl EventBody<'_> {
    /// The `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::Start { .. } => "start",
            EventBody::Dtmf { .. } => "dtmf",
            EventBody::Mark { .. } => "mark",
            EventBody::End {
                kind: EndKind::Stop,
                ..
            } => "stop",
            EventBody::End {
                kind: EndKind::Disconnect,
                ..
            } => "disconnect",
            EventBody::End {
                kind: EndKind::Error,
                ..
            } => "error",
            EventBody::SequenceGap { .. } => "sequence_gap",
        }
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
        } => {
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
        EventBody::Mark { name } => w.name = Some(name),
        EventBody::End {
            reason,
            error_kind,
            close_code,
            frames_published,
            frames_dropped,
            ..
        } => {
            w.reason = Some(reason);
            w.error_kind = *error_kind;
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
            w.kind_detail = Some(kind);
            w.track = track.map(Track::as_str);
            w.expected = Some(*expected);
            w.got = Some(*got);
        }
    }
    // Serialising plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &w);
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
                error_kind: Some("media_before_start"),
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
