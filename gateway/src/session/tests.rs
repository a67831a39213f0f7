//! State machine tests with an in-memory publisher.

use super::*;
use crate::protocol::parse;

/// Records everything a session publishes.
#[derive(Default)]
pub(crate) struct Recorder {
    pub audio: Vec<(Track, u64, u64, u64, u32, Vec<u8>)>,
    pub events: Vec<serde_json::Value>,
    pub errors: Vec<ProtocolErrorKind>,
    pub anomalies: Vec<AnomalyKind>,
    pub dropped: Vec<(DropReason, u64)>,
    pub refuse_audio: bool,
}

impl Publisher for Recorder {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        if self.refuse_audio {
            return Err(DropReason::QueueFull);
        }
        self.audio.push((
            r.track,
            r.seq,
            r.chunk,
            r.timestamp_ms,
            r.chunks,
            r.payload.to_vec(),
        ));
        Ok(())
    }
    fn publish_event(&mut self, e: &Event<'_>) {
        let mut out = Vec::new();
        crate::events::write_json(e, "test", &mut out);
        self.events.push(serde_json::from_slice(&out).unwrap());
    }
    fn protocol_error(&mut self, kind: ProtocolErrorKind) {
        self.errors.push(kind);
    }
    fn anomaly(&mut self, kind: AnomalyKind) {
        self.anomalies.push(kind);
    }
    fn frames_dropped(&mut self, reason: DropReason, n: u64) {
        self.dropped.push((reason, n));
    }
}

fn b64(raw: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(raw)
}

fn start_json(tracks: &str) -> String {
    format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":[{tracks}],"customParameters":{{"k":"v"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"MZ1"}}"#
    )
}

fn media_json(seq: u64, track: &str, chunk: u64, ts: u64, raw: &[u8]) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{track}","chunk":"{chunk}","timestamp":"{ts}","payload":"{}"}},"streamSid":"MZ1"}}"#,
        b64(raw)
    )
}

fn feed(s: &mut Session, out: &mut Recorder, json: &str) -> Result<Flow, SessionError> {
    let mut buf = json.as_bytes().to_vec();
    let parsed = parse(&mut buf).map_err(SessionError::from_parse)?;
    s.handle(
        &parsed.message,
        Received {
            unix_us: 7,
            mono_us: 9,
        },
        out,
    )
}

#[test]
fn full_lifecycle_publishes_the_exact_audio_and_events() {
    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder::default();
    assert_eq!(
        feed(
            &mut s,
            &mut out,
            r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#
        ),
        Ok(Flow::Continue)
    );
    feed(&mut s, &mut out, &start_json(r#""inbound","outbound""#)).unwrap();
    let a: Vec<u8> = (0..160).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..161).map(|i| (255 - i) as u8).collect(); // odd length is fine
    feed(&mut s, &mut out, &media_json(2, "inbound", 1, 0, &a)).unwrap();
    feed(&mut s, &mut out, &media_json(3, "outbound", 1, 0, &b)).unwrap();
    feed(&mut s, &mut out, r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"4","dtmf":{"track":"inbound_track","digit":"7"}}"#).unwrap();
    feed(
        &mut s,
        &mut out,
        r#"{"event":"mark","sequenceNumber":"5","streamSid":"MZ1","mark":{"name":"m1"}}"#,
    )
    .unwrap();
    assert_eq!(
        feed(
            &mut s,
            &mut out,
            r#"{"event":"stop","sequenceNumber":"6","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#
        ),
        Ok(Flow::Stopped)
    );
    assert_eq!(out.audio.len(), 2);
    // Records carry the μ-law bytes; the Kafka path converts them to the output encoding.
    assert_eq!(out.audio[0], (Track::Inbound, 2, 1, 0, 1, a.clone()));
    assert_eq!(out.audio[1], (Track::Outbound, 3, 1, 0, 1, b.clone()));
    let types: Vec<&str> = out
        .events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["start", "dtmf", "mark", "stop"]);
    assert_eq!(out.events[0]["custom_parameters"]["k"], "v");
    assert_eq!(out.events[1]["digit"], "7");
    assert_eq!(out.events[2]["name"], "m1");
    assert_eq!(out.events[3]["frames_published"], 2);
    assert_eq!(out.events[3]["frames_dropped"], 0);
    assert!(out.anomalies.is_empty());
    // Anything after stop is an error.
    let err = feed(&mut s, &mut out, &media_json(7, "inbound", 2, 20, &a)).unwrap_err();
    assert_eq!(
        (err.close_code, err.kind),
        (1008, ProtocolErrorKind::AfterStop)
    );
}

#[test]
fn missing_connected_is_fine_and_media_before_start_is_an_error() {
    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder::default();
    let err = feed(&mut s, &mut out, &media_json(2, "inbound", 1, 0, &[1, 2])).unwrap_err();
    assert_eq!(
        (err.close_code, err.kind),
        (1008, ProtocolErrorKind::MediaBeforeStart)
    );
    s.fail(&err, Received::default(), &mut out);
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0]["type"], "error");
    assert!(out.events[0]["stream_sid"].is_null());
    assert_eq!(out.errors, [ProtocolErrorKind::MediaBeforeStart]);

    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder::default();
    feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap();
    let err = feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap_err();
    assert_eq!(
        (err.close_code, err.kind),
        (1008, ProtocolErrorKind::DuplicateStart)
    );
}

#[test]
fn sequence_and_timestamp_anomalies_are_reported_not_fatal() {
    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder::default();
    feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap();
    let a = [0u8; 160];
    feed(&mut s, &mut out, &media_json(2, "inbound", 1, 0, &a)).unwrap();
    feed(&mut s, &mut out, &media_json(5, "inbound", 2, 20, &a)).unwrap(); // seq gap 3..4
    feed(&mut s, &mut out, &media_json(4, "inbound", 3, 40, &a)).unwrap(); // regression
    feed(&mut s, &mut out, &media_json(6, "inbound", 4, 200, &a)).unwrap(); // ts jump
    assert_eq!(
        out.anomalies,
        [
            AnomalyKind::SeqGap,
            AnomalyKind::SeqRegression,
            AnomalyKind::TimestampJump
        ]
    );
    let gaps: Vec<_> = out
        .events
        .iter()
        .filter(|e| e["type"] == "sequence_gap")
        .collect();
    assert_eq!(gaps.len(), 3);
    assert_eq!(
        (
            gaps[0]["kind_detail"].as_str(),
            gaps[0]["expected"].as_u64(),
            gaps[0]["got"].as_u64()
        ),
        (Some("seq_gap"), Some(3), Some(5))
    );
    assert_eq!(gaps[2]["track"], "inbound");
    assert_eq!(
        (gaps[2]["expected"].as_u64(), gaps[2]["got"].as_u64()),
        (Some(60), Some(200))
    );
    assert_eq!(out.audio.len(), 4);
}

#[test]
fn one_stray_sequence_number_is_reported_once_either_way() {
    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder::default();
    feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap();
    let a = [0u8; 160];
    let mut ts = 0;
    let mut send = |s: &mut Session, out: &mut Recorder, seq: u64| {
        feed(s, out, &media_json(seq, "inbound", seq, ts, &a)).unwrap();
        ts += 20;
    };
    // A stray high number (99 among 2, 3, 4, ...): a gap to it, one regression back, and the
    // numbering is followed from there, not reported on every later message.
    for seq in [2, 3, 99, 4, 5, 6, 7] {
        send(&mut s, &mut out, seq);
    }
    // A stray low number (a duplicate of 5 after 8): one regression, the high mark kept.
    for seq in [8, 5, 9, 10] {
        send(&mut s, &mut out, seq);
    }
    assert_eq!(
        out.anomalies,
        [
            AnomalyKind::SeqGap,
            AnomalyKind::SeqRegression,
            AnomalyKind::SeqRegression
        ]
    );
    let seq_events: Vec<(u64, u64)> = out
        .events
        .iter()
        .filter(|e| e["type"] == "sequence_gap")
        .map(|e| (e["expected"].as_u64().unwrap(), e["got"].as_u64().unwrap()))
        .collect();
    assert_eq!(seq_events, [(4, 99), (100, 4), (9, 5)]);
}

#[test]
fn batching_concatenates_and_flushes_tail_and_on_jumps() {
    let cfg = SessionConfig {
        frames_per_record: 3,
        ..Default::default()
    };
    let mut s = Session::new(cfg);
    let mut out = Recorder::default();
    feed(&mut s, &mut out, &start_json(r#""inbound","outbound""#)).unwrap();
    let chunk = |i: u8| vec![i; 160];
    let mut seq = 2;
    for i in 0..4u8 {
        feed(
            &mut s,
            &mut out,
            &media_json(seq, "inbound", i as u64 + 1, i as u64 * 20, &chunk(i)),
        )
        .unwrap();
        seq += 1;
    }
    // One full record of 3 chunks, one pending.
    assert_eq!(out.audio.len(), 1);
    let (track, first_seq, first_chunk, ts, n, payload) = out.audio[0].clone();
    assert_eq!(
        (track, first_seq, first_chunk, ts, n),
        (Track::Inbound, 2, 1, 0, 3)
    );
    assert_eq!(payload, [chunk(0), chunk(1), chunk(2)].concat());
    // A jump flushes the pending chunk before the new one.
    feed(
        &mut s,
        &mut out,
        &media_json(seq, "inbound", 5, 1000, &chunk(9)),
    )
    .unwrap();
    assert_eq!(out.audio.len(), 2);
    assert_eq!(out.audio[1].4, 1);
    assert_eq!(out.audio[1].3, 60);
    // Disconnect flushes the tail.
    s.disconnect("closed_by_peer", Received::default(), &mut out);
    assert_eq!(out.audio.len(), 3);
    assert_eq!((out.audio[2].3, out.audio[2].4), (1000, 1));
    let end = out.events.last().unwrap();
    assert_eq!(end["type"], "disconnect");
    assert_eq!(end["frames_published"], 5);
}

#[test]
fn drops_are_counted_with_reason() {
    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder {
        refuse_audio: true,
        ..Default::default()
    };
    feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap();
    feed(&mut s, &mut out, &media_json(2, "inbound", 1, 0, &[1; 160])).unwrap();
    feed(&mut s, &mut out, r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"2","timestamp":"20","payload":""}}"#).unwrap();
    assert_eq!(
        out.dropped,
        [(DropReason::QueueFull, 1), (DropReason::EmptyPayload, 1)]
    );
    s.disconnect("eof", Received::default(), &mut out);
    let end = out.events.last().unwrap();
    assert_eq!(
        (
            end["frames_published"].as_u64(),
            end["frames_dropped"].as_u64()
        ),
        (Some(0), Some(2))
    );
}

#[test]
fn bad_payload_and_mismatched_sid_are_errors() {
    let mut s = Session::new(SessionConfig::default());
    let mut out = Recorder::default();
    feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap();
    let err = feed(&mut s, &mut out, r#"{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"@@@@"}}"#).unwrap_err();
    assert_eq!(
        (err.close_code, err.kind),
        (1007, ProtocolErrorKind::InvalidBase64)
    );
    let err = feed(
        &mut s,
        &mut out,
        r#"{"event":"mark","sequenceNumber":"3","streamSid":"MZ2","mark":{"name":"x"}}"#,
    )
    .unwrap_err();
    assert_eq!(
        (err.close_code, err.kind),
        (1008, ProtocolErrorKind::StreamSidMismatch)
    );
    let mut s = Session::new(SessionConfig::default());
    let err = feed(&mut s, &mut out, r#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"mediaFormat":{"encoding":"audio/l16","sampleRate":16000,"channels":1}}}"#).unwrap_err();
    assert_eq!(
        (err.close_code, err.kind),
        (1008, ProtocolErrorKind::UnsupportedMediaFormat)
    );
}

/// Feeds `chunks` = (timestamp ms, payload length) to a batching session and returns the
/// records as (timestamp, chunks, bytes) and the anomaly count.
fn continuity(chunks: &[(u64, usize)], per_record: u32) -> (Vec<(u64, u32, usize)>, usize) {
    let mut s = Session::new(SessionConfig {
        frames_per_record: per_record,
        ..Default::default()
    });
    let mut out = Recorder::default();
    feed(&mut s, &mut out, &start_json(r#""inbound""#)).unwrap();
    for (i, (ts, len)) in chunks.iter().enumerate() {
        let raw = vec![0x55u8; *len];
        let json = if *len == 0 {
            format!(
                r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"inbound","chunk":"{}","timestamp":"{ts}","payload":""}}}}"#,
                i + 2,
                i + 1
            )
        } else {
            media_json(i as u64 + 2, "inbound", i as u64 + 1, *ts, &raw)
        };
        feed(&mut s, &mut out, &json).unwrap();
    }
    s.disconnect("eof", Received::default(), &mut out);
    let records = out
        .audio
        .iter()
        .map(|(_, _, _, ts, n, p)| (*ts, *n, p.len()))
        .collect();
    (records, out.anomalies.len())
}

#[test]
fn one_missing_chunk_is_reported_and_never_spliced_into_a_record() {
    // Before the fix a single missing 20 ms chunk passed unreported and its neighbours shared a
    // record, placing the later samples 20 ms early.
    let (records, anomalies) = continuity(&[(0, 160), (20, 160), (60, 160), (80, 160)], 5);
    assert_eq!(records, [(0, 2, 320), (60, 2, 320)]);
    assert_eq!(anomalies, 1);
}

#[test]
fn duplicates_and_backward_steps_are_anomalies_and_cut_the_batch() {
    let (records, anomalies) = continuity(&[(0, 160), (0, 160), (20, 160)], 5);
    assert_eq!(records, [(0, 1, 160), (0, 2, 320)]);
    assert_eq!(anomalies, 1);
    let (records, anomalies) = continuity(&[(0, 160), (20, 160), (30, 160), (50, 160)], 5);
    assert_eq!(records, [(0, 2, 320), (30, 2, 320)]);
    assert_eq!(anomalies, 1);
}

#[test]
fn the_hole_of_an_empty_payload_is_not_spliced_out() {
    // 20 ms at 20 arrived empty: the chunk at 40 does not continue the record at 0.
    let (records, anomalies) = continuity(&[(0, 160), (20, 0), (40, 160), (60, 160)], 5);
    assert_eq!(records, [(0, 1, 160), (40, 2, 320)]);
    assert_eq!(anomalies, 1);
}

#[test]
fn whole_millisecond_rounding_of_odd_lengths_is_tolerated_but_still_cuts() {
    // 100 bytes = 12.5 ms: Twilio can only stamp the next chunk 12 or 13.
    for next in [12, 13] {
        let (records, anomalies) = continuity(&[(0, 100), (next, 160)], 5);
        assert_eq!(records, [(0, 1, 100), (next, 1, 160)]);
        assert_eq!(anomalies, 0, "next at {next}");
    }
    let (records, anomalies) = continuity(&[(0, 100), (14, 160)], 5);
    assert_eq!(records.len(), 2);
    assert_eq!(anomalies, 1);
    // Contiguous chunks still batch.
    let (records, anomalies) = continuity(&[(0, 160), (20, 160), (40, 160)], 5);
    assert_eq!((records, anomalies), (vec![(0, 3, 480)], 0));
}
