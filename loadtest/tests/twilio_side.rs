//! The simulated Twilio end of a bidirectional stream against a scripted server: the server
//! sends media, marks and clears (and some frames Twilio would reject) and checks the mark
//! echoes that come back — their order, their timing against real-time playout, and that
//! they use the stream's one `sequenceNumber` counter — while the uplink keeps its pace.

use bytes::Bytes;
use fastwebsockets::{upgrade, Frame, OpCode, Payload};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use loadtest::audio::ChunkTable;
use loadtest::client::Connector;
use loadtest::downlink::{self, DlMsg, RxItem};
use loadtest::stats::RunStats;
use loadtest::stream::{run_stream, DownlinkHooks, StreamConfig, StreamEnv};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One text message the server received, with its receipt time.
#[derive(Debug, Clone)]
struct Got {
    at: Instant,
    v: Value,
}

/// What the script did and saw.
#[derive(Debug, Default)]
struct Seen {
    got: Vec<Got>,
    /// Named instants of the script (when it sent things).
    marks: Vec<(&'static str, Instant)>,
    close: Option<u16>,
}

/// What the scripted server does after `start`.
#[derive(Clone, Copy)]
enum Script {
    /// Media, marks, a clear and bad frames; then read until the client closes.
    Playout,
    /// Close with 1000 after 300 ms (as a `stop` record makes the gateway do).
    CloseAfter300ms,
}

fn media_frame(sid: &str, ulaw: &[u8]) -> String {
    format!(
        r#"{{"event":"media","streamSid":"{sid}","media":{{"payload":"{}"}}}}"#,
        base64_simd::STANDARD.encode_to_string(ulaw)
    )
}

fn mark_frame(sid: &str, name: &str) -> String {
    format!(r#"{{"event":"mark","streamSid":"{sid}","mark":{{"name":"{name}"}}}}"#)
}

/// 160 bytes of μ-law for frame `i` (distinct per frame).
fn ulaw(i: usize) -> Vec<u8> {
    (0..160).map(|j| ((i * 7 + j * 3) % 251) as u8).collect()
}

async fn serve(script: Script) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let seen = seen2.clone();
            async move {
                let (resp, fut) = upgrade::upgrade(&mut req).expect("upgrade");
                tokio::spawn(async move {
                    let ws = fut.await.expect("upgraded");
                    run_script(ws, script, seen).await;
                });
                Ok::<_, std::convert::Infallible>(resp.map(|_| Full::new(Bytes::new())))
            }
        });
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .with_upgrades()
            .await;
    });
    (addr, seen)
}

async fn run_script(
    ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    script: Script,
    seen: Arc<Mutex<Seen>>,
) {
    let (mut rd, mut wr) = ws.split(tokio::io::split);
    // Reader: every text message, stamped; learns the SID from `start`.
    let (sid_tx, sid_rx) = tokio::sync::oneshot::channel::<String>();
    let seen_r = seen.clone();
    let reader = tokio::spawn(async move {
        let mut sid_tx = Some(sid_tx);
        let mut no_send = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
        loop {
            let Ok(frame) = rd.read_frame(&mut no_send).await else {
                break;
            };
            let at = Instant::now();
            match frame.opcode {
                OpCode::Text => {
                    let v: Value = serde_json::from_slice(&frame.payload).expect("json");
                    if v["event"] == "start" {
                        if let Some(tx) = sid_tx.take() {
                            let _ = tx.send(v["streamSid"].as_str().expect("sid").to_string());
                        }
                    }
                    seen_r.lock().expect("lock").got.push(Got { at, v });
                }
                OpCode::Close => {
                    let p = &frame.payload;
                    seen_r.lock().expect("lock").close = Some(if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        0
                    });
                    break;
                }
                _ => {}
            }
        }
    });
    let sid = sid_rx.await.expect("start received");
    let note = |name: &'static str| {
        seen.lock()
            .expect("lock")
            .marks
            .push((name, Instant::now()))
    };
    let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    macro_rules! send {
        ($text:expr) => {{
            let t: String = $text;
            wr.write_frame(Frame::text(Payload::Owned(t.into_bytes())))
                .await
                .expect("write");
        }};
    }
    match script {
        Script::CloseAfter300ms => {
            sleep(300).await;
            note("close");
            let _ = wr.write_frame(Frame::close(1000, b"")).await;
        }
        Script::Playout => {
            sleep(100).await;
            // 200 ms of audio, mark a, 100 ms more, mark b: echoes at +200 and +300 ms.
            note("t0");
            for i in 0..10 {
                send!(media_frame(&sid, &ulaw(i)));
            }
            send!(mark_frame(&sid, "a"));
            for i in 10..15 {
                send!(media_frame(&sid, &ulaw(i)));
            }
            send!(mark_frame(&sid, "b"));
            sleep(450).await;
            // Nothing buffered: echoed at once.
            note("t1");
            send!(mark_frame(&sid, "idle"));
            sleep(50).await;
            // 500 ms of audio and two marks, then a clear 100 ms later: both unplayed.
            for i in 15..40 {
                send!(media_frame(&sid, &ulaw(i)));
            }
            send!(mark_frame(&sid, "c"));
            send!(mark_frame(&sid, "d"));
            sleep(100).await;
            note("t3");
            send!(format!(r#"{{"event":"clear","streamSid":"{sid}"}}"#));
            sleep(50).await;
            // After the clear new audio plays at once: 20 ms, then mark e.
            note("t4");
            send!(media_frame(&sid, &ulaw(40)));
            send!(mark_frame(&sid, "e"));
            sleep(100).await;
            // Frames Twilio rejects.
            wr.write_frame(Frame::binary(Payload::Owned(vec![1, 2, 3])))
                .await
                .expect("write");
            send!("not json".to_string());
            send!(r#"{"event":"clear","streamSid":"MZ0000"}"#.to_string());
            note("end_of_script");
        }
    }
    let _ = reader.await;
    if matches!(script, Script::Playout) {
        let _ = wr.write_frame(Frame::close(1000, b"")).await;
    }
}

async fn env(addr: SocketAddr, chunks: u64, tx: downlink::DownlinkSender) -> StreamEnv {
    let audio: Vec<u8> = (0..160 * 50).map(|i: usize| (i % 255) as u8).collect();
    let url = format!("ws://{addr}/stream");
    StreamEnv {
        connector: Arc::new(
            Connector::new(&url, None, None, Duration::from_secs(5))
                .await
                .expect("connector"),
        ),
        audio: Arc::new(ChunkTable::new(&audio).expect("audio")),
        stats: Arc::new(RunStats::default()),
        cfg: Arc::new(StreamConfig {
            both_tracks: false,
            chunks: Some(chunks),
            speed: 1.0,
            flood: false,
            dtmf_at: None,
            mark_at: None,
            close_timeout: Duration::from_secs(5),
            run_id: 11,
        }),
        registrar: None,
        stop: Arc::new(AtomicBool::new(false)),
        downlink: Some(DownlinkHooks {
            tx,
            max_pending_marks: 64,
        }),
    }
}

fn drain(rx: &mut downlink::DownlinkReceiver) -> Vec<DlMsg> {
    let mut v = Vec::new();
    while let Ok(m) = rx.0.try_recv() {
        v.push(m);
    }
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_marks_in_real_time_and_clears_on_the_same_socket() {
    let (addr, seen) = serve(Script::Playout).await;
    let (tx, mut rx) = downlink::channel(10_000);
    let env = env(addr, 75, tx).await; // 1.5 s of uplink audio
    let stats = env.stats.clone();
    let out = run_stream(env, 0).await;
    assert!(out.completed, "{out:?}");
    assert!(!out.stopped_by_server);
    assert_eq!(out.media_sent, [75, 0]);

    let seen = seen.lock().expect("lock");
    let at = |name: &str| {
        seen.marks
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .expect("script mark")
    };
    assert!(seen.marks.iter().any(|(n, _)| *n == "end_of_script"));
    // Every message after `connected` carries the next sequence number: media, echoes and
    // stop share one counter.
    let msgs: Vec<&Got> = seen.got.iter().skip(1).collect();
    for (i, g) in msgs.iter().enumerate() {
        assert_eq!(
            g.v["sequenceNumber"],
            (i + 1).to_string(),
            "message {i}: {}",
            g.v
        );
    }
    let echoes: Vec<(&str, Instant)> = seen
        .got
        .iter()
        .filter(|g| g.v["event"] == "mark")
        .map(|g| (g.v["mark"]["name"].as_str().expect("name"), g.at))
        .collect();
    let names: Vec<&str> = echoes.iter().map(|e| e.0).collect();
    assert_eq!(names, ["a", "b", "idle", "c", "d", "e"]);
    for g in seen.got.iter().filter(|g| g.v["event"] == "mark") {
        assert_eq!(g.v["streamSid"], seen.got[1].v["streamSid"]);
    }
    // Timing: a after 200 ms of audio, b after 300 ms, idle at once, c and d at the clear,
    // e after 20 ms. Lower bounds are exact (playout cannot finish early); upper bounds
    // allow for a loaded machine.
    let within = |name: &str, from: Instant, lo: f64, hi: f64| {
        let t = echoes.iter().find(|e| e.0 == name).expect("echo").1;
        let d = ms(t.saturating_duration_since(from));
        assert!(
            t >= from && d >= lo && d <= hi,
            "echo {name} {d:.1} ms after its reference, expected {lo}..{hi}"
        );
    };
    within("a", at("t0"), 199.0, 260.0);
    within("b", at("t0"), 299.0, 360.0);
    within("idle", at("t1"), 0.0, 40.0);
    within("c", at("t3"), 0.0, 40.0);
    within("d", at("t3"), 0.0, 40.0);
    within("e", at("t4"), 19.0, 80.0);
    // The uplink kept its pace: 75 media, the last one ~1.48 s after the first.
    let media: Vec<&Got> = seen
        .got
        .iter()
        .filter(|g| g.v["event"] == "media")
        .collect();
    assert_eq!(media.len(), 75);
    let span = ms(media[74].at - media[0].at);
    assert!((1460.0..1600.0).contains(&span), "uplink span {span:.1} ms");
    assert_eq!(seen.got.last().expect("msgs").v["event"], "stop");
    drop(seen);

    // The downlink log: every frame stamped, echoes with their played flag, the end.
    let log = drain(&mut rx);
    let mut rx_media = Vec::new();
    let mut rx_marks = Vec::new();
    let mut invalid = Vec::new();
    let mut clears = 0;
    let mut echo_log = Vec::new();
    let mut end = None;
    for m in log {
        match m {
            DlMsg::Rx { stream, item, .. } => {
                assert_eq!(stream, 0);
                match item {
                    RxItem::Media { ulaw } => rx_media.push(ulaw),
                    RxItem::Mark { name } => rx_marks.push(name),
                    RxItem::Clear => clears += 1,
                    RxItem::Invalid { reason } => invalid.push(reason),
                }
            }
            DlMsg::Echo { name, played, .. } => echo_log.push((name, played)),
            DlMsg::StreamEnd {
                we_stopped,
                server_close,
                ..
            } => end = Some((we_stopped, server_close)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rx_media.len(), 41);
    for (i, f) in rx_media.iter().enumerate() {
        assert_eq!(f, &ulaw(i), "frame {i}");
    }
    assert_eq!(rx_marks, ["a", "b", "idle", "c", "d", "e"]);
    assert_eq!(clears, 1);
    assert_eq!(
        invalid,
        ["binary_frame", "invalid_json", "wrong_stream_sid"]
    );
    let want: Vec<(String, bool)> = [
        ("a", true),
        ("b", true),
        ("idle", true),
        ("c", false),
        ("d", false),
        ("e", true),
    ]
    .iter()
    .map(|(n, p)| (n.to_string(), *p))
    .collect();
    assert_eq!(echo_log, want);
    assert_eq!(end, Some((true, Some(1000))));
    let p = stats.playout.lock().expect("lock").clone();
    assert_eq!((p.media_frames, p.marks, p.clears), (41, 6, 1));
    assert_eq!((p.echoed_played, p.echoed_cleared), (4, 2));
    // 500 ms queued, ~100 ms played when the clear came: ~400 ms = ~3200 bytes discarded.
    assert!((2400..=3300).contains(&p.bytes_cleared), "{p:?}");
    // Frames of a burst may trickle in over a few ms on a loaded machine.
    assert!((400..=500).contains(&p.max_buffered_ms), "{p:?}");
    assert_eq!(RunStats::get(&stats.downlink_invalid), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_close_with_1000_ends_a_bidirectional_stream_normally() {
    let (addr, seen) = serve(Script::CloseAfter300ms).await;
    let (tx, mut rx) = downlink::channel(1000);
    let env = env(addr, 250, tx).await; // 5 s: the server ends it first
    let stats = env.stats.clone();
    let t0 = Instant::now();
    let out = run_stream(env, 3).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(out.completed && out.stopped_by_server, "{out:?}");
    assert_eq!(out.server_close, Some(1000));
    assert_eq!(RunStats::get(&stats.streams_stopped_by_server), 1);
    assert_eq!(RunStats::get(&stats.server_closed_early), 0);
    let log = drain(&mut rx);
    assert!(matches!(
        log.last(),
        Some(DlMsg::StreamEnd {
            stream: 3,
            we_stopped: false,
            server_close: Some(1000),
            ..
        })
    ));
    // The client echoed the close and sent no stop.
    let seen = seen.lock().expect("lock");
    assert!(seen.got.iter().all(|g| g.v["event"] != "stop"));
}
