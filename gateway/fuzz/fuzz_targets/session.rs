//! Fuzzes the per-stream state machine with a message sequence decoded from the input.
//!
//! Input layout: byte 0 = session config (bits 0-1: frames_per_record - 1, bit 2: unused,
//! bit 3: a 100-byte payload cap, bit 4: refuse every third record). Then ops, each one
//! byte `op % 8` followed by its operands:
//! 0 connected · 1 start (1 byte: tracks) · 2 media (track, seq mode, timestamp mode, length,
//! then `length` payload bytes) · 3 dtmf · 4 mark · 5 stop · 6 unknown event (each: 1 byte seq
//! mode) · 7 raw message (2-byte big-endian length, then the message bytes verbatim).
//!
//! Checks, as the connection would drive the session: no panic; every media chunk accepted
//! while streaming is published or dropped; at most one terminal event; nothing is accepted
//! after the end.
#![no_main]

use gateway::events::{Event, EventBody};
use gateway::metrics::{DropReason, ProtocolErrorKind};
use gateway::protocol::{parse, Message};
use gateway::session::{
    AudioRecord, Flow, Publisher, Received, Session, SessionConfig, SessionError,
};
use libfuzzer_sys::fuzz_target;

const SID: &str = "MZ00000000000000000000000000000001";

#[derive(Default)]
struct Out {
    offered: u64,
    accepted: u64,
    refuse: bool,
    calls: u64,
    terminal: u32,
    events: u32,
    dropped: u64,
}

impl Publisher for Out {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        self.calls += 1;
        self.offered += r.chunks as u64;
        assert!(r.chunks >= 1);
        assert!(!r.payload.is_empty());
        if self.refuse && self.calls % 3 == 0 {
            return Err(DropReason::QueueFull);
        }
        self.accepted += r.chunks as u64;
        Ok(())
    }
    fn publish_event(&mut self, ev: &Event<'_>) {
        let mut json = Vec::new();
        gateway::events::write_json(ev, "fuzz", &mut json);
        assert!(std::str::from_utf8(&json).is_ok());
        self.events += 1;
        if matches!(ev.body, EventBody::End { .. }) {
            self.terminal += 1;
        }
    }
    fn frames_dropped(&mut self, _reason: DropReason, n: u64) {
        self.dropped += n;
    }
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn track(b: u8) -> &'static str {
    ["inbound", "outbound", "inbound_track", "x"][(b & 3) as usize]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(c) = input.byte() else { return };
    let cfg = SessionConfig {
        frames_per_record: 1 + (c & 3) as u32,
        max_payload_bytes: if c & 8 != 0 { 100 } else { 64 * 1024 },
        max_anomaly_events: 5,
    };
    let mut s = Session::new(cfg);
    let mut out = Out {
        refuse: c & 16 != 0,
        ..Out::default()
    };
    let at = Received {
        unix_us: 1,
        mono_us: 1,
    };
    let mut seq = 0u64;
    let mut ts = [0u64; 2];
    let mut chunk = [0u64; 2];
    let next_seq = |m: u8, seq: &mut u64| -> u64 {
        match m % 4 {
            0 | 1 => *seq += 1,
            2 => {}
            _ => *seq = m as u64 * 3,
        }
        *seq
    };
    let mut ended = false;
    let mut handled = 0u64;
    let mut empty = 0u64;
    while let Some(op) = input.byte() {
        let msg: Vec<u8> = match op % 8 {
            0 => br#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.to_vec(),
            1 => {
                let t = input.byte().unwrap_or(3);
                let tracks = match t % 4 {
                    0 => r#"["inbound"]"#,
                    1 => r#"["outbound"]"#,
                    2 => r#"["inbound","outbound"]"#,
                    _ => "[]",
                };
                format!(r#"{{"event":"start","sequenceNumber":"{}","start":{{"accountSid":"AC1","streamSid":"{SID}","callSid":"CA1","tracks":{tracks},"customParameters":{{"a":"b"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{SID}"}}"#, next_seq(0, &mut seq)).into_bytes()
            }
            2 => {
                let t = input.byte().unwrap_or(0);
                let sm = input.byte().unwrap_or(0);
                let tm = input.byte().unwrap_or(0);
                let len = input.byte().unwrap_or(0) as usize * 2 + (t as usize >> 7);
                let payload = input.take(len);
                let ti = (t & 1) as usize;
                chunk[ti] += 1;
                let stamp = if tm < 200 { ts[ti] } else { tm as u64 * 10 };
                ts[ti] = stamp + payload.len() as u64 / 8;
                format!(
                    r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"{}","chunk":"{}","timestamp":"{stamp}","payload":"{}"}},"streamSid":"{SID}"}}"#,
                    next_seq(sm, &mut seq),
                    track(t),
                    chunk[ti],
                    base64_simd::STANDARD.encode_to_string(payload)
                )
                .into_bytes()
            }
            3 => format!(r#"{{"event":"dtmf","streamSid":"{SID}","sequenceNumber":"{}","dtmf":{{"track":"inbound_track","digit":"1"}}}}"#, next_seq(input.byte().unwrap_or(0), &mut seq)).into_bytes(),
            4 => format!(r#"{{"event":"mark","sequenceNumber":"{}","streamSid":"{SID}","mark":{{"name":"m"}}}}"#, next_seq(input.byte().unwrap_or(0), &mut seq)).into_bytes(),
            5 => format!(r#"{{"event":"stop","sequenceNumber":"{}","stop":{{"accountSid":"AC1","callSid":"CA1"}},"streamSid":"{SID}"}}"#, next_seq(input.byte().unwrap_or(0), &mut seq)).into_bytes(),
            6 => format!(r#"{{"event":"clear","sequenceNumber":"{}","streamSid":"{SID}"}}"#, next_seq(input.byte().unwrap_or(0), &mut seq)).into_bytes(),
            _ => {
                let hi = input.byte().unwrap_or(0) as usize;
                let lo = input.byte().unwrap_or(0) as usize;
                input.take(hi << 8 | lo).to_vec()
            }
        };
        let mut buf = msg;
        let parsed = match parse(&mut buf) {
            Ok(p) => p,
            Err(e) => {
                if !ended {
                    s.fail(&SessionError::from_parse(e), at, &mut out);
                    ended = true;
                }
                continue;
            }
        };
        if ended {
            let before = (out.offered, out.events, out.dropped);
            let r = s.handle(&parsed.message, at, &mut out);
            assert!(matches!(&r, Err(e) if e.kind == ProtocolErrorKind::AfterStop), "{r:?}");
            assert_eq!(before, (out.offered, out.events, out.dropped));
            continue;
        }
        let streaming = s.is_streaming();
        match s.handle(&parsed.message, at, &mut out) {
            Ok(Flow::Continue) => {
                if let Message::Media(m) = &parsed.message {
                    assert!(streaming, "media accepted before start");
                    handled += 1;
                    if m.payload.is_empty() {
                        empty += 1;
                    }
                }
            }
            Ok(Flow::Stopped) => ended = true,
            Err(e) => {
                assert!(e.reason.len() <= 123);
                s.fail(&e, at, &mut out);
                ended = true;
            }
        }
    }
    if !ended {
        s.disconnect("eof", at, &mut out);
    }
    assert!(out.terminal <= 1, "{} terminal events", out.terminal);
    assert!(out.offered + empty <= handled);
    assert_eq!(s.frames_published(), out.accepted);
    assert_eq!(s.frames_published() + s.frames_dropped(), handled);
    assert_eq!(out.dropped, s.frames_dropped());
});
