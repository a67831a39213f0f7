//! The per-connection side of the sink: builds Kafka records for one stream.
//!
//! Record building does no Rust allocation: numbers are formatted with `itoa` into stack
//! buffers and librdkafka copies key, value and headers into its own queue
//! (`RD_KAFKA_MSG_F_COPY`). The only heap work is librdkafka's own per-record bookkeeping.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::context::pack_opaque;
use super::{record_cost, OverflowPolicy, Sink};
use crate::events::{write_json, Event};
use crate::metrics::DropReason;
use crate::session::{AudioRecord, Publisher};

/// A connection's publisher: a sink handle plus reusable scratch.
pub struct ConnectionPublisher {
    sink: Sink,
    /// Reused JSON buffer for events.
    event_buf: Vec<u8>,
    /// Whether this connection already logged a dropped frame (log once, count always).
    logged_drop: bool,
    /// Set when the `disconnect` overflow policy wants this stream closed.
    backpressure_close: bool,
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

impl ConnectionPublisher {
    /// A publisher on `sink`.
    pub fn new(sink: Sink) -> Self {
        ConnectionPublisher {
            sink,
            event_buf: Vec::with_capacity(256),
            logged_drop: false,
            backpressure_close: false,
        }
    }

    /// True once the `disconnect` overflow policy asked for this stream to be closed.
    pub fn backpressure_close(&self) -> bool {
        self.backpressure_close
    }
}

/// Applies the overflow policy when a record does not fit the budget.
fn overflow(inner: &super::Inner, backpressure_close: &mut bool) {
    match inner.overflow {
        OverflowPolicy::DropNewest => {}
        OverflowPolicy::Disconnect => *backpressure_close = true,
        OverflowPolicy::DropOldest => {
            let now = crate::mono_micros();
            let last = inner
                .last_purge_us
                .load(std::sync::atomic::Ordering::Relaxed);
            if now.saturating_sub(last) >= 100_000
                && inner
                    .last_purge_us
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                tracing::warn!("in-flight budget full: purging queued records (drop-oldest)");
                inner
                    .producer
                    .purge(rdkafka::producer::PurgeConfig::default().queue());
            }
        }
    }
}

impl ConnectionPublisher {
    /// The sink this publisher writes to.
    pub fn sink(&self) -> &Sink {
        &self.sink
    }

    fn classify(err: &KafkaError) -> DropReason {
        match err.rdkafka_error_code() {
            Some(RDKafkaErrorCode::QueueFull) => DropReason::QueueFull,
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => DropReason::TooLarge,
            _ => DropReason::ProduceError,
        }
    }
}

impl Publisher for ConnectionPublisher {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        let inner = &*self.sink.inner;
        let cost = record_cost(r.ids.stream_sid.len(), r.payload.len());
        let inflight = &inner.metrics.inflight_bytes;
        // Check, then charge: two connections racing can each overshoot by one record, which
        // is why librdkafka's own limit sits 25 % above the budget.
        let before = inflight.get() as u64;
        if before + cost > inner.budget {
            overflow(inner, &mut self.backpressure_close);
            let reason = DropReason::QueueFull;
            if !self.logged_drop {
                self.logged_drop = true;
                tracing::warn!(stream_sid = %r.ids.stream_sid, call_sid = %r.ids.call_sid, reason = reason.as_str(),
                    inflight_bytes = before, budget = inner.budget, policy = inner.overflow.as_str(),
                    "in-flight budget full: audio frame dropped (further drops on this stream are only counted)");
            }
            return Err(reason);
        }
        inflight.add(cost as i64);
        // Headers only once the record is admitted: an overloaded gateway does not build
        // (and free) 12 librdkafka headers for every frame it drops.
        let headers = audio_headers(r, &inner.gateway_id, inner.frames_per_record > 1);
        let opaque = pack_opaque(false, r.chunks, r.received_mono_us, crate::mono_micros());
        let record = BaseRecord::with_opaque_to(&inner.audio_topics[r.track.index()], opaque)
            .key(r.ids.stream_sid.as_bytes())
            .payload(r.payload)
            .headers(headers);
        match inner.producer.send(record) {
            Ok(()) => {
                let m = &inner.metrics;
                m.frames.published.inc_by(r.chunks as u64);
                m.frames.records.inc();
                m.frames_by_track[r.track.index()].inc_by(r.chunks as u64);
                Ok(())
            }
            Err((err, _record)) => {
                inflight.sub(cost as i64);
                let reason = Self::classify(&err);
                if !self.logged_drop {
                    self.logged_drop = true;
                    tracing::warn!(stream_sid = %r.ids.stream_sid, call_sid = %r.ids.call_sid, reason = reason.as_str(), error = %err,
                        "audio frame dropped (further drops on this stream are only counted)");
                }
                Err(reason)
            }
        }
    }

    fn publish_event(&mut self, ev: &Event<'_>) {
        let inner = &*self.sink.inner;
        write_json(ev, &inner.gateway_id, &mut self.event_buf);
        let opaque = pack_opaque(true, 0, 0, crate::mono_micros());
        let mut record =
            BaseRecord::with_opaque_to(&inner.events_topic, opaque).payload(&self.event_buf[..]);
        if let Some(ids) = ev.ids {
            record = record.key(ids.stream_sid.as_bytes());
        }
        let kind = ev.body.type_name();
        // Events are charged to the budget but never refused for it: they are few and small,
        // and losing a `stop` would hide a whole stream's accounting.
        let cost = record_cost(
            ev.ids.map_or(0, |i| i.stream_sid.len()),
            self.event_buf.len(),
        );
        inner.metrics.inflight_bytes.add(cost as i64);
        match inner.producer.send::<[u8], [u8]>(record) {
            Ok(()) => inner.metrics.event_published(kind),
            Err((err, _)) => {
                inner.metrics.inflight_bytes.sub(cost as i64);
                inner.metrics.events_dropped.inc();
                tracing::warn!(stream_sid = ev.ids.map(|i| i.stream_sid.as_str()).unwrap_or(""), event = kind, error = %err, "event dropped");
            }
        }
    }

    fn protocol_error(&mut self, kind: &'static str) {
        self.sink.inner.metrics.protocol_error(kind);
    }

    fn anomaly(&mut self, kind: &'static str) {
        self.sink.inner.metrics.anomaly(kind);
    }

    fn frames_dropped(&mut self, reason: DropReason, n: u64) {
        self.sink.inner.metrics.frames_dropped(reason, n);
    }

    fn media_received(&mut self, bytes: usize) {
        self.sink
            .inner
            .metrics
            .frames
            .media_bytes
            .inc_by(bytes as u64);
    }
}

/// Builds the headers of an audio record (the public contract, see README). `batching` adds
/// the `chunks` header. Numbers are formatted on the stack; librdkafka copies every header.
pub fn audio_headers(r: &AudioRecord<'_>, gateway_id: &str, batching: bool) -> OwnedHeaders {
    let mut bufs = [
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    ];
    let [b_seq, b_chunk, b_ts, b_recv, b_n] = &mut bufs;
    let fields: [(&str, &[u8]); 12] = [
        ("stream_sid", r.ids.stream_sid.as_bytes()),
        ("call_sid", r.ids.call_sid.as_bytes()),
        ("account_sid", r.ids.account_sid.as_bytes()),
        ("track", r.track.as_str().as_bytes()),
        ("seq", b_seq.format(r.seq).as_bytes()),
        ("chunk", b_chunk.format(r.chunk).as_bytes()),
        ("timestamp_ms", b_ts.format(r.timestamp_ms).as_bytes()),
        ("encoding", r.encoding.header_value().as_bytes()),
        ("sample_rate", b"8000"),
        ("channels", b"1"),
        ("gateway", gateway_id.as_bytes()),
        ("received_at_us", b_recv.format(r.received_at_us).as_bytes()),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(13);
    for (k, v) in fields {
        headers = headers.insert(header(k, v));
    }
    if batching || r.chunks != 1 {
        headers = headers.insert(header("chunks", b_n.format(r.chunks).as_bytes()));
    }
    headers
}
