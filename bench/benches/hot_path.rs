//! Per-message costs of the hot path on real Twilio `media` messages:
//! JSON parse (simd-json tape as used by the gateway vs serde_json and simd-json serde),
//! base64 (base64-simd vs base64), μ-law → PCM, Kafka record building (librdkafka headers),
//! a librdkafka enqueue, and the whole path (parse + session + record build) per message.

use std::hint::black_box;
use std::time::Duration;

use bench::{media_messages, start_message};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway::events::{Event, StreamIds};
use gateway::metrics::DropReason;
use gateway::protocol::audio::{decode_base64_into, ulaw_to_pcm16le_into};
use gateway::protocol::{parse, Track};
use gateway::session::{AudioEncoding, AudioRecord, Publisher, Received, Session, SessionConfig};
use gateway::sink::publisher::audio_headers;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde::Deserialize;

const SID: &str = "MZ0123456789abcdef0123456789abcdef";

#[derive(Deserialize)]
#[allow(dead_code)]
struct SMedia<'a> {
    track: &'a str,
    chunk: &'a str,
    timestamp: &'a str,
    payload: &'a str,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct SMsg<'a> {
    event: &'a str,
    #[serde(rename = "sequenceNumber")]
    sequence_number: Option<&'a str>,
    #[serde(rename = "streamSid")]
    stream_sid: Option<&'a str>,
    #[serde(borrow)]
    media: Option<SMedia<'a>>,
}

fn parse_benches(c: &mut Criterion) {
    let msgs = media_messages(SID);
    let msg = msgs[10].clone();
    let mut g = c.benchmark_group("parse_media_message");
    g.throughput(Throughput::Elements(1));
    let mut buf = msg.clone();
    g.bench_function("gateway_simd_json_tape", |b| {
        b.iter(|| {
            buf.copy_from_slice(&msg);
            black_box(parse(black_box(&mut buf)).is_ok())
        })
    });
    g.bench_function("serde_json_borrowed_struct", |b| {
        b.iter(|| {
            buf.copy_from_slice(&msg);
            let m: SMsg<'_> = serde_json::from_slice(black_box(&buf)).unwrap();
            black_box(m.media.map(|m| m.payload.len()))
        })
    });
    g.bench_function("simd_json_serde_borrowed_struct", |b| {
        b.iter(|| {
            buf.copy_from_slice(&msg);
            let m: SMsg<'_> = simd_json::serde::from_slice(black_box(&mut buf)).unwrap();
            black_box(m.media.map(|m| m.payload.len()))
        })
    });
    g.bench_function("serde_json_value", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&msg)).unwrap();
            black_box(v["media"]["payload"].as_str().map(str::len))
        })
    });
    g.finish();
}

fn audio_benches(c: &mut Criterion) {
    let audio = bench::speech();
    let chunk = &audio[1600..1760];
    let b64 = base64_simd::STANDARD.encode_to_string(chunk);
    let mut g = c.benchmark_group("decode_160_byte_chunk");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(512);
    g.bench_function("base64_simd_into_reused_buffer", |b| {
        b.iter(|| {
            out.clear();
            black_box(decode_base64_into(black_box(b64.as_bytes()), &mut out, 65536).unwrap())
        })
    });
    g.bench_function("base64_crate_into_reused_buffer", |b| {
        use base64::Engine;
        b.iter(|| {
            out.clear();
            base64::engine::general_purpose::STANDARD
                .decode_vec(black_box(b64.as_bytes()), &mut out)
                .unwrap();
            black_box(out.len())
        })
    });
    let mut pcm = Vec::with_capacity(512);
    g.bench_function("mulaw_to_pcm16le_table", |b| {
        b.iter(|| {
            pcm.clear();
            ulaw_to_pcm16le_into(black_box(chunk), &mut pcm);
            black_box(pcm.len())
        })
    });
    g.finish();
}

fn ids() -> StreamIds {
    StreamIds {
        stream_sid: SID.into(),
        call_sid: "CA0123456789abcdef0123456789abcdef".into(),
        account_sid: "AC0123456789abcdef0123456789abcdef".into(),
    }
}

fn record_benches(c: &mut Criterion) {
    let ids = ids();
    let payload = vec![0u8; 320];
    let rec = AudioRecord {
        ids: &ids,
        track: Track::Inbound,
        seq: 12345,
        chunk: 6170,
        timestamp_ms: 123_400,
        received_at_us: 1_764_000_000_000_000,
        received_mono_us: 1,
        chunks: 1,
        encoding: AudioEncoding::PcmS16le,
        payload: &payload,
    };
    let mut g = c.benchmark_group("kafka_record");
    g.throughput(Throughput::Elements(1));
    g.bench_function("build_headers_and_record", |b| {
        b.iter(|| {
            let h = audio_headers(black_box(&rec), "gw-1", false);
            let r = BaseRecord::<[u8], [u8]>::to("twilio.audio.inbound")
                .key(SID.as_bytes())
                .payload(&payload[..])
                .headers(h);
            black_box(r);
        })
    });
    g.finish();
    let mut g = c.benchmark_group("kafka_enqueue");
    g.throughput(Throughput::Elements(1000));
    // librdkafka enqueue (copy into its queue) with no reachable broker; purged between batches.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .set("enable.idempotence", "true")
        .set("log_level", "0")
        .create()
        .unwrap();
    g.bench_function("librdkafka_enqueue_with_headers", |b| {
        b.iter_batched(
            || producer.purge(rdkafka::producer::PurgeConfig::default().queue()),
            |_| {
                for _ in 0..1000 {
                    let h = audio_headers(&rec, "gw-1", false);
                    let r = BaseRecord::<[u8], [u8]>::to("twilio.audio.inbound")
                        .key(SID.as_bytes())
                        .payload(&payload[..])
                        .headers(h);
                    let _ = black_box(producer.send(r));
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    producer.purge(rdkafka::producer::PurgeConfig::default().queue());
}

/// Does the record-building work of the real publisher, without a broker.
struct BuildOnly;
impl Publisher for BuildOnly {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        let h = audio_headers(r, "gw-1", false);
        let rec = BaseRecord::<[u8], [u8]>::to("twilio.audio.inbound")
            .key(r.ids.stream_sid.as_bytes())
            .payload(r.payload)
            .headers(h);
        black_box(rec);
        Ok(())
    }
    fn publish_event(&mut self, e: &Event<'_>) {
        black_box(e);
    }
}

/// Same path minus librdkafka's header objects (what the Rust side alone costs).
struct NoKafka;
impl Publisher for NoKafka {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        black_box(r.payload.len());
        Ok(())
    }
    fn publish_event(&mut self, e: &Event<'_>) {
        black_box(e);
    }
}

/// The timed part: parse each message in place and hand it to the session.
fn feed_all<P: Publisher>(
    (mut s, mut bufs): (Session, Vec<Vec<u8>>),
    out: &mut P,
) -> (Session, Vec<Vec<u8>>) {
    let at = Received {
        unix_us: 1,
        mono_us: 1,
    };
    for m in bufs.iter_mut() {
        let parsed = parse(m).unwrap();
        s.handle(&parsed.message, at, out).unwrap();
    }
    (s, bufs)
}

fn whole_path(c: &mut Criterion) {
    let msgs = media_messages(SID);
    let mut g = c.benchmark_group("whole_hot_path_per_media_message");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    // Setup (excluded from timing): a started session and fresh copies of the messages, since
    // parsing is in place.
    let setup = || {
        let mut s = Session::new(SessionConfig::default());
        let mut start = start_message(SID);
        let parsed = parse(&mut start).unwrap();
        s.handle(&parsed.message, Received::default(), &mut NoKafka)
            .unwrap();
        (s, msgs.clone())
    };
    g.bench_function("parse_decode_session_build_record", |b| {
        b.iter_batched(
            setup,
            |state| feed_all(state, &mut BuildOnly),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("parse_decode_session_no_kafka_objects", |b| {
        b.iter_batched(
            setup,
            |state| feed_all(state, &mut NoKafka),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = parse_benches, audio_benches, record_benches, whole_path
}
criterion_main!(benches);
