//! Bad input and hostile peers, while good streams run beside them.
//!
//! One gateway (real binary, real broker) with short timeouts. Five good both-track streams play
//! the speech fixture at real-time pace for the whole suite; meanwhile each hostile case runs in
//! turn and asserts its own outcome: close code (and reason where stable), the protocol-error
//! metric by kind, and later the `error`/`disconnect` event on the events topic (keyed for a
//! started stream, keyless before `start`). At the end the good streams must be complete and
//! bit-exact in Kafka with `frames_dropped` 0, and the gateway must be alive and healthy.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000666";
const GOOD: u64 = 5;

fn call_of(stream: &str) -> String {
    stream.replacen("MZ", "CA", 1)
}

fn chunk_of(audio: &[u8], offset: usize, k: u64) -> Vec<u8> {
    let start = (offset + k as usize * 160) % (audio.len() - 160);
    audio[start..start + 160].to_vec()
}

fn good_offset(i: u64, track: &str) -> usize {
    (i as usize * 4001) % 30000 + if track == "outbound" { 9000 } else { 0 }
}

/// One good both-track stream at real-time pace until `done`; returns chunks sent per track.
async fn good_stream(port: u16, i: u64, audio: Arc<Vec<u8>>, done: Arc<AtomicBool>) -> u64 {
    let stream = sid("MZ", 5000 + i);
    let call = call_of(&stream);
    let mut c = connect_path(port, "/stream").await.expect("connect good");
    c.send(&connected()).await;
    c.send(&start(
        &stream,
        &call,
        ACCOUNT,
        &["inbound", "outbound"],
        &[],
    ))
    .await;
    let mut seq = 1;
    let mut k = 0u64;
    let mut next = tokio::time::Instant::now();
    while !done.load(Ordering::Relaxed) || k < 50 {
        for t in ["inbound", "outbound"] {
            seq += 1;
            let data = chunk_of(&audio, good_offset(i, t), k);
            c.send(&media(&stream, seq, t, k + 1, k * 20, &data)).await;
        }
        k += 1;
        next += Duration::from_millis(20);
        tokio::time::sleep_until(next).await;
    }
    c.send(&stop(&stream, seq + 1, ACCOUNT, &call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(3)).await;
    k
}

/// A raw WebSocket client on a plain `TcpStream` (so the socket can be reset), after a
/// hand-written upgrade request.
async fn raw_ws(port: u16) -> WebSocket<TcpStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: Twilio.TmeWs/1.0\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut b).await.unwrap();
        assert_eq!(
            n,
            1,
            "EOF in upgrade response: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut ws = WebSocket::after_handshake(tcp, Role::Client);
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    ws
}

async fn raw_send(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec())))
        .await
        .expect("send");
}

/// Starts a stream on a fresh client: `connected`, `start` (inbound), and `chunks` media.
async fn started(gw: &Gateway, stream: &str, chunks: u64) -> Client {
    let mut c = connect(gw).await;
    c.send(&connected()).await;
    c.send(&start(stream, &call_of(stream), ACCOUNT, &["inbound"], &[]))
        .await;
    for k in 0..chunks {
        c.send(&media(
            stream,
            k + 2,
            "inbound",
            k + 1,
            k * 20,
            &bad_chunk(stream, k),
        ))
        .await;
    }
    c
}

/// Audio of the hostile streams: 160 bytes derived from the sid and chunk index.
fn bad_chunk(stream: &str, k: u64) -> Vec<u8> {
    let h = stream
        .bytes()
        .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..160u64)
        .map(|i| (i as u8).wrapping_mul(3) ^ h ^ (k as u8).wrapping_mul(17))
        .collect()
}

/// What the events topic must hold for one hostile case.
struct Expect {
    /// `Some(sid)`: keyed event of that stream; `None`: a keyless `error`.
    stream: Option<String>,
    ty: &'static str,
    /// `error_kind` for `error`, `reason` for `disconnect`/`stop`.
    detail: Vec<&'static str>,
    /// Audio chunks (inbound, in order) that must be in Kafka for the stream.
    chunks: Vec<Vec<u8>>,
}

fn keyed(stream: &str, ty: &'static str, detail: &[&'static str], chunks: Vec<Vec<u8>>) -> Expect {
    Expect {
        stream: Some(stream.to_owned()),
        ty,
        detail: detail.to_vec(),
        chunks,
    }
}

fn keyless(kind: &'static str) -> Expect {
    Expect {
        stream: None,
        ty: "error",
        detail: vec![kind],
        chunks: Vec::new(),
    }
}

struct Suite {
    expects: Vec<Expect>,
    /// Every protocol-error kind this suite caused, for a final total check.
    caused: Vec<&'static str>,
}

fn errors(gw: &Gateway, kind: &str) -> f64 {
    gw.metric(&format!("gateway_protocol_errors_total{{kind=\"{kind}\"}}"))
}

impl Suite {
    /// Runs one case and checks that exactly one `kind` protocol error was counted.
    async fn case<F: std::future::Future<Output = ()>>(
        &mut self,
        gw: &Gateway,
        kind: &'static str,
        f: F,
    ) {
        let before = errors(gw, kind);
        let t = Instant::now();
        f.await;
        // The counter is bumped before the close frame is written; allow a moment anyway.
        let deadline = Instant::now() + Duration::from_secs(2);
        while errors(gw, kind) < before + 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(errors(gw, kind), before + 1.0, "metric kind {kind}");
        self.caused.push(kind);
        eprintln!("hostile case {kind}: ok in {:?}", t.elapsed());
    }
}

async fn expect_close(c: &mut Client, code: u16, reason: Option<&str>) {
    let got = c
        .read_close(Duration::from_secs(5))
        .await
        .expect("close frame");
    assert_eq!(got.0, code, "close code (reason {:?})", got.1);
    if let Some(r) = reason {
        assert_eq!(got.1, r, "close reason");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_fail_alone_while_good_streams_run_bit_exact() {
    let mut gw = Gateway::start(
        "hostile",
        &[
            "--idle-timeout",
            "1s",
            "--ping-interval",
            "300ms",
            "--handshake-timeout",
            "1s",
            "--max-streams",
            "16",
        ],
    );
    let audio = Arc::new(speech());
    let done = Arc::new(AtomicBool::new(false));
    let good: Vec<_> = (0..GOOD)
        .map(|i| tokio::spawn(good_stream(gw.port, i, audio.clone(), done.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let suite_start = Instant::now();
    let mut s = Suite {
        expects: Vec::new(),
        caused: Vec::new(),
    };

    // --- invalid JSON, after start (the chunk before it is delivered) and before start.
    let sid_a = sid("MZ", 1);
    s.case(&gw, "invalid_json", async {
        let mut c = started(&gw, &sid_a, 1).await;
        c.send("{\"event\":\"media\",").await;
        expect_close(&mut c, 1007, Some("invalid json")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_a,
        "error",
        &["invalid_json"],
        vec![bad_chunk(&sid_a, 0)],
    ));
    s.case(&gw, "invalid_json", async {
        let mut c = connect(&gw).await;
        c.send(&connected()).await;
        c.send("not json at all").await;
        expect_close(&mut c, 1007, Some("invalid json")).await;
    })
    .await;
    s.expects.push(keyless("invalid_json"));

    // --- invalid UTF-8 in a text frame.
    let sid_b = sid("MZ", 2);
    s.case(&gw, "invalid_utf8", async {
        let mut c = started(&gw, &sid_b, 2).await;
        c.send_frame(Frame::text(Payload::Owned(
            b"{\"event\":\"mark\",\"mark\":{\"name\":\"\xff\xfe\"}}".to_vec(),
        )))
        .await;
        expect_close(&mut c, 1007, None).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_b,
        "error",
        &["invalid_utf8"],
        vec![bad_chunk(&sid_b, 0), bad_chunk(&sid_b, 1)],
    ));

    // --- wrong field type: sequenceNumber as a JSON number.
    let sid_c = sid("MZ", 3);
    s.case(&gw, "wrong_type", async {
        let mut c = started(&gw, &sid_c, 1).await;
        let m = media(&sid_c, 3, "inbound", 2, 20, &[0x55; 160])
            .replace("\"sequenceNumber\":\"3\"", "\"sequenceNumber\":3");
        c.send(&m).await;
        expect_close(&mut c, 1008, Some("wrong type for field sequenceNumber")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_c,
        "error",
        &["wrong_type"],
        vec![bad_chunk(&sid_c, 0)],
    ));

    // --- missing field: media without payload.
    let sid_d = sid("MZ", 4);
    s.case(&gw, "missing_field", async {
        let mut c = started(&gw, &sid_d, 1).await;
        let m = format!(
            r#"{{"event":"media","sequenceNumber":"3","media":{{"track":"inbound","chunk":"2","timestamp":"20"}},"streamSid":"{sid_d}"}}"#
        );
        c.send(&m).await;
        expect_close(&mut c, 1008, Some("missing field media.payload")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_d,
        "error",
        &["missing_field"],
        vec![bad_chunk(&sid_d, 0)],
    ));

    // --- invalid base64.
    let sid_e = sid("MZ", 5);
    s.case(&gw, "invalid_base64", async {
        let mut c = started(&gw, &sid_e, 1).await;
        let m = media(&sid_e, 3, "inbound", 2, 20, &[0x22; 160])
            .replace("\"payload\":\"", "\"payload\":\"*&^%");
        c.send(&m).await;
        expect_close(&mut c, 1007, Some("media.payload is not valid base64")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_e,
        "error",
        &["invalid_base64"],
        vec![bad_chunk(&sid_e, 0)],
    ));

    // --- empty payload: tolerated, counted, the stream goes on.
    let sid_f = sid("MZ", 6);
    let dropped_before = gw.metric("gateway_frames_dropped_total{reason=\"empty_payload\"}");
    s.case(&gw, "empty_payload", async {
        let mut c = started(&gw, &sid_f, 1).await;
        c.send(&media(&sid_f, 3, "inbound", 2, 20, &[])).await;
        c.send(&media(&sid_f, 4, "inbound", 3, 20, &bad_chunk(&sid_f, 2)))
            .await;
        c.send(&stop(&sid_f, 5, ACCOUNT, &call_of(&sid_f))).await;
        c.close().await;
        let got = c.read_close(Duration::from_secs(5)).await;
        assert!(
            matches!(got, None | Some((1000, _))),
            "empty payload must not close the stream with an error: {got:?}"
        );
    })
    .await;
    assert_eq!(
        gw.metric("gateway_frames_dropped_total{reason=\"empty_payload\"}"),
        dropped_before + 1.0
    );
    s.expects.push(keyed(
        &sid_f,
        "stop",
        &["stop"],
        vec![bad_chunk(&sid_f, 0), bad_chunk(&sid_f, 2)],
    ));

    // --- odd-length payloads: accepted and bit-exact (no protocol error).
    let sid_g = sid("MZ", 7);
    let odd_a: Vec<u8> = (0..161u32).map(|i| (i * 5) as u8).collect();
    let odd_b = vec![0x7Eu8];
    {
        let mut c = started(&gw, &sid_g, 0).await;
        c.send(&media(&sid_g, 2, "inbound", 1, 0, &odd_a)).await;
        c.send(&media(&sid_g, 3, "inbound", 2, 20, &odd_b)).await;
        c.send(&stop(&sid_g, 4, ACCOUNT, &call_of(&sid_g))).await;
        c.close().await;
        let got = c.read_close(Duration::from_secs(5)).await;
        assert!(matches!(got, None | Some((1000, _))), "{got:?}");
    }
    s.expects
        .push(keyed(&sid_g, "stop", &["stop"], vec![odd_a.clone(), odd_b]));

    // --- binary frame.
    let sid_h = sid("MZ", 8);
    s.case(&gw, "binary_frame", async {
        let mut c = started(&gw, &sid_h, 1).await;
        c.send_frame(Frame::binary(Payload::Owned(vec![0x01, 0x02, 0x03])))
            .await;
        expect_close(&mut c, 1003, Some("binary frames are not supported")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_h,
        "error",
        &["binary_frame"],
        vec![bad_chunk(&sid_h, 0)],
    ));

    // --- a frame the client did not mask (RFC 6455 §5.1: the server must close).
    let sid_u = sid("MZ", 30);
    s.case(&gw, "websocket_protocol", async {
        let mut c = started(&gw, &sid_u, 1).await;
        c.ws.set_auto_apply_mask(false);
        c.send(&media(&sid_u, 3, "inbound", 2, 20, &bad_chunk(&sid_u, 1)))
            .await;
        expect_close(&mut c, 1002, Some("unmasked client frame")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_u,
        "error",
        &["websocket_protocol"],
        vec![bad_chunk(&sid_u, 0)],
    ));

    // --- a start whose two stream SIDs disagree: neither is guessed (no stream starts).
    s.case(&gw, "stream_sid_mismatch", async {
        let mut c = connect(&gw).await;
        c.send(&connected()).await;
        let (a, b) = (sid("MZ", 31), sid("MZ", 32));
        let msg = start(&a, &call_of(&a), ACCOUNT, &["inbound"], &[]).replacen(
            &format!("\"streamSid\":\"{a}\""),
            &format!("\"streamSid\":\"{b}\""),
            1,
        );
        assert!(msg.contains(b.as_str()), "{msg}");
        c.send(&msg).await;
        expect_close(&mut c, 1008, Some("streamSid differs from start.streamSid")).await;
    })
    .await;

    // --- a field the gateway reads, twice in one object: which payload would count is what
    // two parsers can disagree on, so neither is published and the stream is closed.
    let sid_d = sid("MZ", 33);
    s.case(&gw, "duplicate_field", async {
        let mut c = started(&gw, &sid_d, 1).await;
        let second = base64_simd::STANDARD.encode_to_string(bad_chunk(&sid_d, 2));
        let msg = media(&sid_d, 3, "inbound", 2, 20, &bad_chunk(&sid_d, 1)).replacen(
            "\"media\":{",
            &format!("\"media\":{{\"payload\":\"{second}\","),
            1,
        );
        assert_eq!(msg.matches("\"payload\"").count(), 2, "{msg}");
        c.send(&msg).await;
        expect_close(&mut c, 1008, Some("duplicate field media.payload")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_d,
        "error",
        &["duplicate_field"],
        vec![bad_chunk(&sid_d, 0)],
    ));

    // --- media before start.
    s.case(&gw, "media_before_start", async {
        let mut c = connect(&gw).await;
        c.send(&connected()).await;
        c.send(&media(&sid("MZ", 9), 2, "inbound", 1, 0, &[0xFF; 160]))
            .await;
        expect_close(&mut c, 1008, Some("media before start")).await;
    })
    .await;
    s.expects.push(keyless("media_before_start"));

    // --- duplicate start.
    let sid_j = sid("MZ", 10);
    s.case(&gw, "duplicate_start", async {
        let mut c = started(&gw, &sid_j, 1).await;
        c.send(&start(&sid_j, &call_of(&sid_j), ACCOUNT, &["inbound"], &[]))
            .await;
        expect_close(&mut c, 1008, Some("duplicate start")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_j,
        "error",
        &["duplicate_start"],
        vec![bad_chunk(&sid_j, 0)],
    ));

    // --- a message after stop (inside the 1 s linger): 1008 "message after stop".
    let sid_k = sid("MZ", 11);
    s.case(&gw, "after_stop", async {
        let mut c = started(&gw, &sid_k, 1).await;
        c.send(&stop(&sid_k, 3, ACCOUNT, &call_of(&sid_k))).await;
        c.send(&media(&sid_k, 4, "inbound", 2, 20, &[0x44; 160]))
            .await;
        expect_close(&mut c, 1008, Some("message after stop")).await;
    })
    .await;
    // The stream had ended with `stop`: that stays its one terminal event.
    s.expects
        .push(keyed(&sid_k, "stop", &["stop"], vec![bad_chunk(&sid_k, 0)]));

    // --- sequence regression and gap: reported, not fatal.
    let sid_l = sid("MZ", 12);
    let regress_before = gw.metric("gateway_sequence_anomalies_total{kind=\"seq_regression\"}");
    {
        let mut c = started(&gw, &sid_l, 2).await; // seqs 2, 3
        c.send(&media(&sid_l, 2, "inbound", 3, 40, &bad_chunk(&sid_l, 2)))
            .await; // regression
        c.send(&media(&sid_l, 9, "inbound", 4, 60, &bad_chunk(&sid_l, 3)))
            .await; // gap
        c.send(&stop(&sid_l, 10, ACCOUNT, &call_of(&sid_l))).await;
        c.close().await;
        let got = c.read_close(Duration::from_secs(5)).await;
        assert!(matches!(got, None | Some((1000, _))), "{got:?}");
    }
    assert_eq!(
        gw.metric("gateway_sequence_anomalies_total{kind=\"seq_regression\"}"),
        regress_before + 1.0
    );
    s.expects.push(keyed(
        &sid_l,
        "sequence_gap",
        &["seq_regression"],
        Vec::new(),
    ));
    s.expects
        .push(keyed(&sid_l, "sequence_gap", &["seq_gap"], Vec::new()));
    s.expects.push(keyed(
        &sid_l,
        "stop",
        &["stop"],
        (0..4).map(|k| bad_chunk(&sid_l, k)).collect(),
    ));

    // --- oversized message (default cap 64 KiB).
    let sid_m = sid("MZ", 13);
    s.case(&gw, "message_too_large", async {
        let mut c = started(&gw, &sid_m, 1).await;
        let big = format!(
            r#"{{"event":"mark","streamSid":"{sid_m}","mark":{{"name":"{}"}}}}"#,
            "x".repeat(70 * 1024)
        );
        c.send(&big).await;
        expect_close(&mut c, 1009, Some("message too large")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_m,
        "error",
        &["message_too_large"],
        vec![bad_chunk(&sid_m, 0)],
    ));

    // --- many small fragments adding up past the cap.
    let sid_n = sid("MZ", 14);
    s.case(&gw, "message_too_large", async {
        let mut c = started(&gw, &sid_n, 1).await;
        let piece = vec![b' '; 4096];
        let _ =
            c.ws.write_frame(Frame::new(
                false,
                OpCode::Text,
                None,
                Payload::Owned(b"{\"event\":\"mark\",\"mark\":{\"name\":\"".to_vec()),
            ))
            .await;
        for i in 0..20 {
            // 20 × 4 KiB = 80 KiB; the server closes part-way, so later writes may fail.
            let fin = i == 19;
            if c.ws
                .write_frame(Frame::new(
                    fin,
                    OpCode::Continuation,
                    None,
                    Payload::Owned(piece.clone()),
                ))
                .await
                .is_err()
            {
                break;
            }
        }
        expect_close(&mut c, 1009, Some("fragmented message too large")).await;
    })
    .await;
    s.expects.push(keyed(
        &sid_n,
        "error",
        &["message_too_large"],
        vec![bad_chunk(&sid_n, 0)],
    ));

    // --- a valid fragmented message under the cap: accepted.
    let sid_o = sid("MZ", 15);
    {
        let mut c = started(&gw, &sid_o, 1).await;
        let m = media(&sid_o, 3, "inbound", 2, 20, &bad_chunk(&sid_o, 1)).into_bytes();
        let (a, rest) = m.split_at(50);
        let (b, d) = rest.split_at(100);
        c.send_frame(Frame::new(
            false,
            OpCode::Text,
            None,
            Payload::Owned(a.to_vec()),
        ))
        .await;
        c.send_frame(Frame::new(
            false,
            OpCode::Continuation,
            None,
            Payload::Owned(b.to_vec()),
        ))
        .await;
        c.send_frame(Frame::new(
            true,
            OpCode::Continuation,
            None,
            Payload::Owned(d.to_vec()),
        ))
        .await;
        c.send(&stop(&sid_o, 4, ACCOUNT, &call_of(&sid_o))).await;
        c.close().await;
        let got = c.read_close(Duration::from_secs(5)).await;
        assert!(matches!(got, None | Some((1000, _))), "{got:?}");
    }
    s.expects.push(keyed(
        &sid_o,
        "stop",
        &["stop"],
        vec![bad_chunk(&sid_o, 0), bad_chunk(&sid_o, 1)],
    ));

    // --- abrupt TCP reset mid-stream (SO_LINGER 0, then drop).
    let sid_p = sid("MZ", 16);
    {
        let mut ws = raw_ws(gw.port).await;
        raw_send(&mut ws, &connected()).await;
        raw_send(
            &mut ws,
            &start(&sid_p, &call_of(&sid_p), ACCOUNT, &["inbound"], &[]),
        )
        .await;
        for k in 0..5 {
            raw_send(
                &mut ws,
                &media(
                    &sid_p,
                    k + 2,
                    "inbound",
                    k + 1,
                    k * 20,
                    &bad_chunk(&sid_p, k),
                ),
            )
            .await;
        }
        ws.flush().await.unwrap();
        // Let the gateway read them, then reset.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tcp = ws.into_inner();
        // Deprecated because a non-zero linger blocks on drop; zero means "reset now".
        #[allow(deprecated)]
        tcp.set_linger(Some(Duration::ZERO)).unwrap();
        drop(tcp);
    }
    s.expects.push(keyed(
        &sid_p,
        "disconnect",
        &["connection_reset", "eof"],
        (0..5).map(|k| bad_chunk(&sid_p, k)).collect(),
    ));

    // --- half-open peer: silent but connected. Expect a ping, then 1001 idle timeout.
    let sid_q = sid("MZ", 17);
    {
        let mut c = started(&gw, &sid_q, 2).await;
        c.ws.set_auto_pong(false); // a dead peer answers nothing
        let t = Instant::now();
        let mut pinged = None;
        let close = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match c.ws.read_frame().await {
                    Ok(f) if f.opcode == OpCode::Ping => {
                        pinged.get_or_insert(t.elapsed());
                    }
                    Ok(f) if f.opcode == OpCode::Close => {
                        let p = f.payload.to_vec();
                        return Some((
                            u16::from_be_bytes([p[0], p[1]]),
                            String::from_utf8_lossy(&p[2..]).into_owned(),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await
        .expect("closed within 5 s");
        let elapsed = t.elapsed();
        let ping_at = pinged.expect("a ping before the idle close");
        assert!(ping_at < Duration::from_millis(900), "ping at {ping_at:?}");
        assert_eq!(close, Some((1001, "idle timeout".to_owned())));
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
            "idle close after {elapsed:?}"
        );
    }
    s.expects.push(keyed(
        &sid_q,
        "disconnect",
        &["idle_timeout"],
        (0..2).map(|k| bad_chunk(&sid_q, k)).collect(),
    ));

    // --- slow read after start: a frame trickled a byte at a time. Bytes keep arriving, but no
    // frame completes: idle, so 1001 after --idle-timeout (not when the frame would end, 75 s).
    let sid_t = sid("MZ", 18);
    {
        let mut ws = raw_ws(gw.port).await;
        raw_send(&mut ws, &connected()).await;
        raw_send(
            &mut ws,
            &start(&sid_t, &call_of(&sid_t), ACCOUNT, &["inbound"], &[]),
        )
        .await;
        ws.flush().await.unwrap();
        let (mut rd, mut wr) = ws.into_inner().into_split();
        // A masked text frame announcing 300 bytes (16-bit length), then one byte per 250 ms.
        let t = Instant::now();
        wr.write_all(&[0x81, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4])
            .await
            .unwrap();
        let trickle = tokio::spawn(async move {
            for _ in 0..300 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if wr.write_all(b"x").await.is_err() {
                    break;
                }
            }
        });
        // Server frames are unmasked with short lengths here: skip its keep-alive pings
        // (it pings after 300 ms of quiet) up to the close frame.
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(6), async {
            loop {
                if got.len() >= 2 && got.len() >= 2 + got[1] as usize {
                    if got[0] == 0x89 {
                        got.drain(..2 + got[1] as usize);
                        continue;
                    }
                    break;
                }
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let elapsed = t.elapsed();
        trickle.abort();
        // The server's close frame: unmasked, opcode 8, code 1001, "idle timeout".
        assert!(got.len() >= 4 && got[0] == 0x88, "close frame, got {got:?}");
        assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1001, "close code");
        assert_eq!(&got[4..2 + got[1] as usize], b"idle timeout");
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
            "idle close after {elapsed:?} of trickling"
        );
    }
    s.expects
        .push(keyed(&sid_t, "disconnect", &["idle_timeout"], Vec::new()));

    // --- a quiet peer that pings: every ping is answered with its payload, and pings are
    // frames, so 1.5 s of them (idle timeout 1 s) keep the stream open; it ends with `stop`.
    let sid_u = sid("MZ", 19);
    {
        let mut c = started(&gw, &sid_u, 1).await;
        let mut pongs = 0;
        for i in 0..6u8 {
            c.ws.write_frame(Frame::new(
                true,
                OpCode::Ping,
                None,
                Payload::Owned(vec![b'p', i]),
            ))
            .await
            .unwrap();
            let deadline = Instant::now() + Duration::from_millis(250);
            while let Ok(Ok(f)) = tokio::time::timeout_at(deadline.into(), c.ws.read_frame()).await
            {
                assert_ne!(f.opcode, OpCode::Close, "closed while pinging");
                if f.opcode == OpCode::Pong {
                    assert_eq!(&f.payload[..], &[b'p', i], "pong payload");
                    pongs += 1;
                }
            }
        }
        assert_eq!(pongs, 6, "one pong per ping");
        c.send(&stop(&sid_u, 3, ACCOUNT, &call_of(&sid_u))).await;
        let _ = c.read_close(Duration::from_secs(3)).await;
    }
    s.expects
        .push(keyed(&sid_u, "stop", &["stop"], vec![bad_chunk(&sid_u, 0)]));

    // --- slow handshake: half a request head, then nothing. Closed after --handshake-timeout.
    {
        let mut tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        tcp.write_all(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")
            .await
            .unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        let elapsed = t.elapsed();
        assert!(r.is_ok(), "connection still open after 5 s");
        assert!(
            elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(3),
            "closed after {elapsed:?}"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains(" 101 "),
            "upgraded: {}",
            String::from_utf8_lossy(&buf)
        );
    }

    // --- huge request head (> --max-header-bytes, 16 KiB): refused, never upgraded.
    {
        let mut tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        let head = format!(
            "GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "a".repeat(40 * 1024)
        );
        // The server may close before reading everything.
        let _ = tcp.write_all(head.as_bytes()).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "huge header answer: {text}"
        );
    }

    // --- connection storm beyond --max-streams: 503 before any upgrade.
    {
        let rejected_before = gw.metric("gateway_http_rejections_total{reason=\"capacity\"}");
        // Streams of the cases above may still hold their permit for up to a second (lingering
        // close): let them go.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..24 {
            match connect_path(gw.port, "/stream").await {
                Ok(c) => held.push(c),
                Err(e) => {
                    assert!(e.contains("503"), "refusal: {e}");
                    refused += 1;
                }
            }
        }
        // 16 permits, 5 taken by the good streams.
        assert_eq!(
            held.len(),
            16 - GOOD as usize,
            "accepted up to --max-streams"
        );
        assert_eq!(refused, 24 - held.len());
        // The literal answer.
        let (status, body) = http_get_upgrade(gw.port).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            gw.metric("gateway_http_rejections_total{reason=\"capacity\"}"),
            rejected_before + refused as f64 + 1.0
        );
        for mut c in held {
            c.close().await;
        }
    }
    let suite_time = suite_start.elapsed();

    // --- the good streams end normally.
    done.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for h in good {
        sent.push(h.await.unwrap());
    }
    eprintln!("hostile suite ran {suite_time:?}; good streams sent {sent:?} chunks per track");

    // --- alive and healthy.
    assert_eq!(http_get(gw.admin_port, "/healthz").unwrap().0, 200);
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "gateway still running"
    );

    // --- Kafka: good streams complete and bit-exact, hostile cases' events and audio.
    let tps = topics(&gw);
    let good_audio: u64 = sent.iter().map(|k| 2 * k).sum();
    let hostile_audio: usize = s.expects.iter().map(|e| e.chunks.len()).sum();
    let want_audio = good_audio as usize + hostile_audio;
    let brokers = gw.brokers.clone();
    let good_sids: Vec<String> = (0..GOOD).map(|i| sid("MZ", 5000 + i)).collect();
    let gs = good_sids.clone();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(90), |r| {
            r.iter().filter(|x| x.topic.contains(".audio.")).count() >= want_audio
                && gs.iter().all(|g| {
                    r.iter().any(|x| {
                        x.topic.ends_with(".events")
                            && x.key.as_deref() == Some(g)
                            && x.json()["type"] == "stop"
                    })
                })
        })
    })
    .await
    .unwrap();
    let audio_recs: Vec<&Record> = recs
        .iter()
        .filter(|r| r.topic.contains(".audio."))
        .collect();
    let events: Vec<(Option<String>, serde_json::Value)> = recs
        .iter()
        .filter(|r| r.topic.ends_with(".events"))
        .map(|r| (r.key.clone(), r.json()))
        .collect();
    assert_eq!(audio_recs.len(), want_audio, "audio records in Kafka");

    for (i, g) in good_sids.iter().enumerate() {
        for track in ["inbound", "outbound"] {
            let mut mine: Vec<&&Record> = audio_recs
                .iter()
                .filter(|r| r.key.as_deref() == Some(g) && r.h("track") == track)
                .collect();
            mine.sort_by_key(|r| r.offset);
            assert_eq!(mine.len() as u64, sent[i], "{g} {track} complete");
            for (k, r) in mine.iter().enumerate() {
                assert_eq!(r.h("chunk"), (k + 1).to_string(), "{g} {track} order");
                let want = ulaw_to_pcm(&chunk_of(&audio, good_offset(i as u64, track), k as u64));
                assert_eq!(r.value, want, "{g} {track} chunk {} bit-exact", k + 1);
            }
        }
        let mine: Vec<&serde_json::Value> = events
            .iter()
            .filter(|(k, _)| k.as_deref() == Some(g))
            .map(|(_, v)| v)
            .collect();
        let types: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["start", "stop"], "{g} events");
        assert_eq!(mine[1]["frames_dropped"], 0, "{g}");
        assert_eq!(mine[1]["frames_published"], 2 * sent[i], "{g}");
    }

    let mut keyless_left: Vec<&serde_json::Value> = events
        .iter()
        .filter(|(k, _)| k.is_none())
        .map(|(_, v)| v)
        .collect();
    for e in &s.expects {
        match &e.stream {
            None => {
                let pos = keyless_left
                    .iter()
                    .position(|v| v["type"] == "error" && v["error_kind"] == e.detail[0])
                    .unwrap_or_else(|| panic!("keyless error event {:?}", e.detail));
                let v = keyless_left.remove(pos);
                assert!(v["stream_sid"].is_null());
                assert!(v["close_code"].as_u64().is_some());
            }
            Some(stream) => {
                let mine: Vec<&serde_json::Value> = events
                    .iter()
                    .filter(|(k, _)| k.as_deref() == Some(stream.as_str()))
                    .map(|(_, v)| v)
                    .collect();
                let field = match e.ty {
                    "error" => "error_kind",
                    "sequence_gap" => "kind_detail",
                    _ => "reason",
                };
                assert!(
                    mine.iter()
                        .any(|v| v["type"] == e.ty && e.detail.iter().any(|d| v[field] == *d)),
                    "{stream}: no {} event with {field} in {:?}: {mine:?}",
                    e.ty,
                    e.detail
                );
                // Exactly one terminal event, and it is the last one.
                let terminal: Vec<&&serde_json::Value> = mine
                    .iter()
                    .filter(|v| matches!(v["type"].as_str(), Some("stop" | "disconnect" | "error")))
                    .collect();
                assert_eq!(terminal.len(), 1, "{stream}: terminal events {terminal:?}");
                assert_eq!(
                    terminal[0]["frames_published"].as_u64(),
                    Some(
                        audio_recs
                            .iter()
                            .filter(|r| r.key.as_deref() == Some(stream.as_str()))
                            .count() as u64
                    ),
                    "{stream}: frames_published equals what Kafka holds"
                );
                if !e.chunks.is_empty() {
                    let mut mine: Vec<&&Record> = audio_recs
                        .iter()
                        .filter(|r| r.key.as_deref() == Some(stream.as_str()))
                        .collect();
                    mine.sort_by_key(|r| r.offset);
                    let got: Vec<Vec<u8>> = mine.iter().map(|r| r.value.clone()).collect();
                    let want: Vec<Vec<u8>> = e.chunks.iter().map(|c| ulaw_to_pcm(c)).collect();
                    assert_eq!(got, want, "{stream}: audio before the failure delivered");
                }
            }
        }
    }
    // Every error event carries its close code.
    for (_, v) in &events {
        if v["type"] == "error" {
            assert!(
                [1002, 1003, 1007, 1008, 1009].contains(&v["close_code"].as_u64().unwrap()),
                "{v}"
            );
        }
    }
    assert_eq!(gw.metric("gateway_open_streams"), 0.0);
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "gateway still running"
    );
    eprintln!("protocol errors caused: {:?}", s.caused);
}

/// A well-formed upgrade request on a raw socket; returns the status and the response text.
async fn http_get_upgrade(port: u16) -> (u16, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}
