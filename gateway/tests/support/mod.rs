//! Shared integration-test fixtures: a real Tansu broker process, the real gateway binary, a
//! Twilio-speaking WebSocket client and a Kafka consumer using `assign()` (no group join).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl in the forked child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The broker shared by all tests of one test binary: `GATEWAY_TEST_BROKERS` if set, else a
/// Tansu process started here (installed by `scripts/install-broker.sh` if missing).
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(b) = std::env::var("GATEWAY_TEST_BROKERS") {
                return b;
            }
            let root = workspace_root();
            let out = Command::new("bash")
                .arg(root.join("scripts/install-broker.sh"))
                .output()
                .expect("run install-broker.sh");
            assert!(
                out.status.success(),
                "install-broker.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
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
            die_with_parent(&mut cmd);
            // PDEATHSIG fires when the spawning *thread* exits, so spawn from a thread that
            // lives as long as the test process.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let child = cmd.spawn();
                let ok = child.is_ok();
                if let Ok(c) = &child {
                    BROKER_PID.store(c.id(), std::sync::atomic::Ordering::SeqCst);
                }
                tx.send(child.map(|_| ()).map_err(|e| e.to_string()))
                    .unwrap();
                if ok {
                    loop {
                        std::thread::park();
                    }
                }
            });
            rx.recv().unwrap().expect("start tansu");
            wait_port(port, Duration::from_secs(20));
            format!("127.0.0.1:{port}")
        })
        .clone()
}

static BROKER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// PID of the broker this test binary started (None when `GATEWAY_TEST_BROKERS` is used).
pub fn broker_pid() -> Option<u32> {
    brokers();
    match BROKER_PID.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        p => Some(p),
    }
}

/// Sends `sig` to the test broker (SIGSTOP/SIGCONT for outage tests).
pub fn signal_broker(sig: i32) {
    let pid = broker_pid()
        .expect("outage tests need the test-started broker (unset GATEWAY_TEST_BROKERS)");
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn wait_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < timeout, "port {port} did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Minimal blocking HTTP/1.0 GET (so the answer is never chunked); returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A gateway process under test.
pub struct Gateway {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub prefix: String,
    pub brokers: String,
}

static PREFIX_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn unique_prefix(name: &str) -> String {
    let n = PREFIX_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("t{}-{}-{}", std::process::id(), name, n)
}

impl Gateway {
    pub fn start(name: &str, extra: &[&str]) -> Gateway {
        Gateway::start_with_prefix(&unique_prefix(name), extra)
    }

    /// A gateway on an existing topic prefix (several instances of one deployment).
    pub fn start_with_prefix(prefix: &str, extra: &[&str]) -> Gateway {
        let brokers = brokers();
        let prefix = prefix.to_owned();
        let port = free_port();
        let admin_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
        ])
        .args(["--brokers", &brokers, "--topic-prefix", &prefix])
        // Unsigned test clients; a token in `extra` turns validation on regardless.
        .arg("--insecure-skip-signature");
        // Defaults the caller may override (clap refuses a flag given twice). The test broker
        // is Tansu, which sleeps out every fetch's wait: a short playback fetch wait, as
        // `scripts/run.sh` sets for it.
        for (flag, value) in [
            ("--topic-partitions", "3"),
            ("--gateway-id", "gw-test"),
            ("--playback-fetch-wait", "5ms"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra)
            .env(
                "GATEWAY_LOG_LEVEL",
                std::env::var("GATEWAY_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start gateway");
        let gw = Gateway {
            child,
            port,
            admin_port,
            prefix,
            brokers,
        };
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(admin_port, "/readyz") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "gateway did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/stream", self.port)
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics")
            .map(|x| x.1)
            .unwrap_or_default()
    }

    /// Value of a metric line (exact name with labels), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn sigterm(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct SpawnExecutor;
impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// A WebSocket client speaking like Twilio.
pub struct Client {
    pub ws: WebSocket<TokioIo<Upgraded>>,
}

/// An upgrade request exactly as Twilio sends it (headers seen in the wild), to `uri` with
/// `Host: host`; callers add `X-Twilio-Signature` when they sign.
pub fn twilio_upgrade_request(uri: &str, host: &str) -> hyper::http::request::Builder {
    hyper::Request::builder()
        .method("GET")
        .uri(uri)
        .header("Host", host)
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .header("User-Agent", "Twilio.TmeWs/1.0")
}

pub async fn connect_path(port: u16, path: &str) -> Result<Client, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    upgrade_client(tcp, port, path).await
}

/// Like [`connect_path`] with a tiny receive buffer, for a peer that stops reading.
pub async fn connect_small_rcvbuf(port: u16, path: &str) -> Result<Client, String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.set_recv_buffer_size(4096).map_err(|e| e.to_string())?;
    let tcp = sock
        .connect(([127, 0, 0, 1], port).into())
        .await
        .map_err(|e| e.to_string())?;
    upgrade_client(tcp, port, path).await
}

async fn upgrade_client(
    tcp: tokio::net::TcpStream,
    port: u16,
    path: &str,
) -> Result<Client, String> {
    let req = twilio_upgrade_request(
        &format!("http://127.0.0.1:{port}{path}"),
        &format!("127.0.0.1:{port}"),
    )
    .body(Empty::<Bytes>::new())
    .unwrap();
    let (mut ws, _resp) = fastwebsockets::handshake::client(&SpawnExecutor, req, tcp)
        .await
        .map_err(|e| e.to_string())?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    Ok(Client { ws })
}

pub async fn connect(gw: &Gateway) -> Client {
    connect_path(gw.port, "/stream").await.expect("connect")
}

impl Client {
    pub async fn send(&mut self, text: &str) {
        self.ws
            .write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec())))
            .await
            .expect("send");
    }
    pub async fn send_frame(&mut self, f: Frame<'_>) {
        self.ws.write_frame(f).await.expect("send");
    }
    pub async fn close(&mut self) {
        let _ = self.ws.write_frame(Frame::close(1000, b"")).await;
    }
    /// Reads until the server closes; returns its close code and reason (None on EOF).
    pub async fn read_close(&mut self, timeout: Duration) -> Option<(u16, String)> {
        let fut = async {
            loop {
                match self.ws.read_frame().await {
                    Ok(f) if f.opcode == OpCode::Close => {
                        let p = &f.payload[..];
                        if p.len() >= 2 {
                            return Some((
                                u16::from_be_bytes([p[0], p[1]]),
                                String::from_utf8_lossy(&p[2..]).into_owned(),
                            ));
                        }
                        return Some((1005, String::new()));
                    }
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.ok().flatten()
    }
}

// ---- Twilio message builders ----

pub fn sid(prefix: &str, n: u64) -> String {
    format!("{prefix}{:032x}", n)
}

pub fn connected() -> String {
    r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.to_string()
}

pub fn start(
    stream: &str,
    call: &str,
    account: &str,
    tracks: &[&str],
    params: &[(&str, &str)],
) -> String {
    let tracks: Vec<String> = tracks.iter().map(|t| format!("{t:?}")).collect();
    let params: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{:?}:{:?}", k, v))
        .collect();
    format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"{account}","streamSid":"{stream}","callSid":"{call}","tracks":[{}],"customParameters":{{{}}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{stream}"}}"#,
        tracks.join(","),
        params.join(",")
    )
}

pub fn media(stream: &str, seq: u64, track: &str, chunk: u64, ts: u64, ulaw: &[u8]) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{track}","chunk":"{chunk}","timestamp":"{ts}","payload":"{}"}},"streamSid":"{stream}"}}"#,
        base64_simd::STANDARD.encode_to_string(ulaw)
    )
}

pub fn dtmf(stream: &str, seq: u64, digit: &str) -> String {
    format!(
        r#"{{"event":"dtmf","streamSid":"{stream}","sequenceNumber":"{seq}","dtmf":{{"track":"inbound_track","digit":"{digit}"}}}}"#
    )
}

pub fn mark(stream: &str, seq: u64, name: &str) -> String {
    format!(
        r#"{{"event":"mark","sequenceNumber":"{seq}","streamSid":"{stream}","mark":{{"name":"{name}"}}}}"#
    )
}

pub fn stop(stream: &str, seq: u64, account: &str, call: &str) -> String {
    format!(
        r#"{{"event":"stop","sequenceNumber":"{seq}","stop":{{"accountSid":"{account}","callSid":"{call}"}},"streamSid":"{stream}"}}"#
    )
}

pub fn speech() -> Vec<u8> {
    std::fs::read(
        workspace_root()
            .parent()
            .unwrap()
            .join("shared/fixtures/speech-8k.ulaw"),
    )
    .or_else(|_| std::fs::read(workspace_root().join("../shared/fixtures/speech-8k.ulaw")))
    .expect("../shared/fixtures/speech-8k.ulaw")
}

/// G.711 μ-law decode written independently of the gateway's table.
pub fn ulaw_to_pcm(ulaw: &[u8]) -> Vec<u8> {
    ulaw.iter()
        .flat_map(|&c| {
            let u = !c;
            let t = (((u & 0x0F) as i32) << 3) + 0x84;
            let t = t << ((u & 0x70) >> 4);
            let s = if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 };
            (s as i16).to_le_bytes()
        })
        .collect()
}

// ---- Kafka consumer ----

#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
    /// The record's Kafka timestamp as (type, unix ms): `CreateTime` from the producer.
    pub timestamp: rdkafka::Timestamp,
}

impl Record {
    pub fn h(&self, k: &str) -> &str {
        self.headers
            .get(k)
            .map(|s| s.as_str())
            .unwrap_or_else(|| panic!("missing header {k} in {:?}", self.headers))
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("json value")
    }
}

/// Reads `topics` from the beginning with `assign()` until `want(records)` is true or `timeout`.
pub fn consume_until(
    brokers: &str,
    topics: &[String],
    timeout: Duration,
    want: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "gateway-tests-unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("metadata");
        let parts = md.topics()[0].partitions().len();
        assert!(parts > 0, "topic {t} has no partitions");
        for p in 0..parts as i32 {
            tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let start = Instant::now();
    while start.elapsed() < timeout && !want(&out) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        headers.insert(
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Record {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp: m.timestamp(),
                });
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// How many records of `recs` are events of type `kind`.
pub fn count_events(recs: &[Record], kind: &str) -> usize {
    recs.iter()
        .filter(|r| r.topic.ends_with(".events") && r.json()["type"] == kind)
        .count()
}

/// G.711 μ-law encoder written independently of the gateway's (`dsp::g711`): a straight
/// segment search, as in the standard's description.
pub fn pcm_to_ulaw(pcm_le: &[u8]) -> Vec<u8> {
    pcm_le
        .chunks_exact(2)
        .map(|b| {
            let s = i16::from_le_bytes([b[0], b[1]]) as i32;
            let sign = if s < 0 { 0x80 } else { 0 };
            let mag = (s.abs().min(32635)) + 0x84;
            let mut seg = 0;
            while seg < 7 && mag > (0xFF << seg) {
                seg += 1;
            }
            let mantissa = (mag >> (seg + 3)) & 0x0F;
            !((sign | (seg << 4) | mantissa) as u8)
        })
        .collect()
}

pub fn topics(gw: &Gateway) -> [String; 3] {
    [
        format!("{}.audio.inbound", gw.prefix),
        format!("{}.audio.outbound", gw.prefix),
        format!("{}.events", gw.prefix),
    ]
}

/// Streams one call in real time for `secs`: inbound chunks (and outbound ones on the same
/// ticks when `both`), chunk `k` (1-based) carrying the speech fixture at `(k-1)·160` (wrapped),
/// then `stop` and a close. Returns chunks sent per track. See [`chunk_audio`].
pub async fn realtime_call(
    port: u16,
    stream_sid: String,
    account: &str,
    secs: u64,
    audio: std::sync::Arc<Vec<u8>>,
    both: bool,
) -> u64 {
    let mut c = connect_path(port, "/stream").await.expect("connect");
    let call = stream_sid.replace("MZ", "CA");
    let tracks: &[&str] = if both {
        &["inbound", "outbound"]
    } else {
        &["inbound"]
    };
    c.send(&connected()).await;
    c.send(&start(&stream_sid, &call, account, tracks, &[]))
        .await;
    let chunks = secs * 50;
    let mut next = tokio::time::Instant::now();
    let mut seq = 2;
    for k in 0..chunks {
        for t in tracks {
            let msg = media(
                &stream_sid,
                seq,
                t,
                k + 1,
                k * 20,
                chunk_audio(&audio, k + 1),
            );
            seq += 1;
            c.ws.write_frame(Frame::text(Payload::Owned(msg.into_bytes())))
                .await
                .expect("send");
        }
        next += Duration::from_millis(20);
        tokio::time::sleep_until(next).await;
    }
    c.send(&stop(&stream_sid, seq, account, &call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(5)).await;
    chunks
}

/// The μ-law payload [`realtime_call`] sends as chunk `chunk` (1-based).
pub fn chunk_audio(audio: &[u8], chunk: u64) -> &[u8] {
    let off = ((chunk - 1) as usize * 160) % (audio.len() - 160);
    &audio[off..off + 160]
}
