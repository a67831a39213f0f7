//! Kafka faults against librdkafka's in-process mock cluster (`rdkafka::mocking::MockCluster`),
//! driving the real `Sink` (drain thread included) + `ConnectionPublisher` + `Session` (no
//! gateway process, no broker process): a broker outage, retriable produce errors, delivery
//! timeouts, added round-trip time, the overflow policies and a fatal producer error. Fast and
//! deterministic enough to run in the normal `cargo test`; the real-broker outage tests are in
//! `faults.rs`.

mod support;

use support::ulaw_to_pcm;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::metrics::{DropReason, Metrics};
use gateway::protocol::parse;
use gateway::session::{Flow, Received, Session, SessionConfig};
use gateway::sink::record::RECORD_OVERHEAD;
use gateway::sink::{ConnectionPublisher, OverflowPolicy, Sink, SinkConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The mock clusters are cheap, but the timing assertions are not shared-CPU friendly: one at a
/// time.
static SERIAL: Mutex<()> = Mutex::new(());

const ACCOUNT: &str = "AC00000000000000000000000000000077";
const PREFIX: &str = "mock";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn topics() -> [String; 3] {
    [
        format!("{PREFIX}.audio.inbound"),
        format!("{PREFIX}.audio.outbound"),
        format!("{PREFIX}.events"),
    ]
}

/// A mock cluster with one broker (id 1) and the three topics.
fn cluster(partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let mock = MockCluster::new(1).expect("mock cluster");
    for t in topics() {
        mock.create_topic(&t, partitions, 1).expect("create topic");
    }
    mock
}

/// The sink under test (its drain thread polls librdkafka).
struct Harness {
    sink: Sink,
    metrics: Arc<Metrics>,
}

impl Harness {
    fn new(brokers: &str, options: &[(&str, &str)]) -> Harness {
        Harness::with_budget(brokers, options, 64 << 20, OverflowPolicy::DropNewest)
    }

    fn with_budget(
        brokers: &str,
        options: &[(&str, &str)],
        budget: u64,
        overflow: OverflowPolicy,
    ) -> Harness {
        let mut cfg = SinkConfig::new(brokers, PREFIX);
        cfg.gateway_id = "gw-mock".to_owned();
        cfg.max_inflight_bytes = budget;
        cfg.window_bytes = (32 << 20).min(budget / 2);
        cfg.overflow = overflow;
        cfg.create_topics = false;
        cfg.topic_partitions = 1;
        for (k, v) in options {
            cfg.kafka = cfg.kafka.with(k, v);
        }
        let metrics = Metrics::new("gw-mock");
        let sink = Sink::start(&cfg, metrics.clone()).expect("sink");
        Harness { sink, metrics }
    }

    /// Waits until every audio record and event got a delivery report (success or failure).
    fn wait_settled(&self, audio: u64, events: u64, timeout: Duration) {
        let m = &self.metrics;
        let start = Instant::now();
        loop {
            let frames = m.frames_delivered.get() + m.dropped[DropReason::DeliveryFailed].get();
            let evs = m.events_delivered.get() + m.events_failed.get();
            if frames >= audio && evs >= events {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "not settled after {timeout:?}: frames {frames}/{audio}, events {evs}/{events}\n{}",
                String::from_utf8_lossy(&m.render())
                    .lines()
                    .filter(|l| l.starts_with("gateway_frames")
                        || l.starts_with("gateway_events")
                        || l.starts_with("gateway_inflight_bytes")
                        || l.starts_with("gateway_kafka_queue_messages"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.metrics.render()).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|r| r.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Failed tests may leave records queued: do not wait for them.
        let _ = self.sink.finish(Duration::from_millis(100));
    }
}

fn sid(prefix: &str, n: u64) -> String {
    format!("{prefix}{n:032x}")
}

fn now() -> Received {
    Received {
        unix_us: gateway::unix_micros(),
        mono_us: gateway::mono_micros(),
    }
}

/// μ-law chunk `k` of a stream: 160 distinct-looking bytes.
fn chunk(stream: u64, k: u64) -> Vec<u8> {
    (0..160u64)
        .map(|i| (i.wrapping_mul(13) ^ k.wrapping_mul(7) ^ stream) as u8)
        .collect()
}

/// One stream fed through the real session and connection publisher.
struct Stream {
    n: u64,
    stream_sid: String,
    call_sid: String,
    session: Session,
    publisher: ConnectionPublisher,
    seq: u64,
    sent: u64,
}

impl Stream {
    fn start(sink: &Sink, n: u64) -> Stream {
        let mut s = Stream {
            n,
            stream_sid: sid("MZ", n),
            call_sid: sid("CA", n),
            session: Session::new(SessionConfig::default()),
            publisher: ConnectionPublisher::new(sink.clone()),
            seq: 1,
            sent: 0,
        };
        let msg = format!(
            r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"{ACCOUNT}","streamSid":"{}","callSid":"{}","tracks":["inbound"],"customParameters":{{}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{}"}}"#,
            s.stream_sid, s.call_sid, s.stream_sid
        );
        assert_eq!(s.feed(&msg), Flow::Continue);
        s
    }

    fn feed(&mut self, msg: &str) -> Flow {
        let mut buf = msg.as_bytes().to_vec();
        let parsed = parse(&mut buf).expect("valid message");
        self.session
            .handle(&parsed.message, now(), &mut self.publisher)
            .expect("accepted")
    }

    fn media(&mut self) {
        self.seq += 1;
        self.sent += 1;
        let k = self.sent;
        let msg = format!(
            r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"inbound","chunk":"{k}","timestamp":"{}","payload":"{}"}},"streamSid":"{}"}}"#,
            self.seq,
            (k - 1) * 20,
            base64_simd::STANDARD.encode_to_string(chunk(self.n, k)),
            self.stream_sid
        );
        assert_eq!(self.feed(&msg), Flow::Continue);
    }

    fn stop(&mut self) {
        self.seq += 1;
        let msg = format!(
            r#"{{"event":"stop","sequenceNumber":"{}","stop":{{"accountSid":"{ACCOUNT}","callSid":"{}"}},"streamSid":"{}"}}"#,
            self.seq, self.call_sid, self.stream_sid
        );
        assert_eq!(self.feed(&msg), Flow::Stopped);
    }
}

struct Consumed {
    topic: String,
    key: Option<String>,
    value: Vec<u8>,
    chunk: Option<u64>,
}

/// Reads every partition of `topics` from the beginning until `want` records or `timeout`.
fn consume(brokers: &str, topics: &[String], want: usize, timeout: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "mock-tests-unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("metadata");
        for p in 0..md.topics()[0].partitions().len() as i32 {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < want && start.elapsed() < timeout {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let chunk = m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == "chunk")
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
            });
            out.push(Consumed {
                topic: m.topic().to_owned(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                chunk,
            });
        }
    }
    // A little longer: anything beyond `want` is a duplicate.
    let extra = Instant::now();
    while extra.elapsed() < Duration::from_millis(500) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(Consumed {
                topic: m.topic().to_owned(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                chunk: None,
            });
        }
    }
    out
}

/// Every stream's chunks arrived exactly once, in order, bit-exact.
fn assert_exactly_once_in_order(recs: &[Consumed], streams: &[Stream]) {
    let audio: Vec<&Consumed> = recs
        .iter()
        .filter(|r| r.topic.contains(".audio."))
        .collect();
    let total: u64 = streams.iter().map(|s| s.sent).sum();
    if audio.len() as u64 != total {
        for s in streams {
            let chunks: Vec<u64> = audio
                .iter()
                .filter(|r| r.key.as_deref() == Some(s.stream_sid.as_str()))
                .filter_map(|r| r.chunk)
                .collect();
            let missing: Vec<u64> = (1..=s.sent).filter(|k| !chunks.contains(k)).collect();
            eprintln!(
                "{}: {} records, missing {missing:?}",
                s.stream_sid,
                chunks.len()
            );
        }
    }
    assert_eq!(
        audio.len() as u64,
        total,
        "audio records (loss or duplicates)"
    );
    for s in streams {
        let mine: Vec<&&Consumed> = audio
            .iter()
            .filter(|r| r.key.as_deref() == Some(s.stream_sid.as_str()))
            .collect();
        assert_eq!(mine.len() as u64, s.sent, "{}", s.stream_sid);
        for (i, r) in mine.iter().enumerate() {
            let k = i as u64 + 1;
            assert_eq!(r.chunk, Some(k), "{} order", s.stream_sid);
            assert_eq!(
                r.value,
                ulaw_to_pcm(&chunk(s.n, k)),
                "{} chunk {k}",
                s.stream_sid
            );
        }
    }
}

fn event_types(recs: &[Consumed]) -> Vec<String> {
    recs.iter()
        .filter(|r| r.topic.ends_with(".events"))
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            v["type"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn wait_gauge_zero(h: &Harness, timeout: Duration) {
    let start = Instant::now();
    while h.metrics.inflight_bytes.get() != 0 && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        h.metrics.inflight_bytes.get(),
        0,
        "in-flight gauge back to 0"
    );
}

#[test]
fn broker_down_then_up_delivers_everything_exactly_once_in_order() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    let h = Harness::new(&brokers, &[]);
    let mut streams: Vec<Stream> = (0..4).map(|i| Stream::start(&h.sink, 100 + i)).collect();
    // Some audio while the broker is up.
    for _ in 0..20 {
        for s in streams.iter_mut() {
            s.media();
        }
    }
    h.wait_settled(80, 4, Duration::from_secs(10));
    mock.broker_down(1).unwrap();
    // Three seconds of real-time audio (4 streams × 50 chunks/s) into a dead broker.
    let t0 = Instant::now();
    for _ in 0..150 {
        for s in streams.iter_mut() {
            s.media();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert!(
        h.metrics.inflight_bytes.get() > 0,
        "audio is held while the broker is down"
    );
    assert!(
        h.metrics.frames_delivered.get() < 4 * 170,
        "nothing acked while down"
    );
    mock.broker_up(1).unwrap();
    for s in streams.iter_mut() {
        for _ in 0..10 {
            s.media();
        }
        s.stop();
    }
    let total: u64 = streams.iter().map(|s| s.sent).sum();
    assert_eq!(total, 4 * 180);
    h.wait_settled(total, 8, Duration::from_secs(60));
    assert_eq!(h.metrics.frames_delivered.get(), total);
    assert_eq!(h.metrics.dropped[DropReason::DeliveryFailed].get(), 0);
    assert_eq!(h.metrics.events_failed.get(), 0);
    wait_gauge_zero(&h, Duration::from_secs(5));
    let recs = consume(
        &brokers,
        &topics(),
        total as usize + 8,
        Duration::from_secs(30),
    );
    assert_exactly_once_in_order(&recs, &streams);
    let evs = event_types(&recs);
    assert_eq!(evs.iter().filter(|t| *t == "start").count(), 4);
    assert_eq!(evs.iter().filter(|t| *t == "stop").count(), 4);
    assert_eq!(evs.len(), 8);
    for s in &streams {
        assert_eq!(s.session.frames_published(), 180);
        assert_eq!(s.session.frames_dropped(), 0);
    }
}

#[test]
fn retriable_produce_errors_still_deliver_exactly_once() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    // One request in flight per connection. The mock cluster checks idempotent sequence numbers
    // only for transactional producers, so with several batches in flight it appends a later
    // batch while an earlier one is being retried after an ambiguous error (REQUEST_TIMED_OUT,
    // NOT_ENOUGH_REPLICAS_AFTER_APPEND); librdkafka then rightly infers from the later success
    // that the earlier batch was persisted — true on Kafka, which rejects out-of-order
    // sequences, false on the mock. Retries, not the mock's idempotence, are under test here.
    let h = Harness::new(&brokers, &[("max.in.flight.requests.per.connection", "1")]);
    let mut streams: Vec<Stream> = (0..3).map(|i| Stream::start(&h.sink, 200 + i)).collect();
    h.wait_settled(0, 3, Duration::from_secs(10));
    // The next produce requests fail with retriable errors, several times over.
    use RDKafkaRespErr::*;
    let errs = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    ];
    mock.request_errors(RDKafkaApiKey::Produce, &errs);
    for round in 0..100 {
        for s in streams.iter_mut() {
            s.media();
        }
        if round == 50 {
            // A second burst in the middle of the stream.
            mock.request_errors(RDKafkaApiKey::Produce, &errs);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in streams.iter_mut() {
        s.stop();
    }
    h.wait_settled(300, 6, Duration::from_secs(60));
    assert_eq!(h.metrics.frames_delivered.get(), 300);
    assert_eq!(h.metrics.dropped[DropReason::DeliveryFailed].get(), 0);
    wait_gauge_zero(&h, Duration::from_secs(5));
    let recs = consume(&brokers, &topics(), 306, Duration::from_secs(30));
    assert_exactly_once_in_order(&recs, &streams);
    assert_eq!(event_types(&recs).len(), 6, "events exactly once");
}

#[test]
fn delivery_timeout_with_broker_down_counts_exactly_the_lost_frames() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    let h = Harness::new(
        &brokers,
        &[
            ("message.timeout.ms", "2000"),
            // Reconnect promptly once the broker is back (the default backs off up to 10 s,
            // longer than the 2 s timeout of the audio sent after the outage).
            ("reconnect.backoff.ms", "50"),
            ("reconnect.backoff.max.ms", "200"),
        ],
    );
    let mut s = Stream::start(&h.sink, 300);
    for _ in 0..30 {
        s.media();
    }
    h.wait_settled(30, 1, Duration::from_secs(10));
    assert_eq!(h.metrics.frames_delivered.get(), 30);
    mock.broker_down(1).unwrap();
    // 40 chunks into the dead broker: every one times out after 2 s.
    for _ in 0..40 {
        s.media();
        std::thread::sleep(Duration::from_millis(10));
    }
    h.wait_settled(70, 1, Duration::from_secs(20));
    assert_eq!(h.metrics.frames_delivered.get(), 30);
    assert_eq!(
        h.metric("gateway_frames_failed_total{error=\"MessageTimedOut\"}"),
        40.0
    );
    assert_eq!(h.metrics.dropped[DropReason::DeliveryFailed].get(), 40);
    assert_eq!(
        h.metric("gateway_frames_dropped_total{reason=\"delivery_failed\"}"),
        40.0
    );
    // Handed to the producer: the session counted them as published, not dropped.
    assert_eq!(s.session.frames_published(), 70);
    assert_eq!(s.session.frames_dropped(), 0);
    wait_gauge_zero(&h, Duration::from_secs(5));
    // Back up: new audio flows again and only the timed-out chunks are missing.
    mock.broker_up(1).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..10 {
        s.media();
    }
    s.stop();
    h.wait_settled(80, 2, Duration::from_secs(30));
    assert_eq!(h.metrics.frames_delivered.get(), 40);
    let recs = consume(&brokers, &topics()[..1], 40, Duration::from_secs(30));
    let chunks: Vec<u64> = recs.iter().filter_map(|r| r.chunk).collect();
    let want: Vec<u64> = (1..=30).chain(71..=80).collect();
    assert_eq!(chunks, want, "exactly the timed-out chunks are missing");
    assert_eq!(
        h.metric("gateway_frames_dropped_total{reason=\"delivery_failed\"}"),
        40.0
    );
}

#[test]
fn non_retriable_produce_error_counts_the_failed_frames() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    let h = Harness::new(&brokers, &[]);
    let mut s = Stream::start(&h.sink, 400);
    h.wait_settled(0, 1, Duration::from_secs(10));
    // One produce request refused for good. linger.ms=5 and one message every 50 ms: one record
    // per request, so exactly one frame fails.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    for _ in 0..10 {
        s.media();
        std::thread::sleep(Duration::from_millis(50));
    }
    s.stop();
    let published = s.session.frames_published();
    h.wait_settled(published, 2, Duration::from_secs(30));
    let failed = h.metric("gateway_frames_failed_total{error=\"MessageSizeTooLarge\"}");
    assert_eq!(
        failed,
        1.0,
        "{}",
        String::from_utf8_lossy(&h.metrics.render())
    );
    assert_eq!(h.metrics.dropped[DropReason::DeliveryFailed].get(), 1);
    // Every chunk is accounted for once: delivered, failed after the handover, or refused at it.
    let delivered = h.metrics.frames_delivered.get();
    assert_eq!(published, delivered + 1);
    assert_eq!(published + s.session.frames_dropped(), 10);
    wait_gauge_zero(&h, Duration::from_secs(5));
    let recs = consume(
        &brokers,
        &topics()[..1],
        delivered as usize,
        Duration::from_secs(30),
    );
    let chunks: Vec<u64> = recs.iter().filter_map(|r| r.chunk).collect();
    assert_eq!(
        chunks.len() as u64,
        delivered,
        "Kafka holds exactly the delivered frames"
    );
    assert!(
        !chunks.contains(&1),
        "chunk 1 (the refused request) is not in Kafka"
    );
    assert!(
        chunks.windows(2).all(|w| w[0] < w[1]),
        "in order: {chunks:?}"
    );
}

#[test]
fn added_round_trip_time_shows_in_the_delivery_latency_histogram() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    let h = Harness::new(&brokers, &[]);
    let mut s = Stream::start(&h.sink, 500);
    h.wait_settled(0, 1, Duration::from_secs(10));
    let rtt = Duration::from_millis(300);
    mock.broker_round_trip_time(1, rtt).unwrap();
    for _ in 0..20 {
        s.media();
        std::thread::sleep(Duration::from_millis(20));
    }
    s.stop();
    h.wait_settled(20, 2, Duration::from_secs(30));
    let lat = &h.metrics.delivery_latency;
    assert_eq!(lat.get_sample_count(), 20);
    let mean = lat.get_sample_sum() / lat.get_sample_count() as f64;
    assert!(
        mean >= rtt.as_secs_f64(),
        "mean delivery latency {mean}s below the added RTT {rtt:?}"
    );
    assert!(mean < 5.0, "mean delivery latency {mean}s");
    // The receive-to-ack histogram includes it too.
    let r2a = &h.metrics.receive_to_ack;
    assert!(r2a.get_sample_sum() / r2a.get_sample_count() as f64 >= rtt.as_secs_f64());
    // And the rendered text agrees with the handles.
    let text = String::from_utf8(h.metrics.render()).unwrap();
    assert!(text.contains("gateway_kafka_delivery_latency_seconds_count 20"));
}

#[test]
fn drop_oldest_evicts_the_oldest_spooled_audio_keeps_events_and_accounts_every_frame() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    // Room for ~30 records in librdkafka and ~300 in the spool.
    let budget = (354 + RECORD_OVERHEAD) * 64;
    let h = Harness::with_budget(
        &brokers,
        &[
            ("reconnect.backoff.ms", "50"),
            ("reconnect.backoff.max.ms", "200"),
        ],
        budget,
        OverflowPolicy::DropOldest,
    );
    h.sink.budget().set_watermark(0.5);
    mock.broker_down(1).unwrap();
    let mut s = Stream::start(&h.sink, 400);
    // 1,000 chunks into a dead broker, paced so the drain evicts as fast as they come.
    for i in 0..1000 {
        s.media();
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    let evicted = h.metrics.dropped[DropReason::Evicted].get();
    assert!(evicted > 500, "evicted {evicted}");
    assert!(
        h.sink.budget().used() <= budget + budget / 16,
        "bounded by budget + overdraft"
    );
    mock.broker_up(1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        s.media();
        std::thread::sleep(Duration::from_millis(5));
    }
    s.stop();
    let sent = s.sent;
    let settled = || {
        let m = &h.metrics;
        m.frames_delivered.get()
            + m.dropped[DropReason::QueueFull].get()
            + m.dropped[DropReason::Evicted].get()
            + m.dropped[DropReason::DeliveryFailed].get()
    };
    let start = Instant::now();
    while settled() < sent || h.metrics.events_delivered.get() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not settled: {} of {sent}",
            settled()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        settled(),
        sent,
        "every frame delivered or dropped with a reason"
    );
    assert_eq!(h.metrics.dropped[DropReason::DeliveryFailed].get(), 0);
    wait_gauge_zero(&h, Duration::from_secs(5));
    assert!(!h.sink.over_watermark());
    // Kafka holds exactly the delivered chunks, in order, the newest included; events intact.
    let delivered = h.metrics.frames_delivered.get() as usize;
    let recs = consume(&brokers, &topics(), delivered + 2, Duration::from_secs(30));
    let chunks: Vec<u64> = recs.iter().filter_map(|r| r.chunk).collect();
    assert_eq!(chunks.len(), delivered);
    assert!(chunks.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(chunks.last(), Some(&sent));
    let evs = event_types(&recs);
    assert_eq!(evs, ["start", "stop"], "events are never evicted");
    let stop = recs
        .iter()
        .find(|r| r.topic.ends_with(".events") && r.value.windows(6).any(|w| w == b"\"stop\""))
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.value).unwrap())
        .unwrap();
    assert_eq!(stop["frames_received"], sent);
    assert_eq!(stop["frames_delivered"].as_u64(), Some(delivered as u64));
    assert_eq!(
        stop["frames_dropped"].as_u64(),
        Some(sent - delivered as u64),
        "the stop event's accounting matches what Kafka holds"
    );
    assert_eq!(stop["drops"]["evicted"].as_u64(), Some(evicted_total(&h)));
}

fn evicted_total(h: &Harness) -> u64 {
    h.metrics.dropped[DropReason::Evicted].get()
}

#[test]
fn fatal_producer_error_fails_readiness_rebuilds_and_delivers_everything_once() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    let h = Harness::new(
        &brokers,
        &[
            ("reconnect.backoff.ms", "50"),
            ("reconnect.backoff.max.ms", "200"),
        ],
    );
    let mut s = Stream::start(&h.sink, 600);
    for _ in 0..20 {
        s.media();
    }
    h.wait_settled(20, 1, Duration::from_secs(10));
    assert!(h.sink.producer_healthy());
    // Records held by librdkafka when the fatal error strikes: the broker is down.
    mock.broker_down(1).unwrap();
    for _ in 0..30 {
        s.media();
    }
    std::thread::sleep(Duration::from_millis(100));
    h.sink
        .inject_fatal_error("test: idempotence sequence desync");
    let start = Instant::now();
    while h.metrics.kafka_producer_rebuilds.get() == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no rebuild");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.metrics.kafka_fatal_errors.get(), 1);
    // The rebuilt producer still holds the re-sent records (broker down): not ready.
    assert!(
        !h.sink.producer_healthy(),
        "readiness fails until it delivers"
    );
    assert_eq!(h.metrics.kafka_producer_healthy.get(), 0);
    mock.broker_up(1).unwrap();
    for _ in 0..10 {
        s.media();
    }
    s.stop();
    h.wait_settled(60, 2, Duration::from_secs(30));
    assert!(h.sink.producer_healthy());
    assert_eq!(h.metrics.frames_delivered.get(), 60);
    assert_eq!(
        h.metrics.dropped.total(),
        0,
        "nothing lost across the rebuild"
    );
    let recs = consume(&brokers, &topics(), 62, Duration::from_secs(30));
    let chunks: Vec<u64> = recs.iter().filter_map(|r| r.chunk).collect();
    assert_eq!(
        chunks,
        (1..=60).collect::<Vec<_>>(),
        "exactly once, in order"
    );
}

#[test]
fn disconnect_policy_asks_the_connection_to_close_and_counts_the_drop() {
    let _g = serial();
    let mock = cluster(1);
    let brokers = mock.bootstrap_servers();
    let budget = (354 + RECORD_OVERHEAD) * 32;
    let h = Harness::with_budget(&brokers, &[], budget, OverflowPolicy::Disconnect);
    h.sink.budget().set_watermark(0.5);
    mock.broker_down(1).unwrap();
    let mut s = Stream::start(&h.sink, 500);
    assert!(!s.publisher.backpressure_close());
    let mut fed = 0;
    while !s.publisher.backpressure_close() {
        s.media();
        fed += 1;
        assert!(fed < 1000, "budget never filled");
    }
    // The readiness watermark (half the budget) is crossed once the drain has moved what it
    // can into librdkafka's window.
    let start = Instant::now();
    while !h.sink.over_watermark() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "watermark never crossed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(h.sink.budget().used() <= budget);
    assert_eq!(h.metrics.dropped[DropReason::QueueFull].get(), 1);
    assert_eq!(
        s.session.frames_published() + s.session.frames_dropped(),
        s.sent
    );
    assert_eq!(s.session.frames_dropped(), 1);
    mock.broker_up(1).unwrap();
    h.wait_settled(s.sent - 1, 1, Duration::from_secs(30));
    wait_gauge_zero(&h, Duration::from_secs(5));
    assert!(!h.sink.over_watermark());
}
