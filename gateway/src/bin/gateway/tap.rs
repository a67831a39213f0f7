//! `gateway tap`: a consumer of the gateway's own topics, for debugging and listening to calls.
//!
//! Reads `<prefix>.audio.inbound`, `<prefix>.audio.outbound` and `<prefix>.events` from the
//! beginning with a [`BaseConsumer`] and `assign()` (no consumer group: a group join costs
//! ~25 s on the local broker and the tap commits nothing), and:
//! - writes `DIR/<stream_sid>.<track>.wav` per stream and track: 8 kHz mono PCM16 WAV, each
//!   record placed at its `timestamp_ms` header (sample offset = `timestamp_ms` × 8), gaps left
//!   as silence (zero samples). `encoding` = `pcm_s16le` records are copied, `mulaw` records are
//!   G.711-decoded; a record with a `chunks` header holds that many consecutive chunks, which
//!   the gateway guarantees are contiguous from the record's `timestamp_ms`, so the whole value
//!   is placed there. When two records cover the same samples, the later one read wins.
//! - prints every event as one line on stdout: `<stream_sid>\t<type>\t<json>`.
//!
//! With `--stream SID` (without `--follow`) it first looks for the stream's terminal event and
//! reads only the partitions and offset ranges its replay index names (no scan of the audio
//! topics); a stream that has not ended is found by scanning. `--from-ms`/`--to-ms` cut a
//! window of the stream timeline: records are clipped to it sample-exactly and sample 0 of
//! each WAV is `--from-ms`.
//!
//! Without `--follow` it stops once every partition has reached the end offset captured at
//! start; with it, it keeps consuming until SIGINT/SIGTERM. WAV headers carry the right sizes
//! when the tap ends, after each stream's final event, and (with `--follow`) every second.
//!
//! Bounded resources: one open file per stream and track until its final event (`stop`,
//! `disconnect`, `error`) is read; a record placed past the WAV format's 4 GiB limit is skipped
//! with a warning.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use gateway::protocol::audio::ulaw_to_pcm16le_into;
use gateway::sink::kafka_config::{parse_option, parse_properties, KafkaOptions};

/// Sample rate of every WAV the tap writes (the gateway's contract: 8 kHz).
const SAMPLE_RATE: u32 = 8_000;
/// Samples per millisecond of the stream timeline.
const SAMPLES_PER_MS: u64 = SAMPLE_RATE as u64 / 1000;
/// Bytes per sample (PCM s16le, mono).
const BYTES_PER_SAMPLE: u64 = 2;
/// Size of the canonical 44-byte RIFF/WAVE header.
const WAV_HEADER_BYTES: u64 = 44;
/// Largest `data` chunk a RIFF file can describe (its sizes are u32).
const MAX_DATA_BYTES: u64 = u32::MAX as u64 - 36;
/// How often WAV headers are rewritten in `--follow` mode.
const HEADER_REFRESH: Duration = Duration::from_secs(1);
/// Timeout of one metadata or watermark request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `gateway tap`.
#[derive(Debug, Clone, clap::Args)]
pub struct TapArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic prefix the gateway publishes under.
    #[arg(long, default_value = "twilio")]
    pub topic_prefix: String,
    /// Only this stream (its `streamSid`).
    #[arg(long, value_name = "SID")]
    pub stream: Option<String>,
    /// Start of the window to write, ms on the stream's timeline (`timestamp_ms`): sample 0 of
    /// each WAV is this instant; audio before it is cut off.
    #[arg(long, value_name = "MS")]
    pub from_ms: Option<u64>,
    /// End of the window to write (exclusive), ms on the stream's timeline.
    #[arg(long, value_name = "MS")]
    pub to_ms: Option<u64>,
    /// Keep consuming live records; otherwise stop once caught up with the end offsets
    /// captured at start.
    #[arg(long)]
    pub follow: bool,
    /// Directory for `<stream_sid>.<track>.wav` files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// librdkafka setting `key=value` (security, networking), repeatable; the same settings
    /// the gateway uses reach the tap's consumer. Values may contain `,` and `=`.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub kafka_option: Vec<String>,
    /// File of librdkafka settings, one `key=value` per line.
    #[arg(long, value_name = "FILE")]
    pub kafka_options_file: Option<PathBuf>,
}

impl TapArgs {
    /// The shared Kafka client settings for these flags.
    pub fn kafka_options(&self) -> Result<KafkaOptions, TapError> {
        let mut k = KafkaOptions::new(self.brokers.clone());
        if let Some(path) = &self.kafka_options_file {
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            k.options.extend(
                parse_properties(&text)
                    .map_err(|e| TapError::Config(format!("{}: {e}", path.display())))?,
            );
        }
        for kv in &self.kafka_option {
            k.options.push(
                parse_option(kv).map_err(|e| TapError::Config(format!("--kafka-option: {e}")))?,
            );
        }
        Ok(k)
    }
}

/// Why the tap stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A Kafka client call failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What the tap was doing.
        context: String,
        /// The client's error.
        source: KafkaError,
    },
    /// A bad flag value.
    #[error("{0}")]
    Config(String),
    /// None of the three topics exists on the brokers.
    #[error("none of the topics {0:?} exists")]
    NoTopics(Vec<String>),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> TapError {
    let context = context.into();
    move |source| TapError::Kafka { context, source }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TapError + '_ {
    move |source| TapError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Set by SIGINT/SIGTERM; the consume loop checks it between polls.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic; `signal` is called with valid arguments.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// The canonical 44-byte header of a PCM16 mono 8 kHz WAV with `data_len` bytes of samples.
pub fn wav_header(data_len: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    let byte_rate = SAMPLE_RATE * BYTES_PER_SAMPLE as u32;
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(36 + data_len).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
    h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
    h[28..32].copy_from_slice(&byte_rate.to_le_bytes());
    h[32..34].copy_from_slice(&(BYTES_PER_SAMPLE as u16).to_le_bytes()); // block align
    h[34..36].copy_from_slice(&16u16.to_le_bytes()); // bits per sample
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    h
}

/// One WAV file being assembled: samples are written at their absolute position, the file is
/// extended with zeros (silence) when a record lands past its end.
struct WavTrack {
    path: PathBuf,
    /// Open while the stream may still send audio; closed after its final event.
    file: Option<File>,
    /// Bytes of sample data (the file is 44 bytes longer).
    data_len: u64,
    /// Sizes in the file's header are stale.
    dirty: bool,
}

impl WavTrack {
    fn create(path: PathBuf) -> Result<WavTrack, TapError> {
        let mut file = File::create(&path).map_err(io(&path))?;
        file.write_all(&wav_header(0)).map_err(io(&path))?;
        Ok(WavTrack {
            path,
            file: Some(file),
            data_len: 0,
            dirty: false,
        })
    }

    fn file(&mut self) -> Result<&mut File, TapError> {
        if self.file.is_none() {
            let f = File::options()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(io(&self.path))?;
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Writes PCM s16le `pcm` starting at sample `first_sample`.
    fn place(&mut self, first_sample: u64, pcm: &[u8]) -> Result<(), TapError> {
        let at = first_sample * BYTES_PER_SAMPLE;
        let end = at + pcm.len() as u64;
        let path = self.path.clone();
        let data_len = self.data_len;
        let f = self.file()?;
        if at > data_len {
            // `set_len` fills the extension with zeros: the gap is silence.
            f.set_len(WAV_HEADER_BYTES + at).map_err(io(&path))?;
        }
        f.seek(SeekFrom::Start(WAV_HEADER_BYTES + at))
            .map_err(io(&path))?;
        f.write_all(pcm).map_err(io(&path))?;
        self.data_len = data_len.max(end);
        self.dirty = true;
        Ok(())
    }

    /// Rewrites the header's sizes if samples were added since the last call.
    fn write_header(&mut self) -> Result<(), TapError> {
        if !self.dirty {
            return Ok(());
        }
        let header = wav_header(self.data_len as u32);
        let path = self.path.clone();
        let f = self.file()?;
        f.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        f.write_all(&header).map_err(io(&path))?;
        f.flush().map_err(io(&path))?;
        self.dirty = false;
        Ok(())
    }

    /// Final header, then the file handle is released (reopened if more audio arrives).
    fn close(&mut self) -> Result<(), TapError> {
        self.write_header()?;
        self.file = None;
        Ok(())
    }
}

/// Every WAV of the run, by (stream, track).
struct Recorder {
    out: PathBuf,
    tracks: BTreeMap<(String, String), WavTrack>,
    /// Records skipped (bad headers, unknown encoding, beyond the WAV size limit).
    skipped: u64,
    /// `--from-ms`/`--to-ms` in samples: [from, to).
    window: (u64, u64),
    /// Records entirely outside the window.
    outside: u64,
    pcm: Vec<u8>,
}

/// A stream SID as a file-name component: anything but `[A-Za-z0-9_-]` becomes `_`.
fn file_component(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn header<'a>(headers: &'a HashMap<String, &'a [u8]>, key: &str) -> Option<&'a str> {
    headers.get(key).and_then(|v| std::str::from_utf8(v).ok())
}

impl Recorder {
    fn audio(&mut self, stream: &str, m: &BorrowedMessage<'_>) -> Result<(), TapError> {
        let mut headers: HashMap<String, &[u8]> = HashMap::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                headers.insert(h.key.to_owned(), h.value.unwrap_or_default());
            }
        }
        let value = m.payload().unwrap_or_default();
        let where_ = format!("{}[{}]@{}", m.topic(), m.partition(), m.offset());
        let track = match header(&headers, "track") {
            Some(t @ ("inbound" | "outbound")) => t.to_owned(),
            other => return self.skip(&where_, &format!("track header {other:?}")),
        };
        let Some(ts_ms) = header(&headers, "timestamp_ms").and_then(|v| v.parse::<u64>().ok())
        else {
            return self.skip(&where_, "missing or invalid timestamp_ms header");
        };
        self.pcm.clear();
        match header(&headers, "encoding") {
            Some("pcm_s16le") => {
                if value.len() & 1 != 0 {
                    return self.skip(&where_, "odd-length pcm_s16le value");
                }
                self.pcm.extend_from_slice(value);
            }
            Some("mulaw") => ulaw_to_pcm16le_into(value, &mut self.pcm),
            other => return self.skip(&where_, &format!("encoding header {other:?}")),
        }
        if let Some(chunks) = header(&headers, "chunks") {
            if chunks.parse::<u32>().map_or(true, |n| n == 0) {
                return self.skip(&where_, &format!("invalid chunks header {chunks:?}"));
            }
        }
        let mut first_sample = ts_ms.saturating_mul(SAMPLES_PER_MS);
        // Cut to the window; the window's start becomes sample 0.
        let (from, to) = self.window;
        let samples = (self.pcm.len() / BYTES_PER_SAMPLE as usize) as u64;
        let start = first_sample.max(from);
        let stop = first_sample.saturating_add(samples).min(to);
        if start >= stop {
            self.outside += 1;
            return Ok(());
        }
        let cut_front = ((start - first_sample) * BYTES_PER_SAMPLE) as usize;
        let keep = ((stop - start) * BYTES_PER_SAMPLE) as usize;
        self.pcm.truncate(cut_front + keep);
        self.pcm.drain(..cut_front);
        first_sample = start - from;
        let end = first_sample
            .saturating_mul(BYTES_PER_SAMPLE)
            .saturating_add(self.pcm.len() as u64);
        if end > MAX_DATA_BYTES {
            return self.skip(&where_, "timestamp beyond the WAV format's 4 GiB limit");
        }
        let key = (stream.to_owned(), track);
        if !self.tracks.contains_key(&key) {
            let path = self.out.join(format!(
                "{}.{}.wav",
                file_component(&key.0),
                file_component(&key.1)
            ));
            self.tracks.insert(key.clone(), WavTrack::create(path)?);
        }
        let pcm = std::mem::take(&mut self.pcm);
        let placed = self
            .tracks
            .get_mut(&key)
            .expect("inserted above")
            .place(first_sample, &pcm);
        self.pcm = pcm;
        placed
    }

    fn skip(&mut self, where_: &str, why: &str) -> Result<(), TapError> {
        self.skipped += 1;
        eprintln!("tap: skipping audio record {where_}: {why}");
        Ok(())
    }

    /// The stream's final event was read: finish its headers and release its files.
    fn stream_ended(&mut self, stream: &str) -> Result<(), TapError> {
        for ((s, _), t) in self.tracks.iter_mut() {
            if s == stream {
                t.close()?;
            }
        }
        Ok(())
    }

    fn refresh_headers(&mut self) -> Result<(), TapError> {
        for t in self.tracks.values_mut() {
            if t.file.is_some() {
                t.write_header()?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), TapError> {
        for t in self.tracks.values_mut() {
            t.close()?;
        }
        Ok(())
    }
}

/// Prints one event line; returns the stream it belongs to when it is a final event.
fn print_event(value: &[u8], key: Option<&str>, out: &mut impl Write) -> Option<String> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(value) else {
        let _ = writeln!(
            out,
            "{}\tinvalid_json\t{}",
            key.unwrap_or("-"),
            String::from_utf8_lossy(value)
        );
        return None;
    };
    let stream = json
        .get("stream_sid")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .or(key)
        .unwrap_or("-")
        .to_owned();
    let kind = json
        .get("type")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    // Re-serialised compactly: one line whatever the producer's formatting.
    let _ = writeln!(out, "{stream}\t{kind}\t{json}");
    matches!(kind, "stop" | "disconnect" | "error").then_some(stream)
}

/// The high watermark of the last fetch response for a partition (librdkafka's cached value,
/// no request), or -1 when none arrived yet. rust-rdkafka does not wrap this call.
fn fetched_high_watermark(consumer: &BaseConsumer, topic: &str, partition: i32) -> i64 {
    let Ok(topic) = std::ffi::CString::new(topic) else {
        return -1;
    };
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is live for the call; the out-pointers are local.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        high
    } else {
        -1
    }
}

/// Where consuming must reach before the tap (without `--follow`) is done.
#[derive(Default)]
struct Progress {
    /// (topic, partition) → end offset captured at start, for partitions not yet caught up.
    remaining: HashMap<(String, i32), i64>,
    /// Whether any partition had something to read when the targets were captured.
    had_targets: bool,
    /// Consecutive empty polls since every target was reached.
    quiet_polls: u32,
}

/// Empty polls (200 ms each) that confirm the end once every target is reached. The targets
/// come from watermarks, and a watermark seen at the wrong moment (an offsets answer short
/// of the end, a fetch response's high watermark not yet moved) once ended a read one record
/// early (a CI failure of the tap test); records that arrive meanwhile are read and reset it.
const QUIET_POLLS_TO_FINISH: u32 = 2;

impl Progress {
    /// Some brokers (the local Tansu) answer a "latest offset" request with the first offset
    /// of the last batch + 1, short of the real end when batches hold several records. The
    /// high watermark of fetch responses is right: when the captured end is reached, it is
    /// consulted and the target moves to it if it is further.
    fn seen(&mut self, consumer: &BaseConsumer, topic: &str, partition: i32, offset: i64) {
        self.quiet_polls = 0;
        let k = (topic.to_owned(), partition);
        if let Some(&end) = self.remaining.get(&k) {
            if offset + 1 >= end {
                let fetched_high = fetched_high_watermark(consumer, topic, partition);
                if fetched_high > offset + 1 {
                    self.remaining.insert(k, fetched_high);
                } else {
                    self.remaining.remove(&k);
                }
            }
        }
    }

    /// Also consults the consumer's positions: they move past offsets that carry no message
    /// (transaction markers, compacted records).
    fn check_positions(&mut self, consumer: &BaseConsumer) {
        if self.remaining.is_empty() {
            self.quiet_polls += 1;
            return;
        }
        if let Ok(pos) = consumer.position() {
            for e in pos.elements() {
                if let Offset::Offset(o) = e.offset() {
                    let k = (e.topic().to_owned(), e.partition());
                    if self.remaining.get(&k).is_some_and(|&end| o >= end) {
                        let fetched_high =
                            fetched_high_watermark(consumer, e.topic(), e.partition());
                        if fetched_high > o {
                            self.remaining.insert(k, fetched_high);
                        } else {
                            self.remaining.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// Every target reached and confirmed by quiet polls (at once when nothing was to read).
    fn done(&self) -> bool {
        self.remaining.is_empty()
            && (!self.had_targets || self.quiet_polls >= QUIET_POLLS_TO_FINISH)
    }

    /// Sets the end of one partition (called while building the assignment).
    fn target(&mut self, topic: &str, partition: i32, end: i64) {
        self.had_targets = true;
        self.remaining.insert((topic.to_owned(), partition), end);
    }
}

/// One topic partition's offsets of a stream, from its terminal event's `replay` index.
struct ReplayRange {
    topic: String,
    partition: i32,
    first: i64,
    last: i64,
}

/// Reads the events topic to its end looking for `stream`'s terminal event and returns its
/// replay index (the partitions and offset ranges of its records), or None when the stream has
/// not ended (or was published by a gateway without the index).
fn find_replay_index(
    consumer: &BaseConsumer,
    events_topic: &str,
    stream: &str,
) -> Result<Option<Vec<ReplayRange>>, TapError> {
    // The index covers the records before the terminal event; the terminal event itself is
    // added to the events topic's range so it is printed too.
    let md = consumer
        .fetch_metadata(Some(events_topic), METADATA_TIMEOUT)
        .map_err(kafka(format!("metadata of {events_topic}")))?;
    let Some(t) = md
        .topics()
        .iter()
        .find(|t| t.name() == events_topic && t.error().is_none())
    else {
        return Ok(None);
    };
    let mut tpl = TopicPartitionList::new();
    let mut progress = Progress::default();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(events_topic, p.id(), METADATA_TIMEOUT)
            .map_err(kafka(format!("watermarks of {events_topic}[{}]", p.id())))?;
        if high > low {
            progress.target(events_topic, p.id(), high);
            tpl.add_partition_offset(events_topic, p.id(), Offset::Beginning)
                .map_err(kafka("building the assignment"))?;
        }
    }
    if tpl.count() == 0 {
        return Ok(None);
    }
    consumer
        .assign(&tpl)
        .map_err(kafka("assigning partitions"))?;
    let mut found = None;
    while !progress.done() && !STOP.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress.seen(consumer, m.topic(), m.partition(), m.offset());
                if m.key() != Some(stream.as_bytes()) {
                    continue;
                }
                let Some(json) = m
                    .payload()
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                else {
                    continue;
                };
                let terminal = matches!(
                    json.get("type").and_then(|t| t.as_str()),
                    Some("stop" | "disconnect" | "error")
                );
                if let (true, Some(entries)) =
                    (terminal, json.get("replay").and_then(|r| r.as_array()))
                {
                    let ranges = entries
                        .iter()
                        .filter_map(|e| {
                            Some(ReplayRange {
                                topic: e.get("topic")?.as_str()?.to_owned(),
                                partition: i32::try_from(e.get("partition")?.as_i64()?).ok()?,
                                first: e.get("first_offset")?.as_i64()?,
                                last: e.get("last_offset")?.as_i64()?,
                            })
                        })
                        .collect::<Vec<ReplayRange>>();
                    let mut ranges = ranges;
                    match ranges
                        .iter_mut()
                        .find(|r| r.topic == events_topic && r.partition == m.partition())
                    {
                        Some(r) => r.last = r.last.max(m.offset()),
                        None => ranges.push(ReplayRange {
                            topic: events_topic.to_owned(),
                            partition: m.partition(),
                            first: m.offset(),
                            last: m.offset(),
                        }),
                    }
                    found = Some(ranges);
                }
            }
            Some(Err(e)) => eprintln!("tap: consumer error: {e}"),
            None => progress.check_positions(consumer),
        }
    }
    Ok(found)
}

/// Runs the tap until caught up (or, with `--follow`, until SIGINT/SIGTERM).
pub fn run(args: TapArgs) -> Result<(), TapError> {
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let settings = args.kafka_options()?;
    let consumer: BaseConsumer = settings
        .client_config_with(&[])
        // Required by the client, never joined: partitions are assigned, nothing is committed.
        .set("group.id", "gateway-tap")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .create()
        .map_err(kafka("creating consumer"))?;

    let topics = [
        format!("{}.audio.inbound", args.topic_prefix),
        format!("{}.audio.outbound", args.topic_prefix),
        format!("{}.events", args.topic_prefix),
    ];
    if let (Some(from), Some(to)) = (args.from_ms, args.to_ms) {
        if from >= to {
            return Err(TapError::Config(format!(
                "--from-ms {from} must be below --to-ms {to}"
            )));
        }
    }
    let mut tpl = TopicPartitionList::new();
    let mut progress = Progress::default();
    // A stream that has ended carries its replay index: read only its partitions' ranges.
    let index = match (&args.stream, args.follow) {
        (Some(sid), false) => find_replay_index(&consumer, &topics[2], sid)?,
        _ => None,
    };
    if let Some(ranges) = &index {
        let sid = args.stream.as_deref().unwrap_or_default();
        eprintln!(
            "tap: replay index of {sid}: {} topic partitions, {} records",
            ranges.len(),
            ranges.iter().map(|r| r.last - r.first + 1).sum::<i64>()
        );
        for r in ranges {
            if !topics.contains(&r.topic) {
                // Profile topics and others this tap does not decode.
                continue;
            }
            tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.first))
                .map_err(kafka("building the assignment"))?;
            progress.target(&r.topic, r.partition, r.last + 1);
        }
    }
    for topic in topics.iter().filter(|_| index.is_none()) {
        let md = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(kafka(format!("metadata of {topic}")))?;
        let Some(t) = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
        else {
            eprintln!("tap: topic {topic} does not exist; skipping it");
            continue;
        };
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)
                .map_err(kafka(format!("watermarks of {topic}[{}]", p.id())))?;
            if high > low {
                progress.target(topic, p.id(), high);
            }
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(kafka("building the assignment"))?;
        }
    }
    if tpl.count() == 0 {
        return Err(TapError::NoTopics(topics.to_vec()));
    }
    consumer
        .assign(&tpl)
        .map_err(kafka("assigning partitions"))?;
    install_signal_handlers();

    let mut rec = Recorder {
        out: args.out.clone(),
        tracks: BTreeMap::new(),
        skipped: 0,
        window: (
            args.from_ms.unwrap_or(0).saturating_mul(SAMPLES_PER_MS),
            args.to_ms
                .map_or(u64::MAX, |t| t.saturating_mul(SAMPLES_PER_MS)),
        ),
        outside: 0,
        pcm: Vec::with_capacity(16 * 1024),
    };
    let stdout = std::io::stdout();
    let mut last_refresh = Instant::now();
    let (mut audio_records, mut events) = (0u64, 0u64);
    while !STOP.load(Ordering::SeqCst) {
        if !args.follow && progress.done() {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress.seen(&consumer, m.topic(), m.partition(), m.offset());
                let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
                if m.topic() == topics[2] {
                    if let Some(want) = &args.stream {
                        let stream = m
                            .payload()
                            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                            .and_then(|j| j.get("stream_sid")?.as_str().map(str::to_owned));
                        if key != Some(want.as_str()) && stream.as_deref() != Some(want.as_str()) {
                            continue;
                        }
                    }
                    events += 1;
                    let ended =
                        print_event(m.payload().unwrap_or_default(), key, &mut stdout.lock());
                    if let Some(stream) = ended {
                        rec.stream_ended(&stream)?;
                    }
                } else {
                    let header_sid = m.headers().and_then(|hs| {
                        hs.iter()
                            .find(|h| h.key == "stream_sid")
                            .and_then(|h| std::str::from_utf8(h.value?).ok())
                    });
                    let Some(stream) = header_sid.or(key) else {
                        rec.skip(
                            &format!("{}[{}]@{}", m.topic(), m.partition(), m.offset()),
                            "no stream_sid header and no key",
                        )?;
                        continue;
                    };
                    if args.stream.as_deref().is_some_and(|want| want != stream) {
                        continue;
                    }
                    audio_records += 1;
                    let stream = stream.to_owned();
                    rec.audio(&stream, &m)?;
                }
            }
            Some(Err(e)) => eprintln!("tap: consumer error: {e}"),
            None => progress.check_positions(&consumer),
        }
        if args.follow && last_refresh.elapsed() >= HEADER_REFRESH {
            rec.refresh_headers()?;
            last_refresh = Instant::now();
        }
    }
    rec.finish()?;
    let _ = stdout.lock().flush();
    eprintln!(
        "tap: {audio_records} audio records, {events} events, {} skipped, {} outside --from-ms/--to-ms",
        rec.skipped, rec.outside
    );
    for t in rec.tracks.values() {
        eprintln!(
            "tap: wrote {} ({:.2} s)",
            t.path.display(),
            t.data_len as f64 / f64::from(SAMPLE_RATE * BYTES_PER_SAMPLE as u32)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_canonical() {
        let h = wav_header(320);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 356);
        assert_eq!(&h[8..16], b"WAVEfmt ");
        assert_eq!(u16::from_le_bytes([h[20], h[21]]), 1);
        assert_eq!(u16::from_le_bytes([h[22], h[23]]), 1);
        assert_eq!(u32::from_le_bytes(h[24..28].try_into().unwrap()), 8000);
        assert_eq!(u32::from_le_bytes(h[28..32].try_into().unwrap()), 16000);
        assert_eq!(u16::from_le_bytes([h[32], h[33]]), 2);
        assert_eq!(u16::from_le_bytes([h[34], h[35]]), 16);
        assert_eq!(&h[36..40], b"data");
        assert_eq!(u32::from_le_bytes(h[40..44].try_into().unwrap()), 320);
    }

    #[test]
    fn placing_past_the_end_fills_silence_and_overwrites_in_place() {
        let dir = std::env::temp_dir().join(format!("tap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.wav");
        let mut t = WavTrack::create(path.clone()).unwrap();
        t.place(2, &[1, 0, 2, 0]).unwrap();
        t.place(0, &[9, 9]).unwrap();
        t.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..44], &wav_header(8));
        assert_eq!(&bytes[44..], &[9, 9, 0, 0, 1, 0, 2, 0]);
        // More audio after close reopens the file and extends it.
        t.place(5, &[7, 7]).unwrap();
        t.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..44], &wav_header(12));
        assert_eq!(&bytes[44..], &[9, 9, 0, 0, 1, 0, 2, 0, 0, 0, 7, 7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_names_cannot_escape_the_directory() {
        assert_eq!(file_component("MZ0123abc"), "MZ0123abc");
        assert_eq!(file_component("../etc/x"), "___etc_x");
    }

    #[test]
    fn final_events_are_recognised_and_printed_on_one_line() {
        let mut out = Vec::new();
        let v = br#"{"type":"stop",
            "stream_sid":"MZ1","reason":"stop"}"#;
        assert_eq!(print_event(v, Some("MZ1"), &mut out), Some("MZ1".into()));
        assert_eq!(
            print_event(br#"{"type":"dtmf","stream_sid":"MZ1"}"#, None, &mut out),
            None
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("MZ1\tstop\t{"), "{}", lines[0]);
    }
}
