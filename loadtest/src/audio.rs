//! Audio sources for simulated calls.
//!
//! Everything ends up as G.711 μ-law at 8 kHz mono, cut into 20 ms chunks of
//! [`CHUNK_BYTES`] bytes. [`ChunkTable`] precomputes the base64 text of every chunk once,
//! so the per-message hot path only copies bytes. Sources: a raw μ-law file (`.ulaw`), a
//! RIFF/WAVE file (PCM 8/16-bit, any common rate and channel count, or μ-law 8 kHz), or a
//! generated sine tone.

use std::path::Path;

/// Bytes of μ-law in one 20 ms chunk at 8 kHz.
pub const CHUNK_BYTES: usize = 160;
/// Length of the base64 text of one chunk (160 bytes → 54 groups of 4 characters).
pub const CHUNK_B64: usize = CHUNK_BYTES.div_ceil(3) * 4;
/// Output sample rate of every source.
pub const SAMPLE_RATE: u32 = 8000;

/// Errors while loading audio.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The WAV file is malformed or uses an unsupported format.
    #[error("unsupported or malformed WAV: {0}")]
    Wav(String),
    /// The source holds less than one 20 ms chunk of audio.
    #[error("audio is shorter than one 20 ms chunk")]
    TooShort,
}

/// Decodes one μ-law byte to a linear 16-bit sample (ITU-T G.711).
pub const fn ulaw_decode(byte: u8) -> i16 {
    let u = !byte;
    let mut t: i32 = (((u & 0x0F) as i32) << 3) + 0x84;
    t <<= ((u & 0x70) >> 4) as i32;
    if u & 0x80 != 0 {
        (0x84 - t) as i16
    } else {
        (t - 0x84) as i16
    }
}

const fn build_decode_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = ulaw_decode(i as u8);
        i += 1;
    }
    table
}

/// μ-law byte → linear sample, computed at compile time from [`ulaw_decode`].
pub static ULAW_TO_PCM: [i16; 256] = build_decode_table();

/// Encodes one linear 16-bit sample to μ-law (ITU-T G.711, bias 0x84, clip 32635).
pub fn ulaw_encode(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let mut s = sample as i32;
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    // Exponent: position of the highest set bit above bit 7.
    let mut exponent = 7;
    let mut mask = 0x4000;
    while exponent > 0 && s & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) | mantissa) as u8
}

/// Decodes μ-law bytes and appends them as little-endian PCM16 to `out`.
pub fn ulaw_to_pcm_le(ulaw: &[u8], out: &mut Vec<u8>) {
    out.reserve(ulaw.len() * 2);
    for &b in ulaw {
        out.extend_from_slice(&ULAW_TO_PCM[b as usize].to_le_bytes());
    }
}

/// A whole audio source cut into 20 ms chunks, with the base64 of each chunk precomputed.
///
/// Shared read-only by every stream through an `Arc`; streams read chunk `k` at their own
/// offset so concurrent calls carry different audio.
#[derive(Debug)]
pub struct ChunkTable {
    /// Raw μ-law, `len() == chunks * CHUNK_BYTES`.
    ulaw: Vec<u8>,
    /// Base64 text of every chunk, `CHUNK_B64` bytes each, back to back.
    b64: Vec<u8>,
    /// Number of chunks.
    chunks: usize,
}

impl ChunkTable {
    /// Builds the table from μ-law bytes; a trailing partial chunk is dropped.
    pub fn new(ulaw: &[u8]) -> Result<Self, AudioError> {
        let chunks = ulaw.len() / CHUNK_BYTES;
        if chunks == 0 {
            return Err(AudioError::TooShort);
        }
        let ulaw = ulaw[..chunks * CHUNK_BYTES].to_vec();
        let mut b64 = vec![0u8; chunks * CHUNK_B64];
        for (src, dst) in ulaw
            .chunks_exact(CHUNK_BYTES)
            .zip(b64.chunks_exact_mut(CHUNK_B64))
        {
            let written = base64_simd::STANDARD.encode(src, base64_simd::Out::from_slice(dst));
            debug_assert_eq!(written.len(), CHUNK_B64);
        }
        Ok(Self { ulaw, b64, chunks })
    }

    /// Number of distinct chunks; indices wrap around modulo this.
    pub fn len(&self) -> usize {
        self.chunks
    }

    /// Always false: a table holds at least one chunk.
    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// μ-law bytes of chunk `index % len()`.
    pub fn ulaw(&self, index: usize) -> &[u8] {
        let i = index % self.chunks;
        &self.ulaw[i * CHUNK_BYTES..(i + 1) * CHUNK_BYTES]
    }

    /// Base64 text of chunk `index % len()`.
    pub fn b64(&self, index: usize) -> &[u8] {
        let i = index % self.chunks;
        &self.b64[i * CHUNK_B64..(i + 1) * CHUNK_B64]
    }
}

/// Loads an audio file: `.wav` is parsed and converted, anything else is raw μ-law.
pub fn load_file(path: &Path) -> Result<Vec<u8>, AudioError> {
    let data = std::fs::read(path).map_err(|source| AudioError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let is_wav = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("wav"))
        || data.starts_with(b"RIFF");
    if is_wav {
        wav_to_ulaw(&data)
    } else {
        Ok(data)
    }
}

/// Generates `seconds` of a sine tone at `hz` (amplitude about −6 dBFS) as μ-law.
pub fn tone(hz: f64, seconds: f64) -> Vec<u8> {
    let n = (seconds * SAMPLE_RATE as f64).round() as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / SAMPLE_RATE as f64;
            let v = (2.0 * std::f64::consts::PI * hz * t).sin() * 16000.0;
            ulaw_encode(v as i16)
        })
        .collect()
}

/// Reads a little-endian u16 at `at`.
fn le16(d: &[u8], at: usize) -> Option<u16> {
    d.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Reads a little-endian u32 at `at`.
fn le32(d: &[u8], at: usize) -> Option<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Converts a RIFF/WAVE file to 8 kHz mono μ-law.
///
/// Supports PCM (format 1 or WAVE_FORMAT_EXTENSIBLE) with 8 or 16 bits per sample, any
/// sample rate and channel count (channels are averaged), and μ-law (format 7) at 8 kHz.
/// Resampling is linear interpolation: adequate for load-test audio, not for listening.
pub fn wav_to_ulaw(data: &[u8]) -> Result<Vec<u8>, AudioError> {
    let bad = |m: &str| AudioError::Wav(m.to_string());
    if data.len() < 12 || &data[0..4] != b"RIFF" || &data[8..12] != b"WAVE" {
        return Err(bad("missing RIFF/WAVE header"));
    }
    let mut pos = 12;
    let mut fmt: Option<(u16, u16, u32, u16)> = None;
    let mut samples: Option<&[u8]> = None;
    while pos + 8 <= data.len() {
        let id = &data[pos..pos + 4];
        let size = le32(data, pos + 4).ok_or_else(|| bad("truncated chunk"))? as usize;
        let body_start = pos + 8;
        let body_end = body_start.saturating_add(size).min(data.len());
        let body = &data[body_start..body_end];
        match id {
            b"fmt " => {
                let format = le16(body, 0).ok_or_else(|| bad("short fmt"))?;
                let channels = le16(body, 2).ok_or_else(|| bad("short fmt"))?;
                let rate = le32(body, 4).ok_or_else(|| bad("short fmt"))?;
                let bits = le16(body, 14).ok_or_else(|| bad("short fmt"))?;
                // WAVE_FORMAT_EXTENSIBLE: the real format is the first 2 bytes of the GUID.
                let format = if format == 0xFFFE {
                    le16(body, 24).ok_or_else(|| bad("short extensible fmt"))?
                } else {
                    format
                };
                fmt = Some((format, channels, rate, bits));
            }
            b"data" => samples = Some(body),
            _ => {}
        }
        pos = body_start.saturating_add(size + (size & 1));
    }
    let (format, channels, rate, bits) = fmt.ok_or_else(|| bad("no fmt chunk"))?;
    let samples = samples.ok_or_else(|| bad("no data chunk"))?;
    if channels == 0 || rate == 0 {
        return Err(bad("zero channels or sample rate"));
    }
    let ch = channels as usize;
    let mono: Vec<i16> = match (format, bits) {
        (1, 16) => samples
            .chunks_exact(2 * ch)
            .map(|frame| {
                let sum: i32 = frame
                    .chunks_exact(2)
                    .map(|s| i16::from_le_bytes([s[0], s[1]]) as i32)
                    .sum();
                (sum / ch as i32) as i16
            })
            .collect(),
        (1, 8) => samples
            .chunks_exact(ch)
            .map(|frame| {
                let sum: i32 = frame.iter().map(|&s| (s as i32 - 128) << 8).sum();
                (sum / ch as i32) as i16
            })
            .collect(),
        (7, 8) => samples
            .chunks_exact(ch)
            .map(|frame| {
                let sum: i32 = frame.iter().map(|&s| ULAW_TO_PCM[s as usize] as i32).sum();
                (sum / ch as i32) as i16
            })
            .collect(),
        (f, b) => return Err(AudioError::Wav(format!("format {f} with {b} bits"))),
    };
    let resampled = resample_linear(&mono, rate, SAMPLE_RATE);
    Ok(resampled.into_iter().map(ulaw_encode).collect())
}

/// Linear-interpolation resampler from `from` Hz to `to` Hz.
///
/// Output length is `floor(len * to / from)`.
pub fn resample_linear(input: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to || input.is_empty() {
        return input.to_vec();
    }
    let out_len = (input.len() as u64 * to as u64 / from as u64) as usize;
    let step = from as f64 / to as f64;
    (0..out_len)
        .map(|i| {
            let x = i as f64 * step;
            let j = x.floor() as usize;
            let frac = x - j as f64;
            let a = input[j.min(input.len() - 1)] as f64;
            let b = input[(j + 1).min(input.len() - 1)] as f64;
            (a + (b - a) * frac).round() as i16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula from the gateway's Kafka contract, written out independently.
    fn contract_decode(b: u8) -> i16 {
        let u = !b;
        let mut t: i32 = (((u & 0x0F) as i32) << 3) + 0x84;
        t <<= (u & 0x70) >> 4;
        (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
    }

    #[test]
    fn decode_table_matches_formula() {
        for b in 0..=255u8 {
            assert_eq!(ULAW_TO_PCM[b as usize], contract_decode(b), "byte {b:#04x}");
        }
        // Well-known anchors of G.711 μ-law.
        assert_eq!(ULAW_TO_PCM[0xFF], 0);
        assert_eq!(ULAW_TO_PCM[0x7F], 0);
        assert_eq!(ULAW_TO_PCM[0x00], -32124);
        assert_eq!(ULAW_TO_PCM[0x80], 32124);
    }

    #[test]
    fn encode_roundtrips_decoded_values() {
        for b in 0..=255u8 {
            let pcm = ULAW_TO_PCM[b as usize];
            let back = ulaw_encode(pcm);
            // 0x7F and 0xFF both decode to 0; everything else is exact.
            assert_eq!(ULAW_TO_PCM[back as usize], pcm, "byte {b:#04x}");
        }
    }

    fn make_wav(rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
        let data_len = (samples.len() * 2) as u32;
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&(36 + data_len).to_le_bytes());
        w.extend_from_slice(b"WAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&channels.to_le_bytes());
        w.extend_from_slice(&rate.to_le_bytes());
        w.extend_from_slice(&(rate * 2 * channels as u32).to_le_bytes());
        w.extend_from_slice(&(2 * channels).to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        // An unknown chunk the parser must skip.
        w.extend_from_slice(b"LIST");
        w.extend_from_slice(&3u32.to_le_bytes());
        w.extend_from_slice(b"abc\0");
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data_len.to_le_bytes());
        for s in samples {
            w.extend_from_slice(&s.to_le_bytes());
        }
        w
    }

    #[test]
    fn wav_16k_converts_to_8k_ulaw() {
        // One second of a 440 Hz tone at 16 kHz.
        let samples: Vec<i16> = (0..16000)
            .map(|i| {
                ((i as f64 * 440.0 * 2.0 * std::f64::consts::PI / 16000.0).sin() * 8000.0) as i16
            })
            .collect();
        let wav = make_wav(16000, 1, &samples);
        let ulaw = wav_to_ulaw(&wav).expect("valid wav");
        assert_eq!(ulaw.len(), 8000);
        // Every other input sample survives decimation by 2 (within μ-law quantisation).
        for (i, &u) in ulaw.iter().enumerate().take(200) {
            let want = samples[2 * i] as i32;
            let got = ULAW_TO_PCM[u as usize] as i32;
            assert!(
                (want - got).abs() <= want.abs() / 16 + 16,
                "sample {i}: {want} vs {got}"
            );
        }
    }

    #[test]
    fn wav_stereo_44k1_is_downmixed() {
        let samples = vec![1000i16; 44100 * 2]; // 1 s of stereo
        let ulaw = wav_to_ulaw(&make_wav(44100, 2, &samples)).expect("valid wav");
        assert_eq!(ulaw.len(), 8000);
        assert!(ulaw
            .iter()
            .all(|&u| (ULAW_TO_PCM[u as usize] - 1000).abs() < 40));
    }

    #[test]
    fn rejects_non_wav() {
        assert!(wav_to_ulaw(b"RIFX0000WAVE").is_err());
        assert!(wav_to_ulaw(b"hello").is_err());
    }

    #[test]
    fn chunk_table_precomputes_base64() {
        let ulaw: Vec<u8> = (0..(CHUNK_BYTES * 3 + 7)).map(|i| i as u8).collect();
        let t = ChunkTable::new(&ulaw).expect("long enough");
        assert_eq!(t.len(), 3);
        assert_eq!(CHUNK_B64, 216);
        for i in 0..5 {
            let decoded = base64_simd::STANDARD
                .decode_to_vec(t.b64(i))
                .expect("valid b64");
            assert_eq!(decoded, t.ulaw(i));
            assert_eq!(
                t.ulaw(i),
                &ulaw[(i % 3) * CHUNK_BYTES..(i % 3 + 1) * CHUNK_BYTES]
            );
        }
        assert!(ChunkTable::new(&[0u8; 100]).is_err());
    }

    #[test]
    fn tone_has_expected_length() {
        assert_eq!(tone(440.0, 2.0).len(), 16000);
    }
}
