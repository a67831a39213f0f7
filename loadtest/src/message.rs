//! Twilio Media Streams messages, built into one reused buffer.
//!
//! A [`MessageBuilder`] belongs to one stream. It precomputes everything that is fixed for
//! the stream (SIDs, the `"},"streamSid":"MZ…"}` tail) and writes the changing numbers with
//! a small stack formatter, so building a media message copies ~370 bytes and allocates
//! nothing once the buffer has grown to its working size.

/// Which direction a media message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Track {
    /// Caller → Twilio audio.
    Inbound,
    /// Twilio → caller audio.
    Outbound,
}

impl Track {
    /// The value of `media.track`.
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Inbound => "inbound",
            Track::Outbound => "outbound",
        }
    }

    /// Index 0 for inbound, 1 for outbound.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses `inbound`/`outbound` (and the `_track` forms).
    pub fn parse(s: &[u8]) -> Option<Track> {
        match s {
            b"inbound" | b"inbound_track" => Some(Track::Inbound),
            b"outbound" | b"outbound_track" => Some(Track::Outbound),
            _ => None,
        }
    }
}

/// Writes the decimal digits of `v` into `out` without allocating.
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Formats a Twilio-style SID: two letters and 32 lower-case hex digits from `id`.
pub fn make_sid(prefix: &str, id: u128) -> String {
    format!("{prefix}{id:032x}")
}

/// Identity of one simulated call.
#[derive(Debug, Clone)]
pub struct CallIds {
    /// `AC…` account SID.
    pub account_sid: String,
    /// `CA…` call SID.
    pub call_sid: String,
    /// `MZ…` stream SID; also the Kafka record key.
    pub stream_sid: String,
}

impl CallIds {
    /// Deterministic SIDs from a run id and the stream index, unique per run.
    pub fn new(run_id: u64, index: u64) -> Self {
        let base = ((run_id as u128) << 64) | index as u128;
        CallIds {
            account_sid: make_sid("AC", (run_id as u128) << 64 | 0xACAC),
            call_sid: make_sid("CA", base ^ 0xCA11),
            stream_sid: make_sid("MZ", base),
        }
    }
}

impl CallIds {
    /// The stream index behind `sid` when it is a stream SID of run `run_id` (the inverse
    /// of [`CallIds::new`]); `None` for any other SID.
    pub fn stream_index(sid: &str, run_id: u64) -> Option<u64> {
        let hex = sid.strip_prefix("MZ")?;
        if hex.len() != 32 {
            return None;
        }
        let v = u128::from_str_radix(hex, 16).ok()?;
        ((v >> 64) as u64 == run_id).then_some(v as u64)
    }
}

/// Builds one stream's messages into a reused buffer.
#[derive(Debug)]
pub struct MessageBuilder {
    ids: CallIds,
    /// `"},"streamSid":"MZ…"}` — the fixed end of media and stop messages.
    tail: Vec<u8>,
    /// The message being built; cleared and refilled per message.
    buf: Vec<u8>,
}

const MEDIA_HEAD: &[u8] = br#"{"event":"media","sequenceNumber":""#;

impl MessageBuilder {
    /// Creates a builder for one call.
    pub fn new(ids: CallIds) -> Self {
        let mut tail = Vec::with_capacity(64);
        tail.extend_from_slice(br#"},"streamSid":""#);
        tail.extend_from_slice(ids.stream_sid.as_bytes());
        tail.extend_from_slice(br#""}"#);
        MessageBuilder {
            ids,
            tail,
            buf: Vec::with_capacity(512),
        }
    }

    /// The call's SIDs.
    pub fn ids(&self) -> &CallIds {
        &self.ids
    }

    /// `connected`: no sequence number, no streamSid.
    pub fn connected(&mut self) -> &mut [u8] {
        self.buf.clear();
        self.buf
            .extend_from_slice(br#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#);
        &mut self.buf
    }

    /// `start` with sequence number `seq` (Twilio sends 1).
    pub fn start(&mut self, seq: u64, both_tracks: bool, stream_index: u64) -> &mut [u8] {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(br#"{"event":"start","sequenceNumber":""#);
        push_u64(b, seq);
        b.extend_from_slice(br#"","start":{"accountSid":""#);
        b.extend_from_slice(self.ids.account_sid.as_bytes());
        b.extend_from_slice(br#"","streamSid":""#);
        b.extend_from_slice(self.ids.stream_sid.as_bytes());
        b.extend_from_slice(br#"","callSid":""#);
        b.extend_from_slice(self.ids.call_sid.as_bytes());
        if both_tracks {
            b.extend_from_slice(br#"","tracks":["inbound","outbound"]"#);
        } else {
            b.extend_from_slice(br#"","tracks":["inbound"]"#);
        }
        b.extend_from_slice(br#","customParameters":{"loadtest":"1","stream_index":""#);
        push_u64(b, stream_index);
        b.extend_from_slice(
            br#""},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}"#,
        );
        b.extend_from_slice(&self.tail);
        b
    }

    /// `media` for `track`, chunk number `chunk` (from 1), `timestamp_ms`, and the payload
    /// already in base64.
    pub fn media(
        &mut self,
        seq: u64,
        track: Track,
        chunk: u64,
        timestamp_ms: u64,
        payload_b64: &[u8],
    ) -> &mut [u8] {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(MEDIA_HEAD);
        push_u64(b, seq);
        b.extend_from_slice(br#"","media":{"track":""#);
        b.extend_from_slice(track.as_str().as_bytes());
        b.extend_from_slice(br#"","chunk":""#);
        push_u64(b, chunk);
        b.extend_from_slice(br#"","timestamp":""#);
        push_u64(b, timestamp_ms);
        b.extend_from_slice(br#"","payload":""#);
        b.extend_from_slice(payload_b64);
        b.push(b'"');
        b.extend_from_slice(&self.tail);
        b
    }

    /// `dtmf` on the inbound track.
    pub fn dtmf(&mut self, seq: u64, digit: u8) -> &mut [u8] {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(br#"{"event":"dtmf","streamSid":""#);
        b.extend_from_slice(self.ids.stream_sid.as_bytes());
        b.extend_from_slice(br#"","sequenceNumber":""#);
        push_u64(b, seq);
        b.extend_from_slice(br#"","dtmf":{"track":"inbound_track","digit":""#);
        b.push(digit);
        b.extend_from_slice(br#""}}"#);
        b
    }

    /// `mark` named `name` (an echo of a mark the server sent, in real Twilio); the name is
    /// JSON-escaped.
    pub fn mark(&mut self, seq: u64, name: &str) -> &mut [u8] {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(br#"{"event":"mark","sequenceNumber":""#);
        push_u64(b, seq);
        b.extend_from_slice(br#"","streamSid":""#);
        b.extend_from_slice(self.ids.stream_sid.as_bytes());
        b.extend_from_slice(br#"","mark":{"name":""#);
        push_json_str(b, name);
        b.extend_from_slice(br#""}}"#);
        b
    }

    /// `stop`.
    pub fn stop(&mut self, seq: u64) -> &mut [u8] {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(br#"{"event":"stop","sequenceNumber":""#);
        push_u64(b, seq);
        b.extend_from_slice(br#"","stop":{"accountSid":""#);
        b.extend_from_slice(self.ids.account_sid.as_bytes());
        b.extend_from_slice(br#"","callSid":""#);
        b.extend_from_slice(self.ids.call_sid.as_bytes());
        b.push(b'"');
        b.extend_from_slice(&self.tail);
        b
    }
}

/// A message from the server on a bidirectional stream (what Twilio accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// `media`: the base64-decoded μ-law payload.
    Media(Vec<u8>),
    /// `mark` with its name.
    Mark(String),
    /// `clear`.
    Clear,
}

#[derive(serde::Deserialize)]
struct ServerJson<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(rename = "streamSid", borrow, default)]
    stream_sid: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    media: Option<ServerMedia<'a>>,
    #[serde(borrow, default)]
    mark: Option<ServerMark<'a>>,
}

#[derive(serde::Deserialize)]
struct ServerMedia<'a> {
    #[serde(borrow)]
    payload: std::borrow::Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct ServerMark<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
}

/// Parses a text frame the server sent on stream `stream_sid`, the way Twilio judges it:
/// anything that is not valid JSON, an unknown event, a missing or wrong `streamSid`, or a
/// bad payload is an error (Twilio's warning 31951), given as a short reason.
pub fn parse_server_message(text: &[u8], stream_sid: &str) -> Result<ServerMessage, &'static str> {
    let m: ServerJson<'_> = serde_json::from_slice(text).map_err(|_| "invalid_json")?;
    match m.stream_sid.as_deref() {
        None => return Err("missing_stream_sid"),
        Some(s) if s != stream_sid => return Err("wrong_stream_sid"),
        Some(_) => {}
    }
    match m.event.as_ref() {
        "media" => {
            let p = m.media.ok_or("media_without_payload")?;
            base64_simd::STANDARD
                .decode_to_vec(p.payload.as_bytes())
                .map(ServerMessage::Media)
                .map_err(|_| "invalid_base64")
        }
        "mark" => Ok(ServerMessage::Mark(
            m.mark.ok_or("mark_without_name")?.name.into_owned(),
        )),
        "clear" => Ok(ServerMessage::Clear),
        _ => Err("unknown_event"),
    }
}

/// Appends `s` to `out` as the inside of a JSON string (quotes, backslashes and control
/// characters escaped).
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1F => {
                out.extend_from_slice(b"\\u00");
                let hex = b"0123456789abcdef";
                out.push(hex[(b >> 4) as usize]);
                out.push(hex[(b & 15) as usize]);
            }
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn ids() -> CallIds {
        CallIds {
            account_sid: format!("AC{}", "a".repeat(32)),
            call_sid: format!("CA{}", "c".repeat(32)),
            stream_sid: format!("MZ{}", "0123456789abcdef".repeat(2)),
        }
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).expect("valid JSON")
    }

    #[test]
    fn push_u64_formats_like_display() {
        for v in [0u64, 1, 9, 10, 99, 100, 12345, u32::MAX as u64, u64::MAX] {
            let mut out = b"x".to_vec();
            push_u64(&mut out, v);
            assert_eq!(out, format!("x{v}").into_bytes());
        }
    }

    #[test]
    fn sids_have_twilio_shape() {
        let c = CallIds::new(0xDEAD_BEEF, 42);
        for (sid, p) in [
            (&c.account_sid, "AC"),
            (&c.call_sid, "CA"),
            (&c.stream_sid, "MZ"),
        ] {
            assert_eq!(sid.len(), 34);
            assert!(sid.starts_with(p));
            assert!(sid[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(CallIds::new(1, 1).stream_sid, CallIds::new(1, 2).stream_sid);
        let c = CallIds::new(0xDEAD_BEEF, 42);
        assert_eq!(CallIds::stream_index(&c.stream_sid, 0xDEAD_BEEF), Some(42));
        assert_eq!(CallIds::stream_index(&c.stream_sid, 7), None);
        assert_eq!(CallIds::stream_index(&c.call_sid, 0xDEAD_BEEF), None);
        assert_eq!(CallIds::stream_index("MZnothex", 0xDEAD_BEEF), None);
    }

    #[test]
    fn connected_is_exact() {
        let mut m = MessageBuilder::new(ids());
        assert_eq!(
            m.connected(),
            br#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#
        );
    }

    #[test]
    fn start_fields_and_bytes() {
        let mut m = MessageBuilder::new(ids());
        let i = ids();
        let want = format!(
            r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"{a}","streamSid":"{s}","callSid":"{c}","tracks":["inbound","outbound"],"customParameters":{{"loadtest":"1","stream_index":"7"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{s}"}}"#,
            a = i.account_sid,
            s = i.stream_sid,
            c = i.call_sid
        );
        let got = m.start(1, true, 7).to_vec();
        assert_eq!(String::from_utf8_lossy(&got), want);
        let v = parse(&got);
        assert_eq!(v["event"], "start");
        assert_eq!(v["sequenceNumber"], "1");
        assert_eq!(v["streamSid"], i.stream_sid.as_str());
        assert_eq!(v["start"]["streamSid"], i.stream_sid.as_str());
        assert_eq!(v["start"]["accountSid"], i.account_sid.as_str());
        assert_eq!(v["start"]["callSid"], i.call_sid.as_str());
        assert_eq!(
            v["start"]["tracks"],
            serde_json::json!(["inbound", "outbound"])
        );
        assert_eq!(v["start"]["customParameters"]["stream_index"], "7");
        assert_eq!(v["start"]["customParameters"]["loadtest"], "1");
        assert_eq!(v["start"]["mediaFormat"]["sampleRate"], 8000);
        assert_eq!(v["start"]["mediaFormat"]["channels"], 1);
        assert_eq!(v["start"]["mediaFormat"]["encoding"], "audio/x-mulaw");
        let one = parse(m.start(1, false, 0));
        assert_eq!(one["start"]["tracks"], serde_json::json!(["inbound"]));
    }

    #[test]
    fn media_fields_and_bytes() {
        let mut m = MessageBuilder::new(ids());
        let sid = ids().stream_sid;
        let payload = b"AAAA+/==";
        let got = m.media(123, Track::Outbound, 61, 1200, payload).to_vec();
        let want = format!(
            r#"{{"event":"media","sequenceNumber":"123","media":{{"track":"outbound","chunk":"61","timestamp":"1200","payload":"AAAA+/=="}},"streamSid":"{sid}"}}"#
        );
        assert_eq!(String::from_utf8_lossy(&got), want);
        let v = parse(&got);
        assert_eq!(v["event"], "media");
        assert_eq!(v["sequenceNumber"], "123");
        assert_eq!(v["media"]["track"], "outbound");
        assert_eq!(v["media"]["chunk"], "61");
        assert_eq!(v["media"]["timestamp"], "1200");
        assert_eq!(v["media"]["payload"], "AAAA+/==");
        assert_eq!(v["streamSid"], sid.as_str());
        // The buffer is reused: a shorter message leaves no trailing bytes.
        let short = m.media(2, Track::Inbound, 1, 0, b"").to_vec();
        assert_eq!(parse(&short)["media"]["chunk"], "1");
    }

    #[test]
    fn media_does_not_reallocate() {
        let mut m = MessageBuilder::new(ids());
        let payload = [b'A'; 216];
        m.media(1, Track::Inbound, 1, 0, &payload);
        let ptr = m.buf.as_ptr();
        let cap = m.buf.capacity();
        for k in 2..10_000u64 {
            m.media(k, Track::Inbound, k, k * 20, &payload);
        }
        assert_eq!(m.buf.as_ptr(), ptr);
        assert_eq!(m.buf.capacity(), cap);
    }

    #[test]
    fn server_messages_are_parsed_like_twilio_would() {
        let sid = ids().stream_sid;
        let media =
            format!(r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"AAEC\/w=="}}}}"#);
        assert_eq!(
            parse_server_message(media.as_bytes(), &sid),
            Ok(ServerMessage::Media(vec![0, 1, 2, 255]))
        );
        let mark = format!(r#"{{"event":"mark","streamSid":"{sid}","mark":{{"name":"a\"b"}}}}"#);
        assert_eq!(
            parse_server_message(mark.as_bytes(), &sid),
            Ok(ServerMessage::Mark("a\"b".into()))
        );
        let clear = format!(r#"{{"streamSid":"{sid}","event":"clear","extra":1}}"#);
        assert_eq!(
            parse_server_message(clear.as_bytes(), &sid),
            Ok(ServerMessage::Clear)
        );
        for (text, why) in [
            ("nope".to_string(), "invalid_json"),
            (r#"{"event":"clear"}"#.to_string(), "missing_stream_sid"),
            (
                r#"{"event":"clear","streamSid":"MZx"}"#.to_string(),
                "wrong_stream_sid",
            ),
            (
                format!(r#"{{"event":"dance","streamSid":"{sid}"}}"#),
                "unknown_event",
            ),
            (
                format!(r#"{{"event":"media","streamSid":"{sid}"}}"#),
                "media_without_payload",
            ),
            (
                format!(r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"@@"}}}}"#),
                "invalid_base64",
            ),
        ] {
            assert_eq!(
                parse_server_message(text.as_bytes(), &sid),
                Err(why),
                "{text}"
            );
        }
    }

    #[test]
    fn mark_names_are_escaped() {
        let mut m = MessageBuilder::new(ids());
        let v = parse(m.mark(3, "q\"\\\n"));
        assert_eq!(v["mark"]["name"], "q\"\\\n");
    }

    #[test]
    fn dtmf_mark_stop_fields_and_bytes() {
        let mut m = MessageBuilder::new(ids());
        let i = ids();
        let s = &i.stream_sid;
        assert_eq!(
            String::from_utf8_lossy(m.dtmf(5, b'5')),
            format!(
                r#"{{"event":"dtmf","streamSid":"{s}","sequenceNumber":"5","dtmf":{{"track":"inbound_track","digit":"5"}}}}"#
            )
        );
        assert_eq!(
            String::from_utf8_lossy(m.mark(6, "m1")),
            format!(
                r#"{{"event":"mark","sequenceNumber":"6","streamSid":"{s}","mark":{{"name":"m1"}}}}"#
            )
        );
        let stop = m.stop(7).to_vec();
        assert_eq!(
            String::from_utf8_lossy(&stop),
            format!(
                r#"{{"event":"stop","sequenceNumber":"7","stop":{{"accountSid":"{a}","callSid":"{c}"}},"streamSid":"{s}"}}"#,
                a = i.account_sid,
                c = i.call_sid
            )
        );
        let v = parse(&stop);
        assert_eq!(v["stop"]["callSid"], i.call_sid.as_str());
        assert_eq!(v["sequenceNumber"], "7");
    }
}
