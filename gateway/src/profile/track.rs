//! One track's resampling *run*: the stretch of a track whose chunks are exactly contiguous,
//! fed through one [`Upsampler`] without a restart, and the bookkeeping that maps every output
//! sample back to a place on the stream timeline and to the Twilio chunk it came from.
//!
//! # Positions
//!
//! Everything is placed in *output samples since the stream started*: a chunk with Twilio
//! timestamp `t` ms starts at input sample `8·t` (8 kHz) and at output position `8·t·L`. The
//! upsampler is delay-compensated, so the `n`-th sample it produces in a run that opened at
//! input sample `s` sits exactly at output position `L·s + n`, whatever the filter's latency.
//!
//! A run ends at a flush: the filter's tail is computed with silence after the last input (the
//! upsampler's `flush`), which completes the last chunk with zero look-ahead instead of
//! smearing samples across a gap, and the next chunk opens a new run at its own timestamp.

use std::collections::VecDeque;

use dsp::g711;
use dsp::resample::UnsupportedRate;
use dsp::Upsampler;

/// Timestamps are clamped to this (2⁴⁰ ms ≈ 34.8 years) before they are turned into positions,
/// so that `ms × 8 × L` plus any in-memory payload stays far below `u64::MAX` and a hostile
/// timestamp cannot overflow the arithmetic. Real streams never get near it.
pub(super) const MAX_TIMESTAMP_MS: u64 = 1 << 40;

/// Input samples per millisecond (8 kHz μ-law).
pub(super) const SAMPLES_PER_MS: u64 = 8;

/// Input samples in one standard 20 ms Twilio chunk.
pub(super) const CHUNK_SAMPLES: usize = 160;

/// Where the input sample at Twilio timestamp `timestamp_ms` sits, in input samples.
pub(super) fn input_position(timestamp_ms: u64) -> u64 {
    timestamp_ms.min(MAX_TIMESTAMP_MS) * SAMPLES_PER_MS
}

/// What a record says about the Twilio chunk its first sample came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkInfo {
    /// `media.timestamp` as Twilio sent it (not clamped).
    pub timestamp_ms: u64,
    /// `sequenceNumber`.
    pub seq: u64,
    /// `media.chunk`.
    pub chunk: u64,
}

/// One input chunk placed on the output timeline.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placed {
    /// First output position of the chunk.
    pub start: u64,
    /// One past its last output position (`start + L × its samples`).
    pub end: u64,
    /// The Twilio chunk.
    pub info: ChunkInfo,
    /// True when it continued the run (false for the first chunk of a run).
    pub continues: bool,
}

/// The resampler of one track plus the chunks whose output is not yet fully handed over.
#[derive(Debug)]
pub(super) struct TrackRun {
    up: Upsampler,
    factor: u64,
    /// A run is in progress: the upsampler holds history that the next contiguous chunk
    /// continues.
    open: bool,
    /// Output position of the run's first sample (`L ×` the input position it opened at).
    origin: u64,
    /// Input position right after the last sample consumed: where a contiguous chunk starts.
    next_input: u64,
    /// Chunks of the run (and, until handed over, of the run just flushed) whose output has not
    /// been fully handed over, oldest first. Bounded: the owner retires every chunk whose last
    /// sample it has taken, and a chunk stays incomplete only while its end lies in the last
    /// `D` output samples (< 16 input samples), so at most 17 chunks wait here — one with
    /// Twilio's 160-sample chunks.
    placed: VecDeque<Placed>,
    /// μ-law decoded to i16 (reused).
    pcm: Vec<i16>,
}

impl TrackRun {
    /// A closed run for output rate `rate`.
    pub fn new(rate: u32) -> Result<Self, UnsupportedRate> {
        let up = Upsampler::new(rate)?;
        let factor = up.factor() as u64;
        Ok(TrackRun {
            up,
            factor,
            open: false,
            origin: 0,
            next_input: 0,
            placed: VecDeque::with_capacity(4),
            pcm: Vec::with_capacity(CHUNK_SAMPLES),
        })
    }

    /// The upsampling factor `L`.
    pub fn factor(&self) -> u64 {
        self.factor
    }

    /// True while a run is in progress.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Input position where a contiguous chunk would start.
    pub fn next_input(&self) -> u64 {
        self.next_input
    }

    /// Output samples the open run still owes for input already consumed (the filter's
    /// look-ahead, `D` once 16 samples are in; 0 for the 8 kHz pass-through).
    pub fn pending(&self) -> usize {
        if self.open {
            self.up.pending()
        } else {
            0
        }
    }

    /// Output position right after the last final sample of the open run.
    pub fn produced_end(&self) -> u64 {
        self.origin + self.up.produced()
    }

    /// Whether a chunk starting at input position `input_pos` continues the open run. The
    /// caller's `contiguous` (the session's judgement) can only force a restart; the timeline
    /// itself must agree, so a run is never joined across audio that is not adjacent.
    pub fn continues(&self, input_pos: u64, contiguous: bool) -> bool {
        self.open && contiguous && input_pos == self.next_input
    }

    /// Opens a run at input position `input_pos`. The previous run must have been flushed
    /// (its chunks may still wait in the queue until the owner retires them).
    pub fn open_at(&mut self, input_pos: u64) {
        debug_assert!(!self.open, "open_at on an open run");
        if self.open {
            // Defensive: never carry history into a run that does not follow it.
            self.up.reset();
        }
        self.open = true;
        self.origin = input_pos * self.factor;
        self.next_input = input_pos;
    }

    /// Feeds one chunk (or piece of a chunk) of μ-law to the open run and appends every output
    /// sample that became final to `out`. Returns the output position of the first appended
    /// sample. `out` only grows if it lacks capacity.
    pub fn process(
        &mut self,
        ulaw: &[u8],
        info: ChunkInfo,
        continues: bool,
        out: &mut Vec<f32>,
    ) -> u64 {
        let first = self.produced_end();
        let start = self.next_input * self.factor;
        let len = ulaw.len() as u64;
        self.placed.push_back(Placed {
            start,
            end: start + len * self.factor,
            info,
            continues,
        });
        self.pcm.clear();
        g711::decode_into(ulaw, &mut self.pcm);
        out.reserve(self.up.output_len(self.pcm.len()));
        self.up.process(&self.pcm, out);
        self.next_input += len;
        first
    }

    /// Ends the run: appends the samples still owed (the tail, computed with silence after the
    /// last input) to `out` and closes it. Returns the output position of the first appended
    /// sample. After it, every chunk of the run is complete.
    pub fn flush(&mut self, out: &mut Vec<f32>) -> u64 {
        let first = self.produced_end();
        if self.open {
            out.reserve(self.up.pending());
            self.up.flush(out);
            self.open = false;
        }
        first
    }

    /// The oldest chunk not yet retired.
    pub fn front(&self) -> Option<&Placed> {
        self.placed.front()
    }

    /// Forgets the oldest chunk (its output has been handed over).
    pub fn pop_front(&mut self) {
        self.placed.pop_front();
    }

    /// The chunk whose output covers position `pos`.
    pub fn chunk_at(&self, pos: u64) -> Option<&Placed> {
        self.placed.iter().find(|p| p.start <= pos && pos < p.end)
    }

    /// Forgets every chunk whose output ends at or before `pos`.
    pub fn retire(&mut self, pos: u64) {
        while self.placed.front().is_some_and(|p| p.end <= pos) {
            self.placed.pop_front();
        }
    }

    /// Back to the state after construction (end of stream).
    pub fn reset(&mut self) {
        self.up.reset();
        self.open = false;
        self.origin = 0;
        self.next_input = 0;
        self.placed.clear();
    }
}
