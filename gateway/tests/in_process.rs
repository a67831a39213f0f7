//! The whole gateway in process, mini-redis style: `app::run(config, listeners, shutdown)` on
//! port-0 listeners against librdkafka's MockCluster, driven by a Twilio-speaking client and
//! stopped through its `Shutdown` handle. No gateway process, no broker process.

mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use gateway::app::{self, Listeners};
use gateway::config::{Config, RunArgs};
use gateway::shutdown::Shutdown;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000042";
const PREFIX: &str = "inproc";

/// Mock clusters and their threads are cheap; the tests still run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn config(brokers: &str, extra: &[&str]) -> Config {
    let mut args = vec![
        "gateway",
        "--insecure-skip-signature",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--brokers",
        brokers,
        "--topic-prefix",
        PREFIX,
        "--create-topics=false",
        "--gateway-id",
        "gw-inproc",
    ];
    args.extend_from_slice(extra);
    Config::from_args(Cli::try_parse_from(args).unwrap().run).expect("valid config")
}

fn cluster() -> MockCluster<'static, DefaultProducerContext> {
    let mock = MockCluster::new(1).expect("mock cluster");
    for t in ["audio.inbound", "audio.outbound", "events", "playback"] {
        mock.create_topic(&format!("{PREFIX}.{t}"), 2, 1).unwrap();
    }
    mock
}

struct Running {
    port: u16,
    admin: u16,
    shutdown: std::sync::Arc<Shutdown>,
    task: tokio::task::JoinHandle<Result<app::RunReport, app::AppError>>,
}

async fn launch(cfg: Config) -> Running {
    let listeners = Listeners::bind(&cfg).await.expect("bind");
    let port = listeners.stream.local_addr().unwrap().port();
    let admin = listeners.admin.local_addr().unwrap().port();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(app::run(cfg, listeners, shutdown.clone()));
    let t0 = Instant::now();
    loop {
        let ready = tokio::task::spawn_blocking(move || http_get(admin, "/readyz"))
            .await
            .unwrap();
        if matches!(ready, Ok((200, _))) {
            break;
        }
        if task.is_finished() {
            panic!("app::run ended during start-up: {:?}", task.await);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not ready: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Running {
        port,
        admin,
        shutdown,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_through_the_assembled_gateway_and_a_clean_drain() {
    let _g = SERIAL.lock().await;
    let mock = cluster();
    let brokers = mock.bootstrap_servers();
    let gw = launch(config(&brokers, &[])).await;
    let audio = speech();
    let s = sid("MZ", 1);
    let call = sid("CA", 1);
    let mut c = connect_path(gw.port, "/stream").await.unwrap();
    c.send(&connected()).await;
    c.send(&start(
        &s,
        &call,
        ACCOUNT,
        &["inbound", "outbound"],
        &[("k", "v")],
    ))
    .await;
    for k in 0..40u64 {
        let off = k as usize * 160;
        for (i, track) in ["inbound", "outbound"].iter().enumerate() {
            c.send(&media(
                &s,
                2 + 2 * k + i as u64,
                track,
                k + 1,
                k * 20,
                &audio[off..off + 160],
            ))
            .await;
        }
    }
    c.send(&stop(&s, 82, ACCOUNT, &call)).await;
    c.close().await;
    assert!(c.read_close(Duration::from_secs(5)).await.is_some());
    // A stream still open when the drain begins is closed with 1001 once the drain timeout
    // (30 s by default) is cut short by a second request.
    let s2 = sid("MZ", 2);
    let mut c2 = connect_path(gw.port, "/stream").await.unwrap();
    c2.send(&start(&s2, &sid("CA", 2), ACCOUNT, &["inbound"], &[]))
        .await;
    c2.send(&media(&s2, 2, "inbound", 1, 0, &audio[..160]))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.shutdown.begin_drain();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        tokio::task::spawn_blocking(move || http_get(gw.admin, "/readyz").map(|r| r.0))
            .await
            .unwrap()
            .unwrap(),
        503,
        "not ready while draining"
    );
    gw.shutdown.hurry();
    assert_eq!(
        c2.read_close(Duration::from_secs(10)).await.map(|c| c.0),
        Some(1001)
    );
    let report = gw.task.await.unwrap().expect("run");
    assert!(report.flush.complete, "{report:?}");
    assert_eq!(report.tasks_left, 0);
    // Everything is in the mock cluster: 80 audio records, bit-exact, plus the events.
    let tps = [
        format!("{PREFIX}.audio.inbound"),
        format!("{PREFIX}.audio.outbound"),
        format!("{PREFIX}.events"),
    ];
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(20), |r| {
            // Both streams' final events: they may sit in different partitions, fetched at
            // different times.
            r.iter().filter(|x| x.topic.contains(".audio.")).count() >= 81
                && count_events(r, "disconnect") >= 1
                && count_events(r, "stop") >= 1
        })
    })
    .await
    .unwrap();
    let inbound: Vec<&Record> = recs
        .iter()
        .filter(|r| r.topic.ends_with(".inbound") && r.key.as_deref() == Some(s.as_str()))
        .collect();
    assert_eq!(inbound.len(), 40);
    for (k, r) in inbound.iter().enumerate() {
        assert_eq!(r.value, ulaw_to_pcm(&audio[k * 160..k * 160 + 160]));
        assert_eq!(r.h("timestamp_ms"), (k * 20).to_string());
    }
    let stop_ev = recs
        .iter()
        .find(|r| r.topic.ends_with(".events") && r.json()["type"] == "stop")
        .unwrap_or_else(|| {
            let evs: Vec<String> = recs
                .iter()
                .filter(|r| r.topic.ends_with(".events"))
                .map(|r| String::from_utf8_lossy(&r.value).into_owned())
                .collect();
            panic!("no stop event among {evs:#?}")
        })
        .json();
    assert_eq!(stop_ev["frames_delivered"], 80);
    assert_eq!(stop_ev["frames_received"], 80);
    let replay = stop_ev["replay"].as_array().unwrap();
    assert_eq!(replay.len(), 3, "inbound, outbound and events: {stop_ev}");
    let disc = recs
        .iter()
        .find(|r| r.topic.ends_with(".events") && r.json()["type"] == "disconnect")
        .unwrap()
        .json();
    assert_eq!(disc["reason"], "shutdown");
    assert_eq!(disc["frames_delivered"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_requested_during_start_up_returns_cleanly() {
    let _g = SERIAL.lock().await;
    // Brokers that accept TCP and never answer: start-up waits on metadata.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let brokers = silent.local_addr().unwrap().to_string();
    let cfg = config(&brokers, &[]);
    let listeners = Listeners::bind(&cfg).await.unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(app::run(cfg, listeners, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!task.is_finished());
    shutdown.begin_drain();
    let report = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("returns promptly")
        .unwrap()
        .expect("not an error");
    assert!(report.stopped_during_startup);
}
