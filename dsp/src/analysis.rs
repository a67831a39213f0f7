//! Single-frequency level measurement, to verify filters on their actual output.
//!
//! [`tone_amplitude`] correlates a signal with a complex exponential at one frequency (a
//! single-bin DFT). With a rectangular window it is exact — no leakage at all — when every
//! frequency of interest completes a whole number of cycles in the window, so tests pick a
//! window of exactly one second (1 Hz bins) and integer-Hz tones: then the tone and each of its
//! images sit on their own bins and a 90 dB difference in level is measurable. For other
//! windows [`tone_amplitude_windowed`] applies a 4-term Blackman–Harris window (side lobes
//! ≈ −92 dB) at the price of a wider main lobe.
//!
//! The phase is computed from `freq × n` reduced modulo the rate in f64 for each sample rather
//! than by a recurrence, so that long windows accumulate no phase error. Speed is not a goal
//! here.

use std::f64::consts::TAU;

/// Amplitude (peak, same unit as the samples) of the component at `freq_hz` in `signal`
/// sampled at `rate_hz`, with a rectangular window.
pub fn tone_amplitude<T: Copy + Into<f64>>(signal: &[T], freq_hz: f64, rate_hz: f64) -> f64 {
    correlate(signal, freq_hz, rate_hz, |_| 1.0) * 2.0 / signal.len().max(1) as f64
}

/// Like [`tone_amplitude`] but with a 4-term Blackman–Harris window, for frequencies that do not
/// complete whole cycles in the window. The result is corrected for the window's coherent gain.
pub fn tone_amplitude_windowed<T: Copy + Into<f64>>(
    signal: &[T],
    freq_hz: f64,
    rate_hz: f64,
) -> f64 {
    let n = signal.len();
    let window = |i: usize| blackman_harris(i, n);
    let gain: f64 = (0..n).map(window).sum();
    if gain == 0.0 {
        return 0.0;
    }
    correlate(signal, freq_hz, rate_hz, window) * 2.0 / gain
}

/// Ratio in decibels (20·log10), for amplitudes.
pub fn db(ratio: f64) -> f64 {
    20.0 * ratio.log10()
}

/// Sample `i` of a periodic-symmetric 4-term Blackman–Harris window of length `n`.
pub fn blackman_harris(i: usize, n: usize) -> f64 {
    const A: [f64; 4] = [0.35875, 0.48829, 0.14128, 0.01168];
    let x = TAU * i as f64 / n.max(1) as f64;
    A[0] - A[1] * x.cos() + A[2] * (2.0 * x).cos() - A[3] * (3.0 * x).cos()
}

fn correlate<T: Copy + Into<f64>>(
    signal: &[T],
    freq_hz: f64,
    rate_hz: f64,
    window: impl Fn(usize) -> f64,
) -> f64 {
    let (mut re, mut im) = (0.0f64, 0.0f64);
    for (i, &x) in signal.iter().enumerate() {
        let cycles = (freq_hz * i as f64).rem_euclid(rate_hz) / rate_hz;
        let (s, c) = (TAU * cycles).sin_cos();
        let v = x.into() * window(i);
        re += v * c;
        im -= v * s;
    }
    re.hypot(im)
}

/// In-place iterative radix-2 FFT (decimation in time); `re.len()` must be a power of two.
pub fn fft(re: &mut [f64], im: &mut [f64]) {
    let n = re.len();
    assert!(n.is_power_of_two() && im.len() == n);
    let mut j = 0;
    for i in 1..n {
        let mut bit = n >> 1;
        while j & bit != 0 {
            j ^= bit;
            bit >>= 1;
        }
        j |= bit;
        if i < j {
            re.swap(i, j);
            im.swap(i, j);
        }
    }
    let mut len = 2;
    while len <= n {
        let angle = -TAU / len as f64;
        for start in (0..n).step_by(len) {
            for k in 0..len / 2 {
                let (s, c) = (angle * k as f64).sin_cos();
                let (a, b) = (start + k, start + k + len / 2);
                let (tr, ti) = (re[b] * c - im[b] * s, re[b] * s + im[b] * c);
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
            }
        }
        len <<= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_bin_centred_tones_exactly_and_separates_them() {
        let rate = 8000.0;
        let signal: Vec<f64> = (0..8000)
            .map(|i| {
                let t = i as f64 / rate;
                0.5 * (TAU * 1000.0 * t).sin() + 1e-5 * (TAU * 3000.0 * t + 1.0).cos()
            })
            .collect();
        assert!((tone_amplitude(&signal, 1000.0, rate) - 0.5).abs() < 1e-12);
        assert!((tone_amplitude(&signal, 3000.0, rate) - 1e-5).abs() < 1e-12);
        assert!(tone_amplitude(&signal, 2000.0, rate) < 1e-12);
    }

    #[test]
    fn windowed_measurement_handles_fractional_cycles() {
        let rate = 8000.0;
        let signal: Vec<f32> = (0..1000)
            .map(|i| (0.25 * (TAU * 1234.5 * i as f64 / rate).sin()) as f32)
            .collect();
        let a = tone_amplitude_windowed(&signal, 1234.5, rate);
        assert!((a - 0.25).abs() < 1e-4, "{a}");
        // 500 Hz away the window's side lobes keep the tone below −90 dB.
        assert!(db(tone_amplitude_windowed(&signal, 1734.5, rate) / 0.25) < -90.0);
    }
}
