//! SIGTERM while streams are live: drain, flush, lose nothing that was accepted.

mod support;

use std::time::Duration;

use fastwebsockets::{Frame, Payload};
use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000002";

/// Streams `chunks` inbound chunks at `pace`, stopping early if the socket fails.
/// Returns how many media messages were written successfully.
async fn stream(
    port: u16,
    stream_sid: String,
    chunks: u64,
    pace: Duration,
    audio: Vec<u8>,
    send_stop: bool,
) -> u64 {
    let mut c = connect_path(port, "/stream").await.expect("connect");
    let call = stream_sid.replace("MZ", "CA");
    c.send(&connected()).await;
    c.send(&start(&stream_sid, &call, ACCOUNT, &["inbound"], &[]))
        .await;
    let mut sent = 0;
    let mut next = tokio::time::Instant::now();
    for k in 0..chunks {
        let off = (k as usize * 160) % (audio.len() - 160);
        let msg = media(
            &stream_sid,
            k + 2,
            "inbound",
            k + 1,
            k * 20,
            &audio[off..off + 160],
        );
        if c.ws
            .write_frame(Frame::text(Payload::Owned(msg.into_bytes())))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
        next += pace;
        tokio::time::sleep_until(next).await;
    }
    if send_stop && sent == chunks {
        c.send(&stop(&stream_sid, chunks + 2, ACCOUNT, &call)).await;
        c.close().await;
    }
    let _ = c.read_close(Duration::from_secs(5)).await;
    sent
}

fn check_prefix(recs: &[Record], stream_sid: &str, n: u64, audio: &[u8]) {
    let mut mine: Vec<&Record> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some(stream_sid) && r.topic.contains(".audio."))
        .collect();
    mine.sort_by_key(|r| r.offset);
    assert_eq!(mine.len() as u64, n, "records of {stream_sid}");
    for (k, r) in mine.iter().enumerate() {
        let off = (k * 160) % (audio.len() - 160);
        assert_eq!(r.h("chunk"), (k + 1).to_string());
        assert_eq!(
            r.value,
            ulaw_to_pcm(&audio[off..off + 160]),
            "{stream_sid} chunk {}",
            k + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_200_live_streams_without_loss() {
    let mut gw = Gateway::start("drain", &["--drain-timeout", "30s"]);
    let audio = speech();
    let n = 200usize;
    let sids: Vec<String> = (0..n as u64).map(|i| sid("MZ", 500 + i)).collect();
    let handles: Vec<_> = sids
        .iter()
        .map(|s| {
            tokio::spawn(stream(
                gw.port,
                s.clone(),
                150,
                Duration::from_millis(20),
                audio.clone(),
                true,
            ))
        })
        .collect();
    // SIGTERM once every stream is live and streaming.
    let start = std::time::Instant::now();
    while gw.metric("gateway_open_streams") < n as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "streams did not open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new streams while draining.
    assert!(
        connect_path(gw.port, "/stream").await.is_err(),
        "new stream accepted while draining"
    );
    for h in handles {
        assert_eq!(h.await.unwrap(), 150);
    }
    let code = tokio::task::spawn_blocking(move || {
        let c = gw.wait_exit(Duration::from_secs(30));
        (c, gw)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "gateway exit code");
    let gw = code.1;
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(30), |r| {
            r.iter().filter(|x| x.topic.contains(".audio.")).count() >= n * 150
                && r.iter().filter(|x| x.topic.ends_with(".events")).count() >= n * 2
        })
    })
    .await
    .unwrap();
    for s in &sids {
        check_prefix(&recs, s, 150, &audio);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_streams_with_1001_and_everything_accepted_is_delivered() {
    let mut gw = Gateway::start("force", &["--drain-timeout", "1s"]);
    let audio = speech();
    let sids: Vec<String> = (0..6).map(|i| sid("MZ", 600 + i)).collect();
    let handles: Vec<_> = sids
        .iter()
        .map(|s| {
            tokio::spawn(stream(
                gw.port,
                s.clone(),
                400,
                Duration::from_millis(20),
                audio.clone(),
                false,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.sigterm();
    for h in handles {
        let sent = h.await.unwrap();
        assert!(sent < 400, "stream was not cut by the drain timeout");
    }
    let (code, gw) =
        tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(30)), gw))
            .await
            .unwrap();
    assert_eq!(code, Some(0));
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let n = sids.len();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(30), |r| {
            count_events(r, "disconnect") >= n
        })
    })
    .await
    .unwrap();
    // Give the audio a moment more (different topic, same flush).
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let total: u64 = recs
        .iter()
        .filter(|r| r.topic.ends_with(".events") && r.json()["type"] == "disconnect")
        .map(|r| r.json()["frames_published"].as_u64().unwrap())
        .sum();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(30), |r| {
            r.iter().filter(|x| x.topic.contains(".audio.")).count() as u64 >= total
        })
    })
    .await
    .unwrap();
    for s in &sids {
        let ev: Vec<serde_json::Value> = recs
            .iter()
            .filter(|r| r.topic.ends_with(".events") && r.key.as_deref() == Some(s.as_str()))
            .map(|r| r.json())
            .collect();
        let end = ev
            .iter()
            .find(|e| e["type"] == "disconnect")
            .expect("disconnect event");
        assert_eq!(end["reason"], "shutdown");
        assert_eq!(end["frames_dropped"], 0);
        let published = end["frames_published"].as_u64().unwrap();
        assert!(published > 20, "stream {s} published only {published}");
        check_prefix(&recs, s, published, &audio);
    }
}

/// Streams inbound chunks every `pace` until the gateway closes the socket; returns
/// (chunks written, close code).
async fn until_closed(
    port: u16,
    stream_sid: String,
    pace: Duration,
    audio: Vec<u8>,
) -> (u64, Option<u16>) {
    // A loaded 2-core machine may refuse a connect now and then: retry like a client would.
    let mut attempt = 0;
    let mut c = loop {
        match connect_path(port, "/stream").await {
            Ok(c) => break c,
            Err(e) if attempt < 5 => {
                attempt += 1;
                eprintln!("{stream_sid}: connect failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => return (0, None),
        }
    };
    let call = stream_sid.replace("MZ", "CA");
    c.send(&start(&stream_sid, &call, ACCOUNT, &["inbound"], &[]))
        .await;
    let (mut rd, mut wr) = c.ws.split(tokio::io::split);
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut next = tokio::time::Instant::now();
        loop {
            let off = (sent as usize * 160) % (audio.len() - 160);
            let msg = media(
                &stream_sid,
                sent + 2,
                "inbound",
                sent + 1,
                sent * 20,
                &audio[off..off + 160],
            );
            if wr
                .write_frame(Frame::text(Payload::Owned(msg.into_bytes())))
                .await
                .is_err()
            {
                return sent;
            }
            sent += 1;
            next += pace;
            tokio::time::sleep_until(next).await;
        }
    });
    let mut close = None;
    loop {
        match rd
            .read_frame(&mut |_: Frame<'_>| async { Ok::<_, fastwebsockets::WebSocketError>(()) })
            .await
        {
            Ok(f) if f.opcode == fastwebsockets::OpCode::Close => {
                let p = &f.payload[..];
                close = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    writer.abort();
    let sent = writer.await.unwrap_or(0);
    (sent, close)
}

/// 2,000 live streams on this 2-core machine when SIGTERM comes: the drain waits for every
/// connection task to publish its tail and terminal event before the final flush, so every
/// chunk a stream's terminal event counts as delivered is in Kafka and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_2000_live_streams_loses_nothing() {
    let mut gw = Gateway::start(
        "drain2k",
        &[
            "--drain-timeout",
            "1s",
            "--max-handshakes-per-second",
            "0",
            "--max-handshakes-per-source",
            "0",
        ],
    );
    let audio = speech();
    let n = 2000u64;
    let sids: Vec<String> = (0..n).map(|i| sid("MZ", 20_000 + i)).collect();
    let mut handles = Vec::new();
    for s in &sids {
        handles.push(tokio::spawn(until_closed(
            gw.port,
            s.clone(),
            Duration::from_millis(200),
            audio.clone(),
        )));
        // Spread the handshakes a little (2,000 in about 2 s).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = std::time::Instant::now();
    while gw.metric("gateway_open_streams") < n as f64 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "streams did not open: {}",
            gw.metric("gateway_open_streams")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    gw.sigterm();
    let mut closed_1001 = 0;
    for h in handles {
        let (_sent, close) = h.await.unwrap();
        if close == Some(1001) {
            closed_1001 += 1;
        }
    }
    assert_eq!(closed_1001, n, "every stream closed by the drain with 1001");
    let (code, gw) =
        tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(90)), gw))
            .await
            .unwrap();
    assert_eq!(code, Some(0));
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(120), |r| {
            count_events(r, "disconnect") >= n as usize
        })
    })
    .await
    .unwrap();
    let mut want = std::collections::HashMap::new();
    for r in recs.iter().filter(|r| r.topic.ends_with(".events")) {
        let v = r.json();
        if v["type"] == "disconnect" {
            assert_eq!(v["reason"], "shutdown");
            assert_eq!(v["frames_dropped"], 0, "{v}");
            assert_eq!(v["frames_received"], v["frames_delivered"], "{v}");
            want.insert(
                r.key.clone().unwrap(),
                v["frames_delivered"].as_u64().unwrap(),
            );
        }
    }
    assert_eq!(want.len() as u64, n, "one terminal event per stream");
    let total: u64 = want.values().sum();
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(120), |r| {
            r.iter().filter(|x| x.topic.contains(".audio.")).count() as u64 >= total
        })
    })
    .await
    .unwrap();
    let mut got = std::collections::HashMap::<String, u64>::new();
    for r in recs.iter().filter(|r| r.topic.contains(".audio.")) {
        *got.entry(r.key.clone().unwrap()).or_default() += 1;
    }
    for (s, n) in &want {
        assert_eq!(
            got.get(s).copied().unwrap_or(0),
            *n,
            "{s}: Kafka holds what its terminal event counts"
        );
    }
    assert!(total > n * 5, "streams carried audio ({total} chunks)");
}
