//! Per-message costs of the hot path on real Twilio `media` messages:
//! JSON parse (simd-json tape as used by the gateway vs serde_json and simd-json serde),
//! base64 (base64-simd vs base64), μ-law → PCM, and the two halves of the Kafka path:
//! - the connection side (parse + session + admission + hand-off to the drain thread), which
//!   is all a connection task does per message;
//! - the drain side (headers + PCM expansion + `rd_kafka_produceva` into librdkafka's queue),
//!   which one thread does for every record, compared with rust-rdkafka's `BaseProducer::send`.

use std::hint::black_box;
use std::time::Duration;

use bench::{media_messages, start_message};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway::events::{Event, StreamIds};
use gateway::metrics::DropReason;
use gateway::metrics::Metrics;
use gateway::protocol::audio::{decode_base64_into, ulaw_to_pcm16le_into};
use gateway::protocol::parse;
use gateway::session::{AudioRecord, Publisher, Received, Session, SessionConfig};
use gateway::sink::delivery::DeliveryContext;
use gateway::sink::drain::audio_headers_for_bench;
use gateway::sink::producer::Producer as GwProducer;
use gateway::sink::{Sink, SinkConfig};
use rdkafka::message::{Header, OwnedHeaders};
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

/// The contract's headers as rust-rdkafka `OwnedHeaders` (what the gateway built per record on
/// every connection task before the drain thread existed).
fn owned_headers(ids: &StreamIds) -> OwnedHeaders {
    let mut n = itoa::Buffer::new();
    let mut h = OwnedHeaders::new_with_capacity(13);
    for (k, v) in [
        ("stream_sid", ids.stream_sid.as_bytes()),
        ("call_sid", ids.call_sid.as_bytes()),
        ("account_sid", ids.account_sid.as_bytes()),
        ("track", b"inbound".as_slice()),
    ] {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    for (k, v) in [
        ("seq", 12345u64),
        ("chunk", 6170),
        ("timestamp_ms", 123_400),
    ] {
        h = h.insert(Header {
            key: k,
            value: Some(n.format(v).as_bytes()),
        });
    }
    for (k, v) in [
        ("encoding", b"pcm_s16le".as_slice()),
        ("sample_rate", b"8000"),
        ("channels", b"1"),
        ("gateway", b"gw-1"),
        ("received_at_us", b"1764000000000000"),
    ] {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    h
}

fn unreachable_producer_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", "127.0.0.1:1")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097151")
        .set("enable.idempotence", "true")
        .set("log_level", "0");
    c
}

fn record_benches(c: &mut Criterion) {
    let ids = ids();
    let ulaw = bench::speech()[1600..1760].to_vec();
    let mut g = c.benchmark_group("kafka_enqueue");
    g.throughput(Throughput::Elements(1000));
    // librdkafka enqueue (copy into its queue) with no reachable broker; purged between batches.
    let producer: BaseProducer = unreachable_producer_config().create().unwrap();
    let mut pcm = Vec::with_capacity(320);
    g.bench_function("rust_rdkafka_send_with_owned_headers", |b| {
        b.iter_batched(
            || producer.purge(rdkafka::producer::PurgeConfig::default().queue()),
            |_| {
                for _ in 0..1000 {
                    pcm.clear();
                    ulaw_to_pcm16le_into(&ulaw, &mut pcm);
                    let r = BaseRecord::<[u8], [u8]>::to("twilio.audio.inbound")
                        .key(SID.as_bytes())
                        .payload(&pcm[..])
                        .headers(owned_headers(&ids));
                    let _ = black_box(producer.send(r));
                }
            },
            BatchSize::PerIteration,
        )
    });
    producer.purge(rdkafka::producer::PurgeConfig::default().queue());
    // The drain thread's way: topic handle, produceva, headers straight into librdkafka's list.
    let metrics = Metrics::new("bench");
    let gw = GwProducer::new(
        &unreachable_producer_config(),
        DeliveryContext::new(metrics, Default::default()),
        &["twilio.audio.inbound".to_owned()],
        gateway::sink::partitioning::Partitioning::Instance {
            seed: 0,
            per_instance: 1,
        },
    )
    .unwrap();
    let sink_cfg = SinkConfig::new("127.0.0.1:1", "twilio");
    let topics = sink_cfg.topics();
    let rec = gateway::sink::record::SpoolRecord {
        stream: Some(std::sync::Arc::new(
            gateway::sink::stream::StreamEntry::new(ids.clone(), 1, 3),
        )),
        payload: ulaw.clone().into(),
        seq: 12345,
        timestamp_ms: 123_400,
        received_at_us: 1_764_000_000_000_000,
        chunk: 6170,
        chunks: 1,
        slot: gateway::sink::INBOUND_SLOT,
        kind: gateway::sink::record::Kind::Audio,
        aux: 0,
        flags: 0,
    };
    g.bench_function("drain_produceva_with_topic_handle", |b| {
        b.iter_batched(
            || gw.purge(),
            |_| {
                for i in 0..1000 {
                    pcm.clear();
                    ulaw_to_pcm16le_into(&rec.payload, &mut pcm);
                    let h = audio_headers_for_bench(&rec, &topics, "gw-1");
                    let _ = black_box(gw.produce(
                        0,
                        Some(SID.as_bytes()),
                        &pcm,
                        Some(h),
                        i + 1,
                        1_764_000_000_000,
                    ));
                }
            },
            BatchSize::PerIteration,
        )
    });
    gw.purge();
    g.finish();
}

/// The record-building work a connection did before the drain thread existed: μ-law → PCM and
/// rust-rdkafka header objects, per record (for comparison).
struct BuildOnly {
    pcm: Vec<u8>,
}
impl Publisher for BuildOnly {
    fn publish_audio(&mut self, r: &AudioRecord<'_>) -> Result<(), DropReason> {
        self.pcm.clear();
        ulaw_to_pcm16le_into(r.payload, &mut self.pcm);
        let rec = BaseRecord::<[u8], [u8]>::to("twilio.audio.inbound")
            .key(r.ids.stream_sid.as_bytes())
            .payload(&self.pcm[..])
            .headers(owned_headers(r.ids));
        black_box(rec);
        Ok(())
    }
    fn publish_event(&mut self, e: &Event<'_>) {
        black_box(e);
    }
}

/// Parse + session only.
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
    let setup = |out: &mut dyn FnMut(&mut Session, &gateway::protocol::Message<'_>)| {
        let mut s = Session::new(SessionConfig::default());
        let mut start = start_message(SID);
        let parsed = parse(&mut start).unwrap();
        out(&mut s, &parsed.message);
        (s, msgs.clone())
    };
    let start_no_kafka = |s: &mut Session, m: &gateway::protocol::Message<'_>| {
        s.handle(m, Received::default(), &mut NoKafka).unwrap();
    };
    g.bench_function("parse_decode_session_no_kafka", |b| {
        b.iter_batched(
            || setup(&mut { start_no_kafka }),
            |state| feed_all(state, &mut NoKafka),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("parse_decode_session_build_rdkafka_record_old_path", |b| {
        b.iter_batched(
            || setup(&mut { start_no_kafka }),
            |state| {
                feed_all(
                    state,
                    &mut BuildOnly {
                        pcm: Vec::with_capacity(320),
                    },
                )
            },
            BatchSize::SmallInput,
        )
    });
    // The real connection publisher: budget admission, compact record, hand-off to a running
    // drain thread (its broker unreachable, a budget large enough never to refuse here).
    let mut cfg = SinkConfig::new("127.0.0.1:1", "twilio");
    cfg.max_inflight_bytes = 8 << 30;
    let sink = Sink::start(&cfg, Metrics::new("bench")).unwrap();
    g.bench_function("parse_decode_session_handoff_to_drain", |b| {
        b.iter_batched(
            || {
                let mut p = sink.publisher();
                let mut s = Session::new(SessionConfig::default());
                let mut start = start_message(SID);
                let parsed = parse(&mut start).unwrap();
                s.handle(&parsed.message, Received::default(), &mut p)
                    .unwrap();
                ((s, msgs.clone()), p)
            },
            |(state, mut p)| (feed_all(state, &mut p), p),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    let _ = sink.finish(Duration::from_millis(100));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = parse_benches, audio_benches, record_benches, whole_path
}
criterion_main!(benches);
