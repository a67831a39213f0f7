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
