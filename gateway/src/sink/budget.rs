//! The in-flight budget: one type for every byte of audio and events the gateway holds between
//! a socket read and a broker acknowledgement (`--max-inflight-bytes`).
//!
//! Two accounts, both in bytes:
//! - **queued**: records waiting in the gateway (the ingress channel and the spool's memory
//!   tier), charged at their compact size ([`crate::sink::record::compact_cost`]). Audio is
//!   admitted by [`Budget::try_admit`], a compare-and-swap loop, so concurrent connections can
//!   never push the account past its limit together; so are `dtmf` and `mark` events, which a
//!   peer can send at any rate; lifecycle events (`start`, terminal, capped `sequence_gap`)
//!   are charged unconditionally ([`Budget::charge`]) because losing a `stop` would hide a
//!   whole stream's accounting, and they are few per stream.
//! - **window**: records handed to librdkafka and not yet acknowledged, charged at what
//!   librdkafka really spends on them ([`crate::sink::record::window_cost`]). Only the drain
//!   thread moves records into the window, and never past `--kafka-window-bytes`.
//!
//! The limit of the queued account is the budget minus the window (the two never exceed the
//! budget together). `gateway_inflight_bytes` mirrors the sum; `/readyz` fails above
//! `--readiness-watermark` of the budget.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::IntGauge;

/// The process-wide budget (shared by every connection and the drain thread).
#[derive(Debug)]
pub struct Budget {
    queued: AtomicU64,
    window: AtomicU64,
    /// Admission limit of the queued account.
    queued_limit: u64,
    /// Extra room `--overflow drop-oldest` may borrow while the drain evicts old audio.
    overdraft: u64,
    /// Cap of the window account.
    window_limit: u64,
    /// `--max-inflight-bytes`.
    total: u64,
    /// Bytes above which `/readyz` fails.
    watermark: AtomicU64,
    gauge: IntGauge,
}

impl Budget {
    /// A budget of `total` bytes of which `window` may sit inside librdkafka. `gauge` mirrors
    /// the sum of both accounts.
    pub fn new(total: u64, window: u64, overdraft: u64, gauge: IntGauge) -> Budget {
        let window = window.min(total / 2);
        Budget {
            queued: AtomicU64::new(0),
            window: AtomicU64::new(0),
            queued_limit: total - window,
            overdraft,
            window_limit: window,
            total,
            watermark: AtomicU64::new(total / 5 * 4),
            gauge,
        }
    }

    fn mirror(&self) {
        self.gauge.set(self.used() as i64);
    }

    /// Admits `cost` bytes of audio into the queued account if they fit under its limit
    /// (plus the overdraft when `overdraft` is true). Never overshoots, whatever the
    /// concurrency.
    pub fn try_admit(&self, cost: u64, overdraft: bool) -> bool {
        let limit = self.queued_limit + if overdraft { self.overdraft } else { 0 };
        let mut cur = self.queued.load(Ordering::Relaxed);
        loop {
            let next = cur + cost;
            if next > limit {
                return false;
            }
            match self
                .queued
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.mirror();
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Charges `cost` to the queued account unconditionally (events).
    pub fn charge(&self, cost: u64) {
        self.queued.fetch_add(cost, Ordering::Relaxed);
        self.mirror();
    }

    /// Credits `cost` back to the queued account.
    pub fn credit(&self, cost: u64) {
        self.queued.fetch_sub(cost, Ordering::Relaxed);
        self.mirror();
    }

    /// Moves a record from the queued account (`queued_cost`) into the window
    /// (`window_cost`). The drain checks [`Self::window_has_room`] first.
    pub fn to_window(&self, queued_cost: u64, window_cost: u64) {
        self.queued.fetch_sub(queued_cost, Ordering::Relaxed);
        self.window.fetch_add(window_cost, Ordering::Relaxed);
    }

    /// Moves a record back from the window to the queued account (producer rebuilt).
    pub fn from_window(&self, window_cost: u64, queued_cost: u64) {
        self.window.fetch_sub(window_cost, Ordering::Relaxed);
        self.queued.fetch_add(queued_cost, Ordering::Relaxed);
    }

    /// Credits a record acknowledged (or failed) by librdkafka.
    pub fn window_done(&self, window_cost: u64) {
        self.window.fetch_sub(window_cost, Ordering::Relaxed);
    }

    /// Whether `cost` more bytes fit in the window. An empty window always takes one record,
    /// so a record larger than the window cannot wedge the drain.
    pub fn window_has_room(&self, cost: u64) -> bool {
        let w = self.window.load(Ordering::Relaxed);
        w == 0 || w + cost <= self.window_limit
    }

    /// Whether `cost` more bytes of *backlog* fit: replay may fill three quarters of the
    /// window, so the last quarter stays free for live streams (those with nothing spooled)
    /// while a backlog drains — replay never starves live audio.
    pub fn window_has_room_for_backlog(&self, cost: u64) -> bool {
        let w = self.window.load(Ordering::Relaxed);
        w == 0 || w + cost <= self.window_limit / 4 * 3
    }

    /// Refreshes the gauge (the drain calls this once per loop; window moves skip it).
    pub fn publish_gauge(&self) {
        self.mirror();
    }

    /// Bytes charged in both accounts.
    pub fn used(&self) -> u64 {
        self.queued.load(Ordering::Relaxed) + self.window.load(Ordering::Relaxed)
    }

    /// Bytes charged to the queued account.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Bytes charged to the window.
    pub fn window(&self) -> u64 {
        self.window.load(Ordering::Relaxed)
    }

    /// Admission limit of the queued account.
    pub fn queued_limit(&self) -> u64 {
        self.queued_limit
    }

    /// Cap of the window.
    pub fn window_limit(&self) -> u64 {
        self.window_limit
    }

    /// `--max-inflight-bytes`.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Sets the readiness watermark as a fraction of the budget.
    pub fn set_watermark(&self, fraction: f64) {
        self.watermark
            .store((self.total as f64 * fraction) as u64, Ordering::Relaxed);
    }

    /// True while the used bytes exceed the readiness watermark.
    pub fn over_watermark(&self) -> bool {
        self.used() > self.watermark.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn budget(total: u64, window: u64) -> Budget {
        Budget::new(total, window, 100, IntGauge::new("g", "g").unwrap())
    }

    #[test]
    fn admit_credit_window_and_watermark() {
        let b = budget(1000, 400);
        assert_eq!(b.queued_limit(), 600);
        assert!(b.try_admit(600, false));
        assert!(!b.try_admit(1, false));
        assert!(b.try_admit(100, true), "overdraft");
        assert!(!b.try_admit(1, true));
        b.credit(700);
        b.charge(50);
        assert_eq!(b.used(), 50);
        b.to_window(50, 300);
        assert_eq!((b.queued(), b.window()), (0, 300));
        assert!(b.window_has_room(100) && !b.window_has_room(101));
        b.set_watermark(0.25);
        assert!(b.over_watermark());
        b.window_done(300);
        assert!(!b.over_watermark());
        assert!(
            b.window_has_room(10_000),
            "an empty window takes any record"
        );
    }

    #[test]
    fn backlog_replay_leaves_a_quarter_of_the_window_to_live_streams() {
        let b = budget(1000, 400);
        b.charge(200);
        b.to_window(200, 200);
        assert!(
            b.window_has_room_for_backlog(100),
            "300 of 400: within three quarters"
        );
        assert!(!b.window_has_room_for_backlog(101));
        assert!(
            b.window_has_room(200),
            "live records may use the whole window"
        );
        b.window_done(200);
        assert!(
            b.window_has_room_for_backlog(10_000),
            "an empty window takes any record"
        );
    }

    #[test]
    fn concurrent_admission_never_overshoots() {
        let b = Arc::new(budget(1_000_000, 0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..100_000).filter(|_| b.try_admit(7, false)).count())
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted as u64, 1_000_000 / 7);
        assert!(b.queued() <= 1_000_000);
    }
}
