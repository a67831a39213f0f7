//! Parser tests: every message type from the protocol doc, quirks, and malformed input.

use super::*;

fn p(s: &str) -> Result<Parsed<'static>, ParseError> {
    // Leak: tests only; gives the parsed message a 'static input.
    let buf: &'static mut [u8] = Box::leak(s.as_bytes().to_vec().into_boxed_slice());
    parse(buf)
}

const SID: &str = "MZ0123456789abcdef0123456789abcdef";

#[test]
fn connected() {
    let m = p(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#).unwrap();
    assert_eq!(
        m.message,
        Message::Connected {
            protocol: Some("Call"),
            version: Some("1.0.0")
        }
    );
    assert_eq!(m.unknown_fields, 0);
}

#[test]
fn start_doc_example() {
    let s = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"ACxx","streamSid":"MZyy","callSid":"CAzz","tracks":["inbound","outbound"],"customParameters":{"FirstName":"Jane","Esc":"a\"b\\c\u00e9"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZyy"}"#;
    let m = p(s).unwrap();
    let Message::Start(st) = m.message else {
        panic!("not start")
    };
    assert_eq!(st.seq, Some(1));
    assert_eq!(st.stream_sid, "MZyy");
    assert_eq!(st.account_sid, "ACxx");
    assert_eq!(st.call_sid, "CAzz");
    assert_eq!(st.tracks, vec![Track::Inbound, Track::Outbound]);
    assert_eq!(
        st.custom_parameters,
        vec![("FirstName", "Jane"), ("Esc", "a\"b\\cé")]
    );
    assert_eq!(
        st.media_format,
        Some(MediaFormat {
            encoding: "audio/x-mulaw",
            sample_rate: 8000,
            channels: 1
        })
    );
    assert_eq!(m.unknown_fields, 0);
}

#[test]
fn media_doc_example_and_quirks() {
    let s = format!(
        r#"{{"event":"media","sequenceNumber":"3","media":{{"track":"inbound","chunk":"1","timestamp":"5","payload":"no+JhoaJjpz/"}},"streamSid":"{SID}"}}"#
    );
    let m = p(&s).unwrap();
    assert_eq!(
        m.message,
        Message::Media(Media {
            seq: 3,
            stream_sid: Some(SID),
            track: Track::Inbound,
            chunk: 1,
            timestamp_ms: 5,
            payload: "no+JhoaJjpz/",
        })
    );
    // Escaped slash in base64 (legal JSON) is unescaped in place; fields in any order; extra
    // fields counted.
    let m = p(r#"{"extra":{"a":[1,2,{"b":null}]},"media":{"payload":"ab\/c","timestamp":"18446744","chunk":"99","track":"outbound","new":true},"streamSid":"MZ1","sequenceNumber":"10","event":"media"}"#).unwrap();
    let Message::Media(md) = m.message else {
        panic!()
    };
    assert_eq!(md.payload, "ab/c");
    assert_eq!(md.track, Track::Outbound);
    assert_eq!(md.timestamp_ms, 18446744);
    assert_eq!(md.chunk, 99);
    assert_eq!(md.seq, 10);
    assert_eq!(m.unknown_fields, 2);
}

#[test]
fn dtmf_mark_stop() {
    let m = p(r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#).unwrap();
    assert_eq!(
        m.message,
        Message::Dtmf {
            seq: Some(5),
            stream_sid: Some("MZ1"),
            track: Some("inbound_track"),
            digit: "1"
        }
    );
    let m = p(r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"greeting-done"}}"#).unwrap();
    assert_eq!(
        m.message,
        Message::Mark {
            seq: Some(4),
            stream_sid: Some("MZ1"),
            name: "greeting-done"
        }
    );
    let m = p(r#"{"event":"stop","sequenceNumber":"5","stop":{"accountSid":"AC1","callSid":"CA1"},"streamSid":"MZ1"}"#).unwrap();
    assert_eq!(
        m.message,
        Message::Stop {
            seq: Some(5),
            stream_sid: Some("MZ1"),
            account_sid: Some("AC1"),
            call_sid: Some("CA1")
        }
    );
    let m = p(r#"{"event":"stop","streamSid":"MZ1"}"#).unwrap();
    assert_eq!(
        m.message,
        Message::Stop {
            seq: None,
            stream_sid: Some("MZ1"),
            account_sid: None,
            call_sid: None
        }
    );
}

#[test]
fn repeated_unknown_fields_are_not_duplicates() {
    // Only fields the gateway reads are checked: a repeated unknown key is counted twice, and
    // another event's body beside this one's is not a repetition.
    let m = p(r#"{"event":"media","x":1,"x":2,"sequenceNumber":"1","start":{},"media":{"track":"inbound","y":0,"y":0,"chunk":"1","timestamp":"0","payload":"AA=="}}"#).unwrap();
    assert!(matches!(m.message, Message::Media(_)));
    assert_eq!(m.unknown_fields, 4);
}

#[test]
fn unknown_event_is_tolerated() {
    let m = p(r#"{"event":"transcription","sequenceNumber":"7","streamSid":"MZ1","transcription":{"text":"hi"}}"#).unwrap();
    assert_eq!(
        m.message,
        Message::Unknown {
            event: "transcription",
            seq: Some(7),
            stream_sid: Some("MZ1")
        }
    );
    assert_eq!(m.message.event_label(), "unknown");
}

#[test]
fn malformed_inputs_have_specific_errors() {
    let cases: &[(&[u8], ParseError)] = &[
        (b"", ParseError::InvalidJson),
        (b"{", ParseError::InvalidJson),
        (b"{\"event\":\"media\"", ParseError::InvalidJson),
        (b"[1,2]", ParseError::NotAnObject),
        (b"\"media\"", ParseError::NotAnObject),
        (b"{\"event\":\"\xff\"}", ParseError::InvalidUtf8),
        (br#"{"sequenceNumber":"1"}"#, ParseError::MissingField("event")),
        (br#"{"event":5}"#, ParseError::WrongType("event")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0"}}"#, ParseError::MissingField("media.payload")),
        (br#"{"event":"media","sequenceNumber":"1"}"#, ParseError::MissingField("media")),
        (br#"{"event":"media","sequenceNumber":"1","media":[]}"#, ParseError::WrongType("media")),
        (br#"{"event":"media","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::MissingField("sequenceNumber")),
        (br#"{"event":"media","sequenceNumber":3,"media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::WrongType("sequenceNumber")),
        (br#"{"event":"media","sequenceNumber":"-3","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::InvalidNumber("sequenceNumber")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1.5","timestamp":"0","payload":"AA=="}}"#, ParseError::InvalidNumber("media.chunk")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"99999999999999999999","payload":"AA=="}}"#, ParseError::InvalidNumber("media.timestamp")),
        // Past 2^53 - 1 ms: refused, not saturated on the sample timeline.
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"9007199254740992","payload":"AA=="}}"#, ParseError::InvalidNumber("media.timestamp")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"9223372036854775807","payload":"AA=="}}"#, ParseError::InvalidNumber("media.timestamp")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"both","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::InvalidTrack),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":42}}"#, ParseError::WrongType("media.payload")),
        (br#"{"event":"start","start":{"accountSid":"AC","callSid":"CA","tracks":["inbound"]}}"#, ParseError::MissingField("start.streamSid")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA"}}"#, ParseError::MissingField("start.tracks")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":"inbound"}}"#, ParseError::WrongType("start.tracks")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["sideways"]}}"#, ParseError::InvalidTrack),
        (br#"{"event":"start","streamSid":"MZother","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"]}}"#, ParseError::StreamSidMismatch),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"customParameters":{"a":1}}}"#, ParseError::WrongType("start.customParameters")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":"8000","channels":1}}}"#, ParseError::WrongType("mediaFormat.sampleRate")),
        (br#"{"event":"dtmf","dtmf":{"track":"inbound_track"}}"#, ParseError::MissingField("dtmf.digit")),
        (br#"{"event":"mark","mark":{}}"#, ParseError::MissingField("mark.name")),
        // A field the gateway reads, twice in one object: no winner is picked.
        (br#"{"event":"media","event":"stop","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::DuplicateField("event")),
        (br#"{"event":"media","sequenceNumber":"1","sequenceNumber":"2","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::DuplicateField("sequenceNumber")),
        (br#"{"event":"media","streamSid":"MZa","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="},"streamSid":"MZb"}"#, ParseError::DuplicateField("streamSid")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="},"media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::DuplicateField("media")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","track":"outbound","chunk":"1","timestamp":"0","payload":"AA=="}}"#, ParseError::DuplicateField("media.track")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","chunk":"2","timestamp":"0","payload":"AA=="}}"#, ParseError::DuplicateField("media.chunk")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0","timestamp":"20","payload":"AA=="}}"#, ParseError::DuplicateField("media.timestamp")),
        (br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA==","payload":"/w=="}}"#, ParseError::DuplicateField("media.payload")),
        (br#"{"event":"start","start":{"streamSid":"MZ","streamSid":"MZ2","accountSid":"AC","callSid":"CA","tracks":["inbound"]}}"#, ParseError::DuplicateField("start.streamSid")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","accountSid":"AC2","callSid":"CA","tracks":["inbound"]}}"#, ParseError::DuplicateField("start.accountSid")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","callSid":"CA2","tracks":["inbound"]}}"#, ParseError::DuplicateField("start.callSid")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"tracks":["outbound"]}}"#, ParseError::DuplicateField("start.tracks")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"customParameters":{"a":"1"},"customParameters":{"b":"2"}}}"#, ParseError::DuplicateField("start.customParameters")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"customParameters":{"a":"1","a":"2"}}}"#, ParseError::DuplicateField("start.customParameters")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#, ParseError::DuplicateField("start.mediaFormat")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"sampleRate":16000,"channels":1}}}"#, ParseError::DuplicateField("mediaFormat.sampleRate")),
        (br#"{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"1","digit":"2"}}"#, ParseError::DuplicateField("dtmf.digit")),
        (br#"{"event":"mark","mark":{"name":"a","name":"b"}}"#, ParseError::DuplicateField("mark.name")),
        (br#"{"event":"stop","stop":{"accountSid":"AC","callSid":"CA","callSid":"CB"}}"#, ParseError::DuplicateField("stop.callSid")),
        (br#"{"event":"connected","protocol":"Call","protocol":"Call","version":"1.0.0"}"#, ParseError::DuplicateField("protocol")),
        (br#"{"event":"connected","protocol":"Call","version":"1.0.0","version":"2.0.0"}"#, ParseError::DuplicateField("version")),
        (br#"{"event":"dtmf","dtmf":{"track":"inbound_track","track":"outbound_track","digit":"1"}}"#, ParseError::DuplicateField("dtmf.track")),
        (br#"{"event":"stop","stop":{"accountSid":"AC","accountSid":"AD","callSid":"CA"}}"#, ParseError::DuplicateField("stop.accountSid")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","encoding":"audio/x-l16","sampleRate":8000,"channels":1}}}"#, ParseError::DuplicateField("mediaFormat.encoding")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1,"channels":2}}}"#, ParseError::DuplicateField("mediaFormat.channels")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"customParameters":null,"customParameters":{"a":"1"}}}"#, ParseError::DuplicateField("start.customParameters")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"customParameters":{"a":"1"},"customParameters":null}}"#, ParseError::DuplicateField("start.customParameters")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"],"customParameters":{"z":"1","b":"2","y":"3","b":"4"}}}"#, ParseError::DuplicateField("start.customParameters")),
        (br#"{"event":"start","start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"]},"start":{"streamSid":"MZ","accountSid":"AC","callSid":"CA","tracks":["inbound"]}}"#, ParseError::DuplicateField("start")),
        (br#"{"event":"dtmf","dtmf":{"digit":"1"},"dtmf":{"digit":"2"}}"#, ParseError::DuplicateField("dtmf")),
        (br#"{"event":"mark","mark":{"name":"a"},"mark":{"name":"b"}}"#, ParseError::DuplicateField("mark")),
        (br#"{"event":"stop","stop":{},"stop":{}}"#, ParseError::DuplicateField("stop")),
    ];
    for (input, expect) in cases {
        let mut buf = input.to_vec();
        let got = parse(&mut buf).map(|m| format!("{:?}", m.message));
        assert_eq!(
            got,
            Err(*expect),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn decimal_parsing() {
    assert_eq!(parse_decimal("0", "f"), Ok(0));
    assert_eq!(
        parse_decimal("1234567890123456789", "f"),
        Ok(1234567890123456789)
    );
    for bad in [
        "",
        "+1",
        "-1",
        " 1",
        "1 ",
        "1e3",
        "0x10",
        "12345678901234567890",
    ] {
        assert!(parse_decimal(bad, "f").is_err(), "{bad:?}");
    }
}

#[test]
fn parse_is_reusable_across_many_messages() {
    // Exercises the thread-local tape reuse with documents of varying size.
    for i in 0..1000u32 {
        let s = format!(
            r#"{{"event":"media","sequenceNumber":"{i}","media":{{"track":"inbound","chunk":"{i}","timestamp":"{}","payload":"{}"}}}}"#,
            i * 20,
            "A".repeat(4 * (1 + i as usize % 300))
        );
        let mut buf = s.into_bytes();
        let m = parse(&mut buf).unwrap();
        let Message::Media(md) = m.message else {
            panic!()
        };
        assert_eq!(md.seq, i as u64);
        assert_eq!(md.payload.len(), 4 * (1 + i as usize % 300));
    }
}

#[test]
fn the_largest_accepted_timestamp_is_2_pow_53_minus_1() {
    let mut buf = br#"{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"9007199254740991","payload":"AA=="}}"#.to_vec();
    match parse(&mut buf).expect("accepted").message {
        Message::Media(m) => assert_eq!(m.timestamp_ms, MAX_TIMESTAMP_MS),
        other => panic!("not media: {other:?}"),
    }
}
