//! G.711 μ-law on one 20 ms chunk (160 samples): the crate's encoder (segment and step read
//! from an f32 conversion) against two classic variants — a leading-zero count with a variable
//! shift, and a 256-entry segment table — and the decoders. The variants are checked equal to
//! the crate's encoder for all 65536 inputs before timing.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-dsp cargo bench -p dsp --bench g711`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use dsp::g711;

/// Segment of a biased magnitude, indexed by `biased >> 7` (1 ..= 255): the classic table.
static SEGMENT: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 1;
    while i < 256 {
        // Index of the highest set bit of i, i.e. the segment.
        let mut v = i;
        let mut seg = 0u8;
        while v > 1 {
            v >>= 1;
            seg += 1;
        }
        t[i] = seg;
        i += 1;
    }
    t
};

fn encode_with_table(sample: i16) -> u8 {
    let s = i32::from(sample);
    let sign = (s >> 8) & 0x80;
    let magnitude = (s ^ (s >> 31)) - (s >> 31);
    let biased = magnitude.min(g711::CLIP) + g711::BIAS;
    let exponent = i32::from(SEGMENT[(biased >> 7) as usize]);
    let mantissa = (biased >> (exponent + 3)) & 0x0F;
    !((sign | (exponent << 4) | mantissa) as u8)
}

fn encode_with_clz(sample: i16) -> u8 {
    let s = i32::from(sample);
    let sign = (s >> 8) & 0x80;
    let magnitude = (s ^ (s >> 31)) - (s >> 31);
    let biased = magnitude.min(g711::CLIP) + g711::BIAS;
    let exponent = 24 - (biased as u32).leading_zeros() as i32;
    let mantissa = (biased >> (exponent + 3)) & 0x0F;
    !((sign | (exponent << 4) | mantissa) as u8)
}

fn bench(c: &mut Criterion) {
    // A realistic chunk: a tone spanning most segments, both signs.
    let pcm: Vec<i16> = (0..160)
        .map(|i| (20000.0 * (i as f64 * 0.3).sin()) as i16)
        .collect();
    let le: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
    for s in i16::MIN..=i16::MAX {
        let want = g711::encode(s);
        assert_eq!(want, encode_with_table(s));
        assert_eq!(want, encode_with_clz(s));
    }
    let codes: Vec<u8> = pcm.iter().map(|&s| g711::encode(s)).collect();

    let mut group = c.benchmark_group("g711_160");
    let mut out = Vec::with_capacity(320);
    group.bench_function("encode_into", |b| {
        b.iter(|| {
            out.clear();
            g711::encode_into(black_box(&pcm), &mut out);
            black_box(&out);
        })
    });
    for (name, variant) in [
        ("encode_variant_clz", encode_with_clz as fn(i16) -> u8),
        ("encode_variant_table", encode_with_table),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                out.extend(black_box(&pcm).iter().map(|&s| variant(s)));
                black_box(&out);
            })
        });
    }
    group.bench_function("encode_pcm16le_into", |b| {
        b.iter(|| {
            out.clear();
            g711::encode_pcm16le_into(black_box(&le), &mut out);
            black_box(&out);
        })
    });
    let mut samples = Vec::with_capacity(160);
    group.bench_function("decode_into", |b| {
        b.iter(|| {
            samples.clear();
            g711::decode_into(black_box(&codes), &mut samples);
            black_box(&samples);
        })
    });
    group.bench_function("decode_pcm16le_into", |b| {
        b.iter(|| {
            out.clear();
            g711::decode_pcm16le_into(black_box(&codes), &mut out);
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
