//! The socket side of playback: a wrapper under fastwebsockets that writes the stream's
//! downlink (media, mark and clear messages to Twilio) whenever the connection task polls the
//! socket, with no extra task and no lock.
//!
//! Why a wrapper: the connection task sits in `read_frame`, which is not cancel-safe, so it
//! cannot also wait on the downlink in `select!`. Instead every `poll_read` first moves the
//! downlink forward: it writes whatever frames are ready (server frames are unmasked, so a
//! complete frame is just a header and the JSON), registers the task's waker with the
//! downlink so the consumer's next push wakes it, and then reads as usual. Writes never block
//! reads: when the socket's send buffer is full the pending bytes wait and the uplink goes on
//! (a stuck peer costs its own downlink bound, nothing else). fastwebsockets' own writes (close,
//! pong) pass through `poll_write` only after a half-written downlink frame is finished, and
//! the watchdog below starts no keep-alive ping while one is (a shared
//! [`crate::watchdog::FrameGate`]), so frames never interleave. Once the stream has ended
//! (Twilio's `stop`, an error, a disconnect) nothing more is taken from the downlink; frames
//! already batched in `out` (≤ `WRITE_BATCH`, only when the socket was backed up) still go.
//!
//! What it sends, in the order the playback topic gave: `media` in 20 ms frames (160 μ-law
//! bytes; a record's final partial frame as is), `mark` after exactly the media before it, and
//! `clear` as soon as the consumer has read it (discarding everything queued before it). A
//! `stop` ends the read with [`StoppedByControl`] once everything before it is written.
//!
//! The played audio is also recorded: each frame becomes an outbound audio record (`source:
//! playback`) placed on the stream's timeline where Twilio will play it — playout starts when
//! media is sent while nothing is playing, advances in real time, and restarts at a clear.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::command::Command;
use super::downlink::{Bounds, Queued, SentMark, Shared};
use super::Attached;
use crate::metrics::{Metrics, PlaybackDrop};
use crate::watchdog::FrameGate;

/// μ-law bytes per 20 ms frame.
pub const FRAME_BYTES: usize = 160;
/// Frames are gathered into one write up to this many bytes.
const WRITE_BATCH: usize = 16 * 1024;

/// The read error that ends a stream on a `stop` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped by a playback stop record")]
pub struct StoppedByControl;

impl StoppedByControl {
    /// Whether `e` is this error.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref()
            .is_some_and(|inner| inner.downcast_ref::<StoppedByControl>().is_some())
    }
}

/// The media record being split into frames.
struct Current {
    bytes: Vec<u8>,
    pos: usize,
    produced_ms: i64,
    /// Where its first frame plays on the stream's timeline, ms.
    starts_ms: u64,
    /// Number (1-based) of its first frame among the stream's played frames.
    first_frame: u64,
}

/// The wrapper; see the module docs.
pub struct PlaybackIo<S> {
    inner: S,
    rx: Option<Receiver<Queued>>,
    shared: Arc<Shared>,
    bounds: Arc<Bounds>,
    /// Stream identity and recorder, once `start` arrived.
    attached: Arc<std::sync::OnceLock<Attached>>,
    metrics: Arc<Metrics>,
    seen_generation: u64,
    current: Option<Current>,
    out: Vec<u8>,
    out_pos: usize,
    json: Vec<u8>,
    need_flush: bool,
    stop: bool,
    /// Where (stream timeline, µs) the audio written so far ends playing at Twilio.
    playout_end_us: i64,
    /// Frames recorded so far (the `chunk` and `seq` of recorded playback).
    recorded: u64,
    /// Tells the watchdog below when part of a frame is on the wire (no ping then).
    gate: Option<FrameGate>,
}

impl<S> PlaybackIo<S> {
    /// Wraps `inner`; `rx` is the stream's downlink.
    pub(crate) fn new(
        inner: S,
        rx: Receiver<Queued>,
        shared: Arc<Shared>,
        bounds: Arc<Bounds>,
        attached: Arc<std::sync::OnceLock<Attached>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        PlaybackIo {
            inner,
            rx: Some(rx),
            shared,
            bounds,
            attached,
            metrics,
            seen_generation: 0,
            current: None,
            out: Vec::new(),
            out_pos: 0,
            json: Vec::new(),
            need_flush: false,
            stop: false,
            playout_end_us: i64::MIN,
            recorded: 0,
            gate: None,
        }
    }

    /// Shares `gate` with the watchdog under this writer (see [`FrameGate`]).
    pub fn with_frame_gate(mut self, gate: FrameGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Tells the gate whether bytes of `out` are on the wire while the rest are not.
    fn set_mid_frame(&self, mid: bool) {
        // A load per read; the store only when it changes.
        if let Some(g) = self.gate.as_ref().filter(|g| g.mid_frame() != mid) {
            g.set_mid_frame(mid);
        }
    }
}

/// Appends an unmasked text frame with `payload` to `out`.
fn push_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

impl<S: AsyncRead + AsyncWrite + Unpin> PlaybackIo<S> {
    /// Writes pending frame bytes. Ready(Ok) when none are left.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // `out` holds whole frames; once any of it is written the socket may end
                    // inside one, and nothing else may be written until it is finished.
                    self.set_mid_frame(self.out_pos != 0);
                    return Poll::Pending;
                }
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
            self.need_flush = true;
        }
        self.out.clear();
        self.out_pos = 0;
        self.set_mid_frame(false);
        if self.need_flush {
            // TLS buffers what it is given; push it out. Pending is fine: retried next poll.
            if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_flush(cx) {
                r?;
                self.need_flush = false;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Moves the downlink forward; see the module docs. `Err` ends the stream.
    fn drive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.shared.closed.load(Ordering::Relaxed) {
            // The stream ended (its terminal event is out): only write out the frames already
            // batched (at most 16 KiB; a half-written one must be finished).
            return match self.poll_out(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => Ok(()),
            };
        }
        if self.rx.is_none() && self.current.is_none() && self.out.is_empty() && !self.stop {
            return Ok(());
        }
        self.shared.waker.register(cx.waker());
        loop {
            match self.poll_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
            if self.stop {
                return Err(io::Error::other(StoppedByControl));
            }
            self.fill();
            if self.out.is_empty() && !self.stop {
                return Ok(());
            }
        }
    }

    /// Encodes ready frames into `out`, up to a batch.
    fn fill(&mut self) {
        // Runs on every read of every stream: borrow the stream's identity through a second
        // handle on its cell (one uncontended increment) instead of cloning it (its streamSid
        // `String` would be an allocation per read).
        let cell = Arc::clone(&self.attached);
        let Some(attached) = cell.get() else {
            return;
        };
        while self.out.len() < WRITE_BATCH && !self.stop {
            let generation = self.shared.clear_generation.load(Ordering::SeqCst);
            if generation != self.seen_generation {
                self.seen_generation = generation;
                self.clear(attached);
                continue;
            }
            if self.current.is_some() {
                self.media_frame(attached);
                continue;
            }
            let Some(rx) = &self.rx else { return };
            let q = match rx.try_recv() {
                Ok(q) => q,
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.rx = None;
                    return;
                }
            };
            let len = match &q.command {
                Command::Media(b) => b.len() as u64,
                _ => 0,
            };
            if len > 0 {
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.bounds.queued.fetch_sub(len, Ordering::Relaxed);
            }
            let stale = q.generation < self.seen_generation;
            if stale || !matches!(q.command, Command::Media(_)) {
                // Done with it here; a media record is done when written or cleared.
                self.shared
                    .counters
                    .finished
                    .fetch_add(1, Ordering::Relaxed);
            }
            match q.command {
                Command::Media(bytes) if stale => {
                    self.shared
                        .counters
                        .bytes_cleared
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                Command::Media(bytes) => {
                    self.current = Some(Current {
                        bytes,
                        pos: 0,
                        produced_ms: q.produced_ms,
                        starts_ms: 0,
                        first_frame: 0,
                    });
                }
                Command::Mark(name) if stale => attached.mark_discarded(&name),
                Command::Mark(name) => self.mark(attached, name),
                // Handled through the generation when it was bumped.
                Command::Clear => {}
                Command::Stop => self.stop = true,
            }
        }
    }

    fn now_on_timeline(&self) -> i64 {
        self.shared.timeline_now_us(crate::mono_micros())
    }

    fn clear(&mut self, attached: &Attached) {
        if let Some(cur) = self.current.take() {
            self.shared
                .counters
                .finished
                .fetch_add(1, Ordering::Relaxed);
            let left = (cur.bytes.len() - cur.pos) as u64;
            self.shared
                .counters
                .bytes_cleared
                .fetch_add(left, Ordering::Relaxed);
            // What of it was sent is what plays: record that part.
            Self::record(attached, &cur, cur.pos);
        }
        self.json.clear();
        self.json
            .extend_from_slice(br#"{"event":"clear","streamSid":""#);
        self.json.extend_from_slice(attached.stream_sid.as_bytes());
        self.json.extend_from_slice(br#""}"#);
        push_text_frame(&mut self.out, &self.json);
        self.shared
            .counters
            .clears_sent
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.playback_clears.inc();
        let now = self.now_on_timeline();
        if let Ok(mut l) = self.shared.marks.lock() {
            l.cleared(now);
        }
        // Twilio drops its buffer: playout restarts now.
        self.playout_end_us = now;
    }

    fn mark(&mut self, attached: &Attached, name: String) {
        self.json.clear();
        self.json
            .extend_from_slice(br#"{"event":"mark","streamSid":""#);
        self.json.extend_from_slice(attached.stream_sid.as_bytes());
        self.json.extend_from_slice(br#"","mark":{"name":"#);
        // Names are validated UTF-8; serde_json escapes them.
        let _ = serde_json::to_writer(&mut self.json, &name);
        self.json.extend_from_slice(b"}}");
        push_text_frame(&mut self.out, &self.json);
        self.shared
            .counters
            .marks_sent
            .fetch_add(1, Ordering::Relaxed);
        let due_us = self.playout_end_us.max(self.now_on_timeline());
        if let Ok(mut l) = self.shared.marks.lock() {
            l.sent(SentMark { name, due_us });
        }
    }

    fn media_frame(&mut self, attached: &Attached) {
        let now = self.now_on_timeline();
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        let first = cur.pos == 0;
        let end = (cur.pos + FRAME_BYTES).min(cur.bytes.len());
        let frame = &cur.bytes[cur.pos..end];
        self.json.clear();
        self.json
            .extend_from_slice(br#"{"event":"media","streamSid":""#);
        self.json.extend_from_slice(attached.stream_sid.as_bytes());
        self.json.extend_from_slice(br#"","media":{"payload":""#);
        let b64 = base64_simd::STANDARD;
        let at = self.json.len();
        self.json.resize(at + b64.encoded_length(frame.len()), 0);
        let _ = b64.encode(frame, base64_simd::Out::from_slice(&mut self.json[at..]));
        self.json.extend_from_slice(br#""}}"#);
        push_text_frame(&mut self.out, &self.json);
        // Where Twilio will play it: after what is still playing, or now.
        let start_us = self.playout_end_us.max(now);
        let dur_us = frame.len() as i64 * 125; // 8 samples per ms
        self.playout_end_us = start_us + dur_us;
        self.recorded += 1;
        if first {
            let lag_ms = crate::unix_micros() as i64 / 1000 - cur.produced_ms;
            self.metrics
                .playback_latency
                .observe(lag_ms.max(0) as f64 / 1000.0);
            // The record's frames play back to back from here (they are written together).
            cur.starts_ms = start_us.max(0) as u64 / 1000;
            cur.first_frame = self.recorded;
        }
        let c = &self.shared.counters;
        c.frames_sent.fetch_add(1, Ordering::Relaxed);
        c.media_bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.metrics.playback_bytes_sent.inc_by(frame.len() as u64);
        cur.pos = end;
        if cur.pos >= cur.bytes.len() {
            if let Some(done) = self.current.take() {
                c.finished.fetch_add(1, Ordering::Relaxed);
                Self::record(attached, &done, done.pos);
            }
        }
    }

    /// Records the first `sent` bytes of a playback record as one outbound audio record: its
    /// frames were written together, so they play contiguously from the first one's place.
    fn record(attached: &Attached, cur: &Current, sent: usize) {
        if sent > 0 {
            let frames = sent.div_ceil(FRAME_BYTES) as u32;
            attached.record(&cur.bytes[..sent], cur.starts_ms, cur.first_frame, frames);
        }
    }
}

impl<S> Drop for PlaybackIo<S> {
    fn drop(&mut self) {
        // Whatever is still queued for a stream that ended is dropped and counted.
        let mut left = 0u64;
        if let Some(rx) = &self.rx {
            for q in rx.try_iter() {
                if let Command::Media(b) = &q.command {
                    self.shared
                        .queued_bytes
                        .fetch_sub(b.len() as u64, Ordering::Relaxed);
                    self.bounds
                        .queued
                        .fetch_sub(b.len() as u64, Ordering::Relaxed);
                }
                left += 1;
            }
        }
        if self.current.take().is_some() {
            // Its frames already written are not recorded: the stream's terminal event is out,
            // and nothing of a stream is published after it (decision 45).
            left += 1;
        }
        self.shared
            .counters
            .finished
            .fetch_add(left, Ordering::Relaxed);
        for _ in 0..left {
            self.shared.counters.drop_one(PlaybackDrop::StreamClosed);
            self.metrics.playback_dropped[PlaybackDrop::StreamClosed].inc();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PlaybackIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.drive(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PlaybackIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_unmasked_text_with_the_right_length_encoding() {
        let mut out = Vec::new();
        push_text_frame(&mut out, &[b'a'; 125]);
        assert_eq!(&out[..2], &[0x81, 125]);
        out.clear();
        push_text_frame(&mut out, &[b'a'; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        assert_eq!(out.len(), 304);
        out.clear();
        push_text_frame(&mut out, &vec![b'a'; 70_000]);
        assert_eq!(&out[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(out[2..10].try_into().unwrap()), 70_000);
    }

    /// A peer that stops reading and sending while a playback frame is half written: the
    /// watchdog's keep-alive ping falls due, but it must follow the frame, not split it.
    #[tokio::test(start_paused = true)]
    async fn a_keepalive_ping_never_lands_inside_a_half_written_frame() {
        use crate::watchdog::{Watchdog, WatchdogConfig};
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::time::Duration;
        use tokio::io::AsyncReadExt;

        let (ours, mut peer) = tokio::io::duplex(64);
        let cfg = WatchdogConfig {
            idle_timeout: Duration::from_secs(60),
            ping_after: Some(Duration::from_millis(200)),
        };
        let gate = FrameGate::default();
        let dog = Watchdog::new(ours, cfg, Arc::new(AtomicBool::new(false)))
            .with_frame_gate(gate.clone());
        let (_tx, rx) = std::sync::mpsc::channel();
        let bounds = Arc::new(Bounds {
            per_stream: 1 << 20,
            total: 1 << 20,
            queued: AtomicU64::new(0),
        });
        let mut io = PlaybackIo::new(
            dog,
            rx,
            Arc::new(Shared::default()),
            bounds,
            Arc::new(std::sync::OnceLock::new()),
            Metrics::new("test"),
        )
        .with_frame_gate(gate);
        // One 1,000-byte text frame waiting to go out: 64 bytes fit before the pipe is full.
        let mut frame = Vec::new();
        push_text_frame(&mut frame, &[b'x'; 1000]);
        io.out.extend_from_slice(&frame);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = io.read(&mut buf).await;
        });
        // Quiet for well past `ping_after` (several watchdog ticks) with the frame stuck.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = vec![0u8; frame.len() + PING.len()];
        tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("frame and ping arrive once the peer reads")
            .unwrap();
        assert!(
            got[..frame.len()] == frame[..],
            "the frame arrives whole (a ping starts at byte {:?})",
            got.windows(2).position(|w| w == PING)
        );
        assert_eq!(&got[frame.len()..], &PING, "then the ping");
        reader.abort();
    }

    const PING: [u8; 2] = [0x89, 0x00];
}
