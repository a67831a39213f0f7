//! Upsampling one 20 ms Twilio chunk (160 samples at 8 kHz) to 16, 24 and 48 kHz: our
//! polyphase [`dsp::Upsampler`] against `rubato` 5, on the same job.
//!
//! Before timing anything, every candidate's output quality is measured the same way the unit
//! tests measure ours (tones 101–3399 Hz through the streaming path in 160-sample chunks,
//! one-second bin-centred measurement windows): passband deviation and the worst image from
//! 4600 Hz up. Only candidates that meet the spec (ripple ≤ 0.1 dB, images ≥ 60 dB down) are
//! fair competitors; the table says which do.
//!
//! Candidates:
//! * `own` — `Upsampler::process` (i16 in, f32 out, delay-compensated).
//! * `own+s16le` — the same plus conversion of the output to s16le bytes, the layout the gateway
//!   would publish.
//! * `rubato_fft` — `rubato::Fft`, the crate's recommended synchronous resampler, fixed input of
//!   160 frames (one FFT block per chunk); i16 → f32 conversion included.
//! * `rubato_sinc<N>` — `rubato::Async` sinc resampler with `N` taps per output phase, the
//!   oversampling factor set to `L` and nearest-point lookup (exact polyphase, no interpolation
//!   between table points), Blackman–Harris window, cut-off at 4000 Hz; the shortest that met
//!   the spec in the exploration below. `RESAMPLE_EXPLORE=1` prints the whole grid.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-dsp cargo bench -p dsp --bench resample` (quality table,
//! then criterion). `RESAMPLE_LOOP="own 48000 300000" perf stat -e task-clock <bench binary>`
//! runs one candidate alone for CPU-time or callgrind measurements (see `run_loop`).

use criterion::{black_box, Criterion};
use dsp::analysis::{db, tone_amplitude};
use dsp::pcm::f32_to_s16le_into;
use dsp::Upsampler;
use rubato::audioadapter_buffers::direct::SequentialSlice;
use rubato::{
    Async, Fft, FixedAsync, FixedSync, Resampler, SincInterpolationParameters,
    SincInterpolationType, WindowFunction,
};
use std::f64::consts::TAU;
use std::time::Duration;

const CHUNK: usize = 160;
const RATES: [u32; 3] = [16000, 24000, 48000];

/// Something that turns the next 160 input samples of a stream into output samples.
trait Candidate {
    /// Output samples by which the output lags the input: held back and delay-compensated for
    /// `own`, leading silence the caller has to trim for rubato.
    fn latency(&self) -> usize;
    fn chunk(&mut self, input: &[i16], out: &mut Vec<f32>);
}

struct Own(Upsampler);

impl Candidate for Own {
    fn latency(&self) -> usize {
        self.0.delay()
    }
    fn chunk(&mut self, input: &[i16], out: &mut Vec<f32>) {
        self.0.process(input, out);
    }
}

/// Any rubato resampler fed fixed 160-frame input chunks, with preallocated buffers.
struct Rubato {
    resampler: Box<dyn Resampler<f32>>,
    input: Vec<f32>,
    output: Vec<f32>,
}

impl Rubato {
    fn new(resampler: Box<dyn Resampler<f32>>) -> Self {
        let max = resampler.output_frames_max();
        Rubato {
            resampler,
            input: vec![0.0; CHUNK],
            output: vec![0.0; max],
        }
    }

    fn fft(rate: u32) -> Self {
        let r = Fft::<f32>::new(8000, rate as usize, CHUNK, 1, FixedSync::Input)
            .expect("valid rubato Fft parameters");
        Self::new(Box::new(r))
    }

    fn sinc(rate: u32, sinc_len: usize, window: WindowFunction, cutoff: f32) -> Self {
        let factor = rate as usize / 8000;
        let params = SincInterpolationParameters::new(sinc_len, window)
            .f_cutoff(cutoff)
            .oversampling_factor(factor)
            .interpolation(SincInterpolationType::Nearest);
        let r = Async::<f32>::new_sinc(
            f64::from(rate) / 8000.0,
            1.0,
            &params,
            CHUNK,
            1,
            FixedAsync::Input,
        )
        .expect("valid rubato sinc parameters");
        Self::new(Box::new(r))
    }
}

impl Candidate for Rubato {
    fn latency(&self) -> usize {
        self.resampler.output_delay()
    }
    fn chunk(&mut self, input: &[i16], out: &mut Vec<f32>) {
        for (d, &s) in self.input.iter_mut().zip(input) {
            *d = f32::from(s) / 32768.0;
        }
        let frames_out = self.output.len();
        let buf_in = SequentialSlice::new(&self.input[..], 1, CHUNK).expect("input size");
        let mut buf_out =
            SequentialSlice::new_mut(&mut self.output[..], 1, frames_out).expect("output size");
        let (_, written) = self
            .resampler
            .process_into_buffer(&buf_in, &mut buf_out, None)
            .expect("rubato process");
        out.extend_from_slice(&self.output[..written]);
    }
}

/// Worst passband deviation and worst image (dB re the tone) over a set of tones, each run
/// through the candidate in 160-sample chunks and measured over one second.
fn quality(rate: u32, make: &dyn Fn() -> Box<dyn Candidate>) -> (f64, f64) {
    let rate_f = f64::from(rate);
    let factor = rate as usize / 8000;
    let (mut ripple, mut image) = (0.0f64, f64::NEG_INFINITY);
    // Integer-Hz tones (bin-centred in the one-second window) that are *not* multiples of
    // 50 Hz: a tone periodic in a 160-sample block would flatter a block (FFT) resampler.
    for freq in [101.0, 317.0, 1001.0, 2011.0, 2999.0, 3307.0, 3399.0] {
        let input: Vec<i16> = (0..10_400)
            .map(|j| (0.5 * 32768.0 * (TAU * freq * j as f64 / 8000.0).sin()).round() as i16)
            .collect();
        let mut c = make();
        let mut out = Vec::new();
        for chunk in input.chunks_exact(CHUNK) {
            c.chunk(chunk, &mut out);
        }
        let level_in = tone_amplitude(&input[1000..9000], freq, 8000.0) / 32768.0;
        // Whatever the candidate's latency (< 30 ms for all), this window is steady state.
        let window = &out[1000 * factor..9000 * factor];
        let level = tone_amplitude(window, freq, rate_f);
        ripple = ripple.max(db(level / level_in).abs());
        for k in 1..=factor / 2 {
            for f in [8000.0 * k as f64 - freq, 8000.0 * k as f64 + freq] {
                if f <= rate_f / 2.0 {
                    image = image.max(db(tone_amplitude(window, f, rate_f) / level));
                }
            }
        }
    }
    (ripple, image)
}

fn explore() {
    for rate in RATES {
        for window in [
            WindowFunction::Blackman2,
            WindowFunction::BlackmanHarris,
            WindowFunction::BlackmanHarris2,
        ] {
            for sinc_len in [32, 40, 48, 56, 64] {
                let (ripple, image) = quality(rate, &|| {
                    Box::new(Rubato::sinc(rate, sinc_len, window, 1.0)) as Box<dyn Candidate>
                });
                println!(
                    "explore {rate} Hz rubato sinc {sinc_len:>2} {window:?}: ripple {ripple:.4} dB, \
                     worst image {image:.1} dB"
                );
            }
        }
    }
}

/// The rubato sinc configuration benchmarked: the shortest filter that met the spec at every
/// rate in the exploration (see README).
const RUBATO_SINC_LEN: usize = 48;
const RUBATO_SINC_WINDOW: WindowFunction = WindowFunction::BlackmanHarris;

/// Makes a fresh candidate (fresh stream state).
type Factory = Box<dyn Fn() -> Box<dyn Candidate>>;

fn candidates(rate: u32) -> Vec<(String, Factory)> {
    vec![
        (
            "own".into(),
            Box::new(move || {
                Box::new(Own(Upsampler::new(rate).expect("supported rate"))) as Box<dyn Candidate>
            }),
        ),
        (
            "rubato_fft".into(),
            Box::new(move || Box::new(Rubato::fft(rate)) as Box<dyn Candidate>),
        ),
        (
            format!("rubato_sinc{RUBATO_SINC_LEN}"),
            Box::new(move || {
                Box::new(Rubato::sinc(rate, RUBATO_SINC_LEN, RUBATO_SINC_WINDOW, 1.0))
                    as Box<dyn Candidate>
            }),
        ),
    ]
}

/// `RESAMPLE_LOOP="<candidate> <rate> <chunks>"`: only run that many chunks through one
/// candidate (or `own+s16le`), for `perf stat -e task-clock` (CPU time of this process alone,
/// which other load on the machine does not inflate the way it inflates wall-clock medians) or
/// `valgrind --tool=callgrind` (instruction counts).
fn run_loop(spec: &str) {
    let mut words = spec.split_whitespace();
    let (Some(name), Some(rate), Some(chunks)) = (words.next(), words.next(), words.next()) else {
        eprintln!("RESAMPLE_LOOP wants \"<candidate> <rate> <chunks>\"");
        return;
    };
    let (Ok(rate), Ok(chunks)) = (rate.parse::<u32>(), chunks.parse::<u64>()) else {
        eprintln!("RESAMPLE_LOOP: bad rate or chunk count");
        return;
    };
    if name == "own+s16le" {
        let Ok(mut up) = Upsampler::new(rate) else {
            eprintln!("RESAMPLE_LOOP: unsupported rate {rate}");
            return;
        };
        let chunk = test_chunk();
        let mut out = Vec::with_capacity(CHUNK * 6);
        let mut bytes = Vec::with_capacity(CHUNK * 6 * 2);
        for _ in 0..chunks {
            out.clear();
            bytes.clear();
            up.process(black_box(&chunk), &mut out);
            f32_to_s16le_into(&out, &mut bytes);
            black_box(&bytes);
        }
        return;
    }
    let Some((_, make)) = candidates(rate).into_iter().find(|(n, _)| n == name) else {
        eprintln!("RESAMPLE_LOOP: unknown candidate {name}");
        return;
    };
    let chunk = test_chunk();
    let mut candidate = make();
    let mut out = Vec::with_capacity(CHUNK * 6 * 2);
    for _ in 0..chunks {
        out.clear();
        candidate.chunk(black_box(&chunk), &mut out);
        black_box(&out);
    }
}

fn test_chunk() -> Vec<i16> {
    (0..CHUNK)
        .map(|j| (8000.0 * (TAU * 1000.0 * j as f64 / 8000.0).sin()) as i16)
        .collect()
}

fn main() {
    if std::env::var_os("RESAMPLE_EXPLORE").is_some() {
        explore();
        return;
    }
    if let Ok(spec) = std::env::var("RESAMPLE_LOOP") {
        run_loop(&spec);
        return;
    }
    for rate in RATES {
        for (name, make) in candidates(rate) {
            let (ripple, image) = quality(rate, make.as_ref());
            let latency = make().latency();
            let verdict = if ripple <= 0.1 && image <= -60.0 {
                "meets spec"
            } else {
                "FAILS spec"
            };
            println!(
                "quality {rate} Hz {name:<14} passband deviation {ripple:.4} dB, \
                 worst image {image:.1} dB, latency {latency} samples = {:.2} ms: {verdict}",
                latency as f64 * 1000.0 / f64::from(rate)
            );
        }
    }

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let chunk = test_chunk();
    for rate in RATES {
        let mut group = c.benchmark_group(format!("upsample_160_to_{rate}"));
        for (name, make) in candidates(rate) {
            let mut candidate = make();
            let mut out = Vec::with_capacity(CHUNK * 6 * 2);
            group.bench_function(name, |b| {
                b.iter(|| {
                    out.clear();
                    candidate.chunk(black_box(&chunk), &mut out);
                    black_box(&out);
                })
            });
        }
        let mut up = Upsampler::new(rate).expect("supported rate");
        let mut out = Vec::with_capacity(CHUNK * 6);
        let mut bytes = Vec::with_capacity(CHUNK * 6 * 2);
        group.bench_function("own+s16le", |b| {
            b.iter(|| {
                out.clear();
                bytes.clear();
                up.process(black_box(&chunk), &mut out);
                f32_to_s16le_into(&out, &mut bytes);
                black_box(&bytes);
            })
        });
        group.finish();
    }
    c.final_summary();
}
