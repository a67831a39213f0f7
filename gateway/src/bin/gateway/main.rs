//! The `gateway` binary: parse and validate configuration, bind, serve, drain on SIGTERM.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use gateway::config::{Cli, Command, Config, LogFormat, EXIT_CONFIG};
use gateway::connection::ConnectionConfig;
use gateway::metrics::Metrics;
use gateway::security::Security;
use gateway::server::ServerContext;
use gateway::session::SessionConfig;
use gateway::shutdown::Shutdown;
use gateway::sink::{topics, Sink, SinkConfig};
use gateway::watchdog::WatchdogConfig;
use gateway::{admin, server};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        return match gateway::tap::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gateway tap: {e}");
                ExitCode::FAILURE
            }
        };
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received: draining"),
        _ = int.recv() => tracing::info!("SIGINT received: draining"),
    }
}

async fn run(cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    // Raise the open-file limit to the hard limit: each stream is a socket.
    raise_nofile_limit();
    let metrics = Metrics::new(&cfg.gateway_id);
    let sink_cfg = SinkConfig {
        brokers: cfg.brokers.clone(),
        topic_prefix: cfg.topic_prefix.clone(),
        gateway_id: cfg.gateway_id.clone(),
        max_inflight_bytes: cfg.max_inflight_bytes,
        frames_per_record: cfg.frames_per_record,
        overflow: cfg.overflow,
        kafka_options: cfg.kafka_options.clone(),
        create_topics: cfg.create_topics,
        topic_partitions: cfg.topic_partitions,
        topic_replication: cfg.topic_replication,
    };
    let sink = Sink::new(&sink_cfg, metrics.clone())?;
    sink.set_readiness_watermark(cfg.readiness_watermark);
    tokio::spawn(gateway::sink::drive(sink.clone(), Duration::from_millis(2)));
    topics::ensure_topics(&sink_cfg, Duration::from_secs(15)).await?;
    sink.probe_brokers(Duration::from_secs(5));

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("binding --listen {}: {e}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| format!("binding --admin-listen {}: {e}", cfg.admin_listen))?;
    let shutdown = Shutdown::new();
    let security = Security::from_config(&cfg.security)?;
    security.log_startup(&cfg.security);
    let tls_mode = security.mode();
    if let Some(tls) = &security.tls {
        tls.spawn_watcher(Duration::from_secs(2));
    }
    let ctx = ServerContext::new(
        sink.clone(),
        ConnectionConfig {
            session: SessionConfig {
                frames_per_record: cfg.frames_per_record,
                encoding: cfg.audio_encoding,
                max_payload_bytes: cfg.max_message_bytes,
                max_anomaly_events: 100,
            },
            max_message_bytes: cfg.max_message_bytes,
            stop_linger: Duration::from_secs(1),
        },
        WatchdogConfig {
            idle_timeout: cfg.idle_timeout,
            ping_after: cfg.ping_interval,
        },
        cfg.ws_path.clone(),
        cfg.max_streams,
        cfg.handshake_timeout,
        cfg.max_header_bytes,
        shutdown.clone(),
        security,
    );
    tokio::spawn(admin::run(admin_listener, ctx.clone()));
    tokio::spawn(admin::probe_brokers_forever(
        ctx.clone(),
        Duration::from_secs(2),
    ));
    tracing::info!(
        listen = %listener.local_addr()?, admin = %cfg.admin_listen, ws_path = %cfg.ws_path, brokers = %cfg.brokers,
        topic_prefix = %cfg.topic_prefix, gateway_id = %cfg.gateway_id, frames_per_record = cfg.frames_per_record,
        tls = tls_mode, "gateway ready"
    );
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            shutdown.begin_drain();
        });
    }
    server::run(listener, ctx.clone()).await;

    // Drain: readiness already fails (draining). Let live streams end on their own.
    metrics.draining.set(1);
    metrics.ready.set(0);
    let start = Instant::now();
    while ctx.open_streams() > 0 && start.elapsed() < cfg.drain_timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if ctx.open_streams() > 0 {
        tracing::warn!(
            open = ctx.open_streams(),
            "drain timeout: closing remaining streams with 1001"
        );
        shutdown.force_close();
        let forced = Instant::now();
        while ctx.open_streams() > 0 && forced.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let queued = sink.in_flight();
    tracing::info!(queued, "flushing kafka producer");
    let flush_sink = sink.clone();
    let flushed =
        tokio::task::spawn_blocking(move || flush_sink.flush(Duration::from_secs(30))).await?;
    match flushed {
        Ok(()) => tracing::info!("shutdown complete: every accepted frame acknowledged or counted"),
        Err(e) => tracing::error!(error = %e, "shutdown: producer flush incomplete"),
    }
    Ok(())
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
