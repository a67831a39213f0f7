//! Bidirectional streams end to end, against the real gateway binary and broker: playback
//! records written to the partition a stream's `start` event names reach exactly that call's
//! socket as Twilio `media`/`mark`/`clear` messages, and `stop` ends it.
//!
//! The test client plays Twilio's part: it streams inbound audio, collects what the gateway
//! sends, and echoes marks the way Twilio does (when asked to, or at once on `clear`).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketRead, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use support::*;
use tokio::io::{ReadHalf, WriteHalf};

const ACCOUNT: &str = "AC00000000000000000000000000000010";

/// What the gateway sent to the simulated Twilio.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Down {
    Media(Vec<u8>),
    Mark(String),
    Clear,
}

type Io = TokioIo<Upgraded>;

/// One simulated Twilio call.
struct Call {
    sid: String,
    call: String,
    seq: u64,
    chunk: u64,
    writer: Arc<tokio::sync::Mutex<WebSocketWrite<WriteHalf<Io>>>>,
    down: Arc<Mutex<Vec<(Instant, Down)>>>,
    close: Arc<Mutex<Option<u16>>>,
    reader: tokio::task::JoinHandle<()>,
}

async fn read_loop(
    mut rd: WebSocketRead<ReadHalf<Io>>,
    down: Arc<Mutex<Vec<(Instant, Down)>>>,
    close: Arc<Mutex<Option<u16>>>,
) {
    loop {
        let frame = rd
            .read_frame(&mut |_: Frame<'_>| async { Ok::<_, fastwebsockets::WebSocketError>(()) })
            .await;
        let Ok(f) = frame else { return };
        let at = Instant::now();
        match f.opcode {
            OpCode::Close => {
                let p = &f.payload[..];
                *close.lock().unwrap() = Some(if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                });
                return;
            }
            OpCode::Text => {
                let v: serde_json::Value =
                    serde_json::from_slice(&f.payload).expect("JSON from gateway");
                let item = match v["event"].as_str() {
                    Some("media") => {
                        let b64 = v["media"]["payload"].as_str().unwrap();
                        Down::Media(base64_simd::STANDARD.decode_to_vec(b64).unwrap())
                    }
                    Some("mark") => Down::Mark(v["mark"]["name"].as_str().unwrap().to_owned()),
                    Some("clear") => Down::Clear,
                    other => panic!("unexpected message {other:?}: {v}"),
                };
                down.lock().unwrap().push((at, item));
            }
            _ => {}
        }
    }
}

impl Call {
    async fn open(port: u16, n: u64) -> Call {
        // A <Connect> stream: Twilio sends the inbound track only.
        Call::open_with_tracks(port, n, &["inbound"]).await
    }

    async fn open_with_tracks(port: u16, n: u64, tracks: &[&str]) -> Call {
        let c = connect_path(port, "/stream").await.expect("connect");
        let (rd, wr) = c.ws.split(tokio::io::split);
        let down = Arc::new(Mutex::new(Vec::new()));
        let close = Arc::new(Mutex::new(None));
        let reader = tokio::spawn(read_loop(rd, down.clone(), close.clone()));
        let mut call = Call {
            sid: sid("MZ", n),
            call: sid("CA", n),
            seq: 1,
            chunk: 0,
            writer: Arc::new(tokio::sync::Mutex::new(wr)),
            down,
            close,
            reader,
        };
        call.send(&start(&call.sid, &call.call, ACCOUNT, tracks, &[]))
            .await;
        call
    }

    async fn send(&mut self, text: &str) -> bool {
        self.writer
            .lock()
            .await
            .write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec())))
            .await
            .is_ok()
    }

    /// Sends `n` inbound chunks (20 ms each) without pacing.
    async fn media(&mut self, audio: &[u8], n: u64) {
        for _ in 0..n {
            let off = (self.chunk as usize * 160) % (audio.len() - 160);
            self.seq += 1;
            let msg = media(
                &self.sid,
                self.seq,
                "inbound",
                self.chunk + 1,
                self.chunk * 20,
                &audio[off..off + 160],
            );
            self.chunk += 1;
            self.send(&msg).await;
        }
    }

    /// Echoes mark `name` as Twilio does.
    async fn echo(&mut self, name: &str) {
        self.seq += 1;
        let msg = mark(&self.sid, self.seq, name);
        self.send(&msg).await;
    }

    async fn stop(&mut self) {
        self.seq += 1;
        let msg = stop(&self.sid, self.seq, ACCOUNT, &self.call);
        self.send(&msg).await;
        let _ = self
            .writer
            .lock()
            .await
            .write_frame(Frame::close(1000, b""))
            .await;
    }

    fn down(&self) -> Vec<Down> {
        self.down
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.1.clone())
            .collect()
    }

    /// Waits until `pred` holds for what arrived.
    async fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&[Down]) -> bool) {
        let t0 = Instant::now();
        while !pred(&self.down()) {
            assert!(
                t0.elapsed() < timeout,
                "{}: waited for {what}; got {:?}",
                self.sid,
                summary(&self.down())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_close(&self, timeout: Duration) -> Option<u16> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(c) = *self.close.lock().unwrap() {
                return Some(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A readable digest of what arrived.
fn summary(d: &[Down]) -> Vec<String> {
    d.iter()
        .map(|x| match x {
            Down::Media(b) => format!("media{}", b.len()),
            Down::Mark(n) => format!("mark:{n}"),
            Down::Clear => "clear".into(),
        })
        .collect()
}

fn media_bytes(d: &[Down]) -> Vec<u8> {
    d.iter()
        .filter_map(|x| match x {
            Down::Media(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn producer() -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "0")
        .create()
        .expect("producer")
}

/// One playback record.
enum Play<'a> {
    Pcm(&'a [u8]),
    Ulaw(&'a [u8]),
    Mark(&'a str),
    Clear,
    Stop,
    Raw(&'a [(&'a str, &'a str)], &'a [u8]),
}

fn play(p: &BaseProducer, topic: &str, partition: i32, key: &str, what: Play<'_>) {
    let h = |pairs: &[(&str, &str)]| {
        pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        })
    };
    let (headers, value): (OwnedHeaders, &[u8]) = match what {
        Play::Pcm(b) => (h(&[("type", "media")]), b),
        Play::Ulaw(b) => (h(&[("type", "media"), ("encoding", "mulaw")]), b),
        Play::Mark(n) => (h(&[("type", "mark"), ("name", n)]), b""),
        Play::Clear => (h(&[("type", "clear")]), b""),
        Play::Stop => (h(&[("type", "stop")]), b""),
        Play::Raw(pairs, v) => (h(pairs), v),
    };
    let r = BaseRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(value)
        .headers(headers);
    p.send(r).map_err(|e| e.0).expect("enqueue playback");
    p.flush(Duration::from_secs(10)).expect("flush playback");
}

/// Enqueues one second (8,000 bytes) of μ-law playback for `key` (no flush).
fn play_second(p: &BaseProducer, topic: &str, partition: i32, key: &str) {
    let second = [0x55u8; 8000];
    let r = BaseRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(&second[..])
        .headers(OwnedHeaders::new().insert(Header {
            key: "encoding",
            value: Some(&b"mulaw"[..]),
        }));
    p.send(r).map_err(|e| e.0).unwrap();
    p.poll(Duration::ZERO);
}

/// The playback route a stream's `start` event names.
fn route_of(prefix: &str, brokers: &str, stream: &str) -> (String, i32) {
    let events = vec![format!("{prefix}.events")];
    let stream = stream.to_owned();
    let recs = consume_until(brokers, &events, Duration::from_secs(20), |r| {
        r.iter()
            .any(|x| x.key.as_deref() == Some(stream.as_str()) && x.json()["type"] == "start")
    });
    let start = recs
        .iter()
        .find(|x| x.key.as_deref() == Some(stream.as_str()) && x.json()["type"] == "start")
        .expect("start event")
        .json();
    let pb = &start["playback"];
    (
        pb["topic"].as_str().expect("playback.topic").to_owned(),
        pb["partition"].as_i64().expect("playback.partition") as i32,
    )
}

fn events_of(
    prefix: &str,
    brokers: &str,
    stream: &str,
    until: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let events = vec![format!("{prefix}.events")];
    let s = stream.to_owned();
    let pick = move |r: &[Record]| -> Vec<serde_json::Value> {
        r.iter()
            .filter(|x| x.key.as_deref() == Some(s.as_str()))
            .map(|x| x.json())
            .collect()
    };
    let recs = consume_until(brokers, &events, Duration::from_secs(30), |r| {
        until(&pick(r))
    });
    pick(&recs)
}

/// The playback route `stream`'s `start` event names (read off the blocking runtime).
async fn route(gw: &Gateway, stream: &str) -> (String, i32) {
    let (p, b, s) = (gw.prefix.clone(), gw.brokers.clone(), stream.to_owned());
    tokio::task::spawn_blocking(move || route_of(&p, &b, &s))
        .await
        .unwrap()
}

/// `stream`'s events, read until one of type `until` is among them.
async fn events_until(gw: &Gateway, stream: &str, until: &'static str) -> Vec<serde_json::Value> {
    let (p, b, s) = (gw.prefix.clone(), gw.brokers.clone(), stream.to_owned());
    tokio::task::spawn_blocking(move || {
        events_of(&p, &b, &s, |e| e.iter().any(|x| x["type"] == until))
    })
    .await
    .unwrap()
}

/// Waits (at most `within`) until the sum of `series` reaches `want`; returns the sum then.
async fn metric_reaches(gw: &Gateway, series: &[&str], want: f64, within: Duration) -> f64 {
    let t0 = Instant::now();
    loop {
        let n: f64 = series.iter().map(|s| gw.metric(s)).sum();
        if n >= want {
            return n;
        }
        assert!(t0.elapsed() < within, "{series:?} = {n}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pcm_of(ulaw: &[u8]) -> Vec<u8> {
    ulaw_to_pcm(ulaw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_reaches_the_call_in_order_with_marks_and_the_played_audio_is_recorded() {
    playback_in_order(Gateway::start("play", &[])).await;
}

/// The same with read coalescing on one paced worker (decision 38): the downlink waits for a
/// sleeping worker at most `--io-pace`, and nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_in_order_with_one_paced_worker() {
    playback_in_order(Gateway::start(
        "playpace",
        &[
            "--ingest-threads",
            "0",
            "--worker-threads",
            "1",
            "--io-pace",
            "1ms",
        ],
    ))
    .await;
}

/// The playback consumer's thread wakes connection tasks on the ingest threads' runtimes
/// (decision 39): the same order and content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_in_order_on_paced_ingest_threads() {
    let gw = Gateway::start("playingest", &["--ingest-threads", "2", "--io-pace", "1ms"]);
    assert_eq!(gw.metric("gateway_runtime_ingest_threads"), 2.0);
    assert_eq!(gw.metric("gateway_runtime_io_pace_microseconds"), 1000.0);
    playback_in_order(gw).await;
}

async fn playback_in_order(gw: Gateway) {
    let audio = speech();
    let mut c = Call::open(gw.port, 1).await;
    c.media(&audio, 10).await;
    let (topic, partition) = route(&gw, &c.sid).await;
    assert_eq!(topic, format!("{}.playback", gw.prefix));
    // 1 s of PCM (the speech fixture decoded), a mark, 0.5 s of μ-law (an odd length), a mark.
    let ulaw_a = audio[8000..16000].to_vec();
    let pcm_a = pcm_of(&ulaw_a);
    let ulaw_b = audio[20000..24003].to_vec();
    let p = producer();
    play(&p, &topic, partition, &c.sid, Play::Pcm(&pcm_a));
    play(&p, &topic, partition, &c.sid, Play::Mark("after-a"));
    play(&p, &topic, partition, &c.sid, Play::Ulaw(&ulaw_b));
    play(&p, &topic, partition, &c.sid, Play::Mark("after-b"));
    c.wait("both marks", Duration::from_secs(10), |d| {
        d.contains(&Down::Mark("after-b".into()))
    })
    .await;
    let d = c.down();
    // Frames: 160 bytes each, a record's last partial frame as is; marks exactly after their
    // audio; PCM through an independent G.711 encoder, μ-law byte for byte.
    let sizes: Vec<usize> = d
        .iter()
        .filter_map(|x| match x {
            Down::Media(b) => Some(b.len()),
            _ => None,
        })
        .collect();
    assert_eq!(sizes.len(), 50 + 26, "{:?}", summary(&d));
    assert!(sizes[..50].iter().all(|s| *s == 160));
    assert!(sizes[50..75].iter().all(|s| *s == 160));
    assert_eq!(sizes[75], 4003 - 25 * 160);
    let mark_a = d
        .iter()
        .position(|x| *x == Down::Mark("after-a".into()))
        .unwrap();
    assert_eq!(mark_a, 50, "mark after exactly the first record's audio");
    assert_eq!(d.last(), Some(&Down::Mark("after-b".into())));
    let got = media_bytes(&d);
    assert_eq!(
        &got[..8000],
        &pcm_to_ulaw(&pcm_a)[..],
        "PCM encoded as G.711 μ-law"
    );
    assert_eq!(&got[8000..], &ulaw_b[..], "μ-law passthrough, bit-exact");
    // Twilio echoes both marks: `mark` events with played=true.
    c.echo("after-a").await;
    c.echo("after-b").await;
    c.media(&audio, 5).await;
    c.stop().await;
    assert!(c.wait_close(Duration::from_secs(5)).await.is_some());
    let evs = events_until(&gw, &c.sid, "stop").await;
    let marks: Vec<(String, bool, bool)> = evs
        .iter()
        .filter(|e| e["type"] == "mark")
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["played"].as_bool().unwrap(),
                e["sent"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        marks,
        [
            ("after-a".into(), true, true),
            ("after-b".into(), true, true)
        ]
    );
    // Everything queued was sent: the gauge says so (read from the bound at the scrape, not
    // left at the last push).
    assert_eq!(gw.metric("gateway_playback_queued_bytes"), 0.0);
    let stop = evs.iter().find(|e| e["type"] == "stop").unwrap();
    let pb = &stop["playback"];
    assert_eq!(pb["records"], 4, "{stop}");
    assert_eq!(pb["media_bytes_sent"], 8000 + 4003);
    assert_eq!(pb["marks_sent"], 2);
    assert_eq!(pb["frames_recorded"], 76);
    // The played audio is on the outbound topic, `source: playback`, one record per playback
    // record (its frames are written together), contiguous on the stream's timeline, equal
    // to what was sent.
    let outbound = vec![format!("{}.audio.outbound", gw.prefix)];
    let b = gw.brokers.clone();
    let sid = c.sid.clone();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&b, &outbound, Duration::from_secs(20), |r| {
            r.iter()
                .filter(|x| x.key.as_deref() == Some(sid.as_str()))
                .count()
                >= 2
        })
    })
    .await
    .unwrap();
    let mine: Vec<&Record> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some(c.sid.as_str()))
        .collect();
    assert_eq!(mine.len(), 2, "one recorded record per played record");
    assert_eq!(mine[0].h("chunks"), "50");
    assert_eq!(mine[0].h("chunk"), "1");
    assert_eq!(mine[1].h("chunks"), "26");
    assert_eq!(mine[1].h("chunk"), "51");
    let mut pcm = Vec::new();
    let mut next_ts: Option<u64> = None;
    for r in &mine {
        assert_eq!(r.h("source"), "playback");
        assert_eq!(r.h("track"), "outbound");
        let ts: u64 = r.h("timestamp_ms").parse().unwrap();
        if let Some(n) = next_ts {
            assert_eq!(ts, n, "played frames are contiguous on the timeline");
        }
        next_ts = Some(ts + (r.value.len() / 2 / 8) as u64);
        pcm.extend_from_slice(&r.value);
    }
    assert_eq!(pcm.len(), got.len() * 2);
    assert_eq!(pcm, ulaw_to_pcm(&got), "the recording is what was played");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_discards_pending_audio_and_returns_pending_marks_unplayed() {
    let gw = Gateway::start("clear", &[]);
    let audio = speech();
    let mut c = Call::open(gw.port, 2).await;
    c.media(&audio, 5).await;
    let (topic, partition) = route(&gw, &c.sid).await;
    let p = producer();
    // m1 after 2 s of audio; Twilio (this client) does not echo it yet: it is "playing".
    play(&p, &topic, partition, &c.sid, Play::Ulaw(&audio[..16000]));
    play(&p, &topic, partition, &c.sid, Play::Mark("m1"));
    c.wait("m1", Duration::from_secs(10), |d| {
        d.contains(&Down::Mark("m1".into()))
    })
    .await;
    // The barge-in: clear. Twilio discards its buffer and echoes pending marks at once.
    play(&p, &topic, partition, &c.sid, Play::Clear);
    c.wait("clear", Duration::from_secs(10), |d| {
        d.contains(&Down::Clear)
    })
    .await;
    c.echo("m1").await;
    // After the clear, new audio plays and its mark is a played one.
    play(
        &p,
        &topic,
        partition,
        &c.sid,
        Play::Ulaw(&audio[16000..16800]),
    );
    play(&p, &topic, partition, &c.sid, Play::Mark("m2"));
    c.wait("m2", Duration::from_secs(10), |d| {
        d.contains(&Down::Mark("m2".into()))
    })
    .await;
    c.echo("m2").await;
    let d = c.down();
    let clear_at = d.iter().position(|x| *x == Down::Clear).unwrap();
    assert_eq!(
        media_bytes(&d[clear_at..]),
        audio[16000..16800].to_vec(),
        "after the clear only the new audio"
    );
    c.stop().await;
    let evs = events_until(&gw, &c.sid, "stop").await;
    let marks: Vec<(String, bool)> = evs
        .iter()
        .filter(|e| e["type"] == "mark")
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["played"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(marks, [("m1".into(), false), ("m2".into(), true)]);
    let stop = evs.iter().find(|e| e["type"] == "stop").unwrap();
    assert_eq!(stop["playback"]["clears"], 1, "{stop}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_the_socket_and_bad_or_foreign_records_are_counted_not_played() {
    let gw = Gateway::start("stop", &[]);
    let audio = speech();
    let mut c = Call::open(gw.port, 3).await;
    c.media(&audio, 5).await;
    let (topic, partition) = route(&gw, &c.sid).await;
    let p = producer();
    // Not for any stream here, malformed, or on the wrong partition: counted, never played.
    let other = (partition + 1) % 3;
    play(
        &p,
        &topic,
        partition,
        &sid("MZ", 9999),
        Play::Ulaw(&audio[..160]),
    );
    play(
        &p,
        &topic,
        partition,
        &c.sid,
        Play::Raw(&[("type", "media")], &[1, 2, 3]),
    );
    play(
        &p,
        &topic,
        partition,
        &c.sid,
        Play::Raw(&[("type", "dance")], b""),
    );
    play(
        &p,
        &topic,
        partition,
        &c.sid,
        Play::Raw(&[("sample_rate", "16000")], &[0, 0]),
    );
    play(
        &p,
        &topic,
        partition,
        &c.sid,
        Play::Raw(&[("type", "mark")], b""),
    );
    play(&p, &topic, other, &c.sid, Play::Ulaw(&audio[..160]));
    // A good record after them still plays.
    play(
        &p,
        &topic,
        partition,
        &c.sid,
        Play::Ulaw(&audio[1000..1320]),
    );
    c.wait("the good record", Duration::from_secs(10), |d| {
        media_bytes(d).len() == 320
    })
    .await;
    assert_eq!(media_bytes(&c.down()), audio[1000..1320].to_vec());
    for (reason, n) in [
        ("not_held", 1.0),
        ("odd_pcm_length", 1.0),
        ("unknown_type", 1.0),
        ("unsupported_sample_rate", 1.0),
        ("bad_header", 1.0),
        ("wrong_partition", 1.0),
    ] {
        assert_eq!(
            gw.metric(&format!(
                "gateway_playback_dropped_total{{reason=\"{reason}\"}}"
            )),
            n,
            "{reason}"
        );
    }
    // stop: the gateway closes with 1000; the terminal event says why.
    play(&p, &topic, partition, &c.sid, Play::Stop);
    assert_eq!(c.wait_close(Duration::from_secs(10)).await, Some(1000));
    let evs = events_until(&gw, &c.sid, "disconnect").await;
    let end = evs.iter().find(|e| e["type"] == "disconnect").unwrap();
    assert_eq!(end["reason"], "stopped_by_control");
    assert_eq!(end["playback"]["drops"]["wrong_partition"], 1, "{end}");
    assert_eq!(
        gw.metric("gateway_streams_total{outcome=\"stopped_by_control\"}"),
        1.0
    );
    // Playback for the ended stream is counted as such.
    play(&p, &topic, partition, &c.sid, Play::Ulaw(&audio[..160]));
    metric_reaches(
        &gw,
        &["gateway_playback_dropped_total{reason=\"ended\"}"],
        1.0,
        Duration::from_secs(10),
    )
    .await;
}

/// A stream whose `start` announces an outbound track is a one-way `<Start>` stream: Twilio
/// takes no media, mark or clear on it (31924), so those are counted, never sent; `stop` still
/// ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_stream_gets_no_playback_but_stop_still_ends_it() {
    let gw = Gateway::start("oneway", &[]);
    let audio = speech();
    let mut c = Call::open_with_tracks(gw.port, 5, &["inbound", "outbound"]).await;
    c.media(&audio, 5).await;
    let (topic, partition) = route(&gw, &c.sid).await;
    let p = producer();
    play(&p, &topic, partition, &c.sid, Play::Ulaw(&audio[..320]));
    play(&p, &topic, partition, &c.sid, Play::Mark("m1"));
    play(&p, &topic, partition, &c.sid, Play::Clear);
    let series = "gateway_playback_dropped_total{reason=\"one_way_stream\"}";
    metric_reaches(&gw, &[series], 3.0, Duration::from_secs(10)).await;
    play(&p, &topic, partition, &c.sid, Play::Stop);
    assert_eq!(c.wait_close(Duration::from_secs(10)).await, Some(1000));
    assert!(c.down().is_empty(), "{:?}", summary(&c.down()));
    assert_eq!(gw.metric(series), 3.0);
    let evs = events_until(&gw, &c.sid, "disconnect").await;
    let end = evs.iter().find(|e| e["type"] == "disconnect").unwrap();
    assert_eq!(end["reason"], "stopped_by_control");
    assert_eq!(end["playback"]["drops"]["one_way_stream"], 3, "{end}");
}

/// Twilio's `stop` ends the stream: playback that arrives while the gateway waits for Twilio to
/// close the socket (1 s) is not written into it, only counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_played_after_twilio_stops_the_stream() {
    let gw = Gateway::start("afterstop", &[]);
    let audio = speech();
    let mut c = Call::open(gw.port, 4).await;
    c.media(&audio, 5).await;
    let (topic, partition) = route(&gw, &c.sid).await;
    let p = producer();
    // Playback works before the stop.
    play(&p, &topic, partition, &c.sid, Play::Ulaw(&audio[..320]));
    c.wait("audio before the stop", Duration::from_secs(10), |d| {
        media_bytes(d).len() == 320
    })
    .await;
    // Twilio's stop, and no close frame: the socket stays open for the gateway's linger.
    c.seq += 1;
    let msg = stop(&c.sid, c.seq, ACCOUNT, &c.call);
    assert!(c.send(&msg).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    play(&p, &topic, partition, &c.sid, Play::Ulaw(&audio[320..640]));
    play(&p, &topic, partition, &c.sid, Play::Mark("late"));
    assert_eq!(c.wait_close(Duration::from_secs(10)).await, Some(1000));
    let down = c.down();
    assert_eq!(
        media_bytes(&down),
        audio[..320].to_vec(),
        "nothing after the stop: {:?}",
        summary(&down)
    );
    assert!(
        !down.iter().any(|d| matches!(d, Down::Mark(_))),
        "no mark after the stop: {:?}",
        summary(&down)
    );
    // Both late records are counted: dropped for an ended stream, whichever side of the
    // stream's removal from the routing table they arrived.
    let late = [
        "gateway_playback_dropped_total{reason=\"ended\"}",
        "gateway_playback_dropped_total{reason=\"stream_closed\"}",
    ];
    let n = metric_reaches(&gw, &late, 2.0, Duration::from_secs(10)).await;
    assert_eq!(n, 2.0, "late records counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_reading_delays_no_one_and_keeps_its_uplink() {
    let gw = Gateway::start("stuck", &["--playback-buffer", "2s"]);
    let audio = speech();
    let p = producer();
    // The stuck call: a socket with a tiny receive buffer that never reads, while its uplink
    // keeps streaming in real time.
    let stuck_sid = sid("MZ", 40);
    let mut stuck = connect_small_rcvbuf(gw.port, "/stream").await.unwrap();
    stuck
        .send(&start(
            &stuck_sid,
            &sid("CA", 40),
            ACCOUNT,
            &["inbound"],
            &[],
        ))
        .await;
    let uplink = {
        let (s, a) = (stuck_sid.clone(), audio.clone());
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            for k in 0..500u64 {
                let msg = media(&s, k + 2, "inbound", k + 1, k * 20, &a[..160]);
                if stuck
                    .ws
                    .write_frame(Frame::text(Payload::Owned(msg.into_bytes())))
                    .await
                    .is_err()
                {
                    return k;
                }
                next += Duration::from_millis(20);
                tokio::time::sleep_until(next).await;
            }
            500
        })
    };
    let mut healthy = Call::open(gw.port, 41).await;
    healthy.media(&audio, 5).await;
    let (topic, p_stuck) = route(&gw, &stuck_sid).await;
    let (_, p_healthy) = route(&gw, &healthy.sid).await;
    // Ten minutes of audio for the stuck call: far beyond socket buffers and its 2 s bound.
    for _ in 0..600 {
        play_second(&p, &topic, p_stuck, &stuck_sid);
    }
    p.flush(Duration::from_secs(20)).unwrap();
    // The bound holds: most of it is dropped and counted while the stream carries on.
    metric_reaches(
        &gw,
        &["gateway_playback_dropped_total{reason=\"buffer_full\"}"],
        100.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(gw.metric("gateway_playback_queued_bytes") <= (2 * 8000) as f64);
    // The healthy call's playback is prompt meanwhile.
    let t0 = Instant::now();
    play(
        &p,
        &topic,
        p_healthy,
        &healthy.sid,
        Play::Ulaw(&audio[..1600]),
    );
    healthy
        .wait("its audio", Duration::from_secs(5), |d| {
            media_bytes(d).len() == 1600
        })
        .await;
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "healthy playback waited {:?}",
        t0.elapsed()
    );
    // The stuck call's uplink is complete.
    let sent = uplink.await.unwrap();
    assert_eq!(sent, 500, "the stuck call's uplink kept flowing");
    let inbound = vec![format!("{}.audio.inbound", gw.prefix)];
    let (b, s) = (gw.brokers.clone(), stuck_sid.clone());
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&b, &inbound, Duration::from_secs(20), |r| {
            r.iter()
                .filter(|x| x.key.as_deref() == Some(s.as_str()))
                .count()
                >= 500
        })
    })
    .await
    .unwrap();
    assert_eq!(
        recs.iter()
            .filter(|x| x.key.as_deref() == Some(stuck_sid.as_str()))
            .count(),
        500
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_each_play_only_their_own_streams_and_a_restart_plays_nothing_stale() {
    let prefix = unique_prefix("three");
    let args = |i: usize| -> Vec<String> {
        vec![
            "--instance-index".into(),
            i.to_string(),
            "--instance-count".into(),
            "3".into(),
            "--topic-partitions".into(),
            "6".into(),
            "--gateway-id".into(),
            format!("gw-{i}"),
            // The calls here send little inbound audio; keep them open across the restart.
            "--idle-timeout".into(),
            "60s".into(),
        ]
    };
    let start_gw = |i: usize| {
        let a = args(i);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        Gateway::start_with_prefix(&prefix, &refs)
    };
    let mut gws: Vec<Gateway> = (0..3).map(start_gw).collect();
    let audio = speech();
    let p = producer();
    // Two calls per instance.
    let mut calls: Vec<(usize, Call)> = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        for j in 0..2u64 {
            let mut c = Call::open(gw.port, 100 + i as u64 * 10 + j).await;
            c.media(&audio, 3).await;
            calls.push((i, c));
        }
    }
    let mut routes = HashMap::new();
    for (i, c) in &calls {
        let (pfx, b, s) = (prefix.clone(), gws[0].brokers.clone(), c.sid.clone());
        let (topic, part) = tokio::task::spawn_blocking(move || route_of(&pfx, &b, &s))
            .await
            .unwrap();
        assert_eq!(
            part as usize % 3,
            *i,
            "instance {i} advertises its own partitions"
        );
        routes.insert(c.sid.clone(), (topic, part));
    }
    // Each call gets a distinct piece of audio.
    for (k, (_, c)) in calls.iter().enumerate() {
        let (topic, part) = &routes[&c.sid];
        play(
            &p,
            topic,
            *part,
            &c.sid,
            Play::Ulaw(&audio[k * 800..k * 800 + 800]),
        );
    }
    for (k, (_, c)) in calls.iter().enumerate() {
        c.wait("its audio", Duration::from_secs(10), |d| {
            media_bytes(d).len() >= 800
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            media_bytes(&c.down()),
            audio[k * 800..k * 800 + 800].to_vec(),
            "{} got only its own audio",
            c.sid
        );
    }
    // Restart instance 1: its calls end; the others are untouched.
    let ended: Vec<String> = calls
        .iter()
        .filter(|(i, _)| *i == 1)
        .map(|(_, c)| c.sid.clone())
        .collect();
    drop(std::mem::replace(&mut gws[1], start_gw(1)));
    for (i, c) in &calls {
        if *i == 1 {
            assert!(c.wait_close(Duration::from_secs(5)).await.is_some() || c.reader.is_finished());
        }
    }
    // Playback still written for the old calls reaches no one: not replayed, not misrouted.
    for s in &ended {
        let (topic, part) = &routes[s];
        play(&p, topic, *part, s, Play::Ulaw(&audio[..800]));
    }
    // The surviving calls still play, and only their own audio.
    for (k, (i, c)) in calls.iter().enumerate() {
        if *i == 1 {
            continue;
        }
        let (topic, part) = &routes[&c.sid];
        let before = media_bytes(&c.down()).len();
        play(
            &p,
            topic,
            *part,
            &c.sid,
            Play::Ulaw(&audio[40000 + k * 160..40000 + k * 160 + 160]),
        );
        c.wait("more audio", Duration::from_secs(10), |d| {
            media_bytes(d).len() == before + 160
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = &gws[1];
    assert_eq!(
        restarted.metric("gateway_playback_bytes_sent_total"),
        0.0,
        "nothing stale played"
    );
    let not_held = restarted.metric("gateway_playback_dropped_total{reason=\"not_held\"}");
    assert!(
        not_held >= 2.0,
        "the old calls' playback is counted as not held: {not_held}"
    );
    for g in [&gws[0], &gws[2]] {
        assert_eq!(
            g.metric("gateway_playback_dropped_total{reason=\"wrong_partition\"}"),
            0.0
        );
    }
}

/// A call that hangs up with playback still queued (its socket backed up): the `stop`
/// event's playback summary counts every record still queued or half written as
/// `stream_closed`, the same number the metric counts, and the media records it accepted are
/// exactly those written in full plus those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_summary_counts_playback_still_queued_at_the_hang_up() {
    let gw = Gateway::start("queuedatend", &["--playback-buffer", "30s"]);
    let audio = speech();
    let p = producer();
    let s = sid("MZ", 45);
    let mut c = connect_small_rcvbuf(gw.port, "/stream").await.unwrap();
    c.send(&start(&s, &sid("CA", 45), ACCOUNT, &["inbound"], &[]))
        .await;
    c.send(&media(&s, 2, "inbound", 1, 0, &audio[..160])).await;
    let (topic, partition) = route(&gw, &s).await;
    // One-second records for a socket that never reads, until its buffers are full (the
    // bytes written stop growing) and records wait in the queue.
    let mut last_sent = -1.0;
    for _ in 0..200 {
        for _ in 0..20 {
            play_second(&p, &topic, partition, &s);
        }
        p.flush(Duration::from_secs(20)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = gw.metric("gateway_playback_bytes_sent_total");
        if sent == last_sent && gw.metric("gateway_playback_queued_bytes") > 0.0 {
            break;
        }
        last_sent = sent;
    }
    assert!(gw.metric("gateway_playback_queued_bytes") > 0.0);
    // The caller hangs up.
    c.send(&stop(&s, 3, ACCOUNT, &sid("CA", 45))).await;
    let evs = events_until(&gw, &s, "stop").await;
    let stop_ev = evs.iter().find(|e| e["type"] == "stop").unwrap();
    let pb = &stop_ev["playback"];
    let closed = pb["drops"]["stream_closed"].as_u64().unwrap_or(0);
    assert!(closed >= 1, "records still queued at the end: {pb}");
    let records = pb["records"].as_u64().unwrap();
    let sent = pb["media_bytes_sent"].as_u64().unwrap();
    assert_eq!(
        records - closed,
        sent / 8000,
        "accepted = written in full + stream_closed: {pb}"
    );
    assert_eq!(
        pb["dropped"].as_u64().unwrap(),
        closed + pb["drops"]["buffer_full"].as_u64().unwrap_or(0),
        "{pb}"
    );
    // The metric agrees once the connection is gone (the only stream of this gateway).
    let m = metric_reaches(
        &gw,
        &["gateway_playback_dropped_total{reason=\"stream_closed\"}"],
        closed as f64,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(m, closed as f64, "{pb}");
    // The outbound topic holds the records written in full, as the summary says; the part of
    // a record half written at the end is not recorded (nothing of a stream is published
    // after its terminal event).
    let recorded = pb["frames_recorded"].as_u64().unwrap();
    let outbound = vec![format!("{}.audio.outbound", gw.prefix)];
    let (b, key) = (gw.brokers.clone(), s.clone());
    let chunks_of = move |r: &[Record]| -> u64 {
        r.iter()
            .filter(|x| x.key.as_deref() == Some(key.as_str()))
            .map(|x| x.h("chunks").parse::<u64>().unwrap())
            .sum()
    };
    let count = chunks_of.clone();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&b, &outbound, Duration::from_secs(20), |r| {
            count(r) >= recorded
        })
    })
    .await
    .unwrap();
    assert_eq!(chunks_of(&recs), recorded, "{pb}");
    assert_eq!(recorded, (records - closed) * 50, "{pb}");
}
