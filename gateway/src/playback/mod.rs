//! Bidirectional streams: audio, marks, clears and stops from Kafka into live calls.
//!
//! ## The path of a playback record
//! 1. A voice agent reads a stream's `start` event, which names the playback partition of the
//!    instance holding the stream (`"playback": {"topic", "partition"}`), and writes records
//!    with key = streamSid to that partition ([`command`] for the record contract).
//! 2. [`consumer`]: one thread per instance reads only this instance's partitions
//!    ([`partitions`]), from their end at start-up, with fetch settings tuned for tens of
//!    milliseconds; it looks the stream up in its own routing table (no lock: connections send
//!    it registrations through a channel) and queues the command on the stream's downlink, or
//!    drops and counts the record with a reason.
//! 3. [`downlink`]: the bounded per-stream queue and the state shared with the connection.
//! 4. [`writer`]: under the connection's WebSocket, writes the frames to Twilio and records the
//!    played audio on the outbound topic, placed where Twilio plays it.
//!
//! Nothing is ever played into the wrong call: a record reaches a socket only through the
//! routing entry of its exact streamSid on this instance, and only from the partition that
//! instance advertised for it.

pub mod command;
pub mod consumer;
pub mod downlink;
pub mod partitions;
pub mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use self::downlink::{Bounds, Queued, Route, Shared};
use crate::events::{Event, EventBody, StreamIds};
use crate::metrics::Metrics;
use crate::sink::stream::StreamEntry;
use crate::sink::Sink;

/// Settings of the downlink (validated by `config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaybackConfig {
    /// Consume playback at all (`--playback`).
    pub enabled: bool,
    /// `<prefix>.playback`.
    pub topic: String,
    /// Which partitions this instance reads (resolved against the topic at start-up).
    pub partitions: partitions::Assignment,
    /// Per-stream bound on queued audio, bytes of μ-law (`--playback-buffer`).
    pub per_stream_bytes: u64,
    /// Process-wide bound on queued audio, bytes of μ-law (`--playback-max-bytes`).
    pub total_bytes: u64,
    /// `fetch.wait.max.ms` of the playback consumer (`--playback-fetch-wait`).
    pub fetch_wait_ms: u32,
}

/// A routing-table change sent by connections to the consumer thread.
#[derive(Debug)]
pub enum RegistryOp {
    /// A stream started here.
    Add {
        /// Its streamSid.
        stream_sid: String,
        /// Where its commands go.
        route: Route,
    },
    /// A stream ended here.
    Remove {
        /// Its streamSid.
        stream_sid: String,
    },
}

/// The process's playback handle (cheap to clone).
#[derive(Clone)]
pub struct Playback {
    inner: Arc<Inner>,
}

struct Inner {
    topic: String,
    /// This instance's partitions, fixed once the consumer started.
    owned: Vec<i32>,
    bounds: Arc<Bounds>,
    registry: Mutex<Sender<RegistryOp>>,
    metrics: Arc<Metrics>,
}

/// What the stream's writer needs once `start` arrived.
#[derive(Clone)]
pub struct Attached {
    /// The streamSid (written into every frame).
    pub stream_sid: String,
    entry: Arc<StreamEntry>,
    sink: Sink,
    /// Record the played audio as the outbound track (only when Twilio sends no outbound
    /// track of its own: `<Connect>` streams).
    record_outbound: bool,
}

impl Attached {
    /// Publishes played audio (`frames` frames, the first numbered `first_frame`) as one
    /// outbound audio record at `timestamp_ms` on the stream timeline.
    pub fn record(&self, ulaw: &[u8], timestamp_ms: u64, first_frame: u64, frames: u32) {
        if self.record_outbound {
            self.sink
                .publish_playback_audio(&self.entry, ulaw, timestamp_ms, first_frame, frames);
        }
    }

    /// A mark queued before a clear was never sent: its `mark` event says so, so the agent
    /// waiting for it is not left hanging.
    pub fn mark_discarded(&self, name: &str) {
        let ev = Event {
            ids: Some(&self.entry.ids),
            at_us: crate::unix_micros(),
            body: EventBody::Mark {
                name,
                played: Some(false),
                sent: Some(false),
            },
        };
        self.sink.publish_stream_event(&self.entry, &ev);
    }
}

/// The connection's half of its downlink, before the stream started.
pub struct Downlink {
    /// Shared with the writer.
    pub shared: Arc<Shared>,
    /// Moved into the routing table at `start`.
    tx: Option<Sender<Queued>>,
    /// Set at `start`.
    pub attached: Arc<OnceLock<Attached>>,
    playback: Playback,
    registered: Option<String>,
}

/// Where a stream's playback goes, as advertised in its `start` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaybackRoute {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
}

impl Playback {
    /// Starts the consumer thread on `owned` partitions of the topic.
    pub fn start(
        cfg: &PlaybackConfig,
        kafka: &crate::sink::kafka_config::KafkaOptions,
        owned: Vec<i32>,
        metrics: Arc<Metrics>,
    ) -> Result<(Playback, consumer::ConsumerHandle), crate::sink::SinkError> {
        let (tx, rx) = channel();
        let bounds = Arc::new(Bounds {
            per_stream: cfg.per_stream_bytes,
            total: cfg.total_bytes,
            queued: AtomicU64::new(0),
        });
        let handle = consumer::spawn(
            kafka,
            &cfg.topic,
            cfg.fetch_wait_ms,
            &owned,
            rx,
            bounds.clone(),
            metrics.clone(),
        )?;
        Ok((
            Playback {
                inner: Arc::new(Inner {
                    topic: cfg.topic.clone(),
                    owned,
                    bounds,
                    registry: Mutex::new(tx),
                    metrics,
                }),
            },
            handle,
        ))
    }

    /// A downlink for a new connection: the writer's half and the publisher's half.
    pub fn downlink(&self) -> (writer_half::WriterHalf, Downlink) {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared::opened_at(crate::mono_micros()));
        let attached = Arc::new(OnceLock::new());
        (
            writer_half::WriterHalf {
                rx,
                shared: shared.clone(),
                bounds: self.inner.bounds.clone(),
                attached: attached.clone(),
                metrics: self.inner.metrics.clone(),
            },
            Downlink {
                shared,
                tx: Some(tx),
                attached,
                playback: self.clone(),
                registered: None,
            },
        )
    }

    /// The partitions this instance reads.
    pub fn owned(&self) -> &[i32] {
        &self.inner.owned
    }

    /// μ-law bytes queued for all streams.
    pub fn queued_bytes(&self) -> u64 {
        self.inner.bounds.queued.load(Ordering::Relaxed)
    }

    fn send(&self, op: RegistryOp) {
        let _ = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(op);
    }
}

/// The writer's half, taken by the server when it wraps the socket.
pub mod writer_half {
    use super::*;

    /// Everything [`super::writer::PlaybackIo`] needs.
    pub struct WriterHalf {
        pub(super) rx: std::sync::mpsc::Receiver<Queued>,
        pub(super) shared: Arc<Shared>,
        pub(super) bounds: Arc<Bounds>,
        pub(super) attached: Arc<OnceLock<Attached>>,
        pub(super) metrics: Arc<Metrics>,
    }

    impl WriterHalf {
        /// Wraps `io` with the downlink writer.
        pub fn wrap<S>(self, io: S) -> super::writer::PlaybackIo<S> {
            super::writer::PlaybackIo::new(
                io,
                self.rx,
                self.shared,
                self.bounds,
                self.attached,
                self.metrics,
            )
        }
    }
}

/// Picks one of `owned` for a stream, spreading streams evenly (FNV-1a of the SID).
fn pick_partition(owned: &[i32], stream_sid: &str) -> i32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in stream_sid.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    owned[(h % owned.len().max(1) as u64) as usize % owned.len().max(1)]
}

impl Downlink {
    /// The stream started: registers it with the consumer and attaches the writer. Returns
    /// where its playback goes.
    pub fn attach(
        &mut self,
        ids: &StreamIds,
        entry: Arc<StreamEntry>,
        sink: Sink,
        twilio_sends_outbound: bool,
    ) -> Option<PlaybackRoute> {
        let tx = self.tx.take()?;
        if self.playback.inner.owned.is_empty() {
            return None;
        }
        let partition = pick_partition(&self.playback.inner.owned, &ids.stream_sid);
        let _ = self.attached.set(Attached {
            stream_sid: ids.stream_sid.clone(),
            entry,
            sink,
            record_outbound: !twilio_sends_outbound,
        });
        self.playback.send(RegistryOp::Add {
            stream_sid: ids.stream_sid.clone(),
            route: Route {
                tx,
                shared: self.shared.clone(),
                partition,
                one_way: twilio_sends_outbound,
            },
        });
        self.registered = Some(ids.stream_sid.clone());
        Some(PlaybackRoute {
            topic: self.playback.inner.topic.clone(),
            partition,
        })
    }

    /// Twilio echoed mark `name`: `Some(played)` for marks this gateway sent.
    pub fn mark_echoed(&self, name: &str) -> Option<bool> {
        let echo = self.shared.marks.lock().ok()?.echoed(name)?;
        let now = self.shared.timeline_now_us(crate::mono_micros());
        let m = &self.playback.inner.metrics;
        if echo.played {
            // How far Twilio's echo is from where the gateway placed the audio's end.
            m.playback_mark_alignment
                .observe((now - echo.due_us).unsigned_abs() as f64 / 1e6);
            m.playback_marks[crate::metrics::MarkOutcome::Played].inc();
        } else {
            m.playback_marks[crate::metrics::MarkOutcome::Cleared].inc();
        }
        Some(echo.played)
    }
}

impl Downlink {
    /// The stream ended: the writer takes nothing more (it only writes out the frames it had
    /// already batched) and the consumer stops routing to it. Idempotent; dropping does it too.
    pub fn close(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(stream_sid) = self.registered.take() {
            self.playback.send(RegistryOp::Remove { stream_sid });
        }
    }
}

impl Drop for Downlink {
    fn drop(&mut self) {
        self.close();
    }
}
