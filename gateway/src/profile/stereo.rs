//! Stereo layout: one output per call, inbound left and outbound right, placed on Twilio's
//! timestamps.
//!
//! # Timeline and spans
//!
//! Each track is resampled on its own (a [`TrackRun`] per track, restarted at every gap) and
//! its output samples are written at their positions on the stream timeline (output samples
//! since timestamp 0). The timeline is cut into **spans** of 20 ms on a fixed grid
//! (`[20k, 20k + 20)` ms); each span that holds audio from either track becomes one record of
//! `160·L` interleaved frames `L R L R …`, timestamp `20k`. Where a track has no audio — before
//! it starts, in its gaps, after it ends, or simply because Twilio omitted it — its channel is
//! silence (0.0). A span with audio from neither track is not emitted: records say where they
//! belong (`timestamp_ms`), and a call on hold does not turn into a burst of silent records.
//!
//! # When a span leaves
//!
//! Twilio delivers the two tracks independently. A track's audio is *final* up to its
//! `ready` position: the end of its last final output sample (the upsampler holds back ~2 ms
//! of look-ahead), or the start of its current run (the part before a gap is final: silence).
//! Span `[t, t+S)` is emitted
//! * as soon as both tracks are final past `t + S` — the normal case, one chunk of latency; or
//! * once one track is final past `t + S + lag` (`lag` = 200 ms by default): the other track
//!   is then taken to have nothing for that span (a one-sided silence, a track that starts
//!   late, an inbound-only stream) and its channel is silence. If that lagging track was in
//!   the middle of a run, its run is flushed first, so its audio up to where it stopped is
//!   complete (zero look-ahead, as at a gap) and its next chunk opens a new run.
//!
//! Audio that arrives for a span already emitted, or for a position its own track already
//! filled (a duplicate, a step back), is dropped and counted ([`Stereo::dropped_samples`]): the
//! first audio placed at a position wins, and nothing is ever emitted twice.
//!
//! # Bounds
//!
//! The window holds `W = 2 + ⌈lag / 20 ms⌉` spans per track (12 at the default lag), as a
//! ring of f32 samples allocated once: `W × 160·L × 4` bytes per track (30 KiB per stream at
//! 16 kHz, 90 KiB at 48 kHz with the default lag). Nothing is ever written past it: input is
//! fed in pieces of at most 20 ms, and after each piece the emission rule above keeps every
//! track's `ready` below `emit + S + lag`, so the next piece (≤ S samples) ends before
//! `emit + 2S + lag ≤ emit + W·S`; a flushed tail is at most `D` < `S` samples past `ready`.
//! A gap of any length costs O(1): when the window holds no audio, the emission point jumps.

use super::spec::SampleFormat;
use super::track::{input_position, ChunkInfo, TrackRun, CHUNK_SAMPLES, SAMPLES_PER_MS};
use super::{encode_into, Channel, ChunkIn, ProfileRecord};

/// Default bound on how far one track may run ahead of the other before the other is taken to
/// be silent.
pub const DEFAULT_MAX_LAG_MS: u32 = 200;

/// Largest lag accepted (the window's memory grows with it); larger values are clamped.
pub const MAX_LAG_LIMIT_MS: u32 = 10_000;

/// A span's length in milliseconds: one Twilio chunk.
const SPAN_MS: u64 = 20;

/// The chunk that supplied a track's earliest sample in a span.
#[derive(Debug, Clone, Copy)]
struct First {
    seq: u64,
    chunk: u64,
}

/// The stereo assembler of one stream.
#[derive(Debug)]
pub(super) struct Stereo {
    format: SampleFormat,
    tracks: [TrackRun; 2],
    /// `S`: output frames per span (`160·L`).
    span: u64,
    /// `W`: spans in the ring.
    spans: u64,
    /// The lag bound in output samples.
    lag: u64,
    /// Per track, `W·S` samples: ring slot `i` holds the span whose number is `≡ i (mod W)`
    /// among the `W` spans from `emit_pos`. Slots without audio are all zero (silence).
    window: [Vec<f32>; 2],
    /// Per track and ring slot: the chunk of the track's earliest sample in that span, `None`
    /// when the track put nothing there.
    first: [Vec<Option<First>>; 2],
    /// Ring slots holding audio from either track.
    occupied: usize,
    /// Start of the next span to emit (a multiple of `S`); everything before it is gone.
    emit_pos: u64,
    /// Per track: position up to which its audio is final.
    ready: [u64; 2],
    /// End of the last stereo record emitted (for [`ProfileRecord::contiguous`]).
    last_end: Option<u64>,
    /// Output samples (per channel) dropped as late or overlapping.
    dropped: u64,
    /// Resampler output of one piece (reused).
    scratch: Vec<f32>,
    /// Interleaved frames of the span being emitted (reused).
    frames: Vec<f32>,
    /// Payload of the record being emitted (reused).
    bytes: Vec<u8>,
}

impl Stereo {
    /// An assembler for output rate `rate`; `max_lag_ms` is clamped to [`MAX_LAG_LIMIT_MS`].
    pub fn new(rate: u32, format: SampleFormat, max_lag_ms: u32) -> Result<Self, String> {
        let make = || TrackRun::new(rate).map_err(|e| e.to_string());
        let tracks = [make()?, make()?];
        let factor = tracks[0].factor();
        let lag_ms = u64::from(max_lag_ms.min(MAX_LAG_LIMIT_MS));
        let span = CHUNK_SAMPLES as u64 * factor;
        let spans = 2 + lag_ms.div_ceil(SPAN_MS);
        let ring = (spans * span) as usize;
        Ok(Stereo {
            format,
            tracks,
            span,
            spans,
            lag: lag_ms * SAMPLES_PER_MS * factor,
            window: [vec![0.0; ring], vec![0.0; ring]],
            first: [vec![None; spans as usize], vec![None; spans as usize]],
            occupied: 0,
            emit_pos: 0,
            ready: [0; 2],
            last_end: None,
            dropped: 0,
            scratch: Vec::with_capacity(span as usize + 96),
            frames: Vec::with_capacity(2 * span as usize),
            bytes: Vec::with_capacity(2 * span as usize * format.bytes_per_sample()),
        })
    }

    /// Output samples (per channel) dropped because their span had already been emitted or
    /// their track had already filled that position.
    pub fn dropped_samples(&self) -> u64 {
        self.dropped
    }

    /// See [`super::ProfileStream::push`].
    pub fn push(&mut self, c: ChunkIn<'_>, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        let ChunkIn {
            track,
            ulaw,
            timestamp_ms,
            seq,
            chunk,
            contiguous,
        } = c;
        // The index is checked once here; everything below indexes with it.
        if track >= self.tracks.len() || ulaw.is_empty() {
            return;
        }
        let info = ChunkInfo {
            timestamp_ms,
            seq,
            chunk,
        };
        let input_pos = input_position(timestamp_ms);
        let mut continues = self.tracks[track].continues(input_pos, contiguous);
        if !continues {
            self.close_run(track);
            self.open_run(track, input_pos, out);
        }
        // Pieces of at most 20 ms keep every write inside the window (module docs, Bounds),
        // whatever the payload size.
        for piece in ulaw.chunks(CHUNK_SAMPLES) {
            if !self.tracks[track].is_open() {
                // The other track forced spans past this one mid-payload and flushed it: go on
                // with a new run where it stands.
                let at = self.tracks[track].next_input();
                self.open_run(track, at, out);
                continues = false;
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.clear();
            let pos = self.tracks[track].process(piece, info, continues, &mut scratch);
            self.write(track, pos, &scratch);
            self.scratch = scratch;
            continues = true;
            self.pump(out);
        }
    }

    /// See [`super::ProfileStream::finish`]: flushes both tracks, emits every span holding
    /// audio, and starts over as a new stream.
    pub fn finish(&mut self, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        for track in 0..self.tracks.len() {
            self.close_run(track);
        }
        // Every slot with audio lies in the ring, so W emissions reach them all.
        for _ in 0..self.spans {
            if self.occupied == 0 {
                break;
            }
            self.emit_front(out);
        }
        debug_assert_eq!(self.occupied, 0);
        for (window, first) in self.window.iter_mut().zip(self.first.iter_mut()) {
            window.fill(0.0);
            first.fill(None);
        }
        for run in &mut self.tracks {
            run.reset();
        }
        self.occupied = 0;
        self.emit_pos = 0;
        self.ready = [0; 2];
        self.last_end = None;
    }

    /// Opens a run of `track` at input position `input_pos` and lets the spans before it go
    /// if they can: the part of the track before its run is final (silence or earlier audio).
    fn open_run(&mut self, track: usize, input_pos: u64, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        let run = &mut self.tracks[track];
        run.open_at(input_pos);
        let origin = input_pos * run.factor();
        self.ready[track] = self.ready[track].max(origin);
        self.pump(out);
    }

    /// Flushes `track`'s run, if open, and places its tail.
    fn close_run(&mut self, track: usize) {
        if !self.tracks[track].is_open() {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let pos = self.tracks[track].flush(&mut scratch);
        self.write(track, pos, &scratch);
        self.scratch = scratch;
        // Every chunk of the flushed run is complete and placed.
        self.tracks[track].retire(u64::MAX);
    }

    /// Places `samples` of `track`, the first at output position `pos`, into the window.
    fn write(&mut self, track: usize, pos: u64, samples: &[f32]) {
        let end = pos + samples.len() as u64;
        // First audio placed wins; emitted spans are final.
        let floor = self.emit_pos.max(self.ready[track]);
        let skip = floor.saturating_sub(pos).min(samples.len() as u64);
        let mut at = pos + skip;
        let mut rest = &samples[skip as usize..];
        // Cannot happen (module docs, Bounds); if it ever did, dropping beats overwriting a
        // span that has not been emitted yet.
        let limit = self.emit_pos + self.spans * self.span;
        let keep = limit.saturating_sub(at).min(rest.len() as u64) as usize;
        debug_assert_eq!(keep, rest.len(), "write past the stereo window");
        self.dropped += skip + (rest.len() - keep) as u64;
        rest = &rest[..keep];

        let other = 1 - track;
        while !rest.is_empty() {
            let slot = ((at / self.span) % self.spans) as usize;
            let offset = (at % self.span) as usize;
            let n = (self.span as usize - offset).min(rest.len());
            let base = slot * self.span as usize + offset;
            if let Some(dst) = self.window[track].get_mut(base..base + n) {
                dst.copy_from_slice(&rest[..n]);
            }
            if self.first[track][slot].is_none() {
                // Writes of one track only move forward, so this is its earliest sample here.
                let first = self.tracks[track].chunk_at(at).map(|p| First {
                    seq: p.info.seq,
                    chunk: p.info.chunk,
                });
                // The chunk is always known (the run keeps it until placed); the fallback only
                // keeps the slot marked as holding audio.
                self.first[track][slot] = Some(first.unwrap_or(First { seq: 0, chunk: 0 }));
                if self.first[other][slot].is_none() {
                    self.occupied += 1;
                }
            }
            at += n as u64;
            rest = &rest[n..];
        }
        self.ready[track] = self.ready[track].max(end);
        self.tracks[track].retire(end);
    }

    /// Emits every span the rule allows (module docs, When a span leaves).
    fn pump(&mut self, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        loop {
            let end = self.emit_pos + self.span;
            let lo = self.ready[0].min(self.ready[1]);
            let hi = self.ready[0].max(self.ready[1]);
            let both = lo >= end;
            let forced = hi >= end + self.lag;
            if !both && !forced {
                return;
            }
            if self.occupied == 0 {
                // Nothing in the window: jump over the spans that would only be skipped, up to
                // where the rule stops — but not past a run's pending tail (it lands at or after
                // that run's `ready`).
                let mut goal = self.emit_pos;
                if both {
                    goal = goal.max(lo / self.span * self.span);
                }
                if forced {
                    // Smallest span start e with hi < e + S + lag.
                    goal = goal.max(((hi - self.span - self.lag) / self.span + 1) * self.span);
                }
                for (run, &ready) in self.tracks.iter().zip(&self.ready) {
                    if run.pending() > 0 {
                        goal = goal.min(ready / self.span * self.span);
                    }
                }
                if goal > self.emit_pos {
                    self.emit_pos = goal;
                    continue;
                }
            }
            if !both {
                // Forced: a track that has not reached the span's end is taken as silent from
                // where it stands; complete its audio up to there first.
                for track in 0..self.tracks.len() {
                    if self.ready[track] < end && self.tracks[track].pending() > 0 {
                        self.close_run(track);
                    }
                }
            }
            self.emit_front(out);
        }
    }

    /// Emits the span at `emit_pos` if it holds audio, clears its slot, and moves on.
    fn emit_front(&mut self, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        let span = self.span as usize;
        let slot = ((self.emit_pos / self.span) % self.spans) as usize;
        let first = self.first[0][slot].or(self.first[1][slot]);
        if let Some(first) = first {
            let range = slot * span..(slot + 1) * span;
            let (left, right) = (
                &self.window[0][range.clone()],
                &self.window[1][range.clone()],
            );
            self.frames.clear();
            self.frames.resize(2 * span, 0.0);
            for ((frame, &l), &r) in self.frames.chunks_exact_mut(2).zip(left).zip(right) {
                frame[0] = l;
                frame[1] = r;
            }
            self.bytes.clear();
            encode_into(self.format, &self.frames, &mut self.bytes);
            out(ProfileRecord {
                channel: Channel::Stereo,
                // Spans are 20 ms on the grid: `S` output samples are exactly 20 ms.
                timestamp_ms: self.emit_pos / self.span * SPAN_MS,
                chunks: 1,
                first_seq: first.seq,
                first_chunk: first.chunk,
                contiguous: self.last_end == Some(self.emit_pos),
                payload: &self.bytes,
            });
            self.last_end = Some(self.emit_pos + self.span);
            for track in 0..self.window.len() {
                self.window[track][range.clone()].fill(0.0);
                self.first[track][slot] = None;
            }
            self.occupied -= 1;
        }
        self.emit_pos += self.span;
    }
}
