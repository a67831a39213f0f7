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

/// A histogram's cumulative buckets as scraped: `(le, count)` in the order listed.
pub type Buckets = Vec<(f64, f64)>;

/// Cumulative buckets `(le, count)` of the unlabelled histogram `name`, in the order listed
/// (`le="+Inf"` is `f64::INFINITY`). Empty when the histogram is not in `text`.
pub fn histogram_buckets(text: &str, name: &str) -> Buckets {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest[rest.find('}')? + 1..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((le, count))
        })
        .collect()
}

/// The upper bound (`le`) of the bucket holding quantile `q` of the observations made between
/// two scrapes of one histogram (`before` may be empty: everything counts). `None` when no
/// observation was made in between. A `before` with other buckets, or with a count above
/// `after`'s (the process restarted), counts as empty: the new process's counts are all new.
pub fn quantile_bound(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let before = baseline(before, after);
    let delta = |i: usize| after[i].1 - before.get(i).map_or(0.0, |b| b.1);
    let total = delta(after.len().checked_sub(1)?);
    if total <= 0.0 {
        return None;
    }
    (0..after.len())
        .find(|&i| delta(i) >= q * total)
        .map(|i| after[i].0)
}

/// Observations between two scrapes of one histogram (its `+Inf` bucket's growth), with the
/// same restart rule as [`quantile_bound`].
pub fn count_between(before: &[(f64, f64)], after: &[(f64, f64)]) -> u64 {
    let before = baseline(before, after);
    after
        .last()
        .map_or(0.0, |a| a.1 - before.last().map_or(0.0, |b| b.1)) as u64
}

/// `before`, or nothing when it cannot be the earlier scrape of `after`'s histogram.
fn baseline<'a>(before: &'a [(f64, f64)], after: &[(f64, f64)]) -> &'a [(f64, f64)] {
    let comparable = before.len() == after.len()
        && before
            .iter()
            .zip(after)
            .all(|(b, a)| b.0 == a.0 && b.1 <= a.1);
    if comparable {
        before
    } else {
        &[]
    }
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

    #[test]
    fn histogram_quantile_bounds_between_two_scrapes() {
        let scrape = |a: u32, b: u32, c: u32| {
            format!(
                "# TYPE h histogram\nh_bucket{{le=\"0.01\"}} {a}\nh_bucket{{le=\"0.05\"}} {b}\n\
                 h_bucket{{le=\"+Inf\"}} {c}\nh_sum 1\nh_count {c}\nh2_bucket{{le=\"1\"}} 9\n"
            )
        };
        let first = histogram_buckets(&scrape(90, 99, 100), "h");
        assert_eq!(
            first,
            vec![(0.01, 90.0), (0.05, 99.0), (f64::INFINITY, 100.0)]
        );
        assert_eq!(quantile_bound(&[], &first, 0.5), Some(0.01));
        assert_eq!(quantile_bound(&[], &first, 0.99), Some(0.05));
        // Between the scrapes: 10 new observations, 2 ≤ 10 ms, 9 ≤ 50 ms, 1 above.
        let second = histogram_buckets(&scrape(92, 108, 110), "h");
        assert_eq!(quantile_bound(&first, &second, 0.5), Some(0.05));
        assert_eq!(quantile_bound(&first, &second, 0.99), Some(f64::INFINITY));
        assert_eq!(quantile_bound(&second, &second, 0.5), None);
        // A restart: counts went down, so everything in the new scrape is new.
        let restarted = histogram_buckets(&scrape(5, 5, 6), "h");
        assert_eq!(quantile_bound(&second, &restarted, 0.5), Some(0.01));
        assert_eq!(
            quantile_bound(&second, &restarted, 0.99),
            Some(f64::INFINITY)
        );
        assert_eq!(count_between(&first, &second), 10);
        assert_eq!(count_between(&second, &second), 0);
        assert_eq!(count_between(&second, &restarted), 6);
        assert_eq!(count_between(&[], &first), 100);
        assert!(histogram_buckets(&scrape(1, 2, 3), "nope").is_empty());
    }
}
