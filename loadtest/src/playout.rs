//! Twilio's side of a bidirectional stream: the real-time playout model.
//!
//! What real Twilio does with what the server sends on a `<Connect><Stream>`: it buffers the
//! outbound μ-law and plays it in order, in real time (8 bytes per ms at 8 kHz; here 8 × speed
//! so a time-compressed run does not pile up audio); playout starts when media arrives while
//! nothing is playing. A `mark` is echoed when all audio received before it has played — at
//! once when nothing is buffered. `clear` discards the buffer and echoes every pending mark at
//! once.
//!
//! The model is pure arithmetic over the receipt instants the reader stamps: it keeps only the
//! instant the buffered audio runs out and the queue of pending marks (bounded), never the
//! audio itself. Echoes come out of [`Playout::take`] in the order Twilio would send them;
//! each says whether its audio played (`true`) or was cut by a clear (`false`).

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// One mark echo to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// The mark's name.
    pub name: String,
    /// The audio before it played to the end (false: a clear emptied the buffer first).
    pub played: bool,
}

/// Counters of one stream's playout.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlayoutStats {
    /// Media messages received.
    pub media_frames: u64,
    /// μ-law bytes received.
    pub media_bytes: u64,
    /// Marks received.
    pub marks: u64,
    /// Clears received.
    pub clears: u64,
    /// Marks echoed after their audio played.
    pub echoed_played: u64,
    /// Marks echoed because a clear emptied the buffer.
    pub echoed_cleared: u64,
    /// Marks refused because too many were pending (never echoed).
    pub marks_overflowed: u64,
    /// Audio thrown away by clears, in μ-law bytes (what was still buffered).
    pub bytes_cleared: u64,
    /// Longest buffered audio seen, ms (of audio, at speed 1).
    pub max_buffered_ms: u64,
}

/// The playout buffer of one simulated stream.
#[derive(Debug)]
pub struct Playout {
    /// Nanoseconds of wall time one μ-law byte takes to play (125 µs ÷ speed).
    ns_per_byte: f64,
    /// When the buffered audio runs out (≤ now: nothing playing).
    busy_until: Instant,
    /// Marks waiting for their audio: `(due, name)`, due times non-decreasing.
    pending: VecDeque<(Instant, String)>,
    /// Echoes decided but not yet taken, in order.
    ready: VecDeque<Echo>,
    max_pending: usize,
    /// Counters.
    pub stats: PlayoutStats,
}

impl Playout {
    /// A silent buffer at `now`; `speed` compresses playout like the uplink's `--speed`;
    /// at most `max_pending` marks wait at once (more are counted and dropped).
    pub fn new(now: Instant, speed: f64, max_pending: usize) -> Self {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        Playout {
            ns_per_byte: 125_000.0 / speed,
            busy_until: now,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            max_pending: max_pending.max(1),
            stats: PlayoutStats::default(),
        }
    }

    fn play_time(&self, bytes: u64) -> Duration {
        Duration::from_nanos((bytes as f64 * self.ns_per_byte).round() as u64)
    }

    /// Audio still buffered at `now`, as wall time.
    pub fn buffered(&self, now: Instant) -> Duration {
        self.busy_until.saturating_duration_since(now)
    }

    /// `bytes` of μ-law received at `at`: queued behind what is playing, or played from `at`.
    pub fn media(&mut self, at: Instant, bytes: usize) {
        self.stats.media_frames += 1;
        self.stats.media_bytes += bytes as u64;
        let start = self.busy_until.max(at);
        self.busy_until = start + self.play_time(bytes as u64);
        let buffered_ms = (self.buffered(at).as_nanos() as f64 / self.ns_per_byte / 8.0) as u64;
        self.stats.max_buffered_ms = self.stats.max_buffered_ms.max(buffered_ms);
    }

    /// A mark received at `at`: due when the audio buffered now has played (at once when
    /// nothing is buffered; [`Playout::take`] hands it out).
    pub fn mark(&mut self, at: Instant, name: String) {
        self.stats.marks += 1;
        if self.pending.len() >= self.max_pending {
            self.stats.marks_overflowed += 1;
            return;
        }
        self.pending.push_back((self.busy_until.max(at), name));
    }

    /// A clear received at `at`: marks whose audio had already played are echoed as played,
    /// every other pending mark as not played, and the buffer is emptied.
    pub fn clear(&mut self, at: Instant) {
        self.stats.clears += 1;
        self.release_due(at);
        while let Some((_, name)) = self.pending.pop_front() {
            self.stats.echoed_cleared += 1;
            self.ready.push_back(Echo {
                name,
                played: false,
            });
        }
        let left = self.buffered(at);
        self.stats.bytes_cleared += (left.as_nanos() as f64 / self.ns_per_byte).round() as u64;
        self.busy_until = self.busy_until.min(at);
    }

    fn release_due(&mut self, now: Instant) {
        while self.pending.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, name)) = self.pending.pop_front() {
                self.stats.echoed_played += 1;
                self.ready.push_back(Echo { name, played: true });
            }
        }
    }

    /// Moves every echo due at `now` into `out`, in order.
    pub fn take(&mut self, now: Instant, out: &mut Vec<Echo>) {
        self.release_due(now);
        out.extend(self.ready.drain(..));
    }

    /// When the next echo is due (`None` when no mark is waiting; echoes already decided are
    /// due at once and [`Playout::has_ready`] says so).
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.front().map(|(d, _)| *d)
    }

    /// Whether echoes are waiting to be taken right now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Marks waiting for their audio.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn take(p: &mut Playout) -> Vec<Echo> {
        let mut v = Vec::new();
        p.take(Instant::now(), &mut v);
        v
    }

    fn played(name: &str) -> Echo {
        Echo {
            name: name.into(),
            played: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn mark_with_nothing_buffered_is_echoed_at_once() {
        let mut p = Playout::new(Instant::now(), 1.0, 16);
        p.mark(Instant::now(), "a".into());
        assert_eq!(take(&mut p), vec![played("a")]);
        // Audio that has finished playing does not delay a mark either.
        p.media(Instant::now(), 160);
        tokio::time::advance(ms(25)).await;
        p.mark(Instant::now(), "b".into());
        assert_eq!(take(&mut p), vec![played("b")]);
        assert_eq!(p.stats.echoed_played, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn mark_waits_for_the_audio_before_it_in_real_time() {
        let t0 = Instant::now();
        let mut p = Playout::new(t0, 1.0, 16);
        // 3 × 160 bytes = 60 ms of audio arriving at once, then a mark, then more audio.
        for _ in 0..3 {
            p.media(t0, 160);
        }
        p.mark(t0, "after-60".into());
        p.media(t0, 800); // 100 ms more; must not delay the mark
        p.mark(t0, "after-160".into());
        assert_eq!(p.next_due(), Some(t0 + ms(60)));
        assert!(take(&mut p).is_empty());
        tokio::time::advance(ms(59)).await;
        assert!(take(&mut p).is_empty());
        tokio::time::advance(ms(1)).await;
        assert_eq!(take(&mut p), vec![played("after-60")]);
        assert_eq!(p.next_due(), Some(t0 + ms(160)));
        tokio::time::advance(ms(100)).await;
        assert_eq!(take(&mut p), vec![played("after-160")]);
        assert_eq!(p.next_due(), None);
        assert_eq!(p.stats.max_buffered_ms, 160);
    }

    #[tokio::test(start_paused = true)]
    async fn playout_starts_when_media_arrives_while_idle() {
        let t0 = Instant::now();
        let mut p = Playout::new(t0, 1.0, 16);
        p.media(t0, 160); // plays 0..20 ms
        tokio::time::advance(ms(50)).await;
        let t1 = Instant::now();
        p.media(t1, 160); // idle since 20 ms: plays 50..70 ms
        p.mark(t1, "m".into());
        assert_eq!(p.next_due(), Some(t1 + ms(20)));
        // Media arriving while playing queues behind: 70..90 ms.
        tokio::time::advance(ms(10)).await;
        p.media(Instant::now(), 160);
        p.mark(Instant::now(), "n".into());
        assert_eq!(p.next_due(), Some(t1 + ms(20)));
        tokio::time::advance(ms(30)).await;
        assert_eq!(take(&mut p), vec![played("m"), played("n")]);
    }

    #[tokio::test(start_paused = true)]
    async fn clear_echoes_pending_marks_unplayed_and_empties_the_buffer() {
        let t0 = Instant::now();
        let mut p = Playout::new(t0, 1.0, 16);
        p.media(t0, 160);
        p.mark(t0, "played-before-clear".into()); // due at 20 ms
        p.media(t0, 1600); // 200 ms more
        p.mark(t0, "x".into());
        p.mark(t0, "y".into());
        tokio::time::advance(ms(30)).await;
        // Not taken yet when the clear arrives: the first mark had played, the others not.
        p.clear(Instant::now());
        assert_eq!(
            take(&mut p),
            vec![
                played("played-before-clear"),
                Echo {
                    name: "x".into(),
                    played: false
                },
                Echo {
                    name: "y".into(),
                    played: false
                },
            ]
        );
        assert_eq!(p.buffered(Instant::now()), Duration::ZERO);
        // 10 ms of the 200 ms chunk had played: 190 ms = 1520 bytes discarded.
        assert_eq!(p.stats.bytes_cleared, 1520);
        assert_eq!((p.stats.echoed_played, p.stats.echoed_cleared), (1, 2));
        // After the clear, a mark is echoed at once and new audio starts now.
        p.mark(Instant::now(), "z".into());
        assert_eq!(take(&mut p), vec![played("z")]);
        p.media(Instant::now(), 80);
        assert_eq!(p.buffered(Instant::now()), ms(10));
    }

    #[tokio::test(start_paused = true)]
    async fn speed_compresses_playout_and_pending_marks_are_bounded() {
        let t0 = Instant::now();
        let mut p = Playout::new(t0, 4.0, 2);
        p.media(t0, 1600); // 200 ms of audio plays in 50 ms at speed 4
        p.mark(t0, "a".into());
        p.mark(t0, "b".into());
        p.mark(t0, "c".into()); // over the bound
        assert_eq!(p.stats.marks_overflowed, 1);
        assert_eq!(p.pending(), 2);
        assert_eq!(p.next_due(), Some(t0 + ms(50)));
        tokio::time::advance(ms(50)).await;
        assert_eq!(take(&mut p), vec![played("a"), played("b")]);
        assert!(!p.has_ready());
    }
}
