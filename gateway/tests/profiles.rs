//! Output profiles end to end: real Tansu broker, real gateway binary with three profiles
//! (16 kHz s16le mono, 48 kHz f32le mono, 16 kHz s16le stereo), one both-track stream with
//! gaps on each track and an outbound track that starts late. Every consumed profile record is
//! compared bit-exactly, with its headers, against `ProfileStream` run offline on the same
//! chunks; the terminal event's replay index covers every profile record (it was rendered
//! after all of them were acknowledged).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use gateway::profile::{Channel, ChunkIn, ProfileSpec, ProfileStream};
use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000001";

const PROFILES: [&str; 3] = [
    "wb16:rate=16000,format=s16le,layout=mono",
    "hd:rate=48000,format=f32le,layout=mono",
    "rec:rate=16000,format=s16le,layout=stereo",
];

/// One media message as sent.
struct Sent {
    track: &'static str,
    seq: u64,
    chunk: u64,
    ts: u64,
    ulaw: Vec<u8>,
}

/// A record as the gateway must publish it.
#[derive(Debug, PartialEq, Eq)]
struct Want {
    topic: String,
    headers: Vec<(&'static str, String)>,
    value: Vec<u8>,
}

/// The messages of the stream: inbound 0..60 chunks with a gap (chunks 20..23 missing);
/// outbound starts late (at 200 ms) and has its own gap (35..37 missing). Interleaved
/// inbound-then-outbound per 20 ms, sequence numbers in sending order.
fn plan(audio: &[u8]) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut seq = 2;
    let mut chunk_no = [0u64; 2];
    for k in 0..60u64 {
        for (t, track) in ["inbound", "outbound"].into_iter().enumerate() {
            let present = match t {
                0 => !(20..23).contains(&k),
                _ => k >= 10 && !(35..37).contains(&k),
            };
            if !present {
                continue;
            }
            chunk_no[t] += 1;
            let at = (k as usize * 160 + t * 8000) % (audio.len() - 160);
            out.push(Sent {
                track,
                seq,
                chunk: chunk_no[t],
                ts: k * 20,
                ulaw: audio[at..at + 160].to_vec(),
            });
            seq += 1;
        }
    }
    out
}

/// Runs the chunks through each profile offline, exactly as the session feeds them.
fn expected(prefix: &str, stream_sid: &str, sent: &[Sent]) -> Vec<Want> {
    let mut want = Vec::new();
    for text in PROFILES {
        let spec = ProfileSpec::parse(text).expect("spec");
        let mut ps = ProfileStream::new(&spec).expect("stream");
        let mut next_sample: [Option<u64>; 2] = [None; 2];
        let mut records = Vec::new();
        let mut collect = |r: gateway::profile::ProfileRecord<'_>| {
            let topic = format!("{prefix}.audio.{}.{}", spec.name, r.channel.as_str());
            let headers = vec![
                ("stream_sid", stream_sid.to_owned()),
                ("track", r.channel.as_str().to_owned()),
                ("profile", spec.name.clone()),
                ("sample_rate", spec.rate.to_string()),
                ("encoding", spec.encoding().to_owned()),
                ("channels", spec.channels().to_string()),
                ("seq", r.first_seq.to_string()),
                ("chunk", r.first_chunk.to_string()),
                ("chunks", r.chunks.to_string()),
                ("timestamp_ms", r.timestamp_ms.to_string()),
            ];
            assert!(r.channel != Channel::Stereo || spec.channels() == 2);
            records.push(Want {
                topic,
                headers,
                value: r.payload.to_vec(),
            });
        };
        for s in sent {
            let t = usize::from(s.track == "outbound");
            let start = s.ts * 8;
            let contiguous = next_sample[t] == Some(start);
            next_sample[t] = Some(start + s.ulaw.len() as u64);
            ps.push(
                ChunkIn {
                    track: t,
                    ulaw: &s.ulaw,
                    timestamp_ms: s.ts,
                    seq: s.seq,
                    chunk: s.chunk,
                    contiguous,
                },
                &mut collect,
            );
        }
        ps.finish(&mut collect);
        want.extend(records);
    }
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_publish_exactly_what_profile_stream_computes() {
    let mut args = Vec::new();
    for p in PROFILES {
        args.extend(["--profile", p]);
    }
    let gw = Gateway::start("profiles", &args);
    let audio = speech();
    let sent = plan(&audio);
    let stream_sid = sid("MZ", 4242);
    let call = sid("CA", 4242);

    let mut c = connect(&gw).await;
    c.send(&connected()).await;
    c.send(&start(
        &stream_sid,
        &call,
        ACCOUNT,
        &["inbound", "outbound"],
        &[],
    ))
    .await;
    for s in &sent {
        c.send(&media(&stream_sid, s.seq, s.track, s.chunk, s.ts, &s.ulaw))
            .await;
    }
    let last_seq = sent.last().map_or(1, |s| s.seq) + 1;
    c.send(&stop(&stream_sid, last_seq, ACCOUNT, &call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(3)).await;

    let want = expected(&gw.prefix, &stream_sid, &sent);
    let mut topics = vec![format!("{}.events", gw.prefix)];
    let mut all_profile_topics: Vec<String> = want.iter().map(|w| w.topic.clone()).collect();
    all_profile_topics.sort();
    all_profile_topics.dedup();
    let mut names: Vec<String> = [
        "wb16.inbound",
        "wb16.outbound",
        "hd.inbound",
        "hd.outbound",
        "rec.stereo",
    ]
    .iter()
    .map(|t| format!("{}.audio.{t}", gw.prefix))
    .collect();
    names.sort();
    assert_eq!(all_profile_topics, names);
    topics.extend(all_profile_topics.iter().cloned());
    let n_want = want.len();
    let brokers = gw.brokers.clone();
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &topics, Duration::from_secs(60), |r| {
            r.iter().filter(|x| x.topic.contains(".audio.")).count() >= n_want
                && count_events(r, "stop") >= 1
        })
    })
    .await
    .expect("consumer");

    // Per topic, in offset order (one key: one partition per topic).
    let mut got: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in recs.iter().filter(|r| r.topic.contains(".audio.")) {
        got.entry(r.topic.as_str()).or_default().push(r);
    }
    for list in got.values_mut() {
        list.sort_by_key(|r| (r.partition, r.offset));
        assert!(list.windows(2).all(|w| w[0].partition == w[1].partition));
    }
    for topic in &all_profile_topics {
        let mine: Vec<&Want> = want.iter().filter(|w| &w.topic == topic).collect();
        let theirs = got.get(topic.as_str()).cloned().unwrap_or_default();
        assert_eq!(theirs.len(), mine.len(), "{topic}: record count");
        for (i, (g, w)) in theirs.iter().zip(&mine).enumerate() {
            assert_eq!(
                g.key.as_deref(),
                Some(stream_sid.as_str()),
                "{topic} #{i}: key"
            );
            for (k, v) in &w.headers {
                assert_eq!(g.h(k), v, "{topic} #{i}: header {k}");
            }
            assert_eq!(g.h("call_sid"), call);
            assert_eq!(g.h("gateway"), "gw-test");
            assert!(g.value == w.value, "{topic} #{i}: payload differs");
        }
    }
    // Shapes: 20 ms of 16 kHz s16le mono = 640 bytes, 48 kHz f32le = 3840, stereo 1280.
    let len_of = |t: &str| {
        got[format!("{}.audio.{t}", gw.prefix).as_str()][0]
            .value
            .len()
    };
    assert_eq!(len_of("wb16.inbound"), 640);
    assert_eq!(len_of("hd.outbound"), 3840);
    assert_eq!(len_of("rec.stereo"), 1280);
    // Inbound: 57 chunks; outbound: 48 chunks; stereo: every 20 ms span with audio (60).
    let count = |t: &str| got[format!("{}.audio.{t}", gw.prefix).as_str()].len();
    assert_eq!(
        (
            count("wb16.inbound"),
            count("wb16.outbound"),
            count("rec.stereo")
        ),
        (57, 48, 60)
    );
    // The stereo spans before the outbound track starts are silent on the right; after it
    // starts, in inbound's gap (400..460 ms), silent on the left.
    let stereo = &got[format!("{}.audio.rec.stereo", gw.prefix).as_str()];
    let right_silent = |r: &Record| r.value.chunks_exact(4).all(|f| f[2..4] == [0, 0]);
    let left_silent = |r: &Record| r.value.chunks_exact(4).all(|f| f[0..2] == [0, 0]);
    for r in stereo.iter() {
        let ts: u64 = r.h("timestamp_ms").parse().expect("number");
        if ts < 180 {
            assert!(
                right_silent(r),
                "stereo at {ts} ms: outbound not started yet"
            );
        }
        if (420..440).contains(&ts) {
            assert!(left_silent(r), "stereo at {ts} ms: inbound gap");
            assert!(!right_silent(r), "stereo at {ts} ms: outbound audio");
        }
    }

    // The terminal event came after every profile record: its replay index counts them all.
    let stop_ev = recs
        .iter()
        .find(|r| r.topic.ends_with(".events") && r.json()["type"] == "stop")
        .expect("stop event")
        .json();
    let replay = stop_ev["replay"].as_array().expect("replay index");
    for topic in &all_profile_topics {
        let entry = replay
            .iter()
            .find(|e| e["topic"] == topic.as_str())
            .unwrap_or_else(|| panic!("{topic} missing from {replay:?}"));
        let theirs = &got[topic.as_str()];
        assert_eq!(entry["records"], theirs.len() as u64, "{topic}");
        assert_eq!(entry["last_offset"], theirs.last().map_or(-1, |r| r.offset));
        let label = if topic.ends_with(".stereo") {
            "stereo"
        } else if topic.ends_with(".inbound") {
            "inbound"
        } else {
            "outbound"
        };
        assert_eq!(entry["track"], label);
    }
    // Profile records are not frames: the accounting still counts Twilio's chunks.
    assert_eq!(stop_ev["frames_received"], sent.len() as u64);
    assert_eq!(stop_ev["frames_delivered"], sent.len() as u64);
    assert!(gw.metric("gateway_profile_records_total{outcome=\"delivered\"}") >= n_want as f64);
}

/// Runs `gateway <args> print-config` with `env`; returns (exit code, stdout, stderr).
fn print_config(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.arg("--insecure-skip-signature")
        .args(args)
        .arg("print-config")
        .env_remove("GATEWAY_PROFILES");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run gateway");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn profiles_come_from_flags_env_or_file_and_print_canonically() {
    let line = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("profile = "))
            .unwrap_or_default()
            .to_owned()
    };
    // None by default.
    let (code, out, err) = print_config(&[], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(line(&out), "profile = []");
    // Flags, canonical form with defaults filled in.
    let (code, out, err) = print_config(
        &[
            "--profile",
            "asr",
            "--profile",
            "rec:layout=stereo,rate=48000,format=f32le",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        line(&out),
        r#"profile = ["asr:rate=16000,format=s16le,layout=mono", "rec:rate=48000,format=f32le,layout=stereo"]"#
    );
    // Environment: one per line; a file list; flags win over both, env over the file.
    let dir = std::env::temp_dir().join(format!("gw-profiles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, "profile = [\"f1:rate=24000\"]\n").expect("write");
    let file = file.to_str().expect("utf-8 path");
    let env = [("GATEWAY_PROFILES", "e1:rate=8000\n\ne2:layout=stereo\n")];
    let (_, out, _) = print_config(&["--config", file], &[]);
    assert_eq!(
        line(&out),
        r#"profile = ["f1:rate=24000,format=s16le,layout=mono"]"#
    );
    let (_, out, _) = print_config(&["--config", file], &env);
    assert_eq!(
        line(&out),
        r#"profile = ["e1:rate=8000,format=s16le,layout=mono", "e2:rate=16000,format=s16le,layout=stereo"]"#
    );
    let (_, out, _) = print_config(&["--config", file, "--profile", "x"], &env);
    assert_eq!(
        line(&out),
        r#"profile = ["x:rate=16000,format=s16le,layout=mono"]"#
    );
    // Mistakes are all reported, exit 64.
    let (code, _, err) = print_config(
        &[
            "--profile",
            "a:rate=44100",
            "--profile",
            "b",
            "--profile",
            "b:rate=8000",
        ],
        &[],
    );
    assert_eq!(code, Some(64));
    assert!(
        err.contains("44100") && err.contains("given twice"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
