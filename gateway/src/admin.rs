//! The admin listener, separate from the stream listener so it answers under load:
//! `/metrics` (Prometheus text), `/healthz` (process up), `/readyz` (brokers reachable, not
//! draining, under capacity).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::server::ServerContext;

/// Why `/readyz` fails, if it does.
pub fn readiness(ctx: &ServerContext) -> Result<(), &'static str> {
    if ctx.shutdown.is_draining() {
        return Err("draining");
    }
    if !ctx.sink.brokers_reachable() {
        return Err("brokers unreachable");
    }
    if ctx.sink.over_watermark() {
        return Err("in-flight audio above the readiness watermark");
    }
    if ctx.open_streams() >= ctx.max_streams {
        return Err("at capacity");
    }
    Ok(())
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

async fn handle(
    ctx: Arc<ServerContext>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let metrics = ctx.sink.metrics();
    Ok(match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match readiness(&ctx) {
            Ok(()) => {
                metrics.ready.set(1);
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
            Err(why) => {
                metrics.ready.set(0);
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                )
            }
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Probes broker metadata every `every` on a blocking thread, so readiness reflects the cluster.
pub async fn probe_brokers_forever(ctx: Arc<ServerContext>, every: Duration) {
    loop {
        let sink = ctx.sink.clone();
        let ok = tokio::task::spawn_blocking(move || sink.probe_brokers(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        ctx.sink.metrics().ready.set(readiness(&ctx).is_ok() as i64);
        if !ok {
            tracing::warn!("kafka brokers unreachable (metadata request failed)");
        }
        tokio::time::sleep(every).await;
    }
}

/// Serves the admin endpoints forever.
pub async fn run(listener: TcpListener, ctx: Arc<ServerContext>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(ctx.clone(), req));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
