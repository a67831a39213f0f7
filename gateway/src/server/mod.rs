//! The stream listener: accept TCP, speak HTTP/1.1 with hyper, check the request, upgrade to
//! WebSocket, and spawn one [`crate::connection`] task per stream.
//!
//! Checks happen **before** `fastwebsockets::upgrade` (which only validates the key and
//! version): path (`404`), method and upgrade headers (`400`/`426`), Twilio signature (`403`,
//! see [`crate::security`]), draining and capacity
//! (`503`, so Twilio fails over with 31920 instead of us accepting audio we cannot carry). A
//! `Semaphore` permit moved into each connection task caps concurrent streams. Connection errors
//! are logged inside their task and never reach the accept loop. Below hyper the socket is
//! plain TCP or a rustls stream (`--tls-cert`); `/twilio/*` requests go to
//! [`crate::security::webhook`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::connection::{self, ConnectionConfig};
use crate::security::limits::TokenBucket;
use crate::security::{webhook, Security};
use crate::shutdown::Shutdown;
use crate::sink::Sink;
use crate::watchdog::{Watchdog, WatchdogConfig};

/// Everything the listener needs; shared by all connections.
pub struct ServerContext {
    /// Kafka sink handle (cloned into each stream).
    pub sink: Sink,
    /// Per-connection settings.
    pub connection: ConnectionConfig,
    /// Idle/ping settings applied after the upgrade.
    pub watchdog: WatchdogConfig,
    /// The WebSocket path (e.g. `/stream`).
    pub ws_path: String,
    /// Permits = `--max-streams`.
    pub permits: Arc<Semaphore>,
    /// `--max-streams`.
    pub max_streams: usize,
    /// Time allowed from accept to a complete request head.
    pub handshake_timeout: Duration,
    /// Cap on the HTTP request head (request line + headers).
    pub max_header_bytes: usize,
    /// Drain state.
    pub shutdown: Arc<Shutdown>,
    /// TLS, signature checks, Twilio endpoints, handshake caps.
    pub security: Security,
    next_conn_id: AtomicU64,
}

impl ServerContext {
    /// Bundles the server's shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sink: Sink,
        connection: ConnectionConfig,
        watchdog: WatchdogConfig,
        ws_path: String,
        max_streams: usize,
        handshake_timeout: Duration,
        max_header_bytes: usize,
        shutdown: Arc<Shutdown>,
        security: Security,
    ) -> Arc<Self> {
        Arc::new(ServerContext {
            sink,
            connection,
            watchdog,
            ws_path,
            permits: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            handshake_timeout,
            max_header_bytes,
            shutdown,
            security,
            next_conn_id: AtomicU64::new(1),
        })
    }

    /// Streams currently holding a permit.
    pub fn open_streams(&self) -> usize {
        self.max_streams - self.permits.available_permits()
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

async fn handle(
    ctx: Arc<ServerContext>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let metrics = ctx.sink.metrics();
    if webhook::is_webhook_path(req.uri().path()) {
        return Ok(webhook::handle(&ctx, req, peer).await);
    }
    if req.uri().path() != ctx.ws_path {
        metrics.http_rejected("not_found");
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::GET || !fastwebsockets::upgrade::is_upgrade_request(&req) {
        metrics.http_rejected("not_websocket");
        let mut r = text(StatusCode::UPGRADE_REQUIRED, "websocket upgrade required\n");
        r.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("websocket"),
        );
        return Ok(r);
    }
    // Twilio signs the configured public wss:// URL; the request's own Host and path only
    // had to match the listener (the path check above).
    if let Some(validator) = &ctx.security.validator {
        let sig = req
            .headers()
            .get("x-twilio-signature")
            .map(|v| v.as_bytes());
        if let Err(why) = validator.verify(sig, &ctx.security.stream_urls, b"") {
            metrics.signature_rejected(why.as_str());
            metrics.http_rejected("signature");
            tracing::warn!(%peer, reason = why.as_str(), "stream refused: bad Twilio signature");
            return Ok(text(StatusCode::FORBIDDEN, "invalid signature\n"));
        }
    }
    if ctx.shutdown.is_draining() {
        metrics.http_rejected("draining");
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
    }
    let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
        metrics.http_rejected("capacity");
        tracing::warn!(%peer, max_streams = ctx.max_streams, "refused stream: at capacity");
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "at capacity\n"));
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            metrics.http_rejected("bad_upgrade");
            tracing::debug!(%peer, error = %e, "bad websocket upgrade");
            return Ok(text(StatusCode::BAD_REQUEST, "bad websocket upgrade\n"));
        }
    };
    let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        let _permit = permit; // released when the stream ends, on every path
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(conn_id, %peer, error = %e, "upgrade did not complete");
                return;
            }
        };
        // Re-wrap the upgraded socket with the watchdog; the read buffer is still empty here.
        let io = Watchdog::new(
            ws.into_inner(),
            ctx2.watchdog,
            ctx2.shutdown.force_close_flag(),
        );
        let ws = WebSocket::after_handshake(io, Role::Server);
        tracing::debug!(conn_id, %peer, "websocket open");
        connection::serve(ws, ctx2.sink.clone(), ctx2.connection, conn_id).await;
    });
    Ok(response.map(|_| Full::new(Bytes::new())))
}

/// Serves HTTP/1.1 on `io` (plain TCP or TLS) until the upgrade or `budget` runs out.
async fn serve_http<I>(io: I, ctx: Arc<ServerContext>, peer: SocketAddr, budget: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| handle(svc_ctx.clone(), req, peer));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(budget)
        .max_buf_size(ctx.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    match tokio::time::timeout(budget, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http connection error"),
        Err(_) => tracing::debug!(%peer, "handshake timeout"),
    }
}

/// Accepts connections until draining begins. Returns then; open streams continue.
///
/// Before any TLS or HTTP work a connection must take a token from the
/// `--max-handshakes-per-second` bucket and a `--max-concurrent-handshakes` permit (held
/// until the upgrade or the end of the HTTP exchange); otherwise it is closed at once and
/// counted. With TLS, `--handshake-timeout` covers the TLS handshake and the request head.
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
        let metrics = ctx.sink.metrics();
        if let Some(bucket) = bucket.as_mut() {
            if !bucket.try_take(std::time::Instant::now()) {
                metrics.http_rejected("handshake_rate");
                tracing::debug!(%peer, "connection closed: --max-handshakes-per-second");
                continue;
            }
        }
        let Ok(handshake_permit) = ctx.security.handshakes.clone().try_acquire_owned() else {
            metrics.http_rejected("handshake_concurrency");
            tracing::debug!(%peer, "connection closed: --max-concurrent-handshakes");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _handshake_permit = handshake_permit;
            let budget = ctx.handshake_timeout;
            let Some(tls) = &ctx.security.tls else {
                serve_http(tcp, ctx.clone(), peer, budget).await;
                return;
            };
            let started = std::time::Instant::now();
            match tokio::time::timeout(budget, tls.acceptor().accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let left = budget.saturating_sub(started.elapsed());
                    serve_http(stream, ctx.clone(), peer, left).await;
                }
                Ok(Err(e)) => {
                    ctx.sink.metrics().http_rejected("tls_handshake");
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    ctx.sink.metrics().http_rejected("tls_handshake");
                    tracing::debug!(%peer, "TLS handshake timeout");
                }
            }
        });
    }
    tracing::info!("stopped accepting new streams");
}
