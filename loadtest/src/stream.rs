//! One simulated call: one WebSocket carrying one Twilio Media Stream.
//!
//! The stream task connects, sends `connected` and `start`, then one `media` message per
//! track every 20 ms (÷ speed) on a drift-free schedule, optional `dtmf`/`mark`, then `stop`
//! and a close frame (1000), and waits for the server's close. A second task owns the read
//! half for the whole life of the socket: it answers pings (through the writer), counts
//! server frames and records the server's close code. Writes go through a 1 KiB
//! `BufWriter` so both tracks of one tick leave in one `write` and one flush.
//!
//! With [`DownlinkHooks`] the stream also plays Twilio's side of a bidirectional stream. The
//! reader stamps every frame as it comes off the socket (before parsing), parses `media`,
//! `mark` and `clear`, feeds them to the stream's [`Playout`] model and logs them, stamped,
//! to the downlink verifier. The writer, between its media ticks, sleeps until the next
//! tick, the next mark due, or a nudge from the reader, and writes each due echo
//! (`{"event":"mark","sequenceNumber":…}` on the stream's one sequence counter). The uplink
//! schedule is unchanged: echoes go out between ticks and never move a tick. Per stream the
//! downlink costs the model (an instant and at most `max_pending_marks` names), one
//! reassembly buffer capped at the 64 KiB message limit, and nothing else: frames go to the
//! verifier's bounded queue.

use crate::audio::ChunkTable;
use crate::client::Connector;
use crate::downlink::{DlMsg, DownlinkSender, RxItem};
use crate::message::{parse_server_message, CallIds, MessageBuilder, ServerMessage, Track};
use crate::pacing::Schedule;
use crate::playout::{Echo, Playout};
use crate::stats::RunStats;
use crate::verify::{Registrar, StreamReg};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::BufWriter;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Largest message the simulated Twilio accepts (fragments included).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Settings shared by every stream of a run.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Send both tracks (`inbound` and `outbound`).
    pub both_tracks: bool,
    /// Chunks per track; `None` = until the run's stop flag is set.
    pub chunks: Option<u64>,
    /// Time compression factor (1 = real time).
    pub speed: f64,
    /// Ignore the schedule and send as fast as possible.
    pub flood: bool,
    /// Send one `dtmf` after this inbound chunk.
    pub dtmf_at: Option<u64>,
    /// Send one `mark` after this inbound chunk.
    pub mark_at: Option<u64>,
    /// How long to wait for the server's close after ours.
    pub close_timeout: Duration,
    /// Identifies the run in the SIDs, so concurrent runs never collide.
    pub run_id: u64,
}

/// Everything a stream task needs; cloned (cheaply) into every task.
#[derive(Clone)]
pub struct StreamEnv {
    /// Opens the socket.
    pub connector: Arc<Connector>,
    /// The audio, chunked and base64-encoded once.
    pub audio: Arc<ChunkTable>,
    /// Run-wide counters.
    pub stats: Arc<RunStats>,
    /// Stream settings.
    pub cfg: Arc<StreamConfig>,
    /// Tells the verifier what each stream sent, when verification is on.
    pub registrar: Option<Registrar>,
    /// Set to end open-ended streams (ramp, soak).
    pub stop: Arc<AtomicBool>,
    /// Play Twilio's side of a bidirectional stream (the `bidirectional` scenario).
    pub downlink: Option<DownlinkHooks>,
}

/// What a stream needs to act as the Twilio end of a bidirectional stream.
#[derive(Debug, Clone)]
pub struct DownlinkHooks {
    /// Where received frames and echoes are logged, stamped, for verification.
    pub tx: DownlinkSender,
    /// Marks that may wait for their audio at once (more are counted and dropped).
    pub max_pending_marks: usize,
}

/// State the reader and the writer of a bidirectional stream share.
struct Shared {
    model: Mutex<Playout>,
    /// The reader nudges the writer when a mark or clear may have made an echo due.
    nudge: Notify,
}

/// The writer's side of a bidirectional stream.
struct DownWriter {
    shared: Arc<Shared>,
    tx: DownlinkSender,
    stream: u64,
    /// Reused buffer of echoes to write.
    echoes: Vec<Echo>,
}

/// How one stream ended.
#[derive(Debug, Clone, Default)]
pub struct StreamOutcome {
    /// Stream index within the run.
    pub index: u64,
    /// The upgrade succeeded.
    pub connected: bool,
    /// `stop` was sent and the socket closed normally.
    pub completed: bool,
    /// Media messages sent per track.
    pub media_sent: [u64; 2],
    /// Last sequence number used.
    pub last_seq: u64,
    /// Close code the server sent, if it sent a close frame.
    pub server_close: Option<u16>,
    /// The server closed first with 1000 on a bidirectional stream (a `stop` record).
    pub stopped_by_server: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What the reader tells the writer.
enum Control {
    /// Answer this ping.
    Ping(Vec<u8>),
    /// The server sent a close frame with this code (0 = none).
    Closed(u16),
}

/// What the reader saw over the socket's life.
#[derive(Debug, Default)]
struct ReadResult {
    close_code: Option<u16>,
    error: Option<String>,
}

/// Offset of stream `index`'s inbound audio in the chunk table; outbound is half a table on.
pub fn audio_offsets(index: u64, table_len: usize) -> [usize; 2] {
    let inbound = (index as usize).wrapping_mul(7919) % table_len;
    [inbound, (inbound + table_len / 2) % table_len]
}

/// Runs stream `index` to the end and updates `env.stats`.
pub async fn run_stream(env: StreamEnv, index: u64) -> StreamOutcome {
    let stats = &env.stats;
    stats.streams_started.fetch_add(1, Ordering::Relaxed);
    let mut out = StreamOutcome {
        index,
        ..Default::default()
    };
    let t0 = Instant::now();
    let ws = match env.connector.connect().await {
        Ok(ws) => ws,
        Err(e) => {
            stats.handshake_errors.fetch_add(1, Ordering::Relaxed);
            stats.error_example(&e.reason(), e.to_string());
            stats.error(e.reason());
            out.error = Some(e.to_string());
            return out;
        }
    };
    stats.handshake_latency.record(index as usize, t0.elapsed());
    stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
    stats.open_streams.fetch_add(1, Ordering::Relaxed);
    out.connected = true;

    let (mut rd, mut wr) = ws.split(|s| {
        let (r, w) = tokio::io::split(s);
        (r, BufWriter::with_capacity(1024, w))
    });
    rd.set_auto_close(false);
    rd.set_auto_pong(false);
    rd.set_max_message_size(64 * 1024);
    wr.set_writev(false);

    let ids = CallIds::new(env.cfg.run_id, index);
    let shared = env.downlink.as_ref().map(|h| {
        Arc::new(Shared {
            model: Mutex::new(Playout::new(
                Instant::now(),
                env.cfg.speed,
                h.max_pending_marks,
            )),
            nudge: Notify::new(),
        })
    });
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(4);
    let reader_stats = env.stats.clone();
    let reader_down = match (&env.downlink, &shared) {
        (Some(h), Some(s)) => Some(DownReader {
            shared: s.clone(),
            tx: h.tx.clone(),
            stream: index,
            sid: ids.stream_sid.clone(),
            frag: None,
        }),
        _ => None,
    };
    let reader = tokio::spawn(async move {
        let mut res = ReadResult::default();
        let mut down = reader_down;
        let mut no_send = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
        loop {
            match rd.read_frame(&mut no_send).await {
                Ok(frame) => {
                    // Stamp first: nothing below may delay the receive time.
                    let at = Instant::now();
                    reader_stats.frames_received.fetch_add(1, Ordering::Relaxed);
                    match frame.opcode {
                        OpCode::Close => {
                            let code = match frame.payload.len() {
                                0 | 1 => 0,
                                _ => u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
                            };
                            res.close_code = Some(code);
                            let _ = ctl_tx.try_send(Control::Closed(code));
                            break;
                        }
                        OpCode::Ping => {
                            // Bounded channel: if the writer is behind, drop the pong.
                            let _ = ctl_tx.try_send(Control::Ping(frame.payload.to_vec()));
                        }
                        OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                            if let Some(d) = down.as_mut() {
                                d.frame(at, frame.opcode, frame.fin, &frame.payload, &reader_stats)
                                    .await;
                            }
                        }
                        OpCode::Pong => {}
                    }
                }
                Err(e) => {
                    res.error = Some(read_error_reason(&e));
                    break;
                }
            }
        }
        res
    });

    let mut msg = MessageBuilder::new(ids);
    let offsets = audio_offsets(index, env.audio.len());
    let mut down = match (&env.downlink, &shared) {
        (Some(h), Some(s)) => Some(DownWriter {
            shared: s.clone(),
            tx: h.tx.clone(),
            stream: index,
            echoes: Vec::new(),
        }),
        _ => None,
    };
    let write_result = send_call(
        &env,
        index,
        &mut msg,
        offsets,
        &mut wr,
        &mut ctl_rx,
        &mut out,
        down.as_mut(),
    )
    .await;

    // Wait for the server's close (or the reader's error) for a bounded time.
    let read = match tokio::time::timeout(env.cfg.close_timeout, reader).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => ReadResult {
            error: Some("reader_panicked".into()),
            ..Default::default()
        },
        Err(_) => ReadResult {
            error: Some("close_timeout".into()),
            ..Default::default()
        },
    };
    if let Some(code) = read.close_code {
        stats.close_code(code);
    }
    out.server_close = read.close_code;

    if let Some(reg) = &env.registrar {
        if env.downlink.is_some() && matches!(write_result, Ok(Sent::ServerClosed(1000))) {
            reg.server_closed(msg.ids().stream_sid.clone());
        }
        reg.finished(msg.ids().stream_sid.clone(), out.media_sent);
    }
    if let (Some(h), Some(s)) = (&env.downlink, &shared) {
        if let Ok(m) = s.model.lock() {
            stats.add_playout(&m.stats);
        }
        h.tx.send(DlMsg::StreamEnd {
            stream: index,
            at: Instant::now().into_std(),
            we_stopped: matches!(write_result, Ok(Sent::Stopped)),
            server_close: read.close_code,
        })
        .await;
    }
    stats.open_streams.fetch_sub(1, Ordering::Relaxed);

    match write_result {
        Ok(Sent::Stopped) => {
            // We closed first; any close from the server now is its answer.
            if read.close_code.is_some() {
                out.completed = true;
            } else {
                out.error = read.error.or(Some("no_close_reply".into()));
            }
        }
        Ok(Sent::ServerClosed(1000)) if env.downlink.is_some() => {
            // On a bidirectional stream the server may end the call (a `stop` record);
            // the downlink verifier checks that one was sent.
            out.completed = true;
            out.stopped_by_server = true;
            stats
                .streams_stopped_by_server
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Sent::ServerClosed(code)) => {
            stats.server_closed_early.fetch_add(1, Ordering::Relaxed);
            out.error = Some(format!("server_closed_{code}"));
        }
        Err(e) => out.error = Some(e),
    }
    if out.completed {
        stats.streams_completed.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.streams_failed.fetch_add(1, Ordering::Relaxed);
        stats.error(out.error.clone().unwrap_or_else(|| "unknown".into()));
    }
    out
}

/// How the sending side ended.
enum Sent {
    /// We sent `stop` and a close frame.
    Stopped,
    /// The server closed first, with this code.
    ServerClosed(u16),
}

fn read_error_reason(e: &WebSocketError) -> String {
    match e {
        WebSocketError::UnexpectedEOF => "eof_without_close".into(),
        WebSocketError::IoError(io) => format!("read_{:?}", io.kind()).to_lowercase(),
        other => format!("read_{other}").chars().take(40).collect(),
    }
}

fn write_error_reason(e: &WebSocketError) -> String {
    match e {
        WebSocketError::IoError(io) => format!("write_{:?}", io.kind()).to_lowercase(),
        WebSocketError::ConnectionClosed => "write_after_close".into(),
        other => format!("write_{other}").chars().take(40).collect(),
    }
}

/// The sending half of a call. Returns how it ended or a short error reason.
#[allow(clippy::too_many_arguments)]
async fn send_call<W>(
    env: &StreamEnv,
    index: u64,
    msg: &mut MessageBuilder,
    offsets: [usize; 2],
    wr: &mut fastwebsockets::WebSocketWrite<W>,
    ctl: &mut mpsc::Receiver<Control>,
    out: &mut StreamOutcome,
    mut down: Option<&mut DownWriter>,
) -> Result<Sent, String>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let cfg = &env.cfg;
    let stats = &env.stats;
    let tracks: &[Track] = if cfg.both_tracks {
        &[Track::Inbound, Track::Outbound]
    } else {
        &[Track::Inbound]
    };
    let wmap = |e: WebSocketError| write_error_reason(&e);

    // The schedule starts now and the verifier hears of the stream before the gateway can
    // see its `start`, so no record of this stream can reach the verifier first.
    let schedule = Schedule::new(Instant::now(), cfg.speed, cfg.flood);
    if let Some(reg) = &env.registrar {
        reg.start(StreamReg {
            sid: msg.ids().stream_sid.clone(),
            start: schedule.start().into_std(),
            speed: cfg.speed,
            flood: cfg.flood,
            offsets,
        });
    }

    let mut seq: u64 = 0;
    let mut media_published: u64 = 0;
    let mut sent_bytes: u64 = 0;
    let mut sent_msgs: u64 = 0;
    let m = msg.connected();
    sent_bytes += m.len() as u64;
    wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
        .await
        .map_err(wmap)?;
    seq += 1;
    let m = msg.start(seq, cfg.both_tracks, index);
    sent_bytes += m.len() as u64;
    wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
        .await
        .map_err(wmap)?;
    wr.flush().await.map_err(wmap)?;
    sent_msgs += 2;

    let mut k: u64 = 0; // chunks sent per track so far
    let mut server_closed = None;
    let flush_every = if cfg.flood { 8 } else { 1 };
    loop {
        if let Some(n) = cfg.chunks {
            if k >= n {
                break;
            }
        } else if env.stop.load(Ordering::Relaxed) {
            break;
        }
        let lag = match down.as_deref_mut() {
            None => schedule.wait(k).await,
            Some(d) => {
                let mut c = (&mut seq, &mut sent_msgs, &mut sent_bytes);
                wait_echoing(&schedule, k, d, msg, wr, &mut c).await?
            }
        };
        if !schedule.is_flood() {
            stats.send_lag.record(index as usize, lag);
        }
        // Control messages from the reader: pongs to send, or the server's close.
        while let Ok(c) = ctl.try_recv() {
            match c {
                Control::Ping(p) => {
                    wr.write_frame(Frame::pong(Payload::Owned(p)))
                        .await
                        .map_err(wmap)?;
                }
                Control::Closed(code) => server_closed = Some(code),
            }
        }
        if let Some(code) = server_closed {
            // Echo the close and stop sending; nothing else may follow a close frame.
            let _ = wr.write_frame(Frame::close(1000, b"")).await;
            let _ = wr.flush().await;
            flush_stats(stats, sent_msgs, sent_bytes, out, &mut media_published);
            return Ok(Sent::ServerClosed(code));
        }
        k += 1;
        let ts = (k - 1) * 20;
        for &t in tracks {
            seq += 1;
            let payload = env.audio.b64(offsets[t.index()] + k as usize - 1);
            let m = msg.media(seq, t, k, ts, payload);
            sent_bytes += m.len() as u64;
            wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
                .await
                .map_err(wmap)?;
            out.media_sent[t.index()] += 1;
            sent_msgs += 1;
        }
        if cfg.dtmf_at == Some(k) {
            seq += 1;
            let m = msg.dtmf(seq, b'5');
            sent_bytes += m.len() as u64;
            wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
                .await
                .map_err(wmap)?;
            sent_msgs += 1;
        }
        if cfg.mark_at == Some(k) {
            seq += 1;
            let m = msg.mark(seq, "m1");
            sent_bytes += m.len() as u64;
            wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
                .await
                .map_err(wmap)?;
            sent_msgs += 1;
        }
        if k % flush_every == 0 {
            wr.flush().await.map_err(wmap)?;
        }
        // Publish counters every 50 ticks to keep atomics off the per-message path.
        if k % 50 == 0 {
            flush_stats(stats, sent_msgs, sent_bytes, out, &mut media_published);
            sent_msgs = 0;
            sent_bytes = 0;
        }
    }
    seq += 1;
    let m = msg.stop(seq);
    sent_bytes += m.len() as u64;
    wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
        .await
        .map_err(wmap)?;
    sent_msgs += 1;
    flush_stats(stats, sent_msgs, sent_bytes, out, &mut media_published);
    out.last_seq = seq;
    wr.write_frame(Frame::close(1000, b""))
        .await
        .map_err(wmap)?;
    wr.flush().await.map_err(wmap)?;
    Ok(Sent::Stopped)
}

/// Adds locally counted messages to the shared counters.
fn flush_stats(
    stats: &RunStats,
    msgs: u64,
    bytes: u64,
    out: &StreamOutcome,
    media_published: &mut u64,
) {
    stats.messages_sent.fetch_add(msgs, Ordering::Relaxed);
    stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    // `media_sent` is cumulative per stream; publish only the delta since the last flush.
    let media = out.media_sent[0] + out.media_sent[1];
    stats
        .media_sent
        .fetch_add(media - *media_published, Ordering::Relaxed);
    *media_published = media;
}

/// The reader's side of a bidirectional stream.
struct DownReader {
    shared: Arc<Shared>,
    tx: DownlinkSender,
    stream: u64,
    sid: String,
    /// A fragmented text message being reassembled: first fragment's stamp and the bytes.
    frag: Option<(Instant, Vec<u8>)>,
}

impl DownReader {
    /// Handles one data frame stamped `at`: reassembles fragments (capped), then parses,
    /// updates the playout model, nudges the writer and logs the frame.
    async fn frame(&mut self, at: Instant, op: OpCode, fin: bool, payload: &[u8], st: &RunStats) {
        match op {
            OpCode::Binary => {
                return self
                    .log(
                        at,
                        RxItem::Invalid {
                            reason: "binary_frame",
                        },
                        st,
                    )
                    .await;
            }
            OpCode::Text if !fin => {
                self.frag = Some((at, payload.to_vec()));
                return;
            }
            OpCode::Continuation => {
                let Some((first, mut buf)) = self.frag.take() else {
                    return self
                        .log(
                            at,
                            RxItem::Invalid {
                                reason: "stray_continuation",
                            },
                            st,
                        )
                        .await;
                };
                if buf.len() + payload.len() > MAX_MESSAGE_BYTES {
                    return self
                        .log(
                            first,
                            RxItem::Invalid {
                                reason: "message_too_big",
                            },
                            st,
                        )
                        .await;
                }
                buf.extend_from_slice(payload);
                if fin {
                    self.text(first, &buf, st).await;
                } else {
                    self.frag = Some((first, buf));
                }
                return;
            }
            _ => {}
        }
        self.text(at, payload, st).await;
    }

    async fn text(&mut self, at: Instant, text: &[u8], st: &RunStats) {
        let item = match parse_server_message(text, &self.sid) {
            Ok(ServerMessage::Media(ulaw)) => {
                if let Ok(mut m) = self.shared.model.lock() {
                    m.media(at, ulaw.len());
                }
                RxItem::Media { ulaw }
            }
            Ok(ServerMessage::Mark(name)) => {
                if let Ok(mut m) = self.shared.model.lock() {
                    m.mark(at, name.clone());
                }
                self.shared.nudge.notify_one();
                RxItem::Mark { name }
            }
            Ok(ServerMessage::Clear) => {
                if let Ok(mut m) = self.shared.model.lock() {
                    m.clear(at);
                }
                self.shared.nudge.notify_one();
                RxItem::Clear
            }
            Err(reason) => RxItem::Invalid { reason },
        };
        self.log(at, item, st).await;
    }

    async fn log(&self, at: Instant, item: RxItem, st: &RunStats) {
        if let RxItem::Invalid { .. } = item {
            st.downlink_invalid.fetch_add(1, Ordering::Relaxed);
        }
        self.tx
            .send(DlMsg::Rx {
                stream: self.stream,
                at: at.into_std(),
                item,
            })
            .await;
    }
}

/// Counters the writer keeps locally: sequence number, messages and bytes sent.
type Counters<'a> = (&'a mut u64, &'a mut u64, &'a mut u64);

/// Waits for chunk `k` like [`Schedule::wait`], writing mark echoes as they fall due in the
/// meantime; returns how late the tick is.
async fn wait_echoing<W>(
    schedule: &Schedule,
    k: u64,
    d: &mut DownWriter,
    msg: &mut MessageBuilder,
    wr: &mut fastwebsockets::WebSocketWrite<W>,
    c: &mut Counters<'_>,
) -> Result<Duration, String>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let due = schedule.due(k);
    loop {
        write_echoes(d, msg, wr, c).await?;
        let now = Instant::now();
        if schedule.is_flood() {
            return Ok(Duration::ZERO);
        }
        if now >= due {
            return Ok(now - due);
        }
        let next_mark = d.shared.model.lock().ok().and_then(|m| m.next_due());
        let wake = next_mark.map_or(due, |m| m.min(due));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = d.shared.nudge.notified() => {}
        }
    }
}

/// Writes every echo due now, each logged (stamped) before it is written.
async fn write_echoes<W>(
    d: &mut DownWriter,
    msg: &mut MessageBuilder,
    wr: &mut fastwebsockets::WebSocketWrite<W>,
    c: &mut Counters<'_>,
) -> Result<(), String>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut echoes = std::mem::take(&mut d.echoes);
    if let Ok(mut m) = d.shared.model.lock() {
        m.take(Instant::now(), &mut echoes);
    }
    if echoes.is_empty() {
        d.echoes = echoes;
        return Ok(());
    }
    for e in echoes.drain(..) {
        *c.0 += 1;
        d.tx.send(DlMsg::Echo {
            stream: d.stream,
            at: Instant::now().into_std(),
            name: e.name.clone(),
            played: e.played,
        })
        .await;
        let m = msg.mark(*c.0, &e.name);
        *c.2 += m.len() as u64;
        wr.write_frame(Frame::text(Payload::BorrowedMut(m)))
            .await
            .map_err(|e| write_error_reason(&e))?;
        *c.1 += 1;
    }
    d.echoes = echoes;
    wr.flush().await.map_err(|e| write_error_reason(&e))
}
