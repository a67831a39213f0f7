//! Conversions from normalised `f32` samples (the resampler's output, full scale = ±1.0, i.e.
//! `i16 / 32768`) to the byte layouts the gateway publishes.
//!
//! Both helpers append to a caller-owned `Vec<u8>` and allocate only when it lacks capacity.

/// Scale from normalised `f32` to the signed 16-bit range.
const SCALE: f32 = 32768.0;

/// 1.5 × 2²³. Any value in `[-32768, 32767]` plus this lands in `[2²³, 2²⁴)`, where an f32's
/// step is exactly 1: the addition itself rounds to the nearest integer (ties to even), and the
/// integer can be read straight from the bit pattern, `bits(v + R) − bits(R)`. That is a few
/// vector instructions per four samples; `f32::round` is a libm call on the x86-64 baseline
/// and a saturating `as` cast costs several compare-and-select steps.
const ROUNDER: f32 = 12_582_912.0;

/// Converts one normalised sample to `i16`: scale by 32768, round to nearest (ties to even),
/// saturate to `[-32768, 32767]`; NaN becomes 0.
#[inline(always)]
pub fn f32_to_i16(x: f32) -> i16 {
    let v = x * SCALE;
    // NaN first (a select, which vectorises): the rounding below would turn it into −32768.
    let v = if v.is_nan() { 0.0 } else { v };
    let clamped = v.clamp(-32768.0, 32767.0);
    let offset = (clamped + ROUNDER).to_bits() as i32 - ROUNDER.to_bits() as i32;
    // In range by construction: the clamp bounds the offset to [-32768, 32767].
    offset as i16
}

/// Appends each sample as signed 16-bit little-endian (2 bytes), converted by [`f32_to_i16`].
pub fn f32_to_s16le_into(samples: &[f32], out: &mut Vec<u8>) {
    // Grow once, then fill fixed-size pieces: `extend` over a flat_map would check capacity
    // per byte and does not vectorise.
    let start = out.len();
    out.resize(start + 2 * samples.len(), 0);
    for (dst, &x) in out[start..].chunks_exact_mut(2).zip(samples) {
        dst.copy_from_slice(&f32_to_i16(x).to_le_bytes());
    }
}

/// Appends each sample unchanged as IEEE-754 binary32 little-endian (4 bytes).
pub fn f32_to_f32le_into(samples: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + 4 * samples.len(), 0);
    for (dst, &x) in out[start..].chunks_exact_mut(4).zip(samples) {
        dst.copy_from_slice(&x.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_i16_round_trips() {
        for s in i16::MIN..=i16::MAX {
            assert_eq!(f32_to_i16(f32::from(s) / SCALE), s);
        }
    }

    #[test]
    fn rounds_to_nearest_and_saturates() {
        let cases: [(f32, i16); 16] = [
            (0.0, 0),
            (-0.0, 0),
            (0.4 / SCALE, 0),
            (0.6 / SCALE, 1),
            (-0.6 / SCALE, -1),
            (0.5 / SCALE, 0),   // tie → even
            (1.5 / SCALE, 2),   // tie → even
            (-2.5 / SCALE, -2), // tie → even
            (100.49 / SCALE, 100),
            (1.0, 32767), // +full scale is one step above the largest i16
            (32766.6 / SCALE, 32767),
            (-1.0, -32768),
            (-1.5, -32768),
            (7.0, 32767),
            (f32::INFINITY, 32767),
            (f32::NEG_INFINITY, -32768),
        ];
        for (x, want) in cases {
            assert_eq!(f32_to_i16(x), want, "x = {x}");
        }
        assert_eq!(f32_to_i16(f32::NAN), 0);
    }

    #[test]
    fn matches_round_ties_even_on_every_half_step() {
        // Every multiple of half an LSB from beyond −full scale to beyond +full scale: exact
        // integers, exact ties and everything saturating, against the obvious formula.
        for k in -70_000i32..=70_000 {
            let x = k as f32 * 0.5 / SCALE;
            let want = (x * SCALE).round_ties_even().clamp(-32768.0, 32767.0) as i16;
            assert_eq!(f32_to_i16(x), want, "x = {x}");
        }
    }

    #[test]
    fn byte_helpers_append_little_endian() {
        let mut out = vec![0xEE];
        f32_to_s16le_into(&[0.5, -1.0, 1.0], &mut out);
        assert_eq!(out, vec![0xEE, 0x00, 0x40, 0x00, 0x80, 0xFF, 0x7F]);

        let mut out = vec![0xEE];
        f32_to_f32le_into(&[1.0, -0.25], &mut out);
        let mut want = vec![0xEE];
        want.extend_from_slice(&1.0f32.to_le_bytes());
        want.extend_from_slice(&(-0.25f32).to_le_bytes());
        assert_eq!(out, want);
    }
}
