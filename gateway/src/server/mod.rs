//! The stream listener: accept TCP, apply the connection limits, read an optional PROXY header,
//! terminate TLS, speak HTTP/1.1 with hyper, and hand upgraded WebSockets to
//! [`crate::connection`].
//!
//! - [`access`]: `--allow-cidr`, `--trusted-proxy`, `--max-handshakes-per-source`.
//! - [`proxy_protocol`]: PROXY v1/v2 from trusted proxies.
//! - [`ingest`]: `--ingest-threads`: the thread-per-core runtimes connections may run on.
//! - [`upgrade`]: the request handler: path, signature, draining and capacity checks *before*
//!   the WebSocket upgrade; `/twilio/*` goes to [`crate::twilio_http`].
//!
//! Every refusal is counted in `gateway_http_rejections_total{reason}`, including the ones
//! hyper answers itself (431 for an oversized head) and handshakes that time out. Connection
//! errors are logged inside their task and never reach the accept loop.

pub mod access;
pub mod ingest;
pub mod proxy_protocol;
pub mod upgrade;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use self::access::{AccessControl, SourcePermit};
use self::ingest::Placement;
use self::proxy_protocol::{Prefixed, ProxyHeader};
use crate::connection::ConnectionConfig;
use crate::log_limit::LogLimiter;
use crate::metrics::{HttpRejection, LogSite, Metrics};
use crate::security::limits::TokenBucket;
use crate::security::Security;
use crate::shutdown::{Shutdown, TaskTracker};
use crate::sink::Sink;
use crate::watchdog::WatchdogConfig;

static REFUSED_LOG: LogLimiter = LogLimiter::new(LogSite::Refused, 10, 10_000);

/// Settings of the stream listener (validated by `config`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The WebSocket path (e.g. `/stream`).
    pub ws_path: String,
    /// `--max-streams`.
    pub max_streams: usize,
    /// Time from accept to a complete request head (TLS and PROXY header included).
    pub handshake_timeout: Duration,
    /// Cap on the HTTP request head.
    pub max_header_bytes: usize,
    /// Per-connection settings.
    pub connection: ConnectionConfig,
    /// Idle/ping settings applied after the upgrade.
    pub watchdog: WatchdogConfig,
    /// Who may connect.
    pub access: access::AccessConfig,
}

/// Everything the listener needs; shared by all connections.
pub struct ServerContext {
    /// Kafka sink handle (cloned into each stream).
    pub sink: Sink,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Listener settings.
    pub config: ServerConfig,
    /// Permits = `--max-streams`.
    pub permits: Arc<Semaphore>,
    /// Drain state.
    pub shutdown: Arc<Shutdown>,
    /// TLS, signature checks, Twilio endpoints, handshake caps.
    pub security: Security,
    /// Allow-list, trusted proxies, per-source caps.
    pub access: Arc<AccessControl>,
    /// Handshake and connection tasks, awaited by the drain.
    pub tasks: TaskTracker,
    /// Bidirectional streams: the playback downlink (`None` with `--playback=false`).
    pub playback: Option<crate::playback::Playback>,
    /// Thread-per-core ingest (`None`: connections run on the shared runtime).
    pub ingest: Option<ingest::IngestPool>,
    next_conn_id: AtomicU64,
}

impl ServerContext {
    /// Bundles the server's shared state.
    pub fn new(
        sink: Sink,
        config: ServerConfig,
        shutdown: Arc<Shutdown>,
        security: Security,
        playback: Option<crate::playback::Playback>,
        ingest: Option<ingest::IngestPool>,
    ) -> Arc<Self> {
        Arc::new(ServerContext {
            playback,
            ingest,
            metrics: sink.metrics().clone(),
            sink,
            permits: Arc::new(Semaphore::new(config.max_streams)),
            access: AccessControl::new(config.access.clone()),
            config,
            shutdown,
            security,
            tasks: TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
        })
    }

    /// Streams currently holding a permit.
    pub fn open_streams(&self) -> usize {
        self.config.max_streams - self.permits.available_permits()
    }

    /// The next connection id (for logs).
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a refusal and logs it (rate-limited).
    pub fn refuse(&self, reason: HttpRejection, peer: SocketAddr) {
        self.metrics.http_rejections[reason].inc();
        if let Some(suppressed) = REFUSED_LOG.check(&self.metrics) {
            tracing::debug!(%peer, reason = reason.as_str(), suppressed, "connection refused");
        }
    }
}

/// Who the client is, as far as the connection layer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// The TCP peer, or the address a trusted proxy's PROXY header gave.
    Known(IpAddr),
    /// A trusted proxy without a PROXY header: `X-Forwarded-For` names the client.
    Forwarded,
}

/// Accepts connections until draining begins. Returns then; open streams continue.
///
/// Before any TLS or HTTP work a connection must take a token from the
/// `--max-handshakes-per-second` bucket, pass the allow-list and take a per-source and a
/// global handshake permit (held until the upgrade or the end of the HTTP exchange); otherwise
/// it is closed at once and counted.
pub async fn run(listener: TcpListener, ctx: Arc<ServerContext>) {
    let mut bucket = TokenBucket::new(
        ctx.security.handshakes_per_second,
        std::time::Instant::now(),
    );
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.drained() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if let Some(bucket) = bucket.as_mut() {
            if !bucket.try_take(std::time::Instant::now()) {
                ctx.refuse(HttpRejection::HandshakeRate, peer);
                continue;
            }
        }
        let trusted = ctx.access.is_trusted_proxy(peer.ip());
        let source_permit = if trusted {
            None // checked once the PROXY header names the client
        } else {
            if !ctx.access.allowed(peer.ip()) {
                ctx.refuse(HttpRejection::NotAllowed, peer);
                continue;
            }
            match ctx.access.source_permit(peer.ip()) {
                Some(p) => Some(p),
                None => {
                    ctx.refuse(HttpRejection::SourceConcurrency, peer);
                    continue;
                }
            }
        };
        let Ok(handshake_permit) = ctx.security.handshakes.clone().try_acquire_owned() else {
            ctx.refuse(HttpRejection::HandshakeConcurrency, peer);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let guard = ctx.tasks.track();
        let Some(pool) = &ctx.ingest else {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let _handshake_permit = handshake_permit;
                let conn = Conn {
                    peer,
                    trusted,
                    placement: None,
                };
                handshake(ctx, tcp, conn, source_permit).await;
            });
            continue;
        };
        // Thread-per-core: the socket moves to the ingest thread's reactor, where the whole
        // connection runs.
        let tcp = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand the connection to an ingest thread");
                continue;
            }
        };
        let task_ctx = ctx.clone();
        pool.spawn(move |placement| async move {
            let _guard = guard;
            let _handshake_permit = handshake_permit;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => {
                    let conn = Conn {
                        peer,
                        trusted,
                        placement: Some(placement),
                    };
                    handshake(task_ctx, tcp, conn, source_permit).await
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "ingest thread cannot register the connection")
                }
            }
        });
    }
    tracing::info!("stopped accepting new streams");
}

/// What the accept loop knows about a connection.
struct Conn {
    peer: SocketAddr,
    /// The peer is a trusted proxy (a PROXY header may follow).
    trusted: bool,
    /// Its ingest thread's count (`None` on the shared pool); the upgraded stream keeps it.
    placement: Option<Placement>,
}

/// PROXY header (trusted proxies), TLS, then HTTP, all within `--handshake-timeout`.
async fn handshake(
    ctx: Arc<ServerContext>,
    tcp: TcpStream,
    conn: Conn,
    mut source_permit: Option<SourcePermit>,
) {
    let Conn {
        peer,
        trusted,
        placement,
    } = conn;
    let deadline = Instant::now() + ctx.config.handshake_timeout;
    let (client, io) = if trusted {
        match tokio::time::timeout_at(deadline, proxy_protocol::read_header(tcp)).await {
            Ok(Ok((ProxyHeader::Client(addr), io))) => {
                if !ctx.access.allowed(addr.ip()) {
                    ctx.refuse(HttpRejection::NotAllowed, addr);
                    return;
                }
                match ctx.access.source_permit(addr.ip()) {
                    Some(p) => source_permit = Some(p),
                    None => {
                        ctx.refuse(HttpRejection::SourceConcurrency, addr);
                        return;
                    }
                }
                (Client::Known(addr.ip()), io)
            }
            // The proxy's own health checks.
            Ok(Ok((ProxyHeader::Local, io))) => (Client::Known(peer.ip()), io),
            Ok(Ok((ProxyHeader::Absent, io))) => (Client::Forwarded, io),
            Ok(Err(e)) => {
                ctx.refuse(HttpRejection::ProxyProtocol, peer);
                tracing::debug!(%peer, error = %e, "bad PROXY header");
                return;
            }
            Err(_) => {
                ctx.refuse(HttpRejection::HandshakeTimeout, peer);
                return;
            }
        }
    } else {
        (Client::Known(peer.ip()), Prefixed::new(tcp))
    };
    let _source_permit = source_permit;
    let Some(tls) = &ctx.security.tls else {
        serve_http(io, ctx.clone(), peer, client, deadline, placement).await;
        return;
    };
    match tokio::time::timeout_at(deadline, tls.acceptor().accept(io)).await {
        Ok(Ok(stream)) => serve_http(stream, ctx.clone(), peer, client, deadline, placement).await,
        Ok(Err(e)) => {
            ctx.refuse(HttpRejection::TlsHandshake, peer);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => ctx.refuse(HttpRejection::HandshakeTimeout, peer),
    }
}

/// Serves HTTP/1.1 on `io` (plain or TLS) until the upgrade, the end of the exchange or the
/// deadline.
async fn serve_http<I>(
    io: I,
    ctx: Arc<ServerContext>,
    peer: SocketAddr,
    client: Client,
    deadline: Instant,
    placement: Option<Placement>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = Arc::new(AtomicBool::new(false));
    let svc_ctx = ctx.clone();
    let svc_served = served.clone();
    let svc = service_fn(move |req| {
        svc_served.store(true, Ordering::Relaxed);
        upgrade::handle(svc_ctx.clone(), req, peer, client, placement.clone())
    });
    let budget = deadline.saturating_duration_since(Instant::now());
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(budget)
        .max_buf_size(ctx.config.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    match tokio::time::timeout_at(deadline, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_parse_too_large() => ctx.refuse(HttpRejection::HeaderTooLarge, peer),
        // hyper answered 400 itself (a request line or head it could not parse, e.g. TLS
        // bytes on a plain listener): a refusal like any other, so counted.
        Ok(Err(e)) if e.is_parse() && !served.load(Ordering::Relaxed) => {
            ctx.refuse(HttpRejection::BadRequest, peer)
        }
        Ok(Err(e)) if e.is_timeout() && !served.load(Ordering::Relaxed) => {
            ctx.refuse(HttpRejection::HandshakeTimeout, peer)
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http connection error"),
        // A connection that completed requests and then idled is not a refused handshake.
        Err(_) if !served.load(Ordering::Relaxed) => {
            ctx.refuse(HttpRejection::HandshakeTimeout, peer)
        }
        Err(_) => {}
    }
}
