//! The on-disk format of spool segments: pure encoding and decoding, no I/O.
//!
//! A segment file is a header followed by frames:
//!
//! ```text
//! header (36 bytes): magic "TKGSPOOL" | version u32 | flags u32 | epoch u64 | segment id u64 | crc32 u32
//! frame:             body length u32 | crc32 of the body u32 | body
//! ```
//!
//! Integers are little-endian. The first byte of a body says what it is:
//! - `1` **topics**: the slot → topic name table of the writer (first frame of every segment), so
//!   a gateway restarted with other topics routes recovered records by name, not by slot;
//! - `2` **stream**: a stream's number and SIDs, written before its first record in the segment
//!   (records carry only the number; every segment is readable on its own);
//! - `3` **counters**: a stream's accounting when its terminal record was spooled, so a terminal
//!   event recovered after a restart still reports what the stream received;
//! - `4` **record**: the fixed metadata of a [`SpoolRecord`] and its payload.
//!
//! Decoding never panics and never trusts a length: any byte sequence yields frames, then either
//! the clean end or one [`Corrupt`] reason, after which the rest of the segment is skipped (a
//! checksum mismatch means the lengths after it cannot be trusted either).

use crate::metrics::DropReason;

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"TKGSPOOL";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 36;
/// Bytes before each frame body (length and checksum).
pub const FRAME_PREFIX: usize = 8;
/// Largest body accepted; larger lengths are corruption (no record comes near it).
pub const MAX_BODY: usize = 64 << 20;
/// `stream` field of a record that belongs to no stream.
pub const NO_STREAM: u64 = u64::MAX;

const TYPE_TOPICS: u8 = 1;
const TYPE_STREAM: u8 = 2;
const TYPE_COUNTERS: u8 = 3;
const TYPE_RECORD: u8 = 4;

/// Bytes of a record body before its payload.
pub const RECORD_FIXED: usize = 1 + 8 + 8 + 8 + 8 + 4 + 2 + 1 + 1 + 1 + 1;

/// Why the rest of a segment is skipped (`gateway_spool_corrupt_segments_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    /// Shorter than a header, or the header's checksum or magic is wrong.
    Header,
    /// A version this build does not read.
    Version(u32),
    /// A frame's body does not match its checksum.
    Checksum,
    /// The file ends inside a frame (a write cut short, e.g. by `kill -9`).
    Truncated,
    /// A frame with a valid checksum that does not parse (unknown type, bad lengths).
    Malformed,
}

impl Corrupt {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Corrupt::Header => "header",
            Corrupt::Version(_) => "version",
            Corrupt::Checksum => "checksum",
            Corrupt::Truncated => "truncated",
            Corrupt::Malformed => "malformed",
        }
    }
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Random number of the process that wrote it (stream numbers are per process).
    pub epoch: u64,
    /// The segment's id (also in its file name).
    pub segment: u64,
}

/// Encodes a header.
pub fn encode_header(h: Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16: flags, none defined.
    b[16..24].copy_from_slice(&h.epoch.to_le_bytes());
    b[24..32].copy_from_slice(&h.segment.to_le_bytes());
    let crc = crc32fast::hash(&b[..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a header.
pub fn decode_header(b: &[u8]) -> Result<Header, Corrupt> {
    if b.len() < HEADER_LEN || b[..8] != MAGIC {
        return Err(Corrupt::Header);
    }
    if crc32fast::hash(&b[..32]) != u32_at(b, 32) {
        return Err(Corrupt::Header);
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(Corrupt::Version(version));
    }
    Ok(Header {
        epoch: u64_at(b, 16),
        segment: u64_at(b, 24),
    })
}

/// The fixed metadata of a spooled record (see [`SpoolRecord`](super::super::record::SpoolRecord)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    /// Stream number in the writer's process, or [`NO_STREAM`].
    pub stream: u64,
    /// First chunk's sequence number.
    pub seq: u64,
    /// First chunk's media timestamp (ms).
    pub timestamp_ms: u64,
    /// Receive time, unix µs.
    pub received_at_us: u64,
    /// First chunk number.
    pub chunk: u32,
    /// Chunks in the record.
    pub chunks: u16,
    /// Topic slot in the writer's table.
    pub slot: u8,
    /// Record kind (audio, event, terminal).
    pub kind: u8,
    /// Track or event type.
    pub aux: u8,
    /// Flags.
    pub flags: u8,
}

/// A stream's accounting when its terminal record was spooled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// Stream number.
    pub stream: u64,
    /// Chunks received.
    pub received: u64,
    /// Chunks accepted into the Kafka path.
    pub accepted: u64,
    /// Chunks acknowledged by Kafka so far.
    pub delivered: u64,
    /// Played audio frames recorded, delivered and dropped.
    pub playback: [u64; 3],
    /// Chunks dropped so far, by [`DropReason`] index.
    pub drops: Vec<(u8, u64)>,
}

/// One decoded frame, borrowing from the segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Slot → topic name table.
    Topics(Vec<(u8, &'a str)>),
    /// A stream's number and SIDs.
    Stream {
        /// Number in the writer's process.
        number: u64,
        /// stream, call and account SIDs.
        sids: [&'a str; 3],
    },
    /// A stream's accounting (before its terminal record).
    Counters(Counters),
    /// A record.
    Record {
        /// Fixed metadata.
        meta: RecordMeta,
        /// The value (μ-law, samples or JSON).
        payload: &'a [u8],
    },
}

/// Appends a frame with `body` (built by `fill`) to `out`.
fn frame(out: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_PREFIX]);
    fill(out);
    let body_len = out.len() - start - FRAME_PREFIX;
    let crc = crc32fast::hash(&out[start + FRAME_PREFIX..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // SIDs and topic names are short; longer strings are cut at a char boundary (never
    // happens with valid configuration, and cannot corrupt the frame).
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

/// Appends a topics frame.
pub fn encode_topics<'a>(out: &mut Vec<u8>, topics: impl Iterator<Item = (u8, &'a str)>) {
    let topics: Vec<_> = topics.take(255).collect();
    frame(out, |b| {
        b.push(TYPE_TOPICS);
        b.push(topics.len() as u8);
        for (slot, name) in &topics {
            b.push(*slot);
            put_str(b, name);
        }
    });
}

/// Appends a stream frame.
pub fn encode_stream(out: &mut Vec<u8>, number: u64, sids: [&str; 3]) {
    frame(out, |b| {
        b.push(TYPE_STREAM);
        b.extend_from_slice(&number.to_le_bytes());
        for s in sids {
            put_str(b, s);
        }
    });
}

/// Appends a counters frame.
pub fn encode_counters(out: &mut Vec<u8>, c: &Counters) {
    frame(out, |b| {
        b.push(TYPE_COUNTERS);
        for v in [c.stream, c.received, c.accepted, c.delivered] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in c.playback {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let drops: Vec<_> = c.drops.iter().take(255).collect();
        b.push(drops.len() as u8);
        for (reason, n) in drops {
            b.push(*reason);
            b.extend_from_slice(&n.to_le_bytes());
        }
    });
}

/// Appends a record frame.
pub fn encode_record(out: &mut Vec<u8>, m: &RecordMeta, payload: &[u8]) {
    frame(out, |b| {
        b.reserve(RECORD_FIXED + payload.len());
        b.push(TYPE_RECORD);
        b.extend_from_slice(&m.stream.to_le_bytes());
        b.extend_from_slice(&m.seq.to_le_bytes());
        b.extend_from_slice(&m.timestamp_ms.to_le_bytes());
        b.extend_from_slice(&m.received_at_us.to_le_bytes());
        b.extend_from_slice(&m.chunk.to_le_bytes());
        b.extend_from_slice(&m.chunks.to_le_bytes());
        b.extend_from_slice(&[m.slot, m.kind, m.aux, m.flags]);
        b.extend_from_slice(payload);
    });
}

/// Bytes a record frame takes on disk.
pub fn record_frame_len(payload_len: usize) -> u64 {
    (FRAME_PREFIX + RECORD_FIXED + payload_len) as u64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A bounds-checked cursor over one body.
struct Body<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32_at(s, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64_at(s, 0))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at.min(self.b.len())..];
        self.at = self.b.len();
        s
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

fn parse_body(b: &[u8]) -> Option<Frame<'_>> {
    let mut c = Body { b, at: 0 };
    let frame = match c.u8()? {
        TYPE_TOPICS => {
            let n = c.u8()? as usize;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push((c.u8()?, c.str()?));
            }
            Frame::Topics(v)
        }
        TYPE_STREAM => Frame::Stream {
            number: c.u64()?,
            sids: [c.str()?, c.str()?, c.str()?],
        },
        TYPE_COUNTERS => {
            let mut k = Counters {
                stream: c.u64()?,
                received: c.u64()?,
                accepted: c.u64()?,
                delivered: c.u64()?,
                playback: [c.u64()?, c.u64()?, c.u64()?],
                drops: Vec::new(),
            };
            let n = c.u8()? as usize;
            for _ in 0..n {
                let reason = c.u8()?;
                if reason as usize >= DropReason::ALL.len() {
                    return None;
                }
                k.drops.push((reason, c.u64()?));
            }
            Frame::Counters(k)
        }
        TYPE_RECORD => {
            let meta = RecordMeta {
                stream: c.u64()?,
                seq: c.u64()?,
                timestamp_ms: c.u64()?,
                received_at_us: c.u64()?,
                chunk: c.u32()?,
                chunks: c.u16()?,
                slot: c.u8()?,
                kind: c.u8()?,
                aux: c.u8()?,
                flags: c.u8()?,
            };
            if meta.kind > 2 {
                return None;
            }
            return Some(Frame::Record {
                meta,
                payload: c.rest(),
            });
        }
        _ => return None,
    };
    c.done().then_some(frame)
}

/// Iterates the frames of a segment's bytes (after the header).
pub struct Frames<'a> {
    b: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Frames of `bytes`, starting at `offset` (normally [`HEADER_LEN`]).
    pub fn new(bytes: &'a [u8], offset: usize) -> Frames<'a> {
        Frames {
            b: bytes,
            at: offset,
            failed: false,
        }
    }

    /// Offset of the next frame.
    pub fn offset(&self) -> usize {
        self.at
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, Corrupt>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.b.len() {
            return None;
        }
        let rest = &self.b[self.at..];
        let fail = |s: &mut Self, c| {
            s.failed = true;
            Some(Err(c))
        };
        if rest.len() < FRAME_PREFIX {
            return fail(self, Corrupt::Truncated);
        }
        let len = u32_at(rest, 0) as usize;
        let crc = u32_at(rest, 4);
        if len > MAX_BODY {
            // A length no writer produces: the prefix itself is damaged.
            return fail(self, Corrupt::Checksum);
        }
        let Some(body) = rest.get(FRAME_PREFIX..FRAME_PREFIX + len) else {
            return fail(self, Corrupt::Truncated);
        };
        if crc32fast::hash(body) != crc {
            return fail(self, Corrupt::Checksum);
        }
        match parse_body(body) {
            Some(f) => {
                self.at += FRAME_PREFIX + len;
                Some(Ok(f))
            }
            None => fail(self, Corrupt::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut b = encode_header(Header {
            epoch: 7,
            segment: 3,
        })
        .to_vec();
        encode_topics(
            &mut b,
            [(0u8, "t.events"), (1, "t.audio.inbound")].into_iter(),
        );
        encode_stream(&mut b, 5, ["MZ1", "CA1", "AC1"]);
        encode_record(
            &mut b,
            &RecordMeta {
                stream: 5,
                seq: 10,
                timestamp_ms: 180,
                received_at_us: 99,
                chunk: 9,
                chunks: 1,
                slot: 1,
                kind: 0,
                aux: 0,
                flags: 0,
            },
            &[0xff; 160],
        );
        encode_counters(
            &mut b,
            &Counters {
                stream: 5,
                received: 10,
                accepted: 9,
                delivered: 8,
                playback: [1, 2, 3],
                drops: vec![(0, 1)],
            },
        );
        b
    }

    #[test]
    fn round_trip() {
        let b = sample();
        assert_eq!(
            decode_header(&b),
            Ok(Header {
                epoch: 7,
                segment: 3
            })
        );
        let frames: Vec<_> = Frames::new(&b, HEADER_LEN).collect();
        assert_eq!(frames.len(), 4);
        assert_eq!(
            frames[0],
            Ok(Frame::Topics(vec![(0, "t.events"), (1, "t.audio.inbound")]))
        );
        assert_eq!(
            frames[1],
            Ok(Frame::Stream {
                number: 5,
                sids: ["MZ1", "CA1", "AC1"]
            })
        );
        match &frames[2] {
            Ok(Frame::Record { meta, payload }) => {
                assert_eq!((meta.seq, meta.chunk, meta.slot), (10, 9, 1));
                assert_eq!(payload.len(), 160);
            }
            other => panic!("{other:?}"),
        }
        match &frames[3] {
            Ok(Frame::Counters(c)) => assert_eq!(c.playback, [1, 2, 3]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            record_frame_len(160) as usize,
            b.len() - HEADER_LEN - {
                let mut x = Vec::new();
                encode_topics(
                    &mut x,
                    [(0u8, "t.events"), (1, "t.audio.inbound")].into_iter(),
                );
                encode_stream(&mut x, 5, ["MZ1", "CA1", "AC1"]);
                encode_counters(
                    &mut x,
                    &Counters {
                        stream: 5,
                        received: 10,
                        accepted: 9,
                        delivered: 8,
                        playback: [1, 2, 3],
                        drops: vec![(0, 1)],
                    },
                );
                x.len()
            }
        );
    }

    #[test]
    fn each_damage_is_named() {
        let b = sample();
        // Truncated anywhere inside the last frame.
        let cut = &b[..b.len() - 3];
        let last = Frames::new(cut, HEADER_LEN).last();
        assert_eq!(last, Some(Err(Corrupt::Truncated)));
        // A flipped byte in a body.
        let mut flipped = b.clone();
        flipped[HEADER_LEN + 12] ^= 0x40;
        assert_eq!(
            Frames::new(&flipped, HEADER_LEN).next(),
            Some(Err(Corrupt::Checksum))
        );
        // Unknown version with a valid header checksum.
        let mut v = b.clone();
        v[8] = 9;
        let crc = crc32fast::hash(&v[..32]);
        v[32..36].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&v), Err(Corrupt::Version(9)));
        // Foreign bytes.
        assert_eq!(decode_header(b"hello world"), Err(Corrupt::Header));
        // A valid checksum around an unknown frame type.
        let mut m = encode_header(Header {
            epoch: 1,
            segment: 1,
        })
        .to_vec();
        frame(&mut m, |x| x.extend_from_slice(&[42, 1, 2]));
        assert_eq!(
            Frames::new(&m, HEADER_LEN).next(),
            Some(Err(Corrupt::Malformed))
        );
    }

    proptest! {
        /// Any bytes: decoding ends (clean or with one error) without panicking, and after an
        /// error nothing more is yielded.
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_header(&bytes);
            let mut errors = 0;
            let mut after_error = 0;
            for f in Frames::new(&bytes, 0) {
                if errors > 0 {
                    after_error += 1;
                }
                if f.is_err() {
                    errors += 1;
                }
            }
            prop_assert!(errors <= 1);
            prop_assert_eq!(after_error, 0);
        }

        /// A valid segment damaged at one byte, or cut anywhere, yields a prefix of its frames
        /// and then at most one error.
        #[test]
        fn damaged_segment_yields_a_prefix(at in 0usize..600, xor in 1u8..=255, cut in 0usize..700) {
            let good = sample();
            let all: Vec<_> = Frames::new(&good, HEADER_LEN).map(|f| f.unwrap()).collect();
            let mut bad = good.clone();
            let at = HEADER_LEN + at % (good.len() - HEADER_LEN);
            bad[at] ^= xor;
            let cut = cut.min(bad.len());
            let bad = &bad[..cut.max(HEADER_LEN)];
            let mut n = 0;
            for f in Frames::new(bad, HEADER_LEN) {
                match f {
                    Ok(f) => {
                        // A damaged frame can never pass as a valid one (crc32 catches a
                        // one-byte change).
                        prop_assert_eq!(&f, &all[n]);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            prop_assert!(n <= all.len());
        }
    }
}
