//! Rate limits for log lines that a flood of bad input or a broker outage could repeat per
//! record or per request.
//!
//! Each site has a static [`LogLimiter`]: at most `burst` lines per window; lines beyond it are
//! counted (`gateway_log_lines_suppressed_total{site}`) and the next line that is written says
//! how many were suppressed since the previous one. Lock-free: one atomic word packs the
//! window number and the count of lines written in it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{LogSite, Metrics};

const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// A per-site limiter; declare one `static` per log site.
#[derive(Debug)]
pub struct LogLimiter {
    site: LogSite,
    burst: u64,
    window_us: u64,
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// At most `burst` lines per `window_ms` for `site`.
    pub const fn new(site: LogSite, burst: u64, window_ms: u64) -> LogLimiter {
        LogLimiter {
            site,
            burst,
            window_us: window_ms * 1000,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed_before)` when a line may be written now (with the number of lines
    /// suppressed since the last written one), `None` when it must be dropped (and counted).
    pub fn check(&self, metrics: &Metrics) -> Option<u64> {
        self.check_at(crate::mono_micros(), metrics)
    }

    fn check_at(&self, now_us: u64, metrics: &Metrics) -> Option<u64> {
        // +1 so window 0 is distinguishable from the initial state.
        let window = now_us / self.window_us.max(1) + 1;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (w, n) = (cur >> COUNT_BITS, cur & COUNT_MASK);
            let next = if w != window {
                (window << COUNT_BITS) | 1
            } else if n < self.burst {
                cur + 1
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                metrics.log_suppressed[self.site].inc();
                return None;
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports_the_count() {
        let m = Metrics::new("t");
        let l = LogLimiter::new(LogSite::DeliveryFailed, 3, 1000);
        let t0 = 5_000_000;
        let allowed: Vec<_> = (0..10).map(|i| l.check_at(t0 + i, &m)).collect();
        assert_eq!(&allowed[..3], &[Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        assert_eq!(m.log_suppressed[LogSite::DeliveryFailed].get(), 7);
        // Next window: the first line carries the suppressed count.
        assert_eq!(l.check_at(t0 + 1_000_000, &m), Some(7));
        assert_eq!(l.check_at(t0 + 1_000_001, &m), Some(0));
    }
}
