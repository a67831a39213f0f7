//! The admin listener, separate from the stream listener so it answers under load:
//! `/metrics` (Prometheus text), `/healthz` (process up), `/readyz` (brokers reachable, producer
//! healthy, in-flight audio under the watermark, not draining, under capacity).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::http_reply::{reply, Body};
use crate::server::ServerContext;
use crate::sink::probe::BrokerProbe;

/// Why `/readyz` fails, if it does.
pub fn readiness(ctx: &ServerContext) -> Result<(), &'static str> {
    if ctx.shutdown.is_draining() {
        return Err("draining");
    }
    if !ctx.sink.brokers_reachable() {
        return Err("brokers unreachable");
    }
    if !ctx.sink.producer_warm() {
        return Err("kafka producer starting (no broker connection or producer id yet)");
    }
    if !ctx.sink.producer_healthy() {
        return Err("kafka producer failed fatally and is being rebuilt");
    }
    if ctx.sink.over_watermark() {
        return Err("in-flight audio above the readiness watermark");
    }
    if ctx.open_streams() >= ctx.config.max_streams {
        return Err("at capacity");
    }
    Ok(())
}

async fn handle(
    ctx: Arc<ServerContext>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let metrics = &ctx.metrics;
    Ok(match req.uri().path() {
        "/metrics" => {
            // Read at the scrape from the bound itself: writers take bytes off it on every
            // frame, and updating the gauge there too would race the consumer's pushes.
            if let Some(p) = &ctx.playback {
                metrics.playback_queued_bytes.set(p.queued_bytes() as i64);
            }
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render(),
            )
        }
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

/// Probes the brokers every `every` on a blocking thread (a metadata request for one of our
/// topics), so readiness reflects the cluster.
pub async fn probe_brokers_forever(ctx: Arc<ServerContext>, probe: BrokerProbe, every: Duration) {
    let probe = Arc::new(probe);
    let mut was_ok = true;
    loop {
        let p = probe.clone();
        let ok = tokio::task::spawn_blocking(move || p.probe(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        ctx.sink.set_brokers_reachable(ok);
        ctx.metrics.ready.set(readiness(&ctx).is_ok() as i64);
        if ok != was_ok {
            if ok {
                tracing::info!("kafka brokers reachable again");
            } else {
                tracing::warn!("kafka brokers unreachable (metadata request failed)");
            }
            was_ok = ok;
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
