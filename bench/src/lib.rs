//! Shared inputs for the micro-benchmarks: real Twilio messages built from the speech fixture
//! (`../shared/fixtures/speech-8k.ulaw`), exactly as Twilio frames them.

use std::path::PathBuf;

/// The speech fixture (raw μ-law 8 kHz), or a synthetic sweep when `../shared` is absent.
pub fn speech() -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/speech-8k.ulaw");
    std::fs::read(p).unwrap_or_else(|_| (0..64_000u32).map(|i| (i * 31 % 251) as u8).collect())
}

/// A `media` message as Twilio sends it (key order and string-typed numbers included).
pub fn media_message(
    stream_sid: &str,
    seq: u64,
    track: &str,
    chunk: u64,
    ts: u64,
    ulaw: &[u8],
) -> Vec<u8> {
    format!(
        r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{track}","chunk":"{chunk}","timestamp":"{ts}","payload":"{}"}},"streamSid":"{stream_sid}"}}"#,
        base64_simd::STANDARD.encode_to_string(ulaw)
    )
    .into_bytes()
}

/// The `start` message for the benchmark stream.
pub fn start_message(stream_sid: &str) -> Vec<u8> {
    format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"AC0123456789abcdef0123456789abcdef","streamSid":"{stream_sid}","callSid":"CA0123456789abcdef0123456789abcdef","tracks":["inbound","outbound"],"customParameters":{{"FirstName":"Jane"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{stream_sid}"}}"#
    )
    .into_bytes()
}

/// 200 consecutive 20 ms media messages of one stream.
pub fn media_messages(stream_sid: &str) -> Vec<Vec<u8>> {
    let audio = speech();
    (0..200u64)
        .map(|k| {
            let off = (k as usize * 160) % (audio.len() - 160);
            media_message(
                stream_sid,
                k + 2,
                "inbound",
                k + 1,
                k * 20,
                &audio[off..off + 160],
            )
        })
        .collect()
}
