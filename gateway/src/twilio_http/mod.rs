//! Twilio's HTTP endpoints on the stream listener.
//!
//! - `/twilio/status`: the `<Stream statusCallback>` receiver. Publishes one `status` record
//!   on `<prefix>.events` (key = `StreamSid`) and answers 204.
//! - `/twilio/voice`: answers the TwiML that starts a stream to `--public-url`
//!   ([`twiml`]).
//!
//! Both accept POST (`application/x-www-form-urlencoded`, Twilio's default) and GET (fields in
//! the query). Both are signed like any Twilio webhook: HMAC-SHA1 over the public URL of the
//! endpoint (`https://<host of --public-url>/twilio/...`, with `?query` for GET) followed by
//! the POST fields sorted by name. Refusals: 403 bad or missing signature, 400 malformed form,
//! 405 other methods, 413 body over 64 KiB, 415 other content types; each counted in
//! `gateway_http_rejections_total{reason}` (signatures also in
//! `gateway_signature_rejections_total{reason}`, logged at most 10 times per 10 s).

pub mod twiml;

use std::net::SocketAddr;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};

use crate::events::StatusFields;
use crate::http_reply::{empty, reply, text, Body};
use crate::log_limit::LogLimiter;
use crate::metrics::{HttpRejection, LogSite, SignatureRejection};
use crate::security::signature::webhook_suffix;
use crate::server::ServerContext;

static SIGNATURE_LOG: LogLimiter = LogLimiter::new(LogSite::Signature, 10, 10_000);

/// statusCallback path.
pub const STATUS_PATH: &str = "/twilio/status";
/// TwiML path.
pub const VOICE_PATH: &str = "/twilio/voice";
/// Cap on a webhook body (Twilio's are ~1 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Whether `path` is one of ours.
pub fn is_webhook_path(path: &str) -> bool {
    path == STATUS_PATH || path == VOICE_PATH
}

fn refuse(ctx: &ServerContext, status: StatusCode, reason: HttpRejection) -> Response<Body> {
    ctx.metrics.http_rejections[reason].inc();
    text(status, format!("{}\n", reason.as_str()))
}

/// Counts and logs (rate-limited) a refused signature on `path`.
pub fn signature_refused(
    ctx: &ServerContext,
    why: SignatureRejection,
    peer: SocketAddr,
    path: &str,
) {
    ctx.metrics.signature_rejections[why].inc();
    ctx.metrics.http_rejections[HttpRejection::Signature].inc();
    if let Some(suppressed) = SIGNATURE_LOG.check(&ctx.metrics) {
        tracing::warn!(%peer, path, reason = why.as_str(), suppressed, "request refused: bad Twilio signature");
    }
}

/// Decodes `application/x-www-form-urlencoded` (also a query string). `None` when a
/// percent-escape is invalid or a value is not UTF-8.
pub fn parse_form(input: &[u8]) -> Option<Vec<(String, String)>> {
    fn decode(s: &[u8]) -> Option<String> {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = s.get(i + 1..i + 3)?;
                    let hex = std::str::from_utf8(hex).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    }
    input
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Serves `/twilio/status` and `/twilio/voice` (the caller checked [`is_webhook_path`]).
pub async fn handle(
    ctx: &ServerContext,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = if req.uri().path() == STATUS_PATH {
        STATUS_PATH
    } else {
        VOICE_PATH
    };
    let sec = &ctx.security;
    if path == VOICE_PATH && sec.public_url.is_none() {
        tracing::debug!(%peer, "/twilio/voice needs --public-url");
        return refuse(ctx, StatusCode::NOT_FOUND, HttpRejection::NotFound);
    }
    let is_post = match *req.method() {
        Method::POST => true,
        Method::GET => false,
        _ => {
            return refuse(
                ctx,
                StatusCode::METHOD_NOT_ALLOWED,
                HttpRejection::MethodNotAllowed,
            )
        }
    };
    let query = req.uri().query().map(str::to_owned);
    let signature = req
        .headers()
        .get("x-twilio-signature")
        .map(|v| v.as_bytes().to_vec());
    let form_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });

    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(
                ctx,
                StatusCode::PAYLOAD_TOO_LARGE,
                HttpRejection::BodyTooLarge,
            )
        }
        Err(_) => return refuse(ctx, StatusCode::BAD_REQUEST, HttpRejection::BadRequest),
    };
    // Fields: the form body for POST, the query for GET.
    let fields = if is_post {
        if form_type == Some(false) || (form_type.is_none() && !body.is_empty()) {
            return refuse(
                ctx,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                HttpRejection::UnsupportedMediaType,
            );
        }
        parse_form(&body)
    } else {
        parse_form(query.as_deref().unwrap_or("").as_bytes())
    };
    let Some(fields) = fields else {
        return refuse(ctx, StatusCode::BAD_REQUEST, HttpRejection::BadRequest);
    };

    if let (Some(validator), Some(url)) = (&sec.validator, &sec.public_url) {
        let post_fields: &[(String, String)] = if is_post { &fields } else { &[] };
        let suffix = webhook_suffix(query.as_deref(), post_fields);
        if let Err(why) =
            validator.verify(signature.as_deref(), &url.webhook_candidates(path), &suffix)
        {
            signature_refused(ctx, why, peer, path);
            return text(StatusCode::FORBIDDEN, "signature\n");
        }
    }

    if path == STATUS_PATH {
        status(ctx, &fields, peer)
    } else {
        let url = sec.public_url.as_ref().expect("checked above");
        let xml = twiml::render(
            &sec.twiml,
            url.as_str(),
            &url.webhook_url(STATUS_PATH),
            &fields,
        );
        reply(StatusCode::OK, "text/xml", xml)
    }
}

/// Publishes the `status` record and answers 204.
fn status(ctx: &ServerContext, fields: &[(String, String)], peer: SocketAddr) -> Response<Body> {
    let Some(stream_sid) = field(fields, "StreamSid").filter(|s| !s.is_empty()) else {
        return refuse(ctx, StatusCode::BAD_REQUEST, HttpRejection::BadRequest);
    };
    let f = StatusFields {
        stream_sid,
        call_sid: field(fields, "CallSid"),
        account_sid: field(fields, "AccountSid"),
        stream_event: field(fields, "StreamEvent"),
        stream_error: field(fields, "StreamError"),
        stream_name: field(fields, "StreamName"),
        timestamp: field(fields, "Timestamp"),
    };
    tracing::info!(%peer, stream_sid, call_sid = f.call_sid.unwrap_or(""),
        stream_event = f.stream_event.unwrap_or(""),
        stream_error = f.stream_error.unwrap_or(""), "stream status callback");
    match ctx.sink.publish_status(&f) {
        Ok(()) => empty(StatusCode::NO_CONTENT),
        Err(e) => {
            tracing::warn!(stream_sid, error = %e, "status record not enqueued");
            text(StatusCode::SERVICE_UNAVAILABLE, "kafka unavailable\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let f = parse_form(b"A=1&B=a+b%26c%3D&C=&D&&E=%E2%82%AC").unwrap();
        let want: Vec<(String, String)> = [
            ("A", "1"),
            ("B", "a b&c="),
            ("C", ""),
            ("D", ""),
            ("E", "€"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(f, want);
        assert!(parse_form(b"A=%zz").is_none());
        assert!(parse_form(b"A=%4").is_none());
        assert!(parse_form(b"A=%ff").is_none());
        assert_eq!(parse_form(b"").unwrap(), vec![]);
    }
}
