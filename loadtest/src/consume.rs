//! Kafka receive plumbing shared by the verifier, the latency probe and the echo bot.
//!
//! The rule every consumer here follows: a record is timestamped the moment `poll` hands it
//! over, before anything looks at it, so that the harness's own checking never shows up as
//! gateway latency. [`RawRecord`] is that stamped record, copied out of librdkafka into one
//! allocation so it can cross to a verification thread. [`LagTracker`] records, per assigned
//! partition, the next offset the consume loop has received, and [`LagSampler`] compares it
//! with the broker's high watermark once per interval (on its own client and thread), so the
//! consumer's own backlog is measured instead of guessed.
//!
//! All consumers use `assign()` at the partitions' high watermarks (no consumer group: a group
//! join takes ~25 s on the local broker), so only records of this run are read.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Timeout for metadata and watermark round trips.
const META_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer configuration tuned for latency: tiny fetch waits, no group, no commits.
///
/// `fetch_wait_ms` bounds how long the broker holds a fetch open when there is no data.
pub fn low_latency_consumer(brokers: &str, fetch_wait_ms: u32) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        // Required by librdkafka even without subscribe(); never joined.
        .set("group.id", "loadtest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("fetch.error.backoff.ms", "10")
        // Keep fetching while the local queue is non-empty instead of backing off for 1 s.
        .set("fetch.queue.backoff.ms", "1");
    c
}

/// The partitions a consumer was assigned.
#[derive(Debug, Clone, Default)]
pub struct Assignment {
    /// `(topic index in the requested list, partition, start offset)`.
    pub partitions: Vec<(usize, i32, i64)>,
    /// Requested topics, in order.
    pub topics: Vec<String>,
    /// Topics that did not exist (nothing assigned for them).
    pub missing_topics: Vec<String>,
}

/// Assigns `consumer` to every partition of `topics` (or only `only_partition` of them) at
/// the current high watermark. Blocking: metadata and watermark round trips.
pub fn assign_at_end(
    consumer: &BaseConsumer,
    topics: &[String],
    only_partition: Option<i32>,
) -> Result<Assignment, KafkaError> {
    assign_at_end_skipping(consumer, topics, only_partition, &[])
}

/// [`assign_at_end`] leaving out the topics at the indices in `skip` (their indices stay
/// valid for [`topic_index`]; nothing is read from them).
pub fn assign_at_end_skipping(
    consumer: &BaseConsumer,
    topics: &[String],
    only_partition: Option<i32>,
    skip: &[usize],
) -> Result<Assignment, KafkaError> {
    let (out, tpl) = plan_at_end_skipping(consumer, topics, only_partition, skip)?;
    consumer.assign(&tpl)?;
    Ok(out)
}

/// What [`assign_at_end_skipping`] would assign, without assigning: the start offsets are
/// the high watermarks of now, and the list can be given to `assign` later (a consumer that
/// must not fetch while a load runs, yet must read everything produced from now on).
pub fn plan_at_end_skipping(
    consumer: &BaseConsumer,
    topics: &[String],
    only_partition: Option<i32>,
    skip: &[usize],
) -> Result<(Assignment, TopicPartitionList), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    let mut out = Assignment {
        topics: topics.to_vec(),
        ..Default::default()
    };
    for (ti, topic) in topics.iter().enumerate() {
        if skip.contains(&ti) {
            continue;
        }
        let md = consumer.fetch_metadata(Some(topic), META_TIMEOUT)?;
        let mut parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic.as_str() && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        parts.sort_unstable();
        if let Some(p) = only_partition {
            parts.retain(|&x| x == p);
        }
        if parts.is_empty() {
            out.missing_topics.push(topic.clone());
            continue;
        }
        for p in parts {
            let (_low, high) = consumer.fetch_watermarks(topic, p, META_TIMEOUT)?;
            tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
            out.partitions.push((ti, p, high));
        }
    }
    Ok((out, tpl))
}

/// Converts monotonic instants to unix microseconds through one anchor pair, so receipt
/// stamps need one clock read and still compare with the gateway's `received_at_us`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    mono: Instant,
    unix_us: i64,
}

impl Clock {
    /// Anchors now.
    pub fn new() -> Self {
        let mono = Instant::now();
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Clock { mono, unix_us }
    }

    /// Unix microseconds of `at`.
    pub fn unix_us(&self, at: Instant) -> i64 {
        if at >= self.mono {
            self.unix_us + at.duration_since(self.mono).as_micros() as i64
        } else {
            self.unix_us - self.mono.duration_since(at).as_micros() as i64
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One record copied out of librdkafka, stamped on receipt.
///
/// Key, payload and headers live in one buffer: `key | payload | headers`, each header as
/// `u16 key length, u32 value length (u32::MAX = none), key, value`.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Monotonic receipt time, taken before anything else looked at the record.
    pub at: Instant,
    /// Index of the record's topic in the consumer's topic list.
    pub topic: usize,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    buf: Vec<u8>,
    key_len: u32,
    has_key: bool,
    payload_len: u32,
}

impl RawRecord {
    /// Copies `msg` (one allocation). `topic` is the caller's index of `msg.topic()`.
    pub fn capture(at: Instant, topic: usize, msg: &BorrowedMessage<'_>) -> RawRecord {
        let key = msg.key();
        let payload = msg.payload().unwrap_or(&[]);
        let headers = msg.headers();
        let mut hlen = 0usize;
        if let Some(h) = headers {
            for i in 0..h.count() {
                if let Some(hd) = h.try_get(i) {
                    hlen += 6 + hd.key.len() + hd.value.map_or(0, <[u8]>::len);
                }
            }
        }
        let klen = key.map_or(0, <[u8]>::len);
        let mut buf = Vec::with_capacity(klen + payload.len() + hlen);
        buf.extend_from_slice(key.unwrap_or(&[]));
        buf.extend_from_slice(payload);
        if let Some(h) = headers {
            for i in 0..h.count() {
                if let Some(hd) = h.try_get(i) {
                    push_header(&mut buf, hd.key, hd.value);
                }
            }
        }
        RawRecord {
            at,
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            buf,
            key_len: klen as u32,
            has_key: key.is_some(),
            payload_len: payload.len() as u32,
        }
    }

    /// Builds a record from parts (tests and synthetic input).
    pub fn from_parts(
        at: Instant,
        topic: usize,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> RawRecord {
        let mut buf = Vec::new();
        buf.extend_from_slice(key.unwrap_or(&[]));
        buf.extend_from_slice(payload);
        for (k, v) in headers {
            push_header(&mut buf, k, Some(v));
        }
        RawRecord {
            at,
            topic,
            partition: 0,
            offset: 0,
            buf,
            key_len: key.map_or(0, <[u8]>::len) as u32,
            has_key: key.is_some(),
            payload_len: payload.len() as u32,
        }
    }

    /// The key, if the record had one.
    pub fn key(&self) -> Option<&[u8]> {
        self.has_key.then(|| &self.buf[..self.key_len as usize])
    }

    /// The key as UTF-8, if present and valid.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value (empty when absent).
    pub fn payload(&self) -> &[u8] {
        let k = self.key_len as usize;
        &self.buf[k..k + self.payload_len as usize]
    }

    /// Iterates `(name, value)`; headers with invalid UTF-8 names or no value are skipped.
    pub fn headers(&self) -> HeaderIter<'_> {
        HeaderIter {
            rest: &self.buf[(self.key_len + self.payload_len) as usize..],
        }
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The first header called `name` as UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Bytes held (for memory accounting).
    pub fn size(&self) -> usize {
        self.buf.len() + std::mem::size_of::<Self>()
    }
}

fn push_header(buf: &mut Vec<u8>, key: &str, value: Option<&[u8]>) {
    let k = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
    buf.extend_from_slice(&(k.len() as u16).to_le_bytes());
    let vlen = value.map_or(u32::MAX, |v| v.len() as u32);
    buf.extend_from_slice(&vlen.to_le_bytes());
    buf.extend_from_slice(k);
    if let Some(v) = value {
        buf.extend_from_slice(v);
    }
}

/// Iterator over a [`RawRecord`]'s headers.
#[derive(Debug, Clone)]
pub struct HeaderIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.len() < 6 {
                return None;
            }
            let klen = u16::from_le_bytes([self.rest[0], self.rest[1]]) as usize;
            let vlen = u32::from_le_bytes([self.rest[2], self.rest[3], self.rest[4], self.rest[5]]);
            let vbytes = if vlen == u32::MAX { 0 } else { vlen as usize };
            let body = &self.rest[6..];
            if body.len() < klen + vbytes {
                self.rest = &[];
                return None;
            }
            let key = &body[..klen];
            let value = &body[klen..klen + vbytes];
            self.rest = &body[klen + vbytes..];
            if vlen == u32::MAX {
                continue;
            }
            if let Ok(k) = std::str::from_utf8(key) {
                return Some((k, value));
            }
        }
    }
}

/// Finds `topic`'s index in `topics` (a handful of names: a linear scan).
pub fn topic_index(topics: &[String], topic: &str) -> Option<usize> {
    topics.iter().position(|t| t == topic)
}

/// Per-partition receive positions of one consume loop, shared with its [`LagSampler`].
#[derive(Debug)]
pub struct LagTracker {
    /// `[topic index][partition]` → next offset expected (last received + 1).
    next: Vec<Vec<AtomicI64>>,
    /// `[topic index][partition]` → whether the partition is assigned.
    assigned: Vec<Vec<bool>>,
    topics: Vec<String>,
    /// Records received in total.
    pub received: AtomicU64,
}

impl LagTracker {
    /// Tracks the partitions of `a`, starting at their assigned offsets.
    pub fn new(a: &Assignment) -> Self {
        let mut next: Vec<Vec<AtomicI64>> = a.topics.iter().map(|_| Vec::new()).collect();
        let mut assigned: Vec<Vec<bool>> = a.topics.iter().map(|_| Vec::new()).collect();
        for &(t, p, start) in &a.partitions {
            let p = p.max(0) as usize;
            while next[t].len() <= p {
                next[t].push(AtomicI64::new(-1));
                assigned[t].push(false);
            }
            next[t][p].store(start, Ordering::Relaxed);
            assigned[t][p] = true;
        }
        LagTracker {
            next,
            assigned,
            topics: a.topics.clone(),
            received: AtomicU64::new(0),
        }
    }

    /// Notes a record received from the consume loop (two relaxed atomic ops).
    #[inline]
    pub fn received(&self, topic: usize, partition: i32, offset: i64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(a) = self
            .next
            .get(topic)
            .and_then(|v| v.get(partition.max(0) as usize))
        {
            a.fetch_max(offset + 1, Ordering::Relaxed);
        }
    }

    /// `(topic, partition, next offset)` of every assigned partition.
    pub fn positions(&self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (t, parts) in self.next.iter().enumerate() {
            for (p, a) in parts.iter().enumerate() {
                if self.assigned[t][p] {
                    out.push((self.topics[t].clone(), p as i32, a.load(Ordering::Relaxed)));
                }
            }
        }
        out
    }
}

/// Lag of one partition over the run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Largest sampled lag, records (high watermark − next offset received).
    pub max_records: i64,
    /// Last sampled lag, records.
    pub last_records: i64,
}

/// A consume loop's own backlog, sampled: high watermark − next offset received, summed over
/// its partitions.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConsumerLag {
    /// Samples taken.
    pub samples: u64,
    /// Seconds between samples.
    pub interval_secs: f64,
    /// Largest total lag seen, records.
    pub max_records: i64,
    /// Mean total lag, records.
    pub mean_records: f64,
    /// Total lag at the last sample, records.
    pub last_records: i64,
    /// Largest lag per topic, records.
    pub max_by_topic: BTreeMap<String, i64>,
    /// Per partition.
    pub partitions: Vec<PartitionLag>,
    /// Watermark queries that failed.
    pub query_errors: u64,
}

/// Samples a [`LagTracker`] against the broker's high watermarks on its own thread and client.
pub struct LagSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<ConsumerLag>>,
    /// Total lag at the last sample (records), for live display.
    pub live: Arc<AtomicI64>,
}

impl LagSampler {
    /// Starts sampling every `every`. The watermark client is a separate consumer, so the
    /// queries never delay the consume loop.
    pub fn start(
        brokers: &str,
        tracker: Arc<LagTracker>,
        every: Duration,
        name: &str,
    ) -> Result<LagSampler, KafkaError> {
        let client: BaseConsumer = low_latency_consumer(brokers, 100).create()?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicI64::new(0));
        let (stop2, live2) = (stop.clone(), live.clone());
        let every = every.max(Duration::from_millis(50));
        let thread = std::thread::Builder::new()
            .name(format!("{name}-lag"))
            .spawn(move || sample_loop(&client, &tracker, every, &stop2, &live2))
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        Ok(LagSampler {
            stop,
            thread: Some(thread),
            live,
        })
    }

    /// Stops and returns the summary.
    pub fn finish(mut self) -> ConsumerLag {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for LagSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sample_loop(
    client: &BaseConsumer,
    tracker: &LagTracker,
    every: Duration,
    stop: &AtomicBool,
    live: &AtomicI64,
) -> ConsumerLag {
    let mut out = ConsumerLag {
        interval_secs: every.as_secs_f64(),
        ..Default::default()
    };
    let mut parts: BTreeMap<(String, i32), PartitionLag> = BTreeMap::new();
    let mut sum = 0f64;
    let mut next_due = Instant::now() + every;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next_due {
            std::thread::sleep((next_due - now).min(Duration::from_millis(50)));
            continue;
        }
        next_due += every;
        let mut total = 0i64;
        let mut by_topic: BTreeMap<String, i64> = BTreeMap::new();
        for (topic, p, next) in tracker.positions() {
            // Position first, then the watermark: records produced in between count as lag,
            // never as negative lag.
            match client.fetch_watermarks(&topic, p, Duration::from_secs(2)) {
                Ok((_lo, high)) => {
                    let lag = (high - next).max(0);
                    total += lag;
                    *by_topic.entry(topic.clone()).or_default() += lag;
                    let e = parts
                        .entry((topic.clone(), p))
                        .or_insert_with(|| PartitionLag {
                            topic,
                            partition: p,
                            ..Default::default()
                        });
                    e.max_records = e.max_records.max(lag);
                    e.last_records = lag;
                }
                Err(_) => out.query_errors += 1,
            }
        }
        out.samples += 1;
        sum += total as f64;
        out.max_records = out.max_records.max(total);
        out.last_records = total;
        for (t, v) in by_topic {
            let e = out.max_by_topic.entry(t).or_default();
            *e = (*e).max(v);
        }
        live.store(total, Ordering::Relaxed);
    }
    if out.samples > 0 {
        out.mean_records = sum / out.samples as f64;
    }
    out.partitions = parts.into_values().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_record_round_trips_parts() {
        let at = Instant::now();
        let r = RawRecord::from_parts(
            at,
            2,
            Some(b"MZabc"),
            b"\x01\x02\x03",
            &[("chunk", b"7"), ("encoding", b"mulaw"), ("", b"")],
        );
        assert_eq!(r.key(), Some(&b"MZabc"[..]));
        assert_eq!(r.key_str(), Some("MZabc"));
        assert_eq!(r.payload(), b"\x01\x02\x03");
        assert_eq!(r.header_str("chunk"), Some("7"));
        assert_eq!(r.header("encoding"), Some(&b"mulaw"[..]));
        assert_eq!(r.header("nope"), None);
        assert_eq!(r.headers().count(), 3);
        let none = RawRecord::from_parts(at, 0, None, b"", &[]);
        assert_eq!(none.key(), None);
        assert_eq!(none.payload(), b"");
        assert_eq!(none.headers().count(), 0);
    }

    #[test]
    fn clock_maps_instants_to_unix() {
        let c = Clock::new();
        let later = c.mono + Duration::from_millis(1500);
        assert_eq!(c.unix_us(later) - c.unix_us(c.mono), 1_500_000);
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_micros() as i64;
        assert!((c.unix_us(Instant::now()) - now_unix).abs() < 50_000);
    }

    #[test]
    fn tracker_keeps_the_highest_position() {
        let a = Assignment {
            partitions: vec![(0, 0, 10), (0, 2, 5), (1, 0, 0)],
            topics: vec!["a".into(), "b".into()],
            missing_topics: vec![],
        };
        let t = LagTracker::new(&a);
        t.received(0, 2, 7);
        t.received(0, 2, 6);
        t.received(1, 0, 0);
        t.received(5, 0, 0); // unknown topic: counted, not tracked
        let pos = t.positions();
        assert_eq!(
            pos,
            vec![
                ("a".to_string(), 0, 10),
                ("a".to_string(), 2, 8),
                ("b".to_string(), 0, 1)
            ]
        );
        assert_eq!(t.received.load(Ordering::Relaxed), 4);
    }
}
