//! Fault injection with the real broker: pause it (SIGSTOP/SIGCONT) under load.
//!
//! Each test binary has its own broker, and these tests pause it, so they run one at a time.

mod support;

use std::time::Duration;

use support::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const ACCOUNT: &str = "AC00000000000000000000000000000003";

async fn realtime_stream(
    port: u16,
    stream_sid: String,
    secs: u64,
    audio: std::sync::Arc<Vec<u8>>,
) -> u64 {
    realtime_call(port, stream_sid, ACCOUNT, secs, audio, false).await
}

fn per_stream(recs: &[Record], stream_sid: &str) -> Vec<Record> {
    let mut mine: Vec<Record> = recs
        .iter()
        .filter(|r| r.topic.contains(".audio.") && r.key.as_deref() == Some(stream_sid))
        .cloned()
        .collect();
    mine.sort_by_key(|r| r.offset);
    mine
}

async fn max_gauge_while(gw: &Gateway, name: &str, dur: Duration) -> f64 {
    let mut max: f64 = 0.0;
    let end = tokio::time::Instant::now() + dur;
    while tokio::time::Instant::now() < end {
        max = max.max(gw.metric(name));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_paused_15s_under_100_streams_loses_nothing_and_keeps_order() {
    let _g = SERIAL.lock().await;
    let budget = 256u64 << 20;
    let gw = Gateway::start("pause", &["--max-inflight-bytes", &budget.to_string()]);
    let audio = std::sync::Arc::new(speech());
    let sids: Vec<String> = (0..100).map(|i| sid("MZ", 7000 + i)).collect();
    let secs = 21;
    let handles: Vec<_> = sids
        .iter()
        .map(|s| tokio::spawn(realtime_stream(gw.port, s.clone(), secs, audio.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal_broker(libc::SIGSTOP);
    let max_inflight =
        max_gauge_while(&gw, "gateway_inflight_bytes", Duration::from_secs(15)).await;
    // Readiness reflects the outage (metadata probe fails) while audio is held.
    let (ready_status, _) = http_get(gw.admin_port, "/readyz").unwrap();
    signal_broker(libc::SIGCONT);
    let mut sent = 0;
    for h in handles {
        sent += h.await.unwrap();
    }
    assert_eq!(sent, 100 * secs * 50);
    assert!(
        max_inflight > 0.0 && max_inflight <= budget as f64,
        "in-flight {max_inflight} vs budget {budget}"
    );
    assert_eq!(ready_status, 503, "readyz during a broker outage");
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let want = sent as usize;
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps[..1], Duration::from_secs(120), |r| {
            r.len() >= want
        })
    })
    .await
    .unwrap();
    assert_eq!(
        recs.len(),
        want,
        "records after the outage (duplicates or loss)"
    );
    for s in &sids {
        let mine = per_stream(&recs, s);
        assert_eq!(mine.len() as u64, secs * 50, "{s}");
        for (k, r) in mine.iter().enumerate() {
            assert_eq!(r.h("chunk"), (k + 1).to_string(), "{s} order");
            let off = (k * 160) % (audio.len() - 160);
            assert_eq!(
                r.value,
                ulaw_to_pcm(&audio[off..off + 160]),
                "{s} chunk {}",
                k + 1
            );
        }
    }
    assert_eq!(
        gw.metric("gateway_frames_dropped_total{reason=\"queue_full\"}"),
        0.0
    );
    assert_eq!(gw.metric("gateway_frames_delivered_total"), sent as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_beyond_the_budget_drops_exactly_what_the_metrics_say_and_recovers() {
    let _g = SERIAL.lock().await;
    let budget = 2u64 << 20;
    let gw = Gateway::start("overflow", &["--max-inflight-bytes", &budget.to_string()]);
    let audio = std::sync::Arc::new(speech());
    let sids: Vec<String> = (0..20).map(|i| sid("MZ", 8000 + i)).collect();
    let secs = 14;
    let handles: Vec<_> = sids
        .iter()
        .map(|s| tokio::spawn(realtime_stream(gw.port, s.clone(), secs, audio.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal_broker(libc::SIGSTOP);
    let max_inflight = max_gauge_while(&gw, "gateway_inflight_bytes", Duration::from_secs(8)).await;
    signal_broker(libc::SIGCONT);
    let mut sent = 0;
    for h in handles {
        sent += h.await.unwrap();
    }
    // The budget binds: never more than budget + one record per connection in flight.
    assert!(
        max_inflight <= (budget + 20 * 1024) as f64,
        "in-flight {max_inflight} > budget {budget}"
    );
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let n = sids.len();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(60), |r| {
            count_events(r, "stop") >= n
        })
    })
    .await
    .unwrap();
    let stops: Vec<serde_json::Value> = recs
        .iter()
        .filter(|r| r.topic.ends_with(".events") && r.json()["type"] == "stop")
        .map(|r| r.json())
        .collect();
    assert_eq!(stops.len(), n);
    let published: u64 = stops
        .iter()
        .map(|e| e["frames_published"].as_u64().unwrap())
        .sum();
    let dropped_events: u64 = stops
        .iter()
        .map(|e| e["frames_dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(
        published + dropped_events,
        sent,
        "every frame published or dropped"
    );
    assert!(
        dropped_events > 0,
        "the outage should have exceeded the budget"
    );
    // Let every published record arrive, then compare with the metrics.
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps[..1], Duration::from_secs(60), |r| {
            r.len() as u64 >= published
        })
    })
    .await
    .unwrap();
    let consumed = recs.len() as u64;
    assert_eq!(
        consumed, published,
        "consumer sees exactly the published frames"
    );
    let dropped_metric: f64 = [
        "queue_full",
        "too_large",
        "produce_error",
        "empty_payload",
        "delivery_failed",
        "evicted",
    ]
    .iter()
    .map(|r| gw.metric(&format!("gateway_frames_dropped_total{{reason=\"{r}\"}}")))
    .sum();
    assert_eq!(
        dropped_metric as u64,
        sent - consumed,
        "metrics equal what the consumer finds missing"
    );
    // Recovery without restart: each stream's last chunk (sent after the outage) arrived, and
    // what arrived is in order and bit-exact.
    for s in &sids {
        let mine = per_stream(&recs, s);
        assert_eq!(
            mine.last().map(|r| r.h("chunk").to_string()),
            Some((secs * 50).to_string()),
            "{s} recovered"
        );
        let mut last = 0u64;
        for r in &mine {
            let k: u64 = r.h("chunk").parse().unwrap();
            assert!(k > last, "{s} order");
            last = k;
            let off = ((k - 1) as usize * 160) % (audio.len() - 160);
            assert_eq!(r.value, ulaw_to_pcm(&audio[off..off + 160]));
        }
    }
    assert_eq!(
        http_get(gw.admin_port, "/readyz").unwrap().0,
        200,
        "ready again after recovery"
    );
}

/// dtmf and mark events come as fast as a peer sends them: while Kafka is away they are
/// admitted against the in-flight budget like audio, so a flood of large marks cannot grow
/// memory past it; what is refused is counted, and the stream's lifecycle events (its
/// terminal event) still arrive once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_marks_during_an_outage_stays_within_the_budget() {
    let _g = SERIAL.lock().await;
    let budget = 2u64 << 20;
    let gw = Gateway::start("markflood", &["--max-inflight-bytes", &budget.to_string()]);
    let stream = sid("MZ", 9100);
    let call = sid("CA", 9100);
    let mut c = connect(&gw).await;
    c.send(&start(&stream, &call, ACCOUNT, &["inbound"], &[]))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal_broker(libc::SIGSTOP);
    let name = "m".repeat(8 * 1024);
    let n = 1_000u64; // 8 MiB of mark names against a 2 MiB budget
    let mut max_inflight: f64 = 0.0;
    for i in 0..n {
        c.send(&mark(&stream, i + 2, &name)).await;
        if i % 100 == 0 {
            max_inflight = max_inflight.max(gw.metric("gateway_inflight_bytes"));
        }
    }
    c.send(&dtmf(&stream, n + 2, "5")).await;
    let t0 = std::time::Instant::now();
    while gw.metric("gateway_messages_received_total{event=\"dtmf\"}") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max_inflight = max_inflight.max(gw.metric("gateway_inflight_bytes"));
    let dropped = gw.metric("gateway_events_dropped_total");
    let published = gw.metric("gateway_events_published_total{type=\"mark\"}")
        + gw.metric("gateway_events_published_total{type=\"dtmf\"}");
    signal_broker(libc::SIGCONT);
    assert!(
        max_inflight <= budget as f64,
        "in-flight {max_inflight} > budget {budget}"
    );
    assert!(dropped > 0.0, "nothing refused");
    assert_eq!(
        published + dropped,
        (n + 1) as f64,
        "every event published or dropped"
    );
    c.send(&stop(&stream, n + 3, ACCOUNT, &call)).await;
    let (brokers, tps) = (gw.brokers.clone(), topics(&gw));
    let want_marks = gw.metric("gateway_events_published_total{type=\"mark\"}") as usize;
    let sid2 = stream.clone();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps[2..], Duration::from_secs(60), |r| {
            r.iter()
                .any(|x| x.key.as_deref() == Some(sid2.as_str()) && x.json()["type"] == "stop")
        })
    })
    .await
    .unwrap();
    let mine: Vec<_> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some(stream.as_str()))
        .map(|r| r.json())
        .collect();
    assert_eq!(mine.iter().filter(|e| e["type"] == "start").count(), 1);
    assert_eq!(mine.iter().filter(|e| e["type"] == "stop").count(), 1);
    assert_eq!(
        mine.iter().filter(|e| e["type"] == "mark").count(),
        want_marks,
        "the marks admitted are the marks delivered"
    );
}
