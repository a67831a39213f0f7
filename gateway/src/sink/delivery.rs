//! librdkafka callbacks: delivery reports, statistics and client errors.
//!
//! Callbacks run inside `poll`, which only the drain thread calls. A delivery report is reduced
//! to a [`DeliveryNote`] (opaque, partition, offset or error code) pushed onto a thread-local
//! list that the drain thread takes after each poll and processes with full access to its own
//! state — no lock and no allocation per report. A fatal error (e.g. an idempotence sequence
//! desync) only raises a flag here; the drain thread rebuilds the producer.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::metrics::Metrics;

/// What a delivery report said about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryNote {
    /// The opaque given at produce time.
    pub opaque: usize,
    /// `Ok((partition, offset))` or the error code.
    pub result: Result<(i32, i64), RDKafkaErrorCode>,
}

thread_local! {
    static NOTES: RefCell<Vec<DeliveryNote>> = RefCell::new(Vec::with_capacity(4096));
}

/// Moves the reports collected on this thread into `out` (cleared first).
pub fn take_notes(out: &mut Vec<DeliveryNote>) {
    out.clear();
    NOTES.with(|n| std::mem::swap(&mut *n.borrow_mut(), out));
}

/// Counter that only the polling thread bumps; read to tell whether a poll served anything.
#[derive(Debug, Default)]
pub struct EventCount(AtomicU64);

impl EventCount {
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Producer context: notes for the drain, metrics from statistics, the fatal flag.
pub struct DeliveryContext {
    metrics: Arc<Metrics>,
    /// Callbacks served (delivery reports, statistics, errors).
    pub events: EventCount,
    /// Set when librdkafka reports a fatal error.
    pub fatal: AtomicBool,
}

impl DeliveryContext {
    /// A context reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        DeliveryContext {
            metrics,
            events: EventCount::default(),
            fatal: AtomicBool::new(false),
        }
    }
}

impl ClientContext for DeliveryContext {
    fn stats(&self, s: Statistics) {
        self.events.bump();
        let m = &self.metrics;
        m.kafka_queue_messages.set(s.msg_cnt as i64);
        m.kafka_queue_bytes.set(s.msg_size as i64);
        for b in s.brokers.values() {
            if b.nodeid < 0 {
                continue; // bootstrap placeholder entries
            }
            let label = b.nodeid.to_string();
            if let Some(rtt) = &b.rtt {
                m.kafka_broker_rtt.with_label_values(&[&label]).set(rtt.avg);
            }
            m.kafka_broker_up
                .with_label_values(&[&label])
                .set((b.state == "UP") as i64);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.events.bump();
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.fatal.store(true, Ordering::SeqCst);
            tracing::error!(reason, "kafka producer: fatal error");
        } else {
            // Transient client errors (broker down, all brokers down): librdkafka retries by
            // itself. Debug level: readiness and the broker metrics carry the state.
            tracing::debug!(error = %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        self.events.bump();
        let result = match result {
            Ok(msg) => Ok((msg.partition(), msg.offset())),
            Err((err, _)) => Err(err
                .rdkafka_error_code()
                .unwrap_or(RDKafkaErrorCode::Unknown)),
        };
        NOTES.with(|n| n.borrow_mut().push(DeliveryNote { opaque, result }));
    }
}
