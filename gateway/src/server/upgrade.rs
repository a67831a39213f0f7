//! The request handler of the stream listener.
//!
//! Checks happen **before** `fastwebsockets::upgrade` (which only validates the key and
//! version): client address behind a proxy (`403`), path (`404`), method and upgrade headers
//! (`426`/`400`), Twilio signature (`403`), draining and capacity (`503`, so Twilio fails over
//! with 31920 instead of us accepting audio we cannot carry). A `Semaphore` permit moved into
//! each connection task caps concurrent streams; the task is tracked so the drain can wait for
//! it to publish its tail and terminal event.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use fastwebsockets::{Role, WebSocket};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::{Client, ServerContext};
use crate::connection;
use crate::http_reply::{text, Body};
use crate::metrics::HttpRejection;
use crate::server::ingest::Placement;
use crate::sink::ConnectionPublisher;
use crate::twilio_http;
use crate::watchdog::{FrameCounter, FrameGate, Watchdog};

/// Answers one request on the stream listener.
pub async fn handle(
    ctx: Arc<ServerContext>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    client: Client,
    placement: Option<Placement>,
) -> Result<Response<Body>, Infallible> {
    let metrics = &ctx.metrics;
    // Behind a trusted HTTP proxy the allow-list applies to the forwarded client.
    if client == Client::Forwarded && ctx.access.has_allow_list() {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| ctx.access.forwarded_client(v));
        if !forwarded.is_some_and(|ip| ctx.access.allowed(ip)) {
            ctx.refuse(HttpRejection::NotAllowed, peer);
            return Ok(text(StatusCode::FORBIDDEN, "client not allowed\n"));
        }
    }
    if twilio_http::is_webhook_path(req.uri().path()) {
        return Ok(twilio_http::handle(&ctx, req, peer).await);
    }
    if req.uri().path() != ctx.config.ws_path {
        metrics.http_rejections[HttpRejection::NotFound].inc();
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::GET || !fastwebsockets::upgrade::is_upgrade_request(&req) {
        metrics.http_rejections[HttpRejection::NotWebsocket].inc();
        let mut r = text(StatusCode::UPGRADE_REQUIRED, "websocket upgrade required\n");
        r.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("websocket"),
        );
        return Ok(r);
    }
    // RFC 6455 §4.2.2: a version this server does not speak gets 426 naming the one it does
    // (fastwebsockets alone would answer 400). A missing header is a malformed request: 400
    // below.
    if let Some(v) = req.headers().get(hyper::header::SEC_WEBSOCKET_VERSION) {
        if v.as_bytes() != b"13" {
            metrics.http_rejections[HttpRejection::BadUpgrade].inc();
            tracing::debug!(%peer, version = ?v, "unsupported websocket version");
            let mut r = text(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported websocket version (13 only)\n",
            );
            r.headers_mut().insert(
                hyper::header::SEC_WEBSOCKET_VERSION,
                hyper::header::HeaderValue::from_static("13"),
            );
            // A 426 names the protocol to upgrade to (RFC 9110 §15.5.22).
            r.headers_mut().insert(
                hyper::header::UPGRADE,
                hyper::header::HeaderValue::from_static("websocket"),
            );
            return Ok(r);
        }
    }
    // RFC 6455 §4.1/§4.2.1: the opening handshake is HTTP/1.1 or later, and its key is a
    // base64-encoded 16-byte nonce (24 characters, two of them padding). fastwebsockets checks
    // neither; an HTTP/1.0 client would get a 101 it cannot use.
    if req.version() < hyper::Version::HTTP_11 || !valid_websocket_key(&req) {
        metrics.http_rejections[HttpRejection::BadUpgrade].inc();
        tracing::debug!(%peer, version = ?req.version(), "malformed websocket handshake");
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "bad websocket upgrade: HTTP/1.1 and a base64 16-byte Sec-WebSocket-Key required\n",
        ));
    }
    // Twilio signs the configured public wss:// URL; the request's own Host and path only
    // had to match the listener (the path check above).
    if let Some(validator) = &ctx.security.validator {
        let sig = req
            .headers()
            .get("x-twilio-signature")
            .map(|v| v.as_bytes());
        if let Err(why) = validator.verify(sig, &ctx.security.stream_urls, b"") {
            twilio_http::signature_refused(&ctx, why, peer, ctx.config.ws_path.as_str());
            return Ok(text(StatusCode::FORBIDDEN, "invalid signature\n"));
        }
    }
    if ctx.shutdown.is_draining() {
        metrics.http_rejections[HttpRejection::Draining].inc();
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
    }
    let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
        metrics.http_rejections[HttpRejection::Capacity].inc();
        tracing::warn!(%peer, max_streams = ctx.config.max_streams, "refused stream: at capacity");
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "at capacity\n"));
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            metrics.http_rejections[HttpRejection::BadUpgrade].inc();
            tracing::debug!(%peer, error = %e, "bad websocket upgrade");
            return Ok(text(StatusCode::BAD_REQUEST, "bad websocket upgrade\n"));
        }
    };
    let conn_id = ctx.next_conn_id();
    let guard = ctx.tasks.track();
    let ctx2 = ctx.clone();
    // On an ingest thread this stays on it (a current-thread runtime), and so does its count.
    tokio::spawn(async move {
        let _guard = guard;
        let _placement = placement;
        let _permit = permit; // released when the stream ends, on every path
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(conn_id, %peer, error = %e, "upgrade did not complete");
                return;
            }
        };
        // Re-wrap the upgraded socket with the watchdog (and the playback writer); the read
        // buffer is still empty here.
        // Activity is counted in complete frames (the connection counts them), not bytes.
        let frames = FrameCounter::default();
        let io = Watchdog::new(
            ws.into_inner(),
            ctx2.config.watchdog,
            ctx2.shutdown.force_close_flag(),
        )
        .with_frame_counter(frames.clone());
        tracing::debug!(conn_id, %peer, "websocket open");
        match &ctx2.playback {
            Some(playback) => {
                let (writer, downlink) = playback.downlink();
                // The playback writer writes frames between reads; the watchdog under it must
                // not put a ping inside one of them.
                let gate = FrameGate::default();
                let io = writer
                    .wrap(io.with_frame_gate(gate.clone()))
                    .with_frame_gate(gate);
                let ws = WebSocket::after_handshake(io, Role::Server);
                let publisher = ConnectionPublisher::with_downlink(ctx2.sink.clone(), downlink);
                connection::serve(ws, publisher, ctx2.config.connection, conn_id, frames).await;
            }
            None => {
                let ws = WebSocket::after_handshake(io, Role::Server);
                let publisher = ctx2.sink.publisher();
                connection::serve(ws, publisher, ctx2.config.connection, conn_id, frames).await;
            }
        }
    });
    Ok(response.map(|_| Body::default()))
}

/// Whether the request carries exactly one `Sec-WebSocket-Key` that is the base64 encoding of
/// 16 bytes (RFC 6455 §4.1: "a randomly selected 16-byte value that has been base64-encoded").
/// A missing key is left to fastwebsockets, which refuses it with the same 400.
fn valid_websocket_key<B>(req: &Request<B>) -> bool {
    let mut keys = req
        .headers()
        .get_all(hyper::header::SEC_WEBSOCKET_KEY)
        .iter();
    match (keys.next(), keys.next()) {
        (None, _) => true,
        (Some(k), None) => {
            let k = k.as_bytes();
            k.len() == 24
                && base64_simd::STANDARD
                    .decode_to_vec(k)
                    .is_ok_and(|raw| raw.len() == 16)
        }
        (Some(_), Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_keys(keys: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri("/stream");
        for k in keys {
            b = b.header(hyper::header::SEC_WEBSOCKET_KEY, *k);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_websocket_key_is_one_base64_16_byte_nonce() {
        // RFC 6455's example key, and a missing one (refused later by fastwebsockets).
        assert!(valid_websocket_key(&with_keys(&[
            "dGhlIHNhbXBsZSBub25jZQ=="
        ])));
        assert!(valid_websocket_key(&with_keys(&[])));
        for bad in [
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",    // unpadded
            "dGhlIHNhbXBsZSBub25jZQ==x", // trailing byte
            "dGhlIHNhbXBsZSBub25jZSE=",  // 17 bytes
            "dGhlIHNhbXBsZSBub25j!Q==",  // not base64
            "",
        ] {
            assert!(!valid_websocket_key(&with_keys(&[bad])), "{bad:?}");
        }
        assert!(!valid_websocket_key(&with_keys(&[
            "dGhlIHNhbXBsZSBub25jZQ==",
            "dGhlIHNhbXBsZSBub25jZQ=="
        ])));
    }
}
