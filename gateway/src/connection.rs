//! One task per stream: read WebSocket frames, feed the [`Session`], close with a specific code.
//!
//! The read loop never waits on Kafka: publishing is a non-blocking hand-off to the drain
//! thread. Frames are parsed in place from fastwebsockets' read buffer; fragmented messages are
//! reassembled into a per-connection buffer capped at `max_message_bytes` (fastwebsockets 0.10
//! does not cap the aggregate). Every way a connection ends is one [`End`], and [`Ending`]
//! (a table, [`End::ending`]) says what follows from it: the terminal event's reason, the close
//! frame, the `gateway_streams_total{outcome}` label and the log level. Every stream that sent
//! `start` gets exactly one terminal event, one outcome and one log line with its SIDs.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, WebSocket, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics::{MessageEvent, Metrics, ProtocolErrorKind, StreamOutcome};
use crate::playback::writer::StoppedByControl;
use crate::protocol::{parse, Message};
use crate::session::{close_code, Flow, Received, Session, SessionConfig, SessionError};
use crate::sink::ConnectionPublisher;
use crate::watchdog::{FrameCounter, WatchdogError};

/// Per-connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionConfig {
    /// Session settings.
    pub session: SessionConfig,
    /// Cap on one WebSocket message, fragments included.
    pub max_message_bytes: usize,
    /// How long to wait for the peer's close after `stop` before closing ourselves.
    pub stop_linger: Duration,
}

/// How the socket side of a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketEnd {
    /// The peer sent a close frame.
    ClosedByPeer,
    /// TCP EOF without a close frame.
    Eof,
    /// TCP reset.
    Reset,
    /// Any other I/O error.
    Io,
}

/// How the read loop ended.
#[derive(Debug)]
pub enum End {
    /// Twilio sent `stop`.
    Stopped,
    /// The socket ended without `stop`.
    Socket(SocketEnd),
    /// No frame for `--idle-timeout`.
    IdleTimeout,
    /// The drain closed it.
    Shutdown,
    /// `--overflow disconnect`.
    Backpressure,
    /// A `stop` record on the playback topic.
    StoppedByControl,
    /// A protocol error.
    Error(SessionError),
}

/// What follows from an [`End`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The terminal event's `reason` (`disconnect`), or the error reason.
    pub reason: String,
    /// Close frame to send (code, reason); `None` when the peer already closed (or after
    /// `stop`, which has its own linger).
    pub close: Option<(u16, String)>,
    /// `gateway_streams_total{outcome}`.
    pub outcome: StreamOutcome,
    /// Logged at WARN (true) or INFO.
    pub warn: bool,
}

impl End {
    /// The table: reason, close frame, outcome, log level for each way a stream ends.
    pub fn ending(&self) -> Ending {
        let e = |reason: &str, close: Option<(u16, &str)>, outcome, warn| Ending {
            reason: reason.to_owned(),
            close: close.map(|(c, r)| (c, r.to_owned())),
            outcome,
            warn,
        };
        match self {
            End::Stopped => e("stop", None, StreamOutcome::Stopped, false),
            End::Socket(SocketEnd::ClosedByPeer) => {
                e("closed_by_peer", None, StreamOutcome::Disconnected, true)
            }
            End::Socket(SocketEnd::Eof) => e("eof", None, StreamOutcome::Disconnected, true),
            End::Socket(SocketEnd::Reset) => {
                e("connection_reset", None, StreamOutcome::Disconnected, true)
            }
            End::Socket(SocketEnd::Io) => e("io_error", None, StreamOutcome::Disconnected, true),
            End::IdleTimeout => e(
                "idle_timeout",
                Some((close_code::GOING_AWAY, "idle timeout")),
                StreamOutcome::IdleTimeout,
                true,
            ),
            End::Shutdown => e(
                "shutdown",
                Some((close_code::GOING_AWAY, "server shutting down")),
                StreamOutcome::Shutdown,
                false,
            ),
            End::Backpressure => e(
                "backpressure",
                Some((close_code::TRY_AGAIN_LATER, "kafka backpressure")),
                StreamOutcome::Backpressure,
                true,
            ),
            End::StoppedByControl => e(
                "stopped_by_control",
                Some((close_code::NORMAL, "stopped")),
                StreamOutcome::StoppedByControl,
                false,
            ),
            End::Error(err) => Ending {
                reason: err.reason.clone(),
                close: Some((err.close_code, err.reason.clone())),
                outcome: StreamOutcome::ProtocolError,
                warn: true,
            },
        }
    }
}

fn message_event(m: &Message<'_>) -> MessageEvent {
    match m {
        Message::Connected { .. } => MessageEvent::Connected,
        Message::Start(_) => MessageEvent::Start,
        Message::Media(_) => MessageEvent::Media,
        Message::Dtmf { .. } => MessageEvent::Dtmf,
        Message::Mark { .. } => MessageEvent::Mark,
        Message::Stop { .. } => MessageEvent::Stop,
        Message::Unknown { .. } => MessageEvent::Unknown,
    }
}

fn now() -> Received {
    Received {
        unix_us: crate::unix_micros(),
        mono_us: crate::mono_micros(),
    }
}

/// Maps a read error to how the stream ended.
pub fn classify_ws_error(e: WebSocketError) -> End {
    match e {
        WebSocketError::IoError(io) => match WatchdogError::of(&io) {
            Some(WatchdogError::Idle) => End::IdleTimeout,
            Some(WatchdogError::Shutdown) => End::Shutdown,
            None if StoppedByControl::is(&io) => End::StoppedByControl,
            None if io.kind() == io::ErrorKind::ConnectionReset => End::Socket(SocketEnd::Reset),
            None => End::Socket(SocketEnd::Io),
        },
        WebSocketError::UnexpectedEOF => End::Socket(SocketEnd::Eof),
        WebSocketError::ConnectionClosed => End::Socket(SocketEnd::ClosedByPeer),
        WebSocketError::FrameTooLarge => End::Error(SessionError::new(
            close_code::TOO_BIG,
            ProtocolErrorKind::MessageTooLarge,
            "message too large",
        )),
        WebSocketError::InvalidUTF8 => End::Error(SessionError::new(
            close_code::INVALID_DATA,
            ProtocolErrorKind::InvalidUtf8,
            "invalid utf-8",
        )),
        other => End::Error(SessionError::new(
            close_code::PROTOCOL,
            ProtocolErrorKind::WebsocketProtocol,
            format!("websocket protocol error: {other}"),
        )),
    }
}

/// Whether the stream ends after a message: a `stop` (or an error) in this very message
/// decides the ending; the overflow policy's request to disconnect (raised, for instance, when
/// the batch flushed by `stop` did not fit) only ends a stream that is still going.
fn end_after(result: Result<Flow, SessionError>, backpressure: bool) -> Option<End> {
    match result {
        Ok(Flow::Stopped) => Some(End::Stopped),
        Err(e) => Some(End::Error(e)),
        Ok(Flow::Continue) if backpressure => Some(End::Backpressure),
        Ok(Flow::Continue) => None,
    }
}

struct Conn {
    session: Session,
    publisher: ConnectionPublisher,
    metrics: Arc<Metrics>,
    counted_open: bool,
}

impl Conn {
    /// Parses and handles one complete text message.
    fn on_text(&mut self, buf: &mut [u8]) -> Result<Flow, SessionError> {
        let at = now();
        let parsed = parse(buf).map_err(SessionError::from_parse)?;
        self.metrics.messages[message_event(&parsed.message)].inc();
        if parsed.unknown_fields > 0 {
            self.metrics
                .unknown_fields
                .inc_by(parsed.unknown_fields as u64);
        }
        let flow = self
            .session
            .handle(&parsed.message, at, &mut self.publisher);
        if let (Ok(_), Message::Media(m), Some(d)) =
            (&flow, &parsed.message, self.publisher.downlink())
        {
            // Anchors the stream's timeline for placing played audio (only media the session
            // accepted: not before `start`, not for another stream).
            d.shared.observe_media(m.timestamp_ms, at.mono_us);
        }
        if !self.counted_open && self.session.has_started() {
            self.counted_open = true;
            self.metrics.open_streams.inc();
            if let Some(ids) = self.session.ids() {
                tracing::info!(
                    stream_sid = ids.stream_sid.as_str(),
                    call_sid = ids.call_sid.as_str(),
                    "stream started"
                );
            }
        }
        flow
    }
}

/// Writes a close frame and flushes, bounded in time (the peer may be gone).
async fn send_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    code: u16,
    reason: &str,
) {
    let fut = async {
        ws.write_frame(Frame::close(code, reason.as_bytes()))
            .await?;
        ws.flush().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), fut).await;
}

/// Lingering close: half-close our side, then read and discard what the peer still sends, up to
/// 1 s or 256 KiB. Closing a socket with unread input makes the kernel send RST, which can
/// destroy our close frame before the peer reads it (e.g. right after refusing an oversized
/// message whose payload is still in flight).
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        while total < 256 * 1024 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// After `stop`: Twilio closes the socket itself; give it `stop_linger`, then close with 1000.
/// A data message in between is a protocol error (1008).
async fn after_stop<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    linger_for: Duration,
    metrics: &Metrics,
    sid: &str,
) {
    let peer = tokio::time::timeout(linger_for, async {
        loop {
            match ws.read_frame().await {
                Ok(f)
                    if matches!(
                        f.opcode,
                        OpCode::Text | OpCode::Binary | OpCode::Continuation
                    ) =>
                {
                    return Some(())
                }
                Ok(f) if f.opcode == OpCode::Close => return None,
                Ok(_) => continue,
                Err(e) => {
                    // The idle timeout may fire before `stop_linger` when `--idle-timeout` is
                    // short: that is the same "peer went quiet" case; wait out the linger.
                    if matches!(classify_ws_error(e), End::IdleTimeout) {
                        std::future::pending::<()>().await;
                    }
                    return None;
                }
            }
        }
    })
    .await;
    match peer {
        Ok(Some(())) => {
            metrics.protocol_errors[ProtocolErrorKind::AfterStop].inc();
            tracing::warn!(stream_sid = sid, "message after stop");
            send_close(ws, close_code::POLICY, "message after stop").await;
        }
        Ok(None) => {}
        Err(_) => send_close(ws, close_code::NORMAL, "stream stopped").await,
    }
}

/// Serves one upgraded WebSocket until it ends. Never panics on input; logs and counts how it
/// ended. `publisher` carries the stream's downlink when playback is on; `frames` counts every
/// complete frame read, for the watchdog under the socket (idle means no frame, not no byte).
pub async fn serve<S>(
    mut ws: WebSocket<S>,
    publisher: ConnectionPublisher,
    cfg: ConnectionConfig,
    conn_id: u64,
    frames: FrameCounter,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.set_auto_close(true);
    // Pings are answered below rather than inside fastwebsockets, which would swallow them:
    // a ping is a frame, so it counts as activity for the idle timeout like any other.
    ws.set_auto_pong(false);
    // fastwebsockets rejects frames with `len >= max`; we want `len > cap` rejected.
    ws.set_max_message_size(cfg.max_message_bytes + 1);
    let metrics = publisher.metrics().clone();
    metrics.open_connections.inc();
    let mut c = Conn {
        session: Session::new(cfg.session),
        publisher,
        metrics: metrics.clone(),
        counted_open: false,
    };
    let mut fragments: Vec<u8> = Vec::new();
    let mut in_fragment = false;

    let end = loop {
        let mut frame = match ws.read_frame().await {
            Ok(f) => f,
            Err(e) => break classify_ws_error(e),
        };
        frames.frame();
        // RFC 6455 §5.1: a server closes the connection on a frame its client did not mask.
        if !client_masked(&mut frame) {
            break End::Error(SessionError::new(
                close_code::PROTOCOL,
                ProtocolErrorKind::WebsocketProtocol,
                "unmasked client frame",
            ));
        }
        let result = match frame.opcode {
            OpCode::Text if frame.fin && !in_fragment => c.on_text(frame.payload.to_mut()),
            OpCode::Text if !in_fragment => {
                in_fragment = true;
                fragments.clear();
                fragments.extend_from_slice(&frame.payload);
                continue;
            }
            OpCode::Continuation if in_fragment => {
                if fragments.len() + frame.payload.len() > cfg.max_message_bytes {
                    break End::Error(SessionError::new(
                        close_code::TOO_BIG,
                        ProtocolErrorKind::MessageTooLarge,
                        "fragmented message too large",
                    ));
                }
                fragments.extend_from_slice(&frame.payload);
                if !frame.fin {
                    continue;
                }
                in_fragment = false;
                let r = c.on_text(&mut fragments);
                // Do not keep a large reassembly buffer around for the rest of the call.
                if fragments.capacity() > 4096 {
                    fragments = Vec::new();
                }
                r
            }
            OpCode::Text | OpCode::Continuation => Err(SessionError::new(
                close_code::PROTOCOL,
                ProtocolErrorKind::WebsocketProtocol,
                "unexpected continuation state",
            )),
            OpCode::Binary => Err(SessionError::new(
                close_code::UNSUPPORTED,
                ProtocolErrorKind::BinaryFrame,
                "binary frames are not supported",
            )),
            OpCode::Close => break End::Socket(SocketEnd::ClosedByPeer),
            OpCode::Ping => {
                // Flushed: behind TLS the pong would otherwise wait in the session buffer.
                let pong = async {
                    ws.write_frame(Frame::pong(frame.payload)).await?;
                    ws.flush().await
                };
                if let Err(e) = pong.await {
                    break classify_ws_error(e);
                }
                continue;
            }
            OpCode::Pong => continue,
        };
        if let Some(end) = end_after(result, c.publisher.backpressure_close()) {
            break end;
        }
    };

    let ending = end.ending();
    match &end {
        End::Stopped => {}
        End::Error(e) => c.session.fail(e, now(), &mut c.publisher),
        _ => c
            .session
            .disconnect(&ending.reason, now(), &mut c.publisher),
    }
    // Nothing is played into a stream that has ended: Twilio would not play it after `stop`,
    // and its terminal event (just published) already holds the playback summary.
    c.publisher.close_playback();
    let ids = c.session.ids().cloned();
    let (sid, call) = ids
        .as_ref()
        .map(|i| (i.stream_sid.as_str(), i.call_sid.as_str()))
        .unwrap_or(("", ""));
    if matches!(end, End::Stopped) {
        after_stop(&mut ws, cfg.stop_linger, &metrics, sid).await;
    } else if let Some((code, reason)) = &ending.close {
        send_close(&mut ws, *code, reason).await;
    }
    // Connections that never sent `start` are not streams: only an error is worth a line.
    if c.counted_open || matches!(end, End::Error(_)) {
        let published = c.session.frames_published();
        let dropped = c.session.frames_dropped();
        let close = ending.close.as_ref().map(|c| c.0);
        // One line, at the level the ending's table gives (tracing's levels are static).
        macro_rules! stream_ended {
            ($level:ident) => {
                tracing::$level!(
                    conn_id,
                    stream_sid = sid,
                    call_sid = call,
                    outcome = ending.outcome.as_str(),
                    reason = ending.reason.as_str(),
                    close_code = close,
                    frames_published = published,
                    frames_dropped = dropped,
                    "stream ended"
                )
            };
        }
        if ending.warn {
            stream_ended!(warn);
        } else {
            stream_ended!(info);
        }
    }
    if c.counted_open {
        metrics.open_streams.dec();
        metrics.streams[ending.outcome].inc();
    }
    // Dropping the publisher before lingering releases the stream entry on this side.
    drop(c);
    linger(ws.into_inner()).await;
    metrics.open_connections.dec();
}

/// Whether the client masked `frame` (fastwebsockets keeps the key but does not expose it;
/// its header formatter sets the mask bit from it). A few byte writes on the stack.
fn client_masked(frame: &mut fastwebsockets::Frame<'_>) -> bool {
    let mut head = [0u8; 14];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_maps_to_one_outcome_close_and_reason() {
        let cases = [
            (End::Stopped, "stop", None, StreamOutcome::Stopped),
            (
                End::Socket(SocketEnd::ClosedByPeer),
                "closed_by_peer",
                None,
                StreamOutcome::Disconnected,
            ),
            (
                End::Socket(SocketEnd::Eof),
                "eof",
                None,
                StreamOutcome::Disconnected,
            ),
            (
                End::Socket(SocketEnd::Reset),
                "connection_reset",
                None,
                StreamOutcome::Disconnected,
            ),
            (
                End::Socket(SocketEnd::Io),
                "io_error",
                None,
                StreamOutcome::Disconnected,
            ),
            (
                End::IdleTimeout,
                "idle_timeout",
                Some(1001),
                StreamOutcome::IdleTimeout,
            ),
            (
                End::Shutdown,
                "shutdown",
                Some(1001),
                StreamOutcome::Shutdown,
            ),
            (
                End::Backpressure,
                "backpressure",
                Some(1013),
                StreamOutcome::Backpressure,
            ),
            (
                End::StoppedByControl,
                "stopped_by_control",
                Some(1000),
                StreamOutcome::StoppedByControl,
            ),
        ];
        for (end, reason, close, outcome) in cases {
            let e = end.ending();
            assert_eq!(e.reason, reason);
            assert_eq!(e.close.map(|c| c.0), close);
            assert_eq!(e.outcome, outcome);
        }
        let err = End::Error(SessionError::new(1008, ProtocolErrorKind::AfterStop, "x"));
        let e = err.ending();
        assert_eq!(e.close, Some((1008, "x".to_owned())));
        assert_eq!(e.outcome, StreamOutcome::ProtocolError);
    }

    #[test]
    fn a_stopped_stream_is_never_ended_as_backpressure() {
        // The `disconnect` flag can be raised by the stop itself (its batch did not fit).
        assert!(matches!(
            end_after(Ok(Flow::Stopped), true),
            Some(End::Stopped)
        ));
        assert!(matches!(
            end_after(Ok(Flow::Continue), true),
            Some(End::Backpressure)
        ));
        assert!(end_after(Ok(Flow::Continue), false).is_none());
        let e = SessionError::new(1007, ProtocolErrorKind::InvalidJson, "x");
        assert!(matches!(end_after(Err(e), true), Some(End::Error(_))));
    }

    #[test]
    fn watchdog_errors_are_classified_by_type() {
        let idle = io::Error::new(io::ErrorKind::TimedOut, WatchdogError::Idle);
        assert!(matches!(
            classify_ws_error(WebSocketError::IoError(idle)),
            End::IdleTimeout
        ));
        // Same kind and text, but not the watchdog's error: not an idle timeout.
        let lookalike = io::Error::new(io::ErrorKind::TimedOut, "idle timeout");
        assert!(matches!(
            classify_ws_error(WebSocketError::IoError(lookalike)),
            End::Socket(SocketEnd::Io)
        ));
    }
}
