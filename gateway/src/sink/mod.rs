//! The Kafka sink: one shared producer for the whole process.
//!
//! - [`Sink`] is a cheap cloneable handle (an `Arc`) held by every connection task; it is the
//!   only thing connections share.
//! - Records are enqueued with librdkafka's non-blocking produce (`ThreadedProducer`, whose own
//!   thread polls delivery reports). A full queue is never waited on: the frame is dropped and
//!   counted (`queue_full`), so the socket read loop never blocks on Kafka.
//! - [`context`] handles delivery reports (delivered/failed counters, latency histograms) and
//!   librdkafka statistics (queue depth, broker RTT).
//! - [`topics`] checks and creates topics at start-up.
//! - [`publisher`] adapts the sink to the session's [`crate::session::Publisher`] trait and
//!   builds audio records and their headers without allocating in Rust.

pub mod context;
pub mod publisher;
pub mod topics;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{Producer, ThreadedProducer};
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
        let kbytes = (self.max_inflight_bytes / 1024).clamp(1, 2_097_151);
        // Messages cap: ~one record per 320 bytes of budget, so the byte budget binds first.
        let max_messages = (self.max_inflight_bytes / 320).clamp(1000, 10_000_000);
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

struct Inner {
    producer: ThreadedProducer<SinkContext>,
    audio_topics: [String; 2],
    events_topic: String,
    gateway_id: String,
    frames_per_record: u32,
    metrics: Arc<Metrics>,
    broker_reachable: AtomicBool,
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
        let producer: ThreadedProducer<SinkContext> =
            cfg.client_config().create_with_context(ctx)?;
        metrics
            .kafka_queue_max_bytes
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

    /// Records still queued in librdkafka (not yet acknowledged).
    pub fn in_flight(&self) -> i32 {
        self.inner.producer.in_flight_count()
    }

    /// Blocks until every queued record is acknowledged or failed, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        match self.inner.producer.flush(timeout) {
            Ok(()) => Ok(()),
            Err(_) => Err(SinkError::FlushTimeout(self.in_flight())),
        }
    }
}
