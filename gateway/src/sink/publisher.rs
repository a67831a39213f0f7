//! The connection side of the sink: turns a session's audio records and events into compact
//! records for the drain thread.
//!
//! Per audio record this does one compare-and-swap on the budget, one allocation for the
//! payload copy (the μ-law bytes, not the expanded PCM), a reference-count increment on the
//! stream entry and one lock-free channel send. Headers, PCM expansion and the librdkafka call
//! happen on the drain thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::profiles::{ProfileChunk, ProfilePublisher};
use super::record::{Kind, SpoolRecord};
use super::stream::StreamEntry;
use super::{OverflowPolicy, Sink, Topics};
use crate::events::{write_json, Event, EventBody, StreamIds, TerminalInfo};
use crate::log_limit::LogLimiter;
use crate::metrics::{AnomalyKind, DropReason, EventType, LogSite, ProtocolErrorKind};
use crate::playback::{Downlink, PlaybackRoute};
use crate::protocol::Track;
use crate::session::{AudioRecord, Publisher};

static DROP_LOG: LogLimiter = LogLimiter::new(LogSite::FrameDropped, 10, 10_000);
static EVENT_DROP_LOG: LogLimiter = LogLimiter::new(LogSite::EventDropped, 10, 10_000);

/// A connection's publisher: a sink handle, the stream's entry once `start` arrived, scratch.
pub struct ConnectionPublisher {
    sink: Sink,
    stream: Option<Arc<StreamEntry>>,
    /// Reused JSON buffer for events.
    event_buf: Vec<u8>,
    /// Whether this stream already logged a dropped frame (log once per stream, count always).
    logged_drop: bool,
    /// Set when the `disconnect` overflow policy wants this stream closed.
    backpressure_close: bool,
    /// The stream's downlink (bidirectional streams), when playback is on.
    downlink: Option<Downlink>,
    /// The stream's output profiles, once `start` arrived (`None` when none is configured).
    profiles: Option<ProfilePublisher>,
}

impl ConnectionPublisher {
    /// A publisher on `sink`.
    pub fn new(sink: Sink) -> Self {
        ConnectionPublisher {
            sink,
            stream: None,
            event_buf: Vec::with_capacity(256),
            logged_drop: false,
            backpressure_close: false,
            downlink: None,
            profiles: None,
        }
    }

    /// A publisher whose stream can receive playback through `downlink`.
    pub fn with_downlink(sink: Sink, downlink: Downlink) -> Self {
        let mut p = ConnectionPublisher::new(sink);
        p.downlink = Some(downlink);
        p
    }

    /// The process metrics.
    pub fn metrics(&self) -> &std::sync::Arc<crate::metrics::Metrics> {
        self.sink.metrics()
    }

    /// The stream's downlink, if any.
    pub fn downlink(&self) -> Option<&Downlink> {
        self.downlink.as_ref()
    }

    /// The stream ended: no more playback is written to it (see [`Downlink::close`]).
    pub fn close_playback(&mut self) {
        if let Some(d) = &mut self.downlink {
            d.close();
        }
    }

    /// True once the `disconnect` overflow policy asked for this stream to be closed.
    pub fn backpressure_close(&self) -> bool {
        self.backpressure_close
    }

    /// The stream's entry, once `start` arrived.
    pub fn stream(&self) -> Option<&Arc<StreamEntry>> {
        self.stream.as_ref()
    }

    fn entry(&mut self, ids: &StreamIds) -> &Arc<StreamEntry> {
        let sink = &self.sink;
        let profiles = &mut self.profiles;
        self.stream.get_or_insert_with(|| {
            *profiles = ProfilePublisher::new(&sink.shared.profiles);
            sink.new_stream(ids.clone())
        })
    }

    /// Sends an event record, charged to the budget unconditionally, or with `refusable` only
    /// if it fits (dropped and counted otherwise). False when it was not handed over.
    fn send_event(&self, r: SpoolRecord, refusable: bool) -> bool {
        let m = &self.sink.shared.metrics;
        let budget = &self.sink.shared.budget;
        let cost = r.compact_cost();
        if !refusable {
            budget.charge(cost);
        } else if !budget.try_admit(cost, false) {
            m.events_dropped.inc();
            return false;
        }
        if self.sink.send(r).is_err() {
            budget.credit(cost);
            m.events_dropped.inc();
            return false;
        }
        true
    }
}

impl Publisher for ConnectionPublisher {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        let overflow = self.sink.shared.overflow;
        // One reference count increment per record: the clone is the one the record carries.
        let entry = Arc::clone(self.entry(r.ids));
        let shared = &self.sink.shared;
        let cost = r.payload.len() as u64 + super::record::COMPACT_OVERHEAD;
        if !shared
            .budget
            .try_admit(cost, overflow == OverflowPolicy::DropOldest)
        {
            if overflow == OverflowPolicy::Disconnect {
                self.backpressure_close = true;
            }
            if !self.logged_drop {
                self.logged_drop = true;
                if let Some(suppressed) = DROP_LOG.check(&shared.metrics) {
                    tracing::warn!(stream_sid = r.ids.stream_sid.as_str(), call_sid = r.ids.call_sid.as_str(),
                        suppressed, "audio dropped: in-flight budget full (further drops on this stream are only counted)");
                }
            }
            return Err(DropReason::QueueFull);
        }
        entry.outstanding.fetch_add(1, Ordering::Relaxed);
        entry
            .frames_accepted
            .fetch_add(r.chunks as u64, Ordering::Relaxed);
        let record = SpoolRecord {
            stream: Some(entry),
            payload: r.payload.into(),
            seq: r.seq,
            timestamp_ms: r.timestamp_ms,
            received_at_us: r.received_at_us,
            chunk: r.chunk.min(u32::MAX as u64) as u32,
            chunks: r.chunks.min(u16::MAX as u32) as u16,
            slot: Topics::audio_slot(r.track),
            kind: Kind::Audio,
            aux: r.track.index() as u8,
            flags: r.flags,
        };
        match self.sink.send(record) {
            Ok(()) => {
                let m = &shared.metrics;
                m.frames_published.inc_by(r.chunks as u64);
                m.records_published.inc();
                m.frames_by_track[r.track.index()].inc_by(r.chunks as u64);
                Ok(())
            }
            Err(record) => {
                // The drain thread is gone (shutdown finished): undo and count.
                shared.budget.credit(cost);
                if let Some(entry) = &record.stream {
                    entry.outstanding.fetch_sub(1, Ordering::Relaxed);
                    entry
                        .frames_accepted
                        .fetch_sub(r.chunks as u64, Ordering::Relaxed);
                }
                Err(DropReason::ProduceError)
            }
        }
    }

    fn publish_event(&mut self, ev: &Event<'_>) {
        let stream = ev.ids.map(|ids| self.entry(ids).clone());
        let kind = ev.body.event_type();
        if let EventBody::End {
            kind: end,
            reason,
            error_kind,
            close_code,
            ..
        } = &ev.body
        {
            // The profiles' last records go first: the terminal event waits for them.
            if let (Some(p), Some(s)) = (self.profiles.as_mut(), stream.as_ref()) {
                p.finish(&self.sink, s, ev.at_us);
            }
            // Rendered by the drain thread once the stream's audio is settled.
            let playback = self.downlink.as_ref().and_then(|d| {
                let mut summary = d.shared.close_and_summarise()?;
                if let (Some(s), Some(map)) = (&stream, summary.as_object_mut()) {
                    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                    map.insert("frames_recorded".into(), r(&s.playback_recorded).into());
                }
                Some(summary)
            });
            let info = TerminalInfo {
                kind: *end,
                reason: (*reason).to_owned(),
                error_kind: error_kind.map(|k| k.as_str().to_owned()),
                close_code: *close_code,
                at_us: ev.at_us,
                playback,
            };
            let json = serde_json::to_vec(&info).unwrap_or_default();
            let mut r = SpoolRecord::event(stream, kind, &json, ev.at_us);
            r.kind = Kind::Terminal;
            self.send_event(r, false);
            return;
        }
        write_json(ev, &self.sink.shared.gateway_id, &mut self.event_buf);
        let r = SpoolRecord::event(stream, kind, &self.event_buf, ev.at_us);
        // dtmf and marks come as fast as the peer sends them, each up to a frame's size:
        // admitted against the budget like audio, so a flood while Kafka is away cannot grow
        // memory past it or take other streams' room. Lifecycle events (start, the terminal
        // event, gaps, capped per stream) are never refused.
        let refusable = matches!(kind, EventType::Dtmf | EventType::Mark);
        let metrics = &self.sink.shared.metrics;
        if self.send_event(r, refusable) {
            metrics.events_published[kind].inc();
        } else if refusable {
            if let Some(suppressed) = EVENT_DROP_LOG.check(metrics) {
                tracing::warn!(
                    stream_sid = ev.ids.map(|i| i.stream_sid.as_str()).unwrap_or(""),
                    event = kind.as_str(),
                    suppressed,
                    "event dropped: in-flight budget full"
                );
            }
        }
    }

    fn mark_played(&mut self, name: &str) -> Option<bool> {
        self.downlink.as_ref()?.mark_echoed(name)
    }

    fn attach(&mut self, ids: &StreamIds, tracks: &[Track]) -> Option<PlaybackRoute> {
        let entry = self.entry(ids).clone();
        let sink = self.sink.clone();
        let twilio_sends_outbound = tracks.contains(&Track::Outbound);
        self.downlink
            .as_mut()?
            .attach(ids, entry, sink, twilio_sends_outbound)
    }

    fn protocol_error(&mut self, kind: ProtocolErrorKind) {
        self.sink.shared.metrics.protocol_errors[kind].inc();
    }

    fn anomaly(&mut self, kind: AnomalyKind) {
        self.sink.shared.metrics.anomalies[kind].inc();
    }

    fn frames_dropped(&mut self, reason: DropReason, n: u64) {
        self.sink.shared.metrics.dropped[reason].inc_by(n);
        if let Some(s) = &self.stream {
            s.drop_frames(reason, n);
        }
    }

    fn profile_chunk(&mut self, chunk: &ProfileChunk<'_>) {
        if let (Some(p), Some(s)) = (self.profiles.as_mut(), self.stream.as_ref()) {
            p.push(&self.sink, s, chunk);
        }
    }

    fn media_received(&mut self, bytes: usize) {
        let m = &self.sink.shared.metrics;
        m.media_bytes.inc_by(bytes as u64);
        m.frames_received.inc();
        if let Some(s) = &self.stream {
            s.frames_received.fetch_add(1, Ordering::Relaxed);
        }
    }
}
