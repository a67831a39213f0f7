//! The drain thread: the one place that talks to librdkafka.
//!
//! Connections hand compact records ([`SpoolRecord`]) to this thread through a lock-free
//! channel and never touch the producer, so no connection task takes librdkafka's locks or
//! wakes its broker thread. Each loop iteration, at most every `--kafka-drain-interval`:
//!
//! 1. **Route** newly arrived records. A record whose stream has nothing waiting in the spool
//!    goes straight to librdkafka if the window (`--kafka-window-bytes`) has room; otherwise it
//!    joins the spool's tail and its stream's *backlog* grows, so every later record of that
//!    stream queues behind it (per-stream order, end to end).
//! 2. **Replay** the spool head into the window while it has room: records rescued by an
//!    eviction or a producer rebuild first, then the memory tier in arrival order.
//! 3. **Evict** (`--overflow drop-oldest` only): when connections had to borrow the overdraft,
//!    the oldest spooled audio is dropped (counted `evicted`); events are kept.
//! 4. **Poll** librdkafka for delivery reports and settle them: budget credit, per-stream
//!    accounting and replay index, latency histograms. A stream's terminal event waits
//!    (parked) until all of its audio is settled, then is rendered with the final counts.
//! 5. On a **fatal producer error**, build a new producer, take every record the old one still
//!    held back (in produce order) and send them again: live streams never notice beyond a
//!    delay; delivery is at-least-once around the rebuild.
//!
//! Between iterations the thread sleeps for the rest of the interval (a plain sleep: delivery
//! reports wait for the next iteration), so connections never wake it while it has work. With
//! nothing queued, in flight or parked it waits on the channel instead (at most 50 ms), and the
//! first record after a quiet spell wakes it at once. Delivery metrics are gathered per settle
//! pass and flushed once, and the clocks are read once per iteration and once per pass, not per
//! record.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use super::delivery::{take_notes, DeliveryContext, DeliveryNote};
use super::producer::{Headers, ProduceError, Producer};
use super::record::{window_cost, Kind, SpoolRecord, FLAG_PLAYBACK, FLAG_PROFILE};
use super::spool::{Spool, Ticket};
use super::stream::StreamEntry;
use super::{OverflowPolicy, Shared, TopicKind, Topics};
use crate::events::{render_terminal, ReplayEntry, TerminalCounts, TerminalInfo};
use crate::log_limit::LogLimiter;
use crate::metrics::{DeliveryError, DropReason, LogSite};
use crate::protocol::audio::ulaw_to_pcm16le_into;

/// Requests from the rest of the process.
pub enum Control {
    /// Produce everything queued and wait for acknowledgements until `deadline`, then stop the
    /// thread and answer on `reply`.
    Finish {
        /// When to give up on what is still unacknowledged.
        deadline: Instant,
        /// Where the report goes.
        reply: Sender<FinishReport>,
    },
    /// Test hook: raise a fatal producer error (`rd_kafka_test_fatal_error`).
    InjectFatal(String),
}

/// How the final flush went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// Everything accepted was acknowledged (or failed and was counted) before the deadline.
    pub complete: bool,
    /// Audio chunks still unacknowledged at the deadline (counted `shutdown_timeout`).
    pub abandoned_frames: u64,
    /// Events still unacknowledged at the deadline.
    pub abandoned_events: u64,
    /// Records left in the spool directory for the next process (with `--spool-dir`).
    pub spooled_records: u64,
}

/// Settings of the drain thread.
pub struct DrainParams {
    /// Longest sleep between iterations.
    pub tick: Duration,
    /// Full-budget policy (eviction for `drop-oldest`).
    pub overflow: OverflowPolicy,
    /// `gateway` header and field.
    pub gateway_id: String,
    /// `--frames-per-record` (> 1 adds the `chunks` header to every audio record).
    pub frames_per_record: u32,
    /// Topics by slot.
    pub topics: Topics,
    /// Producer configuration (for rebuilds).
    pub producer_config: ClientConfig,
    /// Partition choice (for rebuilds).
    pub partitioning: super::partitioning::Partitioning,
    /// Fraction of `--spool-max-bytes` above which `/readyz` fails.
    pub readiness_watermark: f64,
}

/// A record inside librdkafka.
struct InFlight {
    record: SpoolRecord,
    /// Its spool segment, acknowledged when Kafka settles it.
    ticket: Ticket,
    window_cost: u64,
    produced_us: u64,
    seq: u64,
}

/// Most records taken from the channel in one iteration.
const ROUTE_BATCH: usize = 65_536;

/// Longest wait of an idle drain (nothing queued, in flight, parked or rescued) before it looks
/// again at control requests, librdkafka's events (statistics, errors) and the spool. A record
/// ends the wait at once.
const IDLE_WAIT: Duration = Duration::from_millis(50);

static DELIVERY_FAILED_LOG: LogLimiter = LogLimiter::new(LogSite::DeliveryFailed, 10, 10_000);

/// The drain thread's state; see the module docs.
pub struct Drain {
    params: DrainParams,
    shared: Arc<Shared>,
    rx: Receiver<SpoolRecord>,
    ctrl: Receiver<Control>,
    producer: Producer,
    /// Records rescued by an eviction (events) or a producer rebuild; produced first.
    rescued: VecDeque<(SpoolRecord, Ticket)>,
    /// Everything else that waits for the window, in arrival order.
    spool: Spool,
    inflight: Vec<Option<InFlight>>,
    free: Vec<usize>,
    window_records: u64,
    /// Terminal records waiting for their stream's audio to settle, by stream number.
    parked: HashMap<u64, (SpoolRecord, Ticket)>,
    notes: Vec<DeliveryNote>,
    value_buf: Vec<u8>,
    json_buf: Vec<u8>,
    produce_seq: u64,
    /// Settling the reports of a producer being replaced: failures are re-sent, not counted.
    rebuilding: Vec<InFlight>,
    in_rebuild: bool,
    finish: Option<(Instant, Sender<FinishReport>)>,
    /// Every sender is gone (the sink handle was dropped).
    disconnected: bool,
    /// A rebuilt producer has not yet delivered anything (readiness stays failed).
    recovering: bool,
    /// Monotonic clock (µs) read once at the top of each iteration: the produce time of every
    /// record produced in it (one clock read per iteration instead of one per record).
    iteration_us: u64,
    /// Delivery metrics accumulated without atomics during one settle pass, flushed at its end.
    settled: SettleMetrics,
    /// A record received while the thread waited idle; routed first by the next iteration.
    held: Option<SpoolRecord>,
}

/// What a settle pass adds to the process metrics, gathered locally and flushed once per pass:
/// a delivery report costs no atomic operation on the shared histograms and counters.
struct SettleMetrics {
    delivery_latency: prometheus::local::LocalHistogram,
    receive_to_ack: prometheus::local::LocalHistogram,
    frames_delivered: u64,
}

impl SettleMetrics {
    fn new(m: &crate::metrics::Metrics) -> SettleMetrics {
        SettleMetrics {
            delivery_latency: m.delivery_latency.local(),
            receive_to_ack: m.receive_to_ack.local(),
            frames_delivered: 0,
        }
    }

    fn flush(&mut self, m: &crate::metrics::Metrics) {
        self.delivery_latency.flush();
        self.receive_to_ack.flush();
        if self.frames_delivered > 0 {
            m.frames_delivered.inc_by(self.frames_delivered);
            self.frames_delivered = 0;
        }
    }
}

impl Drain {
    /// A drain around an already created `producer`.
    pub fn new(
        params: DrainParams,
        shared: Arc<Shared>,
        rx: Receiver<SpoolRecord>,
        ctrl: Receiver<Control>,
        producer: Producer,
        spool: Spool,
    ) -> Drain {
        let shared_metrics = shared.metrics.clone();
        Drain {
            params,
            shared,
            rx,
            ctrl,
            producer,
            rescued: VecDeque::new(),
            spool,
            inflight: Vec::new(),
            free: Vec::new(),
            window_records: 0,
            parked: HashMap::new(),
            notes: Vec::with_capacity(4096),
            value_buf: Vec::with_capacity(4096),
            json_buf: Vec::with_capacity(1024),
            produce_seq: 0,
            rebuilding: Vec::new(),
            in_rebuild: false,
            finish: None,
            disconnected: false,
            recovering: false,
            iteration_us: crate::mono_micros(),
            settled: SettleMetrics::new(&shared_metrics),
            held: None,
        }
    }

    /// Runs until a `Finish` request completes.
    ///
    /// One iteration per `tick` at most: it takes everything connections sent since the last
    /// one, so records are produced in batches and the thread sleeps for the rest of the tick,
    /// however busy the connections are. Only a full batch (65,536 records) skips the sleep.
    pub fn run(mut self) {
        loop {
            let started = Instant::now();
            self.iteration_us = crate::mono_micros();
            self.shared.metrics.kafka_drain_iterations.inc();
            self.control();
            // The error callback raises the flag; librdkafka's own fatal state (an atomic read
            // when clear) is checked too, in case the error event is not delivered.
            if self
                .producer
                .context()
                .fatal
                .load(std::sync::atomic::Ordering::SeqCst)
                || self.producer.fatal_error().is_some()
            {
                self.rebuild();
            }
            let routed = self.route();
            self.replay();
            self.evict();
            self.spool.maintain(crate::unix_micros());
            self.producer.poll();
            self.settle();
            self.check_recovered();
            self.publish_gauges();
            if let Some((deadline, _)) = &self.finish {
                if routed == 0 && self.idle() {
                    // One last look: a record sent after `route` emptied the channel.
                    match self.rx.try_recv() {
                        Ok(r) => self.enqueue(r),
                        Err(_) => {
                            self.complete(true);
                            return;
                        }
                    }
                    continue;
                }
                if Instant::now() >= *deadline {
                    self.complete(false);
                    return;
                }
            }
            if routed == 0 && self.finish.is_none() && self.idle() {
                // Nothing to produce, settle or replay: wait for the next record instead of
                // the clock. A wake-up costs ~15 µs of CPU on the measured VM whether or not
                // there is work (docs/benchmarks.md, "The drain thread at rest and per
                // record"), so an idle gateway ticking every millisecond would spend 1.5 % of
                // a core doing nothing. The first record after a quiet spell is produced at
                // once rather than at the next tick.
                if let Ok(r) = self.rx.recv_timeout(IDLE_WAIT) {
                    self.held = Some(r);
                }
            } else if routed < ROUTE_BATCH {
                let elapsed = started.elapsed();
                if elapsed < self.params.tick {
                    // A plain sleep: librdkafka's queue poll has millisecond resolution and
                    // rust-rdkafka's `poll` loops until its deadline, so a sub-millisecond
                    // wait there would spin. Reports are served at the top of the next tick.
                    std::thread::sleep(self.params.tick - elapsed);
                }
            }
        }
    }

    fn control(&mut self) {
        loop {
            match self.ctrl.try_recv() {
                Ok(Control::Finish { deadline, reply }) => self.finish = Some((deadline, reply)),
                Ok(Control::InjectFatal(reason)) => self.producer.inject_fatal_error(&reason),
                Err(_) => return,
            }
        }
    }

    /// Takes what connections sent since the last iteration. Returns how many records came.
    fn route(&mut self) -> usize {
        let mut n = 0;
        // Bounded per iteration so settling and replay keep their turn under any load.
        for _ in 0..ROUTE_BATCH {
            let next = match self.held.take() {
                Some(r) => Ok(r),
                None => self.rx.try_recv(),
            };
            let r = match next {
                Ok(r) => r,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if !self.disconnected && self.finish.is_none() {
                        // Every sink handle is gone: flush for a few seconds, then stop.
                        let (reply, _) = std::sync::mpsc::channel();
                        self.finish = Some((Instant::now() + Duration::from_secs(5), reply));
                    }
                    self.disconnected = true;
                    break;
                }
            };
            n += 1;
            let backlog = r
                .stream
                .as_ref()
                .is_some_and(|s| s.backlog.load(std::sync::atomic::Ordering::Relaxed) > 0);
            if backlog {
                self.enqueue(r);
                continue;
            }
            match r.kind {
                Kind::Terminal => self.terminal(r, Ticket::MEMORY),
                // Events wait for the window like audio (queued in order, never lost): a peer
                // can send dtmf and marks as fast as it likes, and librdkafka's window must
                // stay within its bound while the broker is away.
                Kind::Event | Kind::Audio => {
                    if self.window_fits(&r) {
                        if let Err((r, _)) = self.produce(r, Ticket::MEMORY) {
                            self.enqueue(r);
                        }
                    } else {
                        self.enqueue(r);
                    }
                }
            }
        }
        n
    }

    /// Appends a record to the spool tail; its stream's later records queue behind it.
    fn enqueue(&mut self, r: SpoolRecord) {
        if let Some(s) = &r.stream {
            s.backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.spool.push(r);
    }

    fn window_fits(&self, r: &SpoolRecord) -> bool {
        window_fits(&self.shared, &self.params.topics, r)
    }

    /// Produces spooled records while the window has room.
    fn replay(&mut self) {
        loop {
            let from_rescued = !self.rescued.is_empty();
            let next = if from_rescued {
                self.rescued.front().map(|(r, _)| r)
            } else {
                self.spool.front(&self.params.topics)
            };
            let Some(r) = next else { return };
            if r.kind != Kind::Terminal && !backlog_fits(&self.shared, &self.params.topics, r) {
                return;
            }
            let taken = if from_rescued {
                self.rescued.pop_front()
            } else {
                self.spool.pop(&self.params.topics)
            };
            let Some((r, ticket)) = taken else { return };
            if let Some(s) = &r.stream {
                s.backlog.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            let result = match r.kind {
                Kind::Terminal => {
                    self.terminal(r, ticket);
                    Ok(())
                }
                _ => self.produce(r, ticket),
            };
            if let Err((r, ticket)) = result {
                // librdkafka refused for now (queue full, producer failing): put it back.
                if let Some(s) = &r.stream {
                    s.backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if from_rescued {
                    self.rescued.push_front((r, ticket));
                } else {
                    self.spool.push_front(r, ticket);
                }
                return;
            }
        }
    }

    /// `--overflow drop-oldest`: drops the oldest spooled audio until the queued account is
    /// back under its limit (less 5 %, so eviction is not re-triggered by the next record).
    fn evict(&mut self) {
        if self.params.overflow != OverflowPolicy::DropOldest {
            return;
        }
        let shared = self.shared.clone();
        let budget = &shared.budget;
        if budget.queued() <= budget.queued_limit() {
            return;
        }
        let target = budget.queued_limit() / 20 * 19;
        // Bytes to free. Records read back from disk were charged when read, so evicting one
        // frees its charge like a memory record; the disk space it leaves lets the memory tier
        // spill (see `Spool::maintain`).
        let mut excess = budget.queued().saturating_sub(target);
        while excess > 0 {
            let Some((r, ticket)) = self.spool.pop(&self.params.topics) else {
                break;
            };
            if let Some(s) = &r.stream {
                s.backlog.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            if r.kind != Kind::Audio {
                // Events are never dropped for budget reasons; they keep their place ahead of
                // everything younger.
                if let Some(s) = &r.stream {
                    s.backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.rescued.push_back((r, ticket));
                continue;
            }
            let cost = r.compact_cost();
            excess = excess.saturating_sub(cost);
            budget.credit(cost);
            self.drop_audio(&r, DropReason::Evicted);
            self.spool.ack(ticket);
        }
    }

    /// Counts a record's chunks as dropped and settles it for its stream.
    fn drop_audio(&mut self, r: &SpoolRecord, reason: DropReason) {
        if r.flags & FLAG_PROFILE != 0 {
            // Profile records are not frames Twilio sent: only settled (module `profiles`).
            self.shared.metrics.profile_records_dropped.inc();
            self.audio_settled(r.stream.as_ref());
            return;
        }
        if r.flags & FLAG_PLAYBACK != 0 {
            if let Some(s) = &r.stream {
                s.playback_dropped
                    .fetch_add(r.chunks as u64, std::sync::atomic::Ordering::Relaxed);
            }
            self.audio_settled(r.stream.as_ref());
            return;
        }
        let chunks = r.chunks as u64;
        self.shared.metrics.dropped[reason].inc_by(chunks);
        if let Some(s) = &r.stream {
            s.drop_frames(reason, chunks);
        }
        self.audio_settled(r.stream.as_ref());
    }

    /// One of the records a stream's terminal event waits for (audio, or an event in
    /// flight) is settled; the last one releases a parked terminal.
    fn audio_settled(&mut self, stream: Option<&Arc<StreamEntry>>) {
        let Some(s) = stream else { return };
        let left = s
            .outstanding
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(1);
        if left == 0 {
            if let Some((t, ticket)) = self.parked.remove(&s.number) {
                self.render_and_produce(t, ticket);
            }
        }
    }

    /// A stream's terminal record reached the head of its stream's queue.
    fn terminal(&mut self, r: SpoolRecord, ticket: Ticket) {
        let pending = r.stream.as_ref().map_or(0, |s| {
            s.outstanding.load(std::sync::atomic::Ordering::Relaxed)
        });
        if pending == 0 {
            self.render_and_produce(r, ticket);
        } else if let Some(s) = &r.stream {
            self.parked.insert(s.number, (r, ticket));
        }
    }

    /// Renders a terminal record into its event and produces it. The event carries the
    /// terminal record's ticket: its segment stays until the event is acknowledged.
    fn render_and_produce(&mut self, t: SpoolRecord, ticket: Ticket) {
        let Ok(info) = serde_json::from_slice::<TerminalInfo>(&t.payload) else {
            tracing::error!("unreadable terminal record: dropped");
            self.shared.budget.credit(t.compact_cost());
            self.shared.metrics.events_dropped.inc();
            self.spool.ack(ticket);
            return;
        };
        let stream = t.stream.clone();
        let counts = stream.as_ref().map(|s| counts_of(s)).unwrap_or_default();
        let replay = stream
            .as_ref()
            .map(|s| self.replay_index(s))
            .unwrap_or_default();
        render_terminal(
            &info,
            stream.as_ref().map(|s| &s.ids),
            &self.params.gateway_id,
            &counts,
            &replay,
            &mut self.json_buf,
        );
        let kind = info.kind.event_type();
        let ev = SpoolRecord::event(stream, kind, &self.json_buf, info.at_us);
        // The rendered event replaces the terminal record in the queued account.
        self.shared.budget.credit(t.compact_cost());
        self.shared.budget.charge(ev.compact_cost());
        self.shared.metrics.events_published[kind].inc();
        if let Err(ev) = self.produce(ev, ticket) {
            // The producer refused it for now: it waits at the head, ahead of younger records.
            if let Some(s) = &ev.0.stream {
                s.backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.rescued.push_front(ev);
        }
    }

    fn replay_index(&self, s: &StreamEntry) -> Vec<ReplayEntry> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = Vec::new();
        for (slot, idx) in s.index.iter().enumerate() {
            let records = idx.records.load(Relaxed);
            if records == 0 {
                continue;
            }
            let Some(spec) = self.params.topics.get(slot as u8) else {
                continue;
            };
            out.push(ReplayEntry {
                topic: spec.name.clone(),
                track: spec.track_label(),
                partition: idx.partition.load(Relaxed) as i32,
                first_offset: idx.first.load(Relaxed),
                last_offset: idx.last.load(Relaxed),
                records,
            });
        }
        out
    }

    /// Hands one record to librdkafka. `Err` gives it back when librdkafka cannot take it now
    /// (queue full, fatal state); records it can never take are dropped and counted here.
    fn produce(&mut self, r: SpoolRecord, ticket: Ticket) -> Result<(), (SpoolRecord, Ticket)> {
        let Some(spec) = self.params.topics.get(r.slot) else {
            // Recovered from the spool for a topic this configuration no longer has.
            self.shared.budget.credit(r.compact_cost());
            match r.kind {
                Kind::Audio => self.drop_audio(&r, DropReason::Unroutable),
                _ => self.shared.metrics.events_dropped.inc(),
            }
            self.spool.ack(ticket);
            return Ok(());
        };
        let compact = r.compact_cost();
        let key: Option<&[u8]> = r.stream.as_ref().map(|s| s.key());
        let mut headers = None;
        let value: &[u8] = match (&spec.kind, r.kind) {
            (TopicKind::Audio { expand_mulaw, .. }, Kind::Audio) => {
                headers = Some(audio_headers(
                    &r,
                    spec,
                    &self.params.gateway_id,
                    self.params.frames_per_record > 1,
                ));
                if *expand_mulaw {
                    self.value_buf.clear();
                    ulaw_to_pcm16le_into(&r.payload, &mut self.value_buf);
                    &self.value_buf
                } else {
                    &r.payload
                }
            }
            _ => &r.payload,
        };
        let cost = window_cost(key.map_or(0, <[u8]>::len), value.len(), compact);
        let slot_index = self.free.pop().unwrap_or_else(|| {
            self.inflight.push(None);
            self.inflight.len() - 1
        });
        match self.producer.produce(
            r.slot as usize,
            key,
            value,
            headers,
            slot_index + 1,
            (r.received_at_us / 1000) as i64,
        ) {
            Ok(()) => {
                if r.kind == Kind::Event {
                    // The terminal event also waits for its stream's events (its replay index
                    // covers the events topic too); audio is counted when it is accepted.
                    if let Some(s) = &r.stream {
                        s.outstanding
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                self.produce_seq += 1;
                self.shared.budget.to_window(compact, cost);
                self.window_records += 1;
                self.inflight[slot_index] = Some(InFlight {
                    record: r,
                    ticket,
                    window_cost: cost,
                    produced_us: self.iteration_us,
                    seq: self.produce_seq,
                });
                Ok(())
            }
            Err(ProduceError(code)) => {
                self.free.push(slot_index);
                match code {
                    RDKafkaErrorCode::QueueFull | RDKafkaErrorCode::Fatal => Err((r, ticket)),
                    other => {
                        self.refused(r, other);
                        self.spool.ack(ticket);
                        Ok(())
                    }
                }
            }
        }
    }

    /// librdkafka can never take `r` (too large, unknown topic, ...): drop and count it.
    fn refused(&mut self, r: SpoolRecord, code: RDKafkaErrorCode) {
        self.shared.budget.credit(r.compact_cost());
        let sid = r.stream.as_ref().map_or("", |s| s.ids.stream_sid.as_str());
        if let Some(suppressed) = DELIVERY_FAILED_LOG.check(&self.shared.metrics) {
            tracing::warn!(stream_sid = sid, error = %code, suppressed, "record refused by the producer: dropped");
        }
        match r.kind {
            Kind::Audio => {
                let reason = if code == RDKafkaErrorCode::MessageSizeTooLarge {
                    DropReason::TooLarge
                } else {
                    DropReason::ProduceError
                };
                self.drop_audio(&r, reason);
            }
            _ => self.shared.metrics.events_dropped.inc(),
        }
    }

    /// Processes the delivery reports collected by the last polls.
    ///
    /// The clocks are read once per pass: every report of the pass was served by the polls just
    /// before it, so "now" is the same for all of them to within the pass's own duration (as
    /// the produce time is the iteration's start, see `iteration_us`).
    fn settle(&mut self) {
        let mut notes = std::mem::take(&mut self.notes);
        take_notes(&mut notes);
        let now = (crate::mono_micros(), crate::unix_micros());
        for note in notes.drain(..) {
            let Some(index) = note.opaque.checked_sub(1) else {
                continue;
            };
            let Some(f) = self.inflight.get_mut(index).and_then(Option::take) else {
                tracing::error!(opaque = note.opaque, "delivery report for no record (bug)");
                continue;
            };
            self.free.push(index);
            self.window_records -= 1;
            self.shared.budget.window_done(f.window_cost);
            match note.result {
                Err(_) if self.in_rebuild => {
                    // Re-sent by the new producer; charged back to the queued account.
                    self.shared.budget.charge(f.record.compact_cost());
                    self.rebuilding.push(f);
                }
                Ok((partition, offset)) => {
                    let ticket = f.ticket;
                    self.delivered(f, partition, offset, now);
                    self.spool.ack(ticket);
                }
                Err(code) => {
                    let ticket = f.ticket;
                    self.failed(f, code);
                    self.spool.ack(ticket);
                }
            }
        }
        self.notes = notes;
        self.settled.flush(&self.shared.metrics);
    }

    /// One acknowledged record; `now` is (monotonic, unix) µs of the settle pass.
    fn delivered(&mut self, f: InFlight, partition: i32, offset: i64, now: (u64, u64)) {
        self.recovered();
        let m = &self.shared.metrics;
        let r = &f.record;
        if let Some(s) = &r.stream {
            if let Some(idx) = s.index.get(r.slot as usize) {
                idx.delivered(partition, offset);
            }
        }
        match r.kind {
            Kind::Audio if r.flags & FLAG_PROFILE != 0 => {
                m.profile_records_delivered.inc();
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Audio if r.flags & FLAG_PLAYBACK != 0 => {
                // Played audio: its own accounting (it is not audio Twilio sent).
                if let Some(s) = &r.stream {
                    s.playback_delivered
                        .fetch_add(r.chunks as u64, std::sync::atomic::Ordering::Relaxed);
                }
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Audio => {
                let chunks = r.chunks as u64;
                self.settled.frames_delivered += chunks;
                if let Some(s) = &r.stream {
                    s.frames_delivered
                        .fetch_add(chunks, std::sync::atomic::Ordering::Relaxed);
                }
                self.settled
                    .delivery_latency
                    .observe(now.0.saturating_sub(f.produced_us) as f64 / 1e6);
                self.settled
                    .receive_to_ack
                    .observe(now.1.saturating_sub(r.received_at_us) as f64 / 1e6);
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Event => {
                m.events_delivered.inc();
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Terminal => m.events_delivered.inc(),
        }
    }

    fn failed(&mut self, f: InFlight, code: RDKafkaErrorCode) {
        let r = &f.record;
        let sid = r.stream.as_ref().map_or("", |s| s.ids.stream_sid.as_str());
        let topic = self
            .params
            .topics
            .get(r.slot)
            .map_or("", |t| t.name.as_str());
        if let Some(suppressed) = DELIVERY_FAILED_LOG.check(&self.shared.metrics) {
            tracing::warn!(stream_sid = sid, topic, error = %code, chunks = r.chunks, suppressed, "delivery failed");
        }
        match r.kind {
            Kind::Audio if r.flags & FLAG_PROFILE != 0 => {
                self.shared.metrics.profile_records_dropped.inc();
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Audio if r.flags & FLAG_PLAYBACK != 0 => {
                if let Some(s) = &r.stream {
                    s.playback_dropped
                        .fetch_add(r.chunks as u64, std::sync::atomic::Ordering::Relaxed);
                }
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Audio => {
                let chunks = r.chunks as u64;
                self.shared.metrics.frames_failed(classify(code), chunks);
                if let Some(s) = &r.stream {
                    s.drop_frames(DropReason::DeliveryFailed, chunks);
                }
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Event => {
                self.shared.metrics.events_failed.inc();
                let stream = r.stream.clone();
                self.audio_settled(stream.as_ref());
            }
            Kind::Terminal => self.shared.metrics.events_failed.inc(),
        }
    }

    /// Replaces a producer that hit a fatal error; see the module docs.
    fn rebuild(&mut self) {
        let shared = self.shared.clone();
        let m = &shared.metrics;
        let fatal = self.producer.fatal_error();
        m.kafka_fatal_errors.inc();
        m.kafka_producer_healthy.set(0);
        self.shared
            .producer_healthy
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let (code, reason) = fatal.map_or(("unknown".to_owned(), String::new()), |(c, r)| {
            (format!("{c:?}"), r)
        });
        tracing::error!(
            code,
            reason = %self.shared.kafka.redact(&reason),
            in_flight = self.window_records,
            "kafka producer fatal error: rebuilding the producer and re-sending what it held"
        );
        let context = DeliveryContext::new(
            self.shared.metrics.clone(),
            self.shared.producer_warm.clone(),
        );
        let new = match Producer::new(
            &self.params.producer_config,
            context,
            &self.params.topics.names(),
            self.params.partitioning,
        ) {
            Ok(p) => p,
            Err(e) => {
                // Keep the broken producer (nothing it holds is lost: its reports will come)
                // and try again next iteration.
                tracing::error!(error = %self.shared.kafka.describe_error(&e), "cannot rebuild the kafka producer; retrying");
                std::thread::sleep(Duration::from_millis(500));
                return;
            }
        };
        let old = std::mem::replace(&mut self.producer, new);
        // Purging the old producer serves a report for everything it held: each comes back as
        // a failure, which `settle` sets aside for re-sending while `in_rebuild` is set.
        self.in_rebuild = true;
        old.purge();
        self.settle();
        drop(old);
        // Dropping it flushes once more, which can serve more of its reports: settle them
        // now, while their slots still name the records they are about (the sweep below
        // frees every slot for re-use).
        self.settle();
        // Anything the old producer never reported on is re-sent too.
        for slot in self.inflight.iter_mut() {
            if let Some(f) = slot.take() {
                self.shared.budget.window_done(f.window_cost);
                self.shared.budget.charge(f.record.compact_cost());
                self.window_records -= 1;
                self.rebuilding.push(f);
            }
        }
        self.free = (0..self.inflight.len()).rev().collect();
        self.in_rebuild = false;
        let mut resend = std::mem::take(&mut self.rebuilding);
        resend.sort_by_key(|f| f.seq);
        let count = resend.len();
        // In produce order, ahead of everything: per-stream order is kept because every
        // younger record of those streams is either among them or still queued behind.
        for f in resend.into_iter().rev() {
            if let Some(s) = &f.record.stream {
                s.backlog.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if f.record.kind == Kind::Event {
                    // Counted for the terminal when it was produced; counted again when it is
                    // re-sent (`produce`).
                    s.outstanding
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            self.rescued.push_front((f.record, f.ticket));
        }
        m.kafka_producer_rebuilds.inc();
        // Readiness stays failed until the new producer proves itself (see `check_recovered`).
        self.recovering = true;
        tracing::warn!(
            resent = count,
            "kafka producer rebuilt; ready again once it delivers"
        );
    }

    /// After a rebuild, the producer counts as healthy again once it delivered a record, or
    /// once it holds nothing (no traffic to prove anything with).
    fn check_recovered(&mut self) {
        if self.recovering && self.window_records == 0 && self.rescued.is_empty() {
            self.recovered();
        }
    }

    fn recovered(&mut self) {
        if self.recovering {
            self.recovering = false;
            self.shared.metrics.kafka_producer_healthy.set(1);
            self.shared
                .producer_healthy
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("kafka producer healthy again");
        }
    }

    /// Nothing queued, in flight or parked.
    fn idle(&self) -> bool {
        self.spool.is_empty()
            && self.rescued.is_empty()
            && self.window_records == 0
            && self.parked.is_empty()
    }

    /// Ends the thread. In time: everything was settled. Late: what librdkafka still holds
    /// is purged; with `--spool-dir` every unsettled record is written to the spool for the
    /// next process (in order, see [`Spool::persist`]); without one, or when the disk has no
    /// room, it is counted as `shutdown_timeout` (audio) or a dropped event.
    fn complete(&mut self, in_time: bool) {
        let mut report = FinishReport {
            complete: in_time,
            ..Default::default()
        };
        if !in_time {
            // Late arrivals too: nothing is silently lost.
            while let Ok(r) = self.rx.try_recv() {
                self.enqueue(r);
            }
            // Purge what librdkafka holds; its reports come back as failures set aside here.
            self.in_rebuild = true;
            self.producer.purge();
            self.settle();
            self.in_rebuild = false;
            // Reported ones were moved back to the queued account by `settle`; the rest here.
            let mut held: Vec<InFlight> = self.rebuilding.drain(..).collect();
            for f in self.inflight.iter_mut().filter_map(Option::take) {
                self.shared.budget.window_done(f.window_cost);
                self.shared.budget.charge(f.record.compact_cost());
                held.push(f);
            }
            held.sort_by_key(|f| f.seq);
            self.window_records = 0;
            let mut front = Vec::with_capacity(held.len() + self.rescued.len());
            front.extend(held.into_iter().map(|f| (f.record, f.ticket)));
            front.extend(self.rescued.drain(..));
            let parked: Vec<(SpoolRecord, Ticket)> =
                std::mem::take(&mut self.parked).into_values().collect();
            let queued =
                front.len() as u64 + parked.len() as u64 + self.spool.memory_records() as u64;
            let left = self.spool.persist(front, parked);
            report.spooled_records = if self.spool.has_disk() {
                queued.saturating_sub(left.len() as u64)
            } else {
                0
            };
            for r in left {
                self.shared.budget.credit(r.compact_cost());
                self.abandon(r, &mut report);
            }
            if report.spooled_records > 0 {
                tracing::warn!(
                    records = report.spooled_records,
                    "final flush timed out: unacknowledged records written to the spool directory for the next start"
                );
            }
            if report.abandoned_frames + report.abandoned_events > 0 {
                tracing::error!(
                    frames = report.abandoned_frames,
                    events = report.abandoned_events,
                    "final flush timed out: records not acknowledged by Kafka"
                );
            }
        }
        if let Some((_, reply)) = self.finish.take() {
            let _ = reply.send(report);
        }
    }

    fn abandon(&mut self, r: SpoolRecord, report: &mut FinishReport) {
        match r.kind {
            Kind::Audio if r.flags & FLAG_PROFILE != 0 => {
                self.shared.metrics.profile_records_dropped.inc();
            }
            Kind::Audio if r.flags & FLAG_PLAYBACK != 0 => {
                if let Some(s) = &r.stream {
                    s.playback_dropped
                        .fetch_add(r.chunks as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Kind::Audio => {
                report.abandoned_frames += r.chunks as u64;
                let chunks = r.chunks as u64;
                self.shared.metrics.dropped[DropReason::ShutdownTimeout].inc_by(chunks);
                if let Some(s) = &r.stream {
                    s.drop_frames(DropReason::ShutdownTimeout, chunks);
                }
            }
            _ => {
                report.abandoned_events += 1;
                self.shared.metrics.events_dropped.inc();
            }
        }
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        self.shared.budget.publish_gauge();
        m.kafka_window_records.set(self.window_records as i64);
        m.kafka_window_bytes.set(self.shared.budget.window() as i64);
        self.shared.spool_over_watermark.store(
            self.spool.over_watermark(self.params.readiness_watermark),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Whether `r` fits in the window now.
fn window_fits(shared: &Shared, topics: &Topics, r: &SpoolRecord) -> bool {
    shared.budget.window_has_room(window_cost_of(topics, r))
}

/// Whether a spooled record may be produced now (replay leaves a quarter of the window to
/// live streams).
fn backlog_fits(shared: &Shared, topics: &Topics, r: &SpoolRecord) -> bool {
    shared
        .budget
        .window_has_room_for_backlog(window_cost_of(topics, r))
}

/// What a record will cost in librdkafka's window.
fn window_cost_of(topics: &Topics, r: &SpoolRecord) -> u64 {
    let value = match topics.kind(r.slot) {
        Some(TopicKind::Audio {
            expand_mulaw: true, ..
        }) if r.kind == Kind::Audio => r.payload.len() * 2,
        _ => r.payload.len(),
    };
    let key = r.stream.as_ref().map_or(0, |s| s.key().len());
    window_cost(key, value, r.compact_cost())
}

/// The final counts of a stream.
fn counts_of(s: &StreamEntry) -> TerminalCounts {
    use std::sync::atomic::Ordering::Relaxed;
    TerminalCounts {
        frames_received: s.frames_received.load(Relaxed),
        frames_published: s.frames_accepted.load(Relaxed),
        frames_delivered: s.frames_delivered.load(Relaxed),
        recovered: s.recovered,
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), s.dropped(*r)))
            .filter(|(_, n)| *n > 0)
            .collect(),
    }
}

/// Maps a librdkafka error code to the `gateway_frames_failed_total{error}` label.
fn classify(code: RDKafkaErrorCode) -> DeliveryError {
    match code {
        RDKafkaErrorCode::MessageTimedOut => DeliveryError::MessageTimedOut,
        RDKafkaErrorCode::PurgeQueue => DeliveryError::PurgeQueue,
        RDKafkaErrorCode::PurgeInflight => DeliveryError::PurgeInflight,
        RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::UnknownPartition => DeliveryError::UnknownTopicOrPartition,
        RDKafkaErrorCode::MessageSizeTooLarge => DeliveryError::MessageSizeTooLarge,
        RDKafkaErrorCode::TopicAuthorizationFailed => DeliveryError::TopicAuthorizationFailed,
        RDKafkaErrorCode::Fatal => DeliveryError::Fatal,
        _ => DeliveryError::Other,
    }
}

/// [`audio_headers`] for benchmarks (the drain's per-record header work, measured alone).
#[doc(hidden)]
pub fn audio_headers_for_bench(r: &SpoolRecord, topics: &Topics, gateway_id: &str) -> Headers {
    match topics.get(r.slot) {
        Some(spec) => audio_headers(r, spec, gateway_id, false),
        None => Headers::with_capacity(0),
    }
}

/// Builds the headers of an audio record (the public contract, see README). Numbers are
/// formatted on the stack; librdkafka copies every header.
fn audio_headers(
    r: &SpoolRecord,
    spec: &super::TopicSpec,
    gateway_id: &str,
    batching: bool,
) -> Headers {
    let TopicKind::Audio {
        encoding,
        sample_rate,
        channels,
        profile,
        ..
    } = &spec.kind
    else {
        return Headers::with_capacity(0);
    };
    let mut h = Headers::with_capacity(15);
    let mut n = itoa::Buffer::new();
    if let Some(s) = &r.stream {
        h.add("stream_sid", s.ids.stream_sid.as_bytes());
        h.add("call_sid", s.ids.call_sid.as_bytes());
        h.add("account_sid", s.ids.account_sid.as_bytes());
    }
    h.add(
        "track",
        super::profiles::track_header(*channels, r.track()).as_bytes(),
    );
    h.add("seq", n.format(r.seq).as_bytes());
    h.add("chunk", n.format(r.chunk).as_bytes());
    h.add("timestamp_ms", n.format(r.timestamp_ms).as_bytes());
    h.add("encoding", encoding.as_bytes());
    h.add("sample_rate", n.format(*sample_rate).as_bytes());
    h.add("channels", n.format(*channels).as_bytes());
    h.add("gateway", gateway_id.as_bytes());
    h.add("received_at_us", n.format(r.received_at_us).as_bytes());
    // Profile and played-audio records always say how many chunks they cover.
    if batching || r.chunks != 1 || profile.is_some() || r.flags & FLAG_PLAYBACK != 0 {
        h.add("chunks", n.format(r.chunks).as_bytes());
    }
    if let Some(p) = profile {
        h.add("profile", p.as_bytes());
    }
    if r.flags & FLAG_PLAYBACK != 0 {
        h.add("source", b"playback");
    }
    h
}
