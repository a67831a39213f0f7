//! Tests of the upsampler: the design against the spec, the streaming path against a direct
//! convolution, tones and a sweep measured on real output, chunking invariance, sample counts,
//! time alignment and allocation behaviour. Deterministic (fixed-seed generator), no timing.

use super::*;
use crate::analysis::{blackman_harris, db, fft, tone_amplitude};
use std::f64::consts::{PI, TAU};

const FACTORS: [usize; 3] = [2, 3, 6];

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn sample(&mut self) -> i16 {
        (self.next() >> 48) as u16 as i16
    }
}

fn upsampler(factor: usize) -> Upsampler {
    Upsampler::with_factor(factor)
}

/// A tone at 8 kHz, rounded to i16.
fn tone(freq: f64, amplitude: f64, len: usize) -> Vec<i16> {
    (0..len)
        .map(|j| (amplitude * 32768.0 * (TAU * freq * j as f64 / 8000.0).sin()).round() as i16)
        .collect()
}

/// Runs `input` through a fresh upsampler in chunks of the given sizes (cycled), then flushes.
fn run_chunked(factor: usize, input: &[i16], sizes: &[usize]) -> Vec<f32> {
    let mut up = upsampler(factor);
    let mut out = Vec::new();
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        up.process(chunk, &mut out);
        rest = tail;
        i += 1;
    }
    up.flush(&mut out);
    out
}

/// Worst passband deviation and worst stopband level (both in dB) of the stored filter, on a
/// 1 Hz grid.
fn measured_spec(up: &Upsampler) -> (f64, f64) {
    let nyquist = f64::from(up.out_rate()) / 2.0;
    let ripple = (0..=PASSBAND_EDGE_HZ as usize)
        .map(|f| db(up.response(f as f64)).abs())
        .fold(0.0, f64::max);
    let stop = (STOPBAND_EDGE_HZ as usize..=nyquist as usize)
        .map(|f| db(up.response(f as f64)))
        .fold(f64::NEG_INFINITY, f64::max);
    (ripple, -stop)
}

#[test]
fn design_meets_spec_for_every_factor() {
    for factor in FACTORS {
        let up = upsampler(factor);
        let (ripple, attenuation) = measured_spec(&up);
        let rate = f64::from(up.out_rate());
        println!(
            "L={factor}: {} taps ({TAPS_PER_PHASE}/branch), passband ripple {ripple:.5} dB, \
             stopband attenuation {attenuation:.2} dB, delay {} samples = {:.4} ms, \
             response at 3400 Hz {:.5} dB, at 4000 Hz {:.2} dB, at 4600 Hz {:.2} dB",
            TAPS_PER_PHASE * factor - 1,
            up.delay(),
            up.delay() as f64 * 1000.0 / rate,
            db(up.response(3400.0)),
            db(up.response(4000.0)),
            db(up.response(4600.0)),
        );
        assert!(
            ripple <= PASSBAND_RIPPLE_DB,
            "L={factor}: ripple {ripple} dB"
        );
        assert!(
            attenuation >= STOPBAND_ATTENUATION_DB,
            "L={factor}: attenuation {attenuation} dB"
        );
        assert_eq!(up.delay(), 16 * factor - 1);
    }
}

#[test]
fn unsupported_rates_are_rejected() {
    for rate in [0, 8001, 11025, 32000, 44100, 96000] {
        assert_eq!(Upsampler::new(rate).err(), Some(UnsupportedRate(rate)));
    }
    for (rate, factor, delay) in [(8000, 1, 0), (16000, 2, 31), (24000, 3, 47), (48000, 6, 95)] {
        let up = Upsampler::new(rate).expect("supported rate");
        assert_eq!(
            (up.factor(), up.delay(), up.out_rate()),
            (factor, delay, rate)
        );
    }
}

#[test]
fn streaming_output_equals_direct_convolution() {
    // Reference: zero-stuff, convolve with the f64 prototype, drop D leading samples, keep L·T.
    let mut rng = Rng(0x5EED);
    let input: Vec<i16> = (0..1000).map(|_| rng.sample()).collect();
    for factor in FACTORS {
        let taps = design::prototype(
            factor,
            TAPS_PER_PHASE,
            design::kaiser_beta(DESIGN_ATTENUATION_DB),
        );
        let delay = TAPS_PER_PHASE * factor / 2 - 1;
        let out = run_chunked(factor, &input, &[7, 160, 1, 64, 65, 333]);
        assert_eq!(out.len(), factor * input.len());
        for (n, &y) in out.iter().enumerate() {
            let m = n + delay;
            let want: f64 = input
                .iter()
                .enumerate()
                .filter_map(|(j, &x)| {
                    let k = m.checked_sub(j * factor)?;
                    taps.get(k).map(|h| h * f64::from(x) / 32768.0)
                })
                .sum();
            assert!(
                (f64::from(y) - want).abs() < 2e-6,
                "L={factor} n={n}: {y} vs {want}"
            );
        }
    }
}

#[test]
fn every_lth_output_is_the_input_sample() {
    let mut rng = Rng(7);
    let input: Vec<i16> = (0..2000).map(|_| rng.sample()).collect();
    for factor in [1, 2, 3, 6] {
        let out = run_chunked(factor, &input, &[160]);
        for (j, &x) in input.iter().enumerate() {
            assert_eq!(out[j * factor], f32::from(x) / 32768.0, "L={factor} j={j}");
        }
    }
}

#[test]
fn tones_keep_their_level_and_images_stay_below_the_stopband_bound() {
    // 1.25 s of tone; measure over exactly one second (1 Hz bins, every tone and image
    // bin-centred) starting at 0.125 s, away from the start and the end of the signal.
    for factor in FACTORS {
        let rate = 8000.0 * factor as f64;
        let up = upsampler(factor);
        for freq in [300.0, 1000.0, 3000.0, 3400.0] {
            let input = tone(freq, 0.5, 10_000);
            let out = run_chunked(factor, &input, &[160]);
            let in_window = &input[1000..9000];
            let out_window = &out[1000 * factor..9000 * factor];
            let level_in = tone_amplitude(in_window, freq, 8000.0) / 32768.0;
            let level_out = tone_amplitude(out_window, freq, rate);
            let gain_db = db(level_out / level_in);
            assert!(
                gain_db.abs() <= PASSBAND_RIPPLE_DB,
                "L={factor} {freq} Hz: gain {gain_db} dB"
            );
            // Images at k·8000 ± f up to the output Nyquist frequency.
            let mut worst = f64::NEG_INFINITY;
            for k in 1..=factor / 2 {
                for image in [8000.0 * k as f64 - freq, 8000.0 * k as f64 + freq] {
                    if image > rate / 2.0 {
                        continue;
                    }
                    let level = db(tone_amplitude(out_window, image, rate) / level_out);
                    // The measured image matches the filter's response there (within 0.5 dB),
                    // down to the f32 rounding floor near −130 dB, and stays under the bound.
                    let expected = db(up.response(image)).max(-120.0);
                    assert!(
                        (level.max(-120.0) - expected).abs() < 0.5,
                        "L={factor} {freq} Hz image {image} Hz: {level} dB, response {expected} dB"
                    );
                    assert!(
                        level <= -STOPBAND_ATTENUATION_DB,
                        "L={factor} {freq} Hz image {image} Hz: {level} dB"
                    );
                    worst = worst.max(level);
                }
            }
            println!("L={factor} {freq} Hz: gain {gain_db:+.5} dB, worst image {worst:.1} dB");
        }
    }
}

#[test]
fn sweep_has_no_component_above_the_stopband_edge() {
    // Linear sweep 100 → 3400 Hz over 2 s at half scale, with 50 ms raised-cosine fades so that
    // the signal's own edges do not splatter. Short-time spectra (1024-point Blackman–Harris
    // frames, side lobes −92 dB) of the output: every bin at or above 4600 Hz must stay 60 dB
    // below the sweep's amplitude.
    const SECONDS: f64 = 2.0;
    let len = (8000.0 * SECONDS) as usize;
    let fade = 400;
    let input: Vec<i16> = (0..len)
        .map(|j| {
            let t = j as f64 / 8000.0;
            let phase = TAU * (100.0 * t + 0.5 * (3300.0 / SECONDS) * t * t);
            let edge = j.min(len - 1 - j);
            let envelope = if edge < fade {
                0.5 - 0.5 * (PI * edge as f64 / fade as f64).cos()
            } else {
                1.0
            };
            (0.5 * 32768.0 * envelope * phase.sin()).round() as i16
        })
        .collect();
    const N: usize = 1024;
    let gain: f64 = (0..N).map(|i| blackman_harris(i, N)).sum();
    for factor in FACTORS {
        let rate = 8000.0 * factor as f64;
        let out = run_chunked(factor, &input, &[160]);
        let first_stop_bin = (STOPBAND_EDGE_HZ * N as f64 / rate).ceil() as usize;
        let mut worst = f64::NEG_INFINITY;
        for frame in out.chunks_exact(N) {
            let mut re: Vec<f64> = frame
                .iter()
                .enumerate()
                .map(|(i, &x)| f64::from(x) * blackman_harris(i, N))
                .collect();
            let mut im = vec![0.0; N];
            fft(&mut re, &mut im);
            let amplitude = |k: usize| 2.0 * re[k].hypot(im[k]) / gain;
            // Relative to the sweep's level in the same frame: the window smears a moving tone
            // and its images alike, so the ratio is what the filter did.
            let level = (0..first_stop_bin).map(amplitude).fold(0.0, f64::max);
            let stop = (first_stop_bin..=N / 2).map(amplitude).fold(0.0, f64::max);
            assert!(level > 0.01, "L={factor}: frame without the sweep");
            worst = worst.max(db(stop / level));
        }
        println!("L={factor}: sweep, worst component ≥ 4600 Hz {worst:.1} dB re the sweep");
        assert!(worst <= -60.0, "L={factor}: {worst} dB above 4600 Hz");
    }
}

#[test]
fn chunking_does_not_change_a_single_bit() {
    let mut rng = Rng(0xC0FFEE);
    // Full-scale noise plus a loud tone: the worst case for any state bug.
    let input: Vec<i16> = tone(3400.0, 0.5, 12_345)
        .into_iter()
        .map(|s| s.saturating_add(rng.sample() / 2))
        .collect();
    for factor in [1, 2, 3, 6] {
        let whole = run_chunked(factor, &input, &[usize::MAX]);
        let by_160 = run_chunked(factor, &input, &[160]);
        let sizes: Vec<usize> = (0..100).map(|_| 1 + rng.below(400)).collect();
        let random = run_chunked(factor, &input, &sizes);
        let tiny = run_chunked(factor, &input, &[1, 0, 2, 0, 3]);
        for other in [&by_160, &random, &tiny] {
            assert_eq!(whole.len(), other.len());
            for (n, (a, b)) in whole.iter().zip(other.iter()).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "L={factor} sample {n}");
            }
        }
    }
}

#[test]
fn no_step_at_chunk_edges() {
    // A 0.9 FS 3400 Hz tone changes by at most 2·A·sin(π f / rate) between output samples (a
    // little more where the input's quantisation adds its small high-frequency content). At
    // each edge between two `process` calls, and everywhere else, the output must stay within
    // that, and edges must look like the interior.
    let input = tone(3400.0, 0.9, 8000);
    let mut rng = Rng(42);
    for factor in FACTORS {
        let rate = 8000.0 * factor as f64;
        let bound = 2.0 * 0.9 * (PI * 3400.0 / rate).sin() * 1.001 + 2.0 / 32768.0;
        let mut up = upsampler(factor);
        let mut out = Vec::new();
        let mut edges = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(400)).min(rest.len());
            up.process(&rest[..n], &mut out);
            edges.push(out.len());
            rest = &rest[n..];
        }
        up.flush(&mut out);
        let step = |n: usize| (out[n] - out[n - 1]).abs() as f64;
        // Skip the first and last 2 ms, where the tone itself starts and stops abruptly.
        let settled = 2 * factor * 16..out.len() - 2 * factor * 16;
        let interior_max = settled.clone().skip(1).map(step).fold(0.0, f64::max);
        for &e in edges.iter().filter(|e| settled.contains(*e)) {
            assert!(step(e) <= bound, "L={factor} edge {e}: {}", step(e));
            assert!(step(e) <= interior_max);
        }
        assert!(
            interior_max <= bound,
            "L={factor}: {interior_max} > {bound}"
        );
    }
}

#[test]
fn sample_counts_are_exact_for_any_chunking() {
    let mut rng = Rng(99);
    for factor in [1, 2, 3, 6] {
        let mut up = upsampler(factor);
        let delay = up.delay() as u64;
        for _stream in 0..20 {
            let mut out = Vec::new();
            let mut total = 0u64;
            let calls = rng.below(12);
            for _ in 0..calls {
                let n = match rng.below(4) {
                    0 => rng.below(3),
                    1 => 160,
                    _ => rng.below(1000),
                };
                let input = vec![100i16; n];
                let expect_now = up.output_len(n);
                let before = out.len();
                up.process(&input, &mut out);
                total += n as u64;
                assert_eq!(out.len() - before, expect_now);
                let expected = (factor as u64 * total).saturating_sub(delay);
                assert_eq!(up.produced(), expected);
                assert_eq!(out.len() as u64, expected);
                assert_eq!(up.consumed(), total);
                assert_eq!(up.pending() as u64, factor as u64 * total - expected);
                assert!(up.pending() as u64 <= delay);
            }
            up.flush(&mut out);
            assert_eq!(out.len() as u64, factor as u64 * total);
            assert_eq!((up.consumed(), up.produced(), up.pending()), (0, 0, 0));
        }
    }
}

#[test]
fn first_and_later_chunks_have_the_documented_sizes() {
    for (factor, rate) in [(1, 8000), (2, 16000), (3, 24000), (6, 48000)] {
        let mut up = Upsampler::new(rate).expect("supported rate");
        let d = up.delay();
        let chunk = [0i16; 160];
        let mut out = Vec::new();
        up.process(&chunk, &mut out);
        assert_eq!(out.len(), factor * 160 - d);
        for i in 2..=50 {
            up.process(&chunk, &mut out);
            assert_eq!(out.len(), i * factor * 160 - d);
        }
        up.flush(&mut out);
        assert_eq!(out.len(), 50 * factor * 160, "one second at {rate} Hz");
    }
}

#[test]
fn flush_resets_and_the_next_stream_matches_a_fresh_upsampler() {
    let first = tone(1000.0, 0.7, 777);
    let second = tone(2500.0, 0.3, 1234);
    for factor in FACTORS {
        let mut up = upsampler(factor);
        let mut out = Vec::new();
        up.process(&first, &mut out);
        up.flush(&mut out);
        out.clear();
        up.process(&second, &mut out);
        up.flush(&mut out);
        assert_eq!(out, run_chunked(factor, &second, &[usize::MAX]));

        // `reset` mid-stream drops the state the same way.
        let mut up = upsampler(factor);
        let mut out = Vec::new();
        up.process(&first, &mut out);
        up.reset();
        out.clear();
        up.process(&second, &mut out);
        up.flush(&mut out);
        assert_eq!(out, run_chunked(factor, &second, &[usize::MAX]));
    }
}

#[test]
fn output_is_time_aligned_with_the_input() {
    // A Gaussian pulse (σ = 1 ms: its spectrum is > 100 dB down by 3400 Hz, so it is
    // band-limited in practice) centred at an instant between input samples. The output must
    // match the same pulse sampled at the output rate, with zero lag at the cross-correlation
    // peak and a sub-sample peak offset well under one output sample.
    let sigma = 0.001;
    let centre = 0.050_062_5; // 400.5 input samples: not on an input sample instant
    let pulse = |t: f64| 0.8 * (-0.5 * ((t - centre) / sigma).powi(2)).exp();
    let input: Vec<i16> = (0..800)
        .map(|j| (pulse(j as f64 / 8000.0) * 32768.0).round() as i16)
        .collect();
    for factor in FACTORS {
        let rate = 8000.0 * factor as f64;
        let out = run_chunked(factor, &input, &[160]);
        let ideal: Vec<f64> = (0..out.len()).map(|n| pulse(n as f64 / rate)).collect();
        let max_error = out
            .iter()
            .zip(&ideal)
            .map(|(&y, &r)| (f64::from(y) - r).abs())
            .fold(0.0, f64::max);
        assert!(max_error < 5e-4, "L={factor}: max error {max_error}");

        let xcorr = |lag: isize| -> f64 {
            (0..out.len())
                .filter_map(|n| {
                    let m = n as isize + lag;
                    (m >= 0 && (m as usize) < out.len())
                        .then(|| f64::from(out[m as usize]) * ideal[n])
                })
                .sum()
        };
        let lags: Vec<(isize, f64)> = (-8..=8).map(|l| (l, xcorr(l))).collect();
        let best = lags
            .iter()
            .copied()
            .fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
        assert_eq!(best.0, 0, "L={factor}: peak at lag {}", best.0);
        // Parabola through the peak and its neighbours: the fractional offset.
        let (l, c, r) = (xcorr(-1), xcorr(0), xcorr(1));
        let offset = 0.5 * (l - r) / (l - 2.0 * c + r);
        println!(
            "L={factor}: pulse max error {max_error:.2e}, xcorr peak offset {offset:+.5} samples"
        );
        assert!(offset.abs() < 0.01, "L={factor}: offset {offset}");
    }
}

#[test]
fn low_tone_has_no_phase_offset() {
    // A 250 Hz tone: compare the output's phase with the input's, both measured at time 0 of
    // their own timelines. A lag of one output sample at 48 kHz would be 1.9°.
    for factor in FACTORS {
        let rate = 8000.0 * factor as f64;
        let input = tone(250.0, 0.5, 16_000);
        let out = run_chunked(factor, &input, &[160]);
        let phase = |x: &[f64], r: f64| {
            let (mut re, mut im) = (0.0, 0.0);
            for (i, &v) in x.iter().enumerate() {
                let a = TAU * 250.0 * i as f64 / r;
                re += v * a.cos();
                im -= v * a.sin();
            }
            im.atan2(re)
        };
        let xin: Vec<f64> = input[..8000].iter().map(|&s| f64::from(s)).collect();
        let xout: Vec<f64> = out[..8000 * factor].iter().map(|&s| f64::from(s)).collect();
        let diff = phase(&xout, rate) - phase(&xin, 8000.0);
        let lag_samples = diff / TAU * rate / 250.0;
        assert!(lag_samples.abs() < 0.01, "L={factor}: lag {lag_samples}");
    }
}

#[test]
fn pass_through_is_exact_and_has_no_delay() {
    let mut up = Upsampler::new(8000).expect("supported rate");
    assert_eq!((up.factor(), up.delay()), (1, 0));
    let input: Vec<i16> = vec![i16::MIN, -1, 0, 1, i16::MAX];
    let mut out = Vec::new();
    up.process(&input, &mut out);
    assert_eq!(up.pending(), 0);
    up.flush(&mut out);
    let want: Vec<f32> = input.iter().map(|&s| f32::from(s) / 32768.0).collect();
    assert_eq!(out, want);
    assert_eq!(up.response(3000.0), 1.0);
}

#[test]
fn process_and_flush_do_not_allocate_once_out_has_capacity() {
    let chunk = tone(1000.0, 0.5, 160);
    for factor in [1, 2, 3, 6] {
        let mut up = upsampler(factor);
        let mut out = Vec::with_capacity(factor * 160 * 20);
        let allocations = crate::alloc_count::count(|| {
            for _ in 0..19 {
                up.process(&chunk, &mut out);
            }
            up.flush(&mut out);
        });
        assert_eq!(allocations, 0, "L={factor}");
        assert_eq!(out.len(), factor * 160 * 19);
    }
}
