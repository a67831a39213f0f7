//! The "Kafka floor": the least a server can do to move a Twilio stream into Kafka — the `floor`
//! server's read loop (tokio + hyper + fastwebsockets, read every frame) plus one librdkafka
//! produce per text frame of the frame's raw bytes. No JSON parsing, no headers, no batching, no
//! budget: the honest yardstick for the gateway's Kafka path (`docs/benchmarks.md`, `docs/decisions.md`).
//!
//! The producer is built from the gateway's own [`gateway::sink::SinkConfig::producer_config`]
//! with its defaults (idempotence, `acks=all`, `linger.ms=5`, no compression,
//! `message.timeout.ms=0`, queue limits 25 % above the 32 MiB window, statistics every second,
//! Nagle off), so the two cannot drift apart. It is an rdkafka `BaseProducer` used directly from
//! the connection tasks; a tokio task serves delivery reports every `--poll-ms` (2 ms). Key = a
//! per-connection id shaped like a `streamSid`, so records spread over the partitions like the
//! gateway's. A full librdkafka queue drops the frame and counts it (the gateway's default
//! `drop-newest`), it never blocks the socket.
//!
//! ```text
//! kafka_floor 127.0.0.1:8099 --brokers 127.0.0.1:9092 --topic floor.raw [--partitions 6]
//!             [--poll-ms 2] [--summary FILE] [--count-back]
//! ```
//!
//! The topic is created at start-up when missing (replication 1). On SIGTERM or SIGINT it
//! flushes for up to 10 s and prints one JSON line of counters (frames read, produced, delivered,
//! failed, dropped) to stderr and to `--summary FILE`: the benchmark checks that the floor
//! really delivered what it read. With `--count-back` it then reads the topic back from the
//! broker (a consumer assigned every partition from the beginning) and adds the number of
//! records it found (`read_back`): proof from the broker's side, not only from delivery reports.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway::sink::SinkConfig;
use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Counters shared by the connection tasks, the poll driver and librdkafka's callbacks.
#[derive(Default)]
struct Counters {
    /// Text frames read from all connections.
    frames: AtomicU64,
    /// Frames librdkafka accepted.
    produced: AtomicU64,
    /// Frames dropped because librdkafka's queue was full.
    queue_full: AtomicU64,
    /// Frames refused by librdkafka for any other reason.
    produce_errors: AtomicU64,
    /// Delivery reports: acknowledged by the broker.
    delivered: AtomicU64,
    /// Delivery reports: failed.
    delivery_failed: AtomicU64,
    /// Callbacks served (delivery reports, statistics, errors): the poll driver's progress.
    served: AtomicU64,
    /// Global client errors reported by librdkafka.
    client_errors: AtomicU64,
    /// Messages librdkafka held at the last statistics callback.
    queued_msgs: AtomicI64,
    /// Connections accepted (also the source of the per-connection keys).
    connections: AtomicU64,
}

/// The producer's context: counts delivery reports, keeps the queue depth from the statistics.
struct FloorContext {
    counters: Arc<Counters>,
}

impl ClientContext for FloorContext {
    fn stats(&self, statistics: Statistics) {
        // Parsed like the gateway does (one JSON document per second).
        self.counters
            .queued_msgs
            .store(statistics.msg_cnt as i64, Ordering::Relaxed);
        self.counters.served.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.counters.client_errors.fetch_add(1, Ordering::Relaxed);
        self.counters.served.fetch_add(1, Ordering::Relaxed);
        eprintln!("kafka_floor: librdkafka error: {error}: {reason}");
    }
}

impl ProducerContext for FloorContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let c = &self.counters;
        match result {
            Ok(_) => c.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.delivery_failed.fetch_add(1, Ordering::Relaxed),
        };
        c.served.fetch_add(1, Ordering::Relaxed);
    }
}

type FloorProducer = BaseProducer<FloorContext>;

/// Command line.
struct Args {
    listen: String,
    brokers: String,
    topic: String,
    partitions: i32,
    poll: Duration,
    summary: Option<String>,
    count_back: bool,
    /// Attach the gateway contract's twelve audio headers (same names, value sizes and
    /// per-record numbers) to every record: how much of the gap to the gateway is headers.
    headers: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:8099".into(),
        brokers: "127.0.0.1:9092".into(),
        topic: "floor.raw".into(),
        partitions: 6,
        poll: Duration::from_millis(2),
        summary: None,
        count_back: false,
        headers: false,
    };
    let mut it = std::env::args().skip(1);
    let mut positional = false;
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--brokers" => args.brokers = value("--brokers")?,
            "--topic" => args.topic = value("--topic")?,
            "--partitions" => {
                args.partitions = value("--partitions")?
                    .parse()
                    .map_err(|e| format!("--partitions: {e}"))?
            }
            "--poll-ms" => {
                let ms: u64 = value("--poll-ms")?
                    .parse()
                    .map_err(|e| format!("--poll-ms: {e}"))?;
                args.poll = Duration::from_millis(ms.max(1));
            }
            "--summary" => args.summary = Some(value("--summary")?),
            "--count-back" => args.count_back = true,
            "--headers" => args.headers = true,
            "-h" | "--help" => {
                return Err(
                    "usage: kafka_floor [LISTEN] --brokers B --topic T [--partitions N] \
                            [--poll-ms MS] [--summary FILE] [--count-back] [--headers]"
                        .into(),
                )
            }
            s if !s.starts_with("--") && !positional => {
                args.listen = s.to_owned();
                positional = true;
            }
            s => return Err(format!("unknown argument {s}")),
        }
    }
    Ok(args)
}

/// Creates `topic` with `partitions` partitions unless it exists.
async fn ensure_topic(config: &ClientConfig, topic: &str, partitions: i32) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|e| format!("admin client: {e}"))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| format!("create topic {topic}: {e}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(format!("create topic {t}: {code}")),
        }
    }
    Ok(())
}

/// Serves librdkafka's callbacks until they stop coming (one event per `poll(0)`).
fn serve_reports(producer: &FloorProducer, counters: &Counters) {
    for _ in 0..4096 {
        let before = counters.served.load(Ordering::Relaxed);
        producer.poll(Duration::ZERO);
        if counters.served.load(Ordering::Relaxed) == before {
            break;
        }
    }
}

/// A 34-byte key shaped like a Twilio `streamSid`, unique per connection.
fn connection_key(n: u64) -> [u8; 34] {
    let mut key = [b'0'; 34];
    key[0] = b'K';
    key[1] = b'F';
    let mut v = n;
    for slot in key[2..].iter_mut().rev() {
        *slot = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
    }
    key
}

/// What every connection task shares.
struct Shared {
    producer: FloorProducer,
    topic: String,
    counters: Arc<Counters>,
    headers: bool,
}

/// The gateway contract's audio headers for record `n` of a connection: the same names and
/// value sizes (34-character SIDs, decimal numbers formatted per record), built the way a
/// plain rust-rdkafka producer would (one `OwnedHeaders`, librdkafka copies each header).
fn contract_headers(key: &[u8; 34], n: u64) -> OwnedHeaders {
    let mut b = itoa::Buffer::new();
    let sid = &key[..];
    OwnedHeaders::new_with_capacity(12)
        .insert(Header {
            key: "stream_sid",
            value: Some(sid),
        })
        .insert(Header {
            key: "call_sid",
            value: Some(sid),
        })
        .insert(Header {
            key: "account_sid",
            value: Some(sid),
        })
        .insert(Header {
            key: "track",
            value: Some(&b"inbound"[..]),
        })
        .insert(Header {
            key: "seq",
            value: Some(b.format(n + 2).as_bytes()),
        })
        .insert(Header {
            key: "chunk",
            value: Some(b.format(n + 1).as_bytes()),
        })
        .insert(Header {
            key: "timestamp_ms",
            value: Some(b.format(n * 20).as_bytes()),
        })
        .insert(Header {
            key: "encoding",
            value: Some(&b"pcm_s16le"[..]),
        })
        .insert(Header {
            key: "sample_rate",
            value: Some(&b"8000"[..]),
        })
        .insert(Header {
            key: "channels",
            value: Some(&b"1"[..]),
        })
        .insert(Header {
            key: "gateway",
            value: Some(&b"kafka-floor-0"[..]),
        })
        .insert(Header {
            key: "received_at_us",
            value: Some(b.format(1_764_000_000_000_000u64 + n).as_bytes()),
        })
}

/// Read loop of one upgraded connection: every text frame becomes one Kafka record.
async fn read_and_produce(
    fut: fastwebsockets::upgrade::UpgradeFut,
    shared: Arc<Shared>,
    key: [u8; 34],
) {
    let Ok(mut ws) = fut.await else { return };
    ws.set_max_message_size(64 * 1024);
    let c = &shared.counters;
    let mut n = 0u64;
    while let Ok(frame) = ws.read_frame().await {
        match frame.opcode {
            fastwebsockets::OpCode::Close => break,
            fastwebsockets::OpCode::Text => {
                c.frames.fetch_add(1, Ordering::Relaxed);
                let mut record = BaseRecord::<[u8], [u8]>::to(&shared.topic)
                    .key(&key[..])
                    .payload(&frame.payload[..]);
                if shared.headers {
                    record = record.headers(contract_headers(&key, n));
                }
                n += 1;
                match shared.producer.send(record) {
                    Ok(()) => c.produced.fetch_add(1, Ordering::Relaxed),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        c.queue_full.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => c.produce_errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            _ => {}
        }
    }
}

/// Reads `topic` back from the beginning of each of its `partitions` and counts the records,
/// until `expected` are found or nothing has arrived for 5 s.
fn count_back(brokers: &str, topic: &str, partitions: i32, expected: u64) -> Result<u64, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kafka-floor-count-back")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| format!("assign: {e}"))?;
    }
    consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
    let mut n = 0u64;
    let mut last = std::time::Instant::now();
    while n < expected && last.elapsed() < Duration::from_secs(5) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                n += 1;
                last = std::time::Instant::now();
            }
            Some(Err(e)) => eprintln!("kafka_floor: count-back: {e}"),
            None => {}
        }
    }
    Ok(n)
}

/// The counters as one JSON line.
fn summary_json(c: &Counters, in_flight: i32, read_back: Option<u64>) -> String {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let read_back = read_back.map_or("null".to_owned(), |n| n.to_string());
    format!(
        "{{\"connections\":{},\"frames\":{},\"produced\":{},\"queue_full\":{},\
         \"produce_errors\":{},\"delivered\":{},\"delivery_failed\":{},\"client_errors\":{},\
         \"in_flight_at_exit\":{},\"read_back\":{read_back}}}",
        g(&c.connections),
        g(&c.frames),
        g(&c.produced),
        g(&c.queue_full),
        g(&c.produce_errors),
        g(&c.delivered),
        g(&c.delivery_failed),
        g(&c.client_errors),
        in_flight
    )
}

fn raise_nofile_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kafka_floor: {e}");
            std::process::exit(64);
        }
    };
    raise_nofile_limit();
    let mut sink = SinkConfig::new(&args.brokers, "kafka-floor");
    sink.gateway_id = format!("kafka-floor-{}", std::process::id());
    let config = sink.producer_config();
    let mut admin_config = ClientConfig::new();
    admin_config.set("bootstrap.servers", &args.brokers);
    if let Err(e) = ensure_topic(&admin_config, &args.topic, args.partitions).await {
        eprintln!("kafka_floor: {e}");
        std::process::exit(69);
    }
    let counters = Arc::new(Counters::default());
    let producer: FloorProducer = match config.create_with_context(FloorContext {
        counters: counters.clone(),
    }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kafka_floor: producer: {e}");
            std::process::exit(69);
        }
    };
    // A BTreeMap: already sorted by key.
    let settings = config.config_map();
    eprintln!("kafka_floor: producer settings {settings:?}");
    let shared = Arc::new(Shared {
        producer,
        topic: args.topic.clone(),
        counters,
        headers: args.headers,
    });

    // Delivery reports: a tokio task, like the gateway's earlier "BaseProducer polled by an
    // interval" design (the gateway now polls from its drain thread every 1 ms).
    let poller = shared.clone();
    let poll_every = args.poll;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            serve_reports(&poller.producer, &poller.counters);
        }
    });

    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kafka_floor: bind {}: {e}", args.listen);
            std::process::exit(69);
        }
    };
    eprintln!(
        "kafka_floor: listening on {}, producing to {} ({} partitions) at {}",
        args.listen, args.topic, args.partitions, args.brokers
    );
    let acceptor = {
        let shared = shared.clone();
        async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let n = shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                let key = connection_key(n);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let handle = move |mut req: Request<hyper::body::Incoming>| {
                        let shared = shared.clone();
                        async move {
                            let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
                            tokio::spawn(read_and_produce(fut, shared, key));
                            Ok::<Response<Empty<Bytes>>, fastwebsockets::WebSocketError>(resp)
                        }
                    };
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service_fn(handle))
                        .with_upgrades()
                        .await;
                });
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = acceptor => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Flush what is queued (without a deadline librdkafka would wait forever: timeout 0).
    let flusher = shared.clone();
    let in_flight = tokio::task::spawn_blocking(move || {
        let _ = flusher.producer.flush(Duration::from_secs(10));
        serve_reports(&flusher.producer, &flusher.counters);
        flusher.producer.in_flight_count()
    })
    .await
    .unwrap_or(-1);
    let read_back = if args.count_back {
        let delivered = shared.counters.delivered.load(Ordering::Relaxed);
        let (brokers, topic, partitions) =
            (args.brokers.clone(), args.topic.clone(), args.partitions);
        match tokio::task::spawn_blocking(move || {
            count_back(&brokers, &topic, partitions, delivered)
        })
        .await
        {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => {
                eprintln!("kafka_floor: count-back: {e}");
                None
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let line = summary_json(&shared.counters, in_flight, read_back);
    eprintln!("kafka_floor: summary {line}");
    if let Some(path) = &args.summary {
        if let Err(e) = std::fs::write(path, format!("{line}\n")) {
            eprintln!("kafka_floor: writing {path}: {e}");
        }
    }
    // Dropping a BaseProducer purges what it still holds; nothing is left after the flush, and
    // the process ends here anyway.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stream_sid_sized_and_distinct() {
        let a = connection_key(0);
        let b = connection_key(0xabc);
        assert_eq!(a.len(), 34);
        assert_eq!(&a[..2], b"KF");
        assert_ne!(a, b);
        assert!(b.ends_with(b"abc"));
    }
}
