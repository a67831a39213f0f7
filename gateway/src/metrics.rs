//! Every metric the gateway exports, in one place.
//!
//! Handles are registered once at start-up into [`Metrics`]; the per-frame path only touches
//! pre-resolved `IntCounter`/`Histogram` handles (an atomic add each), never a lookup by name or
//! label. No stream or call SID is ever a label: those go to logs and Kafka.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::Track;

/// Why a frame (one Twilio `media` chunk) was not handed to Kafka, or was lost after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// librdkafka's queue (sized from `--max-inflight-bytes`) was full.
    QueueFull,
    /// The record exceeds the producer's `message.max.bytes`.
    TooLarge,
    /// Any other enqueue error (unknown topic, fatal producer state...).
    ProduceError,
    /// The payload decoded to zero bytes.
    EmptyPayload,
    /// Delivery failed after librdkafka's retries (counted on the delivery callback).
    DeliveryFailed,
    /// The overflow policy evicted an older pending frame to make room.
    Evicted,
}

impl DropReason {
    /// All reasons, for pre-registering label values.
    pub const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::TooLarge,
        DropReason::ProduceError,
        DropReason::EmptyPayload,
        DropReason::DeliveryFailed,
        DropReason::Evicted,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::ProduceError => "produce_error",
            DropReason::EmptyPayload => "empty_payload",
            DropReason::DeliveryFailed => "delivery_failed",
            DropReason::Evicted => "evicted",
        }
    }
}

/// Kinds of protocol error a stream can commit; labels of `gateway_protocol_errors_total`.
pub const PROTOCOL_ERROR_KINDS: &[&str] = &[
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "invalid_number",
    "invalid_track",
    "invalid_base64",
    "empty_payload",
    "payload_too_large",
    "media_before_start",
    "duplicate_start",
    "after_stop",
    "stream_sid_mismatch",
    "unsupported_media_format",
    "binary_frame",
    "message_too_large",
    "websocket_protocol",
];

/// How a stream ended; labels of `gateway_streams_total`.
pub const STREAM_OUTCOMES: &[&str] = &[
    "stopped",
    "disconnected",
    "idle_timeout",
    "protocol_error",
    "shutdown",
    "backpressure",
];

/// Event types published on the events topic.
pub const EVENT_TYPES: &[&str] = &[
    "start",
    "stop",
    "dtmf",
    "mark",
    "disconnect",
    "error",
    "sequence_gap",
    "status",
];

/// Message events counted by `gateway_messages_received_total`.
pub const MESSAGE_EVENTS: &[&str] = &[
    "connected",
    "start",
    "media",
    "dtmf",
    "mark",
    "stop",
    "unknown",
];

/// Sequence anomaly kinds (`gateway_sequence_anomalies_total`).
pub const ANOMALY_KINDS: &[&str] = &["seq_gap", "seq_regression", "timestamp_jump"];

/// HTTP refusals on the stream listener (`gateway_http_rejections_total`).
pub const HTTP_REJECTIONS: &[&str] = &[
    "not_found",
    "not_websocket",
    "capacity",
    "draining",
    "bad_upgrade",
    "signature",
    "bad_request",
    "method_not_allowed",
    "body_too_large",
    "handshake_rate",
    "handshake_concurrency",
    "tls_handshake",
];

/// Why a Twilio signature was refused (`gateway_signature_rejections_total`).
pub const SIGNATURE_REJECTIONS: &[&str] = &["missing", "invalid"];

/// Sub-millisecond to multi-second buckets for latencies measured in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Pre-resolved handles for the per-frame path.
#[derive(Clone)]
pub struct FrameCounters {
    /// `gateway_frames_published_total` (handed to librdkafka).
    pub published: IntCounter,
    /// `gateway_frames_delivered_total` (acknowledged by the broker).
    pub delivered: IntCounter,
    /// `gateway_media_bytes_total` (decoded μ-law bytes received).
    pub media_bytes: IntCounter,
    /// `gateway_records_published_total` (audio records; differs from frames when batching).
    pub records: IntCounter,
}

/// All metrics of one gateway process.
pub struct Metrics {
    registry: Registry,
    /// `gateway_open_streams`.
    pub open_streams: IntGauge,
    /// `gateway_open_connections`: WebSocket connections, including ones that never sent `start`.
    pub open_connections: IntGauge,
    streams_total: IntCounterVec,
    /// Per-event message counters in [`MESSAGE_EVENTS`] order.
    pub messages_by_event: Vec<IntCounter>,
    /// Frame counters used on the hot path.
    pub frames: FrameCounters,
    /// Frames per track published: [inbound, outbound].
    pub frames_by_track: [IntCounter; Track::COUNT],
    frames_dropped: IntCounterVec,
    frames_failed: IntCounterVec,
    protocol_errors: IntCounterVec,
    /// `gateway_unknown_fields_total`.
    pub unknown_fields: IntCounter,
    anomalies: IntCounterVec,
    events_published: IntCounterVec,
    /// `gateway_events_dropped_total`.
    pub events_dropped: IntCounter,
    /// `gateway_events_delivered_total`.
    pub events_delivered: IntCounter,
    /// `gateway_events_failed_total`.
    pub events_failed: IntCounter,
    http_rejections: IntCounterVec,
    signature_rejections: IntCounterVec,
    /// `gateway_kafka_delivery_latency_seconds`: enqueue → broker ack.
    pub delivery_latency: Histogram,
    /// `gateway_receive_to_ack_latency_seconds`: WebSocket receive → broker ack.
    pub receive_to_ack: Histogram,
    /// `gateway_inflight_bytes`: bytes charged to `--max-inflight-bytes` (socket → broker ack).
    pub inflight_bytes: IntGauge,
    /// `gateway_inflight_budget_bytes`: the configured budget.
    pub inflight_budget_bytes: IntGauge,
    /// `gateway_kafka_queue_messages`.
    pub kafka_queue_messages: IntGauge,
    /// `gateway_kafka_queue_bytes`.
    pub kafka_queue_bytes: IntGauge,
    /// `gateway_kafka_queue_max_bytes`.
    pub kafka_queue_max_bytes: IntGauge,
    /// `gateway_kafka_broker_rtt_avg_microseconds{broker}`.
    pub kafka_broker_rtt: IntGaugeVec,
    /// `gateway_kafka_broker_up{broker}`: 1 when librdkafka reports the broker `UP`.
    pub kafka_broker_up: IntGaugeVec,
    /// `gateway_ready`: 1 while `/readyz` answers 200.
    pub ready: IntGauge,
    /// `gateway_draining`: 1 after SIGTERM.
    pub draining: IntGauge,
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    // Pre-create every label value so dashboards see zeros instead of missing series.
    for value in values {
        v.with_label_values(&[value]);
    }
    v
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    /// Registers every metric. `gateway_id` only feeds `gateway_build_info`.
    pub fn new(gateway_id: &str) -> Arc<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let build = IntGaugeVec::new(
            Opts::new("gateway_build_info", "Build information; always 1."),
            &["version", "gateway"],
        )
        .expect("valid metric");
        r.register(Box::new(build.clone())).expect("unique metric");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), gateway_id])
            .set(1);

        let messages = counter_vec(
            &r,
            "gateway_messages_received_total",
            "Twilio messages received, by event.",
            "event",
            MESSAGE_EVENTS,
        );
        let messages_by_event = MESSAGE_EVENTS
            .iter()
            .map(|e| messages.with_label_values(&[e]))
            .collect();
        let frames_by_track_vec = counter_vec(
            &r,
            "gateway_frames_published_by_track_total",
            "Audio frames handed to Kafka, by track.",
            "track",
            &["inbound", "outbound"],
        );
        let kafka_broker_rtt = IntGaugeVec::new(
            Opts::new(
                "gateway_kafka_broker_rtt_avg_microseconds",
                "Average broker round-trip time over the last statistics window (librdkafka).",
            ),
            &["broker"],
        )
        .expect("valid metric");
        r.register(Box::new(kafka_broker_rtt.clone()))
            .expect("unique metric");
        let kafka_broker_up = IntGaugeVec::new(
            Opts::new(
                "gateway_kafka_broker_up",
                "1 when librdkafka reports the broker connection UP.",
            ),
            &["broker"],
        )
        .expect("valid metric");
        r.register(Box::new(kafka_broker_up.clone()))
            .expect("unique metric");

        Arc::new(Metrics {
            open_streams: gauge(
                &r,
                "gateway_open_streams",
                "Streams between `start` and their end.",
            ),
            open_connections: gauge(
                &r,
                "gateway_open_connections",
                "Open WebSocket connections.",
            ),
            streams_total: counter_vec(
                &r,
                "gateway_streams_total",
                "Ended streams, by outcome.",
                "outcome",
                STREAM_OUTCOMES,
            ),
            messages_by_event,
            frames: FrameCounters {
                published: counter(
                    &r,
                    "gateway_frames_published_total",
                    "Audio frames (Twilio chunks) handed to the Kafka producer.",
                ),
                delivered: counter(
                    &r,
                    "gateway_frames_delivered_total",
                    "Audio frames acknowledged by the broker.",
                ),
                media_bytes: counter(
                    &r,
                    "gateway_media_bytes_total",
                    "Decoded μ-law bytes received in media messages.",
                ),
                records: counter(
                    &r,
                    "gateway_audio_records_published_total",
                    "Audio records handed to the producer (frames / frames-per-record).",
                ),
            },
            frames_by_track: [
                frames_by_track_vec.with_label_values(&["inbound"]),
                frames_by_track_vec.with_label_values(&["outbound"]),
            ],
            frames_dropped: counter_vec(
                &r,
                "gateway_frames_dropped_total",
                "Audio frames not delivered to Kafka, by reason.",
                "reason",
                &DropReason::ALL.map(DropReason::as_str),
            ),
            frames_failed: counter_vec(
                &r,
                "gateway_frames_failed_total",
                "Audio frames whose delivery failed after retries, by librdkafka error code.",
                "error",
                &[
                    "MessageTimedOut",
                    "PurgeQueue",
                    "PurgeInflight",
                    "UnknownTopicOrPartition",
                    "MessageSizeTooLarge",
                    "TopicAuthorizationFailed",
                ],
            ),
            protocol_errors: counter_vec(
                &r,
                "gateway_protocol_errors_total",
                "Protocol errors, by kind.",
                "kind",
                PROTOCOL_ERROR_KINDS,
            ),
            unknown_fields: counter(
                &r,
                "gateway_unknown_fields_total",
                "Unknown JSON fields seen (tolerated).",
            ),
            anomalies: counter_vec(
                &r,
                "gateway_sequence_anomalies_total",
                "Sequence-number gaps/regressions and media timestamp jumps.",
                "kind",
                ANOMALY_KINDS,
            ),
            events_published: counter_vec(
                &r,
                "gateway_events_published_total",
                "Records handed to the events topic, by type.",
                "type",
                EVENT_TYPES,
            ),
            events_dropped: counter(
                &r,
                "gateway_events_dropped_total",
                "Event records that could not be enqueued.",
            ),
            events_delivered: counter(
                &r,
                "gateway_events_delivered_total",
                "Event records acknowledged by the broker.",
            ),
            events_failed: counter(
                &r,
                "gateway_events_failed_total",
                "Event records whose delivery failed after retries.",
            ),
            http_rejections: counter_vec(
                &r,
                "gateway_http_rejections_total",
                "Requests on the stream listener refused before any upgrade, by reason.",
                "reason",
                HTTP_REJECTIONS,
            ),
            signature_rejections: counter_vec(
                &r,
                "gateway_signature_rejections_total",
                "Requests refused for a missing or invalid X-Twilio-Signature (upgrades and webhooks).",
                "reason",
                SIGNATURE_REJECTIONS,
            ),
            delivery_latency: histogram(
                &r,
                "gateway_kafka_delivery_latency_seconds",
                "Kafka enqueue to broker acknowledgement.",
            ),
            receive_to_ack: histogram(
                &r,
                "gateway_receive_to_ack_latency_seconds",
                "WebSocket receive of a chunk to broker acknowledgement of its record.",
            ),
            inflight_bytes: gauge(&r, "gateway_inflight_bytes", "Bytes of records between socket read and broker acknowledgement (charged to the budget)."),
            inflight_budget_bytes: gauge(&r, "gateway_inflight_budget_bytes", "The configured in-flight budget (--max-inflight-bytes)."),
            kafka_queue_messages: gauge(
                &r,
                "gateway_kafka_queue_messages",
                "Messages in librdkafka's producer queue.",
            ),
            kafka_queue_bytes: gauge(
                &r,
                "gateway_kafka_queue_bytes",
                "Bytes in librdkafka's producer queue.",
            ),
            kafka_queue_max_bytes: gauge(
                &r,
                "gateway_kafka_queue_max_bytes",
                "Configured limit of librdkafka's producer queue.",
            ),
            kafka_broker_rtt,
            kafka_broker_up,
            ready: gauge(&r, "gateway_ready", "1 while /readyz answers 200."),
            draining: gauge(&r, "gateway_draining", "1 once shutdown has begun."),
            registry: r,
        })
    }

    /// Counter for a stream outcome (must be one of [`STREAM_OUTCOMES`]).
    pub fn stream_ended(&self, outcome: &'static str) {
        self.streams_total.with_label_values(&[outcome]).inc();
    }

    /// Counter for a protocol error kind (one of [`PROTOCOL_ERROR_KINDS`]). Error path only.
    pub fn protocol_error(&self, kind: &'static str) {
        self.protocol_errors.with_label_values(&[kind]).inc();
    }

    /// Counter for a sequence anomaly kind. Rare path.
    pub fn anomaly(&self, kind: &'static str) {
        self.anomalies.with_label_values(&[kind]).inc();
    }

    /// Adds `n` dropped frames with `reason`.
    pub fn frames_dropped(&self, reason: DropReason, n: u64) {
        self.frames_dropped
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }

    /// Adds `n` frames whose delivery failed with librdkafka error `code`.
    pub fn frames_failed(&self, code: &str, n: u64) {
        self.frames_failed.with_label_values(&[code]).inc_by(n);
        self.frames_dropped(DropReason::DeliveryFailed, n);
    }

    /// Counts one event record of `kind` handed to the producer.
    pub fn event_published(&self, kind: &'static str) {
        self.events_published.with_label_values(&[kind]).inc();
    }

    /// Counts one Twilio signature refusal (`missing` or `invalid`).
    pub fn signature_rejected(&self, reason: &'static str) {
        self.signature_rejections.with_label_values(&[reason]).inc();
    }

    /// Counts one HTTP refusal.
    pub fn http_rejected(&self, reason: &'static str) {
        self.http_rejections.with_label_values(&[reason]).inc();
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Current value of `gateway_frames_dropped_total{reason}` (tests, readiness logic).
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.frames_dropped
            .with_label_values(&[reason.as_str()])
            .get()
    }
}
