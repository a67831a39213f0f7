//! Configuration: command-line flags, `GATEWAY_*` environment variables, an optional TOML file.
//!
//! Precedence: flag > environment > file > default. Everything is parsed and validated before
//! any socket is bound; every problem is reported at once and the process exits with code 64
//! (`EX_USAGE`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::session::AudioEncoding;

/// Exit code for bad configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Twilio Media Streams → Kafka gateway.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Cli {
    /// What to run (default: the gateway).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Gateway flags.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the effective configuration as TOML and exit.
    PrintConfig,
    /// Consume the gateway's topics and write one WAV per stream and track.
    Tap(crate::tap::TapArgs),
}

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
    /// librdkafka setting `key=value`, repeatable; applied over the gateway's defaults.
    #[arg(
        long = "kafka-option",
        env = "GATEWAY_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub kafka_option: Vec<String>,
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
    /// Fraction of the in-flight budget above which /readyz fails [default: 0.8].
    #[arg(long, env = "GATEWAY_READINESS_WATERMARK")]
    pub readiness_watermark: Option<f64>,
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
    frames_per_record: Option<u32>,
    audio_encoding: Option<String>,
    create_topics: Option<bool>,
    topic_partitions: Option<i32>,
    topic_replication: Option<i32>,
    gateway_id: Option<String>,
    max_message_bytes: Option<usize>,
    max_inflight_bytes: Option<u64>,
    overflow: Option<String>,
    readiness_watermark: Option<f64>,
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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stream listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// WebSocket path.
    pub ws_path: String,
    /// Max concurrent streams.
    pub max_streams: usize,
    /// Drain time after SIGTERM.
    pub drain_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// librdkafka overrides.
    pub kafka_options: Vec<(String, String)>,
    /// Chunks per record.
    pub frames_per_record: u32,
    /// Record value encoding.
    pub audio_encoding: AudioEncoding,
    /// Create missing topics.
    pub create_topics: bool,
    /// Partitions of created topics.
    pub topic_partitions: i32,
    /// Replication of created topics.
    pub topic_replication: i32,
    /// Instance id.
    pub gateway_id: String,
    /// WebSocket message cap.
    pub max_message_bytes: usize,
    /// In-flight audio budget.
    pub max_inflight_bytes: u64,
    /// Full-budget policy.
    pub overflow: crate::sink::OverflowPolicy,
    /// Fraction of the budget above which /readyz fails.
    pub readiness_watermark: f64,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Ping after quiet (None: off).
    pub ping_interval: Option<Duration>,
    /// Handshake timeout.
    pub handshake_timeout: Duration,
    /// HTTP head cap.
    pub max_header_bytes: usize,
    /// TLS, signatures, handshake caps, TwiML.
    pub security: crate::security::config::SecurityConfig,
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

fn default_gateway_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "gateway".to_owned()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
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
        let mut kafka_options: Vec<(String, String)> =
            file.kafka_options.unwrap_or_default().into_iter().collect();
        for kv in args.kafka_option {
            match kv.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    kafka_options.push((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => errors.push(format!("--kafka-option: {kv:?} must be key=value")),
            }
        }
        for (k, _) in &kafka_options {
            if k == "bootstrap.servers" {
                errors.push("--kafka-option: use --brokers instead of bootstrap.servers".into());
            }
        }
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
        if !(1024 * 1024..=64 * 1024 * 1024 * 1024).contains(&max_inflight_bytes) {
            errors.push(format!(
                "--max-inflight-bytes: {max_inflight_bytes} must be between 1 MiB and 64 GiB"
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
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            listen,
            admin_listen,
            brokers,
            topic_prefix,
            ws_path,
            max_streams,
            drain_timeout,
            log_format,
            log_level,
            kafka_options,
            frames_per_record,
            audio_encoding,
            create_topics,
            topic_partitions,
            topic_replication,
            gateway_id,
            max_message_bytes,
            max_inflight_bytes,
            overflow,
            readiness_watermark,
            idle_timeout,
            ping_interval,
            handshake_timeout,
            max_header_bytes,
            security,
        })
    }

    /// The effective configuration as TOML (for `print-config`).
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let enc = match self.audio_encoding {
            AudioEncoding::PcmS16le => "pcm",
            AudioEncoding::Mulaw => "mulaw",
        };
        let fmt = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let q = |v: &str| format!("{v:?}");
        let lines = [
            ("listen", q(&self.listen.to_string())),
            ("admin_listen", q(&self.admin_listen.to_string())),
            ("brokers", q(&self.brokers)),
            ("topic_prefix", q(&self.topic_prefix)),
            ("ws_path", q(&self.ws_path)),
            ("max_streams", self.max_streams.to_string()),
            (
                "drain_timeout",
                q(&format!("{}ms", self.drain_timeout.as_millis())),
            ),
            ("log_format", q(fmt)),
            ("log_level", q(&self.log_level)),
            ("frames_per_record", self.frames_per_record.to_string()),
            ("audio_encoding", q(enc)),
            ("create_topics", self.create_topics.to_string()),
            ("topic_partitions", self.topic_partitions.to_string()),
            ("topic_replication", self.topic_replication.to_string()),
            ("gateway_id", q(&self.gateway_id)),
            ("max_message_bytes", self.max_message_bytes.to_string()),
            ("max_inflight_bytes", self.max_inflight_bytes.to_string()),
            ("overflow", q(self.overflow.as_str())),
            ("readiness_watermark", self.readiness_watermark.to_string()),
            (
                "idle_timeout",
                q(&format!("{}ms", self.idle_timeout.as_millis())),
            ),
            (
                "ping_interval",
                q(&format!(
                    "{}ms",
                    self.ping_interval.map_or(0, |d| d.as_millis())
                )),
            ),
            (
                "handshake_timeout",
                q(&format!("{}ms", self.handshake_timeout.as_millis())),
            ),
            ("max_header_bytes", self.max_header_bytes.to_string()),
        ];
        for (k, v) in lines {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s.push_str(&self.security.to_toml());
        if !self.kafka_options.is_empty() {
            s.push_str("\n[kafka_options]\n");
            for (k, v) in &self.kafka_options {
                s.push_str(&format!("{:?} = {:?}\n", k, v));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, Vec<String>> {
        let mut v = vec!["gateway", "--insecure-skip-signature"];
        v.extend_from_slice(args);
        Config::from_args(Cli::try_parse_from(v).unwrap().run)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(c.brokers, "127.0.0.1:9092");
        assert_eq!(c.topic_prefix, "twilio");
        assert_eq!(c.ws_path, "/stream");
        assert_eq!(c.frames_per_record, 1);
        assert_eq!(c.audio_encoding, AudioEncoding::PcmS16le);
        assert!(c.create_topics);
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
        assert_eq!(c.topic_prefix, "fromfile");
        assert_eq!(c.frames_per_record, 2);
        assert!(!c.create_topics);
        assert_eq!(
            c.kafka_options,
            vec![("linger.ms".to_string(), "1".to_string())]
        );
        std::fs::write(&path, "unknown_key = 1\n").unwrap();
        assert!(parse(&["--config", path.to_str().unwrap()]).is_err());
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
