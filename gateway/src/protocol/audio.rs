//! Audio decoding on the per-frame path: base64 → G.711 μ-law → signed 16-bit little-endian PCM.
//!
//! Both steps write into buffers the caller owns and reuses, so a steady stream performs no
//! allocation here. The μ-law table is computed at compile time from the G.711 formula and
//! checked against the formula for all 256 codes in the tests.

use thiserror::Error;

/// Why a `media.payload` could not be decoded.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload is not valid standard (padded) base64.
    #[error("payload is not valid base64")]
    InvalidBase64,
    /// The payload decodes to zero bytes.
    #[error("payload is empty")]
    Empty,
    /// The payload decodes to more bytes than the configured per-message cap.
    #[error("payload too large")]
    TooLarge,
}

/// G.711 μ-law decode of one code, straight from the formula (ITU-T G.711, as in Sun's g711.c).
pub const fn ulaw_to_linear(code: u8) -> i16 {
    let u = !code;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = ((mantissa << 3) + 0x84) << exponent;
    let sample = if u & 0x80 != 0 {
        0x84 - magnitude
    } else {
        magnitude - 0x84
    };
    sample as i16
}

const fn build_table() -> [[u8; 2]; 256] {
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = ulaw_to_linear(i as u8).to_le_bytes();
        i += 1;
    }
    table
}

/// μ-law code → the two little-endian bytes of its PCM16 sample.
pub static ULAW_TO_PCM16_LE: [[u8; 2]; 256] = build_table();

/// Decodes standard base64 `src` and appends the bytes to `dst`, reusing its capacity.
/// Returns the number of bytes appended. `max_len` caps the decoded size.
pub fn decode_base64_into(
    src: &[u8],
    dst: &mut Vec<u8>,
    max_len: usize,
) -> Result<usize, PayloadError> {
    let b64 = base64_simd::STANDARD;
    let n = b64
        .decoded_length(src)
        .map_err(|_| PayloadError::InvalidBase64)?;
    if n == 0 {
        return Err(PayloadError::Empty);
    }
    if n > max_len {
        return Err(PayloadError::TooLarge);
    }
    let start = dst.len();
    dst.reserve(n);
    let spare = &mut dst.spare_capacity_mut()[..n];
    let written = b64
        .decode(src, base64_simd::Out::from_uninit_slice(spare))
        .map_err(|_| PayloadError::InvalidBase64)?
        .len();
    debug_assert_eq!(written, n);
    // SAFETY: `decode` initialised exactly `written` bytes of the spare capacity.
    unsafe { dst.set_len(start + written) };
    Ok(written)
}

/// Appends the PCM s16le expansion of μ-law `ulaw` to `dst` (two bytes per input byte).
#[inline]
pub fn ulaw_to_pcm16le_into(ulaw: &[u8], dst: &mut Vec<u8>) {
    // Size once, then write pairs in place: no per-sample capacity check.
    let start = dst.len();
    dst.resize(start + ulaw.len() * 2, 0);
    for (out, &code) in dst[start..].chunks_exact_mut(2).zip(ulaw) {
        out.copy_from_slice(&ULAW_TO_PCM16_LE[code as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook decoder, written independently of the table builder: sign, exponent and
    /// mantissa extracted from the complemented code, magnitude = ((2m + 33) << e) - 33, scaled
    /// by 4 to the 16-bit range.
    fn g711_reference(code: u8) -> i16 {
        let c = !code;
        let sign = c & 0x80;
        let e = ((c >> 4) & 7) as i32;
        let m = (c & 0x0F) as i32;
        let mag = (((2 * m + 33) << e) - 33) * 4;
        if sign != 0 {
            -(mag as i16)
        } else {
            mag as i16
        }
    }

    #[test]
    fn table_matches_formula_for_all_codes() {
        for code in 0..=255u8 {
            let expect = g711_reference(code);
            assert_eq!(ulaw_to_linear(code), expect, "code {code:#04x}");
            assert_eq!(ULAW_TO_PCM16_LE[code as usize], expect.to_le_bytes());
        }
        // Well-known anchors: 0xFF and 0x7F are the two zeros, 0x00 / 0x80 the extremes.
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x7F), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
    }

    #[test]
    fn base64_round_trips_any_length_and_appends() {
        for len in [1usize, 2, 3, 4, 159, 160, 161, 320, 1000] {
            let raw: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let enc = base64_simd::STANDARD.encode_to_string(&raw);
            let mut out = vec![9u8];
            let n = decode_base64_into(enc.as_bytes(), &mut out, 1 << 20).unwrap();
            assert_eq!(n, len);
            assert_eq!(out[0], 9);
            assert_eq!(&out[1..], &raw[..]);
        }
    }

    #[test]
    fn base64_edge_cases() {
        let mut out = Vec::new();
        assert_eq!(
            decode_base64_into(b"", &mut out, 100),
            Err(PayloadError::Empty)
        );
        assert_eq!(
            decode_base64_into(b"abc", &mut out, 100),
            Err(PayloadError::InvalidBase64)
        );
        assert_eq!(
            decode_base64_into(b"ab=c", &mut out, 100),
            Err(PayloadError::InvalidBase64)
        );
        assert_eq!(
            decode_base64_into(b"a*cd", &mut out, 100),
            Err(PayloadError::InvalidBase64)
        );
        assert_eq!(
            decode_base64_into(b"YWJj\n", &mut out, 100),
            Err(PayloadError::InvalidBase64)
        );
        assert_eq!(
            decode_base64_into(b"YWJjZA==", &mut out, 3),
            Err(PayloadError::TooLarge)
        );
        assert!(out.is_empty());
        assert_eq!(decode_base64_into(b"YWJjZA==", &mut out, 4), Ok(4));
        assert_eq!(out, b"abcd");
    }

    #[test]
    fn pcm_expansion_is_little_endian() {
        let mut out = Vec::new();
        ulaw_to_pcm16le_into(&[0x00, 0xFF, 0x80], &mut out);
        assert_eq!(out.len(), 6);
        assert_eq!(i16::from_le_bytes([out[0], out[1]]), -32124);
        assert_eq!(i16::from_le_bytes([out[2], out[3]]), 0);
        assert_eq!(i16::from_le_bytes([out[4], out[5]]), 32124);
    }
}
