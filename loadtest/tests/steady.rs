//! Runs scenarios against a tiny in-process fastwebsockets server and checks, message by
//! message, that every stream sent exactly the Twilio protocol.

use bytes::Bytes;
use fastwebsockets::{upgrade, FragmentCollector, OpCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use loadtest::audio::ChunkTable;
use loadtest::scenario::{self, RunConfig, Scenario};
use loadtest::stream::{audio_offsets, StreamConfig};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the test server saw on one connection.
#[derive(Debug, Default, Clone)]
struct Conn {
    path: String,
    signature: Option<String>,
    user_agent: Option<String>,
    messages: Vec<String>,
    got_close: Option<u16>,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Accept and read everything.
    Normal,
    /// Answer the upgrade with 403.
    Reject,
    /// Close with 1011 after the `start` message.
    CloseEarly,
}

async fn serve(mode: Mode) -> (SocketAddr, Arc<Mutex<Vec<Conn>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(Mutex::new(Vec::new()));
    let seen = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        if req.uri().path() == "/metrics" {
                            return Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(
                                    b"# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 4096\n",
                                ),
                            )));
                        }
                        if matches!(mode, Mode::Reject) {
                            return Ok(Response::builder()
                                .status(403)
                                .body(Full::new(Bytes::new()))
                                .expect("response"));
                        }
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        let mut conn = Conn {
                            path: req.uri().path().to_string(),
                            signature: header("x-twilio-signature"),
                            user_agent: header("user-agent"),
                            ..Default::default()
                        };
                        let (resp, fut) = upgrade::upgrade(&mut req).expect("upgrade");
                        let resp = resp.map(|_| Full::new(Bytes::new()));
                        tokio::spawn(async move {
                            let Ok(ws) = fut.await else { return };
                            let mut ws = FragmentCollector::new(ws);
                            loop {
                                let Ok(frame) = ws.read_frame().await else {
                                    break;
                                };
                                match frame.opcode {
                                    OpCode::Text => {
                                        let text = String::from_utf8(frame.payload.to_vec())
                                            .expect("utf-8");
                                        let is_start = text.contains(r#""event":"start""#);
                                        conn.messages.push(text);
                                        if is_start && matches!(mode, Mode::CloseEarly) {
                                            let _ = ws
                                                .write_frame(fastwebsockets::Frame::close(
                                                    1011, b"bye",
                                                ))
                                                .await;
                                        }
                                    }
                                    OpCode::Close => {
                                        let p = &frame.payload;
                                        conn.got_close = Some(if p.len() >= 2 {
                                            u16::from_be_bytes([p[0], p[1]])
                                        } else {
                                            0
                                        });
                                        break;
                                    }
                                    _ => {}
                                }
                            }
                            seen.lock().expect("lock").push(conn);
                        });
                        Ok(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, conns)
}

fn audio() -> Arc<ChunkTable> {
    // Distinct bytes per position so a wrong offset or chunk shows up.
    let ulaw: Vec<u8> = (0..160 * 37)
        .map(|i: usize| (i * 31 + i / 160) as u8)
        .collect();
    Arc::new(ChunkTable::new(&ulaw).expect("enough audio"))
}

fn config(addr: SocketAddr, stream: StreamConfig, token: Option<&str>) -> RunConfig {
    RunConfig {
        url: format!("ws://{addr}/stream"),
        streams: 3,
        ramp_per_sec: 30.0,
        stream,
        audio: audio(),
        auth_token: token.map(str::to_string),
        ca_file: None,
        verify: None,
        grace: Duration::from_secs(1),
        gateway_metrics: None,
        metrics_every: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(5),
        progress: false,
    }
}

fn stream_cfg(both: bool, chunks: u64, speed: f64, flood: bool) -> StreamConfig {
    StreamConfig {
        both_tracks: both,
        chunks: Some(chunks),
        speed,
        flood,
        dtmf_at: Some(10),
        mark_at: Some(20),
        close_timeout: Duration::from_secs(5),
        run_id: 7,
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_str()
        .unwrap_or_else(|| panic!("{path:?} not a string in {v}"))
}

/// Checks one connection's messages against the protocol; returns the stream index.
fn check_conn(c: &Conn, both: bool, chunks: u64, table: &ChunkTable) -> u64 {
    let msgs: Vec<Value> = c
        .messages
        .iter()
        .map(|m| serde_json::from_str(m).expect("valid JSON"))
        .collect();
    let per_tick = if both { 2 } else { 1 };
    assert_eq!(
        msgs.len() as u64,
        2 + chunks * per_tick + 2 + 1,
        "message count"
    );
    assert_eq!(
        c.messages[0],
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#
    );
    let start = &msgs[1];
    assert_eq!(s(start, &["event"]), "start");
    assert_eq!(s(start, &["sequenceNumber"]), "1");
    let sid = s(start, &["streamSid"]).to_string();
    assert_eq!(s(start, &["start", "streamSid"]), sid);
    assert!(sid.starts_with("MZ") && sid.len() == 34);
    let tracks = start["start"]["tracks"].as_array().expect("tracks").len();
    assert_eq!(tracks, per_tick as usize);
    let index: u64 = s(start, &["start", "customParameters", "stream_index"])
        .parse()
        .expect("index");
    let offsets = audio_offsets(index, table.len());

    let mut next_chunk = [1u64, 1];
    let mut seq = 1u64;
    let mut saw = (false, false);
    for m in &msgs[2..] {
        seq += 1;
        assert_eq!(s(m, &["sequenceNumber"]), seq.to_string(), "seq in {m}");
        assert_eq!(s(m, &["streamSid"]), sid);
        match s(m, &["event"]) {
            "media" => {
                let track = s(m, &["media", "track"]);
                let t = if track == "inbound" { 0 } else { 1 };
                let k = next_chunk[t];
                next_chunk[t] += 1;
                assert_eq!(s(m, &["media", "chunk"]), k.to_string());
                assert_eq!(s(m, &["media", "timestamp"]), ((k - 1) * 20).to_string());
                let payload = base64_simd::STANDARD
                    .decode_to_vec(s(m, &["media", "payload"]))
                    .expect("base64");
                assert_eq!(payload, table.ulaw(offsets[t] + k as usize - 1));
                if both && t == 1 {
                    assert_eq!(next_chunk[0], next_chunk[1], "outbound follows inbound");
                }
            }
            "dtmf" => {
                assert_eq!(next_chunk[0], 11, "dtmf after chunk 10");
                assert_eq!(s(m, &["dtmf", "digit"]), "5");
                assert_eq!(s(m, &["dtmf", "track"]), "inbound_track");
                saw.0 = true;
            }
            "mark" => {
                assert_eq!(next_chunk[0], 21, "mark after chunk 20");
                assert_eq!(s(m, &["mark", "name"]), "m1");
                saw.1 = true;
            }
            "stop" => {
                assert_eq!(next_chunk[0], chunks + 1, "stop is last");
                assert!(s(m, &["stop", "callSid"]).starts_with("CA"));
                assert_eq!(
                    s(m, &["stop", "accountSid"]),
                    s(start, &["start", "accountSid"])
                );
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(s(msgs.last().expect("msgs"), &["event"]), "stop");
    assert_eq!(next_chunk[0], chunks + 1);
    if both {
        assert_eq!(next_chunk[1], chunks + 1);
    }
    assert!(saw.0 && saw.1, "dtmf and mark sent");
    assert_eq!(c.got_close, Some(1000));
    index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_both_tracks_at_speed_10() {
    let (addr, conns) = serve(Mode::Normal).await;
    // 10 s of audio at 10x: ~1 s per stream.
    let chunks = 500;
    let cfg = config(addr, stream_cfg(true, chunks, 10.0, false), Some("secret"));
    let url = cfg.url.clone();
    let table = cfg.audio.clone();
    let t0 = std::time::Instant::now();
    let report = scenario::run(Scenario::Steady, cfg).await.expect("run");
    let wall = t0.elapsed();
    assert!(wall >= Duration::from_millis(950), "paced, took {wall:?}");
    assert!(wall < Duration::from_secs(5), "took {wall:?}");
    assert_eq!(report.streams.completed, 3, "{}", report.table());
    assert_eq!(report.streams.failed, 0);
    assert_eq!(report.streams.handshake_errors, 0);
    assert_eq!(report.messages_sent, 3 * (2 + 2 * chunks + 3));
    assert_eq!(report.media_sent, 3 * 2 * chunks);
    assert_eq!(report.close_codes.get("1000"), Some(&3));
    assert!(report.send_lag.count > 0);

    let conns = conns.lock().expect("lock").clone();
    assert_eq!(conns.len(), 3);
    let mut indices: Vec<u64> = conns
        .iter()
        .map(|c| {
            assert_eq!(c.path, "/stream");
            assert_eq!(c.user_agent.as_deref(), Some("Twilio.TmeWs/1.0"));
            assert_eq!(
                c.signature.as_deref(),
                Some(loadtest::sign::signature("secret", &url).as_str())
            );
            check_conn(c, true, chunks, &table)
        })
        .collect();
    indices.sort();
    assert_eq!(indices, vec![0, 1, 2]);
    let sids: std::collections::HashSet<_> = conns.iter().map(|c| c.messages[1].clone()).collect();
    assert_eq!(sids.len(), 3, "distinct streams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_flood_inbound() {
    let (addr, conns) = serve(Mode::Normal).await;
    let chunks = 3000; // 60 s of audio, unpaced
    let cfg = config(addr, stream_cfg(false, chunks, 1.0, true), None);
    let table = cfg.audio.clone();
    let report = scenario::run(Scenario::Steady, cfg).await.expect("run");
    assert_eq!(report.streams.completed, 3, "{}", report.table());
    assert_eq!(report.messages_sent, 3 * (2 + chunks + 3));
    let conns = conns.lock().expect("lock").clone();
    assert_eq!(conns.len(), 3);
    for c in &conns {
        assert!(c.signature.is_none());
        check_conn(c, false, chunks, &table);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_upgrades_are_handshake_errors() {
    let (addr, _conns) = serve(Mode::Reject).await;
    let cfg = config(addr, stream_cfg(false, 10, 10.0, false), None);
    let report = scenario::run(Scenario::Burst, cfg).await.expect("run");
    assert_eq!(report.streams.handshake_errors, 3);
    assert_eq!(report.streams.handshake_ok, 0);
    assert_eq!(report.errors.get("http_403"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_close_code_is_recorded() {
    let (addr, _conns) = serve(Mode::CloseEarly).await;
    let cfg = config(addr, stream_cfg(false, 500, 10.0, false), None);
    let report = scenario::run(Scenario::Steady, cfg).await.expect("run");
    assert_eq!(report.streams.failed, 3, "{}", report.table());
    assert_eq!(report.streams.server_closed_early, 3);
    assert_eq!(report.close_codes.get("1011"), Some(&3));
    assert_eq!(report.errors.get("server_closed_1011"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_steps_up_to_the_limit() {
    let (addr, conns) = serve(Mode::Normal).await;
    let mut cfg = config(addr, stream_cfg(false, 1, 10.0, false), None);
    cfg.streams = 4;
    let ramp = loadtest::scenario::RampConfig {
        step: 2,
        step_secs: 1,
        p99_ms: 10_000.0,
    };
    let report = scenario::run(Scenario::Ramp(ramp), cfg).await.expect("run");
    let r = report.ramp.as_ref().expect("ramp report");
    assert_eq!(r.steps.len(), 2, "{}", report.table());
    assert_eq!(r.steps[0].streams, 2);
    assert_eq!(r.steps[1].streams, 4);
    assert_eq!(r.max_sustained_streams, 4);
    assert_eq!(report.streams.completed, 4);
    // Open-ended streams end with a proper stop when the ramp ends.
    let conns = conns.lock().expect("lock").clone();
    assert_eq!(conns.len(), 4);
    for c in &conns {
        let last: Value = serde_json::from_str(c.messages.last().expect("msgs")).expect("json");
        assert_eq!(s(&last, &["event"]), "stop");
        assert_eq!(c.got_close, Some(1000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_samples_gateway_rss() {
    let (addr, _conns) = serve(Mode::Normal).await;
    let mut cfg = config(addr, stream_cfg(false, 100, 10.0, false), None);
    cfg.gateway_metrics = Some(format!("http://{addr}/metrics"));
    cfg.metrics_every = Duration::from_millis(200);
    let report = scenario::run(Scenario::Soak, cfg).await.expect("run");
    let rss = report.gateway_rss.as_ref().expect("rss sampled");
    assert!(rss.samples.len() >= 2, "{rss:?}");
    assert_eq!(rss.start_bytes, 4096.0);
    assert_eq!(rss.end_bytes, 4096.0);
    assert_eq!(rss.scrape_errors, 0);
    assert_eq!(report.streams.completed, 3);
}
