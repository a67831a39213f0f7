//! End to end: real Tansu broker, real gateway binary, Twilio-speaking clients, Kafka consumer.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000001";

struct StreamPlan {
    stream: String,
    call: String,
    offset: usize,
    chunks: u64,
    tracks: Vec<&'static str>,
}

fn chunk_of(audio: &[u8], offset: usize, k: u64) -> Vec<u8> {
    let start = (offset + k as usize * 160) % (audio.len() - 160);
    audio[start..start + 160].to_vec()
}

/// Plays one stream: connected, start, media (both tracks interleaved), dtmf, mark, stop, close.
/// Returns the sequence number of every media message: (track, chunk) -> seq.
async fn play(
    gw_port: u16,
    p: &StreamPlan,
    audio: &[u8],
    pace: Option<Duration>,
) -> HashMap<(String, u64), u64> {
    let mut c = connect_path(gw_port, "/stream").await.expect("connect");
    let mut seqs = HashMap::new();
    c.send(&connected()).await;
    c.send(&start(
        &p.stream,
        &p.call,
        ACCOUNT,
        &p.tracks,
        &[("FirstName", "Jane"), ("Quote", "a\"b<c>&")],
    ))
    .await;
    let mut seq = 2;
    for k in 0..p.chunks {
        for t in &p.tracks {
            let data = chunk_of(audio, p.offset + if *t == "outbound" { 8000 } else { 0 }, k);
            c.send(&media(&p.stream, seq, t, k + 1, k * 20, &data))
                .await;
            seqs.insert((t.to_string(), k + 1), seq);
            seq += 1;
        }
        if k == 10 {
            c.send(&dtmf(&p.stream, seq, "7")).await;
            seq += 1;
        }
        if k == 20 {
            c.send(&mark(&p.stream, seq, "greeting-done")).await;
            seq += 1;
        }
        if let Some(d) = pace {
            tokio::time::sleep(d).await;
        }
    }
    c.send(&stop(&p.stream, seq, ACCOUNT, &p.call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(3)).await;
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_arrive_bit_exact_in_order_with_headers_and_events() {
    let gw = Gateway::start("e2e", &[]);
    // The default layout (decision 39): one ingest thread per core, no pacing.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(gw.metric("gateway_runtime_workers"), cores as f64);
    assert_eq!(gw.metric("gateway_runtime_io_pace_microseconds"), 0.0);
    assert_eq!(gw.metric("gateway_runtime_ingest_threads"), cores as f64);
    concurrent_streams(&gw).await;
}

/// The same contract with connections on the shared pool, read coalescing on one paced worker
/// (decisions 38, 39): pacing and layout change when sockets are read, never what is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_arrive_bit_exact_with_one_paced_worker() {
    let gw = Gateway::start(
        "e2epace",
        &[
            "--ingest-threads",
            "0",
            "--worker-threads",
            "1",
            "--io-pace",
            "1ms",
        ],
    );
    // The runtime really has one worker and the pacing is on (not only parsed).
    assert_eq!(gw.metric("gateway_runtime_workers"), 1.0);
    assert_eq!(gw.metric("gateway_runtime_io_pace_microseconds"), 1000.0);
    assert_eq!(gw.metric("gateway_runtime_ingest_threads"), 0.0);
    concurrent_streams(&gw).await;
}

/// The same contract on two thread-per-core ingest threads with read coalescing (decision 39):
/// where a connection runs changes nothing that is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_arrive_bit_exact_on_paced_ingest_threads() {
    let mut gw = Gateway::start("e2eingest", &["--ingest-threads", "2", "--io-pace", "1ms"]);
    assert_eq!(gw.metric("gateway_runtime_ingest_threads"), 2.0);
    assert_eq!(gw.metric("gateway_runtime_io_pace_microseconds"), 1000.0);
    // Two open connections (not yet upgraded) are placed one per thread, least loaded first.
    let held: Vec<_> = open_tcp_pair(gw.port).await;
    wait_per_thread(&gw, [1.0, 1.0]).await;
    drop(held);
    wait_per_thread(&gw, [0.0, 0.0]).await;
    concurrent_streams(&gw).await;
    // Upgraded streams stay counted on their thread after the handshake task has ended: the
    // stream's own task holds the placement. (After the contract run, whose record counts
    // these two streams' events would change.)
    let mut streams = Vec::new();
    for i in 0..2 {
        let mut c = connect_path(gw.port, "/stream").await.expect("connect");
        c.send(&connected()).await;
        let (s, call) = (sid("MZ", 900 + i), sid("CA", 900 + i));
        c.send(&start(&s, &call, ACCOUNT, &["inbound"], &[])).await;
        streams.push((c, s, call));
    }
    // Long after the 101 responses (handshake tasks gone), still one stream per thread.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(per_thread(&gw), [1.0, 1.0], "upgraded streams counted");
    for (mut c, s, call) in streams {
        c.send(&stop(&s, 2, ACCOUNT, &call)).await;
        c.close().await;
        let _ = c.read_close(Duration::from_secs(3)).await;
    }
    wait_per_thread(&gw, [0.0, 0.0]).await;
    // The drain stops the ingest threads after their connections ended: a clean exit.
    gw.sigterm();
    assert_eq!(gw.wait_exit(Duration::from_secs(40)), Some(0));
}

/// `gateway_runtime_ingest_connections` of threads 0 and 1.
fn per_thread(gw: &Gateway) -> [f64; 2] {
    [0, 1].map(|t| {
        gw.metric(&format!(
            "gateway_runtime_ingest_connections{{thread=\"{t}\"}}"
        ))
    })
}

/// Waits up to 10 s for the per-thread counts to read `want`.
async fn wait_per_thread(gw: &Gateway, want: [f64; 2]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while per_thread(gw) != want {
        assert!(
            Instant::now() < deadline,
            "per-thread connections {:?}, want {want:?}",
            per_thread(gw)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_tcp_pair(port: u16) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::new();
    for _ in 0..2 {
        v.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    v
}

async fn concurrent_streams(gw: &Gateway) {
    let audio = speech();
    let n_streams = 24u64;
    let plans: Vec<StreamPlan> = (0..n_streams)
        .map(|i| StreamPlan {
            stream: sid("MZ", 1000 + i),
            call: sid("CA", 2000 + i),
            offset: (i as usize * 1601) % 40000,
            chunks: 60,
            tracks: vec!["inbound", "outbound"],
        })
        .collect();
    let t0 = lib_unix_us();
    let mut handles = Vec::new();
    for p in plans.iter() {
        let (port, audio, plan) = (
            gw.port,
            audio.clone(),
            StreamPlan {
                stream: p.stream.clone(),
                call: p.call.clone(),
                offset: p.offset,
                chunks: p.chunks,
                tracks: p.tracks.clone(),
            },
        );
        handles.push(tokio::spawn(async move {
            play(port, &plan, &audio, Some(Duration::from_millis(2))).await
        }));
    }
    let mut seqs = Vec::new();
    for h in handles {
        seqs.push(h.await.unwrap());
    }
    let t1 = lib_unix_us();
    let expected_audio = (n_streams * 60 * 2) as usize;
    let expected_events = (n_streams * 4) as usize;
    let brokers = gw.brokers.clone();
    let tps = topics(gw);
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(60), |r| {
            r.iter().filter(|x| x.topic.contains(".audio.")).count() >= expected_audio
                && r.iter().filter(|x| x.topic.ends_with(".events")).count() >= expected_events
        })
    })
    .await
    .unwrap();
    let audio_recs: Vec<&Record> = recs
        .iter()
        .filter(|r| r.topic.contains(".audio."))
        .collect();
    let events: Vec<&Record> = recs
        .iter()
        .filter(|r| r.topic.ends_with(".events"))
        .collect();
    assert_eq!(audio_recs.len(), expected_audio, "audio records");
    assert_eq!(events.len(), expected_events, "event records");

    for (i, p) in plans.iter().enumerate() {
        for track in ["inbound", "outbound"] {
            let topic = format!("{}.audio.{track}", gw.prefix);
            let mut mine: Vec<&&Record> = audio_recs
                .iter()
                .filter(|r| r.topic == topic && r.key.as_deref() == Some(&p.stream))
                .collect();
            // One key → one partition → offsets give Kafka's order.
            let parts: std::collections::HashSet<i32> = mine.iter().map(|r| r.partition).collect();
            assert_eq!(parts.len(), 1, "one partition per stream");
            mine.sort_by_key(|r| r.offset);
            assert_eq!(mine.len(), 60);
            for (k, r) in mine.iter().enumerate() {
                let k = k as u64;
                let sent = chunk_of(
                    &audio,
                    p.offset + if track == "outbound" { 8000 } else { 0 },
                    k,
                );
                assert_eq!(
                    r.value,
                    ulaw_to_pcm(&sent),
                    "pcm of {} {track} chunk {}",
                    p.stream,
                    k + 1
                );
                assert_eq!(r.h("stream_sid"), p.stream);
                assert_eq!(r.h("call_sid"), p.call);
                assert_eq!(r.h("account_sid"), ACCOUNT);
                assert_eq!(r.h("track"), track);
                assert_eq!(r.h("chunk"), (k + 1).to_string());
                assert_eq!(r.h("seq"), seqs[i][&(track.to_string(), k + 1)].to_string());
                assert_eq!(r.h("timestamp_ms"), (k * 20).to_string());
                assert_eq!(r.h("encoding"), "pcm_s16le");
                assert_eq!(r.h("sample_rate"), "8000");
                assert_eq!(r.h("channels"), "1");
                assert_eq!(r.h("gateway"), "gw-test");
                let at: u64 = r.h("received_at_us").parse().unwrap();
                assert!(
                    at >= t0 && at <= t1,
                    "received_at_us {at} outside [{t0},{t1}]"
                );
                // The Kafka timestamp is the receive time of the record's first chunk.
                assert_eq!(
                    r.timestamp,
                    rdkafka::Timestamp::CreateTime((at / 1000) as i64),
                    "kafka timestamp of {} {track} chunk {}",
                    p.stream,
                    k + 1
                );
                assert!(!r.headers.contains_key("chunks"));
            }
        }
        let mine_recs: Vec<&&Record> = events
            .iter()
            .filter(|r| r.key.as_deref() == Some(&p.stream))
            .collect();
        let mine: Vec<serde_json::Value> = mine_recs.iter().map(|r| r.json()).collect();
        for (r, e) in mine_recs.iter().zip(&mine) {
            // An event's Kafka timestamp is its `at_us`.
            let at = e["at_us"].as_u64().unwrap();
            assert_eq!(
                r.timestamp,
                rdkafka::Timestamp::CreateTime((at / 1000) as i64),
                "kafka timestamp of {} {}",
                p.stream,
                e["type"]
            );
        }
        let types: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            ["start", "dtmf", "mark", "stop"],
            "events of {}",
            p.stream
        );
        for e in &mine {
            assert_eq!(e["stream_sid"], p.stream.as_str());
            assert_eq!(e["call_sid"], p.call.as_str());
            assert_eq!(e["account_sid"], ACCOUNT);
            assert_eq!(e["gateway"], "gw-test");
            assert!(e["at_us"].as_u64().unwrap() >= t0);
        }
        assert_eq!(
            mine[0]["tracks"],
            serde_json::json!(["inbound", "outbound"])
        );
        assert_eq!(
            mine[0]["custom_parameters"],
            serde_json::json!({"FirstName": "Jane", "Quote": "a\"b<c>&"})
        );
        assert_eq!(
            mine[0]["media_format"],
            serde_json::json!({"encoding": "audio/x-mulaw", "sample_rate": 8000, "channels": 1})
        );
        assert_eq!(mine[1]["digit"], "7");
        assert_eq!(mine[2]["name"], "greeting-done");
        assert_eq!(mine[3]["frames_published"], 120);
        assert_eq!(mine[3]["frames_dropped"], 0);
        assert_eq!(mine[3]["reason"], "stop");
    }
    // Metrics agree with what the consumer saw.
    assert_eq!(
        gw.metric("gateway_frames_published_total"),
        expected_audio as f64
    );
    assert_eq!(
        gw.metric("gateway_messages_received_total{event=\"media\"}"),
        expected_audio as f64
    );
    assert_eq!(
        gw.metric("gateway_streams_total{outcome=\"stopped\"}"),
        n_streams as f64
    );
    assert_eq!(gw.metric("gateway_open_streams"), 0.0);
    let start = Instant::now();
    while gw.metric("gateway_frames_delivered_total") < expected_audio as f64
        && start.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gw.metric("gateway_frames_delivered_total"),
        expected_audio as f64
    );
}

fn lib_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_per_record_batches_consecutive_chunks_and_flushes_the_tail() {
    let gw = Gateway::start("batch", &["--frames-per-record", "5"]);
    let audio = speech();
    let p = StreamPlan {
        stream: sid("MZ", 77),
        call: sid("CA", 77),
        offset: 320,
        chunks: 23,
        tracks: vec!["inbound", "outbound"],
    };
    let seqs = play(gw.port, &p, &audio, None).await;
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps[..2], Duration::from_secs(30), |r| {
            r.len() >= 10
        })
    })
    .await
    .unwrap();
    assert_eq!(recs.len(), 10); // per track: 5+5+5+5+3
    for track in ["inbound", "outbound"] {
        let mut mine: Vec<&Record> = recs.iter().filter(|r| r.h("track") == track).collect();
        mine.sort_by_key(|r| r.offset);
        let counts: Vec<&str> = mine.iter().map(|r| r.h("chunks")).collect();
        assert_eq!(counts, ["5", "5", "5", "5", "3"]);
        let mut k = 0u64;
        for r in mine {
            let n: u64 = r.h("chunks").parse().unwrap();
            assert_eq!(r.h("chunk"), (k + 1).to_string());
            assert_eq!(r.h("timestamp_ms"), (k * 20).to_string());
            assert_eq!(r.h("seq"), seqs[&(track.to_string(), k + 1)].to_string());
            let sent: Vec<u8> = (k..k + n)
                .flat_map(|j| {
                    chunk_of(
                        &audio,
                        p.offset + if track == "outbound" { 8000 } else { 0 },
                        j,
                    )
                })
                .collect();
            assert_eq!(r.value, ulaw_to_pcm(&sent));
            k += n;
        }
        assert_eq!(k, 23);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mulaw_encoding_publishes_the_raw_bytes() {
    let gw = Gateway::start("mulaw", &["--audio-encoding", "mulaw"]);
    let audio = speech();
    let p = StreamPlan {
        stream: sid("MZ", 5),
        call: sid("CA", 5),
        offset: 0,
        chunks: 30,
        tracks: vec!["inbound"],
    };
    play(gw.port, &p, &audio, None).await;
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps[..1], Duration::from_secs(30), |r| {
            r.len() >= 30
        })
    })
    .await
    .unwrap();
    let mut recs = recs;
    recs.sort_by_key(|r| r.offset);
    assert_eq!(recs.len(), 30);
    for (k, r) in recs.iter().enumerate() {
        assert_eq!(r.h("encoding"), "mulaw");
        assert_eq!(r.value, chunk_of(&audio, 0, k as u64));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_close_with_specific_codes_and_publish_error_events() {
    let gw = Gateway::start("errors", &[]);
    // Other paths: 404 before any upgrade.
    assert!(connect_path(gw.port, "/other").await.is_err());
    let (status, _) = http_get(gw.port, "/other").unwrap();
    assert_eq!(status, 404);

    // media before start → 1008
    let s1 = sid("MZ", 901);
    let mut c = connect(&gw).await;
    c.send(&connected()).await;
    c.send(&media(&s1, 2, "inbound", 1, 0, &[0xFF; 160])).await;
    let (code, reason) = c.read_close(Duration::from_secs(5)).await.expect("close");
    assert_eq!((code, reason.as_str()), (1008, "media before start"));

    // duplicate start → 1008, after one chunk that must still be delivered
    let s2 = sid("MZ", 902);
    let call = sid("CA", 902);
    let mut c = connect(&gw).await;
    c.send(&start(&s2, &call, ACCOUNT, &["inbound"], &[])).await;
    c.send(&media(&s2, 2, "inbound", 1, 0, &[0x11; 160])).await;
    c.send(&start(&s2, &call, ACCOUNT, &["inbound"], &[])).await;
    let (code, reason) = c.read_close(Duration::from_secs(5)).await.expect("close");
    assert_eq!((code, reason.as_str()), (1008, "duplicate start"));

    // invalid JSON → 1007; binary → 1003; oversized → 1009; bad base64 → 1007
    let mut c = connect(&gw).await;
    c.send("{not json").await;
    assert_eq!(
        c.read_close(Duration::from_secs(5)).await.map(|x| x.0),
        Some(1007)
    );
    let mut c = connect(&gw).await;
    c.send_frame(fastwebsockets::Frame::binary(
        fastwebsockets::Payload::Owned(vec![1, 2, 3]),
    ))
    .await;
    assert_eq!(
        c.read_close(Duration::from_secs(5)).await.map(|x| x.0),
        Some(1003)
    );
    let mut c = connect(&gw).await;
    c.send(&"x".repeat(70 * 1024)).await;
    assert_eq!(
        c.read_close(Duration::from_secs(5)).await.map(|x| x.0),
        Some(1009)
    );
    let s3 = sid("MZ", 903);
    let mut c = connect(&gw).await;
    c.send(&start(&s3, &call, ACCOUNT, &["inbound"], &[])).await;
    c.send(
        &media(&s3, 2, "inbound", 1, 0, &[0x22; 160]).replace("\"payload\":\"", "\"payload\":\"!!"),
    )
    .await;
    assert_eq!(
        c.read_close(Duration::from_secs(5)).await.map(|x| x.0),
        Some(1007)
    );

    // Unknown events and fields are tolerated.
    let s4 = sid("MZ", 904);
    let mut c = connect(&gw).await;
    c.send(&start(&s4, &call, ACCOUNT, &["inbound"], &[])).await;
    c.send(&format!(
        r#"{{"event":"brand-new","sequenceNumber":"2","streamSid":"{s4}","x":{{"y":1}}}}"#
    ))
    .await;
    c.send(
        &media(&s4, 3, "inbound", 1, 0, &[0x33; 160])
            .replace("\"track\"", "\"future\":[1,2],\"track\""),
    )
    .await;
    c.send(&stop(&s4, 4, ACCOUNT, &call)).await;
    assert_eq!(
        c.read_close(Duration::from_secs(5)).await.map(|x| x.0),
        Some(1000)
    );

    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let s2c = s2.clone();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(30), |r| {
            count_events(r, "error") >= 4
                && count_events(r, "stop") >= 1
                && r.iter().filter(|x| x.topic.contains(".audio.")).count() >= 2
        })
    })
    .await
    .unwrap();
    let errors: Vec<serde_json::Value> = recs
        .iter()
        .filter(|r| r.topic.ends_with(".events"))
        .map(|r| r.json())
        .filter(|e| e["type"] == "error")
        .collect();
    let kinds: std::collections::HashSet<&str> = errors
        .iter()
        .map(|e| e["error_kind"].as_str().unwrap())
        .collect();
    for k in [
        "media_before_start",
        "duplicate_start",
        "invalid_json",
        "binary_frame",
        "message_too_large",
        "invalid_base64",
    ] {
        assert!(kinds.contains(k), "missing error event {k}: {kinds:?}");
    }
    let dup = errors
        .iter()
        .find(|e| e["error_kind"] == "duplicate_start")
        .unwrap();
    assert_eq!(dup["stream_sid"], s2c.as_str());
    assert_eq!(dup["close_code"], 1008);
    assert_eq!(dup["frames_published"], 1);
    // The chunk accepted before the error was delivered.
    assert!(recs
        .iter()
        .any(|r| r.key.as_deref() == Some(s2c.as_str()) && r.value == ulaw_to_pcm(&[0x11; 160])));
    assert!(recs
        .iter()
        .any(|r| r.key.as_deref() == Some(s4.as_str()) && r.value == ulaw_to_pcm(&[0x33; 160])));
    assert!(gw.metric("gateway_protocol_errors_total{kind=\"media_before_start\"}") >= 1.0);
    assert!(gw.metric("gateway_unknown_fields_total") >= 2.0);
    assert_eq!(
        gw.metric("gateway_messages_received_total{event=\"unknown\"}"),
        1.0
    );
    assert!(gw.metric("gateway_http_rejections_total{reason=\"not_found\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_capacity_limit() {
    let gw = Gateway::start("admin", &["--max-streams", "2"]);
    assert_eq!(http_get(gw.admin_port, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(gw.admin_port, "/readyz").unwrap().0, 200);
    let m = gw.metrics();
    for name in [
        "gateway_open_streams",
        "gateway_streams_total",
        "gateway_messages_received_total",
        "gateway_media_bytes_total",
        "gateway_frames_published_total",
        "gateway_frames_delivered_total",
        "gateway_frames_failed_total",
        "gateway_frames_dropped_total",
        "gateway_protocol_errors_total",
        "gateway_kafka_delivery_latency_seconds",
        "gateway_receive_to_ack_latency_seconds",
        "gateway_kafka_queue_messages",
        "gateway_kafka_queue_bytes",
        "gateway_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(m.contains(name), "metric {name} missing");
    }
    let _a = connect(&gw).await;
    let _b = connect(&gw).await;
    // Third stream: 503 before the upgrade.
    let err = connect_path(gw.port, "/stream")
        .await
        .err()
        .expect("refused");
    assert!(
        err.contains("503") || err.to_lowercase().contains("status"),
        "{err}"
    );
    assert_eq!(
        gw.metric("gateway_http_rejections_total{reason=\"capacity\"}"),
        1.0
    );
    assert_eq!(http_get(gw.admin_port, "/readyz").unwrap().0, 503);
}

#[test]
fn bad_configuration_exits_64_listing_every_problem() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            "nope",
            "--frames-per-record",
            "0",
            "--log-format",
            "xml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["--listen", "--frames-per-record", "--log-format"] {
        assert!(err.contains(needle), "{needle} not reported: {err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn missing_topics_without_create_is_a_clear_startup_error() {
    let brokers = brokers();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--brokers",
            &brokers,
            "--topic-prefix",
            &unique_prefix("nocreate"),
            "--create-topics=false",
            "--insecure-skip-signature",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing topics"), "{err}");
}

/// Plays `n` short streams (both tracks) and returns every record of the three topics.
async fn short_streams(gw: &Gateway, first: u64, n: u64) -> (Vec<String>, Vec<Record>) {
    let audio = speech();
    let sids: Vec<String> = (0..n).map(|i| sid("MZ", first + i)).collect();
    let mut handles = Vec::new();
    for (i, s) in sids.iter().enumerate() {
        let plan = StreamPlan {
            stream: s.clone(),
            call: sid("CA", first + i as u64),
            offset: i * 800,
            chunks: 5,
            tracks: vec!["inbound", "outbound"],
        };
        let (port, audio) = (gw.port, audio.clone());
        handles.push(tokio::spawn(async move {
            play(port, &plan, &audio, None).await
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let (brokers, tps) = (gw.brokers.clone(), topics(gw));
    // Per stream: 5 chunks × 2 tracks, and the start and stop events (keyless status records
    // on the events topic are not counted).
    let expected = (n * (10 + 2)) as usize;
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(30), |r| {
            r.iter().filter(|x| x.key.is_some()).count() >= expected
        })
    })
    .await
    .unwrap();
    let recs: Vec<Record> = recs.into_iter().filter(|r| r.key.is_some()).collect();
    assert_eq!(recs.len(), expected, "records of {n} streams");
    (sids, recs)
}

/// An idle drain thread waits for records instead of waking every `--kafka-drain-interval`
/// (1 ms): its wake-ups are counted, and a quiet second costs a few dozen of them (it still
/// looks at control requests and librdkafka's events every 50 ms), not a thousand. Records
/// sent after the quiet spell arrive complete and are all acknowledged, and the drain goes
/// back to waiting once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_drain_waits_for_records_instead_of_ticking() {
    let gw = Gateway::start("idledrain", &[]);
    let idle_wakeups = |gw: &Gateway| {
        let before = gw.metric("gateway_kafka_drain_iterations_total");
        std::thread::sleep(Duration::from_secs(1));
        gw.metric("gateway_kafka_drain_iterations_total") - before
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = idle_wakeups(&gw);
    assert!(
        (5.0..200.0).contains(&quiet),
        "{quiet} wake-ups in an idle second"
    );
    // Two streams × 5 chunks × 2 tracks plus their events, checked by the helper.
    short_streams(&gw, 1, 2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (gw.metric("gateway_frames_delivered_total") < 20.0
        || gw.metric("gateway_kafka_window_records") > 0.0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(gw.metric("gateway_frames_published_total"), 20.0);
    assert_eq!(gw.metric("gateway_frames_delivered_total"), 20.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = idle_wakeups(&gw);
    assert!(
        (5.0..200.0).contains(&after),
        "{after} wake-ups in an idle second after the streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_per_instance_keeps_an_instance_on_its_partitions_and_each_stream_on_one() {
    // Instance 1 of 3, two partitions each, six per topic: partitions 2 and 3 of every topic.
    let gw = Gateway::start(
        "ppi",
        &[
            "--topic-partitions",
            "6",
            "--partitions-per-instance",
            "2",
            "--instance-index",
            "1",
            "--instance-count",
            "3",
        ],
    );
    // Connections that fail before `start` publish unkeyed error events: those stay on the
    // instance's partitions too (the one an empty key picks), not a random one.
    for _ in 0..8 {
        let mut c = connect(&gw).await;
        c.send("not json").await;
        assert_eq!(
            c.read_close(Duration::from_secs(5)).await.map(|c| c.0),
            Some(1007)
        );
        // Past librdkafka's sticky window (10 ms), so a random partitioner would pick anew.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (sids, recs) = short_streams(&gw, 5000, 16).await;
    let events = vec![format!("{}.events", gw.prefix)];
    let b = gw.brokers.clone();
    let unkeyed: Vec<Record> = tokio::task::spawn_blocking(move || {
        consume_until(&b, &events, Duration::from_secs(20), |r| {
            r.iter()
                .filter(|x| x.key.is_none() && x.json()["type"] == "error")
                .count()
                >= 8
        })
    })
    .await
    .unwrap()
    .into_iter()
    .filter(|r| r.key.is_none() && r.json()["type"] == "error")
    .collect();
    assert_eq!(unkeyed.len(), 8, "unkeyed error events");
    let base = gateway::sink::partitioning::pick(1, 2, b"", 6);
    assert!(base == 2 || base == 3);
    for r in &unkeyed {
        assert_eq!(
            r.partition, base,
            "unkeyed error event on the instance's partition"
        );
    }
    let mut used = std::collections::BTreeSet::new();
    for s in &sids {
        let want = gateway::sink::partitioning::pick(1, 2, s.as_bytes(), 6);
        let mine: Vec<&Record> = recs
            .iter()
            .filter(|r| r.key.as_deref() == Some(s.as_str()))
            .collect();
        assert_eq!(mine.len(), 12, "records of {s}");
        for r in mine {
            // Audio of both tracks and the stream's events share the partition number.
            assert_eq!(r.partition, want, "{s} on {}", r.topic);
        }
        used.insert(want);
    }
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        vec![2, 3],
        "16 streams over the instance's two partitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_per_instance_all_spreads_streams_over_the_topic() {
    let gw = Gateway::start(
        "ppiall",
        &[
            "--topic-partitions",
            "6",
            "--partitions-per-instance",
            "all",
        ],
    );
    let (sids, recs) = short_streams(&gw, 6000, 16).await;
    let mut used = std::collections::BTreeSet::new();
    for s in &sids {
        let parts: std::collections::BTreeSet<(String, i32)> = recs
            .iter()
            .filter(|r| r.key.as_deref() == Some(s.as_str()))
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        assert_eq!(
            parts.len(),
            3,
            "{s}: one partition on each of the three topics"
        );
        used.extend(parts.into_iter().map(|(_, p)| p));
    }
    // librdkafka's key hash over six partitions: 16 streams land on at least three of them
    // (two or fewer has probability below 1e-6).
    assert!(used.len() >= 3, "partitions used: {used:?}");
}
