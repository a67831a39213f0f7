//! Drain coordination for SIGTERM/SIGINT, and the tracker of tasks that publish.
//!
//! Phases (driven by [`crate::app`]): (1) [`Shutdown::begin_drain`]: the accept loop stops and
//! `/readyz` fails; live streams continue. (2) after `--drain-timeout`, or at once on a second
//! signal ([`Shutdown::hurry`]), [`Shutdown::force_close`]: every connection's
//! [`crate::watchdog`] sees the flag (checked on each read and on its periodic tick) and the
//! connection closes with 1001 after publishing its pending audio and terminal event; the app
//! waits for every tracked task ([`TaskTracker`]) to finish. (3) the final flush of the Kafka
//! path. The force-close flag is a plain atomic so the per-frame path pays one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Shared shutdown state; also carries reload requests (SIGHUP) from the binary to the app,
/// the other signal the process reacts to.
#[derive(Default)]
pub struct Shutdown {
    draining: AtomicBool,
    hurry: AtomicBool,
    force_close: Arc<AtomicBool>,
    notify: Notify,
    reload: Notify,
}

impl Shutdown {
    /// Fresh state (running).
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown::default())
    }

    /// Phase 1: stop accepting.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// True once draining began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves when draining begins.
    pub async fn drained(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }

    /// A second signal: skip what is left of the drain timeout and go to the final flush.
    pub fn hurry(&self) {
        self.hurry.store(true, Ordering::SeqCst);
        self.draining.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// True after [`Self::hurry`].
    pub fn is_hurried(&self) -> bool {
        self.hurry.load(Ordering::SeqCst)
    }

    /// Resolves when [`Self::hurry`] is called.
    pub async fn hurried(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_hurried() {
                return;
            }
            notified.await;
        }
    }

    /// Asks the app to reload what can be reloaded (the TLS certificate).
    pub fn request_reload(&self) {
        self.reload.notify_one();
    }

    /// Resolves at the next [`Self::request_reload`].
    pub async fn reload_requested(&self) {
        self.reload.notified().await
    }

    /// Phase 2: ask every open connection to close.
    pub fn force_close(&self) {
        self.force_close.store(true, Ordering::SeqCst);
    }

    /// The flag connections poll.
    pub fn force_close_flag(&self) -> Arc<AtomicBool> {
        self.force_close.clone()
    }
}

/// Counts live tasks that may still publish (handshakes, connections), so the drain can wait
/// for all of them before the final flush.
#[derive(Clone, Default)]
pub struct TaskTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Default)]
struct TrackerInner {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a tracked task; releases its count on every exit path.
pub struct TaskGuard {
    inner: Arc<TrackerInner>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.inner.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl TaskTracker {
    /// A new tracker.
    pub fn new() -> TaskTracker {
        TaskTracker::default()
    }

    /// Registers one task; keep the guard inside it.
    pub fn track(&self) -> TaskGuard {
        self.inner.live.fetch_add(1, Ordering::SeqCst);
        TaskGuard {
            inner: self.inner.clone(),
        }
    }

    /// Tasks still running.
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// Resolves once no tracked task is running.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn tracker_waits_for_every_guard() {
        let t = TaskTracker::new();
        let guards: Vec<_> = (0..3).map(|_| t.track()).collect();
        assert_eq!(t.live(), 3);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(guards);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
