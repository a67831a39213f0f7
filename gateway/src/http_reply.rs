//! The one HTTP reply helper of the stream and admin listeners: a status, a content type and a
//! body (`Full<Bytes>`), so every refusal looks the same on the wire.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

/// Response body type of every handler.
pub type Body = Full<Bytes>;

/// A response with `status`, `content_type` and `body`.
pub fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    reply(status, "text/plain", body)
}

/// A response without a body (e.g. 204).
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}
