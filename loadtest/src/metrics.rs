//! Scraping the gateway's Prometheus endpoint.
//!
//! One plain HTTP/1.1 GET per sample on a fresh connection (samples are seconds apart), and
//! a minimal text-format reader for single unlabelled gauges such as
//! `process_resident_memory_bytes`.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Only `http://host:port/path` is supported.
    #[error("bad metrics url {0}")]
    Url(String),
    /// Network or HTTP failure.
    #[error("scrape: {0}")]
    Http(String),
    /// The metric is not in the response.
    #[error("metric {0} not found")]
    Missing(String),
}

/// Fetches `url` and returns the body as text, within `timeout`.
pub async fn fetch(url: &str, timeout: Duration) -> Result<String, ScrapeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ScrapeError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| ScrapeError::Http(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ScrapeError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(path)
            .header("host", authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| ScrapeError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ScrapeError::Http(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(ScrapeError::Http(format!("HTTP {}", resp.status())));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ScrapeError::Http(e.to_string()))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ScrapeError::Http("timeout".into()))?
}

/// Value of the first sample of metric `name` in Prometheus text format.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = if let Some(r) = rest.strip_prefix('{') {
            &r[r.find('}')? + 1..]
        } else {
            rest
        };
        if !rest.starts_with(' ') {
            return None; // a longer metric name sharing the prefix
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Scrapes `url` and returns `process_resident_memory_bytes`.
pub async fn gateway_rss(url: &str) -> Result<f64, ScrapeError> {
    let text = fetch(url, Duration::from_secs(5)).await?;
    metric_value(&text, "process_resident_memory_bytes")
        .ok_or_else(|| ScrapeError::Missing("process_resident_memory_bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gauges() {
        let text = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes_total 1\n\
                    process_resident_memory_bytes 1.2345e7\n\
                    gateway_streams{state=\"open\"} 42\n";
        assert_eq!(
            metric_value(text, "process_resident_memory_bytes"),
            Some(12_345_000.0)
        );
        assert_eq!(metric_value(text, "gateway_streams"), Some(42.0));
        assert_eq!(metric_value(text, "nope"), None);
    }
}
