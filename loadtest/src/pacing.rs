//! Drift-free send schedule.
//!
//! Chunk `k` (from 0) of a stream is due at `start + k × 20 ms / speed`, computed from the
//! start instant every time rather than by adding intervals, so timer lateness never
//! accumulates. Flood mode never waits.

use std::time::Duration;
use tokio::time::Instant;

/// Real-time duration of one chunk.
pub const CHUNK_PERIOD: Duration = Duration::from_millis(20);

/// When each chunk of one stream is due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Monotonic instant of chunk 0.
    start: Instant,
    /// Nanoseconds between chunks (20 ms divided by the speed factor).
    period_ns: f64,
    /// Send as fast as possible, ignoring the schedule.
    flood: bool,
}

impl Schedule {
    /// A schedule starting at `start`; `speed` > 1 compresses time (e.g. 10 = 10× real time).
    pub fn new(start: Instant, speed: f64, flood: bool) -> Self {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        Schedule {
            start,
            period_ns: CHUNK_PERIOD.as_nanos() as f64 / speed,
            flood,
        }
    }

    /// Instant of chunk 0.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Whether this schedule never waits.
    pub fn is_flood(&self) -> bool {
        self.flood
    }

    /// Offset of chunk `k` from the start.
    pub fn offset(&self, k: u64) -> Duration {
        Duration::from_nanos((k as f64 * self.period_ns).round() as u64)
    }

    /// Instant chunk `k` is due.
    pub fn due(&self, k: u64) -> Instant {
        self.start + self.offset(k)
    }

    /// Waits until chunk `k` is due (not at all in flood mode) and returns how late the
    /// caller is relative to the schedule (zero in flood mode).
    pub async fn wait(&self, k: u64) -> Duration {
        if self.flood {
            return Duration::ZERO;
        }
        let due = self.due(k);
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        Instant::now().saturating_duration_since(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_exact_multiples() {
        let s = Schedule::new(Instant::now(), 1.0, false);
        for k in [0u64, 1, 2, 3, 49, 50, 1000, 180_000, 3_600_000] {
            assert_eq!(s.offset(k), Duration::from_millis(20 * k), "k={k}");
            assert_eq!(s.due(k) - s.start(), Duration::from_millis(20 * k));
        }
    }

    #[test]
    fn speed_divides_period_without_drift() {
        let s = Schedule::new(Instant::now(), 10.0, false);
        assert_eq!(s.offset(1), Duration::from_millis(2));
        assert_eq!(s.offset(500_000), Duration::from_secs(1000));
        let s = Schedule::new(Instant::now(), 3.0, false);
        // 20/3 ms per chunk: after 3 million chunks exactly 20,000 s.
        assert_eq!(s.offset(3_000_000), Duration::from_secs(20_000));
    }

    #[test]
    fn bad_speed_falls_back_to_real_time() {
        for speed in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let s = Schedule::new(Instant::now(), speed, false);
            assert_eq!(s.offset(5), Duration::from_millis(100));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wait_keeps_to_schedule() {
        let start = Instant::now();
        let s = Schedule::new(start, 1.0, false);
        for k in 0..100 {
            let lag = s.wait(k).await;
            assert_eq!(lag, Duration::ZERO);
            assert_eq!(Instant::now() - start, Duration::from_millis(20 * k));
        }
        // A late caller is told how late it is and does not wait.
        tokio::time::advance(Duration::from_millis(35)).await;
        let lag = s.wait(100).await;
        // now = 99×20 + 35 = 2015 ms, chunk 100 was due at 2000 ms.
        assert_eq!(lag, Duration::from_millis(15));
    }

    #[tokio::test]
    async fn flood_never_waits() {
        let s = Schedule::new(Instant::now() + Duration::from_secs(3600), 1.0, true);
        assert_eq!(s.wait(1_000_000).await, Duration::ZERO);
    }
}
