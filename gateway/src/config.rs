//! Configuration: command-line flags, `GATEWAY_*` environment variables, an optional TOML file.
//!
//! Precedence: flag > environment > file > default. Everything is parsed and validated before
//! any socket is bound; every problem is reported at once and the process exits with code 64
//! (`EX_USAGE`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::connection::ConnectionConfig;
use crate::playback::partitions::{ordinal_from_hostname, parse_list, Assignment};
use crate::playback::PlaybackConfig;
use crate::server::access::{AccessConfig, Cidr};
use crate::server::ServerConfig;
use crate::session::SessionConfig;
use crate::sink::kafka_config::{parse_option, parse_properties, KafkaOption, KafkaOptions};
use crate::sink::partitioning::{seed as partitioning_seed, Partitioning, MAX_PER_INSTANCE};
use crate::sink::spool::{DiskConfig, FsyncPolicy, SpoolConfig};
use crate::sink::{AudioEncoding, SinkConfig, MAX_WINDOW_BYTES};
use crate::watchdog::WatchdogConfig;

/// Exit code for bad configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Flags of the gateway. All optional here so the file and defaults can fill them in.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// TOML configuration file (keys are the flag names with `_` for `-`).
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stream listener address [default: 0.0.0.0:8080].
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// Admin listener (/metrics, /healthz, /readyz) [default: 0.0.0.0:9090].
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "GATEWAY_BROKERS")]
    pub brokers: Option<String>,
    /// Topic prefix [default: twilio].
    #[arg(long, env = "GATEWAY_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// WebSocket path [default: /stream].
    #[arg(long, env = "GATEWAY_WS_PATH")]
    pub ws_path: Option<String>,
    /// Maximum concurrent streams; more get HTTP 503 before the upgrade [default: 10000].
    #[arg(long, env = "GATEWAY_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Time live streams get to finish after SIGTERM, e.g. `30s` [default: 30s].
    #[arg(long, env = "GATEWAY_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "GATEWAY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter (tracing `EnvFilter` syntax) [default: info; `RUST_LOG` also works].
    #[arg(long, env = "GATEWAY_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// librdkafka setting `key=value`, repeatable; applied over the gateway's defaults. Values
    /// may contain `,` and `=`. Environment: `GATEWAY_KAFKA_OPTIONS`, one `key=value` per line.
    /// Secret values (passwords, client secrets, private keys) are never printed.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub kafka_option: Vec<String>,
    /// File of librdkafka settings, one `key=value` per line (`#` comments), e.g. a mounted
    /// Secret with SASL credentials; applied before `--kafka-option`.
    #[arg(long, env = "GATEWAY_KAFKA_OPTIONS_FILE", value_name = "FILE")]
    pub kafka_options_file: Option<PathBuf>,
    /// Part of the in-flight budget librdkafka may hold, bytes; the rest waits in the gateway's
    /// spool [default: 33554432, at most half of --max-inflight-bytes].
    #[arg(long, env = "GATEWAY_KAFKA_WINDOW_BYTES")]
    pub kafka_window_bytes: Option<u64>,
    /// Longest sleep of the Kafka drain thread between batches, e.g. `1ms` [default: 1ms].
    #[arg(long, env = "GATEWAY_KAFKA_DRAIN_INTERVAL")]
    pub kafka_drain_interval: Option<String>,
    /// Time the final flush gets after the drain, e.g. `30s` [default: 30s].
    #[arg(long, env = "GATEWAY_FLUSH_TIMEOUT")]
    pub flush_timeout: Option<String>,
    /// Only accept connections from this network (CIDR or address), repeatable; checked at
    /// accept, before TLS. Behind a trusted proxy, the client it names is checked
    /// [default: everyone].
    #[arg(
        long = "allow-cidr",
        env = "GATEWAY_ALLOW_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub allow_cidr: Vec<String>,
    /// Load balancer network (CIDR or address), repeatable: its connections may start with a
    /// PROXY protocol v1/v2 header, or carry X-Forwarded-For, naming the real client.
    #[arg(
        long = "trusted-proxy",
        env = "GATEWAY_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub trusted_proxy: Vec<String>,
    /// Concurrent handshakes per client address; more are closed at accept; 0 = no cap
    /// [default: 256, a quarter of --max-concurrent-handshakes' default].
    #[arg(long, env = "GATEWAY_MAX_HANDSHAKES_PER_SOURCE")]
    pub max_handshakes_per_source: Option<u32>,
    /// Tokio worker threads of the shared runtime (accept loop, admin port, playback; the
    /// connections too with `--ingest-threads 0`) [default: one per available core].
    #[arg(long, env = "GATEWAY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Read coalescing: a thread serving connections (each ingest thread, or each worker with
    /// `--ingest-threads 0`) about to wait for I/O first sleeps this long, so one wake-up
    /// serves every socket that became readable meanwhile; adds up to this much latency per
    /// message, e.g. `1ms` (at most 10ms) [default: 0 = off].
    #[arg(long, env = "GATEWAY_IO_PACE")]
    pub io_pace: Option<String>,
    /// Thread-per-core ingest: connections run on this many threads, each with its own
    /// single-threaded runtime, from handshake to close; `cores` = one per core the process
    /// may use, `0` = on the shared worker pool (`--worker-threads`) [default: cores].
    #[arg(long, env = "GATEWAY_INGEST_THREADS", value_name = "N|cores")]
    pub ingest_threads: Option<String>,
    /// Consume `<prefix>.playback` and play it into streams (`--playback=false` turns
    /// bidirectional streams off) [default: true].
    #[arg(long, env = "GATEWAY_PLAYBACK", num_args = 0..=1, default_missing_value = "true")]
    pub playback: Option<bool>,
    /// Playback partitions this instance reads, e.g. `0-3,8`, or `all` [default: all, or by
    /// --instance-index/--instance-count].
    #[arg(long, env = "GATEWAY_PLAYBACK_PARTITIONS", value_name = "LIST")]
    pub playback_partitions: Option<String>,
    /// This instance's index among --instance-count, or `auto` (the host name's trailing
    /// number, as in a StatefulSet): it reads playback partitions p with p % count == index.
    #[arg(long, env = "GATEWAY_INSTANCE_INDEX", value_name = "N|auto")]
    pub instance_index: Option<String>,
    /// Number of gateway instances sharing the playback topic (with --instance-index).
    #[arg(long, env = "GATEWAY_INSTANCE_COUNT")]
    pub instance_count: Option<u32>,
    /// Playback audio a stream may have queued before records are dropped, e.g. `60s`
    /// [default: 60s].
    #[arg(long, env = "GATEWAY_PLAYBACK_BUFFER")]
    pub playback_buffer: Option<String>,
    /// Playback audio queued for all streams together, bytes of μ-law [default: 268435456].
    #[arg(long, env = "GATEWAY_PLAYBACK_MAX_BYTES")]
    pub playback_max_bytes: Option<u64>,
    /// Longest a playback fetch waits at the broker for new records (`fetch.wait.max.ms` of
    /// the playback consumer), e.g. `100ms`. Apache Kafka answers a fetch as soon as a record
    /// arrives, so the wait costs no latency there and a short one only burns fetches; the
    /// local Tansu broker sleeps it out on every fetch, so `scripts/run.sh` sets 5ms
    /// [default: 100ms].
    #[arg(long, env = "GATEWAY_PLAYBACK_FETCH_WAIT")]
    pub playback_fetch_wait: Option<String>,
    /// Output profile `name[:rate=16000,format=s16le|f32le,layout=mono|stereo]`, repeatable;
    /// each publishes to its own topics `<prefix>.audio.<name>.inbound|outbound` (mono) or
    /// `<prefix>.audio.<name>.stereo`. Environment: `GATEWAY_PROFILES`, one per line
    /// [default: none; the default 8 kHz topics are always published].
    #[arg(long = "profile", value_name = "SPEC")]
    pub profile: Vec<String>,
    /// Consecutive chunks of one track per Kafka record [default: 1].
    #[arg(long, env = "GATEWAY_FRAMES_PER_RECORD")]
    pub frames_per_record: Option<u32>,
    /// Audio record value: pcm (s16le) or mulaw [default: pcm].
    #[arg(long, env = "GATEWAY_AUDIO_ENCODING")]
    pub audio_encoding: Option<String>,
    /// Create missing topics at start-up (`--create-topics=false` to require them) [default: true].
    #[arg(long, env = "GATEWAY_CREATE_TOPICS", num_args = 0..=1, default_missing_value = "true")]
    pub create_topics: Option<bool>,
    /// Partitions of created topics [default: 6].
    #[arg(long, env = "GATEWAY_TOPIC_PARTITIONS")]
    pub topic_partitions: Option<i32>,
    /// Replication factor of created topics [default: 1].
    #[arg(long, env = "GATEWAY_TOPIC_REPLICATION")]
    pub topic_replication: Option<i32>,
    /// Partitions of each topic this instance writes to: N consecutive ones from a base set by
    /// --instance-index (else a hash of the host name), each stream in one of them; or `all`
    /// (librdkafka's partitioner on streamSid) [default: 1].
    #[arg(long, env = "GATEWAY_PARTITIONS_PER_INSTANCE", value_name = "N|all")]
    pub partitions_per_instance: Option<String>,
    /// Instance id in records and events [default: hostname-pid].
    #[arg(long, env = "GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Cap on one WebSocket message in bytes, fragments included [default: 65536].
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Budget for audio queued towards Kafka, bytes [default: 268435456].
    #[arg(long, env = "GATEWAY_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<u64>,
    /// When the in-flight budget is full: drop-newest, drop-oldest or disconnect [default: drop-newest].
    #[arg(long, env = "GATEWAY_OVERFLOW")]
    pub overflow: Option<String>,
    /// Fraction of the in-flight budget (and of --spool-max-bytes) above which /readyz fails
    /// [default: 0.8].
    #[arg(long, env = "GATEWAY_READINESS_WATERMARK")]
    pub readiness_watermark: Option<f64>,
    /// Directory for the spool's disk tier: records waiting for Kafka beyond the memory tier
    /// go to checksummed segment files here, and survive a restart [default: none, memory
    /// tier only].
    #[arg(long, env = "GATEWAY_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Cap on the spool's segment files, bytes [default: 4294967296].
    #[arg(long, env = "GATEWAY_SPOOL_MAX_BYTES")]
    pub spool_max_bytes: Option<u64>,
    /// When spool writes are synced to stable storage: `always`, `never`, or an interval such
    /// as `1s` (from a helper thread) [default: 1s].
    #[arg(long, env = "GATEWAY_SPOOL_FSYNC")]
    pub spool_fsync: Option<String>,
    /// With --spool-dir: the memory tier spills to disk above this many bytes
    /// [default: 33554432].
    #[arg(long, env = "GATEWAY_SPOOL_MEMORY_BYTES")]
    pub spool_memory_bytes: Option<u64>,
    /// With --spool-dir: records waiting longer than this spill to disk even below the memory
    /// threshold (bounds what a crash can take) [default: 1s].
    #[arg(long, env = "GATEWAY_SPOOL_SPILL_AFTER")]
    pub spool_spill_after: Option<String>,
    /// End a stream after this long without any frame [default: 5s].
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Send a WebSocket ping after this long without any frame; `0` disables [default: 2s].
    #[arg(long, env = "GATEWAY_PING_INTERVAL")]
    pub ping_interval: Option<String>,
    /// Time from accept to a complete upgrade request [default: 5s].
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,
    /// Cap on the HTTP request head, bytes (minimum 8192) [default: 16384].
    #[arg(long, env = "GATEWAY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// TLS, Twilio signatures, handshake caps, TwiML (see [`crate::security::config`]).
    #[command(flatten)]
    pub security: crate::security::config::SecurityArgs,
}

/// The same keys in a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    brokers: Option<String>,
    topic_prefix: Option<String>,
    ws_path: Option<String>,
    max_streams: Option<usize>,
    drain_timeout: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    kafka_options: Option<BTreeMap<String, String>>,
    kafka_options_file: Option<PathBuf>,
    kafka_window_bytes: Option<u64>,
    kafka_drain_interval: Option<String>,
    flush_timeout: Option<String>,
    allow_cidr: Option<Vec<String>>,
    trusted_proxy: Option<Vec<String>>,
    max_handshakes_per_source: Option<u32>,
    worker_threads: Option<usize>,
    io_pace: Option<String>,
    ingest_threads: Option<NumberOrWord>,
    playback: Option<bool>,
    playback_partitions: Option<String>,
    instance_index: Option<NumberOrWord>,
    instance_count: Option<u32>,
    playback_buffer: Option<String>,
    playback_max_bytes: Option<u64>,
    playback_fetch_wait: Option<String>,
    frames_per_record: Option<u32>,
    profile: Option<Vec<String>>,
    audio_encoding: Option<String>,
    create_topics: Option<bool>,
    topic_partitions: Option<i32>,
    topic_replication: Option<i32>,
    partitions_per_instance: Option<NumberOrWord>,
    gateway_id: Option<String>,
    max_message_bytes: Option<usize>,
    max_inflight_bytes: Option<u64>,
    overflow: Option<String>,
    readiness_watermark: Option<f64>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    spool_fsync: Option<String>,
    spool_memory_bytes: Option<u64>,
    spool_spill_after: Option<String>,
    idle_timeout: Option<String>,
    ping_interval: Option<String>,
    handshake_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    public_url: Option<String>,
    twilio_auth_token: Option<crate::security::config::Secret>,
    twilio_auth_token_secondary: Option<crate::security::config::Secret>,
    twilio_auth_token_file: Option<PathBuf>,
    insecure_skip_signature: Option<bool>,
    max_concurrent_handshakes: Option<usize>,
    max_handshakes_per_second: Option<u32>,
    twiml_mode: Option<String>,
    twiml_track: Option<String>,
    twiml_then: Option<String>,
    twiml_parameters: Option<Vec<String>>,
}

/// A file value that is a number or a word: `partitions_per_instance` (`4` or `"all"`) and
/// `instance_index` (`2` or `"auto"`; a quoted number is accepted too).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NumberOrWord {
    Number(u32),
    Word(String),
}

impl NumberOrWord {
    fn into_string(self) -> String {
        match self {
            NumberOrWord::Number(n) => n.to_string(),
            NumberOrWord::Word(w) => w,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration: a section per subsystem, plus what the process itself needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stream listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Shutdown timing.
    pub drain: DrainConfig,
    /// The Kafka path.
    pub sink: SinkConfig,
    /// The stream listener.
    pub server: ServerConfig,
    /// TLS, signatures, handshake caps, TwiML.
    pub security: crate::security::config::SecurityConfig,
    /// Bidirectional streams.
    pub playback: PlaybackConfig,
    /// The connections' runtime.
    pub runtime: RuntimeConfig,
}

/// How the tokio runtime that serves connections is built (decision 38).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Worker threads; `None` = tokio's default, one per core the process may use.
    pub worker_threads: Option<usize>,
    /// Sleep before a worker waits for I/O (read coalescing); zero = off. It applies to the
    /// runtimes that serve connections: the ingest threads when there are any, else the workers.
    pub io_pace: Duration,
    /// Where connections run (decision 39).
    pub ingest: IngestThreads,
}

/// Where connection tasks run (`--ingest-threads`, decision 39).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestThreads {
    /// On the shared multi-thread runtime (tokio's work-stealing worker pool).
    Shared,
    /// One single-threaded runtime per core the process may use.
    PerCore,
    /// This many single-threaded runtimes (1..=1024).
    Count(usize),
}

impl IngestThreads {
    /// Parses `0`, `cores` or a thread count.
    fn parse(raw: &str) -> Result<IngestThreads, String> {
        match raw.trim() {
            "cores" => Ok(IngestThreads::PerCore),
            "0" => Ok(IngestThreads::Shared),
            n => match n.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(IngestThreads::Count(n)),
                _ => Err(format!(
                    "--ingest-threads: {raw:?} is not 0, `cores` or a count between 1 and 1024"
                )),
            },
        }
    }

    /// How many ingest threads to start on this machine (0 = shared runtime).
    pub fn resolve(self) -> usize {
        match self {
            IngestThreads::Shared => 0,
            IngestThreads::PerCore => std::thread::available_parallelism().map_or(1, |n| n.get()),
            IngestThreads::Count(n) => n,
        }
    }

    /// The value as written on the command line.
    fn as_arg(self) -> String {
        match self {
            IngestThreads::Shared => "0".into(),
            IngestThreads::PerCore => "cores".into(),
            IngestThreads::Count(n) => n.to_string(),
        }
    }
}

/// Shutdown timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainConfig {
    /// Time live streams get to end by themselves after SIGTERM.
    pub drain_timeout: Duration,
    /// Time connections get to close and publish their tail after being told to.
    pub close_grace: Duration,
    /// Time the final flush of the Kafka path gets.
    pub flush_timeout: Duration,
}

/// `s` as a TOML basic string: quotes, backslashes and control characters escaped, everything
/// else literal (Rust's `{:?}` escapes, such as `\u{1b}`, are not TOML).
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML array of basic strings.
pub(crate) fn toml_array<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<String> = items.iter().map(|i| toml_string(i.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

/// `1ms`, `0.5ms`, `0.125ms`: exact to the microsecond, as [`parse_duration`] reads it back.
fn fractional_ms(d: Duration) -> String {
    let us = d.as_micros();
    let frac = format!("{:03}", us % 1000);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{}ms", us / 1000)
    } else {
        format!("{}.{frac}ms", us / 1000)
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The host name, or `gateway` when it cannot be read.
fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        "gateway".to_owned()
    } else {
        host
    }
}

fn default_gateway_id() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

fn valid_topic_prefix(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 200
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Config {
    /// Merges flags/env over the file over defaults and validates. Returns every problem found.
    pub fn from_args(args: RunArgs) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let file: FileConfig = match &args.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match toml::from_str(&text) {
                    Ok(f) => f,
                    Err(e) => {
                        errors.push(format!("config file {}: {}", path.display(), e.message()));
                        FileConfig::default()
                    }
                },
                Err(e) => {
                    errors.push(format!("config file {}: {e}", path.display()));
                    FileConfig::default()
                }
            },
            None => FileConfig::default(),
        };

        let mut addr = |name: &str, v: Option<String>, f: Option<String>, d: &str| -> SocketAddr {
            let s = v.or(f).unwrap_or_else(|| d.to_owned());
            s.parse().unwrap_or_else(|_| {
                errors.push(format!(
                    "--{name}: {s:?} is not an address like 0.0.0.0:8080"
                ));
                d.parse().expect("valid default")
            })
        };
        let listen = addr("listen", args.listen, file.listen, "0.0.0.0:8080");
        let admin_listen = addr(
            "admin-listen",
            args.admin_listen,
            file.admin_listen,
            "0.0.0.0:9090",
        );

        let mut dur = |name: &str, v: Option<String>, f: Option<String>, d: &str| -> Duration {
            let s = v.or(f).unwrap_or_else(|| d.to_owned());
            parse_duration(&s).unwrap_or_else(|e| {
                errors.push(format!("--{name}: {e}"));
                parse_duration(d).expect("valid default")
            })
        };
        let drain_timeout = dur(
            "drain-timeout",
            args.drain_timeout,
            file.drain_timeout,
            "30s",
        );
        let idle_timeout = dur("idle-timeout", args.idle_timeout, file.idle_timeout, "5s");
        let ping = dur(
            "ping-interval",
            args.ping_interval,
            file.ping_interval,
            "2s",
        );
        let handshake_timeout = dur(
            "handshake-timeout",
            args.handshake_timeout,
            file.handshake_timeout,
            "5s",
        );
        let flush_timeout = dur(
            "flush-timeout",
            args.flush_timeout,
            file.flush_timeout,
            "30s",
        );
        let drain_interval = dur(
            "kafka-drain-interval",
            args.kafka_drain_interval,
            file.kafka_drain_interval,
            "1ms",
        );
        let io_pace = dur("io-pace", args.io_pace, file.io_pace, "0ms");
        let spool_spill_after = dur(
            "spool-spill-after",
            args.spool_spill_after,
            file.spool_spill_after,
            "1s",
        );
        let playback_buffer = dur(
            "playback-buffer",
            args.playback_buffer,
            file.playback_buffer,
            "60s",
        );
        let playback_fetch_wait = dur(
            "playback-fetch-wait",
            args.playback_fetch_wait,
            file.playback_fetch_wait,
            "100ms",
        );

        let brokers = args
            .brokers
            .or(file.brokers)
            .unwrap_or_else(|| "127.0.0.1:9092".into());
        if brokers.trim().is_empty() {
            errors.push("--brokers: must not be empty".into());
        }
        let topic_prefix = args
            .topic_prefix
            .or(file.topic_prefix)
            .unwrap_or_else(|| "twilio".into());
        if !valid_topic_prefix(&topic_prefix) {
            errors.push(format!(
                "--topic-prefix: {topic_prefix:?} must be 1-200 characters of [a-zA-Z0-9._-]"
            ));
        }
        let ws_path = args
            .ws_path
            .or(file.ws_path)
            .unwrap_or_else(|| "/stream".into());
        if !ws_path.starts_with('/') || ws_path.contains('?') || ws_path.contains('#') {
            errors.push(format!(
                "--ws-path: {ws_path:?} must start with / and have no query"
            ));
        }
        let max_streams = args.max_streams.or(file.max_streams).unwrap_or(10_000);
        if max_streams == 0 || max_streams > 1_000_000 {
            errors.push(format!(
                "--max-streams: {max_streams} must be between 1 and 1000000"
            ));
        }
        let log_format = match args
            .log_format
            .or(file.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                errors.push(format!("--log-format: {other:?} must be text or json"));
                LogFormat::Text
            }
        };
        let log_level = args
            .log_level
            .or(file.log_level)
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            errors.push(format!("--log-level: {e}"));
        }
        // librdkafka settings, later sources overriding earlier ones: the file's table, the
        // options file, `GATEWAY_KAFKA_OPTIONS` (one per line), the flags. Values are never
        // echoed in errors: they may be secrets.
        let mut kafka_options: Vec<KafkaOption> = file
            .kafka_options
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| KafkaOption { key, value })
            .collect();
        if let Some(path) = args.kafka_options_file.or(file.kafka_options_file) {
            match std::fs::read_to_string(&path) {
                Ok(text) => match parse_properties(&text) {
                    Ok(opts) => kafka_options.extend(opts),
                    Err(e) => errors.push(format!("--kafka-options-file {}: {e}", path.display())),
                },
                Err(e) => errors.push(format!("--kafka-options-file {}: {e}", path.display())),
            }
        }
        if let Ok(text) = std::env::var("GATEWAY_KAFKA_OPTIONS") {
            match parse_properties(&text) {
                Ok(opts) => kafka_options.extend(opts),
                Err(e) => errors.push(format!("GATEWAY_KAFKA_OPTIONS: {e}")),
            }
        }
        for (i, kv) in args.kafka_option.iter().enumerate() {
            match parse_option(kv) {
                Ok(o) => kafka_options.push(o),
                Err(e) => errors.push(format!("--kafka-option (occurrence {}): {e}", i + 1)),
            }
        }
        if kafka_options.iter().any(|o| o.key == "bootstrap.servers") {
            errors.push("--kafka-option: use --brokers instead of bootstrap.servers".into());
        }
        // Profiles: the flags, else `GATEWAY_PROFILES` (one per line), else the file's list.
        let profile_items = if !args.profile.is_empty() {
            args.profile
        } else if let Ok(text) = std::env::var("GATEWAY_PROFILES") {
            text.lines().map(str::to_owned).collect()
        } else {
            file.profile.unwrap_or_default()
        };
        let profiles = crate::sink::profiles::parse_profiles(&profile_items, &mut errors);
        let frames_per_record = args
            .frames_per_record
            .or(file.frames_per_record)
            .unwrap_or(1);
        if !(1..=1000).contains(&frames_per_record) {
            errors.push(format!(
                "--frames-per-record: {frames_per_record} must be between 1 and 1000"
            ));
        }
        let audio_encoding = match args
            .audio_encoding
            .or(file.audio_encoding)
            .as_deref()
            .unwrap_or("pcm")
        {
            "pcm" | "pcm_s16le" | "pcm16" => AudioEncoding::PcmS16le,
            "mulaw" | "ulaw" => AudioEncoding::Mulaw,
            other => {
                errors.push(format!("--audio-encoding: {other:?} must be pcm or mulaw"));
                AudioEncoding::PcmS16le
            }
        };
        let create_topics = args.create_topics.or(file.create_topics).unwrap_or(true);
        let topic_partitions = args.topic_partitions.or(file.topic_partitions).unwrap_or(6);
        if !(1..=10_000).contains(&topic_partitions) {
            errors.push(format!(
                "--topic-partitions: {topic_partitions} must be between 1 and 10000"
            ));
        }
        let topic_replication = args
            .topic_replication
            .or(file.topic_replication)
            .unwrap_or(1);
        if !(1..=32).contains(&topic_replication) {
            errors.push(format!(
                "--topic-replication: {topic_replication} must be between 1 and 32"
            ));
        }
        let gateway_id = args
            .gateway_id
            .or(file.gateway_id)
            .unwrap_or_else(default_gateway_id);
        if gateway_id.is_empty() || gateway_id.len() > 128 {
            errors.push("--gateway-id: must be 1-128 characters".into());
        }
        let max_message_bytes = args
            .max_message_bytes
            .or(file.max_message_bytes)
            .unwrap_or(64 * 1024);
        if !(1024..=16 * 1024 * 1024).contains(&max_message_bytes) {
            errors.push(format!(
                "--max-message-bytes: {max_message_bytes} must be between 1024 and 16777216"
            ));
        }
        let max_inflight_bytes = args
            .max_inflight_bytes
            .or(file.max_inflight_bytes)
            .unwrap_or(256 * 1024 * 1024);
        if !(2 * 1024 * 1024..=64 * 1024 * 1024 * 1024).contains(&max_inflight_bytes) {
            errors.push(format!(
                "--max-inflight-bytes: {max_inflight_bytes} must be between 2 MiB and 64 GiB"
            ));
        }
        // librdkafka only ever holds the window: its queue limits (25 % above it) must be
        // describable (`queue.buffering.max.kbytes` clamps near 2 GiB), and the window must
        // leave the spool at least half the budget.
        let window_bytes = args
            .kafka_window_bytes
            .or(file.kafka_window_bytes)
            .unwrap_or((32 << 20).min(max_inflight_bytes / 2));
        if !(1024 * 1024..=MAX_WINDOW_BYTES).contains(&window_bytes) {
            errors.push(format!(
                "--kafka-window-bytes: {window_bytes} must be between 1 MiB and {MAX_WINDOW_BYTES} \
                 (librdkafka's queue limits cannot describe more)"
            ));
        } else if window_bytes > max_inflight_bytes / 2 {
            errors.push(format!(
                "--kafka-window-bytes: {window_bytes} must be at most half of \
                 --max-inflight-bytes ({max_inflight_bytes})"
            ));
        }
        let overflow_s = args
            .overflow
            .or(file.overflow)
            .unwrap_or_else(|| "drop-newest".into());
        let overflow = crate::sink::OverflowPolicy::parse(&overflow_s).unwrap_or_else(|| {
            errors.push(format!(
                "--overflow: {overflow_s:?} must be drop-newest, drop-oldest or disconnect"
            ));
            crate::sink::OverflowPolicy::DropNewest
        });
        let readiness_watermark = args
            .readiness_watermark
            .or(file.readiness_watermark)
            .unwrap_or(0.8);
        if !(readiness_watermark > 0.0 && readiness_watermark <= 1.0) {
            errors.push(format!(
                "--readiness-watermark: {readiness_watermark} must be in (0, 1]"
            ));
        }
        let max_header_bytes = args
            .max_header_bytes
            .or(file.max_header_bytes)
            .unwrap_or(16 * 1024);
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            errors.push(format!(
                "--max-header-bytes: {max_header_bytes} must be between 8192 and 1048576"
            ));
        }
        if idle_timeout < Duration::from_millis(100) {
            errors.push("--idle-timeout: must be at least 100ms".into());
        }
        if handshake_timeout.is_zero() {
            errors.push("--handshake-timeout: must be positive".into());
        }
        let ping_interval = if ping.is_zero() { None } else { Some(ping) };
        if listen == admin_listen && listen.port() != 0 {
            errors.push("--listen and --admin-listen must differ".into());
        }
        let security = crate::security::config::SecurityConfig::from_parts(
            args.security,
            crate::security::config::SecurityFile {
                tls_cert: file.tls_cert,
                tls_key: file.tls_key,
                public_url: file.public_url,
                twilio_auth_token: file.twilio_auth_token,
                twilio_auth_token_secondary: file.twilio_auth_token_secondary,
                twilio_auth_token_file: file.twilio_auth_token_file,
                insecure_skip_signature: file.insecure_skip_signature,
                max_concurrent_handshakes: file.max_concurrent_handshakes,
                max_handshakes_per_second: file.max_handshakes_per_second,
                twiml_mode: file.twiml_mode,
                twiml_track: file.twiml_track,
                twiml_then: file.twiml_then,
                twiml_parameters: file.twiml_parameters,
            },
            &mut errors,
        );
        if drain_interval.is_zero() || drain_interval > Duration::from_millis(100) {
            errors.push("--kafka-drain-interval: must be between 1ms and 100ms".into());
        }
        if io_pace > Duration::from_millis(10) {
            errors.push("--io-pace: at most 10ms (it adds up to that much latency)".into());
        }
        let worker_threads = args.worker_threads.or(file.worker_threads);
        if let Some(n) = worker_threads.filter(|n| !(1..=1024).contains(n)) {
            errors.push(format!("--worker-threads: {n} is not between 1 and 1024"));
        }
        let ingest = match args
            .ingest_threads
            .or(file.ingest_threads.map(NumberOrWord::into_string))
        {
            None => IngestThreads::PerCore,
            Some(raw) => IngestThreads::parse(&raw).unwrap_or_else(|e| {
                errors.push(e);
                IngestThreads::Shared
            }),
        };
        if io_pace.subsec_nanos() % 1000 != 0 {
            errors.push("--io-pace: 0 (off) or whole microseconds, e.g. 0.5ms or 1ms".into());
        }
        // Twilio is sent to --public-url; the listener answers only --ws-path.
        if let Some(url) = &security.public_url {
            if url.path() != ws_path {
                errors.push(format!(
                    "--public-url path {:?} differs from --ws-path {ws_path:?}: Twilio would connect \
                     to a path this listener answers with 404 (error 31920); make them equal",
                    url.path()
                ));
            }
        }
        let cidrs = |flag: &str, v: Vec<String>, errors: &mut Vec<String>| -> Vec<Cidr> {
            v.iter()
                .map(|c| c.trim())
                .filter(|c| !c.is_empty())
                .filter_map(|c| {
                    c.parse::<Cidr>()
                        .map_err(|e| errors.push(format!("--{flag}: {e}")))
                        .ok()
                })
                .collect()
        };
        let allow_args = if args.allow_cidr.is_empty() {
            file.allow_cidr.unwrap_or_default()
        } else {
            args.allow_cidr
        };
        let proxy_args = if args.trusted_proxy.is_empty() {
            file.trusted_proxy.unwrap_or_default()
        } else {
            args.trusted_proxy
        };
        let access = AccessConfig {
            allow: cidrs("allow-cidr", allow_args, &mut errors),
            trusted_proxies: cidrs("trusted-proxy", proxy_args, &mut errors),
            max_handshakes_per_source: args
                .max_handshakes_per_source
                .or(file.max_handshakes_per_source)
                .unwrap_or(256),
        };
        let playback_enabled = args.playback.or(file.playback).unwrap_or(true);
        // The three keys choose one assignment together: when flags or env set any of them,
        // the file's are ignored (a printed file's `playback_partitions = "all"` must not
        // conflict with an index and count given by the environment).
        let (list, instance_index, instance_count) = if args.playback_partitions.is_some()
            || args.instance_index.is_some()
            || args.instance_count.is_some()
        {
            (
                args.playback_partitions,
                args.instance_index,
                args.instance_count,
            )
        } else {
            (
                file.playback_partitions,
                file.instance_index.map(NumberOrWord::into_string),
                file.instance_count,
            )
        };
        let partitions = match (list, instance_index, instance_count) {
            // `all` is the default spelled out (what `print-config` writes for it).
            (Some(list), None, None) if list.trim() == "all" => Assignment::All,
            (Some(list), None, None) => match parse_list(&list) {
                Ok(l) => Assignment::Explicit(l),
                Err(e) => {
                    errors.push(format!("--playback-partitions: {e}"));
                    Assignment::All
                }
            },
            (None, Some(index), Some(count)) => {
                let index = if index == "auto" {
                    let host =
                        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    ordinal_from_hostname(host.trim()).ok_or_else(|| {
                        format!(
                            "--instance-index auto: host name {:?} ends in no number",
                            host.trim()
                        )
                    })
                } else {
                    index
                        .parse::<u32>()
                        .map_err(|_| format!("--instance-index: {index:?} is not a number or auto"))
                };
                match index {
                    Ok(i) if count >= 1 && i < count => Assignment::Instance { index: i, count },
                    Ok(i) => {
                        errors.push(format!(
                            "--instance-index {i} must be below --instance-count {count}"
                        ));
                        Assignment::All
                    }
                    Err(e) => {
                        errors.push(e);
                        Assignment::All
                    }
                }
            }
            (None, None, None) => Assignment::All,
            (Some(_), _, _) => {
                errors.push(
                    "--playback-partitions excludes --instance-index/--instance-count".into(),
                );
                Assignment::All
            }
            _ => {
                errors.push("--instance-index and --instance-count go together".into());
                Assignment::All
            }
        };
        let partitioning = {
            let raw = args
                .partitions_per_instance
                .or(file.partitions_per_instance.map(NumberOrWord::into_string));
            let instance = match &partitions {
                Assignment::Instance { index, .. } => Some(*index),
                _ => None,
            };
            // librdkafka's `partitioner` setting is the user asking for key hashing: it keeps
            // the old spread unless --partitions-per-instance says otherwise, which conflicts.
            let user_partitioner = kafka_options
                .iter()
                .any(|o| o.key == "partitioner" || o.key == "topic.partitioner");
            match raw.as_deref() {
                Some(n) if user_partitioner && n != "all" => errors.push(format!(
                    "--partitions-per-instance {n} and --kafka-option partitioner=... both choose \
                     partitions: drop one (or use --partitions-per-instance all)"
                )),
                _ => {}
            }
            let default = if user_partitioner { "all" } else { "1" };
            match raw.as_deref().unwrap_or(default) {
                "all" => Partitioning::Key,
                n => match n.parse::<u32>() {
                    Ok(n) if (1..=MAX_PER_INSTANCE).contains(&n) => Partitioning::Instance {
                        seed: partitioning_seed(instance, &host_name()),
                        per_instance: n,
                    },
                    _ => {
                        errors.push(format!(
                            "--partitions-per-instance: {n:?} must be `all` or a number between 1 and {MAX_PER_INSTANCE}"
                        ));
                        Partitioning::Key
                    }
                },
            }
        };
        let per_stream_bytes = (playback_buffer.as_secs_f64() * 8000.0) as u64;
        if per_stream_bytes < 8000 {
            errors.push("--playback-buffer: must be at least 1s".into());
        }
        let playback_max_bytes = args
            .playback_max_bytes
            .or(file.playback_max_bytes)
            .unwrap_or(256 << 20);
        if playback_max_bytes < per_stream_bytes {
            errors.push(format!(
                "--playback-max-bytes {playback_max_bytes} is below one stream's --playback-buffer ({per_stream_bytes} bytes)"
            ));
        }
        // librdkafka takes whole milliseconds, at least 1 (0 would spin on empty fetches).
        let fetch_wait_ms = playback_fetch_wait.as_millis();
        if !(1..=10_000).contains(&fetch_wait_ms) {
            errors.push(format!(
                "--playback-fetch-wait: {} ms is outside 1ms..=10s",
                fetch_wait_ms
            ));
        }
        let playback = PlaybackConfig {
            enabled: playback_enabled,
            topic: format!("{topic_prefix}.playback"),
            partitions,
            per_stream_bytes,
            total_bytes: playback_max_bytes,
            fetch_wait_ms: fetch_wait_ms.clamp(1, 10_000) as u32,
        };
        let session = SessionConfig {
            frames_per_record,
            max_payload_bytes: max_message_bytes,
            max_anomaly_events: 100,
        };
        // An empty path is "no disk spool", as `print-config` writes it.
        let spool_dir = args
            .spool_dir
            .or(file.spool_dir)
            .filter(|d| !d.as_os_str().is_empty());
        let spool_max_bytes = args
            .spool_max_bytes
            .or(file.spool_max_bytes)
            .unwrap_or(4 << 30);
        if spool_max_bytes < 1 << 20 {
            errors.push(format!(
                "--spool-max-bytes: {spool_max_bytes} must be at least 1 MiB"
            ));
        }
        let fsync_s = args
            .spool_fsync
            .or(file.spool_fsync)
            .unwrap_or_else(|| "1s".into());
        let spool_fsync = FsyncPolicy::parse(&fsync_s).unwrap_or_else(|| {
            errors.push(format!(
                "--spool-fsync: {fsync_s:?} must be always, never or an interval such as 1s"
            ));
            FsyncPolicy::Never
        });
        let spool_memory_bytes = args
            .spool_memory_bytes
            .or(file.spool_memory_bytes)
            .unwrap_or(32 << 20);
        if spool_memory_bytes < 64 << 10 {
            errors.push(format!(
                "--spool-memory-bytes: {spool_memory_bytes} must be at least 64 KiB"
            ));
        }
        // Every check above has run: report all problems together.
        if !errors.is_empty() {
            return Err(errors);
        }
        let spool = SpoolConfig {
            disk: spool_dir.map(|dir| DiskConfig {
                dir,
                max_bytes: spool_max_bytes,
                segment_bytes: DiskConfig::segment_bytes_for(spool_max_bytes),
                fsync: spool_fsync,
            }),
            memory_bytes: spool_memory_bytes,
            spill_after: spool_spill_after,
        };
        Ok(Config {
            runtime: RuntimeConfig {
                worker_threads,
                io_pace,
                ingest,
            },
            listen,
            admin_listen,
            log_format,
            log_level,
            drain: DrainConfig {
                drain_timeout,
                close_grace: Duration::from_secs(10),
                flush_timeout,
            },
            sink: SinkConfig {
                kafka: KafkaOptions {
                    brokers,
                    options: kafka_options,
                },
                topic_prefix,
                gateway_id,
                max_inflight_bytes,
                window_bytes,
                frames_per_record,
                audio_encoding,
                overflow,
                create_topics,
                topic_partitions,
                topic_replication,
                partitioning,
                drain_interval,
                readiness_watermark,
                spool,
                profiles,
            },
            server: ServerConfig {
                ws_path,
                max_streams,
                handshake_timeout,
                max_header_bytes,
                connection: ConnectionConfig {
                    session,
                    max_message_bytes,
                    stop_linger: Duration::from_secs(1),
                },
                watchdog: WatchdogConfig {
                    idle_timeout,
                    ping_after: ping_interval,
                },
                access,
            },
            security,
            playback,
        })
    }

    /// The effective configuration as TOML (for `print-config`). Secrets are redacted.
    pub fn to_toml(&self) -> String {
        let sink = &self.sink;
        let server = &self.server;
        let enc = match sink.audio_encoding {
            AudioEncoding::PcmS16le => "pcm",
            AudioEncoding::Mulaw => "mulaw",
        };
        let fmt = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let q = toml_string;
        let ms = |d: Duration| q(&fractional_ms(d));
        let list = |v: &[Cidr]| toml_array(&v.iter().map(|c| c.to_string()).collect::<Vec<_>>());
        let lines = [
            ("listen", q(&self.listen.to_string())),
            ("admin_listen", q(&self.admin_listen.to_string())),
            ("brokers", q(&sink.kafka.brokers)),
            ("topic_prefix", q(&sink.topic_prefix)),
            ("ws_path", q(&server.ws_path)),
            ("max_streams", server.max_streams.to_string()),
            ("drain_timeout", ms(self.drain.drain_timeout)),
            ("flush_timeout", ms(self.drain.flush_timeout)),
            ("log_format", q(fmt)),
            ("log_level", q(&self.log_level)),
            ("frames_per_record", sink.frames_per_record.to_string()),
            ("audio_encoding", q(enc)),
            (
                "profile",
                toml_array(
                    &sink
                        .profiles
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>(),
                ),
            ),
            ("create_topics", sink.create_topics.to_string()),
            ("topic_partitions", sink.topic_partitions.to_string()),
            ("topic_replication", sink.topic_replication.to_string()),
            ("partitions_per_instance", sink.partitioning.describe()),
            ("gateway_id", q(&sink.gateway_id)),
            (
                "max_message_bytes",
                server.connection.max_message_bytes.to_string(),
            ),
            ("max_inflight_bytes", sink.max_inflight_bytes.to_string()),
            ("kafka_window_bytes", sink.window_bytes.to_string()),
            ("kafka_drain_interval", ms(sink.drain_interval)),
            ("overflow", q(sink.overflow.as_str())),
            ("readiness_watermark", sink.readiness_watermark.to_string()),
            ("idle_timeout", ms(server.watchdog.idle_timeout)),
            (
                "ping_interval",
                ms(server.watchdog.ping_after.unwrap_or_default()),
            ),
            ("handshake_timeout", ms(server.handshake_timeout)),
            ("max_header_bytes", server.max_header_bytes.to_string()),
            ("allow_cidr", list(&server.access.allow)),
            ("trusted_proxy", list(&server.access.trusted_proxies)),
            (
                "max_handshakes_per_source",
                server.access.max_handshakes_per_source.to_string(),
            ),
            // A default that depends on the machine stays a default when read back.
            match self.runtime.worker_threads {
                Some(n) => ("worker_threads", n.to_string()),
                None => ("# worker_threads", "default".into()),
            },
            ("io_pace", q(&fractional_ms(self.runtime.io_pace))),
            ("ingest_threads", q(&self.runtime.ingest.as_arg())),
            ("playback", self.playback.enabled.to_string()),
            (
                "playback_partitions",
                q(&self.playback.partitions.describe()),
            ),
            (
                "playback_buffer",
                q(&format!("{}ms", self.playback.per_stream_bytes / 8)),
            ),
            ("playback_max_bytes", self.playback.total_bytes.to_string()),
            (
                "playback_fetch_wait",
                q(&format!("{}ms", self.playback.fetch_wait_ms)),
            ),
            (
                "spool_dir",
                q(&sink
                    .spool
                    .disk
                    .as_ref()
                    .map_or(String::new(), |d| d.dir.display().to_string())),
            ),
            (
                "spool_max_bytes",
                sink.spool
                    .disk
                    .as_ref()
                    .map_or(0, |d| d.max_bytes)
                    .to_string(),
            ),
            (
                "spool_fsync",
                q(&sink
                    .spool
                    .disk
                    .as_ref()
                    .map_or("never".into(), |d| d.fsync.describe())),
            ),
            ("spool_memory_bytes", sink.spool.memory_bytes.to_string()),
            ("spool_spill_after", ms(sink.spool.spill_after)),
        ];
        let mut lines = Vec::from(lines);
        // The file form of an index/count assignment is those two keys (the key
        // `playback_partitions` takes a list or `all`), so the output reads back as a file.
        if let Assignment::Instance { index, count } = self.playback.partitions {
            if let Some(at) = lines.iter().position(|(k, _)| *k == "playback_partitions") {
                lines.splice(
                    at..=at,
                    [
                        ("instance_index", index.to_string()),
                        ("instance_count", count.to_string()),
                    ],
                );
            }
        }
        // No disk spool: its settings are not in effect, so they are not written (read back,
        // an empty `spool_dir` would mean the same, but `spool_max_bytes = 0` would not pass).
        if sink.spool.disk.is_none() {
            lines.retain(|(k, _)| !matches!(*k, "spool_dir" | "spool_max_bytes" | "spool_fsync"));
            lines.push(("# spool_dir", "none (no disk spool)".into()));
        }
        let mut s = String::new();
        for (k, v) in lines {
            if k.starts_with('#') {
                s.push_str(&format!("{k}: {v}\n"));
            } else {
                s.push_str(&format!("{k} = {v}\n"));
            }
        }
        s.push_str(&self.security.to_toml());
        s.push_str(&sink.kafka.to_toml());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, Vec<String>> {
        let mut v = vec!["gateway", "--insecure-skip-signature"];
        v.extend_from_slice(args);
        Config::from_args(TestCli::try_parse_from(v).unwrap().run)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(c.sink.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.sink.topic_prefix, "twilio");
        assert_eq!(c.server.ws_path, "/stream");
        assert_eq!(c.sink.frames_per_record, 1);
        assert_eq!(c.sink.audio_encoding, AudioEncoding::PcmS16le);
        assert!(c.sink.create_topics);
        assert_eq!(c.sink.window_bytes, 32 << 20);
    }

    #[test]
    fn partitions_per_instance() {
        use crate::sink::partitioning::{fnv1a, Partitioning};
        let host = super::host_name();
        assert_eq!(
            parse(&[]).unwrap().sink.partitioning,
            Partitioning::Instance {
                seed: fnv1a(host.as_bytes()),
                per_instance: 1
            },
            "default: one partition, base from the host name"
        );
        let c = parse(&[
            "--partitions-per-instance",
            "3",
            "--instance-index",
            "2",
            "--instance-count",
            "4",
        ])
        .unwrap();
        assert_eq!(
            c.sink.partitioning,
            Partitioning::Instance {
                seed: 2,
                per_instance: 3
            }
        );
        assert!(c.to_toml().contains("partitions_per_instance = 3"));
        let c = parse(&["--partitions-per-instance", "all"]).unwrap();
        assert_eq!(c.sink.partitioning, Partitioning::Key);
        // A librdkafka partitioner setting means key hashing, and conflicts with a number.
        let c = parse(&["--kafka-option", "partitioner=murmur2_random"]).unwrap();
        assert_eq!(c.sink.partitioning, Partitioning::Key);
        let c = parse(&["--kafka-option", "topic.partitioner=fnv1a"]).unwrap();
        assert_eq!(c.sink.partitioning, Partitioning::Key);
        let errs = parse(&[
            "--kafka-option",
            "partitioner=murmur2_random",
            "--partitions-per-instance",
            "2",
        ])
        .unwrap_err();
        assert!(errs[0].contains("both choose partitions"), "{errs:?}");
        assert!(c.to_toml().contains("partitions_per_instance = \"all\""));
        for bad in ["0", "10001", "some"] {
            let errs = parse(&["--partitions-per-instance", bad]).unwrap_err();
            assert!(
                errs[0].contains("--partitions-per-instance"),
                "{bad}: {errs:?}"
            );
        }
        // The file form takes a number or "all".
        let dir = std::env::temp_dir().join(format!("gwppi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, want) in [
            ("partitions_per_instance = 2\n", Some(2)),
            ("partitions_per_instance = \"all\"\n", None),
        ] {
            let path = dir.join("c.toml");
            std::fs::write(&path, text).unwrap();
            let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
            match (c.sink.partitioning, want) {
                (Partitioning::Instance { per_instance, .. }, Some(n)) => {
                    assert_eq!(per_instance, n)
                }
                (Partitioning::Key, None) => {}
                (got, _) => panic!("{text}: {got:?}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn all_errors_reported_at_once() {
        let errs = parse(&[
            "--listen",
            "nope",
            "--topic-prefix",
            "a b",
            "--frames-per-record",
            "0",
            "--kafka-option",
            "novalue",
            "--drain-timeout",
            "5x",
            "--log-format",
            "xml",
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 6, "{errs:#?}");
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("gwcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.toml");
        std::fs::write(&path, "topic_prefix = \"fromfile\"\nframes_per_record = 5\n[kafka_options]\n\"linger.ms\" = \"1\"\n").unwrap();
        let c = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--frames-per-record",
            "2",
            "--create-topics=false",
        ])
        .unwrap();
        assert_eq!(c.sink.topic_prefix, "fromfile");
        assert_eq!(c.sink.frames_per_record, 2);
        assert!(!c.sink.create_topics);
        assert_eq!(c.sink.kafka.get("linger.ms"), Some("1"));
        std::fs::write(&path, "unknown_key = 1\n").unwrap();
        assert!(parse(&["--config", path.to_str().unwrap()]).is_err());
    }

    #[test]
    fn kafka_option_values_keep_commas_from_flags_env_and_file() {
        let dir = std::env::temp_dir().join(format!("gwkopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.properties");
        std::fs::write(
            &path,
            "# creds\nsasl.username=alice\nsasl.password=s3cr3t,x\n",
        )
        .unwrap();
        let c = parse(&[
            "--kafka-options-file",
            path.to_str().unwrap(),
            "--kafka-option",
            "debug=broker,topic",
            "--kafka-option",
            "sasl.oauthbearer.extensions=a=1,b=2",
            "--kafka-option",
            "ssl.cipher.suites=ECDHE-RSA-AES128-GCM-SHA256,ECDHE-RSA-AES256-GCM-SHA384",
        ])
        .unwrap();
        let k = &c.sink.kafka;
        assert_eq!(k.get("debug"), Some("broker,topic"));
        assert_eq!(k.get("sasl.oauthbearer.extensions"), Some("a=1,b=2"));
        assert_eq!(
            k.get("ssl.cipher.suites"),
            Some("ECDHE-RSA-AES128-GCM-SHA256,ECDHE-RSA-AES256-GCM-SHA384")
        );
        assert_eq!(k.get("sasl.password"), Some("s3cr3t,x"));
        assert_eq!(k.options.len(), 5, "no bogus properties: {:?}", k.options);
        let printed = format!("{}\n{c:?}", c.to_toml());
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("alice") && printed.contains("broker,topic"));
    }

    /// `print-config` writes a file that reads back to the same configuration (secrets aside:
    /// they are redacted, so they are written as comments and must come from elsewhere).
    #[test]
    fn print_config_reads_back_as_a_config_file() {
        let dir = std::env::temp_dir().join(format!("gwprint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = dir.join("spool");
        let cases: Vec<Vec<&str>> = vec![
            vec![],
            vec![
                "--instance-index",
                "1",
                "--instance-count",
                "3",
                "--partitions-per-instance",
                "2",
            ],
            vec![
                "--playback-partitions",
                "0-2,5",
                "--playback=false",
                "--playback-fetch-wait",
                "7ms",
                "--worker-threads",
                "3",
                "--io-pace",
                "0.5ms",
                "--ingest-threads",
                "cores",
            ],
            vec![
                "--ingest-threads",
                "2",
                "--partitions-per-instance",
                "all",
                "--playback-partitions",
                "all",
                // Quotes, a backslash and a control character must survive TOML quoting.
                "--kafka-option",
                "client.id=gw \"one\" \\ \u{1b}",
                "--twiml-parameters",
                "From,To",
            ],
            vec![
                "--profile",
                "asr:rate=16000",
                "--allow-cidr",
                "10.0.0.0/8",
                "--trusted-proxy",
                "127.0.0.1/32",
                "--spool-dir",
                spool.to_str().unwrap(),
                "--spool-max-bytes",
                "2000000",
                "--kafka-option",
                "linger.ms=7",
                "--kafka-option",
                "debug=broker,topic",
                "--kafka-option",
                "linger.ms=9",
                "--kafka-drain-interval",
                "1.5ms",
            ],
        ];
        for (i, args) in cases.iter().enumerate() {
            let first = parse(args).unwrap_or_else(|e| panic!("case {i} {args:?}: {e:?}"));
            let file = dir.join(format!("case{i}.toml"));
            std::fs::write(&file, first.to_toml()).unwrap();
            let again = parse(&["--config", file.to_str().unwrap()])
                .unwrap_or_else(|e| panic!("case {i}: printed file does not read back: {e:?}"));
            // Same text, except that the file's `[kafka_options]` table comes back in key order.
            let split = |t: String| {
                let (head, table) = t.split_once("\n[kafka_options]\n").unwrap_or((&t, ""));
                let mut table: Vec<String> = table.lines().map(str::to_owned).collect();
                table.sort();
                (head.to_owned(), table)
            };
            assert_eq!(
                split(first.to_toml()),
                split(again.to_toml()),
                "case {i} {args:?}"
            );
            assert_eq!(
                first.playback.partitions, again.playback.partitions,
                "case {i}"
            );
            assert_eq!(first.sink.partitioning, again.sink.partitioning, "case {i}");
            assert_eq!(
                format!("{:?}", first.sink.spool),
                format!("{:?}", again.sink.spool),
                "case {i}"
            );
            assert_eq!(first.runtime, again.runtime, "case {i}");
            assert_eq!(first.sink.drain_interval, again.sink.drain_interval);
            assert_eq!(
                first.sink.kafka.get("linger.ms"),
                again.sink.kafka.get("linger.ms"),
                "case {i}: the value in effect"
            );
            assert_eq!(
                first.sink.kafka.get("client.id"),
                again.sink.kafka.get("client.id")
            );
            assert_eq!(
                first.security.twiml.parameters,
                again.security.twiml.parameters
            );
        }
        // Flags and env choose the playback assignment as a whole, over a printed file's.
        let file = dir.join("case0.toml");
        let c = parse(&[
            "--config",
            file.to_str().unwrap(),
            "--instance-index",
            "1",
            "--instance-count",
            "3",
        ])
        .unwrap();
        assert_eq!(
            c.playback.partitions,
            Assignment::Instance { index: 1, count: 3 }
        );
        // Spool settings are validated like the others (they were once checked too late).
        let errs = parse(&[
            "--spool-dir",
            spool.to_str().unwrap(),
            "--spool-max-bytes",
            "5",
            "--spool-fsync",
            "sometimes",
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        // A secret is printed as a comment: read back, it is absent, never `<redacted>`.
        let c = parse(&["--kafka-option", "sasl.password=hunter2"]).unwrap();
        let printed = c.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        let file = dir.join("secret.toml");
        std::fs::write(&file, &printed).unwrap();
        let again = parse(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(again.sink.kafka.get("sasl.password"), None, "{printed}");
        // A file may give the index as a number or as a string.
        std::fs::write(&file, "instance_index = 2\ninstance_count = 4\n").unwrap();
        let n = parse(&["--config", file.to_str().unwrap()]).unwrap();
        std::fs::write(&file, "instance_index = \"2\"\ninstance_count = 4\n").unwrap();
        let w = parse(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            n.playback.partitions,
            Assignment::Instance { index: 2, count: 4 }
        );
        assert_eq!(w.playback.partitions, n.playback.partitions);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn playback_fetch_wait() {
        assert_eq!(parse(&[]).unwrap().playback.fetch_wait_ms, 100);
        let c = parse(&["--playback-fetch-wait", "5ms"]).unwrap();
        assert_eq!(c.playback.fetch_wait_ms, 5);
        assert!(c.to_toml().contains("playback_fetch_wait = \"5ms\""));
        for bad in ["0ms", "0.5ms", "11s"] {
            let errs = parse(&["--playback-fetch-wait", bad]).unwrap_err();
            assert!(
                errs.iter().any(|e| e.contains("--playback-fetch-wait")),
                "{bad}: {errs:?}"
            );
        }
    }

    #[test]
    fn runtime_worker_threads_and_io_pace() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.runtime,
            RuntimeConfig {
                worker_threads: None,
                io_pace: Duration::ZERO,
                ingest: IngestThreads::PerCore,
            }
        );
        assert!(c.to_toml().contains("# worker_threads: default\n"));
        let c = parse(&[
            "--worker-threads",
            "1",
            "--io-pace",
            "1ms",
            "--ingest-threads",
            "0",
        ])
        .unwrap();
        assert_eq!(
            c.runtime,
            RuntimeConfig {
                worker_threads: Some(1),
                io_pace: Duration::from_millis(1),
                ingest: IngestThreads::Shared,
            }
        );
        assert!(c
            .to_toml()
            .contains("worker_threads = 1\nio_pace = \"1ms\"\ningest_threads = \"0\"\n"));
        let c = parse(&["--io-pace", "0.5ms"]).unwrap();
        assert_eq!(c.runtime.io_pace, Duration::from_micros(500));
        for (arg, want, toml) in [
            ("0", IngestThreads::Shared, "ingest_threads = \"0\"\n"),
            (
                "cores",
                IngestThreads::PerCore,
                "ingest_threads = \"cores\"\n",
            ),
            ("3", IngestThreads::Count(3), "ingest_threads = \"3\"\n"),
        ] {
            let c = parse(&["--ingest-threads", arg]).unwrap();
            assert_eq!(c.runtime.ingest, want, "{arg}");
            assert!(c.to_toml().contains(toml), "{arg}");
        }
        assert_eq!(IngestThreads::Count(3).resolve(), 3);
        assert_eq!(IngestThreads::Shared.resolve(), 0);
        assert!(IngestThreads::PerCore.resolve() >= 1);
        for bad in ["-1", "1025", "two", ""] {
            let errs = parse(&[&format!("--ingest-threads={bad}")]).unwrap_err();
            assert!(
                errs.iter().any(|e| e.starts_with("--ingest-threads:")),
                "{bad}: {errs:?}"
            );
        }
        assert!(c.to_toml().contains("io_pace = \"0.5ms\""));
        for us in [0, 1, 10, 100, 300, 999, 1000, 1250, 10_000] {
            let d = Duration::from_micros(us);
            assert_eq!(parse_duration(&fractional_ms(d)), Ok(d), "{us} µs");
        }
        let errs = parse(&["--worker-threads", "0", "--io-pace", "20ms"]).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(parse(&["--io-pace", "0.0001ms"]).is_err(), "below 1µs");
        assert!(parse(&["--io-pace", "0.0019ms"]).is_err(), "not whole µs");
        assert!(
            errs.iter().any(|e| e.contains("--worker-threads")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.contains("--io-pace")), "{errs:?}");
    }

    #[test]
    fn public_url_path_must_match_ws_path() {
        let errs = parse(&["--public-url", "wss://gw.example.com/stream/"]).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("\"/stream/\"") && errs[0].contains("\"/stream\""),
            "{errs:?}"
        );
        assert!(parse(&["--public-url", "wss://gw.example.com/stream"]).is_ok());
        assert!(parse(&[
            "--public-url",
            "wss://gw.example.com/other",
            "--ws-path",
            "/other"
        ])
        .is_ok());
    }

    #[test]
    fn window_must_fit_librdkafka_and_the_budget() {
        let errs = parse(&[
            "--max-inflight-bytes",
            "68719476736",
            "--kafka-window-bytes",
            "2147483648",
        ])
        .unwrap_err();
        assert!(errs[0].contains("--kafka-window-bytes"), "{errs:?}");
        let errs = parse(&[
            "--max-inflight-bytes",
            "8388608",
            "--kafka-window-bytes",
            "8388608",
        ])
        .unwrap_err();
        assert!(errs[0].contains("half"), "{errs:?}");
        // A 64 GiB budget is fine: the spool holds it, librdkafka only the window.
        let c = parse(&["--max-inflight-bytes", "68719476736"]).unwrap();
        assert_eq!(c.sink.window_bytes, 32 << 20);
        let p = c.sink.producer_config();
        assert!(
            p.get("queue.buffering.max.kbytes")
                .unwrap()
                .parse::<u64>()
                .unwrap()
                <= 2_097_151
        );
    }

    #[test]
    fn access_lists() {
        let c = parse(&[
            "--allow-cidr",
            "54.172.60.0/23",
            "--allow-cidr",
            "34.203.250.0/23",
            "--trusted-proxy",
            "10.0.0.0/8",
        ])
        .unwrap();
        assert_eq!(c.server.access.allow.len(), 2);
        assert_eq!(c.server.access.trusted_proxies.len(), 1);
        assert_eq!(c.server.access.max_handshakes_per_source, 256);
        assert!(parse(&["--allow-cidr", "10.0.0.0/40"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }
}
