//! Drain coordination for SIGTERM/SIGINT.
//!
//! Phases: (1) `begin_drain`: the accept loop stops and `/readyz` fails; live streams continue.
//! (2) after `--drain-timeout`, `force_close`: every connection's [`crate::watchdog`] sees the
//! flag (checked on each read and on its periodic tick) and the connection closes with 1001
//! after flushing its pending audio. (3) the producer is flushed. The flag is a plain atomic so
//! the per-frame path pays one relaxed load, no lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Shared shutdown state.
#[derive(Default)]
pub struct Shutdown {
    draining: AtomicBool,
    force_close: Arc<AtomicBool>,
    notify: Notify,
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

    /// Resolves when draining begins (for the accept loop).
    pub async fn drained(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
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
