//! The playback consumer: one thread reading this instance's partitions of the playback topic
//! and routing each record to the stream that holds it.
//!
//! - Partitions are assigned, not joined through a consumer group: a group rebalance would
//!   move partitions between instances while their streams stay put (and a join takes ~25 s
//!   on the local broker). Reading starts at each partition's end when the instance starts, so
//!   a restarted instance plays nothing meant for the streams of its previous life.
//! - Fetches return as soon as one record is there (`fetch.min.bytes=1`). How long an empty
//!   fetch waits at the broker is `--playback-fetch-wait` (default 100 ms): Apache Kafka
//!   answers a waiting fetch the moment a record arrives, so the wait adds no latency and a
//!   short one only costs fetches (at 5 ms, 200 round trips a second: 23 ms of CPU per second
//!   on the measured VM, idle or not). The local Tansu broker sleeps out the wait on every
//!   fetch, so against it the wait is the latency floor and `scripts/run.sh` sets 5 ms.
//! - The routing table is this thread's own `HashMap`; connections send additions and
//!   removals through a channel that is drained before every poll, so lookups take no lock.
//!   A stream's registration always precedes its first playback record (the record can only
//!   be written after the `start` event that the registration precedes).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::command::{decode, Command, Headers};
use super::downlink::{Bounds, Route};
use super::RegistryOp;
use crate::log_limit::LogLimiter;
use crate::metrics::{LogSite, Metrics, PlaybackDrop, PlaybackType};
use crate::sink::kafka_config::KafkaOptions;
use crate::sink::SinkError;

static DROP_LOG: LogLimiter = LogLimiter::new(LogSite::PlaybackDropped, 10, 10_000);

/// Ended streams remembered to tell `ended` from `not_held` drops.
const ENDED_MEMORY: usize = 10_000;

/// Stops the consumer thread when dropped or asked.
pub struct ConsumerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsumerHandle {
    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts the consumer on `owned` partitions of `topic`.
pub fn spawn(
    kafka: &KafkaOptions,
    topic: &str,
    fetch_wait_ms: u32,
    owned: &[i32],
    registry: Receiver<RegistryOp>,
    bounds: Arc<Bounds>,
    metrics: Arc<Metrics>,
) -> Result<ConsumerHandle, SinkError> {
    let consumer: BaseConsumer = kafka
        .client_config_with(&[
            // Required by the client; never joined (partitions are assigned).
            ("group.id", "twilio-gateway-playback".into()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("enable.partition.eof", "false".into()),
            ("auto.offset.reset", "latest".into()),
            ("fetch.wait.max.ms", fetch_wait_ms.to_string()),
            ("fetch.min.bytes", "1".into()),
            ("fetch.error.backoff.ms", "20".into()),
            ("socket.nagle.disable", "true".into()),
        ])
        .create()
        .map_err(|e| SinkError::Client(kafka.describe_error(&e)))?;
    let mut tpl = TopicPartitionList::new();
    for p in owned {
        tpl.add_partition_offset(topic, *p, Offset::End)
            .map_err(|e| SinkError::Client(e.to_string()))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| SinkError::Client(kafka.redact(&e.to_string())))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut state = Router {
        routes: HashMap::new(),
        ended: VecDeque::new(),
        ended_set: HashSet::new(),
        registry,
        bounds,
        metrics,
    };
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("playback".into())
        .spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                state.apply_registry();
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => state.route(&m),
                    Some(Err(e)) => {
                        if let Some(suppressed) = DROP_LOG.check(&state.metrics) {
                            tracing::warn!(error = %e, suppressed, "playback consumer error");
                        }
                    }
                    None => {}
                }
            }
        })
        .map_err(|e| SinkError::Client(format!("spawning the playback thread: {e}")))?;
    Ok(ConsumerHandle {
        stop,
        thread: Some(thread),
    })
}

/// The consumer thread's routing table.
struct Router {
    routes: HashMap<String, Route>,
    ended: VecDeque<String>,
    ended_set: HashSet<String>,
    registry: Receiver<RegistryOp>,
    bounds: Arc<Bounds>,
    metrics: Arc<Metrics>,
}

impl Router {
    fn apply_registry(&mut self) {
        while let Ok(op) = self.registry.try_recv() {
            match op {
                RegistryOp::Add { stream_sid, route } => {
                    self.ended_set.remove(&stream_sid);
                    self.routes.insert(stream_sid, route);
                }
                RegistryOp::Remove { stream_sid } => {
                    self.routes.remove(&stream_sid);
                    if self.ended_set.insert(stream_sid.clone()) {
                        self.ended.push_back(stream_sid);
                        if self.ended.len() > ENDED_MEMORY {
                            if let Some(old) = self.ended.pop_front() {
                                self.ended_set.remove(&old);
                            }
                        }
                    }
                }
            }
        }
    }

    fn route(&mut self, m: &BorrowedMessage<'_>) {
        let mut headers = Headers::default();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                match h.key {
                    "type" => headers.kind = h.value,
                    "encoding" => headers.encoding = h.value,
                    "sample_rate" => headers.sample_rate = h.value,
                    "name" => headers.name = h.value,
                    _ => {}
                }
            }
        }
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return self.dropped(None, PlaybackDrop::NoKey, "", m);
        };
        let Some(route) = self.routes.get(key) else {
            let reason = if self.ended_set.contains(key) {
                PlaybackDrop::Ended
            } else {
                PlaybackDrop::NotHeld
            };
            return self.dropped(None, reason, key, m);
        };
        if route.partition != m.partition() {
            let shared = route.shared.clone();
            return self.dropped(Some(&shared), PlaybackDrop::WrongPartition, key, m);
        }
        let command = match decode(&headers, m.payload().unwrap_or_default()) {
            Ok(c) => c,
            Err(reason) => {
                let shared = route.shared.clone();
                return self.dropped(Some(&shared), reason, key, m);
            }
        };
        let kind = match command {
            Command::Media(_) => PlaybackType::Media,
            Command::Mark(_) => PlaybackType::Mark,
            Command::Clear => PlaybackType::Clear,
            Command::Stop => PlaybackType::Stop,
        };
        let now_ms = crate::unix_micros() as i64 / 1000;
        let produced_ms = m.timestamp().to_millis().unwrap_or(now_ms);
        self.metrics
            .playback_read_latency
            .observe((now_ms - produced_ms).max(0) as f64 / 1000.0);
        match route.push(command, produced_ms, &self.bounds) {
            Ok(()) => {
                self.metrics.playback_records[kind].inc();
                self.metrics
                    .playback_queued_bytes
                    .set(self.bounds.queued.load(Ordering::Relaxed) as i64);
            }
            Err(reason) => {
                let shared = route.shared.clone();
                self.dropped(Some(&shared), reason, key, m);
            }
        }
    }

    fn dropped(
        &self,
        shared: Option<&Arc<super::downlink::Shared>>,
        reason: PlaybackDrop,
        stream_sid: &str,
        m: &BorrowedMessage<'_>,
    ) {
        self.metrics.playback_dropped[reason].inc();
        if let Some(s) = shared {
            s.counters.drop_one(reason);
        }
        if let Some(suppressed) = DROP_LOG.check(&self.metrics) {
            tracing::warn!(
                stream_sid,
                partition = m.partition(),
                offset = m.offset(),
                reason = reason.as_str(),
                suppressed,
                "playback record dropped"
            );
        }
    }
}
