//! Handshake rate limit: a token bucket owned by the accept loop (one task, so no lock).
//!
//! Capacity = one second's worth of tokens, refilled continuously. A connection that finds the
//! bucket empty is closed at once, before any TLS or HTTP work, and counted
//! (`gateway_http_rejections_total{reason="handshake_rate"}`). The concurrent-handshake cap is
//! a `Semaphore` in [`super::Security`].

use std::time::Instant;

/// Token bucket: `rate` tokens per second, at most `rate` stored.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` for `per_second == 0` (unlimited).
    pub fn new(per_second: u32, now: Instant) -> Option<TokenBucket> {
        (per_second > 0).then_some(TokenBucket {
            rate: per_second as f64,
            tokens: per_second as f64,
            last: now,
        })
    }

    /// Takes one token if available.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(0, t0).is_none());
        let mut b = TokenBucket::new(10, t0).unwrap();
        assert_eq!((0..20).filter(|_| b.try_take(t0)).count(), 10);
        assert!(!b.try_take(t0 + Duration::from_millis(50)));
        assert!(b.try_take(t0 + Duration::from_millis(150)));
        // A long quiet period refills to the burst size, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.try_take(later)).count(), 10);
    }
}
