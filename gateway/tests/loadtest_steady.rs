//! The load harness against the real gateway and broker: a small `steady` scenario with
//! Kafka verification must report zero loss, no duplicates, no reordering and bit-exact audio.

mod support;

use std::sync::Arc;
use std::time::Duration;

use loadtest::audio::ChunkTable;
use loadtest::scenario::{run, RunConfig, Scenario};
use loadtest::stream::StreamConfig;
use loadtest::verify::VerifyConfig;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_scenario_with_verification_is_lossless_and_bit_exact() {
    let gw = Gateway::start("harness", &[]);
    let audio = Arc::new(ChunkTable::new(&speech()).expect("fixture"));
    let cfg = RunConfig {
        url: gw.url(),
        streams: 20,
        ramp_per_sec: 0.0,
        stream: StreamConfig {
            both_tracks: true,
            chunks: Some(100),
            speed: 4.0,
            flood: false,
            dtmf_at: Some(30),
            mark_at: Some(60),
            close_timeout: Duration::from_secs(5),
            run_id: std::process::id() as u64,
        },
        audio,
        auth_token: None,
        ca_file: None,
        verify: Some(VerifyConfig {
            brokers: gw.brokers.clone(),
            topic_prefix: gw.prefix.clone(),
        }),
        grace: Duration::from_secs(10),
        gateway_metrics: Some(format!("http://127.0.0.1:{}/metrics", gw.admin_port)),
        metrics_every: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(5),
        progress: false,
    };
    let report = run(Scenario::Steady, cfg).await.expect("run");
    assert_eq!(report.streams.completed, 20, "{:?}", report.streams);
    assert_eq!(report.streams.failed, 0);
    let v = report.verification.expect("verification ran");
    let t = &v.total;
    assert_eq!(t.expected, 20 * 100 * 2);
    assert_eq!(t.received, t.expected, "received");
    assert_eq!(
        (
            t.missing,
            t.duplicated,
            t.out_of_order,
            t.pcm_mismatches,
            t.unexpected
        ),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(v.start_events, 20);
    assert_eq!(v.end_events, 20);
    assert!(v.latency.count >= t.expected);
}
