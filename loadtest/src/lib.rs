//! Twilio Media Streams simulator and end-to-end verifier for the gateway.
//!
//! # Layout
//! - [`audio`] — μ-law sources (raw file, WAV, tone) cut into 20 ms chunks, base64 once.
//! - [`message`] — Twilio JSON messages built into one reused buffer per stream.
//! - [`pacing`] — drift-free send schedule (`start + k × 20 ms / speed`), flood mode.
//! - [`sign`] — `x-twilio-signature`.
//! - [`client`] — TCP/TLS connect and the WebSocket upgrade.
//! - [`stream`] — one simulated call (one task per stream, plus its reader task); on
//!   bidirectional streams also Twilio's playout of what the server sends ([`playout`]).
//! - [`playout`] — Twilio's real-time playout, mark echo and clear model.
//! - [`stats`] — counters shared by the streams of a run.
//! - [`consume`] — Kafka receive plumbing: stamp-on-receipt records, assignment at the end,
//!   consumer-lag sampling.
//! - [`verify`] — reads the gateway's Kafka output back and accounts for every chunk.
//! - [`echo`] — the echo bot: plays each caller's audio back through `<prefix>.playback`
//!   with marks, clears and stops.
//! - [`downlink`] — verification of what bidirectional streams received against what the
//!   echo bot produced.
//! - [`probe`] — the sampled latency probe that separates the gateway's latency from the
//!   verifier's own lag.
//! - [`scenario`] — steady, burst, ramp and soak runs.
//! - [`metrics`] — scrapes the gateway's Prometheus endpoint (RSS).
//! - [`report`] — terminal table, JSON report and SVG chart.

pub mod audio;
pub mod client;
pub mod consume;
pub mod downlink;
pub mod echo;
pub mod message;
pub mod metrics;
pub mod pacing;
pub mod playout;
pub mod probe;
pub mod report;
pub mod scenario;
pub mod sign;
pub mod stats;
pub mod stream;
pub mod verify;
