//! One task per stream: read WebSocket frames, feed the [`Session`], close with a specific code.
//!
//! The read loop never waits on Kafka: publishing is a non-blocking enqueue. Frames are parsed
//! in place from fastwebsockets' read buffer; fragmented messages are reassembled into a
//! per-connection buffer capped at `max_message_bytes` (fastwebsockets 0.10 does not cap the
//! aggregate). Every way a connection ends maps to exactly one terminal event (`stop`,
//! `disconnect` or `error`), one `gateway_streams_total{outcome}` increment (for streams that
//! sent `start`), and one log line carrying the stream and call SIDs.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, WebSocket, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics::Metrics;
use crate::protocol::{parse, Message};
use crate::session::{close_code, Flow, Received, Session, SessionConfig, SessionError};
use crate::sink::{ConnectionPublisher, Sink};
use crate::watchdog::{IDLE_MSG, SHUTDOWN_MSG};

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

/// How the read loop ended.
#[derive(Debug)]
enum End {
    Stopped,
    PeerClosed,
    Eof(&'static str),
    IdleTimeout,
    Shutdown,
    Backpressure,
    Error(SessionError),
}

fn message_index(m: &Message<'_>) -> usize {
    // Order of `metrics::MESSAGE_EVENTS`.
    match m {
        Message::Connected { .. } => 0,
        Message::Start(_) => 1,
        Message::Media(_) => 2,
        Message::Dtmf { .. } => 3,
        Message::Mark { .. } => 4,
        Message::Stop { .. } => 5,
        Message::Unknown { .. } => 6,
    }
}

fn now() -> Received {
    Received {
        unix_us: crate::unix_micros(),
        mono_us: crate::mono_micros(),
    }
}

fn classify_ws_error(e: WebSocketError) -> End {
    match e {
        WebSocketError::IoError(io) => match io.kind() {
            io::ErrorKind::TimedOut if io.to_string() == IDLE_MSG => End::IdleTimeout,
            io::ErrorKind::Interrupted if io.to_string() == SHUTDOWN_MSG => End::Shutdown,
            io::ErrorKind::ConnectionReset => End::Eof("connection_reset"),
            _ => End::Eof("io_error"),
        },
        WebSocketError::UnexpectedEOF => End::Eof("eof"),
        WebSocketError::ConnectionClosed => End::PeerClosed,
        WebSocketError::FrameTooLarge => End::Error(SessionError::new(
            close_code::TOO_BIG,
            "message_too_large",
            "message too large",
        )),
        WebSocketError::InvalidUTF8 => End::Error(SessionError::new(
            close_code::INVALID_DATA,
            "invalid_utf8",
            "invalid utf-8",
        )),
        other => End::Error(SessionError::new(
            close_code::PROTOCOL,
            "websocket_protocol",
            format!("websocket protocol error: {other}"),
        )),
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
        self.metrics.messages_by_event[message_index(&parsed.message)].inc();
        if parsed.unknown_fields > 0 {
            self.metrics
                .unknown_fields
                .inc_by(parsed.unknown_fields as u64);
        }
        let flow = self
            .session
            .handle(&parsed.message, at, &mut self.publisher);
        if !self.counted_open && self.session.has_started() {
            self.counted_open = true;
            self.metrics.open_streams.inc();
            if let Some(ids) = self.session.ids() {
                tracing::info!(stream_sid = %ids.stream_sid, call_sid = %ids.call_sid, "stream started");
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

/// Serves one upgraded WebSocket until it ends. Never panics on input; logs and counts how it
/// ended.
pub async fn serve<S>(mut ws: WebSocket<S>, sink: Sink, cfg: ConnectionConfig, conn_id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    // fastwebsockets rejects frames with `len >= max`; we want `len > cap` rejected.
    ws.set_max_message_size(cfg.max_message_bytes + 1);
    let metrics = sink.metrics().clone();
    metrics.open_connections.inc();
    let mut c = Conn {
        session: Session::new(cfg.session),
        publisher: sink.publisher(),
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
                        "message_too_large",
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
                "websocket_protocol",
                "unexpected continuation state",
            )),
            OpCode::Binary => Err(SessionError::new(
                close_code::UNSUPPORTED,
                "binary_frame",
                "binary frames are not supported",
            )),
            OpCode::Close => break End::PeerClosed,
            OpCode::Ping | OpCode::Pong => continue,
        };
        if c.publisher.backpressure_close() {
            break End::Backpressure;
        }
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stopped) => break End::Stopped,
            Err(e) => break End::Error(e),
        }
    };

    let ids = c.session.ids().cloned();
    let (sid, call) = ids
        .as_ref()
        .map(|i| (i.stream_sid.as_str(), i.call_sid.as_str()))
        .unwrap_or(("", ""));
    let outcome = match end {
        End::Stopped => {
            // Twilio closes after `stop`; give it `stop_linger`, then close ourselves. A data
            // message in between is a protocol error.
            let linger = tokio::time::timeout(cfg.stop_linger, async {
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
                        // The watchdog's idle timeout may fire before `stop_linger` when
                        // `--idle-timeout` is short: that is the same "peer went quiet" case.
                        Err(e) => {
                            if matches!(classify_ws_error(e), End::IdleTimeout) {
                                // Wait out `stop_linger`, then close with 1000 below.
                                std::future::pending::<()>().await;
                            }
                            return None;
                        }
                    }
                }
            })
            .await;
            match linger {
                Ok(Some(())) => {
                    metrics.protocol_error("after_stop");
                    tracing::warn!(
                        conn_id,
                        stream_sid = sid,
                        call_sid = call,
                        "message after stop"
                    );
                    send_close(&mut ws, close_code::POLICY, "message after stop").await;
                }
                Ok(None) => {}
                Err(_) => send_close(&mut ws, close_code::NORMAL, "stream stopped").await,
            }
            tracing::info!(
                conn_id,
                stream_sid = sid,
                call_sid = call,
                frames_published = c.session.frames_published(),
                frames_dropped = c.session.frames_dropped(),
                "stream stopped"
            );
            "stopped"
        }
        End::PeerClosed | End::Eof(_) => {
            let reason = match &end {
                End::Eof(r) => r,
                _ => "closed_by_peer",
            };
            c.session.disconnect(reason, now(), &mut c.publisher);
            if c.counted_open {
                tracing::warn!(
                    conn_id,
                    stream_sid = sid,
                    call_sid = call,
                    reason,
                    frames_published = c.session.frames_published(),
                    frames_dropped = c.session.frames_dropped(),
                    "stream ended without stop"
                );
            }
            "disconnected"
        }
        End::IdleTimeout => {
            c.session
                .disconnect("idle_timeout", now(), &mut c.publisher);
            send_close(&mut ws, close_code::GOING_AWAY, "idle timeout").await;
            tracing::warn!(conn_id, stream_sid = sid, call_sid = call, "idle timeout");
            "idle_timeout"
        }
        End::Shutdown => {
            c.session.disconnect("shutdown", now(), &mut c.publisher);
            send_close(&mut ws, close_code::GOING_AWAY, "server shutting down").await;
            tracing::info!(
                conn_id,
                stream_sid = sid,
                call_sid = call,
                "closed for shutdown"
            );
            "shutdown"
        }
        End::Backpressure => {
            c.session
                .disconnect("backpressure", now(), &mut c.publisher);
            send_close(&mut ws, close_code::TRY_AGAIN_LATER, "kafka backpressure").await;
            tracing::warn!(
                conn_id,
                stream_sid = sid,
                call_sid = call,
                "stream closed: in-flight budget full (--overflow disconnect)"
            );
            "backpressure"
        }
        End::Error(e) => {
            c.session.fail(&e, now(), &mut c.publisher);
            send_close(&mut ws, e.close_code, &e.reason).await;
            tracing::warn!(conn_id, stream_sid = sid, call_sid = call, kind = e.kind, close_code = e.close_code, reason = %e.reason, "stream closed on protocol error");
            "protocol_error"
        }
    };
    if c.counted_open {
        metrics.open_streams.dec();
        metrics.stream_ended(outcome);
    }
    linger(ws.into_inner()).await;
    metrics.open_connections.dec();
}
