//! A socket wrapper that ends idle connections, keeps quiet ones alive with WebSocket pings,
//! and surfaces the forced-shutdown flag as a read error.
//!
//! Why a wrapper: `fastwebsockets::WebSocket::read_frame` is not cancel-safe, so it cannot be
//! raced against a timer in `select!` without risking a torn frame. Instead the wrapper owns one
//! timer per connection that ticks every `tick` (a fraction of the timeouts). Activity is a
//! counter (no clock read, no timer reset per frame): complete frames, counted by the
//! connection above in a shared [`FrameCounter`] (without one, reads that returned bytes); on
//! each tick the wrapper compares the counter with the previous tick to know whether the peer
//! was quiet. Counting frames rather than bytes means a peer trickling one frame a byte at a
//! time is quiet, so it cannot hold a stream slot past the idle timeout. After `ping_after` of
//! quiet it writes a WebSocket ping frame (`0x89 0x00`) itself; after `idle_timeout` of quiet
//! the next read fails with `TimedOut`. Writes of the WebSocket layer drain a half-written ping
//! first, so frames never interleave. A layer above that writes frames of its own between
//! reads (the playback writer) shares a [`FrameGate`]: while it is in the middle of a frame no
//! ping is started; the ping waits for the next tick.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Unmasked server-to-client ping with an empty payload.
const PING_FRAME: [u8; 2] = [0x89, 0x00];

/// Why the watchdog failed a read: carried inside the `io::Error` it returns, so the
/// connection tells these apart by type ([`WatchdogError::of`]), not by message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchdogError {
    /// No frame for `idle_timeout`.
    #[error("idle timeout")]
    Idle,
    /// The drain asked every connection to close.
    #[error("server shutting down")]
    Shutdown,
}

impl WatchdogError {
    fn into_io(self) -> io::Error {
        let kind = match self {
            WatchdogError::Idle => io::ErrorKind::TimedOut,
            WatchdogError::Shutdown => io::ErrorKind::Interrupted,
        };
        io::Error::new(kind, self)
    }

    /// The watchdog error inside `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<WatchdogError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<WatchdogError>())
            .copied()
    }
}

/// Watchdog settings.
#[derive(Debug, Clone, Copy)]
pub struct WatchdogConfig {
    /// Quiet time after which the connection is ended.
    pub idle_timeout: Duration,
    /// Quiet time after which a ping is sent (`None`: never).
    pub ping_after: Option<Duration>,
}

/// Set by a writer above the watchdog while the socket holds part of one of its frames, so a
/// ping written now would land inside that frame. One per connection; relaxed loads and
/// stores (the two layers run in the same task).
#[derive(Debug, Clone, Default)]
pub struct FrameGate(Arc<AtomicBool>);

impl FrameGate {
    /// Marks the writer as inside (`true`) or between (`false`) frames.
    pub fn set_mid_frame(&self, mid: bool) {
        self.0.store(mid, Ordering::Relaxed);
    }

    /// Whether the writer is inside a frame.
    pub fn mid_frame(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Complete WebSocket frames read by the connection above: with one shared, the watchdog
/// measures activity in frames, not bytes, so a peer that trickles one frame a byte at a time
/// (a slow-read hold of a stream slot) is idle and ends at `idle_timeout`. One writer (the
/// connection task) and one reader (the watchdog, same task): a relaxed load and store.
#[derive(Debug, Clone, Default)]
pub struct FrameCounter(Arc<AtomicU64>);

impl FrameCounter {
    /// Counts one complete frame.
    pub fn frame(&self) {
        let n = self.0.load(Ordering::Relaxed);
        self.0.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The wrapper; see the module docs.
pub struct Watchdog<S> {
    inner: S,
    /// Shared with a frame-writing layer above, if there is one.
    gate: Option<FrameGate>,
    /// Frames read above; `None`: any bytes read count as activity.
    frames: Option<FrameCounter>,
    timer: Pin<Box<Sleep>>,
    tick: Duration,
    cfg: WatchdogConfig,
    reads: u64,
    seen_activity: u64,
    last_activity: Instant,
    pinged: bool,
    /// Bytes of `PING_FRAME` still to write (0 = none pending).
    ping_pending: usize,
    force_close: Arc<AtomicBool>,
}

impl<S> Watchdog<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, cfg: WatchdogConfig, force_close: Arc<AtomicBool>) -> Self {
        let shortest = cfg
            .ping_after
            .map_or(cfg.idle_timeout, |p| p.min(cfg.idle_timeout));
        let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let now = Instant::now();
        Watchdog {
            inner,
            gate: None,
            frames: None,
            timer: Box::pin(tokio::time::sleep_until(now + tick)),
            tick,
            cfg,
            reads: 0,
            seen_activity: 0,
            last_activity: now,
            pinged: false,
            ping_pending: 0,
            force_close,
        }
    }
}

impl<S> Watchdog<S> {
    /// Holds pings back while the layer above is inside one of its frames.
    pub fn with_frame_gate(mut self, gate: FrameGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Measures activity in complete frames counted by the connection above (see
    /// [`FrameCounter`]) instead of bytes read.
    pub fn with_frame_counter(mut self, frames: FrameCounter) -> Self {
        self.frames = Some(frames);
        self
    }

    /// The activity measure compared between ticks.
    fn activity(&self) -> u64 {
        self.frames.as_ref().map_or(self.reads, FrameCounter::get)
    }

    fn writer_mid_frame(&self) -> bool {
        self.gate.as_ref().is_some_and(FrameGate::mid_frame)
    }
}

impl<S: AsyncWrite + Unpin> Watchdog<S> {
    /// Writes what is left of a pending ping. Ready(Ok) when nothing is pending.
    fn poll_ping(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.ping_pending > 0 {
            let from = PING_FRAME.len() - self.ping_pending;
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &PING_FRAME[from..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.ping_pending -= n;
            if self.ping_pending == 0 {
                // Push it through TLS buffers; Pending here is fine, later writes flush too.
                let _ = Pin::new(&mut self.inner).poll_flush(cx)?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watchdog<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.force_close.load(Ordering::Relaxed) {
            return Poll::Ready(Err(WatchdogError::Shutdown.into_io()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.reads += 1;
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if let Poll::Ready(Err(e)) = this.poll_ping(cx) {
            return Poll::Ready(Err(e));
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if this.force_close.load(Ordering::Relaxed) {
                return Poll::Ready(Err(WatchdogError::Shutdown.into_io()));
            }
            let activity = this.activity();
            if activity != this.seen_activity {
                this.seen_activity = activity;
                this.last_activity = now;
                this.pinged = false;
            }
            let quiet = now.saturating_duration_since(this.last_activity);
            if quiet >= this.cfg.idle_timeout {
                return Poll::Ready(Err(WatchdogError::Idle.into_io()));
            }
            if let Some(p) = this.cfg.ping_after {
                // Not while the writer above has half a frame on the wire: the ping would
                // split it. It goes out at a later tick, once that frame is finished.
                if quiet >= p && !this.pinged && this.ping_pending == 0 && !this.writer_mid_frame()
                {
                    this.pinged = true;
                    this.ping_pending = PING_FRAME.len();
                    if let Poll::Ready(Err(e)) = this.poll_ping(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
            let next = now + this.tick;
            this.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watchdog<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ping(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ping(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ping(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ping(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg(idle_ms: u64, ping_ms: Option<u64>) -> WatchdogConfig {
        WatchdogConfig {
            idle_timeout: Duration::from_millis(idle_ms),
            ping_after: ping_ms.map(Duration::from_millis),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pings_when_quiet_then_times_out() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Watchdog::new(a, cfg(1000, Some(300)), Arc::new(AtomicBool::new(false)));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let r = w.read(&mut buf).await;
            r.map_err(|e| (e.kind(), e.to_string()))
        });
        let mut got = [0u8; 2];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, PING_FRAME);
        let r = reader.await.unwrap();
        assert_eq!(
            r,
            Err((io::ErrorKind::TimedOut, "idle timeout".to_string()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn activity_defers_the_timeout_and_data_passes_through() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Watchdog::new(a, cfg(500, None), Arc::new(AtomicBool::new(false)));
        let writer = tokio::spawn(async move {
            for i in 0..10u8 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                b.write_all(&[i]).await.unwrap();
            }
            b
        });
        let mut got = Vec::new();
        for _ in 0..10 {
            let mut buf = [0u8; 1];
            w.read_exact(&mut buf).await.unwrap();
            got.push(buf[0]);
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        let _b = writer.await.unwrap();
        let mut buf = [0u8; 1];
        let e = w.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(WatchdogError::of(&e), Some(WatchdogError::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn force_close_flag_interrupts_a_blocked_read() {
        let (a, _b) = tokio::io::duplex(1024);
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = Watchdog::new(a, cfg(60_000, None), flag.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            w.read(&mut buf).await.map_err(|e| WatchdogError::of(&e))
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        flag.store(true, Ordering::SeqCst);
        assert_eq!(reader.await.unwrap(), Err(Some(WatchdogError::Shutdown)));
    }
}
