//! Scenarios: steady, burst, ramp, soak and bidirectional.
//!
//! All share one [`Harness`]: the connector, the run counters, the optional Kafka
//! verifier, a 1-second sampler (timeline + progress line) and an optional sampler of the
//! gateway's RSS. Streams are spawned one task each on a drift-free ramp schedule.
//! `bidirectional` adds the echo bot ([`crate::echo`]), the simulated Twilio playout on every
//! stream and the downlink verifier ([`crate::downlink`]).

use crate::audio::ChunkTable;
use crate::client::{ClientError, Connector};
use crate::downlink::DownlinkVerifier;
use crate::echo::{EchoBot, EchoConfig, EchoEncoding, EchoError};
use crate::metrics;
use crate::probe::ProbeConfig;
use crate::report::{
    AckWindow, BidiReport, RampReport, RampStep, Report, RssReport, Sample, StreamCounts,
};
use crate::stats::{chart_buckets, Percentiles, RunStats};
use crate::stream::{run_stream, DownlinkHooks, StreamConfig, StreamEnv, StreamOutcome};
use crate::verify::{
    KafkaVerifier, VerifyConfig, VerifyError, VerifyOptions, VerifyProgress, VerifySummary,
};
use hdrhistogram::Histogram;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Settings common to every scenario.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// `ws://` or `wss://` URL of the gateway.
    pub url: String,
    /// Streams to open (ramp: the upper bound).
    pub streams: u64,
    /// New streams per second; 0 = all at once.
    pub ramp_per_sec: f64,
    /// Per-stream settings (`chunks` is set by the scenario).
    pub stream: StreamConfig,
    /// Audio for all streams.
    pub audio: Arc<ChunkTable>,
    /// Twilio auth token: sign the upgrade when set.
    pub auth_token: Option<String>,
    /// PEM roots for `wss://`.
    pub ca_file: Option<PathBuf>,
    /// Read the gateway's Kafka output back.
    pub verify: Option<VerifyConfig>,
    /// Wait this long after the last stream for records to arrive.
    pub grace: Duration,
    /// Gateway `/metrics` URL for RSS sampling.
    pub gateway_metrics: Option<String>,
    /// RSS sampling period.
    pub metrics_every: Duration,
    /// Limit for connect + upgrade.
    pub handshake_timeout: Duration,
    /// Print progress to stderr.
    pub progress: bool,
}

/// Options beyond [`RunConfig`] (kept apart so existing callers that build a `RunConfig`
/// literal keep compiling).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run the sampled latency probe beside the verifier (needs `RunConfig::verify`).
    pub latency_probe: Option<ProbeConfig>,
    /// Interval of the consumer-lag samples.
    pub lag_every: Duration,
    /// Capacity of the verifier's receipt → verification queue, records.
    pub verify_queue: usize,
    /// `fetch.wait.max.ms` of the verifier's (and the echo bot's) consumer.
    pub verify_fetch_wait_ms: u32,
    /// Verify the inbound audio topic (see [`VerifyOptions::inbound_audio`]).
    pub verify_inbound: bool,
    /// Read back only after the load (see [`VerifyOptions::after_load`]).
    pub verify_after_load: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        let v = VerifyOptions::default();
        RunOptions {
            latency_probe: v.latency_probe,
            lag_every: v.lag_every,
            verify_queue: v.queue_capacity,
            verify_fetch_wait_ms: v.fetch_wait_ms,
            verify_inbound: v.inbound_audio,
            verify_after_load: v.after_load,
        }
    }
}

/// Ramp settings.
#[derive(Debug, Clone)]
pub struct RampConfig {
    /// Streams added per step.
    pub step: u64,
    /// Seconds per step.
    pub step_secs: u64,
    /// Stop when a step's p99 exceeds this (ms).
    pub p99_ms: f64,
}

/// Bidirectional scenario settings.
#[derive(Debug, Clone)]
pub struct BidiConfig {
    /// The echo bot.
    pub echo: EchoConfig,
    /// Marks that may wait in one simulated stream's playout buffer.
    pub max_pending_marks: usize,
    /// Capacity of the downlink verifier's queue, messages.
    pub downlink_queue: usize,
}

impl Default for BidiConfig {
    fn default() -> Self {
        BidiConfig {
            echo: EchoConfig::default(),
            max_pending_marks: 1024,
            downlink_queue: 65_536,
        }
    }
}

/// Which scenario to run.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// `streams` calls of `chunks` each, started at `ramp_per_sec`.
    Steady,
    /// All handshakes at once; calls as long as `chunks`.
    Burst,
    /// Step the stream count up until loss or the p99 limit.
    Ramp(RampConfig),
    /// Steady, with gateway RSS sampled throughout.
    Soak,
    /// Steady with bidirectional streams: the echo bot plays every caller's audio back
    /// through `<prefix>.playback`; uplink and downlink are verified. Needs
    /// `RunConfig::verify` (the brokers).
    Bidirectional(BidiConfig),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Burst => "burst",
            Scenario::Ramp(_) => "ramp",
            Scenario::Soak => "soak",
            Scenario::Bidirectional(_) => "bidirectional",
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Target or TLS setup failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Kafka verifier setup failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Echo bot setup failed.
    #[error(transparent)]
    Echo(#[from] EchoError),
    /// Invalid combination of settings.
    #[error("config: {0}")]
    Config(String),
}

/// The gateway's histogram of WebSocket receive → broker acknowledgement.
const ACK_HISTOGRAM: &str = "gateway_receive_to_ack_latency_seconds";
/// The gateway's histogram of librdkafka produce → broker acknowledgement (linger included).
const PRODUCE_HISTOGRAM: &str = "gateway_kafka_delivery_latency_seconds";

/// Shared machinery of one run.
struct Harness {
    env: StreamEnv,
    verifier: Option<KafkaVerifier>,
    verify_progress: Option<Arc<VerifyProgress>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    rss: Arc<Mutex<RssReport>>,
    ack_windows: Arc<Mutex<Vec<AckWindow>>>,
    background: Vec<JoinHandle<()>>,
    /// The progress spinner, when stderr is a terminal; cleared at the end.
    bar: Option<indicatif::ProgressBar>,
    t0: Instant,
}

impl Harness {
    async fn new(
        cfg: &RunConfig,
        stream: StreamConfig,
        opts: &RunOptions,
    ) -> Result<Harness, RunError> {
        let connector = Connector::new(
            &cfg.url,
            cfg.auth_token.as_deref(),
            cfg.ca_file.as_deref(),
            cfg.handshake_timeout,
        )
        .await?;
        let verifier = match &cfg.verify {
            Some(v) => {
                let v = v.clone();
                let audio = cfg.audio.clone();
                let vo = VerifyOptions {
                    latency_probe: opts.latency_probe.clone(),
                    lag_every: opts.lag_every,
                    queue_capacity: opts.verify_queue,
                    fetch_wait_ms: opts.verify_fetch_wait_ms,
                    inbound_audio: opts.verify_inbound,
                    after_load: opts.verify_after_load,
                };
                let started =
                    tokio::task::spawn_blocking(move || KafkaVerifier::start_with(&v, audio, &vo))
                        .await
                        .map_err(|e| RunError::Config(format!("verifier setup panicked: {e}")))??;
                Some(started)
            }
            None => None,
        };
        let env = StreamEnv {
            connector: Arc::new(connector),
            audio: cfg.audio.clone(),
            stats: Arc::new(RunStats::default()),
            cfg: Arc::new(stream),
            registrar: verifier.as_ref().map(|v| v.registrar()),
            stop: Arc::new(AtomicBool::new(false)),
            downlink: None,
        };
        let verify_progress = verifier.as_ref().map(|v| v.progress());
        let mut h = Harness {
            env,
            verifier,
            verify_progress,
            samples: Arc::new(Mutex::new(Vec::new())),
            rss: Arc::new(Mutex::new(RssReport::default())),
            ack_windows: Arc::new(Mutex::new(Vec::new())),
            background: Vec::new(),
            bar: None,
            t0: Instant::now(),
        };
        h.start_sampler(cfg.progress);
        if let Some(url) = &cfg.gateway_metrics {
            h.start_rss_sampler(url.clone(), cfg.metrics_every);
        }
        Ok(h)
    }

    /// 1-second timeline samples and the progress line.
    fn start_sampler(&mut self, progress: bool) {
        let stats = self.env.stats.clone();
        let samples = self.samples.clone();
        let vp = self.verify_progress.clone();
        let t0 = self.t0;
        let tty = std::io::stderr().is_terminal();
        let bar = (progress && tty).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b
        });
        self.bar = bar.clone();
        self.background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut last_msgs, mut last_media, mut last_ver) = (0u64, 0u64, 0u64);
            let mut last_t = 0.0f64;
            let mut last_print = 0.0f64;
            loop {
                tick.tick().await;
                // Ticks are late when the runtime is saturated: rates use the real interval.
                let t = t0.elapsed().as_secs_f64();
                let dt = (t - last_t).max(1e-3);
                let rate = |now: u64, before: u64| ((now - before) as f64 / dt).round() as u64;
                let msgs = RunStats::get(&stats.messages_sent);
                let media = RunStats::get(&stats.media_sent);
                let ver = vp
                    .as_ref()
                    .map(|p| p.chunks_received.load(Ordering::Relaxed))
                    .unwrap_or(0);
                let s = Sample {
                    t,
                    open_streams: stats.open_streams.load(Ordering::Relaxed),
                    messages_per_sec: rate(msgs, last_msgs),
                    media_per_sec: rate(media, last_media),
                    verified_per_sec: rate(ver, last_ver),
                    verify_queue: vp
                        .as_ref()
                        .map(|p| p.queue_depth.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    consumer_lag: vp
                        .as_ref()
                        .map(|p| p.consumer_lag.load(Ordering::Relaxed))
                        .unwrap_or(0),
                    handshake_errors: RunStats::get(&stats.handshake_errors),
                    failed: RunStats::get(&stats.streams_failed),
                };
                (last_msgs, last_media, last_ver, last_t) = (msgs, media, ver, t);
                let mut line = format!(
                    "t={:.0}s open={} started={} media/s={} read-back/s={} hs_err={} failed={} done={}",
                    s.t,
                    s.open_streams,
                    RunStats::get(&stats.streams_started),
                    s.media_per_sec,
                    s.verified_per_sec,
                    s.handshake_errors,
                    s.failed,
                    RunStats::get(&stats.streams_completed)
                );
                if vp.is_some() {
                    line.push_str(&format!(
                        " verifier_lag={} verify_queue={}",
                        s.consumer_lag, s.verify_queue
                    ));
                }
                if let Ok(mut v) = samples.lock() {
                    v.push(s);
                }
                match &bar {
                    Some(b) => b.set_message(line),
                    None if progress && t - last_print >= 5.0 => {
                        last_print = t;
                        eprintln!("{line}");
                    }
                    None => {}
                }
            }
        }));
    }

    /// Samples the gateway's RSS and its receive → ack latency histogram every `every`.
    fn start_rss_sampler(&mut self, url: String, every: Duration) {
        let rss = self.rss.clone();
        let ack_windows = self.ack_windows.clone();
        let t0 = self.t0;
        self.background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first scrape is only the baseline: a gateway that ran before this run has
            // history that is not this run's.
            let mut before: Option<(metrics::Buckets, metrics::Buckets)> = None;
            loop {
                tick.tick().await;
                let text = metrics::fetch(&url, Duration::from_secs(5)).await;
                let t = t0.elapsed().as_secs_f64();
                // The same scrape gives the gateway's own receive → broker ack latency over
                // the interval: a probe that reads no record back.
                if let Ok(text) = &text {
                    let ack = metrics::histogram_buckets(text, ACK_HISTOGRAM);
                    let produce = metrics::histogram_buckets(text, PRODUCE_HISTOGRAM);
                    if let (false, Some((ack0, produce0))) = (ack.is_empty(), &before) {
                        let ms = |b: &[(f64, f64)], a: &[(f64, f64)], q| {
                            metrics::quantile_bound(b, a, q).map(|v| v * 1000.0)
                        };
                        // An interval without acknowledgements is pushed too: a stall shows.
                        if let Ok(mut w) = ack_windows.lock() {
                            w.push(AckWindow {
                                end_s: t,
                                records: metrics::count_between(ack0, &ack),
                                p50_le_ms: ms(ack0, &ack, 0.5),
                                p99_le_ms: ms(ack0, &ack, 0.99),
                                produce_p99_le_ms: ms(produce0, &produce, 0.99),
                            });
                        }
                    }
                    if !ack.is_empty() {
                        before = Some((ack, produce));
                    }
                }
                let r = text.and_then(|text| {
                    metrics::metric_value(&text, "process_resident_memory_bytes").ok_or_else(|| {
                        metrics::ScrapeError::Missing("process_resident_memory_bytes".into())
                    })
                });
                if let Ok(mut rep) = rss.lock() {
                    match r {
                        Ok(bytes) => {
                            if rep.samples.is_empty() {
                                rep.start_bytes = bytes;
                            }
                            rep.end_bytes = bytes;
                            rep.max_bytes = rep.max_bytes.max(bytes);
                            rep.samples.push((t, bytes));
                        }
                        Err(_) => rep.scrape_errors += 1,
                    }
                }
            }
        }));
    }

    /// Spawns streams `from..to`, `rate` per second (0 = at once) starting now.
    async fn spawn_streams(&self, from: u64, to: u64, rate: f64) -> Vec<JoinHandle<StreamOutcome>> {
        let start = Instant::now();
        let mut out = Vec::with_capacity((to - from) as usize);
        for i in from..to {
            if rate > 0.0 {
                let due = start + Duration::from_secs_f64((i - from) as f64 / rate);
                tokio::time::sleep_until(due).await;
            }
            out.push(tokio::spawn(run_stream(self.env.clone(), i)));
        }
        out
    }

    /// Final RSS sample, stop background tasks, finish verification, build the report.
    async fn finish(mut self, cfg: &RunConfig, scenario: &Scenario, requested: u64) -> Report {
        if let Some(url) = &cfg.gateway_metrics {
            if let Ok(bytes) = metrics::gateway_rss(url).await {
                if let Ok(mut rep) = self.rss.lock() {
                    if rep.samples.is_empty() {
                        rep.start_bytes = bytes;
                    }
                    rep.end_bytes = bytes;
                    rep.max_bytes = rep.max_bytes.max(bytes);
                    rep.samples.push((self.t0.elapsed().as_secs_f64(), bytes));
                }
            }
        }
        let wall = self.t0.elapsed().as_secs_f64();
        let verification: Option<VerifySummary> = match self.verifier.take() {
            Some(v) => {
                let grace = cfg.grace;
                tokio::task::spawn_blocking(move || v.finish(grace))
                    .await
                    .ok()
            }
            None => None,
        };
        for b in &self.background {
            b.abort();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let st = &self.env.stats;
        let lag = st.send_lag.merged();
        let close_codes = st
            .close_codes
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default();
        let errors = st.errors.lock().map(|m| m.clone()).unwrap_or_default();
        let error_examples = st
            .error_examples
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let messages_sent = RunStats::get(&st.messages_sent);
        Report {
            scenario: scenario.name().into(),
            url: cfg.url.clone(),
            tracks: if self.env.cfg.both_tracks {
                "both"
            } else {
                "inbound"
            }
            .into(),
            speed: self.env.cfg.speed,
            flood: self.env.cfg.flood,
            call_secs: self.env.cfg.chunks.map(|c| c as f64 * 0.02),
            wall_secs: wall,
            streams: StreamCounts {
                requested,
                started: RunStats::get(&st.streams_started),
                handshake_ok: RunStats::get(&st.handshakes_ok),
                handshake_errors: RunStats::get(&st.handshake_errors),
                completed: RunStats::get(&st.streams_completed),
                failed: RunStats::get(&st.streams_failed),
                server_closed_early: RunStats::get(&st.server_closed_early),
            },
            handshake_latency: Percentiles::of(&st.handshake_latency.merged()),
            messages_sent,
            media_sent: RunStats::get(&st.media_sent),
            bytes_sent: RunStats::get(&st.bytes_sent),
            frames_received: RunStats::get(&st.frames_received),
            messages_per_sec: if wall > 0.0 {
                messages_sent as f64 / wall
            } else {
                0.0
            },
            send_lag: Percentiles::of(&lag),
            send_lag_buckets: chart_buckets(&lag),
            close_codes,
            errors,
            error_examples,
            verification,
            gateway_rss: cfg
                .gateway_metrics
                .as_ref()
                .and_then(|_| self.rss.lock().ok().map(|r| r.clone())),
            gateway_ack_latency: cfg
                .gateway_metrics
                .as_ref()
                .and_then(|_| self.ack_windows.lock().ok().map(|w| w.clone())),
            ramp: None,
            bidirectional: None,
            timeseries: self.samples.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }

    /// Failures so far: handshake errors, failed streams, early server closes.
    fn failures(&self) -> u64 {
        let st = &self.env.stats;
        RunStats::get(&st.handshake_errors)
            + RunStats::get(&st.streams_failed)
            + RunStats::get(&st.server_closed_early)
    }

    /// Current end-to-end latency histogram (verifying) or send-lag histogram.
    fn latency_snapshot(&self) -> (Histogram<u64>, &'static str) {
        match &self.verify_progress {
            Some(p) => (
                p.latency
                    .lock()
                    .map(|h| h.clone())
                    .unwrap_or_else(|_| crate::stats::new_histogram()),
                "end-to-end",
            ),
            None => (self.env.stats.send_lag.merged(), "send lag"),
        }
    }
}

/// Runs `scenario` with default [`RunOptions`] and returns its report.
pub async fn run(scenario: Scenario, cfg: RunConfig) -> Result<Report, RunError> {
    run_with(scenario, cfg, RunOptions::default()).await
}

/// Runs `scenario` and returns its report.
pub async fn run_with(
    scenario: Scenario,
    cfg: RunConfig,
    opts: RunOptions,
) -> Result<Report, RunError> {
    if cfg.stream.chunks.is_none() && !matches!(scenario, Scenario::Ramp(_)) {
        return Err(RunError::Config(
            "a call length (--duration) is required".into(),
        ));
    }
    match &scenario {
        Scenario::Steady | Scenario::Soak | Scenario::Burst => {
            let rate = if matches!(scenario, Scenario::Burst) {
                0.0
            } else {
                cfg.ramp_per_sec
            };
            let h = Harness::new(&cfg, cfg.stream.clone(), &opts).await?;
            let handles = h.spawn_streams(0, cfg.streams, rate).await;
            for j in handles {
                let _ = j.await;
            }
            Ok(h.finish(&cfg, &scenario, cfg.streams).await)
        }
        Scenario::Ramp(r) => run_ramp(&scenario, r, cfg, &opts).await,
        Scenario::Bidirectional(b) => run_bidirectional(&scenario, b, cfg, &opts).await,
    }
}

async fn run_ramp(
    scenario: &Scenario,
    r: &RampConfig,
    cfg: RunConfig,
    opts: &RunOptions,
) -> Result<Report, RunError> {
    if r.step == 0 {
        return Err(RunError::Config("--step must be at least 1".into()));
    }
    let mut stream = cfg.stream.clone();
    stream.chunks = None; // open-ended: streams end when the ramp stops
    let h = Harness::new(&cfg, stream, opts).await?;
    let mut handles = Vec::new();
    let mut steps = Vec::new();
    let mut current = 0u64;
    let mut max_ok = 0u64;
    let stop_reason;
    loop {
        let target = (current + r.step).min(cfg.streams);
        if target == current {
            stop_reason = format!("reached --streams {}", cfg.streams);
            break;
        }
        let failures_before = h.failures();
        let (lat_before, kind) = h.latency_snapshot();
        let lag_before = h.env.stats.send_lag.merged();
        // New streams of a step open over one second.
        let rate = (target - current) as f64;
        handles.extend(h.spawn_streams(current, target, rate).await);
        current = target;
        tokio::time::sleep(Duration::from_secs(r.step_secs.max(1))).await;
        let (mut lat, _) = h.latency_snapshot();
        let _ = lat.subtract(&lat_before);
        let mut lag = h.env.stats.send_lag.merged();
        let _ = lag.subtract(&lag_before);
        let step = RampStep {
            streams: current,
            p99_ms: Percentiles::of(&lat).p99_ms,
            latency_kind: kind.into(),
            failures: h.failures() - failures_before,
            send_lag_p99_ms: Percentiles::of(&lag).p99_ms,
        };
        let bad_failures = step.failures > 0;
        let bad_p99 = step.p99_ms > r.p99_ms;
        steps.push(step);
        if bad_failures {
            stop_reason = format!("failures at {current} streams");
            break;
        }
        if bad_p99 {
            stop_reason = format!("p99 above {} ms at {current} streams", r.p99_ms);
            break;
        }
        max_ok = current;
    }
    h.env.stop.store(true, Ordering::Relaxed);
    for j in handles {
        let _ = j.await;
    }
    let mut report = h.finish(&cfg, scenario, current).await;
    report.ramp = Some(RampReport {
        steps,
        max_sustained_streams: max_ok,
        stop_reason,
    });
    Ok(report)
}

async fn run_bidirectional(
    scenario: &Scenario,
    b: &BidiConfig,
    cfg: RunConfig,
    opts: &RunOptions,
) -> Result<Report, RunError> {
    let Some(v) = cfg.verify.clone() else {
        return Err(RunError::Config(
            "bidirectional needs the Kafka brokers (--verify-brokers)".into(),
        ));
    };
    let mut stream = cfg.stream.clone();
    // Twilio sends marks only as echoes; an uplink mark would look like an echo of a mark
    // the gateway never sent.
    stream.mark_at = None;
    let dl = DownlinkVerifier::start(b.downlink_queue)
        .map_err(|e| RunError::Config(format!("downlink verifier: {e}")))?;
    let (brokers, prefix, run_id, echo_cfg, tx) = (
        v.brokers.clone(),
        v.topic_prefix.clone(),
        stream.run_id,
        EchoConfig {
            fetch_wait_ms: opts.verify_fetch_wait_ms,
            ..b.echo.clone()
        },
        dl.sender(),
    );
    let bot = tokio::task::spawn_blocking(move || {
        EchoBot::start(&brokers, &prefix, run_id, echo_cfg, tx)
    })
    .await
    .map_err(|e| RunError::Config(format!("echo bot setup panicked: {e}")))??;
    let mut h = Harness::new(&cfg, stream, opts).await?;
    h.env.downlink = Some(DownlinkHooks {
        tx: dl.sender(),
        max_pending_marks: b.max_pending_marks,
    });
    let stats = h.env.stats.clone();
    let handles = h.spawn_streams(0, cfg.streams, cfg.ramp_per_sec).await;
    for j in handles {
        let _ = j.await;
    }
    // The bot keeps reading events (mark reports, terminal events) while the uplink
    // verifier waits for its last records.
    let grace = cfg.grace;
    let bot_done = tokio::task::spawn_blocking(move || bot.finish(grace));
    let mut report = h.finish(&cfg, scenario, cfg.streams).await;
    let echo = bot_done.await.unwrap_or_default();
    let downlink = tokio::task::spawn_blocking(move || dl.finish())
        .await
        .unwrap_or_default();
    let e = &b.echo;
    report.bidirectional = Some(BidiReport {
        echo_delay_ms: e.delay.as_secs_f64() * 1000.0,
        echo_encoding: match e.encoding {
            EchoEncoding::Pcm => "pcm",
            EchoEncoding::Mulaw => "mulaw",
            EchoEncoding::Alternate => "alternate",
        }
        .into(),
        mark_every: e.mark_every,
        clear_every_secs: e.clear_every.as_secs_f64(),
        burst: e.burst,
        stop_every: e.stop_every,
        streams_stopped_by_server: RunStats::get(&stats.streams_stopped_by_server),
        downlink_invalid_frames: RunStats::get(&stats.downlink_invalid),
        playout: stats.playout.lock().map(|p| p.clone()).unwrap_or_default(),
        echo,
        downlink,
    });
    Ok(report)
}
