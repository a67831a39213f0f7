//! Sizing benchmark for decision 53: what it costs to encode the gateway's audio records,
//! the contract's twelve headers included, straight into Kafka's wire format (a v2
//! `RecordBatch`: varint-framed records, one CRC32C per batch) with no per-record allocation.
//!
//! This is not a producer. It has no network, no acknowledgements, no retries, no idempotence
//! bookkeeping; it exists to size the one lever issue 13 leaves outside librdkafka: how much of
//! the drain and broker threads' per-record cost (librdkafka allocates every header and the
//! message, then re-serialises them on its broker thread) is inherent to producing these
//! records, and how much is librdkafka's per-record object model. The end-to-end per-record
//! cost of the gateway's drain and broker threads is in `docs/benchmarks.md` (same session).
//!
//! Two working sets: 64 records (everything in L1/L2, the best case) and 30,000 records (one
//! second of 300 both-track calls, several MiB: every record's memory comes from outside the
//! core's caches, as it does in the gateway).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway::protocol::audio::ulaw_to_pcm16le_into;

/// One audio record as the drain thread sees it (the fields the headers are made of).
struct Rec {
    stream_sid: String,
    call_sid: String,
    account_sid: String,
    inbound: bool,
    seq: u64,
    chunk: u64,
    timestamp_ms: u64,
    received_at_us: u64,
    ulaw: Box<[u8]>,
}

fn sid(prefix: &str, n: usize) -> String {
    format!("{prefix}{n:032x}")
}

fn records(n: usize, ulaw: &[u8]) -> Vec<Rec> {
    let calls = 300;
    (0..n)
        .map(|i| {
            let call = i % calls;
            let tick = (i / calls) as u64;
            let off = (i * 160) % (ulaw.len() - 160);
            Rec {
                stream_sid: sid("MZ", call),
                call_sid: sid("CA", call),
                account_sid: sid("AC", 7),
                inbound: (i / calls) % 2 == 0,
                seq: tick + 2,
                chunk: tick + 1,
                timestamp_ms: tick * 20,
                received_at_us: 1_795_000_000_000_000 + tick * 20_000 + call as u64,
                ulaw: ulaw[off..off + 160].to_vec().into_boxed_slice(),
            }
        })
        .collect()
}

/// Kafka's zig-zag varint (records and their fields use signed varints).
#[inline]
fn varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[inline]
fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    varint(out, name.len() as i64);
    out.extend_from_slice(name.as_bytes());
    varint(out, value.len() as i64);
    out.extend_from_slice(value);
}

/// CRC32C (Castagnoli), with SSE4.2's instruction when the CPU has it.
fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the feature was detected at run time.
            return unsafe { crc32c_sse42(data) };
        }
    }
    crc32c_soft(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = !0u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(c.try_into().unwrap()));
    }
    let mut crc = crc as u32;
    for &b in chunks.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    !crc
}

fn crc32c_soft(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Scratch buffers reused across batches (as a producer's would be).
#[derive(Default)]
struct Encoder {
    batch: Vec<u8>,
    record: Vec<u8>,
    pcm: Vec<u8>,
}

impl Encoder {
    /// Encodes `recs` as one v2 RecordBatch into `self.batch`; returns its length.
    fn encode(&mut self, recs: &[Rec], gateway_id: &str) -> usize {
        let b = &mut self.batch;
        b.clear();
        let base_ts = (recs[0].received_at_us / 1000) as i64;
        let max_ts = (recs[recs.len() - 1].received_at_us / 1000) as i64;
        b.extend_from_slice(&0i64.to_be_bytes()); // baseOffset
        b.extend_from_slice(&0i32.to_be_bytes()); // batchLength, patched below
        b.extend_from_slice(&0i32.to_be_bytes()); // partitionLeaderEpoch
        b.push(2); // magic
        b.extend_from_slice(&0u32.to_be_bytes()); // crc, patched below
        let crc_from = b.len();
        b.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression
        b.extend_from_slice(&((recs.len() - 1) as i32).to_be_bytes()); // lastOffsetDelta
        b.extend_from_slice(&base_ts.to_be_bytes());
        b.extend_from_slice(&max_ts.to_be_bytes());
        b.extend_from_slice(&4242i64.to_be_bytes()); // producerId
        b.extend_from_slice(&0i16.to_be_bytes()); // producerEpoch
        b.extend_from_slice(&0i32.to_be_bytes()); // baseSequence
        b.extend_from_slice(&(recs.len() as i32).to_be_bytes());
        let mut n = itoa::Buffer::new();
        for (i, r) in recs.iter().enumerate() {
            let rec = &mut self.record;
            rec.clear();
            self.pcm.clear();
            ulaw_to_pcm16le_into(&r.ulaw, &mut self.pcm);
            rec.push(0); // attributes
            varint(rec, (r.received_at_us / 1000) as i64 - base_ts);
            varint(rec, i as i64);
            varint(rec, r.stream_sid.len() as i64);
            rec.extend_from_slice(r.stream_sid.as_bytes());
            varint(rec, self.pcm.len() as i64);
            rec.extend_from_slice(&self.pcm);
            varint(rec, 12);
            header(rec, "stream_sid", r.stream_sid.as_bytes());
            header(rec, "call_sid", r.call_sid.as_bytes());
            header(rec, "account_sid", r.account_sid.as_bytes());
            header(
                rec,
                "track",
                if r.inbound { b"inbound" } else { b"outbound" },
            );
            header(rec, "seq", n.format(r.seq).as_bytes());
            header(rec, "chunk", n.format(r.chunk).as_bytes());
            header(rec, "timestamp_ms", n.format(r.timestamp_ms).as_bytes());
            header(rec, "encoding", b"pcm_s16le");
            header(rec, "sample_rate", b"8000");
            header(rec, "channels", b"1");
            header(rec, "gateway", gateway_id.as_bytes());
            header(rec, "received_at_us", n.format(r.received_at_us).as_bytes());
            varint(b, rec.len() as i64);
            b.extend_from_slice(rec);
        }
        let batch_len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&batch_len.to_be_bytes());
        let crc = crc32c(&b[crc_from..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b.len()
    }
}

/// Reads one zig-zag varint at `*at`.
fn read_varint(b: &[u8], at: &mut usize) -> i64 {
    let (mut z, mut shift) = (0u64, 0);
    loop {
        let byte = b[*at];
        *at += 1;
        z |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return ((z >> 1) as i64) ^ -((z & 1) as i64);
        }
        shift += 7;
    }
}

/// Walks an encoded batch back and checks it against its records, so the figure is the cost
/// of a correct encoding: length, CRC, count, and every record's key, PCM and headers.
fn check(batch: &[u8], recs: &[Rec]) {
    let len = i32::from_be_bytes(batch[8..12].try_into().unwrap()) as usize;
    assert_eq!(len + 12, batch.len());
    assert_eq!(batch[16], 2);
    let crc = u32::from_be_bytes(batch[17..21].try_into().unwrap());
    assert_eq!(crc, crc32c(&batch[21..]));
    assert_eq!(
        i32::from_be_bytes(batch[57..61].try_into().unwrap()) as usize,
        recs.len()
    );
    let mut at = 61;
    let mut pcm = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let rec_len = read_varint(batch, &mut at) as usize;
        let end = at + rec_len;
        at += 1; // attributes
        let _ts_delta = read_varint(batch, &mut at);
        assert_eq!(read_varint(batch, &mut at), i as i64);
        let k = read_varint(batch, &mut at) as usize;
        assert_eq!(&batch[at..at + k], r.stream_sid.as_bytes());
        at += k;
        let v = read_varint(batch, &mut at) as usize;
        pcm.clear();
        ulaw_to_pcm16le_into(&r.ulaw, &mut pcm);
        assert_eq!(&batch[at..at + v], &pcm[..]);
        at += v;
        assert_eq!(read_varint(batch, &mut at), 12);
        let mut names = Vec::new();
        for _ in 0..12 {
            let n = read_varint(batch, &mut at) as usize;
            names.push(std::str::from_utf8(&batch[at..at + n]).unwrap().to_owned());
            at += n;
            let v = read_varint(batch, &mut at) as usize;
            if names.last().unwrap() == "seq" {
                assert_eq!(&batch[at..at + v], r.seq.to_string().as_bytes());
            }
            at += v;
        }
        assert_eq!(names[0], "stream_sid");
        assert_eq!(names[11], "received_at_us");
        assert_eq!(at, end);
    }
    assert_eq!(at, batch.len());
}

fn record_batch(c: &mut Criterion) {
    // The CRC is Kafka's (CRC32C): RFC 3720's check value for "123456789".
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(crc32c_soft(b"123456789"), 0xe306_9283);
    let ulaw = bench::speech();
    let gateway_id = "gateway-bench-12345";
    // A linger window's worth per partition at 300 both-track calls and one partition per
    // topic: 15,000 records/s per topic × 20 ms = 300 records.
    let per_batch = 300;
    let mut g = c.benchmark_group("record_batch_encode");
    for (name, n) in [("hot_64_records", 64usize), ("cold_30000_records", 30_000)] {
        let recs = records(n, &ulaw);
        let mut enc = Encoder::default();
        for batch in recs.chunks(per_batch) {
            let n = enc.encode(batch, gateway_id);
            check(&enc.batch[..n], batch);
        }
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for batch in recs.chunks(per_batch) {
                    bytes += enc.encode(batch, gateway_id);
                }
                black_box(bytes)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, record_batch);
criterion_main!(benches);
