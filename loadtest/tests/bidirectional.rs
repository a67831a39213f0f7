//! The `bidirectional` scenario (and the latency probe) end to end through a real broker.
//!
//! The gateway's side of bidirectional streams is built elsewhere; until it lands, this test
//! runs the scenario against a small mock gateway written here to the same contract: it
//! publishes `start` events with a `playback` route and the caller's audio as PCM records,
//! reads `<prefix>.playback` and sends media (μ-law, 160-byte frames), marks and clears to
//! the socket, closes with 1000 on `stop`, and reports echoed marks with `played`. The point
//! is the harness — the echo bot, the simulated Twilio playout and both verifiers, through
//! Tansu — not the mock. The test against the real gateway goes in `gateway/tests/`, calling
//! the same [`scenario::run_with`].

use bytes::Bytes;
use fastwebsockets::{upgrade, Frame, OpCode, Payload, WebSocketWrite};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use loadtest::audio::{ulaw_encode, ChunkTable, ULAW_TO_PCM};
use loadtest::echo::{EchoConfig, EchoEncoding};
use loadtest::probe::ProbeConfig;
use loadtest::scenario::{self, BidiConfig, RunConfig, RunOptions, Scenario};
use loadtest::stream::StreamConfig;
use loadtest::verify::VerifyConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

const PARTITIONS: i32 = 3;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A Tansu broker for this test binary (`LOADTEST_TEST_BROKERS` to use another), killed
/// with the process (PR_SET_PDEATHSIG from a thread that lives as long as the process).
fn brokers() -> String {
    static B: OnceLock<String> = OnceLock::new();
    B.get_or_init(|| {
        if let Ok(b) = std::env::var("LOADTEST_TEST_BROKERS") {
            return b;
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .to_path_buf();
        let out = Command::new("bash")
            .arg(root.join("scripts/install-broker.sh"))
            .output()
            .expect("install-broker.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: prctl in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = cmd.spawn().map(|_| ()).map_err(|e| e.to_string());
            if r.is_ok() {
                tx.send(r).expect("report");
                loop {
                    std::thread::park();
                }
            }
            tx.send(r).expect("report");
        });
        rx.recv().expect("spawned").expect("start tansu");
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "broker did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        format!("127.0.0.1:{port}")
    })
    .clone()
}

async fn create_topics(brokers: &str, prefix: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let names: Vec<String> = ["audio.inbound", "audio.outbound", "events", "playback"]
        .iter()
        .map(|t| format!("{prefix}.{t}"))
        .collect();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(topics.iter(), &opts)
        .await
        .expect("create")
    {
        r.expect("topic created");
    }
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64
}

/// What the mock's playback reader hands a stream's writer.
#[derive(Debug)]
enum Out {
    Media(Vec<u8>),
    Mark(String),
    Clear,
    Stop,
    /// Answer the client's close.
    Close,
}

struct Mock {
    producer: BaseProducer,
    prefix: String,
    streams: Mutex<HashMap<String, mpsc::UnboundedSender<Out>>>,
    stop: AtomicBool,
}

impl Mock {
    fn send(&self, topic: &str, partition: Option<i32>, key: &str, value: &[u8], h: OwnedHeaders) {
        let topic = format!("{}.{topic}", self.prefix);
        let mut rec = BaseRecord::to(&topic).key(key).payload(value).headers(h);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn event(&self, sid: &str, v: Value) {
        self.send(
            "events",
            None,
            sid,
            v.to_string().as_bytes(),
            OwnedHeaders::new(),
        );
    }
}

fn headers(pairs: &[(&str, String)]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(pairs.len());
    for (k, v) in pairs {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_str()),
        });
    }
    h
}

/// Starts the mock gateway; returns its address.
async fn mock_gateway(brokers: &str, prefix: &str) -> SocketAddr {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "2")
        .create()
        .expect("producer");
    let mock = Arc::new(Mock {
        producer,
        prefix: prefix.to_string(),
        streams: Mutex::new(HashMap::new()),
        stop: AtomicBool::new(false),
    });
    // Producer poll thread.
    let m = mock.clone();
    std::thread::spawn(move || {
        while !m.stop.load(Ordering::Relaxed) {
            m.producer.poll(Duration::from_millis(20));
        }
    });
    // Playback reader: assigned at the end before any stream starts.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "mock-gateway")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("consumer");
    let topic = format!("{prefix}.playback");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (_, high) = consumer
            .fetch_watermarks(&topic, p, Duration::from_secs(10))
            .expect("watermarks");
        tpl.add_partition_offset(&topic, p, Offset::Offset(high))
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let m = mock.clone();
    std::thread::spawn(move || {
        while !m.stop.load(Ordering::Relaxed) {
            let Some(Ok(msg)) = consumer.poll(Duration::from_millis(20)) else {
                continue;
            };
            let Some(sid) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                continue;
            };
            let (mut kind, mut enc, mut name) =
                ("media".to_string(), "pcm_s16le".to_string(), String::new());
            if let Some(h) = msg.headers() {
                for hd in h.iter() {
                    let v = String::from_utf8_lossy(hd.value.unwrap_or(&[])).into_owned();
                    match hd.key {
                        "type" => kind = v,
                        "encoding" => enc = v,
                        "name" => name = v,
                        _ => {}
                    }
                }
            }
            let payload = msg.payload().unwrap_or(&[]);
            let out = match kind.as_str() {
                "media" if enc == "mulaw" => Out::Media(payload.to_vec()),
                "media" => Out::Media(
                    payload
                        .chunks_exact(2)
                        .map(|s| ulaw_encode(i16::from_le_bytes([s[0], s[1]])))
                        .collect(),
                ),
                "mark" => Out::Mark(name),
                "clear" => Out::Clear,
                "stop" => Out::Stop,
                _ => continue,
            };
            if let Some(tx) = m.streams.lock().expect("lock").get(sid) {
                let _ = tx.send(out);
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let mock = mock.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    let mock = mock.clone();
                    async move {
                        let (resp, fut) = upgrade::upgrade(&mut req).expect("upgrade");
                        tokio::spawn(async move {
                            if let Ok(ws) = fut.await {
                                connection(ws, mock).await;
                            }
                        });
                        Ok::<_, std::convert::Infallible>(resp.map(|_| Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Marks sent to Twilio and not yet echoed; those outstanding at a clear come back unplayed.
#[derive(Default)]
struct Marks {
    outstanding: HashSet<String>,
    unplayed: HashSet<String>,
    frames_sent: u64,
}

async fn connection(
    ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    mock: Arc<Mock>,
) {
    let (mut rd, wr) = ws.split(tokio::io::split);
    let (tx, rx) = mpsc::unbounded_channel();
    let marks = Arc::new(Mutex::new(Marks::default()));
    let ended = Arc::new(AtomicBool::new(false));
    let (sid_tx, sid_rx) = tokio::sync::oneshot::channel::<String>();
    let writer = tokio::spawn(writer(
        wr,
        rx,
        sid_rx,
        marks.clone(),
        ended.clone(),
        mock.clone(),
    ));
    let mut sid_tx = Some(sid_tx);
    let mut sid = String::new();
    let mut published = 0u64;
    let mut no_send = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
    loop {
        let Ok(frame) = rd.read_frame(&mut no_send).await else {
            break;
        };
        let received_at = unix_us();
        if frame.opcode == OpCode::Close {
            let _ = tx.send(Out::Close);
            break;
        }
        if frame.opcode != OpCode::Text {
            continue;
        }
        let v: Value = serde_json::from_slice(&frame.payload).expect("json");
        match v["event"].as_str().unwrap_or("") {
            "start" => {
                sid = v["streamSid"].as_str().expect("sid").to_string();
                let partition =
                    (sid.bytes().map(u32::from).sum::<u32>() % PARTITIONS as u32) as i32;
                mock.streams
                    .lock()
                    .expect("lock")
                    .insert(sid.clone(), tx.clone());
                mock.event(
                    &sid,
                    json!({"type": "start", "stream_sid": sid, "tracks": ["inbound"],
                           "playback": {"topic": format!("{}.playback", mock.prefix), "partition": partition}}),
                );
                if let Some(t) = sid_tx.take() {
                    let _ = t.send(sid.clone());
                }
            }
            "media" => {
                let m = &v["media"];
                let ulaw = base64_simd::STANDARD
                    .decode_to_vec(m["payload"].as_str().expect("payload").as_bytes())
                    .expect("base64");
                let pcm: Vec<u8> = ulaw
                    .iter()
                    .flat_map(|&u| ULAW_TO_PCM[u as usize].to_le_bytes())
                    .collect();
                let s = |k: &str| m[k].as_str().unwrap_or("").to_string();
                let h = headers(&[
                    ("stream_sid", sid.clone()),
                    ("track", s("track")),
                    (
                        "seq",
                        v["sequenceNumber"].as_str().unwrap_or("").to_string(),
                    ),
                    ("chunk", s("chunk")),
                    ("timestamp_ms", s("timestamp")),
                    ("encoding", "pcm_s16le".into()),
                    ("sample_rate", "8000".into()),
                    ("received_at_us", received_at.to_string()),
                ]);
                mock.send("audio.inbound", None, &sid, &pcm, h);
                published += 1;
            }
            "mark" => {
                let name = v["mark"]["name"].as_str().unwrap_or("").to_string();
                let played = {
                    let mut m = marks.lock().expect("lock");
                    m.outstanding.remove(&name);
                    !m.unplayed.remove(&name)
                };
                mock.event(
                    &sid,
                    json!({"type": "mark", "stream_sid": sid, "name": name, "played": played}),
                );
            }
            "stop" if !ended.swap(true, Ordering::SeqCst) => {
                let sent = marks.lock().expect("lock").frames_sent;
                mock.event(
                    &sid,
                    json!({"type": "stop", "stream_sid": sid, "reason": "stop",
                           "frames_published": published, "frames_dropped": 0,
                           "playback": {"frames_sent": sent}}),
                );
            }
            _ => {}
        }
    }
    mock.streams.lock().expect("lock").remove(&sid);
    let _ = writer.await;
}

async fn writer(
    mut wr: WebSocketWrite<tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    sid: tokio::sync::oneshot::Receiver<String>,
    marks: Arc<Mutex<Marks>>,
    ended: Arc<AtomicBool>,
    mock: Arc<Mock>,
) {
    let mut sid_rx = Some(sid);
    let mut sid = String::new();
    while let Some(o) = rx.recv().await {
        if let Some(s) = sid_rx.take() {
            sid = s.await.unwrap_or_default();
        }
        let text = |t: String| Frame::text(Payload::Owned(t.into_bytes()));
        let r = match o {
            Out::Media(ulaw) => {
                let mut r = Ok(());
                for f in ulaw.chunks(160) {
                    marks.lock().expect("lock").frames_sent += 1;
                    let b64 = base64_simd::STANDARD.encode_to_string(f);
                    r = wr
                        .write_frame(text(format!(
                            r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"{b64}"}}}}"#
                        )))
                        .await;
                }
                r
            }
            Out::Mark(name) => {
                marks.lock().expect("lock").outstanding.insert(name.clone());
                wr.write_frame(text(format!(
                    r#"{{"event":"mark","streamSid":"{sid}","mark":{{"name":"{name}"}}}}"#
                )))
                .await
            }
            Out::Clear => {
                {
                    let mut m = marks.lock().expect("lock");
                    let out: Vec<String> = m.outstanding.drain().collect();
                    m.unplayed.extend(out);
                }
                wr.write_frame(text(format!(r#"{{"event":"clear","streamSid":"{sid}"}}"#)))
                    .await
            }
            Out::Stop => {
                if !ended.swap(true, Ordering::SeqCst) {
                    let sent = marks.lock().expect("lock").frames_sent;
                    mock.event(
                        &sid,
                        json!({"type": "disconnect", "stream_sid": sid, "reason": "stopped_by_control",
                               "frames_published": 0, "frames_dropped": 0,
                               "playback": {"frames_sent": sent}}),
                    );
                }
                let _ = wr.write_frame(Frame::close(1000, b"")).await;
                break;
            }
            Out::Close => {
                let _ = wr.write_frame(Frame::close(1000, b"")).await;
                break;
            }
        };
        if r.is_err() {
            break;
        }
    }
}

static PREFIX: AtomicU32 = AtomicU32::new(0);

async fn setup(name: &str) -> (String, String, SocketAddr) {
    let brokers = tokio::task::spawn_blocking(brokers).await.expect("broker");
    let prefix = format!(
        "lt{}-{name}-{}",
        std::process::id(),
        PREFIX.fetch_add(1, Ordering::Relaxed)
    );
    create_topics(&brokers, &prefix).await;
    let addr = mock_gateway(&brokers, &prefix).await;
    (brokers, prefix, addr)
}

fn run_config(
    addr: SocketAddr,
    brokers: &str,
    prefix: &str,
    streams: u64,
    chunks: u64,
) -> RunConfig {
    let ulaw: Vec<u8> = loadtest::audio::tone(440.0, 3.0);
    RunConfig {
        url: format!("ws://{addr}/stream"),
        streams,
        ramp_per_sec: 0.0,
        stream: StreamConfig {
            both_tracks: false,
            chunks: Some(chunks),
            speed: 1.0,
            flood: false,
            dtmf_at: None,
            mark_at: None,
            close_timeout: Duration::from_secs(5),
            run_id: 0x5eed_0000 + PREFIX.load(Ordering::Relaxed) as u64,
        },
        audio: Arc::new(ChunkTable::new(&ulaw).expect("audio")),
        auth_token: None,
        ca_file: None,
        verify: Some(VerifyConfig {
            brokers: brokers.to_string(),
            topic_prefix: prefix.to_string(),
        }),
        grace: Duration::from_secs(8),
        gateway_metrics: None,
        metrics_every: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(5),
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_scenario_through_a_real_broker() {
    let (brokers, prefix, addr) = setup("bidi").await;
    let cfg = run_config(addr, &brokers, &prefix, 4, 200); // 4 s calls
    let bidi = BidiConfig {
        echo: EchoConfig {
            delay: Duration::from_millis(500),
            encoding: EchoEncoding::Alternate,
            mark_every: 5,
            clear_every: Duration::from_millis(1300),
            burst: 5,
            merge_burst: false,
            stop_every: 4,
            stop_after: Duration::from_millis(2500),
            linger_ms: 1,
            fetch_wait_ms: 5,
        },
        ..Default::default()
    };
    let opts = RunOptions {
        // Automatic: the first partition a record arrives on.
        latency_probe: Some(ProbeConfig {
            partition: None,
            window: None,
        }),
        ..Default::default()
    };
    let report = scenario::run_with(Scenario::Bidirectional(bidi), cfg, opts)
        .await
        .expect("run");
    let table = report.table();
    eprintln!("{table}");
    assert_eq!(report.streams.completed, 4, "{table}");
    assert_eq!(report.streams.failed, 0, "{table}");
    let b = report.bidirectional.as_ref().expect("bidirectional report");
    let d = &b.downlink;
    assert_eq!(d.faults, 0, "{table}\n{:#?}", d.examples);
    assert_eq!(b.streams_stopped_by_server, 1, "{table}");
    assert_eq!(d.stops.produced, 1);
    assert_eq!(d.stops.closed_1000, 1);
    assert_eq!(d.stops.stopped_by_control_events, 1);
    assert_eq!(b.echo.streams_routed, 4);
    assert!(
        d.produced.pcm_records > 10 && d.produced.mulaw_records > 10,
        "{table}"
    );
    assert!(d.audio.bytes_matched > 20_000, "{table}");
    assert!(d.marks.in_place > 5, "{table}");
    assert!(d.clears.received >= 3, "{table}");
    assert!(
        d.echoes.played > 5 && d.echoes.events_matched > 5,
        "{table}"
    );
    assert!(d.playback_latency.count > 20, "{table}");
    assert!(d.playback_latency.p50_ms < 500.0, "{table}");
    assert_eq!(
        d.gateway_events.end_events_with_playback, 4,
        "every terminal event carried a playback summary"
    );
    // The uplink verified as in the other scenarios; the stopped stream sent less.
    let v = report.verification.as_ref().expect("uplink verification");
    assert_eq!(
        v.total.missing + v.total.duplicated + v.total.pcm_mismatches,
        0,
        "{table}"
    );
    assert!(v.total.received > 500, "{table}");
    // Part A: receipt stamps, the verifier's own queue and lag, and the probe beside it.
    assert!(
        v.harness.receipt_to_verify.count >= v.total.received,
        "{table}"
    );
    assert!(v.harness.consumer_lag.samples >= 3, "{table}");
    let p = v.probe.as_ref().expect("probe ran");
    assert!(p.chunks > 0 && p.gateway_to_receipt.count > 0, "{table}");
    assert!(
        (0..3).contains(&p.partition),
        "the automatic probe chose a partition: {table}"
    );
    let a = v.attribution.as_ref().expect("attribution");
    assert_eq!(a.probe_count, v.latency_probe_partition.count, "{table}");
    // The JSON report carries all of it.
    let json = serde_json::to_value(&report).expect("json");
    assert!(json["bidirectional"]["downlink"]["playback_latency"]["p99_ms"].is_number());
    assert!(json["verification"]["attribution"]["harness_p99_ms"].is_number());
    assert!(json["verification"]["harness"]["consumer_lag"]["max_records"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_with_the_latency_probe_separates_harness_lag() {
    let (brokers, prefix, addr) = setup("probe").await;
    let cfg = run_config(addr, &brokers, &prefix, 6, 100);
    let opts = RunOptions {
        latency_probe: Some(ProbeConfig {
            partition: Some(1),
            window: Some(Duration::from_millis(500)),
        }),
        lag_every: Duration::from_millis(250),
        ..Default::default()
    };
    let report = scenario::run_with(Scenario::Steady, cfg, opts)
        .await
        .expect("run");
    let table = report.table();
    eprintln!("{table}");
    let v = report.verification.as_ref().expect("verification");
    assert_eq!(v.total.expected, 600, "{table}");
    assert_eq!(v.total.received, 600, "{table}");
    let p = v.probe.as_ref().expect("probe");
    assert_eq!(p.partition, 1);
    assert!(
        p.chunks > 0,
        "some of the 6 streams hash to partition 1: {table}"
    );
    assert_eq!(
        p.chunks, v.latency_probe_partition.count,
        "same records: {table}"
    );
    assert!(p.send_to_gateway.count > 0 && p.gateway_to_receipt.count > 0);
    // Per-window percentiles: consecutive windows that together hold every chunk timed.
    assert!(
        p.windows.len() >= 3,
        "2 s of audio in 0.5 s windows: {:?}",
        p.windows
    );
    assert!(
        p.windows.windows(2).all(|w| w[0].end_s < w[1].end_s),
        "{:?}",
        p.windows
    );
    assert_eq!(
        p.windows
            .iter()
            .map(|w| w.send_to_receipt.count)
            .sum::<u64>(),
        p.chunks,
        "{:?}",
        p.windows
    );
    assert_eq!(
        p.windows
            .iter()
            .map(|w| w.gateway_to_receipt.count)
            .sum::<u64>(),
        p.gateway_to_receipt.count
    );
    assert!(v.harness.consumer_lag.samples >= 4, "{table}");
    assert!(table.contains("latency attribution"), "{table}");
}
