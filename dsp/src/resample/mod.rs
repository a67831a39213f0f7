//! Streaming band-limited upsampler for 8 kHz telephone audio: 8000 Hz → 16000, 24000 or
//! 48000 Hz (integer factors `L` = 2, 3, 6), plus an 8000 Hz pass-through (`L` = 1) so that
//! callers can treat every output profile the same way.
//!
//! # Filter
//!
//! A polyphase FIR: a Kaiser-windowed sinc (β = 7.30, Kaiser's value for 75 dB) with
//! [`TAPS_PER_PHASE`] = 32 taps per branch, `32·L − 1` taps in all, designed in f64 at
//! construction and stored as f32. Cut-off at 4000 Hz, the middle of the transition band
//! [`PASSBAND_EDGE_HZ`] → [`STOPBAND_EDGE_HZ`]. Measured on the stored coefficients (tests
//! `design_meets_spec_*`): passband ripple ≤ 0.0019 dB over 0–3400 Hz and stopband attenuation
//! ≥ 73.4 dB from 4600 Hz to the output Nyquist frequency, for every factor. The guaranteed
//! bounds the tests enforce are [`PASSBAND_RIPPLE_DB`] and [`STOPBAND_ATTENUATION_DB`].
//!
//! The cut-off at the input Nyquist frequency makes the filter interpolating: one branch in `L`
//! is an exact delay, so every `L`-th output sample *is* the input sample (÷ 32768, bit-exact),
//! and only `L − 1` dot products are computed per input sample.
//!
//! # Timing and sample counts
//!
//! The filter is linear-phase with a group delay of `D = 16·L − 1` output samples
//! ([`Upsampler::delay`]: 31, 47, 95 samples = 1.94, 1.96, 1.98 ms at 16, 24, 48 kHz). The
//! upsampler compensates it: it discards the first `D` filter outputs, so output sample `n`
//! corresponds exactly to time `n / out_rate` on the input's timeline (input sample `j` ↔ time
//! `j / 8000`; output `j·L` equals input `j`).
//!
//! * [`Upsampler::process`] appends every output sample that is final so far: after `T` input
//!   samples in total that is `max(0, L·T − D)` samples (`L·len − D` on a first call of
//!   `len ≥ 16` samples, `L·len` on every later call).
//! * [`Upsampler::flush`] appends the [`Upsampler::pending`] samples still owed (normally `D`),
//!   computed as if the input continued with silence, and resets the state for a new stream.
//!   Total output over a stream is therefore exactly `L ×` total input.
//! * [`Upsampler::produced`] is the number of final samples appended since the start of the
//!   stream. A caller cutting records on Twilio chunk boundaries: chunk `k` (input samples
//!   `160k .. 160k+160`, timestamp `20k` ms) is output samples `160·L·k .. 160·L·(k+1)`; it is
//!   complete once `produced() ≥ 160·L·(k+1)`, which happens when chunk `k + 1` has been
//!   processed, or at `flush`.
//!
//! ```
//! use dsp::resample::Upsampler;
//!
//! let mut up = Upsampler::new(16_000)?;
//! let mut out = Vec::with_capacity(2 * 160 * 50);
//! let chunk = [0i16; 160]; // one 20 ms Twilio chunk, already μ-law decoded
//! up.process(&chunk, &mut out);
//! assert_eq!(out.len(), 320 - up.delay()); // the filter's tail is still owed…
//! up.process(&chunk, &mut out);
//! assert_eq!(up.produced(), 640 - 31); // …so chunk 0 (samples 0..320) is complete
//! up.flush(&mut out); // end of stream: the owed samples
//! assert_eq!(out.len(), 640); // exactly L × input
//! # Ok::<(), dsp::resample::UnsupportedRate>(())
//! ```
//!
//! One `Upsampler` holds the state of one track of one stream; chunks of any size (including
//! empty and odd sizes) can be fed, and the output does not depend on how the input was cut:
//! chunked and one-shot processing give bit-identical samples.
//!
//! # Cost
//!
//! State is sized at construction (≈ 1.1 KiB at `L` = 6); `process` and `flush` allocate only
//! if `out` lacks capacity (see [`Upsampler::output_len`]). Input is converted to f32 into a
//! linear history buffer (the last 31 samples followed by up to 64 new ones, so every filter
//! window is a contiguous slice and nothing wraps). The kernel computes eight consecutive
//! outputs of one branch at a time: for each tap, a broadcast times a contiguous slice of
//! history, accumulated lane-wise. That auto-vectorises to plain SSE loads, multiplies and adds
//! with no horizontal reductions; a per-output dot product was 2.4–4.6× slower because the
//! compiler vectorised it across branches with gathers. `README.md` has the benchmark against
//! `rubato`.

mod design;
#[cfg(test)]
mod tests;

use std::fmt;

/// The only input rate: G.711 telephone audio.
pub const INPUT_RATE_HZ: u32 = 8000;

/// Output rates [`Upsampler::new`] accepts.
pub const OUTPUT_RATES_HZ: [u32; 4] = [8000, 16000, 24000, 48000];

/// Taps per polyphase branch (the same for every factor: the transition band is fixed in Hz, so
/// the filter length in output samples grows with `L` and the per-branch length does not).
pub const TAPS_PER_PHASE: usize = 32;

/// Upper edge of the passband the filter is specified for (the telephone band).
pub const PASSBAND_EDGE_HZ: f64 = 3400.0;

/// Lower edge of the stopband: the nearest image of a 3400 Hz tone (8000 − 3400).
pub const STOPBAND_EDGE_HZ: f64 = 4600.0;

/// Bound on the passband ripple (peak deviation from 0 dB over 0–3400 Hz) that the tests
/// enforce for every factor; the measured value is ≤ 0.0019 dB.
pub const PASSBAND_RIPPLE_DB: f64 = 0.002;

/// Bound on the stopband attenuation (from 4600 Hz to the output Nyquist frequency) that the
/// tests enforce for every factor; the measured value is ≥ 73.4 dB.
pub const STOPBAND_ATTENUATION_DB: f64 = 73.0;

/// Kaiser's formula target; β = 0.1102 · (75 − 8.7) = 7.30 maximises the attenuation at this
/// length (a larger β widens the main lobe past 4600 Hz, a smaller one raises the side lobes).
const DESIGN_ATTENUATION_DB: f64 = 75.0;

/// Input samples converted per pass; bounds the history buffer independently of chunk sizes.
const BLOCK: usize = 64;

/// History kept between blocks: the last `TAPS_PER_PHASE − 1` input samples.
const HISTORY: usize = TAPS_PER_PHASE - 1;

/// Outputs of one branch computed together (vector lanes): two SSE or one AVX register.
const GROUP: usize = 8;

/// i16 full scale → 1.0.
const SCALE: f32 = 1.0 / 32768.0;

/// The output rate asked for is not one the upsampler supports (see [`OUTPUT_RATES_HZ`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsupportedRate(pub u32);

impl fmt::Display for UnsupportedRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unsupported output rate {} Hz (supported: {:?} Hz from {} Hz)",
            self.0, OUTPUT_RATES_HZ, INPUT_RATE_HZ
        )
    }
}

impl std::error::Error for UnsupportedRate {}

/// Streaming 8 kHz → `8000·L` Hz upsampler for one track of one stream. See the
/// [module documentation](self) for the filter, the timing contract and the costs.
#[derive(Clone, Debug)]
pub struct Upsampler {
    factor: usize,
    delay: usize,
    /// Taps of branches `0 .. L−1`, each reversed so that it lines up with the history window
    /// (oldest sample first). Branch `L − 1` is the exact delay and has no taps.
    branches: Box<[[f32; TAPS_PER_PHASE]]>,
    /// `HISTORY` past input samples followed by room for one block of new ones, normalised,
    /// plus one slot so that a full `GROUP` window always fits.
    history: Box<[f32; HISTORY + BLOCK + 1]>,
    /// Filter outputs still to discard before output sample 0 (counts down from `delay`).
    skip: usize,
    consumed: u64,
    produced: u64,
}

impl Upsampler {
    /// An upsampler from 8000 Hz to `out_rate_hz`, one of [`OUTPUT_RATES_HZ`].
    pub fn new(out_rate_hz: u32) -> Result<Self, UnsupportedRate> {
        if !OUTPUT_RATES_HZ.contains(&out_rate_hz) {
            return Err(UnsupportedRate(out_rate_hz));
        }
        Ok(Self::with_factor((out_rate_hz / INPUT_RATE_HZ) as usize))
    }

    fn with_factor(factor: usize) -> Self {
        let (branches, delay) = if factor == 1 {
            (Vec::new(), 0)
        } else {
            let beta = design::kaiser_beta(DESIGN_ATTENUATION_DB);
            let taps = design::prototype(factor, TAPS_PER_PHASE, beta);
            // Branch p holds taps p, p+L, p+2L, …; y[qL + p] = Σ_i taps[p + iL] · x[q − i].
            // Reversing each branch turns that into a forward dot product with the window
            // x[q − K + 1 ..= q].
            let branches: Vec<[f32; TAPS_PER_PHASE]> = (0..factor - 1)
                .map(|p| {
                    let mut branch = [0.0f32; TAPS_PER_PHASE];
                    for (t, tap) in branch.iter_mut().enumerate() {
                        *tap = taps[p + (TAPS_PER_PHASE - 1 - t) * factor] as f32;
                    }
                    branch
                })
                .collect();
            // Centre of the (K·L − 1)-tap filter, in output samples.
            (branches, TAPS_PER_PHASE * factor / 2 - 1)
        };
        Upsampler {
            factor,
            delay,
            branches: branches.into_boxed_slice(),
            history: Box::new([0.0; HISTORY + BLOCK + 1]),
            skip: delay,
            consumed: 0,
            produced: 0,
        }
    }

    /// The upsampling factor `L` (output rate / 8000).
    pub fn factor(&self) -> usize {
        self.factor
    }

    /// The output rate in Hz.
    pub fn out_rate(&self) -> u32 {
        INPUT_RATE_HZ * self.factor as u32
    }

    /// The filter's group delay `D` in output samples (0 for the pass-through), which the
    /// upsampler compensates: it is how far [`process`](Self::process) output lags behind
    /// `L ×` input, and what [`flush`](Self::flush) appends at the end of a stream.
    pub fn delay(&self) -> usize {
        self.delay
    }

    /// Input samples consumed since the start of the stream (or the last `flush`/`reset`).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Final output samples appended since the start of the stream. Output sample `n` is at
    /// time `n / out_rate`; see the module documentation for cutting records on chunk
    /// boundaries.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Output samples owed for the input consumed so far, `L·consumed − produced`: at most `D`,
    /// and what [`flush`](Self::flush) will append.
    pub fn pending(&self) -> usize {
        (self.factor as u64 * self.consumed - self.produced) as usize
    }

    /// Exactly how many samples [`process`](Self::process) will append for `input_len` more
    /// input samples: reserve this much in `out` to make the call allocation-free.
    pub fn output_len(&self, input_len: usize) -> usize {
        let raw = self.factor * input_len;
        raw - raw.min(self.skip)
    }

    /// Upsamples `input` (the next samples of the stream) and appends every output sample that
    /// is now final to `out`, as f32 with full scale ±1.0 (`i16 / 32768`).
    pub fn process(&mut self, input: &[i16], out: &mut Vec<f32>) {
        let before = out.len();
        if self.factor == 1 {
            out.extend(input.iter().map(|&s| f32::from(s) * SCALE));
        } else {
            for block in input.chunks(BLOCK) {
                self.process_block(block, out);
            }
        }
        self.consumed += input.len() as u64;
        self.produced += (out.len() - before) as u64;
    }

    /// Ends the stream: appends the [`pending`](Self::pending) samples (the filter's tail,
    /// computed with silence after the last input), then resets the state. After it, the stream
    /// has produced exactly `L ×` its input.
    pub fn flush(&mut self, out: &mut Vec<f32>) {
        let owed = self.pending();
        if owed > 0 {
            let end = out.len() + owed;
            // ⌈D / L⌉ = 16 silent input samples make every owed output final (the last input
            // sample's contribution ends D output samples after it); the surplus is cut off.
            let silence = [0i16; TAPS_PER_PHASE / 2];
            self.process_block(&silence[..self.delay.div_ceil(self.factor)], out);
            out.truncate(end);
        }
        self.reset();
    }

    /// Forgets the stream: clears the history and the counters, as after construction.
    pub fn reset(&mut self) {
        self.history.fill(0.0);
        self.skip = self.delay;
        self.consumed = 0;
        self.produced = 0;
    }

    /// Magnitude response of this upsampler's filter at `freq_hz` (computed from the stored f32
    /// coefficients, normalised so the passband is 1.0): the gain a tone at `freq_hz`, or an
    /// image of a tone landing at `freq_hz`, gets through [`process`](Self::process).
    pub fn response(&self, freq_hz: f64) -> f64 {
        if self.factor == 1 {
            return 1.0;
        }
        let (l, k) = (self.factor, TAPS_PER_PHASE);
        let mut taps = vec![0.0f64; k * l];
        for (p, branch) in self.branches.iter().enumerate() {
            for (t, &tap) in branch.iter().enumerate() {
                taps[p + (k - 1 - t) * l] = f64::from(tap);
            }
        }
        taps[self.delay] = 1.0;
        design::magnitude(&taps, l, freq_hz, f64::from(self.out_rate()))
    }

    /// Upsamples at most `BLOCK` samples. Does not touch the counters.
    fn process_block(&mut self, block: &[i16], out: &mut Vec<f32>) {
        let n = block.len().min(BLOCK);
        let factor = self.factor;
        let history = &mut self.history;
        for (dst, &s) in history[HISTORY..HISTORY + n].iter_mut().zip(block) {
            *dst = f32::from(s) * SCALE;
        }

        // Every filter output for this block, L per input sample, written in place.
        let start = out.len();
        out.resize(start + n * factor, 0.0);
        let frames = &mut out[start..];
        for q0 in (0..n).step_by(GROUP) {
            // Input window of GROUP consecutive outputs. Lanes past `n` read stale history and
            // are computed but never stored: cheaper than a scalar tail.
            let Some(x) = history[q0..].first_chunk::<{ TAPS_PER_PHASE + GROUP }>() else {
                break;
            };
            let group = &mut frames[q0 * factor..];
            for (p, taps) in self.branches.iter().enumerate() {
                let y = group_outputs(taps, x);
                for (frame, &v) in group.chunks_exact_mut(factor).zip(&y) {
                    frame[p] = v;
                }
            }
            // The last branch is the exact delay: the centre tap (1.0) sits at offset K/2.
            for (frame, &v) in group
                .chunks_exact_mut(factor)
                .zip(&x[TAPS_PER_PHASE / 2..TAPS_PER_PHASE / 2 + GROUP])
            {
                frame[factor - 1] = v;
            }
        }

        // Start of the stream: drop the first D filter outputs, which precede time 0. Only the
        // first block or two of a stream get here, and the shift is at most D samples.
        if self.skip > 0 {
            let k = self.skip.min(n * factor);
            out.drain(start..start + k);
            self.skip -= k;
        }

        // Keep the newest HISTORY samples for the next block.
        history.copy_within(n..n + HISTORY, 0);
    }
}

/// Outputs of one branch for `GROUP` consecutive input positions: lane `j` is the dot product
/// of `taps` with `x[j .. j + K]`.
///
/// The loop runs over taps with the lanes innermost: each tap is broadcast and multiplied with
/// a contiguous, unaligned slice of the history, so the compiler emits plain vector loads,
/// multiplies and adds, with no horizontal reduction. Even and odd taps go to separate partial
/// sums to halve the add dependency chain. Each lane does the same operations in the same
/// order, so an output's value does not depend on which lane or block computed it.
#[inline(always)]
fn group_outputs(taps: &[f32; TAPS_PER_PHASE], x: &[f32; TAPS_PER_PHASE + GROUP]) -> [f32; GROUP] {
    let mut even = [0.0f32; GROUP];
    let mut odd = [0.0f32; GROUP];
    for (i, pair) in taps.chunks_exact(2).enumerate() {
        let (Some(xe), Some(xo)) = (
            x[2 * i..].first_chunk::<GROUP>(),
            x[2 * i + 1..].first_chunk::<GROUP>(),
        ) else {
            continue;
        };
        let (te, to) = (pair[0], pair[1]);
        for ((e, o), (&a, &b)) in even.iter_mut().zip(odd.iter_mut()).zip(xe.iter().zip(xo)) {
            *e += te * a;
            *o += to * b;
        }
    }
    let mut y = [0.0f32; GROUP];
    for ((y, e), o) in y.iter_mut().zip(even).zip(odd) {
        *y = e + o;
    }
    y
}
