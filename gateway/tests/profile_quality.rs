//! Output profiles (`gateway::profile`) measured through their streaming API, the way the
//! session drives them: 160-byte μ-law chunks (and other sizes) with Twilio timestamps, the
//! session's continuity rule for `contiguous`, records collected from the callback.
//!
//! * Resampler quality on real output: tone levels, images against the documented stopband
//!   attenuation, a sweep scanned above the stopband edge, no step at chunk edges and
//!   bit-identity with resampling the whole signal in one go, exact sample counts and the one
//!   chunk of latency, identical output for any cut of the same audio into payloads, gaps.
//! * Stereo placement, exact to the sample at 8 kHz (the pass-through is bit-exact) against a
//!   reference model of the timeline: gaps on both tracks, one-sided silence, a late track,
//!   the outbound track 100 ms late in wall order, an off-grid track, audio beyond the lag
//!   bound, randomised scenarios; and at 16 kHz, counts and alignment (every L-th output
//!   sample of the interpolating filter is the input sample, exactly).
//! * Steady streaming allocates nothing (counting allocator), hostile timestamps are harmless.
//!
//! Deterministic: fixed-seed generator, no timing assertions.

use std::f64::consts::{PI, TAU};

use dsp::analysis::{blackman_harris, db, fft, tone_amplitude};
use dsp::g711;
use dsp::resample::{Upsampler, PASSBAND_RIPPLE_DB, STOPBAND_EDGE_HZ};
use gateway::profile::{
    Channel, ChunkIn, Layout, ProfileRecord, ProfileSpec, ProfileStream, SampleFormat,
};

/// Images must stay this far below the tone. The filter is specified for ≥ 60 dB and measures
/// ≥ 73 dB on its coefficients; 70 dB leaves room for μ-law and s16 rounding in the output.
const IMAGE_BOUND_DB: f64 = -70.0;

// ---------------------------------------------------------------------------------------------
// Counting allocator (dsp's): steady streaming must not allocate.

use dsp::alloc_count as counting;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// xorshift64*: small and deterministic, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

/// A record with its payload copied out of the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    channel: Channel,
    timestamp_ms: u64,
    chunks: u32,
    seq: u64,
    chunk: u64,
    contiguous: bool,
    payload: Vec<u8>,
}

impl From<ProfileRecord<'_>> for Rec {
    fn from(r: ProfileRecord<'_>) -> Self {
        Rec {
            channel: r.channel,
            timestamp_ms: r.timestamp_ms,
            chunks: r.chunks,
            seq: r.first_seq,
            chunk: r.first_chunk,
            contiguous: r.contiguous,
            payload: r.payload.to_vec(),
        }
    }
}

/// Drives a [`ProfileStream`] the way the session does: `contiguous` is true exactly when a
/// chunk starts where the previous non-empty chunk of its track ended (in samples, 8 per ms).
struct Feeder {
    stream: ProfileStream,
    next_sample: [Option<u64>; 2],
    records: Vec<Rec>,
}

impl Feeder {
    fn new(spec: &str) -> Feeder {
        let spec = ProfileSpec::parse(spec).expect("valid spec");
        Feeder {
            stream: ProfileStream::new(&spec).expect("valid spec"),
            next_sample: [None; 2],
            records: Vec::new(),
        }
    }

    fn push(&mut self, track: usize, ulaw: &[u8], timestamp_ms: u64, seq: u64, chunk: u64) {
        let start = timestamp_ms * 8;
        let contiguous = self.next_sample[track] == Some(start);
        self.next_sample[track] = Some(start + ulaw.len() as u64);
        let records = &mut self.records;
        self.stream.push(
            ChunkIn {
                track,
                ulaw,
                timestamp_ms,
                seq,
                chunk,
                contiguous,
            },
            &mut |r| records.push(r.into()),
        );
    }

    fn finish(&mut self) -> Vec<Rec> {
        let records = &mut self.records;
        self.stream.finish(&mut |r| records.push(r.into()));
        std::mem::take(&mut self.records)
    }
}

/// One chunk as the session hands it over.
#[derive(Debug, Clone)]
struct Push {
    track: usize,
    timestamp_ms: u64,
    seq: u64,
    chunk: u64,
    ulaw: Vec<u8>,
}

/// A tone at 8 kHz (amplitude relative to full scale), rounded to i16.
fn tone(freq: f64, amplitude: f64, len: usize) -> Vec<i16> {
    (0..len)
        .map(|j| (amplitude * 32768.0 * (TAU * freq * j as f64 / 8000.0).sin()).round() as i16)
        .collect()
}

fn ulaw_of(pcm: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pcm.len());
    g711::encode_into(pcm, &mut out);
    out
}

fn decode(ulaw: &[u8]) -> Vec<i16> {
    ulaw.iter().map(|&c| g711::decode(c)).collect()
}

/// Feeds `ulaw` as one track of a stream in payloads of `bytes` (a multiple of 8, so that
/// every timestamp is a whole millisecond), then finishes.
fn run_mono(spec: &str, track: usize, ulaw: &[u8], bytes: usize) -> Vec<Rec> {
    let mut f = Feeder::new(spec);
    for (i, payload) in ulaw.chunks(bytes).enumerate() {
        let ts = (i * bytes / 8) as u64;
        f.push(track, payload, ts, i as u64 + 1, i as u64 + 1);
    }
    f.finish()
}

fn concat(records: &[Rec]) -> Vec<u8> {
    records
        .iter()
        .flat_map(|r| r.payload.iter().copied())
        .collect()
}

fn s16(payload: &[u8]) -> Vec<i16> {
    payload
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn f32s(payload: &[u8]) -> Vec<f32> {
    payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Samples of a payload as f32 (s16 scaled by 1/32768), whatever the format.
fn samples(format: SampleFormat, payload: &[u8]) -> Vec<f32> {
    match format {
        SampleFormat::S16le => s16(payload)
            .into_iter()
            .map(|s| f32::from(s) / 32768.0)
            .collect(),
        SampleFormat::F32le => f32s(payload),
    }
}

/// The same audio resampled in one call, then flushed.
fn one_shot(rate: u32, pcm: &[i16]) -> Vec<f32> {
    let mut up = Upsampler::new(rate).expect("supported rate");
    let mut out = Vec::new();
    up.process(pcm, &mut out);
    up.flush(&mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Spec.

#[test]
fn spec_parses_defaults_options_and_rejects_mistakes() {
    let spec = ProfileSpec::parse("wb16").expect("defaults");
    assert_eq!(
        (spec.name.as_str(), spec.rate, spec.format, spec.layout),
        ("wb16", 16000, SampleFormat::S16le, Layout::Mono)
    );
    let spec = ProfileSpec::parse("call_48-f:layout=stereo, format=f32le,rate=48000").expect("ok");
    assert_eq!(
        (spec.rate, spec.format, spec.layout),
        (48000, SampleFormat::F32le, Layout::Stereo)
    );
    assert_eq!((spec.encoding(), spec.channels()), ("pcm_f32le", 2));
    assert_eq!(ProfileSpec::parse(&spec.to_string()), Ok(spec));
    for bad in [
        "",
        "WB16",
        "wb 16",
        "a23456789012345678901234567890123",
        "wb16:",
        "wb16:rate",
        "wb16:rate=44100",
        "wb16:rate=+16000",
        "wb16:format=s24le",
        "wb16:layout=quad",
        "wb16:gain=2",
        "wb16:rate=16000,rate=8000",
        "wb16:rate=16000,",
    ] {
        assert!(ProfileSpec::parse(bad).is_err(), "{bad:?} accepted");
    }
}

// ---------------------------------------------------------------------------------------------
// Resampler quality through the streaming path.

#[test]
fn tones_keep_their_level_and_images_stay_below_the_documented_attenuation() {
    // 2 s of tone in 160-byte chunks; measure over exactly one second (1 Hz bins: the tone and
    // each image k·8000 ± f sit on their own bins, and μ-law's quantisation error, periodic
    // like the tone, lands on other bins) from 0.25 s, away from the signal's start and end.
    for rate in [16000u32, 24000, 48000] {
        let factor = (rate / 8000) as usize;
        let up = Upsampler::new(rate).expect("rate");
        for format in [SampleFormat::S16le, SampleFormat::F32le] {
            let spec = format!("q:rate={rate},format={}", format.as_str());
            // Not divisors of the rates, so that rounding errors do not pile up on the image
            // bins; 3399 Hz is the top of the passband.
            for freq in [301.0, 997.0, 2999.0, 3399.0] {
                let ulaw = ulaw_of(&tone(freq, 0.5, 16_000));
                let records = run_mono(&spec, 0, &ulaw, 160);
                let out = samples(format, &concat(&records));
                assert_eq!(out.len(), 16_000 * factor);
                let decoded = decode(&ulaw);
                let in_window = &decoded[2000..10_000];
                let out_window = &out[2000 * factor..10_000 * factor];
                let level_in = tone_amplitude(in_window, freq, 8000.0) / 32768.0;
                let level_out = tone_amplitude(out_window, freq, f64::from(rate));
                let gain_db = db(level_out / level_in);
                assert!(
                    gain_db.abs() <= PASSBAND_RIPPLE_DB + 0.001,
                    "{spec} {freq} Hz: gain {gain_db} dB"
                );
                let mut worst = f64::NEG_INFINITY;
                for k in 1..=factor / 2 {
                    for image in [8000.0 * k as f64 - freq, 8000.0 * k as f64 + freq] {
                        if image >= f64::from(rate) / 2.0 {
                            continue;
                        }
                        let level =
                            db(tone_amplitude(out_window, image, f64::from(rate)) / level_out);
                        worst = worst.max(level);
                        assert!(
                            level <= IMAGE_BOUND_DB,
                            "{spec} {freq} Hz: image at {image} Hz is {level:.1} dB"
                        );
                        // f32le is the filter's output unchanged: each image is what the
                        // design says, within 1 dB down to the f32 rounding floor. (s16le adds
                        // its rounding error, periodic like the tone, on harmonic bins near
                        // −90 dB; the bound above covers it.)
                        if format == SampleFormat::F32le {
                            let designed = db(up.response(image));
                            assert!(
                                level <= designed.max(-120.0) + 1.0,
                                "{spec} {freq} Hz: image at {image} Hz {level:.1} dB, design {designed:.1} dB"
                            );
                        }
                    }
                }
                println!("{spec} {freq} Hz: gain {gain_db:+.5} dB, worst image {worst:.1} dB");
            }
        }
    }
}

#[test]
fn sweep_has_nothing_above_the_stopband_edge() {
    // Linear sweep 100 → 3400 Hz over 2 s at half scale, 50 ms raised-cosine fades, μ-law
    // encoded, in 160-byte chunks. Short-time spectra (1024-point Blackman–Harris frames, side
    // lobes −92 dB): every bin at or above 4600 Hz stays 70 dB below the sweep in the same
    // frame. The μ-law error is in the input's band and imaged like the signal, so it does not
    // reach above 4600 Hz either.
    let len = 16_000;
    let fade = 400;
    let pcm: Vec<i16> = (0..len)
        .map(|j| {
            let t = j as f64 / 8000.0;
            let phase = TAU * (100.0 * t + 0.5 * (3300.0 / 2.0) * t * t);
            let edge = j.min(len - 1 - j);
            let envelope = if edge < fade {
                0.5 - 0.5 * (PI * edge as f64 / fade as f64).cos()
            } else {
                1.0
            };
            (0.5 * 32768.0 * envelope * phase.sin()).round() as i16
        })
        .collect();
    let ulaw = ulaw_of(&pcm);
    const N: usize = 1024;
    let gain: f64 = (0..N).map(|i| blackman_harris(i, N)).sum();
    for (rate, format) in [
        (16000u32, SampleFormat::S16le),
        (24000, SampleFormat::S16le),
        (48000, SampleFormat::F32le),
    ] {
        let spec = format!("sweep:rate={rate},format={}", format.as_str());
        let out = samples(format, &concat(&run_mono(&spec, 0, &ulaw, 160)));
        let first_stop_bin = (STOPBAND_EDGE_HZ * N as f64 / f64::from(rate)).ceil() as usize;
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
            let level = (0..first_stop_bin).map(amplitude).fold(0.0, f64::max);
            let stop = (first_stop_bin..=N / 2).map(amplitude).fold(0.0, f64::max);
            assert!(level > 0.01, "{spec}: frame without the sweep");
            worst = worst.max(db(stop / level));
        }
        println!("{spec}: worst component at or above 4600 Hz {worst:.1} dB re the sweep");
        assert!(
            worst <= IMAGE_BOUND_DB,
            "{spec}: {worst:.1} dB above 4600 Hz"
        );
    }
}

#[test]
fn streaming_equals_one_shot_resampling_and_has_no_step_at_chunk_edges() {
    // Speech-band noise plus a loud 3400 Hz tone: any state bug at a chunk edge shows.
    let mut rng = Rng(0x5EED);
    let pcm: Vec<i16> = tone(3400.0, 0.45, 8000)
        .into_iter()
        .map(|s| s.saturating_add((rng.next() >> 50) as i16 - 8192))
        .collect();
    let ulaw = ulaw_of(&pcm);
    let decoded = decode(&ulaw);
    for rate in [8000u32, 16000, 24000, 48000] {
        let factor = (rate / 8000) as usize;
        let whole = one_shot(rate, &decoded);
        let records = run_mono(&format!("x:rate={rate},format=f32le"), 1, &ulaw, 160);
        let streamed = f32s(&concat(&records));
        assert_eq!(streamed.len(), whole.len());
        for (n, (a, b)) in streamed.iter().zip(&whole).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{rate} Hz: sample {n} differs");
        }
        // s16le is the same samples, rounded.
        let records = run_mono(&format!("x:rate={rate},format=s16le"), 1, &ulaw, 160);
        let mut want = Vec::new();
        dsp::pcm::f32_to_s16le_into(&whole, &mut want);
        assert_eq!(concat(&records), want, "{rate} Hz s16le");

        // And directly: the step across each chunk edge looks like the steps inside chunks.
        let step = |n: usize| (streamed[n] - streamed[n - 1]).abs();
        let chunk = 160 * factor;
        let interior = (1..streamed.len())
            .filter(|n| n % chunk != 0)
            .map(step)
            .fold(0.0f32, f32::max);
        let edges = (chunk..streamed.len())
            .step_by(chunk)
            .map(step)
            .fold(0.0f32, f32::max);
        assert!(
            edges <= interior,
            "{rate} Hz: edge step {edges} > interior {interior}"
        );
    }
}

#[test]
fn sample_counts_are_exact_and_records_leave_one_chunk_late() {
    let mut rng = Rng(7);
    let n_chunks = 37usize;
    for rate in [8000u32, 16000, 24000, 48000] {
        let factor = (rate / 8000) as usize;
        for format in [SampleFormat::S16le, SampleFormat::F32le] {
            let spec = format!("c:rate={rate},format={}", format.as_str());
            let per_chunk = 160 * factor * format.bytes_per_sample();
            let mut f = Feeder::new(&spec);
            let ulaw = [rng.bytes(160 * n_chunks), rng.bytes(160 * n_chunks)];
            for k in 0..n_chunks {
                for (track, audio) in ulaw.iter().enumerate() {
                    let payload = &audio[160 * k..160 * (k + 1)];
                    let seq = 2 * k as u64 + 1 + track as u64;
                    f.push(track, payload, 20 * k as u64, seq, k as u64 + 1);
                }
                // The filter's look-ahead holds each chunk back until the next one; the 8 kHz
                // pass-through has none.
                let expected = if factor == 1 { k + 1 } else { k };
                for channel in [Channel::Inbound, Channel::Outbound] {
                    let n = f.records.iter().filter(|r| r.channel == channel).count();
                    assert_eq!(n, expected, "{spec}: after chunk {k}");
                }
            }
            let records = f.finish();
            for (track, channel) in [(0usize, Channel::Inbound), (1, Channel::Outbound)] {
                let mine: Vec<&Rec> = records.iter().filter(|r| r.channel == channel).collect();
                assert_eq!(mine.len(), n_chunks);
                let total: usize = mine.iter().map(|r| r.payload.len()).sum();
                assert_eq!(total, n_chunks * per_chunk, "{spec}: N × 160 × L samples");
                for (k, r) in mine.iter().enumerate() {
                    assert_eq!(r.payload.len(), per_chunk);
                    assert_eq!(r.timestamp_ms, 20 * k as u64);
                    assert_eq!(
                        (r.seq, r.chunk),
                        (2 * k as u64 + 1 + track as u64, k as u64 + 1)
                    );
                    assert_eq!((r.chunks, r.contiguous), (1, k > 0));
                }
            }
        }
    }
}

#[test]
fn larger_payloads_give_identical_output() {
    // The same 2 s of audio as 100 chunks of 160 bytes, 40 of 400 bytes, and a mix of 80, 240
    // and 480: the concatenated output is identical to the bit, and each record holds exactly
    // L × its chunk's samples at that chunk's timestamp.
    let mut rng = Rng(11);
    let pcm: Vec<i16> = tone(1234.0, 0.3, 16_000)
        .into_iter()
        .map(|s| s.saturating_add((rng.next() >> 52) as i16 - 2048))
        .collect();
    let ulaw = ulaw_of(&pcm);
    for spec in [
        "p:rate=8000",
        "p:rate=16000,format=s16le",
        "p:rate=24000,format=s16le",
        "p:rate=48000,format=f32le",
    ] {
        let by_160 = run_mono(spec, 0, &ulaw, 160);
        let by_400 = run_mono(spec, 0, &ulaw, 400);
        assert_eq!(by_160.len(), 100);
        assert_eq!(by_400.len(), 40);
        assert_eq!(concat(&by_160), concat(&by_400), "{spec}: 160 vs 400 bytes");
        // Mixed sizes, each a whole number of milliseconds.
        let mut f = Feeder::new(spec);
        let (mut at, mut i) = (0usize, 0u64);
        while at < ulaw.len() {
            let n = [80usize, 240, 480][(i % 3) as usize].min(ulaw.len() - at);
            f.push(0, &ulaw[at..at + n], (at / 8) as u64, i + 1, i + 1);
            at += n;
            i += 1;
        }
        let mixed = f.finish();
        assert_eq!(concat(&by_160), concat(&mixed), "{spec}: mixed sizes");
        let spec = ProfileSpec::parse(spec).expect("spec");
        let factor = (spec.rate / 8000) as usize;
        for r in &by_400 {
            assert_eq!(
                r.payload.len(),
                400 * factor * spec.format.bytes_per_sample()
            );
        }
        assert_eq!(by_400[3].timestamp_ms, 150);
    }
}

#[test]
fn a_gap_flushes_the_run_and_restarts_it() {
    // Chunks 0..10, then the stream resumes at 400 ms (a jump), then a chunk the session calls
    // non-contiguous although its timestamp follows (it must restart too). Each run's output
    // is that run resampled on its own with a silent tail, nothing smeared across the gap.
    let mut rng = Rng(3);
    let runs = [rng.bytes(160 * 10), rng.bytes(160 * 6), rng.bytes(160 * 4)];
    for (rate, format) in [(16000u32, "f32le"), (48000, "f32le"), (8000, "f32le")] {
        let spec = format!("g:rate={rate},format={format}");
        let mut stream = ProfileStream::new(&ProfileSpec::parse(&spec).expect("spec")).expect("s");
        let mut records = Vec::new();
        let starts = [0u64, 400, 520];
        for (run, (&start, audio)) in starts.iter().zip(&runs).enumerate() {
            for (k, payload) in audio.chunks(160).enumerate() {
                let contiguous = k > 0; // the session's verdict, false at each run's start
                let ts = start + 20 * k as u64;
                let seq = 100 * run as u64 + k as u64;
                stream.push(
                    ChunkIn {
                        track: 0,
                        ulaw: payload,
                        timestamp_ms: ts,
                        seq,
                        chunk: seq,
                        contiguous,
                    },
                    &mut |r| records.push(Rec::from(r)),
                );
            }
        }
        stream.finish(&mut |r| records.push(Rec::from(r)));
        assert_eq!(records.len(), 20);
        let mut at = 0;
        for (run, (&start, audio)) in starts.iter().zip(&runs).enumerate() {
            let mine = &records[at..at + audio.len() / 160];
            at += mine.len();
            assert_eq!(mine[0].timestamp_ms, start, "{spec} run {run}");
            assert!(!mine[0].contiguous && mine[1..].iter().all(|r| r.contiguous));
            let want = one_shot(rate, &decode(audio));
            let got = f32s(&concat(mine));
            assert_eq!(got.len(), want.len());
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{spec} run {run} differs from resampling it alone"
            );
        }
    }
    // The timeline can veto the session's `contiguous`: a chunk marked contiguous whose
    // timestamp does not follow still restarts.
    let mut f = ProfileStream::new(&ProfileSpec::parse("v:rate=16000").expect("s")).expect("s");
    let mut records = Vec::new();
    let audio = rng.bytes(320);
    f.push(
        ChunkIn {
            track: 0,
            ulaw: &audio[..160],
            timestamp_ms: 0,
            seq: 1,
            chunk: 1,
            contiguous: true,
        },
        &mut |r| records.push(Rec::from(r)),
    );
    f.push(
        ChunkIn {
            track: 0,
            ulaw: &audio[160..],
            timestamp_ms: 100,
            seq: 2,
            chunk: 2,
            contiguous: true,
        },
        &mut |r| records.push(Rec::from(r)),
    );
    f.finish(&mut |r| records.push(Rec::from(r)));
    assert_eq!(records.len(), 2);
    assert!(!records[1].contiguous);
    assert_eq!(records[1].timestamp_ms, 100);
}

#[test]
fn pass_through_is_bit_exact_with_the_mulaw_decode() {
    let codes: Vec<u8> = (0..=255u8).cycle().take(160 * 8).collect();
    let records = run_mono("pt:rate=8000,format=s16le", 0, &codes, 160);
    assert_eq!(s16(&concat(&records)), decode(&codes));
    let records = run_mono("pt:rate=8000,format=f32le", 1, &codes, 160);
    let want: Vec<f32> = decode(&codes)
        .into_iter()
        .map(|s| f32::from(s) / 32768.0)
        .collect();
    assert_eq!(f32s(&concat(&records)), want);
    // Stereo at 8 kHz: left is the inbound decode, right the outbound decode.
    let mut f = Feeder::new("pt:rate=8000,layout=stereo");
    let other: Vec<u8> = codes.iter().rev().copied().collect();
    for k in 0..8 {
        f.push(
            0,
            &codes[160 * k..160 * (k + 1)],
            20 * k as u64,
            2 * k as u64,
            k as u64,
        );
        f.push(
            1,
            &other[160 * k..160 * (k + 1)],
            20 * k as u64,
            2 * k as u64 + 1,
            k as u64,
        );
    }
    let frames = s16(&concat(&f.finish()));
    let left: Vec<i16> = frames.iter().step_by(2).copied().collect();
    let right: Vec<i16> = frames.iter().skip(1).step_by(2).copied().collect();
    assert_eq!((left, right), (decode(&codes), decode(&other)));
}

// ---------------------------------------------------------------------------------------------
// Stereo placement.

/// What the timeline should hold: per track and input position, the μ-law code and the chunk
/// that put it there (first audio placed wins, as in the assembler).
#[derive(Default)]
struct Model {
    tracks: [Vec<Option<(u8, u64, u64)>>; 2],
}

impl Model {
    fn place(&mut self, p: &Push) {
        let track = &mut self.tracks[p.track];
        let start = (p.timestamp_ms * 8) as usize;
        if track.len() < start + p.ulaw.len() {
            track.resize(start + p.ulaw.len(), None);
        }
        for (slot, &code) in track[start..].iter_mut().zip(&p.ulaw) {
            slot.get_or_insert((code, p.seq, p.chunk));
        }
    }

    fn at(&self, track: usize, pos: usize) -> Option<(u8, u64, u64)> {
        self.tracks[track].get(pos).copied().flatten()
    }

    /// The records an 8 kHz s16le stereo profile must emit: every 20 ms span of the grid with
    /// audio on either track, silence where a track has none.
    fn expected_8k(&self) -> Vec<Rec> {
        let len = self.tracks[0].len().max(self.tracks[1].len());
        let mut out: Vec<Rec> = Vec::new();
        for span in 0..len.div_ceil(160) {
            let range = span * 160..span * 160 + 160;
            let first = |t: usize| range.clone().find_map(|p| self.at(t, p));
            let Some((_, seq, chunk)) = first(0).or(first(1)) else {
                continue;
            };
            let mut payload = Vec::with_capacity(640);
            for p in range.clone() {
                for t in 0..2 {
                    let v = self.at(t, p).map_or(0, |(c, _, _)| g711::decode(c));
                    payload.extend_from_slice(&v.to_le_bytes());
                }
            }
            let ts = span as u64 * 20;
            let contiguous = out.last().is_some_and(|r| r.timestamp_ms + 20 == ts);
            out.push(Rec {
                channel: Channel::Stereo,
                timestamp_ms: ts,
                chunks: 1,
                seq,
                chunk,
                contiguous,
                payload,
            });
        }
        out
    }
}

/// A track's chunks: `(timestamp_ms, bytes)` for each, with per-track chunk numbers and random
/// audio; `seq` is assigned later in arrival order, as Twilio numbers messages per stream.
fn chunks_of(rng: &mut Rng, track: usize, plan: &[(u64, usize)]) -> Vec<Push> {
    plan.iter()
        .enumerate()
        .map(|(i, &(timestamp_ms, bytes))| Push {
            track,
            timestamp_ms,
            seq: 0,
            chunk: i as u64 + 1,
            ulaw: rng.bytes(bytes),
        })
        .collect()
}

/// 20 ms chunks at `start + 20k` for `k` in `ks`.
fn regular(start: u64, ks: impl IntoIterator<Item = u64>) -> Vec<(u64, usize)> {
    ks.into_iter().map(|k| (start + 20 * k, 160)).collect()
}

/// Merges two tracks' chunks by arrival key `timestamp + delay[track]` (stable: each track
/// keeps its order), numbers them, and returns them in arrival order.
fn arrive(mut a: Vec<Push>, b: Vec<Push>, delay: [u64; 2]) -> Vec<Push> {
    a.extend(b);
    let key = |p: &Push| p.timestamp_ms + delay[p.track];
    a.sort_by_key(|p| (key(p), p.track));
    for (i, p) in a.iter_mut().enumerate() {
        p.seq = i as u64 + 1;
    }
    a
}

/// Feeds `pushes` to a stereo profile, calling `check` after each push with the records so
/// far; returns all records after `finish` and the samples dropped.
fn run_stereo(
    spec: &str,
    pushes: &[Push],
    mut check: impl FnMut(&Push, &[Rec]),
) -> (Vec<Rec>, u64) {
    let mut f = Feeder::new(spec);
    for p in pushes {
        f.push(p.track, &p.ulaw, p.timestamp_ms, p.seq, p.chunk);
        check(p, &f.records);
    }
    let dropped = f.stream.dropped_samples();
    (f.finish(), dropped)
}

fn assert_exact(pushes: &[Push], got: &[Rec]) {
    let mut model = Model::default();
    for p in pushes {
        model.place(p);
    }
    let want = model.expected_8k();
    assert_eq!(got.len(), want.len(), "record count");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "record at {} ms", w.timestamp_ms);
    }
}

/// Records are in timeline order, one per span, never repeated.
fn assert_ordered(records: &[Rec]) {
    for pair in records.windows(2) {
        assert!(
            pair[0].timestamp_ms < pair[1].timestamp_ms,
            "{} then {}",
            pair[0].timestamp_ms,
            pair[1].timestamp_ms
        );
    }
}

const STEREO_8K: &str = "st:rate=8000,format=s16le,layout=stereo";

#[test]
fn stereo_places_both_tracks_with_gaps_exactly() {
    let mut rng = Rng(21);
    let inbound = chunks_of(
        &mut rng,
        0,
        &regular(0, (0..50).filter(|k| !(10..12).contains(k))),
    );
    let outbound = chunks_of(
        &mut rng,
        1,
        &regular(0, (0..50).filter(|&k| k != 20 && !(30..36).contains(&k))),
    );
    let pushes = arrive(inbound, outbound, [0, 0]);
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |p, so_far| {
        // In step, a span leaves as soon as both tracks passed it (no look-ahead at 8 kHz):
        // nothing waits longer than the lag bound plus a span.
        let horizon = (p.timestamp_ms + 20).saturating_sub(200 + 40);
        assert!(so_far.last().map_or(0, |r| r.timestamp_ms + 20) >= horizon);
    });
    assert_eq!(dropped, 0);
    assert_exact(&pushes, &records);
    // A span where inbound has a gap and outbound audio names the outbound chunk.
    let r = records
        .iter()
        .find(|r| r.timestamp_ms == 200)
        .expect("span at 200 ms");
    let out10 = pushes
        .iter()
        .find(|p| p.track == 1 && p.timestamp_ms == 200)
        .expect("chunk");
    assert_eq!((r.seq, r.chunk), (out10.seq, out10.chunk));
    assert!(
        s16(&r.payload).iter().step_by(2).all(|&l| l == 0),
        "left silent in its gap"
    );
    let r = records
        .iter()
        .find(|r| r.timestamp_ms == 400)
        .expect("span at 400 ms");
    assert!(
        s16(&r.payload).iter().skip(1).step_by(2).all(|&s| s == 0),
        "right silent"
    );
    assert_eq!(records.len(), 50);
}

#[test]
fn stereo_one_sided_silence_leaves_within_the_lag_bound() {
    // Only inbound sends from 200 to 1200 ms (Twilio omitting the outbound side's silence),
    // then outbound resumes. The spans of the silence must not wait for outbound: each leaves
    // once inbound is more than 200 ms past it.
    let mut rng = Rng(22);
    let inbound = chunks_of(&mut rng, 0, &regular(0, 0..100));
    let outbound = chunks_of(&mut rng, 1, &regular(0, (0..10).chain(60..100)));
    let pushes = arrive(inbound, outbound, [0, 0]);
    let mut max_wait = 0;
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |p, so_far| {
        if p.track == 0 {
            let emitted_to = so_far.last().map_or(0, |r| r.timestamp_ms + 20);
            max_wait = max_wait.max(p.timestamp_ms + 20 - emitted_to);
        }
    });
    assert_eq!(dropped, 0);
    assert_exact(&pushes, &records);
    println!("one-sided silence: spans waited at most {max_wait} ms behind inbound");
    assert!(max_wait <= 200 + 20, "spans waited {max_wait} ms");
    assert!(
        max_wait >= 200,
        "the lag bound should be used: {max_wait} ms"
    );
}

#[test]
fn stereo_track_that_starts_late_is_silent_before() {
    let mut rng = Rng(23);
    let inbound = chunks_of(&mut rng, 0, &regular(0, 0..60));
    let outbound = chunks_of(&mut rng, 1, &regular(500, 0..35));
    let pushes = arrive(inbound, outbound, [0, 0]);
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |_, _| {});
    assert_eq!(dropped, 0);
    assert_exact(&pushes, &records);
    // And the other way round: outbound first, inbound joins at 300 ms; spans before it name
    // the outbound chunk.
    let outbound = chunks_of(&mut rng, 1, &regular(0, 0..40));
    let inbound = chunks_of(&mut rng, 0, &regular(300, 0..25));
    let pushes = arrive(inbound, outbound, [0, 0]);
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |_, _| {});
    assert_eq!(dropped, 0);
    assert_exact(&pushes, &records);
    assert_eq!(records[0].chunk, 1);
    assert_eq!(
        records[0].seq,
        pushes
            .iter()
            .find(|p| p.track == 1)
            .map(|p| p.seq)
            .unwrap_or(0)
    );
}

#[test]
fn stereo_outbound_arriving_100_ms_late_is_placed_by_timestamp() {
    let mut rng = Rng(24);
    let inbound = chunks_of(&mut rng, 0, &regular(0, 0..80));
    let outbound = chunks_of(&mut rng, 1, &regular(0, 0..80));
    // Outbound chunk k arrives right after inbound chunk k + 5.
    let pushes = arrive(inbound, outbound, [0, 100]);
    assert_eq!(pushes[5].track, 0);
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |p, so_far| {
        // Spans leave as outbound delivers them: right after outbound chunk k, span k is out.
        if p.track == 1 {
            let last = so_far.last().map(|r| r.timestamp_ms);
            assert_eq!(
                last,
                Some(p.timestamp_ms),
                "span of outbound chunk {}",
                p.chunk
            );
        }
    });
    assert_eq!(dropped, 0);
    assert_exact(&pushes, &records);
    assert_eq!(records.len(), 80);
}

#[test]
fn stereo_off_grid_track_and_odd_payloads_are_placed_to_the_sample() {
    // Outbound on its own grid (5 ms + 20k), inbound in 100-byte payloads (12.5 ms: Twilio's
    // timestamps then round, the session reports non-contiguity, and four samples overlap or
    // go missing at each such edge).
    let mut rng = Rng(25);
    let mut plan = Vec::new();
    let mut at_samples = 0u64;
    while at_samples < 8 * 600 {
        plan.push((at_samples / 8, 100));
        at_samples += 100;
    }
    let inbound = chunks_of(&mut rng, 0, &plan);
    let outbound = chunks_of(&mut rng, 1, &regular(5, 0..29));
    let pushes = arrive(inbound, outbound, [0, 0]);
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |_, _| {});
    assert_exact(&pushes, &records);
    println!("off-grid: {dropped} overlapping samples dropped");
}

#[test]
fn stereo_audio_beyond_the_lag_bound_is_dropped_never_misplaced() {
    // Outbound 300 ms late in wall order: more than the bound, so the spans leave with the
    // right channel silent and the late outbound audio is dropped (counted), never written
    // elsewhere and never emitted twice.
    let mut rng = Rng(26);
    let inbound = chunks_of(&mut rng, 0, &regular(0, 0..50));
    let outbound = chunks_of(&mut rng, 1, &regular(0, 0..50));
    let pushes = arrive(inbound, outbound, [0, 300]);
    let (records, dropped) = run_stereo(STEREO_8K, &pushes, |_, _| {});
    assert!(dropped > 0);
    assert_ordered(&records);
    assert_eq!(records.len(), 50);
    let mut model = Model::default();
    for p in &pushes {
        model.place(p);
    }
    let mut right_audio = 0;
    for r in &records {
        let frames = s16(&r.payload);
        for (i, frame) in frames.chunks_exact(2).enumerate() {
            let pos = (r.timestamp_ms * 8) as usize + i;
            let want = |t| model.at(t, pos).map_or(0, |(c, _, _)| g711::decode(c));
            assert_eq!(frame[0], want(0), "left at {pos}");
            assert!(frame[1] == 0 || frame[1] == want(1), "right at {pos}");
            right_audio += usize::from(frame[1] != 0);
        }
    }
    // What arrived in time (the tail, after inbound ended) is there.
    assert!(right_audio > 0);
    println!("beyond the lag: {dropped} samples dropped, {right_audio} right samples kept");
}

#[test]
fn stereo_random_scenarios_match_the_timeline_model() {
    // Random plans: start offsets, payloads of 10–60 ms (some not a whole number of ms, so
    // timestamps round), gaps of 20–800 ms and rarely 5 s, duplicates, a missing track, and
    // per-track delivery delays up to 100 ms (within the lag bound, so nothing may be lost
    // except duplicates).
    let mut rng = Rng(0xABCD);
    for case in 0..300 {
        let mut tracks = Vec::new();
        for track in 0..2 {
            let mut plan = Vec::new();
            if rng.below(10) > 0 {
                let mut at = rng.below(300) * 8;
                while at < 8 * 2500 {
                    if rng.below(12) == 0 {
                        at += if rng.below(20) == 0 {
                            8 * 5000
                        } else {
                            8 * 20 * (1 + rng.below(40))
                        };
                        continue;
                    }
                    let bytes = (8 * [10, 20, 20, 20, 30, 40, 50, 60][rng.below(8) as usize]
                        + if rng.below(8) == 0 { rng.below(8) } else { 0 })
                        as usize;
                    let ts = at.div_ceil(8) - u64::from(rng.below(2) == 0 && !at.is_multiple_of(8));
                    plan.push((ts, bytes));
                    if rng.below(30) == 0 {
                        plan.push((ts, bytes));
                    }
                    at = ts * 8 + bytes as u64;
                }
            }
            tracks.push(chunks_of(&mut rng, track, &plan));
        }
        // Duplicates resend the same audio.
        for t in &mut tracks {
            for i in 1..t.len() {
                if t[i].timestamp_ms == t[i - 1].timestamp_ms {
                    t[i].ulaw = t[i - 1].ulaw.clone();
                }
            }
        }
        let outbound = tracks.pop().unwrap_or_default();
        let inbound = tracks.pop().unwrap_or_default();
        let delay = [rng.below(50), rng.below(101)];
        let pushes = arrive(inbound, outbound, delay);
        let (records, _) = run_stereo(STEREO_8K, &pushes, |_, _| {});
        assert_ordered(&records);
        let mut model = Model::default();
        for p in &pushes {
            model.place(p);
        }
        let want = model.expected_8k();
        assert_eq!(records.len(), want.len(), "case {case}: record count");
        for (g, w) in records.iter().zip(&want) {
            assert_eq!(g, w, "case {case}: record at {} ms", w.timestamp_ms);
        }
    }
}

#[test]
fn stereo_16k_counts_and_alignment() {
    // Inbound from 0 with a gap, outbound on a 5 ms offset grid starting at 105 ms. Every
    // record is 20 ms of frames; every even output sample is the input sample exactly (the
    // interpolating filter), and every position no chunk covers is exactly silent.
    let mut rng = Rng(27);
    let inbound = chunks_of(
        &mut rng,
        0,
        &regular(0, (0..60).filter(|k| !(20..23).contains(k))),
    );
    let outbound = chunks_of(&mut rng, 1, &regular(105, 0..40));
    let pushes = arrive(inbound, outbound, [0, 60]);
    let (records, dropped) = run_stereo(
        "w:rate=16000,format=s16le,layout=stereo",
        &pushes,
        |_, _| {},
    );
    assert_eq!(dropped, 0);
    assert_ordered(&records);
    let mut model = Model::default();
    for p in &pushes {
        model.place(p);
    }
    // Spans with audio: 0 .. 1200 ms on inbound, up to 905 ms on outbound → 60 spans.
    assert_eq!(records.len(), 60);
    let mut checked = 0;
    for r in &records {
        assert_eq!((r.payload.len(), r.chunks), (320 * 2 * 2, 1));
        assert_eq!(r.timestamp_ms % 20, 0);
        let frames = s16(&r.payload);
        for (i, frame) in frames.chunks_exact(2).enumerate() {
            let out_pos = (r.timestamp_ms * 16) as usize + i;
            for (t, &v) in frame.iter().enumerate() {
                match model.at(t, out_pos / 2) {
                    None => assert_eq!(v, 0, "track {t} at output {out_pos}: not silent"),
                    Some((c, _, _)) if out_pos.is_multiple_of(2) => {
                        assert_eq!(v, g711::decode(c), "track {t} at output {out_pos}");
                        checked += 1;
                    }
                    Some(_) => {}
                }
            }
        }
    }
    // Every covered input sample of both tracks: 57 inbound and 40 outbound chunks.
    assert_eq!(checked, 57 * 160 + 40 * 160);
    // Per track, the samples equal resampling each run on its own (runs split at gaps).
    let left: Vec<i16> = records
        .iter()
        .flat_map(|r| s16(&r.payload))
        .step_by(2)
        .collect();
    let run = &decode(
        &pushes
            .iter()
            .filter(|p| p.track == 0 && p.timestamp_ms < 400)
            .flat_map(|p| p.ulaw.clone())
            .collect::<Vec<u8>>(),
    );
    let mut want = Vec::new();
    dsp::pcm::f32_to_s16le_into(&one_shot(16000, run), &mut want);
    assert_eq!(&left[..6400], &s16(&want)[..]);
}

// ---------------------------------------------------------------------------------------------
// Cost and robustness.

#[test]
fn steady_streaming_does_not_allocate() {
    let mut rng = Rng(31);
    let audio = [rng.bytes(160 * 300), rng.bytes(160 * 300)];
    for spec in [
        "a:rate=16000,format=s16le",
        "a:rate=24000,format=s16le",
        "a:rate=48000,format=f32le",
        "a:rate=8000,format=s16le",
        "a:rate=16000,format=s16le,layout=stereo",
        "a:rate=48000,format=f32le,layout=stereo",
    ] {
        let mut stream = ProfileStream::new(&ProfileSpec::parse(spec).expect("spec")).expect("s");
        let mut bytes = 0usize;
        let mut sink = |r: ProfileRecord<'_>| bytes += r.payload.len();
        let feed = |stream: &mut ProfileStream,
                    ks: std::ops::Range<usize>,
                    sink: &mut dyn FnMut(ProfileRecord<'_>)| {
            for k in ks {
                for (track, a) in audio.iter().enumerate() {
                    let c = &a[160 * k..160 * (k + 1)];
                    stream.push(
                        ChunkIn {
                            track,
                            ulaw: c,
                            timestamp_ms: 20 * k as u64,
                            seq: k as u64,
                            chunk: k as u64,
                            contiguous: k > 0,
                        },
                        sink,
                    );
                }
            }
        };
        feed(&mut stream, 0..20, &mut sink);
        let n = counting::count(|| feed(&mut stream, 20..300, &mut sink));
        assert_eq!(n, 0, "{spec}: {n} allocations in 280 chunks per track");
        // Gaps and finish reuse the same buffers too.
        let n = counting::count(|| {
            stream.push(
                ChunkIn {
                    track: 0,
                    ulaw: &audio[0][..160],
                    timestamp_ms: 10_000,
                    seq: 1,
                    chunk: 1,
                    contiguous: false,
                },
                &mut sink,
            );
            stream.finish(&mut sink);
        });
        assert_eq!(n, 0, "{spec}: {n} allocations at a gap and finish");
        // The closure's borrow of `bytes` ends with its last use above.
        assert!(bytes > 0);
    }
}

#[test]
fn hostile_timestamps_and_long_gaps_are_harmless_and_cheap() {
    for spec in [
        "h:rate=48000,format=f32le",
        "h:rate=48000,format=f32le,layout=stereo",
        "h:rate=8000,layout=stereo",
    ] {
        let mut stream = ProfileStream::new(&ProfileSpec::parse(spec).expect("spec")).expect("s");
        let mut records = Vec::new();
        let chunk = [0x55u8; 160];
        for (i, ts) in [
            0u64,
            20,
            3_600_000,
            40,
            u64::MAX,
            u64::MAX - 1,
            1 << 50,
            60,
            7,
        ]
        .into_iter()
        .enumerate()
        {
            stream.push(
                ChunkIn {
                    track: i % 2,
                    ulaw: &chunk,
                    timestamp_ms: ts,
                    seq: i as u64,
                    chunk: i as u64,
                    contiguous: true,
                },
                &mut |r| records.push(Rec::from(r)),
            );
        }
        // Empty payloads and unknown tracks are ignored.
        stream.push(
            ChunkIn {
                track: 0,
                ulaw: &[],
                timestamp_ms: 80,
                seq: 99,
                chunk: 99,
                contiguous: true,
            },
            &mut |r| records.push(Rec::from(r)),
        );
        stream.push(
            ChunkIn {
                track: 7,
                ulaw: &chunk,
                timestamp_ms: 80,
                seq: 99,
                chunk: 99,
                contiguous: true,
            },
            &mut |r| records.push(Rec::from(r)),
        );
        stream.finish(&mut |r| records.push(Rec::from(r)));
        assert!(!records.is_empty(), "{spec}");
        let stereo: Vec<&Rec> = records
            .iter()
            .filter(|r| r.channel == Channel::Stereo)
            .collect();
        assert!(
            stereo
                .windows(2)
                .all(|w| w[0].timestamp_ms < w[1].timestamp_ms),
            "{spec}"
        );
    }
}
