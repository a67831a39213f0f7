//! The Kafka sink: everything between a session's records and the broker.
//!
//! ## The path of a record
//! 1. [`publisher::ConnectionPublisher`] (one per connection, implements the session's
//!    [`crate::session::Publisher`]) admits audio against the [`budget::Budget`] with a
//!    compare-and-swap, wraps it in a compact [`record::SpoolRecord`] (μ-law payload + 64 bytes
//!    of metadata; SIDs live once per stream in a [`stream::StreamEntry`]) and sends it down a
//!    lock-free channel. That is all a connection task does for Kafka: no librdkafka call, no
//!    header building, no wake-up of another thread.
//! 2. [`drain::Drain`], one thread, routes records into librdkafka through a bounded window,
//!    keeps what does not fit in the spool (per-stream order), builds headers, expands μ-law to
//!    PCM, settles delivery reports, renders terminal events, and rebuilds the producer after a
//!    fatal error.
//! 3. [`producer::Producer`] wraps librdkafka (topic handles, `rd_kafka_produceva`);
//!    [`delivery::DeliveryContext`] turns its callbacks into notes for the drain.
//!
//! Also here: [`kafka_config`] (client settings and secrets, shared by every Kafka client),
//! [`topics`] (start-up check and creation), [`probe`] (broker metadata for `/readyz`).

pub mod budget;
pub mod delivery;
pub mod drain;
pub mod kafka_config;
pub mod partitioning;
pub mod probe;
pub mod producer;
pub mod profiles;
pub mod publisher;
pub mod record;
pub mod spool;
pub mod stream;
pub mod topics;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use thiserror::Error;

use crate::events::{status_json, StatusFields, StreamIds};
use crate::metrics::{EventType, Metrics};
use crate::protocol::Track;

use self::budget::Budget;
use self::delivery::DeliveryContext;
use self::drain::{Control, Drain, DrainParams, FinishReport};
use self::kafka_config::KafkaOptions;
use self::producer::Producer;
use self::record::{SpoolRecord, RECORD_OVERHEAD};
use self::stream::StreamEntry;

pub use publisher::ConnectionPublisher;

/// Errors of the Kafka layer (start-up and shutdown).
#[derive(Debug, Error)]
pub enum SinkError {
    /// librdkafka rejected the configuration or could not create a client (secrets redacted).
    #[error("kafka client: {0}")]
    Client(String),
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
    /// The drain thread is gone (after shutdown).
    #[error("the kafka drain thread has stopped")]
    Stopped,
    /// The spool directory cannot be used.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

/// What goes into the value of a default-profile audio record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioEncoding {
    /// Signed 16-bit little-endian PCM, 8 kHz mono (the default).
    PcmS16le,
    /// The raw G.711 μ-law bytes Twilio sent.
    Mulaw,
}

impl AudioEncoding {
    /// The `encoding` header value.
    pub fn header_value(self) -> &'static str {
        match self {
            AudioEncoding::PcmS16le => "pcm_s16le",
            AudioEncoding::Mulaw => "mulaw",
        }
    }
}

/// What happens to new audio when the budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Drop the new chunk (count `queue_full`); everything already accepted is kept and
    /// delivered in order when Kafka catches up. The default.
    DropNewest,
    /// Accept the new chunk and evict the oldest spooled audio (count `evicted`); events are
    /// never evicted.
    DropOldest,
    /// Drop the new chunk and close its stream with 1013 (try again later).
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

/// Slot of the events topic.
pub const EVENTS_SLOT: u8 = 0;
/// Slot of the default-profile inbound audio topic.
pub const INBOUND_SLOT: u8 = 1;
/// Slot of the default-profile outbound audio topic.
pub const OUTBOUND_SLOT: u8 = 2;

/// What a topic slot carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `<prefix>.events`.
    Events,
    /// An audio topic.
    Audio {
        /// Which track.
        track: Track,
        /// `encoding` header.
        encoding: &'static str,
        /// `sample_rate` header.
        sample_rate: u32,
        /// `channels` header.
        channels: u32,
        /// `profile` header (named profiles only).
        profile: Option<String>,
        /// Records hold μ-law that the drain expands to PCM s16le.
        expand_mulaw: bool,
    },
}

/// One topic the gateway produces to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Full topic name.
    pub name: String,
    /// What it carries.
    pub kind: TopicKind,
}

impl TopicSpec {
    /// `inbound`/`outbound` for audio topics, `events` otherwise (replay index label).
    pub fn track_label(&self) -> &'static str {
        match &self.kind {
            TopicKind::Audio {
                track, channels, ..
            } => profiles::track_header(*channels, *track),
            TopicKind::Events => "events",
        }
    }
}

/// The topics by slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    specs: Vec<TopicSpec>,
}

impl Topics {
    /// The default topic set for `prefix`.
    pub fn new(prefix: &str, encoding: AudioEncoding) -> Topics {
        let audio = |track: Track| TopicSpec {
            name: format!("{prefix}.audio.{}", track.as_str()),
            kind: TopicKind::Audio {
                track,
                encoding: encoding.header_value(),
                sample_rate: 8000,
                channels: 1,
                profile: None,
                expand_mulaw: encoding == AudioEncoding::PcmS16le,
            },
        };
        Topics {
            specs: vec![
                TopicSpec {
                    name: format!("{prefix}.events"),
                    kind: TopicKind::Events,
                },
                audio(Track::Inbound),
                audio(Track::Outbound),
            ],
        }
    }

    /// The spec of `slot`.
    pub fn get(&self, slot: u8) -> Option<&TopicSpec> {
        self.specs.get(slot as usize)
    }

    /// The kind of `slot`.
    pub fn kind(&self, slot: u8) -> Option<&TopicKind> {
        self.get(slot).map(|s| &s.kind)
    }

    /// Every topic name, in slot order.
    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// True with no topics.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The slot of a default-profile audio track.
    pub fn audio_slot(track: Track) -> u8 {
        match track {
            Track::Inbound => INBOUND_SLOT,
            Track::Outbound => OUTBOUND_SLOT,
        }
    }
}

/// Kafka settings, validated by `config`.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Brokers, security and librdkafka overrides, shared by every client.
    pub kafka: KafkaOptions,
    /// Topic prefix: `<prefix>.audio.inbound`, `<prefix>.audio.outbound`, `<prefix>.events`.
    pub topic_prefix: String,
    /// Instance id: `gateway` header/field and `client.id`.
    pub gateway_id: String,
    /// `--max-inflight-bytes`: memory for queued and in-flight records.
    pub max_inflight_bytes: u64,
    /// `--kafka-window-bytes`: the part of the budget librdkafka may hold.
    pub window_bytes: u64,
    /// Chunks per audio record (adds the `chunks` header when > 1).
    pub frames_per_record: u32,
    /// Value encoding of the default audio topics.
    pub audio_encoding: AudioEncoding,
    /// What to do when the budget is full.
    pub overflow: OverflowPolicy,
    /// Create missing topics at start-up.
    pub create_topics: bool,
    /// Partitions for created topics.
    pub topic_partitions: i32,
    /// Replication factor for created topics.
    pub topic_replication: i32,
    /// Which partitions this instance writes to (`--partitions-per-instance`).
    pub partitioning: partitioning::Partitioning,
    /// Longest sleep of the drain thread between iterations.
    pub drain_interval: Duration,
    /// Fraction of the budget (and of `--spool-max-bytes`) above which `/readyz` fails.
    pub readiness_watermark: f64,
    /// The spool (`--spool-*`).
    pub spool: spool::SpoolConfig,
    /// Output profiles (`--profile`), each on its own topics after the default ones.
    pub profiles: Vec<crate::profile::ProfileSpec>,
}

/// Largest window librdkafka's queue limits can describe (`queue.buffering.max.kbytes` is
/// clamped near 2 GiB; its queue limit sits 25 % above the window).
pub const MAX_WINDOW_BYTES: u64 = 1 << 30;

impl SinkConfig {
    /// Defaults for `brokers` (tests and embedders).
    pub fn new(brokers: &str, topic_prefix: &str) -> SinkConfig {
        SinkConfig {
            kafka: KafkaOptions::new(brokers),
            topic_prefix: topic_prefix.to_owned(),
            gateway_id: "gateway".to_owned(),
            max_inflight_bytes: 256 << 20,
            window_bytes: 32 << 20,
            frames_per_record: 1,
            audio_encoding: AudioEncoding::PcmS16le,
            overflow: OverflowPolicy::DropNewest,
            create_topics: true,
            topic_partitions: 6,
            topic_replication: 1,
            partitioning: partitioning::Partitioning::Instance {
                seed: 0,
                per_instance: 1,
            },
            drain_interval: Duration::from_millis(1),
            readiness_watermark: 0.8,
            spool: spool::SpoolConfig::memory_only(),
            profiles: Vec::new(),
        }
    }

    /// The topics by slot: the default ones, then each profile's.
    pub fn topics(&self) -> Topics {
        let mut topics = Topics::new(&self.topic_prefix, self.audio_encoding);
        topics.add_profiles(&self.topic_prefix, &self.profiles);
        topics
    }

    /// Each profile with its topic slots (as in [`topics`](Self::topics)).
    pub fn profile_slots(&self) -> Vec<profiles::ProfileSlot> {
        Topics::new(&self.topic_prefix, self.audio_encoding)
            .add_profiles(&self.topic_prefix, &self.profiles)
    }

    /// The effective window (never more than half the budget).
    pub fn effective_window(&self) -> u64 {
        self.window_bytes.min(self.max_inflight_bytes / 2)
    }

    /// The producer configuration: our low-latency, idempotent defaults, then user overrides.
    pub fn producer_config(&self) -> ClientConfig {
        // librdkafka's own limits sit 25 % above the window, which the drain never exceeds:
        // they are a backstop, never the binding limit.
        let window = self.effective_window();
        let kbytes = (window * 5 / 4 / 1024).clamp(1024, 2_097_151);
        let messages = (window * 5 / 4 / RECORD_OVERHEAD).clamp(1000, 10_000_000);
        self.kafka.client_config_with(&[
            ("client.id", self.gateway_id.clone()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            // Measured curve at 500 both-track streams (docs/benchmarks.md, decision 32): 5 ms
            // saturates the broker with produce requests; 20 ms costs the least CPU and keeps p99
            // lowest among the values tried.
            ("linger.ms", "20".into()),
            ("compression.type", "none".into()),
            ("queue.buffering.max.kbytes", kbytes.to_string()),
            ("queue.buffering.max.messages", messages.to_string()),
            ("statistics.interval.ms", "1000".into()),
            // The gateway holds the backlog, not librdkafka: records in the window wait for
            // the broker as long as it takes (0 = no timeout); the spool and the overflow
            // policy bound memory.
            ("message.timeout.ms", "0".into()),
            ("socket.nagle.disable", "true".into()),
            // Topics are created by the gateway with the configured partitions, or required
            // (`--create-topics=false`): never auto-created by a metadata request.
            ("allow.auto.create.topics", "false".into()),
        ])
    }
}

/// State shared by the sink handles and the drain thread.
pub struct Shared {
    /// The in-flight budget.
    pub budget: Arc<Budget>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Kafka settings (for redaction in logs).
    pub kafka: KafkaOptions,
    /// Instance id.
    pub gateway_id: String,
    /// Full-budget policy.
    pub overflow: OverflowPolicy,
    /// `--frames-per-record`.
    pub frames_per_record: u32,
    /// Topics by slot.
    pub topics: Topics,
    /// Output profiles and their topic slots (empty: none configured).
    pub profiles: Vec<profiles::ProfileSlot>,
    /// False from a fatal producer error until the producer is rebuilt.
    pub producer_healthy: AtomicBool,
    /// Set once librdkafka's statistics first show the producer able to send (broker up,
    /// producer id assigned); `/readyz` waits for it at start-up. Set from the start when
    /// statistics are turned off (`statistics.interval.ms=0`), since nothing would set it.
    pub producer_warm: Arc<AtomicBool>,
    /// Result of the last broker probe.
    pub brokers_reachable: AtomicBool,
    /// The spool's disk tier is above the readiness watermark (set by the drain thread).
    pub spool_over_watermark: AtomicBool,
    next_stream: AtomicU64,
    ingress: Sender<SpoolRecord>,
    control: Mutex<Sender<Control>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Cloneable handle to the Kafka path.
#[derive(Clone)]
pub struct Sink {
    shared: Arc<Shared>,
}

impl Sink {
    /// Creates the producer and starts the drain thread (librdkafka connects in the
    /// background; nothing here waits for the brokers).
    pub fn start(cfg: &SinkConfig, metrics: Arc<Metrics>) -> Result<Sink, SinkError> {
        let topics = cfg.topics();
        match cfg.partitioning {
            partitioning::Partitioning::Key => {
                tracing::info!("uplink partitions: librdkafka's key hash over every partition")
            }
            partitioning::Partitioning::Instance { seed, per_instance } => tracing::info!(
                seed,
                per_instance,
                "uplink partitions: {per_instance} per topic from partition \
                 (seed mod partitions) x {per_instance}"
            ),
        }
        let producer_config = cfg.producer_config();
        let producer_warm = Arc::new(AtomicBool::new(!delivery::statistics_enabled(
            &producer_config,
        )));
        let producer = Producer::new(
            &producer_config,
            DeliveryContext::new(metrics.clone(), producer_warm.clone()),
            &topics.names(),
            cfg.partitioning,
        )
        .map_err(|e| SinkError::Client(cfg.kafka.describe_error(&e)))?;
        let window = cfg.effective_window();
        // What `drop-oldest` may borrow while the drain evicts (within one drain interval).
        let overdraft = (cfg.max_inflight_bytes / 16).min(64 << 20);
        let budget = Budget::new(
            cfg.max_inflight_bytes,
            window,
            overdraft,
            metrics.inflight_bytes.clone(),
        );
        budget.set_watermark(cfg.readiness_watermark);
        let budget = Arc::new(budget);
        metrics
            .inflight_budget_bytes
            .set(cfg.max_inflight_bytes as i64);
        metrics.kafka_queue_max_bytes.set((window * 5 / 4) as i64);
        metrics.kafka_producer_healthy.set(1);
        let (tx, rx) = channel();
        let (ctx, crx) = channel();
        let shared = Arc::new(Shared {
            budget,
            metrics,
            kafka: cfg.kafka.clone(),
            gateway_id: cfg.gateway_id.clone(),
            overflow: cfg.overflow,
            frames_per_record: cfg.frames_per_record,
            topics: topics.clone(),
            profiles: cfg.profile_slots(),
            producer_healthy: AtomicBool::new(true),
            producer_warm,
            brokers_reachable: AtomicBool::new(false),
            spool_over_watermark: AtomicBool::new(false),
            next_stream: AtomicU64::new(1),
            ingress: tx,
            control: Mutex::new(ctx),
            thread: Mutex::new(None),
        });
        let spool = spool::Spool::open(
            cfg.spool.clone(),
            &shared.topics,
            shared.budget.clone(),
            shared.metrics.clone(),
        )?;
        let drain = Drain::new(
            DrainParams {
                tick: cfg.drain_interval,
                overflow: cfg.overflow,
                gateway_id: cfg.gateway_id.clone(),
                frames_per_record: cfg.frames_per_record,
                topics,
                producer_config,
                partitioning: cfg.partitioning,
                readiness_watermark: cfg.readiness_watermark,
            },
            shared.clone(),
            rx,
            crx,
            producer,
            spool,
        );
        let handle = std::thread::Builder::new()
            .name("kafka-drain".into())
            .spawn(move || drain.run())
            .map_err(|e| SinkError::Client(format!("spawning the drain thread: {e}")))?;
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(Sink { shared })
    }

    /// Shared state (budget, metrics, topics).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The process metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The instance id.
    pub fn gateway_id(&self) -> &str {
        &self.shared.gateway_id
    }

    /// The budget.
    pub fn budget(&self) -> &Budget {
        &self.shared.budget
    }

    /// A per-connection publisher.
    pub fn publisher(&self) -> ConnectionPublisher {
        ConnectionPublisher::new(self.clone())
    }

    /// A fresh stream entry.
    pub fn new_stream(&self, ids: StreamIds) -> Arc<StreamEntry> {
        let n = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        Arc::new(StreamEntry::new(ids, n, self.shared.topics.len()))
    }

    pub(crate) fn send(&self, r: SpoolRecord) -> Result<(), SpoolRecord> {
        self.shared.ingress.send(r).map_err(|e| e.0)
    }

    /// Enqueues one `status` record (Twilio statusCallback) on the events topic, key =
    /// StreamSid. Charged to the budget but never refused for it.
    pub fn publish_status(&self, fields: &StatusFields<'_>) -> Result<(), SinkError> {
        let json = status_json(fields, &self.shared.gateway_id, crate::unix_micros());
        // A stand-alone entry: the key, no accounting (its own number: the spool tells
        // streams apart by number).
        let number = self.shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(StreamEntry::new(
            StreamIds {
                stream_sid: fields.stream_sid.to_owned(),
                call_sid: fields.call_sid.unwrap_or("").to_owned(),
                account_sid: fields.account_sid.unwrap_or("").to_owned(),
            },
            number,
            0,
        ));
        let r = SpoolRecord::event(Some(entry), EventType::Status, &json, crate::unix_micros());
        let cost = r.compact_cost();
        self.shared.budget.charge(cost);
        match self.send(r) {
            Ok(()) => {
                self.shared.metrics.events_published[EventType::Status].inc();
                Ok(())
            }
            Err(_) => {
                self.shared.budget.credit(cost);
                self.shared.metrics.events_dropped.inc();
                Err(SinkError::Stopped)
            }
        }
    }

    /// Records audio the gateway played into the call (bidirectional streams) as an outbound
    /// audio record with `source: playback`, at `timestamp_ms` on the stream's timeline;
    /// `first_frame` numbers its first 20 ms frame among the stream's played frames (its
    /// `seq` and `chunk`), `frames` how many it holds (`chunks`). Admitted like any audio;
    /// when it does not fit it is counted, not recorded.
    pub fn publish_playback_audio(
        &self,
        entry: &Arc<StreamEntry>,
        ulaw: &[u8],
        timestamp_ms: u64,
        first_frame: u64,
        frames: u32,
    ) {
        let n = first_frame;
        let shared = &self.shared;
        let cost = ulaw.len() as u64 + record::COMPACT_OVERHEAD;
        if !shared
            .budget
            .try_admit(cost, shared.overflow == OverflowPolicy::DropOldest)
        {
            entry
                .playback_dropped
                .fetch_add(frames as u64, Ordering::Relaxed);
            return;
        }
        entry.outstanding.fetch_add(1, Ordering::Relaxed);
        entry
            .playback_recorded
            .fetch_add(frames as u64, Ordering::Relaxed);
        let r = SpoolRecord {
            stream: Some(entry.clone()),
            payload: ulaw.into(),
            seq: n,
            timestamp_ms,
            received_at_us: crate::unix_micros(),
            chunk: n.min(u32::MAX as u64) as u32,
            chunks: frames.min(u16::MAX as u32) as u16,
            slot: OUTBOUND_SLOT,
            kind: record::Kind::Audio,
            aux: Track::Outbound.index() as u8,
            flags: record::FLAG_PLAYBACK,
        };
        if self.send(r).is_err() {
            shared.budget.credit(cost);
            entry.outstanding.fetch_sub(1, Ordering::Relaxed);
            entry
                .playback_recorded
                .fetch_sub(frames as u64, Ordering::Relaxed);
            entry
                .playback_dropped
                .fetch_add(frames as u64, Ordering::Relaxed);
        }
    }

    /// Enqueues an event of `entry`'s stream from outside its session (e.g. a mark a clear
    /// discarded); ordered with the stream's other records.
    pub fn publish_stream_event(&self, entry: &Arc<StreamEntry>, ev: &crate::events::Event<'_>) {
        let mut json = Vec::with_capacity(256);
        crate::events::write_json(ev, &self.shared.gateway_id, &mut json);
        let kind = ev.body.event_type();
        let r = SpoolRecord::event(Some(entry.clone()), kind, &json, ev.at_us);
        let cost = r.compact_cost();
        self.shared.budget.charge(cost);
        match self.send(r) {
            Ok(()) => self.shared.metrics.events_published[kind].inc(),
            Err(_) => {
                self.shared.budget.credit(cost);
                self.shared.metrics.events_dropped.inc();
            }
        }
    }

    /// Whether the last broker probe succeeded.
    pub fn brokers_reachable(&self) -> bool {
        self.shared.brokers_reachable.load(Ordering::Relaxed)
    }

    /// Records the result of a broker probe.
    pub fn set_brokers_reachable(&self, ok: bool) {
        self.shared.brokers_reachable.store(ok, Ordering::Relaxed);
    }

    /// False until librdkafka's statistics first show the producer able to send (start-up).
    pub fn producer_warm(&self) -> bool {
        self.shared.producer_warm.load(Ordering::Relaxed)
    }

    /// False from a fatal producer error until the rebuilt producer is in place.
    pub fn producer_healthy(&self) -> bool {
        self.shared.producer_healthy.load(Ordering::SeqCst)
    }

    /// True while the budget, or the spool's disk tier, is above the readiness watermark.
    pub fn over_watermark(&self) -> bool {
        self.shared.budget.over_watermark()
            || self.shared.spool_over_watermark.load(Ordering::Relaxed)
    }

    /// The final flush: the drain thread produces everything still queued and waits for
    /// acknowledgements until `timeout`, then stops; whatever is left is counted
    /// (`shutdown_timeout`). Blocking: call it from a blocking context.
    pub fn finish(&self, timeout: Duration) -> FinishReport {
        let (reply, answer) = channel();
        let sent = self
            .shared
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Control::Finish {
                deadline: Instant::now() + timeout,
                reply,
            });
        let report = match sent {
            Ok(()) => answer.recv().unwrap_or_default(),
            Err(_) => FinishReport::default(),
        };
        if let Some(t) = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
        report
    }

    /// Test hook: makes librdkafka raise a fatal error in the producer (as an idempotence
    /// sequence desync would), to exercise the rebuild.
    #[doc(hidden)]
    pub fn inject_fatal_error(&self, reason: &str) {
        let _ = self
            .shared
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Control::InjectFatal(reason.to_owned()));
    }
}
