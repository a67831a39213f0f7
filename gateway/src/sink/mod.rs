//! The Kafka sink: one shared producer for the whole process.
//!
//! - [`Sink`] is a cheap cloneable handle (an `Arc`) held by every connection task; it is the
//!   only thing connections share.
//! - Records are enqueued with librdkafka's non-blocking produce on a `BaseProducer`. Delivery
//!   reports are polled by [`drive`], a tokio task on a short interval, rather than by a
//!   dedicated poll thread: measured at 200 streams, the extra thread's wake-ups cost more CPU
//!   than the polling (see docs/benchmarks.md). A full queue is never waited on: the frame is
//!   dropped and counted, so the socket read loop never blocks on Kafka.
//! - [`context`] handles delivery reports (delivered/failed counters, latency histograms) and
//!   librdkafka statistics (queue depth, broker RTT).
//! - [`topics`] checks and creates topics at start-up.
//! - [`publisher`] adapts the sink to the session's [`crate::session::Publisher`] trait and
//!   builds audio records and their headers without allocating in Rust.
//!
//! ## The in-flight budget
//! Every record handed to librdkafka is charged to one process-wide budget
//! (`--max-inflight-bytes`) at its [`record_cost`] and credited back by its delivery report
//! (success, failure or purge alike), so the gauge `gateway_inflight_bytes` is exactly the audio
//! and events held between our socket reads and broker acknowledgements. librdkafka's own queue
//! limits are set 25 % above the budget as a backstop. When a record does not fit, the
//! [`OverflowPolicy`] decides; nothing ever waits for Kafka.

pub mod context;
pub mod publisher;
pub mod status;
pub mod topics;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use thiserror::Error;

use crate::metrics::Metrics;

pub use context::SinkContext;
pub use publisher::ConnectionPublisher;

/// Errors of the Kafka layer (start-up and shutdown).
#[derive(Debug, Error)]
pub enum SinkError {
    /// librdkafka rejected the configuration or could not create the client.
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The brokers did not answer a metadata request in time.
    #[error("brokers {brokers} unreachable: {detail}")]
    Unreachable {
        /// The bootstrap list.
        brokers: String,
        /// librdkafka's error.
        detail: String,
    },
    /// Topics are missing and creation is disabled.
    #[error("missing topics {0:?} (start with --create-topics to create them)")]
    MissingTopics(Vec<String>),
    /// Creating a topic failed.
    #[error("creating topic {topic}: {detail}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's answer.
        detail: String,
    },
    /// Flushing at shutdown left records unsent.
    #[error("flush timed out with {0} records still queued")]
    FlushTimeout(i32),
}

/// Kafka settings, validated by `config`.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic prefix: `<prefix>.audio.inbound`, `<prefix>.audio.outbound`, `<prefix>.events`.
    pub topic_prefix: String,
    /// Instance id: `gateway` header/field and `client.id`.
    pub gateway_id: String,
    /// Budget for bytes queued in librdkafka (sets `queue.buffering.max.kbytes`).
    pub max_inflight_bytes: u64,
    /// Chunks per audio record (adds the `chunks` header when > 1).
    pub frames_per_record: u32,
    /// What to do when the in-flight budget is full.
    pub overflow: OverflowPolicy,
    /// librdkafka settings passed through, applied after our defaults.
    pub kafka_options: Vec<(String, String)>,
    /// Create missing topics at start-up.
    pub create_topics: bool,
    /// Partitions for created topics.
    pub topic_partitions: i32,
    /// Replication factor for created topics.
    pub topic_replication: i32,
}

impl SinkConfig {
    /// `<prefix>.audio.inbound`, `<prefix>.audio.outbound`.
    pub fn audio_topics(&self) -> [String; 2] {
        [
            format!("{}.audio.inbound", self.topic_prefix),
            format!("{}.audio.outbound", self.topic_prefix),
        ]
    }
    /// `<prefix>.events`.
    pub fn events_topic(&self) -> String {
        format!("{}.events", self.topic_prefix)
    }

    /// The producer configuration: our low-latency, idempotent defaults, then user overrides.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // Backstop limits 25 % above our own budget, which binds first (see module docs).
        let kbytes = (self.max_inflight_bytes * 5 / 4 / 1024).clamp(1, 2_097_151);
        let max_messages =
            (self.max_inflight_bytes * 5 / 4 / RECORD_OVERHEAD).clamp(1000, 10_000_000);
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.gateway_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "none")
            .set("queue.buffering.max.kbytes", kbytes.to_string())
            .set("queue.buffering.max.messages", max_messages.to_string())
            .set("statistics.interval.ms", "1000")
            .set("message.timeout.ms", "300000")
            .set("socket.nagle.disable", "true");
        for (k, v) in &self.kafka_options {
            c.set(k, v);
        }
        c
    }
}

/// Fixed per-record charge on top of key and value: librdkafka's message struct, the 12–13
/// separately allocated headers, the copy in the produce request being built, and allocator
/// slack. Calibrated by measurement: with the broker falling behind, 309,041 queued audio
/// records (354 bytes of key + value each) grew the gateway's RSS by ~665 MB, i.e. ~2.15 KB per
/// record (docs/benchmarks.md), so key + value + 1,792 ≈ what a queued record really costs. A
/// constant keeps the charge computable from key and value alone on both sides (enqueue and
/// delivery report) without walking the headers again.
pub const RECORD_OVERHEAD: u64 = 1792;

/// Budget charge of one record; the delivery report recomputes it from the same key and value.
pub fn record_cost(key_len: usize, value_len: usize) -> u64 {
    (key_len + value_len) as u64 + RECORD_OVERHEAD
}

/// What happens to a new audio record when the in-flight budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Drop the new record (count `queue_full`); everything already accepted is kept and
    /// delivered in order when Kafka catches up. The default.
    DropNewest,
    /// Purge librdkafka's not-yet-sent queue (the oldest audio; each purged chunk counted as
    /// `evicted`) so fresh audio flows as soon as Kafka is back; the new record is dropped too.
    DropOldest,
    /// Drop the new record and close its stream with 1013 (try again later).
    Disconnect,
}

impl OverflowPolicy {
    /// Parses `drop-newest`, `drop-oldest`, `disconnect`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drop-newest" => Some(Self::DropNewest),
            "drop-oldest" => Some(Self::DropOldest),
            "disconnect" => Some(Self::Disconnect),
            _ => None,
        }
    }
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DropNewest => "drop-newest",
            Self::DropOldest => "drop-oldest",
            Self::Disconnect => "disconnect",
        }
    }
}

pub(crate) struct Inner {
    producer: BaseProducer<SinkContext>,
    audio_topics: [String; 2],
    events_topic: String,
    gateway_id: String,
    frames_per_record: u32,
    metrics: Arc<Metrics>,
    broker_reachable: AtomicBool,
    budget: u64,
    overflow: OverflowPolicy,
    /// Monotonic µs of the last purge (drop-oldest), to purge at most every 100 ms.
    last_purge_us: std::sync::atomic::AtomicU64,
    /// In-flight bytes above which `/readyz` fails.
    watermark_bytes: std::sync::atomic::AtomicU64,
}

/// Shared handle to the producer and the topic names.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<Inner>,
}

impl Sink {
    /// Creates the producer (no network I/O yet; librdkafka connects in the background).
    pub fn new(cfg: &SinkConfig, metrics: Arc<Metrics>) -> Result<Sink, SinkError> {
        let ctx = SinkContext::new(metrics.clone());
        let producer: BaseProducer<SinkContext> = cfg.client_config().create_with_context(ctx)?;
        metrics
            .kafka_queue_max_bytes
            .set((cfg.max_inflight_bytes * 5 / 4) as i64);
        metrics
            .inflight_budget_bytes
            .set(cfg.max_inflight_bytes as i64);
        Ok(Sink {
            inner: Arc::new(Inner {
                producer,
                audio_topics: cfg.audio_topics(),
                events_topic: cfg.events_topic(),
                gateway_id: cfg.gateway_id.clone(),
                frames_per_record: cfg.frames_per_record,
                metrics,
                broker_reachable: AtomicBool::new(false),
                budget: cfg.max_inflight_bytes,
                overflow: cfg.overflow,
                last_purge_us: std::sync::atomic::AtomicU64::new(0),
                watermark_bytes: std::sync::atomic::AtomicU64::new(cfg.max_inflight_bytes * 4 / 5),
            }),
        })
    }

    /// The process metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The instance id.
    pub fn gateway_id(&self) -> &str {
        &self.inner.gateway_id
    }

    /// A per-connection publisher.
    pub fn publisher(&self) -> ConnectionPublisher {
        ConnectionPublisher::new(self.clone())
    }

    /// Fetches metadata (blocking, up to `timeout`) and records whether brokers answered.
    pub fn probe_brokers(&self, timeout: Duration) -> bool {
        let ok = self
            .inner
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .is_ok();
        self.inner.broker_reachable.store(ok, Ordering::Relaxed);
        ok
    }

    /// Result of the last [`Sink::probe_brokers`].
    pub fn brokers_reachable(&self) -> bool {
        self.inner.broker_reachable.load(Ordering::Relaxed)
    }

    /// Bytes charged to the in-flight budget right now.
    pub fn inflight_bytes(&self) -> u64 {
        self.inner.metrics.inflight_bytes.get().max(0) as u64
    }

    /// Sets the readiness high watermark as a fraction of the budget.
    pub fn set_readiness_watermark(&self, fraction: f64) {
        let bytes = (self.inner.budget as f64 * fraction) as u64;
        self.inner.watermark_bytes.store(bytes, Ordering::Relaxed);
    }

    /// True while in-flight bytes exceed the readiness watermark.
    pub fn over_watermark(&self) -> bool {
        self.inflight_bytes() > self.inner.watermark_bytes.load(Ordering::Relaxed)
    }

    /// The in-flight budget.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Records still queued in librdkafka (not yet acknowledged).
    pub fn in_flight(&self) -> i32 {
        self.inner.producer.in_flight_count()
    }

    /// Serves queued delivery reports and statistics callbacks without blocking.
    /// `BaseProducer::poll` serves at most one event (one batch of delivery reports) per call
    /// with a zero timeout, so keep polling while calls still deliver reports.
    pub fn poll(&self) {
        let reports = &self.inner.producer.context().reports;
        for _ in 0..1024 {
            let before = reports.load(Ordering::Relaxed);
            self.inner.producer.poll(Duration::ZERO);
            if reports.load(Ordering::Relaxed) == before {
                break;
            }
        }
    }

    /// Blocks until every queued record is acknowledged or failed, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        match self.inner.producer.flush(timeout) {
            Ok(()) => Ok(()),
            Err(_) => Err(SinkError::FlushTimeout(self.in_flight())),
        }
    }
}

/// Polls `sink` every `every` forever: delivery reports, statistics. Spawn once per process.
pub async fn drive(sink: Sink, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sink.poll();
    }
}
