//! `status` records (Twilio statusCallbacks, see [`crate::security::webhook`]) on the events
//! topic. Kept apart from [`super::publisher`], which owns the per-stream hot path.
//!
//! Like stream events, a status record is charged to the in-flight budget but never refused
//! for it (it is small, rare, and the only trace of a failed handshake); a full librdkafka queue
//! drops it and counts `gateway_events_dropped_total`.

use rdkafka::error::KafkaError;
use rdkafka::producer::BaseRecord;

use super::context::pack_opaque;
use super::{record_cost, Sink};

impl Sink {
    /// Enqueues one `status` record (`json`) on `<prefix>.events` with key `key` (the StreamSid).
    pub fn publish_status(&self, key: &str, json: &[u8]) -> Result<(), KafkaError> {
        let inner = &*self.inner;
        let opaque = pack_opaque(true, 0, 0, crate::mono_micros());
        let record = BaseRecord::with_opaque_to(&inner.events_topic, opaque)
            .key(key.as_bytes())
            .payload(json);
        let cost = record_cost(key.len(), json.len());
        inner.metrics.inflight_bytes.add(cost as i64);
        match inner.producer.send::<[u8], [u8]>(record) {
            Ok(()) => {
                inner.metrics.event_published("status");
                Ok(())
            }
            Err((err, _)) => {
                inner.metrics.inflight_bytes.sub(cost as i64);
                inner.metrics.events_dropped.inc();
                Err(err)
            }
        }
    }
}
