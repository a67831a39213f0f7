//! CPU per 20 ms chunk of each output profile: `ProfileStream::push` of one 160-byte μ-law
//! chunk of real speech (both tracks alternating, as a both-track stream delivers them),
//! records copied into a boxed payload as the sink does. Steady state: the streams are warmed
//! up first, and the timeline wraps so the benchmark can run for any number of iterations.
//!
//! Run: `CARGO_TARGET_DIR=... cargo bench -p bench --bench profiles`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::profile::{ChunkIn, ProfileSpec, ProfileStream};

const PROFILES: [&str; 7] = [
    "mono8:rate=8000,format=s16le,layout=mono",
    "mono16:rate=16000,format=s16le,layout=mono",
    "mono16f:rate=16000,format=f32le,layout=mono",
    "mono24:rate=24000,format=s16le,layout=mono",
    "mono48f:rate=48000,format=f32le,layout=mono",
    "st16:rate=16000,format=s16le,layout=stereo",
    "st48f:rate=48000,format=f32le,layout=stereo",
];

fn profiles(c: &mut Criterion) {
    let audio = bench::speech();
    let chunks: Vec<&[u8]> = audio.chunks_exact(160).take(500).collect();
    let mut g = c.benchmark_group("profile_chunk");
    for text in PROFILES {
        let spec = ProfileSpec::parse(text).expect("spec");
        let mut stream = ProfileStream::new(&spec).expect("stream");
        // Position in the stream (per-track chunk index) and the track to feed next.
        let mut k = 0u64;
        let mut track = 0usize;
        let mut bytes = 0usize;
        let mut step = |stream: &mut ProfileStream| {
            let chunk = chunks[(k as usize) % chunks.len()];
            stream.push(
                ChunkIn {
                    track,
                    ulaw: chunk,
                    timestamp_ms: k * 20,
                    seq: 2 * k + track as u64,
                    chunk: k + 1,
                    contiguous: k > 0,
                },
                &mut |r| {
                    // What the sink does with each record: one boxed copy of the payload.
                    let boxed: Box<[u8]> = r.payload.into();
                    bytes += black_box(boxed).len();
                },
            );
            track ^= 1;
            if track == 0 {
                k += 1;
            }
        };
        for _ in 0..200 {
            step(&mut stream);
        }
        g.bench_function(spec.name.as_str(), |b| b.iter(|| step(&mut stream)));
        black_box(bytes);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = profiles
}
criterion_main!(benches);
