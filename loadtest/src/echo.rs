//! The echo bot: the application side of a bidirectional stream, driven through Kafka.
//!
//! One thread, one `BaseConsumer` and one `BaseProducer`. The consumer is assigned (no group)
//! at the high watermarks to `<prefix>.events` — `start` events give each stream's playback
//! route (`"playback": {"topic", "partition"}`), `mark` events and terminal events go to the
//! downlink verifier — and to `<prefix>.audio.inbound`, the caller's audio. Every inbound
//! record is stamped on receipt and played back `delay` later as one playback record, keyed
//! by the stream SID, written to exactly the partition the `start` event named. PCM in, PCM
//! or μ-law out (`encoding`), or alternating per record; μ-law in is handled the same way. A
//! `mark` follows every `mark_every` media records; each stream gets a `clear` every
//! `clear_every`, and every `stop_every`-th stream a `stop` after `stop_after`. With a
//! `burst` above 1 the bot holds that many inbound records and writes them back to back, the
//! way a text-to-speech reply arrives faster than real time, so Twilio's buffer fills and
//! clears have something to discard.
//!
//! Only streams of this run (their SIDs carry the run id, [`CallIds::stream_index`]) are
//! echoed. Before each record is produced the bot stamps it and tells the downlink verifier
//! ([`DlMsg::Produced`]), so the verifier always knows a record before anything it causes
//! can reach the simulator; a record that cannot be enqueued is retracted
//! ([`DlMsg::Unproduced`]). The bot also measures itself: how late each playback record left
//! against its due time, and how long the caller's audio took from the gateway to the bot.

use crate::audio::{ulaw_encode, ULAW_TO_PCM};
use crate::consume::{
    assign_at_end, low_latency_consumer, topic_index, Clock, ConsumerLag, LagSampler, LagTracker,
    RawRecord,
};
use crate::downlink::{DlMsg, DownlinkSender, GatewayEvent, PlaybackEncoding, Produced};
use crate::message::CallIds;
use crate::stats::{new_histogram, Percentiles};
use hdrhistogram::Histogram;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Which encoding the bot writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoEncoding {
    /// PCM s16le 8 kHz (the gateway encodes it to μ-law).
    Pcm,
    /// μ-law (passed through by the gateway).
    Mulaw,
    /// PCM and μ-law, alternating per record.
    Alternate,
}

/// Echo bot settings.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Delay between receiving the caller's audio and playing it back.
    pub delay: Duration,
    /// Encoding of playback records.
    pub encoding: EchoEncoding,
    /// A mark after every N media records (0 = no marks).
    pub mark_every: u64,
    /// A clear on each stream this often (zero = never).
    pub clear_every: Duration,
    /// Inbound records gathered and written back to back (1 = one by one).
    pub burst: u64,
    /// Write a burst as one playback record (a TTS engine's chunk) instead of one per chunk.
    pub merge_burst: bool,
    /// Every N-th stream (index % N == N − 1) is ended by a `stop` record (0 = none).
    pub stop_every: u64,
    /// How long after its `start` event a stopped stream gets its `stop`.
    pub stop_after: Duration,
    /// Producer `linger.ms`.
    pub linger_ms: u32,
    /// Consumer `fetch.wait.max.ms`. The bot plays by due time (`delay` after receipt), so
    /// its fetch wait is off the measured path as long as it stays well below `delay`.
    pub fetch_wait_ms: u32,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            delay: Duration::from_secs(1),
            encoding: EchoEncoding::Pcm,
            mark_every: 10,
            clear_every: Duration::ZERO,
            burst: 1,
            merge_burst: false,
            stop_every: 0,
            stop_after: Duration::from_secs(5),
            linger_ms: 1,
            fetch_wait_ms: 5,
        }
    }
}

/// Errors starting the bot.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// Kafka setup failed.
    #[error("echo bot: kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The thread could not be started.
    #[error("echo bot: {0}")]
    Thread(#[from] std::io::Error),
}

/// What the bot did and how far behind it ran.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EchoSummary {
    /// Streams of this run seen (by audio or events).
    pub streams: u64,
    /// Streams whose `start` event carried a playback route.
    pub streams_routed: u64,
    /// `start` events without a playback route (nothing can be echoed for them).
    pub starts_unrouted: u64,
    /// Inbound audio records read.
    pub inbound_records: u64,
    /// Events read.
    pub events: u64,
    /// Records of other runs (ignored).
    pub foreign_records: u64,
    /// Records that could not be parsed.
    pub malformed_records: u64,
    /// Playback media records produced.
    pub media_produced: u64,
    /// Marks produced.
    pub marks_produced: u64,
    /// Clears produced.
    pub clears_produced: u64,
    /// Stops produced.
    pub stops_produced: u64,
    /// Records the producer refused (queue full after retries).
    pub produce_errors: u64,
    /// Records whose delivery failed after they were enqueued.
    pub delivery_errors: u64,
    /// Inbound records not echoed because their stream had ended or been stopped.
    pub dropped_after_end: u64,
    /// Inbound records that waited for their stream's `start` event.
    pub held_for_route: u64,
    /// Terminal events seen for this run's streams.
    pub end_events: u64,
    /// Playback record due → produced: the bot's own lateness.
    pub bot_lag: Percentiles,
    /// Gateway receive (`received_at_us`) → bot receipt, of the caller's audio.
    pub gateway_to_bot: Percentiles,
    /// The bot consumer's broker-side lag.
    pub consumer_lag: ConsumerLag,
}

/// Counts failed deliveries.
struct BotContext {
    delivery_errors: Arc<AtomicU64>,
}

impl ClientContext for BotContext {}

impl ProducerContext for BotContext {
    type DeliveryOpaque = ();

    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_err() {
            self.delivery_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Handle to the bot thread.
pub struct EchoBot {
    finish_tx: mpsc::Sender<Duration>,
    thread: std::thread::JoinHandle<EchoSummary>,
}

impl EchoBot {
    /// Assigns the consumer at the high watermarks and starts the thread. Blocking (metadata
    /// round trips): call it before the run or from `spawn_blocking`.
    pub fn start(
        brokers: &str,
        topic_prefix: &str,
        run_id: u64,
        cfg: EchoConfig,
        dl: DownlinkSender,
    ) -> Result<EchoBot, EchoError> {
        let consumer: BaseConsumer = low_latency_consumer(brokers, cfg.fetch_wait_ms).create()?;
        let topics = vec![
            format!("{topic_prefix}.events"),
            format!("{topic_prefix}.audio.inbound"),
        ];
        let assignment = assign_at_end(&consumer, &topics, None)?;
        let tracker = Arc::new(LagTracker::new(&assignment));
        let sampler = LagSampler::start(brokers, tracker.clone(), Duration::from_secs(1), "echo")?;
        let delivery_errors = Arc::new(AtomicU64::new(0));
        let producer: BaseProducer<BotContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("acks", "1")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "30000")
            .create_with_context(BotContext {
                delivery_errors: delivery_errors.clone(),
            })?;
        let (finish_tx, finish_rx) = mpsc::channel();
        let default_topic = format!("{topic_prefix}.playback");
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut bot = Bot::new(cfg, run_id, producer, dl, default_topic);
                bot.run(&consumer, &topics, &tracker, &finish_rx);
                let _ = bot.producer.flush(Duration::from_secs(5));
                let mut s = bot.summary();
                s.delivery_errors = delivery_errors.load(Ordering::Relaxed);
                s.consumer_lag = sampler.finish();
                s
            })?;
        Ok(EchoBot { finish_tx, thread })
    }

    /// Keeps reading events for up to `grace` (until every stream's terminal event is in),
    /// then stops and returns the summary. Blocking.
    pub fn finish(self, grace: Duration) -> EchoSummary {
        let _ = self.finish_tx.send(grace);
        self.thread.join().unwrap_or_default()
    }
}

/// Inbound audio waiting to be played back.
struct Due {
    due: Instant,
    stream: u64,
    payload: Vec<u8>,
    mulaw_in: bool,
}

#[derive(Default)]
struct BotStream {
    sid: String,
    route: Option<(String, i32)>,
    /// Media waiting for the route (start event not read yet).
    held: VecDeque<(Vec<u8>, bool)>,
    /// Media gathered for the next burst.
    burst: Vec<(Vec<u8>, bool)>,
    media: u64,
    marks: u64,
    next_clear: Option<Instant>,
    stop_at: Option<Instant>,
    stopped: bool,
    ended: bool,
    alternate: bool,
}

struct Bot {
    cfg: EchoConfig,
    run_id: u64,
    producer: BaseProducer<BotContext>,
    dl: DownlinkSender,
    default_topic: String,
    streams: HashMap<u64, BotStream>,
    queue: VecDeque<Due>,
    clock: Clock,
    s: EchoSummary,
    bot_lag: Histogram<u64>,
    gateway_to_bot: Histogram<u64>,
    finishing: Option<Instant>,
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 3_600_000_000)
}

impl Bot {
    fn new(
        cfg: EchoConfig,
        run_id: u64,
        producer: BaseProducer<BotContext>,
        dl: DownlinkSender,
        default_topic: String,
    ) -> Self {
        Bot {
            cfg,
            run_id,
            producer,
            dl,
            default_topic,
            streams: HashMap::new(),
            queue: VecDeque::new(),
            clock: Clock::new(),
            s: EchoSummary::default(),
            bot_lag: new_histogram(),
            gateway_to_bot: new_histogram(),
            finishing: None,
        }
    }

    fn run(
        &mut self,
        consumer: &BaseConsumer,
        topics: &[String],
        tracker: &LagTracker,
        finish: &mpsc::Receiver<Duration>,
    ) {
        let mut last_timers = Instant::now();
        loop {
            if self.finishing.is_none() {
                if let Ok(grace) = finish.try_recv() {
                    self.finishing = Some(Instant::now() + grace);
                }
            }
            if let Some(deadline) = self.finishing {
                let all_ended = self.streams.values().all(|s| s.ended);
                if Instant::now() >= deadline || all_ended {
                    break;
                }
            }
            let now = Instant::now();
            let wait = self
                .queue
                .front()
                .map_or(Duration::from_millis(5), |d| {
                    d.due.saturating_duration_since(now)
                })
                .min(Duration::from_millis(5));
            let mut polled = consumer.poll(wait);
            let mut n = 0;
            while let Some(res) = polled {
                // Stamp before anything looks at the record.
                let at = Instant::now();
                match res {
                    Ok(msg) => {
                        let t = topic_index(topics, msg.topic()).unwrap_or(usize::MAX);
                        tracker.received(t, msg.partition(), msg.offset());
                        let raw = RawRecord::capture(at, t, &msg);
                        drop(msg);
                        self.record(raw);
                    }
                    Err(_) => self.s.malformed_records += 1,
                }
                n += 1;
                if n >= 512 {
                    break;
                }
                polled = consumer.poll(Duration::ZERO);
            }
            let now = Instant::now();
            self.produce_due(now);
            if now.duration_since(last_timers) >= Duration::from_millis(10) {
                last_timers = now;
                self.timers(now);
            }
            self.producer.poll(Duration::ZERO);
        }
    }

    fn stream(&mut self, index: u64, sid: &str) -> &mut BotStream {
        let s = &mut self.s;
        self.streams.entry(index).or_insert_with(|| {
            s.streams += 1;
            BotStream {
                sid: sid.to_string(),
                // Alternating streams start on different encodings.
                alternate: index % 2 == 1,
                ..Default::default()
            }
        })
    }

    /// Handles one stamped record.
    fn record(&mut self, raw: RawRecord) {
        match raw.topic {
            0 => self.event(raw),
            1 => self.inbound(raw),
            _ => self.s.malformed_records += 1,
        }
    }

    fn inbound(&mut self, raw: RawRecord) {
        self.s.inbound_records += 1;
        let Some(sid) = raw.key_str().or_else(|| raw.header_str("stream_sid")) else {
            self.s.malformed_records += 1;
            return;
        };
        let Some(index) = CallIds::stream_index(sid, self.run_id) else {
            self.s.foreign_records += 1;
            return;
        };
        if let Some(gw) = raw
            .header_str("received_at_us")
            .and_then(|v| v.parse::<i64>().ok())
        {
            let d = self.clock.unix_us(raw.at) - gw;
            let _ = self.gateway_to_bot.record(d.clamp(1, 3_600_000_000) as u64);
        }
        let mulaw_in = raw.header("encoding") == Some(b"mulaw");
        let sid = sid.to_string();
        self.stream(index, &sid);
        self.queue.push_back(Due {
            due: raw.at + self.cfg.delay,
            stream: index,
            payload: raw.payload().to_vec(),
            mulaw_in,
        });
    }

    fn event(&mut self, raw: RawRecord) {
        self.s.events += 1;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw.payload()) else {
            self.s.malformed_records += 1;
            return;
        };
        let Some(sid) = v.get("stream_sid").and_then(|s| s.as_str()) else {
            self.s.foreign_records += 1;
            return;
        };
        let Some(index) = CallIds::stream_index(sid, self.run_id) else {
            self.s.foreign_records += 1;
            return;
        };
        let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let at = raw.at;
        let event = match kind {
            "start" => {
                let route = v.get("playback").and_then(|p| {
                    let partition = p.get("partition")?.as_i64()? as i32;
                    let topic = p
                        .get("topic")
                        .and_then(|t| t.as_str())
                        .unwrap_or(&self.default_topic)
                        .to_string();
                    Some((topic, partition))
                });
                let routed = route.is_some();
                let (stop_every, stop_after, clear_every) = (
                    self.cfg.stop_every,
                    self.cfg.stop_after,
                    self.cfg.clear_every,
                );
                let st = self.stream(index, sid);
                if let Some(r) = route {
                    st.route = Some(r);
                    if stop_every > 0 && index % stop_every == stop_every - 1 {
                        st.stop_at = Some(at + stop_after);
                    }
                    if !clear_every.is_zero() {
                        // Staggered so streams do not all clear in the same tick.
                        let offset = Duration::from_millis(97 * (index % 11));
                        st.next_clear = Some(at + clear_every + offset);
                    }
                }
                if routed {
                    self.s.streams_routed += 1;
                    self.flush_held(index);
                } else {
                    self.s.starts_unrouted += 1;
                }
                GatewayEvent::Start { routed }
            }
            "mark" => GatewayEvent::Mark {
                name: v
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("")
                    .to_string(),
                played: v.get("played").and_then(|p| p.as_bool()),
            },
            "stop" | "disconnect" | "error" => {
                self.s.end_events += 1;
                let st = self.stream(index, sid);
                st.ended = true;
                st.held.clear();
                st.burst.clear();
                GatewayEvent::End {
                    kind: kind.to_string(),
                    reason: v.get("reason").and_then(|r| r.as_str()).map(str::to_string),
                    playback: v.get("playback").cloned(),
                }
            }
            _ => return,
        };
        self.dl.blocking_send(DlMsg::Gateway {
            stream: index,
            at,
            event,
        });
    }

    /// Produces media held back for a route that is now known.
    fn flush_held(&mut self, index: u64) {
        let held: Vec<_> = match self.streams.get_mut(&index) {
            Some(st) => st.held.drain(..).collect(),
            None => return,
        };
        for (payload, mulaw_in) in held {
            self.media(index, &payload, mulaw_in);
        }
    }

    fn produce_due(&mut self, now: Instant) {
        while self.queue.front().is_some_and(|d| d.due <= now) {
            let Some(d) = self.queue.pop_front() else {
                break;
            };
            let burst = self.cfg.burst.max(1) as usize;
            let Some(st) = self.streams.get_mut(&d.stream) else {
                continue;
            };
            if st.ended || st.stopped {
                self.s.dropped_after_end += 1;
                continue;
            }
            if st.route.is_none() {
                self.s.held_for_route += 1;
                st.held.push_back((d.payload, d.mulaw_in));
                continue;
            }
            st.burst.push((d.payload, d.mulaw_in));
            if st.burst.len() < burst {
                continue;
            }
            let items = std::mem::take(&mut st.burst);
            let _ = self
                .bot_lag
                .record(us(Instant::now().saturating_duration_since(d.due)));
            if self.cfg.merge_burst && items.windows(2).all(|w| w[0].1 == w[1].1) {
                let mulaw_in = items.first().is_some_and(|i| i.1);
                let merged: Vec<u8> = items.into_iter().flat_map(|i| i.0).collect();
                self.media(d.stream, &merged, mulaw_in);
            } else {
                for (payload, mulaw_in) in items {
                    self.media(d.stream, &payload, mulaw_in);
                }
            }
        }
    }

    /// Writes one media record (and a mark after every `mark_every`).
    fn media(&mut self, index: u64, payload: &[u8], mulaw_in: bool) {
        let Some(st) = self.streams.get_mut(&index) else {
            return;
        };
        let out = match self.cfg.encoding {
            EchoEncoding::Pcm => PlaybackEncoding::PcmS16le,
            EchoEncoding::Mulaw => PlaybackEncoding::Mulaw,
            EchoEncoding::Alternate => {
                st.alternate = !st.alternate;
                if st.alternate {
                    PlaybackEncoding::Mulaw
                } else {
                    PlaybackEncoding::PcmS16le
                }
            }
        };
        let value: Vec<u8> = match (mulaw_in, out) {
            (false, PlaybackEncoding::PcmS16le) | (true, PlaybackEncoding::Mulaw) => {
                payload.to_vec()
            }
            (false, PlaybackEncoding::Mulaw) => payload
                .chunks_exact(2)
                .map(|s| ulaw_encode(i16::from_le_bytes([s[0], s[1]])))
                .collect(),
            (true, PlaybackEncoding::PcmS16le) => payload
                .iter()
                .flat_map(|&u| ULAW_TO_PCM[u as usize].to_le_bytes())
                .collect(),
        };
        if self.produce(
            index,
            "media",
            Some(out.header()),
            None,
            &value,
            Produced::Media {
                payload: value.clone(),
                encoding: out,
            },
        ) {
            self.s.media_produced += 1;
            let every = self.cfg.mark_every;
            let Some(st) = self.streams.get_mut(&index) else {
                return;
            };
            st.media += 1;
            if every > 0 && st.media % every == 0 {
                st.marks += 1;
                let name = format!("m{index}-{}", st.marks);
                if self.produce(
                    index,
                    "mark",
                    None,
                    Some(&name),
                    &[],
                    Produced::Mark { name: name.clone() },
                ) {
                    self.s.marks_produced += 1;
                }
            }
        }
    }

    /// Clears and stops that are due.
    fn timers(&mut self, now: Instant) {
        let mut clears = Vec::new();
        let mut stops = Vec::new();
        for (&i, st) in self.streams.iter_mut() {
            if st.ended || st.stopped || st.route.is_none() {
                continue;
            }
            if let Some(t) = st.next_clear {
                if now >= t && st.media > 0 {
                    clears.push(i);
                    st.next_clear = Some(t + self.cfg.clear_every);
                }
            }
            if st.stop_at.is_some_and(|t| now >= t) {
                stops.push(i);
                st.stopped = true;
            }
        }
        for i in clears {
            if self.produce(i, "clear", None, None, &[], Produced::Clear) {
                self.s.clears_produced += 1;
            }
        }
        for i in stops {
            if self.produce(i, "stop", None, None, &[], Produced::Stop) {
                self.s.stops_produced += 1;
            }
        }
    }

    /// Announces the record to the verifier, then enqueues it (retrying while the queue is
    /// full for up to ~1 s); a record that cannot be enqueued is retracted.
    fn produce(
        &mut self,
        index: u64,
        kind: &str,
        encoding: Option<&str>,
        name: Option<&str>,
        value: &[u8],
        item: Produced,
    ) -> bool {
        let Some(st) = self.streams.get(&index) else {
            return false;
        };
        let Some((topic, partition)) = st.route.clone() else {
            return false;
        };
        let sid = st.sid.clone();
        let mut headers = OwnedHeaders::new_with_capacity(4).insert(Header {
            key: "type",
            value: Some(kind),
        });
        if let Some(e) = encoding {
            headers = headers
                .insert(Header {
                    key: "encoding",
                    value: Some(e),
                })
                .insert(Header {
                    key: "sample_rate",
                    value: Some("8000"),
                });
        }
        if let Some(n) = name {
            headers = headers.insert(Header {
                key: "name",
                value: Some(n),
            });
        }
        let at = Instant::now();
        self.dl.blocking_send(DlMsg::Produced {
            stream: index,
            at,
            item,
        });
        let mut rec = BaseRecord::to(&topic)
            .partition(partition)
            .key(sid.as_str())
            .payload(value)
            .headers(headers);
        for _ in 0..100 {
            match self.producer.send(rec) {
                Ok(()) => return true,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
        self.s.produce_errors += 1;
        self.dl.blocking_send(DlMsg::Unproduced { stream: index });
        false
    }

    fn summary(&self) -> EchoSummary {
        let mut s = self.s.clone();
        s.bot_lag = Percentiles::of(&self.bot_lag);
        s.gateway_to_bot = Percentiles::of(&self.gateway_to_bot);
        s
    }
}
