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

/// Whether `config` has librdkafka emit statistics (what sets the producer's warm flag).
pub fn statistics_enabled(config: &rdkafka::ClientConfig) -> bool {
    config
        .get("statistics.interval.ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|ms| ms > 0)
}

/// Producer context: notes for the drain, metrics from statistics, the fatal flag.
pub struct DeliveryContext {
    metrics: Arc<Metrics>,
    /// Callbacks served (delivery reports, statistics, errors).
    pub events: EventCount,
    /// Set when librdkafka reports a fatal error.
    pub fatal: AtomicBool,
    /// Set (once, never cleared) by the first statistics showing the producer able to
    /// send: see [`producer_can_send`]. Shared with the sink for `/readyz`.
    warm: Arc<AtomicBool>,
}

/// Whether librdkafka's statistics show a producer that can send right away: a broker
/// connection up and, for an idempotent producer, its producer id assigned. Until then
/// records wait inside librdkafka (seen at start-up: the first ~0.5 s of records acknowledged
/// 200–470 ms late while the id was being requested), so `/readyz` holds off new calls.
pub fn producer_can_send(s: &Statistics) -> bool {
    let broker_up = s.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
    let pid = s.eos.as_ref().is_none_or(|e| e.idemp_state == "Assigned");
    broker_up && pid
}

impl DeliveryContext {
    /// A context reporting into `metrics`.
    /// `warm` is set once the statistics show the producer able to send.
    pub fn new(metrics: Arc<Metrics>, warm: Arc<AtomicBool>) -> Self {
        DeliveryContext {
            metrics,
            events: EventCount::default(),
            fatal: AtomicBool::new(false),
            warm,
        }
    }
}

impl ClientContext for DeliveryContext {
    fn stats(&self, s: Statistics) {
        self.events.bump();
        let m = &self.metrics;
        m.kafka_queue_messages.set(s.msg_cnt as i64);
        m.kafka_queue_bytes.set(s.msg_size as i64);
        if !self.warm.load(Ordering::Relaxed) && producer_can_send(&s) {
            self.warm.store(true, Ordering::Relaxed);
            tracing::info!("kafka producer ready (broker connection up, producer id assigned)");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::{Broker, ExactlyOnceSemantics};

    fn stats(brokers: &[(i32, &str)], idemp: Option<&str>) -> Statistics {
        Statistics {
            brokers: brokers
                .iter()
                .map(|(id, state)| {
                    let name = format!("127.0.0.1:9092/{id}");
                    let b = Broker {
                        name: name.clone(),
                        nodeid: *id,
                        state: state.to_string(),
                        ..Default::default()
                    };
                    (name, b)
                })
                .collect(),
            eos: idemp.map(|st| ExactlyOnceSemantics {
                idemp_state: st.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn producer_can_send_needs_a_broker_up_and_the_producer_id() {
        // Start-up as librdkafka reports it: only the bootstrap placeholder (-1) is up.
        assert!(!producer_can_send(&stats(&[(-1, "UP")], Some("Init"))));
        assert!(!producer_can_send(&stats(
            &[(-1, "UP"), (1, "UP")],
            Some("WaitPID")
        )));
        assert!(!producer_can_send(&stats(
            &[(1, "CONNECT")],
            Some("Assigned")
        )));
        assert!(producer_can_send(&stats(
            &[(-1, "DOWN"), (1, "UP")],
            Some("Assigned")
        )));
        // Idempotence turned off by the operator: no `eos` section, a broker up is enough.
        assert!(producer_can_send(&stats(&[(1, "UP")], None)));
        assert!(!producer_can_send(&stats(&[], None)));
    }

    #[test]
    fn statistics_enabled_follows_the_interval() {
        let mut c = crate::sink::kafka_config::KafkaOptions::new("b:9092").client_config();
        assert!(!statistics_enabled(&c), "unset: librdkafka's default is 0");
        c.set("statistics.interval.ms", "1000");
        assert!(statistics_enabled(&c));
        c.set("statistics.interval.ms", "0");
        assert!(!statistics_enabled(&c));
    }

    #[test]
    fn the_first_statistics_able_to_send_set_the_warm_flag_for_good() {
        let warm = Arc::new(AtomicBool::new(false));
        let metrics = Metrics::new("test");
        let ctx = DeliveryContext::new(metrics, warm.clone());
        ctx.stats(stats(&[(1, "UP")], Some("WaitPID")));
        assert!(!warm.load(Ordering::Relaxed));
        ctx.stats(stats(&[(1, "UP")], Some("Assigned")));
        assert!(warm.load(Ordering::Relaxed));
        // A later broker outage is readiness's broker probe's business, not this flag's.
        ctx.stats(stats(&[(1, "DOWN")], Some("Assigned")));
        assert!(warm.load(Ordering::Relaxed));
    }
}
