//! librdkafka callbacks: delivery reports and statistics, run inside `Sink::poll` (the tokio
//! task `sink::drive` calls it every 2 ms).
//!
//! Each record carries a `usize` opaque (no allocation) packing what the delivery report needs:
//! whether it is an event, how many chunks it holds, and when it was received and enqueued.

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::metrics::Metrics;

const EVENT_BIT: usize = 1 << 63;
const CHUNKS_SHIFT: u32 = 52;
const CHUNKS_MASK: usize = 0x7FF; // 11 bits
const DELAY_SHIFT: u32 = 36;
const DELAY_MASK: usize = 0xFFFF; // 16 bits, units of 100 µs
const TIME_MASK: usize = (1 << 36) - 1; // ~19 h of µs; compared modulo 2^36

/// Packs the delivery opaque of a record.
pub fn pack_opaque(
    is_event: bool,
    chunks: u32,
    received_mono_us: u64,
    enqueued_mono_us: u64,
) -> usize {
    let delay =
        (enqueued_mono_us.saturating_sub(received_mono_us) / 100).min(DELAY_MASK as u64) as usize;
    let chunks = (chunks as usize).min(CHUNKS_MASK);
    (if is_event { EVENT_BIT } else { 0 })
        | (chunks << CHUNKS_SHIFT)
        | (delay << DELAY_SHIFT)
        | (enqueued_mono_us as usize & TIME_MASK)
}

/// What a packed opaque says: (is_event, chunks, µs since enqueue, µs since receive).
pub fn unpack_opaque(opaque: usize, now_mono_us: u64) -> (bool, u64, u64, u64) {
    let is_event = opaque & EVENT_BIT != 0;
    let chunks = ((opaque >> CHUNKS_SHIFT) & CHUNKS_MASK) as u64;
    let delay = (((opaque >> DELAY_SHIFT) & DELAY_MASK) as u64) * 100;
    let enq = (opaque & TIME_MASK) as u64;
    let since_enqueue = (now_mono_us.wrapping_sub(enq)) & TIME_MASK as u64;
    (is_event, chunks, since_enqueue, since_enqueue + delay)
}

/// Producer context: metrics on delivery and from statistics.
pub struct SinkContext {
    metrics: Arc<Metrics>,
    /// Delivery reports handled so far; lets the poll loop tell whether a poll did work.
    pub(crate) reports: std::sync::atomic::AtomicU64,
}

impl SinkContext {
    /// A context reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        SinkContext {
            metrics,
            reports: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl ClientContext for SinkContext {
    fn stats(&self, s: Statistics) {
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
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (is_event, chunks, since_enqueue, since_receive) =
            unpack_opaque(opaque, crate::mono_micros());
        let m = &self.metrics;
        self.reports
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Credit the budget with exactly what was charged at enqueue (same bytes, same formula).
        let msg = match result {
            Ok(msg) => msg,
            Err((_, msg)) => msg,
        };
        let cost = super::record_cost(
            msg.key().map_or(0, <[u8]>::len),
            msg.payload().map_or(0, <[u8]>::len),
        );
        m.inflight_bytes.sub(cost as i64);
        match result {
            Ok(_) => {
                if is_event {
                    m.events_delivered.inc();
                } else {
                    m.frames.delivered.inc_by(chunks);
                    m.delivery_latency.observe(since_enqueue as f64 / 1e6);
                    m.receive_to_ack.observe(since_receive as f64 / 1e6);
                }
            }
            Err((err, msg)) => {
                let code = err
                    .rdkafka_error_code()
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| "unknown".into());
                let key = msg.key().map(String::from_utf8_lossy).unwrap_or_default();
                if is_event {
                    m.events_failed.inc();
                    tracing::warn!(stream_sid = %key, error = %err, topic = msg.topic(), "event delivery failed");
                } else if err.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeQueue) {
                    // drop-oldest eviction: counted as such, not as a delivery failure.
                    m.frames_dropped(crate::metrics::DropReason::Evicted, chunks);
                } else {
                    m.frames_failed(&code, chunks);
                    tracing::warn!(stream_sid = %key, error = %err, chunks, topic = msg.topic(), "audio delivery failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_round_trip() {
        let o = pack_opaque(false, 5, 1_000_000, 1_000_250);
        let (ev, chunks, since_enq, since_recv) = unpack_opaque(o, 1_010_250);
        assert!(!ev);
        assert_eq!(chunks, 5);
        assert_eq!(since_enq, 10_000);
        assert_eq!(since_recv, 10_200); // delay stored in 100 µs units
        let o = pack_opaque(true, 1, 5, 5);
        assert!(unpack_opaque(o, 6).0);
        // Wrap of the 36-bit clock is handled modulo.
        let t = (1u64 << 36) - 10;
        let o = pack_opaque(false, 1, t, t);
        assert_eq!(unpack_opaque(o, t + 30).2, 30);
    }
}
