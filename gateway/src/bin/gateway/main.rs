//! The `gateway` binary: arguments, signals, exit codes. Everything else is
//! [`gateway::app::run`].
//!
//! Signals (installed before anything else, so none of them can kill the process by its
//! default action while it starts):
//! - SIGTERM / SIGINT: the first begins the drain (at any time, start-up included); the second
//!   skips the rest of the drain timeout and goes straight to closing streams and the final
//!   flush; later ones are logged and ignored.
//! - SIGHUP: reloads the TLS certificate when `--tls-cert` is set; otherwise it is logged and
//!   ignored. It never ends the process.
//!
//! Exit codes: 0 after a drain (or a shutdown requested during start-up), 64 for bad
//! configuration, 1 for a start-up failure.

mod tap;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gateway::app::{self, Listeners};
use gateway::config::{Config, LogFormat, RunArgs, EXIT_CONFIG};
use gateway::shutdown::Shutdown;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Twilio Media Streams → Kafka gateway.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
struct Cli {
    /// What to run (default: the gateway).
    #[command(subcommand)]
    command: Option<Command>,
    /// Gateway flags.
    #[command(flatten)]
    run: RunArgs,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Print the effective configuration as TOML (secrets redacted) and exit.
    PrintConfig,
    /// Consume the gateway's topics and write one WAV per stream and track.
    Tap(tap::TapArgs),
    /// List what a spool directory holds (what a restart would replay), one JSON object per
    /// record, then per segment, without changing it.
    SpoolInspect {
        /// The `--spool-dir` to read.
        dir: std::path::PathBuf,
    },
}

fn init_tracing(cfg: &Config) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cfg.log_level).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Turns signals into shutdown requests; see the module docs.
async fn handle_signals(shutdown: Arc<Shutdown>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will kill the process");
        return;
    };
    let mut terms = 0u32;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                shutdown.request_reload();
                continue;
            }
        };
        terms += 1;
        match terms {
            1 => {
                tracing::info!(
                    signal = name,
                    "draining (send it again to skip the drain timeout)"
                );
                shutdown.begin_drain();
            }
            2 => {
                tracing::warn!(
                    signal = name,
                    "second signal: closing every stream now and flushing"
                );
                shutdown.hurry();
            }
            _ => tracing::warn!(signal = name, "already shutting down; signal ignored"),
        }
    }
}

/// `gateway spool-inspect DIR`: records, then segments, then a summary line, as JSON lines
/// on stdout. Exit 1 when the directory cannot be read.
fn spool_inspect(dir: &std::path::Path) -> ExitCode {
    use std::io::Write;
    let found = match gateway::sink::spool::inspect::inspect(dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gateway spool-inspect: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in &found.records {
        let _ = serde_json::to_writer(&mut out, &serde_json::json!({ "record": r }));
        let _ = out.write_all(b"\n");
    }
    for s in &found.segments {
        let _ = serde_json::to_writer(&mut out, &serde_json::json!({ "segment": s }));
        let _ = out.write_all(b"\n");
    }
    let corrupt = found
        .segments
        .iter()
        .filter(|s| s.corrupt.is_some())
        .count();
    let _ = serde_json::to_writer(
        &mut out,
        &serde_json::json!({ "summary": {
            "segments": found.segments.len(),
            "corrupt_segments": corrupt,
            "records": found.records.len(),
            "other_files": found.other_files,
        }}),
    );
    let _ = out.write_all(b"\n");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    // The tap is a Kafka consumer: it needs none of the gateway's configuration.
    if let Some(Command::Tap(args)) = cli.command {
        return match tap::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gateway tap: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::SpoolInspect { dir }) = &cli.command {
        return spool_inspect(dir);
    }
    let cfg = match Config::from_args(cli.run) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("gateway: invalid configuration:");
            for e in errors {
                eprintln!("  - {e}");
            }
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if let Some(Command::PrintConfig) = cli.command {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing(&cfg);
    raise_nofile_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cfg.runtime.worker_threads {
        builder.worker_threads(n);
    }
    // With ingest threads the pace applies to them (app::run starts them), not to the shared
    // pool that then only accepts, answers the admin port and plays back.
    let ingest_threads = cfg.runtime.ingest.resolve();
    if !cfg.runtime.io_pace.is_zero() && ingest_threads == 0 {
        // Read coalescing (decision 38): the sleep happens only when a worker has run out of
        // tasks, so sockets that become readable meanwhile are all served after one wake-up.
        let pace = cfg.runtime.io_pace;
        builder.on_thread_park(move || std::thread::sleep(pace));
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        tokio::spawn(handle_signals(shutdown.clone()));
        let listeners = Listeners::bind(&cfg).await?;
        app::run(cfg, listeners, shutdown).await
    });
    // Whatever blocking work is still running (a metadata probe) gets a moment, not forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    match result {
        Ok(report) => {
            if !report.flush.complete && !report.stopped_during_startup {
                tracing::error!(
                    frames = report.flush.abandoned_frames,
                    events = report.flush.abandoned_events,
                    "exiting with records the final flush could not deliver (counted)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn raise_nofile_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
