//! `loadtest`: command-line entry point. Parses flags, builds the run configuration, runs
//! the scenario on a multi-threaded tokio runtime and writes the reports. Exit codes: 0 =
//! run clean, 1 = the run saw failures or loss, 64 = bad configuration or setup failure.

use clap::{Args, Parser, Subcommand, ValueEnum};
use loadtest::audio::{self, ChunkTable};
use loadtest::echo::{EchoConfig, EchoEncoding};
use loadtest::probe::ProbeConfig;
use loadtest::report::Report;
use loadtest::scenario::{self, BidiConfig, RampConfig, RunConfig, RunOptions, Scenario};
use loadtest::stream::StreamConfig;
use loadtest::verify::VerifyConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Twilio Media Streams load generator and end-to-end verifier.
#[derive(Parser, Debug)]
#[command(name = "loadtest", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    scenario: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N calls of --duration seconds, opened at --ramp-per-sec.
    Steady {
        #[command(flatten)]
        common: Common,
    },
    /// All --streams handshakes at once; reports handshake successes, failures, latency.
    Burst {
        #[command(flatten)]
        common: Common,
        /// Call length after the handshake, seconds of audio (overrides --duration).
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
    /// Add --step streams every --step-secs until failures or p99 > --p99-ms (or
    /// --streams is reached); reports the largest sustained count.
    Ramp {
        #[command(flatten)]
        common: Common,
        /// Streams added per step.
        #[arg(long, default_value_t = 100)]
        step: u64,
        /// Seconds per step.
        #[arg(long, default_value_t = 10)]
        step_secs: u64,
        /// p99 limit in ms (end-to-end latency when verifying, else send lag).
        #[arg(long, default_value_t = 200.0)]
        p99_ms: f64,
    },
    /// A long steady run sampling the gateway's RSS from --gateway-metrics.
    Soak {
        #[command(flatten)]
        common: Common,
    },
    /// Bidirectional streams: an echo bot plays each caller's audio back through
    /// <prefix>.playback (with marks, clears, stops); the simulated Twilio plays it out in
    /// real time and echoes marks; uplink and downlink are verified. Needs --verify-brokers.
    Bidirectional {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        echo: EchoArgs,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EchoEnc {
    /// PCM s16le 8 kHz (the gateway encodes to μ-law).
    Pcm,
    /// μ-law (passed through).
    Mulaw,
    /// PCM and μ-law, alternating per record.
    Alternate,
}

#[derive(Args, Debug)]
struct EchoArgs {
    /// Seconds between the caller's audio and its echo.
    #[arg(long, default_value_t = 1.0)]
    echo_delay: f64,
    /// Encoding of the playback records.
    #[arg(long, value_enum, default_value_t = EchoEnc::Pcm)]
    echo_encoding: EchoEnc,
    /// Inbound records gathered and written back to back (faster than real time, like a
    /// text-to-speech reply), so the playout buffer holds audio for marks and clears.
    #[arg(long, default_value_t = 5)]
    echo_burst: u64,
    /// Write each burst as one playback record (as a TTS engine hands over its audio in
    /// chunks) instead of one record per inbound chunk.
    #[arg(long)]
    echo_merge_burst: bool,
    /// A mark after every N playback media records (0 = none).
    #[arg(long, default_value_t = 10)]
    mark_every: u64,
    /// A clear on each stream every S seconds (0 = never).
    #[arg(long, default_value_t = 10.0)]
    clear_every: f64,
    /// Every N-th stream is ended by a `stop` record (0 = none).
    #[arg(long, default_value_t = 0)]
    stop_every: u64,
    /// Seconds after its start event a stopped stream gets its stop (default: half the
    /// call's wall time).
    #[arg(long)]
    stop_after: Option<f64>,
    /// linger.ms of the echo bot's producer.
    #[arg(long, default_value_t = 1)]
    echo_linger_ms: u32,
    /// Marks that may wait in one simulated stream's playout buffer.
    #[arg(long, default_value_t = 1024)]
    max_pending_marks: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Tracks {
    /// `inbound` only.
    Inbound,
    /// `inbound` and `outbound`.
    Both,
}

#[derive(Args, Debug)]
struct Common {
    /// Gateway WebSocket URL (ws:// or wss://); also what the signature covers.
    #[arg(
        long,
        env = "LOADTEST_URL",
        default_value = "ws://127.0.0.1:8080/stream"
    )]
    url: String,
    /// Number of streams (ramp: upper bound).
    #[arg(long, default_value_t = 10)]
    streams: u64,
    /// New streams per second (0 = all at once).
    #[arg(long, default_value_t = 100.0)]
    ramp_per_sec: f64,
    /// Call length in seconds of audio (wall time is this / --speed).
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Tracks per stream.
    #[arg(long, value_enum, default_value_t = Tracks::Inbound)]
    tracks: Tracks,
    /// Time compression: 10 sends 10 s of audio per second.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Send as fast as possible (no pacing).
    #[arg(long)]
    flood: bool,
    /// Audio file: raw μ-law 8 kHz (.ulaw) or WAV (converted).
    #[arg(long, conflicts_with = "tone")]
    audio: Option<PathBuf>,
    /// Generate a sine tone of this frequency instead of a file (default 440 Hz).
    #[arg(long)]
    tone: Option<f64>,
    /// Send one dtmf (digit 5) at 1/3 and one mark at 2/3 of each call.
    #[arg(long)]
    dtmf: bool,
    /// Chunk after which to send the dtmf (implies --dtmf).
    #[arg(long)]
    dtmf_at_chunk: Option<u64>,
    /// Chunk after which to send the mark (implies --dtmf).
    #[arg(long)]
    mark_at_chunk: Option<u64>,
    /// Twilio auth token: sends x-twilio-signature.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// PEM file of CA certificates for wss:// (default: webpki roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Kafka bootstrap servers: read the gateway's output back and verify it.
    #[arg(long)]
    verify_brokers: Option<String>,
    /// Kafka topic prefix.
    #[arg(long, default_value = "twilio")]
    topic_prefix: String,
    /// Also run the sampled latency probe: a separate light consumer on one partition of
    /// <prefix>.audio.inbound that only timestamps (needs --verify-brokers).
    #[arg(long)]
    latency_probe: bool,
    /// Partition the latency probe reads, or `auto`: the first one a record arrives on (a
    /// gateway with --partitions-per-instance writes to a few partitions only).
    #[arg(long, default_value = "auto")]
    latency_probe_partition: String,
    /// Seconds per window of the probe's per-window percentiles (report: probe.windows);
    /// 0 = overall percentiles only, else at least 0.1.
    #[arg(long, default_value_t = 10.0)]
    latency_window: f64,
    /// Seconds between consumer-lag samples (high watermark − position).
    #[arg(long, default_value_t = 1.0)]
    lag_every: f64,
    /// Records the verifier may hold between receipt and verification.
    #[arg(long, default_value_t = 65_536)]
    verify_queue: usize,
    /// fetch.wait.max.ms of the verifier's and the echo bot's consumers. Neither is the
    /// latency measurement (the probe and the simulator's receipt stamps are); against the
    /// local Tansu broker, whose every fetch with data lists all stored batches of the
    /// partition, a longer wait takes load off the broker the measurement shares.
    #[arg(long, default_value_t = 10)]
    verify_fetch_wait_ms: u32,
    /// Do not read back <prefix>.audio.inbound (inbound chunks are then neither expected nor
    /// missing; the report says so). For runs that measure something else, such as the
    /// bidirectional playback latency, on a broker that cannot afford a second full uplink
    /// reader beside the echo bot.
    #[arg(long)]
    no_verify_inbound: bool,
    /// Read back and verify only after the load has ended (the consumer is assigned at the
    /// watermarks of the start but fetches nothing while streams run): every count is still
    /// exact, and the verifier measures no latency. For CPU measurements of the server that
    /// must not share the machine with the verifier's reading (steady, soak and burst only).
    /// With --latency-probe the probe still reads its one partition live, so latency is
    /// measured by the light consumer alone while everything is checked after the load.
    #[arg(long)]
    verify_after_load: bool,
    /// Seconds to wait for late records after the last stream.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Write the JSON report here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write the SVG chart here.
    #[arg(long)]
    svg_out: Option<PathBuf>,
    /// Gateway Prometheus endpoint to sample RSS from (soak defaults to
    /// http://127.0.0.1:9090/metrics).
    #[arg(long)]
    gateway_metrics: Option<String>,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 10.0)]
    metrics_every: f64,
    /// Seconds allowed for connect + upgrade.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Seconds to wait for the server's close after ours.
    #[arg(long, default_value_t = 5.0)]
    close_timeout: f64,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

fn secs(v: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("--{name} must be a non-negative number"))
}

/// Validates everything before any socket is opened; reports every problem at once.
fn build(cmd: &Cmd) -> Result<(Scenario, RunConfig, RunOptions, &Common), Vec<String>> {
    let mut errs = Vec::new();
    let (scenario, c, call_secs) = match cmd {
        Cmd::Bidirectional { common, echo } => {
            let mut s = |v: f64, n: &str| match secs(v, n) {
                Ok(d) => d,
                Err(e) => {
                    errs.push(e);
                    Duration::ZERO
                }
            };
            let half_call = common.duration / common.speed.max(1e-9) / 2.0;
            let cfg = EchoConfig {
                delay: s(echo.echo_delay, "echo-delay"),
                encoding: match echo.echo_encoding {
                    EchoEnc::Pcm => EchoEncoding::Pcm,
                    EchoEnc::Mulaw => EchoEncoding::Mulaw,
                    EchoEnc::Alternate => EchoEncoding::Alternate,
                },
                mark_every: echo.mark_every,
                clear_every: s(echo.clear_every, "clear-every"),
                burst: echo.echo_burst,
                merge_burst: echo.echo_merge_burst,
                stop_every: echo.stop_every,
                stop_after: s(echo.stop_after.unwrap_or(half_call), "stop-after"),
                linger_ms: echo.echo_linger_ms,
                // Replaced by --verify-fetch-wait-ms when the scenario starts the bot.
                fetch_wait_ms: EchoConfig::default().fetch_wait_ms,
            };
            if echo.echo_burst == 0 {
                errs.push("--echo-burst must be at least 1".into());
            }
            if common.verify_brokers.is_none() {
                errs.push(
                    "bidirectional needs --verify-brokers (the echo bot reads and writes Kafka)"
                        .into(),
                );
            }
            if matches!(common.tracks, Tracks::Both) {
                errs.push(
                    "bidirectional streams carry only the inbound track (--tracks inbound)".into(),
                );
            }
            (
                Scenario::Bidirectional(BidiConfig {
                    echo: cfg,
                    max_pending_marks: echo.max_pending_marks.max(1),
                    ..Default::default()
                }),
                common,
                common.duration,
            )
        }
        Cmd::Steady { common } => (Scenario::Steady, common, common.duration),
        Cmd::Soak { common } => (Scenario::Soak, common, common.duration),
        Cmd::Burst { common, hold } => (Scenario::Burst, common, *hold),
        Cmd::Ramp {
            common,
            step,
            step_secs,
            p99_ms,
        } => (
            Scenario::Ramp(RampConfig {
                step: *step,
                step_secs: *step_secs,
                p99_ms: *p99_ms,
            }),
            common,
            common.duration,
        ),
    };
    if c.streams == 0 {
        errs.push("--streams must be at least 1".to_string());
    }
    if !(c.speed.is_finite() && c.speed > 0.0) {
        errs.push("--speed must be > 0".into());
    }
    if !(c.ramp_per_sec.is_finite() && c.ramp_per_sec >= 0.0) {
        errs.push("--ramp-per-sec must be >= 0".into());
    }
    if !(call_secs.is_finite() && call_secs >= 0.02) {
        errs.push("call length (--duration / --hold) must be at least 0.02 s".into());
    }
    if let Scenario::Ramp(r) = &scenario {
        if r.step == 0 {
            errs.push("--step must be at least 1".into());
        }
    }
    if c.latency_probe && c.verify_brokers.is_none() {
        errs.push("--latency-probe needs --verify-brokers".into());
    }
    if c.verify_after_load {
        if c.verify_brokers.is_none() {
            errs.push("--verify-after-load needs --verify-brokers".into());
        }
        if matches!(scenario, Scenario::Ramp(_) | Scenario::Bidirectional(_)) {
            errs.push(
                "--verify-after-load is for steady, soak and burst (ramp steps and the echo \
                 bot need records as they arrive)"
                    .into(),
            );
        }
    }
    let probe_partition = match c.latency_probe_partition.as_str() {
        "auto" => None,
        n => match n.parse::<i32>() {
            Ok(p) if p >= 0 => Some(p),
            _ => {
                errs.push("--latency-probe-partition must be `auto` or a number >= 0".into());
                None
            }
        },
    };
    let mut durs = [Duration::ZERO; 6];
    for (i, (v, n)) in [
        (c.grace, "grace"),
        (c.metrics_every, "metrics-every"),
        (c.handshake_timeout, "handshake-timeout"),
        (c.close_timeout, "close-timeout"),
        (c.lag_every, "lag-every"),
        (c.latency_window, "latency-window"),
    ]
    .into_iter()
    .enumerate()
    {
        match secs(v, n) {
            Ok(d) => durs[i] = d,
            Err(e) => errs.push(e),
        }
    }
    let ulaw = match (&c.audio, c.tone) {
        (Some(p), _) => audio::load_file(p).map_err(|e| e.to_string()),
        (None, hz) => Ok(audio::tone(hz.unwrap_or(440.0), 10.0)),
    };
    let table = ulaw.and_then(|u| ChunkTable::new(&u).map_err(|e| e.to_string()));
    let table = match table {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            errs.push(e);
            None
        }
    };
    if let Err(e) = loadtest::client::Target::parse(&c.url) {
        errs.push(e.to_string());
    }
    if let Some(m) = &c.gateway_metrics {
        if !m.starts_with("http://") {
            errs.push("--gateway-metrics must be an http:// URL".into());
        }
    }
    let Some(table) = table else {
        return Err(errs);
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let chunks = (call_secs * 50.0).round() as u64;
    let dtmf_on = c.dtmf || c.dtmf_at_chunk.is_some() || c.mark_at_chunk.is_some();
    let stream = StreamConfig {
        both_tracks: matches!(c.tracks, Tracks::Both),
        chunks: Some(chunks),
        speed: c.speed,
        flood: c.flood,
        dtmf_at: dtmf_on.then(|| c.dtmf_at_chunk.unwrap_or((chunks / 3).max(1))),
        mark_at: dtmf_on.then(|| c.mark_at_chunk.unwrap_or((2 * chunks / 3).max(1))),
        close_timeout: durs[3],
        run_id: run_id(),
    };
    let gateway_metrics = c.gateway_metrics.clone().or_else(|| {
        matches!(scenario, Scenario::Soak).then(|| "http://127.0.0.1:9090/metrics".to_string())
    });
    let cfg = RunConfig {
        url: c.url.clone(),
        streams: c.streams,
        ramp_per_sec: c.ramp_per_sec,
        stream,
        audio: table,
        auth_token: c.auth_token.clone(),
        ca_file: c.ca_file.clone(),
        verify: c.verify_brokers.as_ref().map(|b| VerifyConfig {
            brokers: b.clone(),
            topic_prefix: c.topic_prefix.clone(),
        }),
        grace: durs[0],
        gateway_metrics,
        metrics_every: durs[1],
        handshake_timeout: durs[2],
        progress: !c.quiet,
    };
    if !durs[5].is_zero() && durs[5] < Duration::from_millis(100) {
        errs.push("--latency-window: 0 (off) or at least 0.1 s".into());
    }
    let opts = RunOptions {
        latency_probe: c.latency_probe.then_some(ProbeConfig {
            partition: probe_partition,
            window: (!durs[5].is_zero()).then_some(durs[5]),
        }),
        lag_every: durs[4],
        verify_queue: c.verify_queue.max(1),
        verify_fetch_wait_ms: c.verify_fetch_wait_ms,
        verify_inbound: !c.no_verify_inbound,
        verify_after_load: c.verify_after_load,
    };
    Ok((scenario, cfg, opts, c))
}

/// A per-run id for the SIDs: wall clock nanoseconds mixed with the pid.
fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 40)
}

/// Raises the open-file limit to the hard limit: every stream is a socket.
fn raise_nofile_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return None;
            }
        }
        // rlim_t is u64 here but not on every platform.
        #[allow(clippy::unnecessary_cast)]
        Some(lim.rlim_cur as u64)
    }
}

/// True when the run saw failures or loss.
fn had_problems(r: &Report) -> bool {
    let s = &r.streams;
    let v = r.verification.as_ref().is_some_and(|v| {
        v.total.missing + v.total.duplicated + v.total.pcm_mismatches + v.total.unexpected > 0
            || !v.missing_topics.is_empty()
    });
    let ramp = r.ramp.is_some();
    let bidi = r.bidirectional.as_ref().is_some_and(|b| {
        b.downlink.faults > 0
            || b.echo.produce_errors + b.echo.delivery_errors + b.echo.starts_unrouted > 0
            || b.downlink.produced.media_records == 0
    });
    // A ramp is expected to end in failures; its result is the sustained count.
    (!ramp && (s.handshake_errors + s.failed > 0)) || v || bidi
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (scenario, cfg, opts, common) = match build(&cli.scenario) {
        Ok(x) => x,
        Err(errs) => {
            for e in errs {
                eprintln!("loadtest: {e}");
            }
            return ExitCode::from(64);
        }
    };
    let limit = raise_nofile_limit();
    if let Some(l) = limit {
        if l < cfg.streams + 64 {
            eprintln!(
                "loadtest: warning: open-file limit {l} is below --streams {}",
                cfg.streams
            );
        }
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = common.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: runtime: {e}");
            return ExitCode::from(64);
        }
    };
    let report = match rt.block_on(scenario::run_with(scenario, cfg, opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(64);
        }
    };
    print!("{}", report.table());
    let mut code = if had_problems(&report) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    if let Some(p) = &common.json_out {
        if let Err(e) = report.write_json(p) {
            eprintln!("loadtest: {e}");
            code = ExitCode::from(1);
        }
    }
    if let Some(p) = &common.svg_out {
        if let Err(e) = report.write_svg(p) {
            eprintln!("loadtest: {e}");
            code = ExitCode::from(1);
        }
    }
    // Stream tasks are done; don't wait for lingering hyper connection tasks.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}
