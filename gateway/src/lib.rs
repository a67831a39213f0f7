//! # gateway: Twilio Media Streams → Kafka
//!
//! Terminates Twilio `<Stream>` WebSocket connections, decodes each `media` chunk on an
//! allocation-light path and publishes per-track audio records and per-stream lifecycle events
//! to Kafka.
//!
//! ## Layout (the path of one audio frame, socket to Kafka)
//! - [`app`]: assembly and lifecycle (`run(config, listeners, shutdown)`): start, serve, drain.
//! - [`server`]: accept loop, connection limits, PROXY protocol, TLS, HTTP/1 via hyper, the
//!   checks before the WebSocket upgrade ([`server::upgrade`]).
//! - [`watchdog`]: wraps each socket: idle timeout and keep-alive pings without timers per frame.
//! - [`connection`]: one task per stream: reads frames, feeds the session, ends the stream
//!   (one table from how it ended to close code, event reason, outcome and log level).
//! - [`protocol`]: pure parsing of Twilio JSON ([`protocol::message`]) and audio decoding
//!   ([`protocol::audio`]).
//! - [`session`]: the per-stream state machine; produces audio records and events.
//! - [`sink`]: the Kafka path: admission against the in-flight budget, the drain thread that
//!   alone talks to librdkafka, delivery accounting, topics, client configuration.
//! - [`events`]: the events-topic JSON contract.
//! - [`playback`]: bidirectional streams: the playback topic consumer, per-stream downlinks,
//!   and the writer under each WebSocket that sends media, marks and clears to Twilio.
//! - [`profile`]: output profiles: per-stream resampling (16/24/48 kHz), f32/s16 samples and
//!   stereo assembly of both tracks, published to each profile's own topics.
//! - [`twilio_http`]: `/twilio/status` and `/twilio/voice`.
//! - [`security`]: TLS (wss), Twilio signatures, the handshake rate limit.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` on their own listener.
//! - [`metrics`]: every metric name and label set, registered once.
//! - [`config`]: flags, `GATEWAY_*` env, TOML file; validated before anything binds.
//! - [`shutdown`]: drain coordination and the tracker of tasks that publish.
//! - [`log_limit`], [`http_reply`]: small shared helpers.
//!
//! `gateway tap` (a consumer that writes WAVs) lives with the binary, not in this library.

pub mod admin;
pub mod app;
pub mod config;
pub mod connection;
pub mod events;
pub mod http_reply;
pub mod log_limit;
pub mod metrics;
pub mod playback;
pub mod profile;
pub mod protocol;
pub mod security;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sink;
pub mod twilio_http;
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
