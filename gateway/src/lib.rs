//! # gateway: Twilio Media Streams → Kafka
//!
//! Terminates Twilio `<Stream>` WebSocket connections, decodes each `media` chunk (base64 →
//! μ-law → PCM s16le) on an allocation-free path and publishes per-track audio records and
//! per-stream lifecycle events to Kafka.
//!
//! ## Layout (the path of one audio frame, socket to Kafka)
//! - [`server`]: accept loop, HTTP/1 via hyper, path and capacity checks, WebSocket upgrade.
//! - [`watchdog`]: wraps each socket: idle timeout and keep-alive pings without timers per frame.
//! - [`connection`]: one task per stream: reads frames, feeds the session, sends close frames.
//! - [`protocol`]: pure parsing of Twilio JSON ([`protocol::message`]) and audio decoding
//!   ([`protocol::audio`]).
//! - [`session`]: the per-stream state machine; produces audio records and events.
//! - [`events`]: the events-topic JSON contract.
//! - [`sink`]: the shared Kafka producer, record headers, delivery accounting, topic set-up.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` on their own listener.
//! - [`metrics`]: every metric name, registered once.
//! - [`config`]: flags, `GATEWAY_*` env, TOML file; validated before anything binds.
//! - [`shutdown`]: drain coordination for SIGTERM.
//! - [`security`]: TLS (wss), Twilio signatures, `/twilio/status` and `/twilio/voice`,
//!   handshake caps.
//! - [`tap`]: `gateway tap`: consumes the topics, writes one WAV per stream and track.

pub mod admin;
pub mod config;
pub mod connection;
pub mod events;
pub mod metrics;
pub mod protocol;
pub mod security;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sink;
pub mod tap;
pub mod watchdog;

/// Unix time now, in µs.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// µs since the first call in this process (monotonic); used for latency measurements.
pub fn mono_micros() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}
