//! Assembly and lifecycle: [`run`] wires the subsystems from a validated [`Config`], serves
//! until [`Shutdown`] says otherwise, then drains.
//!
//! The binary only parses arguments, binds [`Listeners`], turns signals into [`Shutdown`]
//! calls and exits with what [`run`] returns; tests call [`run`] in process with listeners on
//! port 0 and their own `Shutdown` (as in mini-redis and linkerd2-proxy).
//!
//! ## Lifecycle
//! 1. **Start**: metrics, the topic check (and creation), the Kafka path (producer + drain
//!    thread), the first broker probe, the admin listener. A shutdown request during these
//!    steps ends start-up cleanly (exit 0).
//! 2. **Serve** until draining begins (first SIGTERM/SIGINT).
//! 3. **Drain**: `/readyz` fails, no new streams; live streams get `--drain-timeout` to end by
//!    themselves (a second signal skips the rest of it); then every connection is told to
//!    close (1001) and the drain waits — without polling — until every connection task has
//!    published its tail and terminal event (bounded by the close grace); then the final
//!    flush of the Kafka path (`--flush-timeout`), which counts whatever it could not deliver.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::playback::Playback;
use crate::security::Security;
use crate::server::ingest::IngestPool;
use crate::server::ServerContext;
use crate::shutdown::Shutdown;
use crate::sink::drain::FinishReport;
use crate::sink::probe::BrokerProbe;
use crate::sink::topics::{ensure_topics, TopicPlan};
use crate::sink::{Sink, SinkError};
use crate::{admin, server};

/// Why the gateway stopped with an error.
#[derive(Debug, Error)]
pub enum AppError {
    /// Binding a listener failed.
    #[error("binding {what} {addr}: {source}")]
    Bind {
        /// `--listen` or `--admin-listen`.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Kafka path could not start.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::security::tls::TlsError),
    /// An ingest thread (`--ingest-threads`) could not start.
    #[error("starting ingest threads: {0}")]
    Ingest(std::io::Error),
}

/// The two listening sockets.
pub struct Listeners {
    /// The stream listener (`--listen`).
    pub stream: TcpListener,
    /// The admin listener (`--admin-listen`).
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `cfg`.
    pub async fn bind(cfg: &Config) -> Result<Listeners, AppError> {
        let stream = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| AppError::Bind {
                what: "--listen",
                addr: cfg.listen,
                source,
            })?;
        let admin = TcpListener::bind(cfg.admin_listen)
            .await
            .map_err(|source| AppError::Bind {
                what: "--admin-listen",
                addr: cfg.admin_listen,
                source,
            })?;
        Ok(Listeners { stream, admin })
    }
}

/// How the run ended (for the binary's exit and for tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Shutdown was requested before start-up finished.
    pub stopped_during_startup: bool,
    /// Connection tasks still running when the close grace expired.
    pub tasks_left: usize,
    /// The final flush.
    pub flush: FinishReport,
}

/// Runs the gateway until `shutdown` drains it; see the module docs.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: Arc<Shutdown>,
) -> Result<RunReport, AppError> {
    let metrics = Metrics::new(&cfg.sink.gateway_id);
    // What the runtime really has, not what was asked for (decision 38).
    metrics
        .runtime_workers
        .set(tokio::runtime::Handle::current().metrics().num_workers() as i64);
    metrics
        .runtime_io_pace_us
        .set(cfg.runtime.io_pace.as_micros() as i64);
    let security = Security::from_config(&cfg.security)?;

    // Start-up steps that wait on Kafka, abandoned cleanly if shutdown is requested meanwhile.
    // The topics are checked before the producer exists: a producer's topic handles would
    // otherwise let the broker auto-create them first.
    let startup = async {
        let mut topics = cfg.sink.topics().names();
        if cfg.playback.enabled {
            topics.push(cfg.playback.topic.clone());
        }
        let plan = TopicPlan {
            kafka: cfg.sink.kafka.clone(),
            topics,
            create: cfg.sink.create_topics,
            partitions: cfg.sink.topic_partitions,
            replication: cfg.sink.topic_replication,
        };
        ensure_topics(&plan, Duration::from_secs(15)).await?;
        let sink = Sink::start(&cfg.sink, metrics.clone())?;
        let probe = BrokerProbe::new(&cfg.sink.kafka, &cfg.sink.topics().names()[0])?;
        let (probe, ok) = tokio::task::spawn_blocking(move || {
            let ok = probe.probe(Duration::from_secs(5));
            (probe, ok)
        })
        .await
        .map_err(|e| SinkError::Client(e.to_string()))?;
        sink.set_brokers_reachable(ok);
        let playback = if cfg.playback.enabled {
            let kafka = cfg.sink.kafka.clone();
            let topic = cfg.playback.topic.clone();
            let count = tokio::task::spawn_blocking(move || {
                crate::sink::topics::partition_count(&kafka, &topic, Duration::from_secs(10))
            })
            .await
            .map_err(|e| SinkError::Client(e.to_string()))??;
            let owned = cfg
                .playback
                .partitions
                .resolve(count)
                .map_err(SinkError::Client)?;
            tracing::info!(topic = %cfg.playback.topic, partitions = ?owned, "playback: reading these partitions");
            Some(Playback::start(
                &cfg.playback,
                &cfg.sink.kafka,
                owned,
                metrics.clone(),
            )?)
        } else {
            None
        };
        Ok::<_, SinkError>((sink, probe, playback))
    };
    let (sink, probe, playback) = tokio::select! {
        r = startup => r?,
        _ = shutdown.drained() => {
            tracing::info!("shutdown requested during start-up: stopping");
            return Ok(RunReport { stopped_during_startup: true, ..Default::default() });
        }
    };
    let (playback, playback_consumer) = match playback {
        Some((p, c)) => (Some(p), Some(c)),
        None => (None, None),
    };
    let ingest = match cfg.runtime.ingest.resolve() {
        0 => None,
        n => Some(IngestPool::start(n, cfg.runtime.io_pace, &metrics).map_err(AppError::Ingest)?),
    };
    let ctx = ServerContext::new(
        sink.clone(),
        cfg.server.clone(),
        shutdown.clone(),
        security,
        playback,
        ingest,
    );
    let admin_task = tokio::spawn(admin::run(listeners.admin, ctx.clone()));
    let probe_task = tokio::spawn(admin::probe_brokers_forever(
        ctx.clone(),
        probe,
        Duration::from_secs(2),
    ));
    if let Some(tls) = &ctx.security.tls {
        tls.spawn_watcher(Duration::from_secs(2));
    }
    let reload_task = {
        let (tls, shutdown) = (ctx.security.tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                shutdown.reload_requested().await;
                match &tls {
                    Some(t) => {
                        let _ = t.reload("SIGHUP");
                    }
                    None => tracing::info!("SIGHUP: no TLS certificate to reload; ignored"),
                }
            }
        })
    };
    ctx.security.log_startup(&cfg.security);
    tracing::info!(
        listen = %listeners.stream.local_addr().map_or(cfg.listen, |a| a),
        admin = %cfg.admin_listen, ws_path = %cfg.server.ws_path, brokers = %cfg.sink.kafka.brokers,
        topic_prefix = %cfg.sink.topic_prefix, gateway_id = %cfg.sink.gateway_id,
        frames_per_record = cfg.sink.frames_per_record, tls = ctx.security.mode(), "gateway ready"
    );

    server::run(listeners.stream, ctx.clone()).await;
    let report = drain(&cfg, &ctx, &shutdown, playback_consumer).await;
    probe_task.abort();
    reload_task.abort();
    admin_task.abort();
    Ok(report)
}

/// The drain after the accept loop stopped; see the module docs.
async fn drain(
    cfg: &Config,
    ctx: &Arc<ServerContext>,
    shutdown: &Shutdown,
    playback: Option<crate::playback::consumer::ConsumerHandle>,
) -> RunReport {
    ctx.metrics.draining.set(1);
    ctx.metrics.ready.set(0);
    let live = ctx.tasks.live();
    if live > 0 && !shutdown.is_hurried() {
        tracing::info!(live, timeout = ?cfg.drain.drain_timeout, "draining: live streams may finish");
        tokio::select! {
            _ = ctx.tasks.wait_idle() => {}
            _ = tokio::time::sleep(cfg.drain.drain_timeout) => {}
            _ = shutdown.hurried() => tracing::info!("second signal: closing streams now"),
        }
    }
    let mut tasks_left = ctx.tasks.live();
    if tasks_left > 0 {
        tracing::warn!(
            open = ctx.open_streams(),
            tasks = tasks_left,
            "closing remaining streams with 1001"
        );
        shutdown.force_close();
        // Each connection notices within a watchdog tick, publishes its tail and terminal
        // event, and spends at most ~2 s on its close handshake.
        if tokio::time::timeout(cfg.drain.close_grace, ctx.tasks.wait_idle())
            .await
            .is_err()
        {
            tasks_left = ctx.tasks.live();
            tracing::error!(tasks = tasks_left, "close grace expired with connection tasks still running; their last records may miss the final flush");
        } else {
            tasks_left = 0;
        }
    }
    if let Some(p) = playback {
        // No stream is left to play into.
        tokio::task::spawn_blocking(move || p.stop()).await.ok();
    }
    tracing::info!(
        queued = ctx.sink.budget().used(),
        "final flush of the Kafka path"
    );
    let flush = finish(&ctx.sink, cfg.drain.flush_timeout).await;
    if ctx.ingest.is_some() {
        // Every connection task has ended (or the close grace gave up on it).
        let ctx = ctx.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(pool) = &ctx.ingest {
                pool.stop();
            }
        })
        .await
        .ok();
    }
    if flush.complete {
        tracing::info!("shutdown complete: every accepted record acknowledged or counted");
    }
    RunReport {
        stopped_during_startup: false,
        tasks_left,
        flush,
    }
}

async fn finish(sink: &Sink, timeout: Duration) -> FinishReport {
    let sink = sink.clone();
    tokio::task::spawn_blocking(move || sink.finish(timeout))
        .await
        .unwrap_or_default()
}
