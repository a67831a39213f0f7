//! One stream's downlink: the bounded queue from the playback consumer to the connection, and
//! the state both sides share (clear generation, waker, mark ledger, timeline, counters).
//!
//! The consumer thread pushes [`Queued`] commands through a lock-free channel and wakes the
//! connection task; the connection's [`super::writer::PlaybackIo`] pops them when it polls the
//! socket. The queue is bounded in bytes of audio, per stream (`--playback-buffer`) and for
//! the whole process (`--playback-max-bytes`): beyond either, media records are dropped and
//! counted (`buffer_full`) while the stream carries on.
//!
//! A `clear` must act before the media queued ahead of it: the consumer bumps the stream's
//! *clear generation* before queueing it, so the writer learns of the clear at its next poll,
//! sends it at once, and discards every queued item stamped with an older generation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use atomic_waker::AtomicWaker;

use super::command::Command;
use crate::metrics::PlaybackDrop;

/// A command with what the writer needs to order and time it.
#[derive(Debug)]
pub struct Queued {
    /// What to do.
    pub command: Command,
    /// Clear generation when it was queued (older than the current one = discarded).
    pub generation: u64,
    /// When the playback record was produced (its Kafka timestamp), unix ms.
    pub produced_ms: i64,
}

/// A sent mark waiting for Twilio's echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMark {
    /// The name.
    pub name: String,
    /// Where on the stream's timeline (µs) its audio ends, i.e. when Twilio should echo it.
    pub due_us: i64,
}

/// Marks sent and not yet echoed, each with whether a clear caught it before it was due.
#[derive(Debug, Default)]
pub struct MarkLedger {
    /// In the order sent; `true` = a clear was written while its audio was still to play, so
    /// its echo is the clear's (`played: false`).
    sent: VecDeque<(SentMark, bool)>,
}

/// How Twilio's echo of a mark is classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// The audio before it played (`false`: returned by a clear).
    pub played: bool,
    /// When it was due on the stream's timeline, µs.
    pub due_us: i64,
}

impl MarkLedger {
    /// Remembers a mark written to the socket.
    pub fn sent(&mut self, mark: SentMark) {
        // Bounded by what a stream can send: the queue bound keeps marks few; cap anyway.
        if self.sent.len() >= 4096 {
            self.sent.pop_front();
        }
        self.sent.push_back((mark, false));
    }

    /// A clear was written at `now_us` on the stream's timeline: marks whose audio was still
    /// to play come back unplayed. A mark already due has played; its echo may simply not
    /// have arrived yet, and it stays `played`.
    pub fn cleared(&mut self, now_us: i64) {
        for (m, cleared) in self.sent.iter_mut() {
            if m.due_us > now_us {
                *cleared = true;
            }
        }
    }

    /// Twilio echoed `name`: classifies it and forgets it (and anything older, which Twilio
    /// echoes in order). `None` when the gateway did not send it.
    pub fn echoed(&mut self, name: &str) -> Option<Echo> {
        let pos = self.sent.iter().position(|(m, _)| m.name == name)?;
        let mut echo = None;
        for _ in 0..=pos {
            let (m, cleared) = self.sent.pop_front()?;
            echo = Some(Echo {
                played: !cleared,
                due_us: m.due_us,
            });
        }
        echo
    }
}

/// What the stream's downlink did, for its terminal event.
#[derive(Debug, Default)]
pub struct Counters {
    /// Playback records accepted for the stream.
    pub records: AtomicU64,
    /// μ-law bytes written to the socket.
    pub media_bytes_sent: AtomicU64,
    /// Media frames written.
    pub frames_sent: AtomicU64,
    /// Marks written.
    pub marks_sent: AtomicU64,
    /// Clears written.
    pub clears_sent: AtomicU64,
    /// Queued μ-law bytes a clear discarded before they were written.
    pub bytes_cleared: AtomicU64,
    /// Accepted records the writer is done with (written, discarded by a clear, or dropped
    /// at the end): `records - finished` are queued or being written.
    pub finished: AtomicU64,
    /// Records refused or discarded, by reason.
    dropped: [AtomicU64; PlaybackDrop::ALL.len()],
}

impl Counters {
    /// Counts one dropped record.
    pub fn drop_one(&self, reason: PlaybackDrop) {
        self.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The summary object of the terminal event, `None` when the stream had no playback.
    /// `unfinished` records still queued when the stream ended are counted `stream_closed`
    /// (the writer drops them after the event is out).
    pub fn summary(&self, unfinished: u64) -> Option<serde_json::Value> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let count = |d: PlaybackDrop| {
            r(&self.dropped[d.index()])
                + if d == PlaybackDrop::StreamClosed {
                    unfinished
                } else {
                    0
                }
        };
        let drops: serde_json::Map<String, serde_json::Value> = PlaybackDrop::ALL
            .iter()
            .filter(|d| count(**d) > 0)
            .map(|d| (d.as_str().to_owned(), count(*d).into()))
            .collect();
        if r(&self.records) == 0 && drops.is_empty() {
            return None;
        }
        Some(serde_json::json!({
            "records": r(&self.records),
            "media_bytes_sent": r(&self.media_bytes_sent),
            "frames_sent": r(&self.frames_sent),
            "marks_sent": r(&self.marks_sent),
            "clears": r(&self.clears_sent),
            "bytes_cleared": r(&self.bytes_cleared),
            "dropped": drops.values().map(|v| v.as_u64().unwrap_or(0)).sum::<u64>(),
            "drops": drops,
        }))
    }
}

/// State shared by the consumer thread and the connection.
#[derive(Debug)]
pub struct Shared {
    /// μ-law bytes queued and not yet written (or discarded).
    pub queued_bytes: AtomicU64,
    /// Bumped by every `clear` before it is queued.
    pub clear_generation: AtomicU64,
    /// Wakes the connection task when something is queued.
    pub waker: AtomicWaker,
    /// Offset of the stream's timeline on the process's monotonic clock, µs: the smallest
    /// (receive time − `media.timestamp`) seen so far, i.e. receive time of timeline zero with
    /// the least network delay. `i64::MAX` until the first inbound chunk.
    pub timeline_offset_us: AtomicI64,
    /// Marks written and not yet echoed.
    pub marks: Mutex<MarkLedger>,
    /// For the terminal event.
    pub counters: Counters,
    /// The stream ended: nothing more is written.
    pub closed: std::sync::atomic::AtomicBool,
    /// Held while a record is queued and while the stream is closed for its terminal event:
    /// once closed, nothing more is accepted, so the event's summary is exact. Taken once per
    /// playback record (uncontended: the consumer thread and, once, the connection).
    pub accept: Mutex<()>,
    /// When the connection opened (process monotonic clock, µs): no chunk of the stream can be
    /// stamped later than the time since then, give or take [`MAX_AHEAD_US`].
    pub opened_mono_us: u64,
}

impl Shared {
    /// State for a connection opened at `opened_mono_us`.
    pub fn opened_at(opened_mono_us: u64) -> Shared {
        Shared {
            opened_mono_us,
            ..Shared::default()
        }
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            opened_mono_us: 0,
            queued_bytes: AtomicU64::new(0),
            clear_generation: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            timeline_offset_us: AtomicI64::new(i64::MAX),
            marks: Mutex::new(MarkLedger::default()),
            counters: Counters::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            accept: Mutex::new(()),
        }
    }
}

impl Shared {
    /// The stream ended: closes it to new records and returns the summary of its terminal
    /// event, counting what is still queued (or half written) as `stream_closed`. Runs on the
    /// connection's task, so the writer is not running meanwhile; after it the writer only
    /// writes out the frames it had already batched (at most 16 KiB) and drops the rest.
    pub fn close_and_summarise(&self) -> Option<serde_json::Value> {
        let _g = self.accept.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        let c = &self.counters;
        let unfinished = c
            .records
            .load(Ordering::Relaxed)
            .saturating_sub(c.finished.load(Ordering::Relaxed));
        c.summary(unfinished)
    }
}

/// How far (µs) a chunk's stamp may run ahead of the time since its connection opened (clock
/// skew, a burst after a stall) and still be believed.
pub const MAX_AHEAD_US: u64 = 5_000_000;

impl Shared {
    /// An inbound chunk stamped `timestamp_ms` arrived at `received_mono_us`. The earliest
    /// arrival relative to its stamp anchors the timeline (network delay only ever adds), but a
    /// chunk stamped later than the time since the connection opened (+ [`MAX_AHEAD_US`]) is
    /// not believed: Twilio's clock runs in real time from the stream's start, which comes
    /// after the connection's, and one bogus stamp must not move where every later played
    /// frame is placed.
    pub fn observe_media(&self, timestamp_ms: u64, received_mono_us: u64) {
        let stamp_us = timestamp_ms.saturating_mul(1000);
        let since_open = received_mono_us.saturating_sub(self.opened_mono_us);
        if stamp_us > since_open.saturating_add(MAX_AHEAD_US) {
            return;
        }
        // Both below 2^63 now (the monotonic clock is µs since process start).
        let offset = received_mono_us as i64 - stamp_us as i64;
        if offset >= self.timeline_offset_us.load(Ordering::Relaxed) {
            // The common case (no earlier than the anchor): a load, no atomic write.
            return;
        }
        self.timeline_offset_us.fetch_min(offset, Ordering::Relaxed);
    }

    /// The stream's timeline now, µs (the start message's arrival stands in for timeline zero
    /// until inbound audio arrives).
    pub fn timeline_now_us(&self, now_mono_us: u64) -> i64 {
        let off = self.timeline_offset_us.load(Ordering::Relaxed);
        if off == i64::MAX {
            0
        } else {
            (now_mono_us as i64).saturating_sub(off)
        }
    }
}

/// The consumer's end of one stream's downlink.
#[derive(Debug)]
pub struct Route {
    /// Where commands go.
    pub tx: Sender<Queued>,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The partition advertised in the stream's `start` event.
    pub partition: i32,
    /// Twilio announced an outbound track, which only one-way (`<Start>`) streams have:
    /// sending `media`, `mark` or `clear` on them is a protocol error at Twilio (31924), so
    /// only `stop` is taken.
    pub one_way: bool,
}

/// Process-wide bound on queued playback audio.
#[derive(Debug)]
pub struct Bounds {
    /// Per stream, bytes of μ-law.
    pub per_stream: u64,
    /// All streams, bytes of μ-law.
    pub total: u64,
    /// Queued now, all streams.
    pub queued: AtomicU64,
}

impl Route {
    /// Queues a command for the stream; `Err` with the reason when it must be dropped.
    pub fn push(
        &self,
        command: Command,
        produced_ms: i64,
        bounds: &Bounds,
    ) -> Result<(), PlaybackDrop> {
        if self.one_way && command != Command::Stop {
            return Err(PlaybackDrop::OneWayStream);
        }
        let s = &self.shared;
        let _accepting = s.accept.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed.load(Ordering::Relaxed) {
            // Its terminal event is out (or going): the summary is already taken.
            return Err(PlaybackDrop::Ended);
        }
        let len = match &command {
            Command::Media(b) => b.len() as u64,
            _ => 0,
        };
        if len > 0 {
            if s.queued_bytes.load(Ordering::Relaxed) + len > bounds.per_stream
                || bounds.queued.load(Ordering::Relaxed) + len > bounds.total
            {
                return Err(PlaybackDrop::BufferFull);
            }
            s.queued_bytes.fetch_add(len, Ordering::Relaxed);
            bounds.queued.fetch_add(len, Ordering::Relaxed);
        }
        let generation = if command == Command::Clear {
            s.clear_generation.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            s.clear_generation.load(Ordering::SeqCst)
        };
        let sent = self.tx.send(Queued {
            command,
            generation,
            produced_ms,
        });
        if sent.is_err() {
            // The connection is gone (its end is being processed): give the bytes back.
            s.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            bounds.queued.fetch_sub(len, Ordering::Relaxed);
            return Err(PlaybackDrop::Ended);
        }
        s.counters.records.fetch_add(1, Ordering::Relaxed);
        s.waker.wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_pending_at_a_clear_come_back_unplayed() {
        let mut l = MarkLedger::default();
        let m = |n: &str, d| SentMark {
            name: n.into(),
            due_us: d,
        };
        l.sent(m("a", 1));
        l.sent(m("b", 2));
        assert_eq!(
            l.echoed("a"),
            Some(Echo {
                played: true,
                due_us: 1
            })
        );
        l.sent(m("c", 3));
        l.cleared(0); // b and c still to play
        l.sent(m("d", 4));
        assert_eq!(l.echoed("b").map(|e| e.played), Some(false));
        assert_eq!(l.echoed("c").map(|e| e.played), Some(false));
        assert_eq!(l.echoed("d").map(|e| e.played), Some(true));
        assert_eq!(l.echoed("zzz"), None, "not ours");
    }

    #[test]
    fn a_mark_already_due_at_a_clear_stays_played() {
        let mut l = MarkLedger::default();
        let m = |n: &str, d| SentMark {
            name: n.into(),
            due_us: d,
        };
        l.sent(m("a", 1_000));
        l.sent(m("b", 2_000));
        l.sent(m("c", 3_000));
        l.cleared(2_000); // a and b have played (echoes in flight), c had not
        assert_eq!(l.echoed("a").map(|e| e.played), Some(true));
        assert_eq!(l.echoed("b").map(|e| e.played), Some(true));
        assert_eq!(l.echoed("c").map(|e| e.played), Some(false));
    }

    #[test]
    fn the_timeline_follows_the_least_delayed_chunk_but_not_a_bogus_stamp() {
        // Stamps later than the time since the connection opened (+5 s) are not believed, the
        // first one included; a real chunk after them anchors the timeline.
        let b = Shared::opened_at(1_000_000);
        b.observe_media(u64::MAX, 1_100_000);
        b.observe_media(1_000_000_000_000, 1_100_000);
        b.observe_media(5_200, 1_100_000); // 5.2 s stamped 0.1 s after open: too far ahead
        assert_eq!(b.timeline_now_us(2_000_000), 0, "nothing believed yet");
        b.observe_media(4_000, 1_100_000); // within the allowance
        assert_eq!(b.timeline_now_us(2_000_000), 4_900_000);
        // A first chunk that arrived late is corrected by later, less delayed ones.
        let late = Shared::opened_at(0);
        late.observe_media(0, 9_000_000); // chunk 0 delayed by a 9 s stall
        late.observe_media(10_000, 10_020_000); // chunk 500, 20 ms after its stamp
        assert_eq!(late.timeline_now_us(11_000_000), 10_980_000);
        let s = Shared::default();
        assert_eq!(s.timeline_now_us(5_000_000), 0, "no media yet");
        s.observe_media(0, 1_000_000); // chunk 0 arrived at 1 s
        s.observe_media(20, 1_030_000); // 10 ms late: no change
        assert_eq!(s.timeline_now_us(2_000_000), 1_000_000);
        s.observe_media(40, 1_035_000); // 5 ms earlier than chunk 0 implied
        assert_eq!(s.timeline_now_us(2_000_000), 1_005_000);
        s.observe_media(86_400_000, 1_040_000); // a day ahead: ignored
        s.observe_media(u64::MAX, 1_040_000);
        assert_eq!(s.timeline_now_us(2_000_000), 1_005_000);
    }

    /// A route on partition 0 and bounds of `per_stream` / `total` bytes.
    fn route_and_bounds(
        one_way: bool,
        per_stream: u64,
        total: u64,
    ) -> (Route, std::sync::mpsc::Receiver<Queued>, Bounds) {
        let (tx, rx) = std::sync::mpsc::channel();
        let route = Route {
            tx,
            shared: Arc::new(Shared::default()),
            partition: 0,
            one_way,
        };
        let bounds = Bounds {
            per_stream,
            total,
            queued: AtomicU64::new(0),
        };
        (route, rx, bounds)
    }

    #[test]
    fn a_one_way_stream_takes_only_stop() {
        let (route, rx, bounds) = route_and_bounds(true, 1000, 1000);
        for c in [
            Command::Media(vec![0xff; 160]),
            Command::Mark("m".into()),
            Command::Clear,
        ] {
            assert_eq!(route.push(c, 0, &bounds), Err(PlaybackDrop::OneWayStream));
        }
        assert_eq!(bounds.queued.load(Ordering::Relaxed), 0);
        assert_eq!(route.shared.clear_generation.load(Ordering::SeqCst), 0);
        assert_eq!(route.push(Command::Stop, 0, &bounds), Ok(()));
        assert_eq!(
            rx.try_iter().map(|q| q.command).collect::<Vec<_>>(),
            vec![Command::Stop]
        );
    }

    #[test]
    fn bounds_hold_per_stream_and_in_total() {
        let (route, rx, bounds) = route_and_bounds(false, 300, 250);
        assert!(route.push(Command::Media(vec![0; 200]), 1, &bounds).is_ok());
        assert_eq!(
            route.push(Command::Media(vec![0; 100]), 2, &bounds),
            Err(PlaybackDrop::BufferFull),
            "total bound"
        );
        assert!(route.push(Command::Mark("m".into()), 3, &bounds).is_ok());
        assert!(route.push(Command::Clear, 4, &bounds).is_ok());
        let got: Vec<u64> = rx.try_iter().map(|q| q.generation).collect();
        assert_eq!(
            got,
            [0, 0, 1],
            "items before the clear carry the older generation"
        );
        drop(rx);
        assert_eq!(
            route.push(Command::Stop, 5, &bounds),
            Err(PlaybackDrop::Ended)
        );
    }
}
