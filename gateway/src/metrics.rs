//! Every metric the gateway exports, in one place.
//!
//! Label sets are enums ([`label_enum!`]): each value is registered once at start-up and its
//! counter handle resolved then, so the per-frame path only does an atomic add on a handle it
//! indexes by the enum (`metrics.dropped[reason]`), never a lookup by name or label text. No
//! stream or call SID is ever a label: those go to logs and Kafka.

use std::marker::PhantomData;
use std::ops::Index;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::Track;

/// Declares a label enum: variants with their label text, `ALL`, `as_str`, `index`.
macro_rules! label_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $var:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $var,)+
        }
        impl $name {
            /// Every value, in declaration order (the order of [`Self::index`]).
            pub const ALL: &'static [$name] = &[$($name::$var,)+];
            /// The label text.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $text,)+ }
            }
            /// Position in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }
        }
        impl LabelValue for $name {
            fn all() -> &'static [Self] { Self::ALL }
            fn text(self) -> &'static str { self.as_str() }
            fn position(self) -> usize { self.index() }
        }
    };
}

/// A label enum (see [`label_enum!`]).
pub trait LabelValue: Copy + 'static {
    /// Every value.
    fn all() -> &'static [Self];
    /// Label text.
    fn text(self) -> &'static str;
    /// Index into [`Self::all`].
    fn position(self) -> usize;
}

/// One counter family with a handle per enum value, resolved at registration.
pub struct Counters<L: LabelValue> {
    handles: Vec<IntCounter>,
    _label: PhantomData<L>,
}

impl<L: LabelValue> Counters<L> {
    fn register(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        registry
            .register(Box::new(vec.clone()))
            .expect("unique metric");
        // Every label value exists from the start, so dashboards see zeros, not gaps.
        let handles = L::all()
            .iter()
            .map(|l| vec.with_label_values(&[l.text()]))
            .collect();
        Counters {
            handles,
            _label: PhantomData,
        }
    }

    /// Sum over every label value (tests, logs).
    pub fn total(&self) -> u64 {
        self.handles.iter().map(IntCounter::get).sum()
    }
}

impl<L: LabelValue> Index<L> for Counters<L> {
    type Output = IntCounter;
    fn index(&self, l: L) -> &IntCounter {
        &self.handles[l.position()]
    }
}

/// One gauge family with a handle per enum value, resolved at registration.
pub struct Gauges<L: LabelValue> {
    handles: Vec<IntGauge>,
    _label: PhantomData<L>,
}

impl<L: LabelValue> Gauges<L> {
    fn register(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        let vec = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        registry
            .register(Box::new(vec.clone()))
            .expect("unique metric");
        let handles = L::all()
            .iter()
            .map(|l| vec.with_label_values(&[l.text()]))
            .collect();
        Gauges {
            handles,
            _label: PhantomData,
        }
    }
}

impl<L: LabelValue> Index<L> for Gauges<L> {
    type Output = IntGauge;
    fn index(&self, l: L) -> &IntGauge {
        &self.handles[l.position()]
    }
}

label_enum! {
    /// Why a frame (one Twilio `media` chunk) was not delivered to Kafka.
    pub enum DropReason {
        /// The in-flight budget (`--max-inflight-bytes`) or the spool was full.
        QueueFull => "queue_full",
        /// The record exceeds the producer's `message.max.bytes`.
        TooLarge => "too_large",
        /// Any other enqueue error (unknown topic, fatal producer state...).
        ProduceError => "produce_error",
        /// The payload decoded to zero bytes.
        EmptyPayload => "empty_payload",
        /// Delivery failed after librdkafka's retries (counted on the delivery report).
        DeliveryFailed => "delivery_failed",
        /// Recovered from the spool for a topic this configuration no longer has.
        Unroutable => "unroutable",
        /// `--overflow drop-oldest` evicted it from the spool to make room for newer audio.
        Evicted => "evicted",
        /// Still queued when the shutdown flush timed out.
        ShutdownTimeout => "shutdown_timeout",
    }
}

label_enum! {
    /// Kinds of protocol error a stream can commit (`gateway_protocol_errors_total{kind}`).
    pub enum ProtocolErrorKind {
        /// Text frame is not UTF-8.
        InvalidUtf8 => "invalid_utf8",
        /// Not JSON.
        InvalidJson => "invalid_json",
        /// JSON but not an object.
        NotAnObject => "not_an_object",
        /// A required field is missing.
        MissingField => "missing_field",
        /// A field has the wrong JSON type.
        WrongType => "wrong_type",
        /// A numeric string is not a number.
        InvalidNumber => "invalid_number",
        /// Unknown `track`.
        InvalidTrack => "invalid_track",
        /// `payload` is not base64.
        InvalidBase64 => "invalid_base64",
        /// `payload` is empty (tolerated, counted).
        EmptyPayload => "empty_payload",
        /// Decoded payload over the cap.
        PayloadTooLarge => "payload_too_large",
        /// `media`/`dtmf`/`mark` before `start`.
        MediaBeforeStart => "media_before_start",
        /// A second `start`.
        DuplicateStart => "duplicate_start",
        /// A data message after `stop`.
        AfterStop => "after_stop",
        /// `streamSid` differs from the one in `start`.
        StreamSidMismatch => "stream_sid_mismatch",
        /// A field the gateway reads appears twice in one object.
        DuplicateField => "duplicate_field",
        /// `mediaFormat` other than μ-law 8 kHz mono.
        UnsupportedMediaFormat => "unsupported_media_format",
        /// A binary frame.
        BinaryFrame => "binary_frame",
        /// A message (or fragmented message) over `--max-message-bytes`.
        MessageTooLarge => "message_too_large",
        /// WebSocket framing violation.
        WebsocketProtocol => "websocket_protocol",
    }
}

label_enum! {
    /// How a stream ended (`gateway_streams_total{outcome}`).
    pub enum StreamOutcome {
        /// Twilio sent `stop`.
        Stopped => "stopped",
        /// The socket closed or broke without `stop`.
        Disconnected => "disconnected",
        /// No frame for `--idle-timeout`.
        IdleTimeout => "idle_timeout",
        /// We closed it for a protocol error.
        ProtocolError => "protocol_error",
        /// Closed by the drain (1001).
        Shutdown => "shutdown",
        /// Closed by `--overflow disconnect` (1013).
        Backpressure => "backpressure",
        /// Closed by a `stop` record on the playback topic (1000).
        StoppedByControl => "stopped_by_control",
    }
}

label_enum! {
    /// Event types published on the events topic (`gateway_events_published_total{type}`).
    pub enum EventType {
        /// `start`.
        Start => "start",
        /// `stop`.
        Stop => "stop",
        /// `dtmf`.
        Dtmf => "dtmf",
        /// `mark`.
        Mark => "mark",
        /// `disconnect`.
        Disconnect => "disconnect",
        /// `error`.
        Error => "error",
        /// `sequence_gap`.
        SequenceGap => "sequence_gap",
        /// `status` (statusCallback).
        Status => "status",
    }
}

label_enum! {
    /// Twilio message events (`gateway_messages_received_total{event}`).
    pub enum MessageEvent {
        /// `connected`.
        Connected => "connected",
        /// `start`.
        Start => "start",
        /// `media`.
        Media => "media",
        /// `dtmf`.
        Dtmf => "dtmf",
        /// `mark`.
        Mark => "mark",
        /// `stop`.
        Stop => "stop",
        /// Anything else (tolerated).
        Unknown => "unknown",
    }
}

label_enum! {
    /// Sequence anomalies (`gateway_sequence_anomalies_total{kind}`).
    pub enum AnomalyKind {
        /// `sequenceNumber` skipped ahead.
        SeqGap => "seq_gap",
        /// `sequenceNumber` went backwards or repeated.
        SeqRegression => "seq_regression",
        /// A chunk's `timestamp` is not where the previous chunk of its track ended.
        TimestampJump => "timestamp_jump",
    }
}

label_enum! {
    /// Connections and requests refused on the stream listener
    /// (`gateway_http_rejections_total{reason}`).
    pub enum HttpRejection {
        /// Unknown path (404).
        NotFound => "not_found",
        /// Not a WebSocket upgrade on the stream path (426).
        NotWebsocket => "not_websocket",
        /// `--max-streams` reached (503).
        Capacity => "capacity",
        /// Draining (503).
        Draining => "draining",
        /// Upgrade headers invalid (400).
        BadUpgrade => "bad_upgrade",
        /// Missing or invalid Twilio signature (403).
        Signature => "signature",
        /// Malformed webhook request (400).
        BadRequest => "bad_request",
        /// Webhook body of another content type (415).
        UnsupportedMediaType => "unsupported_media_type",
        /// Webhook method other than GET/POST (405).
        MethodNotAllowed => "method_not_allowed",
        /// Webhook body over 64 KiB (413).
        BodyTooLarge => "body_too_large",
        /// Request head over `--max-header-bytes` (431, answered by hyper).
        HeaderTooLarge => "header_too_large",
        /// No complete request head (or TLS handshake) within `--handshake-timeout`.
        HandshakeTimeout => "handshake_timeout",
        /// `--max-handshakes-per-second` exceeded (closed at accept).
        HandshakeRate => "handshake_rate",
        /// `--max-concurrent-handshakes` reached (closed at accept).
        HandshakeConcurrency => "handshake_concurrency",
        /// `--max-handshakes-per-source` reached for the client address.
        SourceConcurrency => "source_concurrency",
        /// Client address outside `--allow-cidr` (closed at accept, or 403 behind a proxy).
        NotAllowed => "not_allowed",
        /// TLS handshake failed.
        TlsHandshake => "tls_handshake",
        /// A trusted proxy sent a malformed PROXY protocol header.
        ProxyProtocol => "proxy_protocol",
    }
}

label_enum! {
    /// Why a Twilio signature was refused (`gateway_signature_rejections_total{reason}`).
    pub enum SignatureRejection {
        /// No `X-Twilio-Signature` header.
        Missing => "missing",
        /// The signature matches no configured token and URL form.
        Invalid => "invalid",
    }
}

label_enum! {
    /// librdkafka delivery errors (`gateway_frames_failed_total{error}`), classified from the
    /// error code (never from message text).
    pub enum DeliveryError {
        /// `message.timeout.ms` expired.
        MessageTimedOut => "MessageTimedOut",
        /// Purged from the queue.
        PurgeQueue => "PurgeQueue",
        /// Purged while in flight.
        PurgeInflight => "PurgeInflight",
        /// Topic or partition unknown.
        UnknownTopicOrPartition => "UnknownTopicOrPartition",
        /// Larger than the broker accepts.
        MessageSizeTooLarge => "MessageSizeTooLarge",
        /// Not authorised.
        TopicAuthorizationFailed => "TopicAuthorizationFailed",
        /// The producer hit a fatal error (e.g. an idempotence sequence desync).
        Fatal => "Fatal",
        /// Anything else.
        Other => "other",
    }
}

label_enum! {
    /// Rate-limited log sites (`gateway_log_lines_suppressed_total{site}`).
    pub enum LogSite {
        /// Per-record delivery failures.
        DeliveryFailed => "delivery_failed",
        /// Refused Twilio signatures.
        Signature => "signature",
        /// Refused connections (allow-list, caps, PROXY headers).
        Refused => "refused",
        /// Audio dropped at admission.
        FrameDropped => "frame_dropped",
        /// dtmf / mark events dropped at admission.
        EventDropped => "event_dropped",
        /// Playback records dropped.
        PlaybackDropped => "playback_dropped",
        /// Spool disk errors and corrupt segments.
        Spool => "spool",
    }
}

label_enum! {
    /// Why a playback record was not played (`gateway_playback_dropped_total{reason}`).
    pub enum PlaybackDrop {
        /// The record has no key (streamSid).
        NoKey => "no_key",
        /// No stream with that streamSid on this instance (never was, or long ended).
        NotHeld => "not_held",
        /// The stream ended on this instance.
        Ended => "ended",
        /// The record is on another partition than the stream's `start` event named.
        WrongPartition => "wrong_partition",
        /// A header is missing or invalid (a mark without a name, ...).
        BadHeader => "bad_header",
        /// `type` is none of media, mark, clear, stop.
        UnknownType => "unknown_type",
        /// PCM with an odd number of bytes.
        OddPcmLength => "odd_pcm_length",
        /// `sample_rate` other than 8000.
        UnsupportedSampleRate => "unsupported_sample_rate",
        /// `encoding` other than pcm_s16le or mulaw.
        UnsupportedEncoding => "unsupported_encoding",
        /// A media record without audio.
        EmptyMedia => "empty_media",
        /// The stream's (or the process's) downlink bound is full.
        BufferFull => "buffer_full",
        /// Queued for a stream that ended before it was written.
        StreamClosed => "stream_closed",
        /// `media`, `mark` or `clear` for a one-way (`<Start>`) stream: its `start` announced
        /// an outbound track, and Twilio takes nothing back on such streams.
        OneWayStream => "one_way_stream",
    }
}

label_enum! {
    /// Playback records accepted, by type (`gateway_playback_records_total{type}`).
    pub enum PlaybackType {
        /// Audio.
        Media => "media",
        /// A mark.
        Mark => "mark",
        /// A clear.
        Clear => "clear",
        /// A stop.
        Stop => "stop",
    }
}

label_enum! {
    /// What became of a mark the gateway sent (`gateway_playback_marks_total{outcome}`).
    pub enum MarkOutcome {
        /// Twilio echoed it after playing the audio before it.
        Played => "played",
        /// Twilio returned it because of a clear.
        Cleared => "cleared",
        /// Discarded by a clear before it was sent (the gateway published its event).
        Discarded => "discarded",
    }
}

label_enum! {
    /// Tiers of the spool (`gateway_spool_bytes{tier}`).
    pub enum SpoolTier {
        /// Records held in memory.
        Memory => "memory",
        /// Records in segment files (`--spool-dir`).
        Disk => "disk",
    }
}

label_enum! {
    /// Why the rest of a spool segment was skipped (`gateway_spool_corrupt_segments_total{reason}`).
    pub enum CorruptReason {
        /// Not a segment header (or its checksum is wrong).
        Header => "header",
        /// A format version this build does not read.
        Version => "version",
        /// A frame does not match its checksum.
        Checksum => "checksum",
        /// The file ends inside a frame (a write cut short).
        Truncated => "truncated",
        /// A frame with a valid checksum that does not parse.
        Malformed => "malformed",
        /// The file could not be read.
        Unreadable => "unreadable",
    }
}

label_enum! {
    /// Spool file operations that can fail (`gateway_spool_disk_errors_total{op}`).
    pub enum DiskOp {
        /// Creating a segment file.
        Create => "create",
        /// Appending to a segment.
        Write => "write",
        /// Reading a segment back.
        Read => "read",
        /// fsync of a segment or of the directory.
        Sync => "sync",
        /// Deleting a consumed segment.
        Delete => "delete",
        /// Moving a corrupt segment aside.
        Rename => "rename",
    }
}

/// Sub-millisecond to multi-second buckets for latencies measured in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// All metrics of one gateway process.
pub struct Metrics {
    registry: Registry,
    /// `gateway_open_streams`.
    pub open_streams: IntGauge,
    /// `gateway_open_connections`: WebSocket connections, including ones that never sent `start`.
    pub open_connections: IntGauge,
    /// `gateway_streams_total{outcome}`.
    pub streams: Counters<StreamOutcome>,
    /// `gateway_messages_received_total{event}`.
    pub messages: Counters<MessageEvent>,
    /// `gateway_frames_received_total`: media chunks with a non-empty payload.
    pub frames_received: IntCounter,
    /// `gateway_frames_published_total`: chunks accepted into the Kafka path.
    pub frames_published: IntCounter,
    /// `gateway_frames_published_by_track_total{track}`: [inbound, outbound].
    pub frames_by_track: [IntCounter; Track::COUNT],
    /// `gateway_audio_records_published_total`.
    pub records_published: IntCounter,
    /// `gateway_profile_records_total{outcome="published"}`: output-profile records accepted
    /// into the Kafka path.
    pub profile_records_published: IntCounter,
    /// `gateway_profile_records_total{outcome="delivered"}`.
    pub profile_records_delivered: IntCounter,
    /// `gateway_profile_records_total{outcome="dropped"}`: refused by the budget, evicted,
    /// failed or abandoned at shutdown.
    pub profile_records_dropped: IntCounter,
    /// `gateway_frames_delivered_total`: chunks acknowledged by the broker.
    pub frames_delivered: IntCounter,
    /// `gateway_media_bytes_total`: decoded μ-law bytes received.
    pub media_bytes: IntCounter,
    /// `gateway_frames_dropped_total{reason}`.
    pub dropped: Counters<DropReason>,
    /// `gateway_frames_failed_total{error}` (also counted as `dropped[DeliveryFailed]`).
    pub failed: Counters<DeliveryError>,
    /// `gateway_protocol_errors_total{kind}`.
    pub protocol_errors: Counters<ProtocolErrorKind>,
    /// `gateway_unknown_fields_total`.
    pub unknown_fields: IntCounter,
    /// `gateway_sequence_anomalies_total{kind}`.
    pub anomalies: Counters<AnomalyKind>,
    /// `gateway_events_published_total{type}`.
    pub events_published: Counters<EventType>,
    /// `gateway_events_dropped_total`: events that could not be enqueued.
    pub events_dropped: IntCounter,
    /// `gateway_events_delivered_total`.
    pub events_delivered: IntCounter,
    /// `gateway_events_failed_total`.
    pub events_failed: IntCounter,
    /// `gateway_http_rejections_total{reason}`.
    pub http_rejections: Counters<HttpRejection>,
    /// `gateway_signature_rejections_total{reason}`.
    pub signature_rejections: Counters<SignatureRejection>,
    /// `gateway_log_lines_suppressed_total{site}`.
    pub log_suppressed: Counters<LogSite>,
    /// `gateway_kafka_delivery_latency_seconds`: produce → broker ack.
    pub delivery_latency: Histogram,
    /// `gateway_receive_to_ack_latency_seconds`: WebSocket receive → broker ack.
    pub receive_to_ack: Histogram,
    /// `gateway_runtime_workers`: tokio worker threads serving connections, as the runtime
    /// reports them (`--worker-threads`).
    pub runtime_workers: IntGauge,
    /// `gateway_runtime_io_pace_microseconds`: the read-coalescing sleep (`--io-pace`), 0 = off.
    pub runtime_io_pace_us: IntGauge,
    /// `gateway_runtime_ingest_threads`: thread-per-core ingest threads (`--ingest-threads`);
    /// 0 = connections run on the shared worker pool.
    pub runtime_ingest_threads: IntGauge,
    /// `gateway_runtime_ingest_connections{thread}`: connections (handshakes included) placed
    /// on each ingest thread; children are resolved when the threads start.
    pub runtime_ingest_connections: IntGaugeVec,
    /// `gateway_inflight_bytes`: bytes charged to `--max-inflight-bytes`.
    pub inflight_bytes: IntGauge,
    /// `gateway_inflight_budget_bytes`: the configured budget.
    pub inflight_budget_bytes: IntGauge,
    /// `gateway_kafka_drain_iterations_total`: drain thread wake-ups (one per
    /// `--kafka-drain-interval` while there is work; an idle drain waits for records).
    pub kafka_drain_iterations: IntCounter,
    /// `gateway_kafka_window_records`: records inside librdkafka, not yet acknowledged.
    pub kafka_window_records: IntGauge,
    /// `gateway_kafka_window_bytes`: their charge.
    pub kafka_window_bytes: IntGauge,
    /// `gateway_kafka_queue_messages` (librdkafka statistics).
    pub kafka_queue_messages: IntGauge,
    /// `gateway_kafka_queue_bytes` (librdkafka statistics).
    pub kafka_queue_bytes: IntGauge,
    /// `gateway_kafka_queue_max_bytes`: librdkafka's configured queue limit.
    pub kafka_queue_max_bytes: IntGauge,
    /// `gateway_kafka_broker_rtt_avg_microseconds{broker}`.
    pub kafka_broker_rtt: IntGaugeVec,
    /// `gateway_kafka_broker_up{broker}`.
    pub kafka_broker_up: IntGaugeVec,
    /// `gateway_kafka_fatal_errors_total`: fatal producer errors (each rebuilds the producer).
    pub kafka_fatal_errors: IntCounter,
    /// `gateway_kafka_producer_rebuilds_total`.
    pub kafka_producer_rebuilds: IntCounter,
    /// `gateway_kafka_producer_healthy`: 0 from a fatal error until the rebuilt producer works.
    pub kafka_producer_healthy: IntGauge,
    /// `gateway_playback_records_total{type}`.
    pub playback_records: Counters<PlaybackType>,
    /// `gateway_playback_dropped_total{reason}`.
    pub playback_dropped: Counters<PlaybackDrop>,
    /// `gateway_playback_marks_total{outcome}`.
    pub playback_marks: Counters<MarkOutcome>,
    /// `gateway_playback_bytes_sent_total`: μ-law bytes written to Twilio.
    pub playback_bytes_sent: IntCounter,
    /// `gateway_playback_clears_total`: clears written to Twilio.
    pub playback_clears: IntCounter,
    /// `gateway_playback_queued_bytes`: μ-law bytes queued for all streams.
    pub playback_queued_bytes: IntGauge,
    /// `gateway_playback_latency_seconds`: playback record produced → its first frame written.
    pub playback_latency: Histogram,
    /// `gateway_playback_read_latency_seconds`: playback record produced → read by the
    /// playback consumer (the Kafka part of the playback latency).
    pub playback_read_latency: Histogram,
    /// `gateway_playback_mark_alignment_seconds`: |Twilio's echo of a played mark − where the
    /// gateway's playout timeline put the end of its audio|.
    pub playback_mark_alignment: Histogram,
    /// `gateway_ready`: 1 while `/readyz` answers 200.
    pub ready: IntGauge,
    /// `gateway_draining`: 1 after SIGTERM.
    pub draining: IntGauge,
    /// The spool's metrics.
    pub spool: SpoolMetrics,
}

/// Metrics of the spool (`gateway_spool_*`).
pub struct SpoolMetrics {
    /// `gateway_spool_bytes{tier}`: memory tier at compact cost, disk tier as file bytes.
    pub bytes: Gauges<SpoolTier>,
    /// `gateway_spool_records{tier}`.
    pub records: Gauges<SpoolTier>,
    /// `gateway_spool_oldest_age_milliseconds`: age of the oldest spooled record.
    pub oldest_age_ms: IntGauge,
    /// `gateway_spool_segments`: segment files in use.
    pub segments: IntGauge,
    /// `gateway_spool_quarantined_segments`: corrupt segments moved aside (`*.corrupt`).
    pub quarantined: IntGauge,
    /// `gateway_spool_foreign_files`: files in the spool directory that are not the spool's.
    pub foreign_files: IntGauge,
    /// `gateway_spool_max_bytes`: `--spool-max-bytes` (0 without `--spool-dir`).
    pub max_bytes: IntGauge,
    /// `gateway_spool_spilled_records_total`: records written to the disk tier.
    pub spilled: IntCounter,
    /// `gateway_spool_replayed_records_total`: records read back from the disk tier.
    pub replayed: IntCounter,
    /// `gateway_spool_recovered_records_total`: records read back that an earlier process
    /// wrote (after a restart).
    pub recovered: IntCounter,
    /// `gateway_spool_corrupt_segments_total{reason}`.
    pub corrupt: Counters<CorruptReason>,
    /// `gateway_spool_disk_errors_total{op}`.
    pub disk_errors: Counters<DiskOp>,
    /// `gateway_spool_full_total`: times the disk tier had no room for a spill
    /// (`--spool-max-bytes` reached or the disk full).
    pub full: IntCounter,
}

impl SpoolMetrics {
    fn register(r: &Registry) -> SpoolMetrics {
        SpoolMetrics {
            bytes: Gauges::register(
                r,
                "gateway_spool_bytes",
                "Bytes of spooled records: memory tier at their compact cost, disk tier as segment file bytes.",
                "tier",
            ),
            records: Gauges::register(
                r,
                "gateway_spool_records",
                "Spooled records waiting for the Kafka window, by tier (recovered segments count as they are read).",
                "tier",
            ),
            oldest_age_ms: gauge(
                r,
                "gateway_spool_oldest_age_milliseconds",
                "Age of the oldest record waiting in the spool (0 when empty).",
            ),
            segments: gauge(r, "gateway_spool_segments", "Spool segment files in use."),
            quarantined: gauge(
                r,
                "gateway_spool_quarantined_segments",
                "Corrupt spool segments moved aside as *.corrupt (not counted in gateway_spool_bytes).",
            ),
            foreign_files: gauge(
                r,
                "gateway_spool_foreign_files",
                "Files in the spool directory that are not spool segments (ignored).",
            ),
            max_bytes: gauge(
                r,
                "gateway_spool_max_bytes",
                "Disk tier limit (--spool-max-bytes; 0 without --spool-dir).",
            ),
            spilled: counter(
                r,
                "gateway_spool_spilled_records_total",
                "Records written to the spool's disk tier.",
            ),
            replayed: counter(
                r,
                "gateway_spool_replayed_records_total",
                "Records read back from the spool's disk tier.",
            ),
            recovered: counter(
                r,
                "gateway_spool_recovered_records_total",
                "Records read back from segments an earlier process wrote.",
            ),
            corrupt: Counters::register(
                r,
                "gateway_spool_corrupt_segments_total",
                "Spool segments whose remainder was skipped, by reason.",
                "reason",
            ),
            disk_errors: Counters::register(
                r,
                "gateway_spool_disk_errors_total",
                "Failed spool file operations, by operation.",
                "op",
            ),
            full: counter(
                r,
                "gateway_spool_full_total",
                "Times the disk tier had no room for a spill (--spool-max-bytes reached or the disk full).",
            ),
        }
    }
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

fn gauge_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
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
        let profile_records = IntCounterVec::new(
            Opts::new(
                "gateway_profile_records_total",
                "Output-profile records by outcome (published, delivered, dropped).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        r.register(Box::new(profile_records.clone()))
            .expect("unique metric");
        let by_track = IntCounterVec::new(
            Opts::new(
                "gateway_frames_published_by_track_total",
                "Audio frames accepted into the Kafka path, by track.",
            ),
            &["track"],
        )
        .expect("valid metric");
        r.register(Box::new(by_track.clone()))
            .expect("unique metric");

        Arc::new(Metrics {
            open_streams: gauge(
                &r,
                "gateway_open_streams",
                "Streams between `start` and their end.",
            ),
            open_connections: gauge(&r, "gateway_open_connections", "Open WebSocket connections."),
            streams: Counters::register(
                &r,
                "gateway_streams_total",
                "Ended streams, by outcome.",
                "outcome",
            ),
            messages: Counters::register(
                &r,
                "gateway_messages_received_total",
                "Twilio messages received, by event.",
                "event",
            ),
            frames_received: counter(
                &r,
                "gateway_frames_received_total",
                "Media chunks received (empty payloads included).",
            ),
            frames_published: counter(
                &r,
                "gateway_frames_published_total",
                "Audio frames (Twilio chunks) accepted into the Kafka path.",
            ),
            frames_by_track: [
                by_track.with_label_values(&["inbound"]),
                by_track.with_label_values(&["outbound"]),
            ],
            profile_records_published: profile_records.with_label_values(&["published"]),
            profile_records_delivered: profile_records.with_label_values(&["delivered"]),
            profile_records_dropped: profile_records.with_label_values(&["dropped"]),
            records_published: counter(
                &r,
                "gateway_audio_records_published_total",
                "Audio records accepted into the Kafka path (frames / frames-per-record).",
            ),
            frames_delivered: counter(
                &r,
                "gateway_frames_delivered_total",
                "Audio frames acknowledged by the broker.",
            ),
            media_bytes: counter(
                &r,
                "gateway_media_bytes_total",
                "Decoded μ-law bytes received in media messages.",
            ),
            dropped: Counters::register(
                &r,
                "gateway_frames_dropped_total",
                "Audio frames not delivered to Kafka, by reason.",
                "reason",
            ),
            failed: Counters::register(
                &r,
                "gateway_frames_failed_total",
                "Audio frames whose delivery failed after retries, by librdkafka error.",
                "error",
            ),
            protocol_errors: Counters::register(
                &r,
                "gateway_protocol_errors_total",
                "Protocol errors, by kind.",
                "kind",
            ),
            unknown_fields: counter(
                &r,
                "gateway_unknown_fields_total",
                "Unknown JSON fields seen (tolerated).",
            ),
            anomalies: Counters::register(
                &r,
                "gateway_sequence_anomalies_total",
                "Sequence-number gaps/regressions and media timestamp jumps.",
                "kind",
            ),
            events_published: Counters::register(
                &r,
                "gateway_events_published_total",
                "Records handed to the events topic, by type.",
                "type",
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
            http_rejections: Counters::register(
                &r,
                "gateway_http_rejections_total",
                "Connections and requests on the stream listener refused before any upgrade, by reason.",
                "reason",
            ),
            signature_rejections: Counters::register(
                &r,
                "gateway_signature_rejections_total",
                "Requests refused for a missing or invalid X-Twilio-Signature (upgrades and webhooks).",
                "reason",
            ),
            log_suppressed: Counters::register(
                &r,
                "gateway_log_lines_suppressed_total",
                "Log lines not written because their site exceeded its rate limit.",
                "site",
            ),
            delivery_latency: histogram(
                &r,
                "gateway_kafka_delivery_latency_seconds",
                "Kafka produce to broker acknowledgement.",
            ),
            receive_to_ack: histogram(
                &r,
                "gateway_receive_to_ack_latency_seconds",
                "WebSocket receive of a chunk to broker acknowledgement of its record.",
            ),
            runtime_workers: gauge(
                &r,
                "gateway_runtime_workers",
                "Tokio worker threads serving connections (--worker-threads).",
            ),
            runtime_io_pace_us: gauge(
                &r,
                "gateway_runtime_io_pace_microseconds",
                "Sleep of an idle worker before it waits for I/O (--io-pace); 0 = off.",
            ),
            runtime_ingest_threads: gauge(
                &r,
                "gateway_runtime_ingest_threads",
                "Thread-per-core ingest threads serving connections (--ingest-threads); 0 = the shared worker pool.",
            ),
            runtime_ingest_connections: gauge_vec(
                &r,
                "gateway_runtime_ingest_connections",
                "Connections (handshakes included) running on each ingest thread.",
                "thread",
            ),
            inflight_bytes: gauge(
                &r,
                "gateway_inflight_bytes",
                "Bytes of records between socket read and broker acknowledgement (charged to the budget).",
            ),
            inflight_budget_bytes: gauge(
                &r,
                "gateway_inflight_budget_bytes",
                "The configured in-flight budget (--max-inflight-bytes).",
            ),
            kafka_drain_iterations: counter(
                &r,
                "gateway_kafka_drain_iterations_total",
                "Drain thread iterations (wake-ups): one per --kafka-drain-interval while records are queued or in flight; an idle drain waits for the next record.",
            ),
            kafka_window_records: gauge(
                &r,
                "gateway_kafka_window_records",
                "Records handed to librdkafka and not yet acknowledged.",
            ),
            kafka_window_bytes: gauge(
                &r,
                "gateway_kafka_window_bytes",
                "Budget charge of the records inside librdkafka (--kafka-window-bytes caps it).",
            ),
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
            kafka_broker_rtt: gauge_vec(
                &r,
                "gateway_kafka_broker_rtt_avg_microseconds",
                "Average broker round-trip time over the last statistics window (librdkafka).",
                "broker",
            ),
            kafka_broker_up: gauge_vec(
                &r,
                "gateway_kafka_broker_up",
                "1 when librdkafka reports the broker connection UP.",
                "broker",
            ),
            kafka_fatal_errors: counter(
                &r,
                "gateway_kafka_fatal_errors_total",
                "Fatal producer errors (the producer is rebuilt after each).",
            ),
            kafka_producer_rebuilds: counter(
                &r,
                "gateway_kafka_producer_rebuilds_total",
                "Producers rebuilt after a fatal error.",
            ),
            kafka_producer_healthy: gauge(
                &r,
                "gateway_kafka_producer_healthy",
                "0 from a fatal producer error until the rebuilt producer is in place.",
            ),
            playback_records: Counters::register(
                &r,
                "gateway_playback_records_total",
                "Playback records accepted for a stream, by type.",
                "type",
            ),
            playback_dropped: Counters::register(
                &r,
                "gateway_playback_dropped_total",
                "Playback records not played, by reason.",
                "reason",
            ),
            playback_marks: Counters::register(
                &r,
                "gateway_playback_marks_total",
                "Marks the gateway sent to Twilio, by outcome.",
                "outcome",
            ),
            playback_bytes_sent: counter(
                &r,
                "gateway_playback_bytes_sent_total",
                "μ-law bytes of playback written to Twilio.",
            ),
            playback_clears: counter(
                &r,
                "gateway_playback_clears_total",
                "Clear messages written to Twilio.",
            ),
            playback_queued_bytes: gauge(
                &r,
                "gateway_playback_queued_bytes",
                "μ-law bytes of playback queued for all streams.",
            ),
            playback_latency: histogram(
                &r,
                "gateway_playback_latency_seconds",
                "Playback record produced (its Kafka timestamp) to its first frame written to the socket.",
            ),
            playback_read_latency: histogram(
                &r,
                "gateway_playback_read_latency_seconds",
                "Playback record produced (its Kafka timestamp) to read by the playback consumer.",
            ),
            playback_mark_alignment: histogram(
                &r,
                "gateway_playback_mark_alignment_seconds",
                "Distance between Twilio's echo of a played mark and where the gateway placed the end of its audio.",
            ),
            ready: gauge(&r, "gateway_ready", "1 while /readyz answers 200."),
            draining: gauge(&r, "gateway_draining", "1 once shutdown has begun."),
            spool: SpoolMetrics::register(&r),
            registry: r,
        })
    }

    /// Adds `n` frames that failed delivery with `error` (also a `delivery_failed` drop).
    pub fn frames_failed(&self, error: DeliveryError, n: u64) {
        self.failed[error].inc_by(n);
        self.dropped[DropReason::DeliveryFailed].inc_by(n);
    }

    /// The process registry, for subsystems that register their own families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_value_is_exported_from_the_start() {
        let m = Metrics::new("gw");
        let text = String::from_utf8(m.render()).unwrap();
        for r in DropReason::ALL {
            assert!(text.contains(&format!(
                "gateway_frames_dropped_total{{reason=\"{}\"}} 0",
                r.as_str()
            )));
        }
        for r in HttpRejection::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", r.as_str())));
        }
        m.dropped[DropReason::Evicted].inc_by(3);
        m.frames_failed(DeliveryError::MessageTimedOut, 2);
        assert_eq!(m.dropped.total(), 5);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("gateway_frames_dropped_total{reason=\"evicted\"} 3"));
        assert!(text.contains("gateway_frames_failed_total{error=\"MessageTimedOut\"} 2"));
    }
}
