//! G.711 μ-law codec (ITU-T G.711, the North American / Japanese variant that Twilio Media
//! Streams carry as `audio/x-mulaw`, 8 kHz mono).
//!
//! The codec works on the 16-bit linear scale used by most implementations: the 14-bit
//! magnitude of the standard is shifted left by two, so the bias is `0x84` (= 33 × 4) and input
//! magnitudes are clipped at 32635 (= 32767 − 0x84, the largest value that still fits after the
//! bias is added). Every μ-law byte is transmitted bit-inverted.
//!
//! * [`decode`] is a lookup in a 256-entry table built at compile time.
//! * [`encode`] is branch-free arithmetic: the segment is the position of the highest set bit of
//!   the biased magnitude, read (with the step bits below it) from the exponent and mantissa of
//!   the magnitude converted to f32. `benches/g711.rs` compares it with the classic 256-entry
//!   segment table and with a leading-zero count; the float form was the fastest (it is the
//!   only one of the three that vectorises on the x86-64 baseline), so no table is carried for
//!   encoding. The tests check it against a textbook loop encoder for all 65536 inputs.
//! * The slice helpers append to a caller-owned `Vec`: they allocate only when `out` lacks the
//!   capacity, so a buffer reused per stream makes them allocation-free.
//!
//! Zero has two codes: `0xFF` (+0) and `0x7F` (−0) both decode to 0. [`encode`] maps 0 to
//! `0xFF`, and maps −1 … −3 to `0x7F` (they fall in the first step of the negative side), so
//! `encode(decode(c)) == c` for every code except `0x7F`, which comes back as `0xFF`.

/// Added to the magnitude before the segment search, so that segment boundaries fall on powers
/// of two (G.711's 33 in 14-bit units, × 4 on the 16-bit scale).
pub const BIAS: i32 = 0x84;

/// Largest magnitude the encoder represents; larger ones saturate to the top code of their sign.
pub const CLIP: i32 = 32635;

/// μ-law code → 16-bit linear sample, for all 256 codes.
pub static DECODE_TABLE: [i16; 256] = build_decode_table();

const fn decode_formula(code: u8) -> i16 {
    // Bytes are sent inverted; after undoing that, bit 7 is the sign (set = negative), bits 6..4
    // the segment and bits 3..0 the step within the segment.
    let u = !code;
    let exponent = ((u >> 4) & 0x07) as i32;
    let mantissa = (u & 0x0F) as i32;
    // Reconstruct the middle of the quantisation step, then remove the bias again.
    let magnitude = ((mantissa << 3) + BIAS) << exponent;
    if u & 0x80 != 0 {
        (BIAS - magnitude) as i16
    } else {
        (magnitude - BIAS) as i16
    }
}

const fn build_decode_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_formula(code as u8);
        code += 1;
    }
    table
}

/// Decodes one μ-law byte to a 16-bit linear sample.
#[inline(always)]
pub fn decode(code: u8) -> i16 {
    DECODE_TABLE[code as usize]
}

/// Encodes one 16-bit linear sample to a μ-law byte (0 → `0xFF`; see the module docs).
#[inline(always)]
pub fn encode(sample: i16) -> u8 {
    let s = i32::from(sample);
    // The sign as 0x80 or 0: an arithmetic shift smears bit 15 down, the mask keeps one bit.
    let sign = (s >> 8) & 0x80;
    // |s| without a branch, in i32 so that −32768 does not overflow; then clip and bias.
    let magnitude = (s ^ (s >> 31)) - (s >> 31);
    let biased = magnitude.min(CLIP) + BIAS;
    // `biased` lies in [0x84, 0x7FFF] and converts to f32 exactly. The float's exponent field
    // is the index of the leading one (7 ..= 14, i.e. segment + 7) and its top four mantissa
    // bits are the four bits just below the leading one, the step within the segment. So bits
    // 30..19 of the float hold `(segment + 7 + 127) << 4 | step`, and one subtraction leaves
    // `segment << 4 | step`. Unlike a leading-zero count followed by a variable shift, every
    // operation here exists as an SSE2 vector instruction, so slice encoding vectorises.
    let bits = (biased as f32).to_bits() as i32;
    let segment_and_step = (bits >> 19) - ((127 + 7) << 4);
    !((sign | segment_and_step) as u8)
}

/// Encodes 16-bit samples, appending one μ-law byte per sample to `out`.
pub fn encode_into(pcm: &[i16], out: &mut Vec<u8>) {
    // `extend` over a slice iterator with an exact length reserves once and then writes without
    // per-element capacity checks; the loop body vectorises.
    out.extend(pcm.iter().map(|&s| encode(s)));
}

/// Encodes little-endian signed 16-bit PCM bytes, appending one μ-law byte per sample to `out`.
///
/// The input must hold whole samples: an odd length is a framing error the caller has to reject
/// before calling. If one slips through anyway, debug builds assert and release builds ignore
/// the odd trailing byte (nothing is read past the last whole sample).
pub fn encode_pcm16le_into(pcm_le_bytes: &[u8], out: &mut Vec<u8>) {
    debug_assert!(
        pcm_le_bytes.len() % 2 == 0,
        "encode_pcm16le_into: odd byte count {}",
        pcm_le_bytes.len()
    );
    // Grow once, then fill the new slice: `extend` over `chunks_exact(2).map(..)` measured about
    // twice as slow here (it did not vectorise; see benches/g711.rs).
    let start = out.len();
    out.resize(start + pcm_le_bytes.len() / 2, 0);
    for (code, b) in out[start..].iter_mut().zip(pcm_le_bytes.chunks_exact(2)) {
        *code = encode(i16::from_le_bytes([b[0], b[1]]));
    }
}

/// Decodes μ-law bytes, appending one 16-bit sample per byte to `out`.
pub fn decode_into(ulaw: &[u8], out: &mut Vec<i16>) {
    out.extend(ulaw.iter().map(|&c| decode(c)));
}

/// Decodes μ-law bytes straight to little-endian signed 16-bit PCM bytes (two per input byte),
/// appended to `out`: the layout the gateway publishes, without an intermediate `i16` buffer.
pub fn decode_pcm16le_into(ulaw: &[u8], out: &mut Vec<u8>) {
    // Grow once, then fill two-byte pieces (a flat_map `extend` would check capacity per byte).
    let start = out.len();
    out.resize(start + 2 * ulaw.len(), 0);
    for (dst, &c) in out[start..].chunks_exact_mut(2).zip(ulaw) {
        dst.copy_from_slice(&decode(c).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The G.711 expansion written from the standard's table rather than from bit fields:
    /// segment `e` starts at `(33 << e) − 33` in 14-bit units and its steps are `2 << e` wide;
    /// the decoder returns the middle of the step, scaled to 16 bits (× 4).
    fn g711_expansion(code: u8) -> i32 {
        let inverted = !code;
        let negative = inverted >= 0x80;
        let segment = u32::from((inverted >> 4) & 7);
        let step = i32::from(inverted & 0x0F);
        let magnitude_14bit = (2 * step + 33) * (1 << segment) - 33;
        let magnitude = 4 * magnitude_14bit;
        if negative {
            -magnitude
        } else {
            magnitude
        }
    }

    /// A straightforward reference encoder: clip, bias, then find the segment by walking the
    /// segment ends one by one (the textbook loop), and invert the assembled byte.
    fn reference_encode(sample: i16) -> u8 {
        const SEGMENT_END: [i32; 8] = [0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF, 0x7FFF];
        let value = i32::from(sample);
        let (sign, magnitude) = if value < 0 {
            (0x80u8, -value)
        } else {
            (0x00u8, value)
        };
        let biased = magnitude.min(32635) + 0x84;
        let mut segment = 0usize;
        while segment < 8 && biased > SEGMENT_END[segment] {
            segment += 1;
        }
        let step = ((biased >> (segment + 3)) & 0x0F) as u8;
        !(sign | ((segment as u8) << 4) | step)
    }

    #[test]
    fn decode_table_matches_g711_formula_for_all_codes() {
        for code in 0..=255u8 {
            assert_eq!(
                i32::from(decode(code)),
                g711_expansion(code),
                "code {code:#04x}"
            );
        }
        // Landmarks from the standard: the two zeros and the two extremes.
        assert_eq!(decode(0xFF), 0);
        assert_eq!(decode(0x7F), 0);
        assert_eq!(decode(0x80), 32124);
        assert_eq!(decode(0x00), -32124);
    }

    #[test]
    fn encode_inverts_decode_except_negative_zero() {
        for code in 0..=255u8 {
            let back = encode(decode(code));
            if code == 0x7F {
                // −0 and +0 decode to the same sample; the encoder picks +0.
                assert_eq!(back, 0xFF);
            } else {
                assert_eq!(back, code, "code {code:#04x}");
            }
        }
        assert_eq!(encode(0), 0xFF);
        assert_eq!(encode(-1), 0x7F);
    }

    #[test]
    fn encode_matches_reference_for_every_i16() {
        for sample in i16::MIN..=i16::MAX {
            assert_eq!(encode(sample), reference_encode(sample), "sample {sample}");
        }
    }

    #[test]
    fn encode_error_is_within_half_a_step() {
        // The codec quantises to the middle of each step, so away from the clip level the
        // round trip error is at most half a step of the segment the sample falls in.
        for sample in -CLIP as i16..=CLIP as i16 {
            let code = encode(sample);
            let segment = (!code >> 4) & 7;
            let half_step = 4i32 << segment;
            let error = (i32::from(decode(code)) - i32::from(sample)).abs();
            assert!(
                error <= half_step,
                "sample {sample}: code {code:#04x}, error {error}"
            );
        }
        // Beyond the clip level the top code of each sign is used.
        assert_eq!(encode(i16::MAX), 0x80);
        assert_eq!(encode(i16::MIN), 0x00);
    }

    #[test]
    fn slice_helpers_append_and_agree_with_scalar_functions() {
        let pcm: Vec<i16> = (i16::MIN..=i16::MAX).step_by(97).collect();
        let le: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();

        let mut from_i16 = vec![0xAA];
        encode_into(&pcm, &mut from_i16);
        let mut from_le = vec![0xAA];
        encode_pcm16le_into(&le, &mut from_le);
        assert_eq!(from_i16, from_le);
        assert_eq!(from_i16[0], 0xAA, "helpers append, they do not overwrite");
        let expected: Vec<u8> = pcm.iter().map(|&s| encode(s)).collect();
        assert_eq!(&from_i16[1..], &expected[..]);

        let codes: Vec<u8> = (0..=255).collect();
        let mut samples = vec![7i16];
        decode_into(&codes, &mut samples);
        assert_eq!(samples[0], 7);
        assert_eq!(&samples[1..], &DECODE_TABLE[..]);

        let mut bytes = vec![1u8];
        decode_pcm16le_into(&codes, &mut bytes);
        let expected: Vec<u8> = DECODE_TABLE.iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(&bytes[1..], &expected[..]);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn odd_trailing_byte_is_ignored_in_release_builds() {
        let mut out = Vec::new();
        encode_pcm16le_into(&[0x00, 0x10, 0x7F], &mut out);
        assert_eq!(out, vec![encode(0x1000)]);
    }

    #[test]
    fn slice_helpers_do_not_allocate_with_capacity() {
        let pcm = [1000i16; 160];
        let le: Vec<u8> = pcm.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut codes = Vec::with_capacity(320);
        let mut samples = Vec::with_capacity(160);
        let mut bytes = Vec::with_capacity(320);
        let allocations = crate::alloc_count::count(|| {
            encode_into(&pcm, &mut codes);
            encode_pcm16le_into(&le, &mut codes);
            decode_into(&codes[..160], &mut samples);
            decode_pcm16le_into(&codes[..160], &mut bytes);
        });
        assert_eq!(allocations, 0);
    }
}
