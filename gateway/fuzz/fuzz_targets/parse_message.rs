//! Fuzzes the Twilio message parser: any bytes, as one WebSocket text frame.
//!
//! Must never panic; a parse must be deterministic; whatever it accepts is valid UTF-8 and its
//! `media` fields are usable by the session (the payload is a string slice of the input).
#![no_main]

use gateway::protocol::{parse, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut a = data.to_vec();
    let mut b = data.to_vec();
    let first = parse(&mut a).map(|p| format!("{p:?}"));
    let second = parse(&mut b).map(|p| format!("{p:?}"));
    assert_eq!(first, second, "parse is not deterministic");
    let mut c = data.to_vec();
    if let Ok(p) = parse(&mut c) {
        assert!(std::str::from_utf8(data).is_ok(), "accepted invalid UTF-8");
        if let Message::Media(m) = &p.message {
            // Decoding the payload must not panic either (errors are fine).
            let mut out = Vec::new();
            let _ = gateway::protocol::audio::decode_base64_into(
                m.payload.as_bytes(),
                &mut out,
                64 * 1024,
            );
        }
        let _ = p.message.event_label();
        let _ = p.message.seq();
        let _ = p.message.stream_sid();
    }
});
