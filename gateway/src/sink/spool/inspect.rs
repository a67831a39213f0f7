//! `gateway spool-inspect DIR`: what a spool directory holds, record by record, without
//! changing it.
//!
//! For operators (what would a restart replay?) and for the crash tests, which list what
//! reached the disk before a `kill -9` and then check that all of it reaches Kafka. Reads
//! every `seg-*.spool` file in id order (the order a restart replays them) with the same
//! decoder the gateway uses, from its cursor if a clean shutdown left one; a damaged segment
//! is reported with the reason and the records before the damage. Takes no lock: run it on a stopped gateway's directory, or accept that
//! a live gateway may be appending or deleting while it reads.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::disk::{cursor_name, parse_cursor_name, parse_segment_name, read_cursor};
use super::segment::{self, Frame, Frames};
use crate::metrics::EventType;
use crate::protocol::message::Track;
use crate::sink::record::Kind;

/// One segment file.
#[derive(Debug, Serialize)]
pub struct SegmentReport {
    /// File name.
    pub file: String,
    /// Segment id (from the name).
    pub id: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Records decoded.
    pub records: u64,
    /// Why decoding stopped early, if it did.
    pub corrupt: Option<String>,
    /// A clean shutdown's cursor: records before this offset are not replayed (not listed).
    pub resume_at: Option<u64>,
}

/// One spooled record.
#[derive(Debug, Serialize)]
pub struct RecordReport {
    /// Segment id it is in.
    pub segment: u64,
    /// `audio`, `event` or `terminal`.
    pub kind: &'static str,
    /// The record's topic, from the segment's table.
    pub topic: Option<String>,
    /// Its stream's SID (None for records without a stream).
    pub stream_sid: Option<String>,
    /// `inbound`/`outbound` for audio, the event type otherwise.
    pub what: &'static str,
    /// First chunk's sequence number.
    pub seq: u64,
    /// First chunk number.
    pub chunk: u32,
    /// Chunks in the record.
    pub chunks: u16,
    /// Media timestamp of its first chunk, ms.
    pub timestamp_ms: u64,
    /// Payload length.
    pub payload_bytes: usize,
}

/// Everything found.
#[derive(Debug, Serialize, Default)]
pub struct Inspection {
    /// Segments in replay order.
    pub segments: Vec<SegmentReport>,
    /// Records in replay order.
    pub records: Vec<RecordReport>,
    /// Files that are neither segments nor the lock (ignored by the gateway).
    pub other_files: Vec<String>,
}

/// Reads `dir`.
pub fn inspect(dir: &Path) -> std::io::Result<Inspection> {
    let mut out = Inspection::default();
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        match parse_segment_name(&name).filter(|id| *id >= super::disk::MIN_ID) {
            Some(id) => ids.push((id, name)),
            None if name == "LOCK" || parse_cursor_name(&name).is_some() => {}
            None => out.other_files.push(name),
        }
    }
    ids.sort();
    out.other_files.sort();
    for (id, file) in ids {
        let bytes = match std::fs::read(dir.join(&file)) {
            Ok(b) => b,
            // Deleted by a live gateway since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut rep = SegmentReport {
            file,
            id,
            bytes: bytes.len() as u64,
            records: 0,
            corrupt: None,
            // As the gateway applies it: within the segment, past its header.
            resume_at: read_cursor(&dir.join(cursor_name(id)))
                .filter(|at| *at >= segment::HEADER_LEN as u64 && *at <= bytes.len() as u64),
        };
        if let Err(c) = segment::decode_header(&bytes) {
            rep.corrupt = Some(c.label().to_owned());
            out.segments.push(rep);
            continue;
        }
        let mut topics: HashMap<u8, String> = HashMap::new();
        let mut sids: HashMap<u64, String> = HashMap::new();
        let skip_to = rep.resume_at.unwrap_or(0) as usize;
        let mut frames = Frames::new(&bytes, segment::HEADER_LEN);
        loop {
            let start = frames.offset();
            let Some(f) = frames.next() else { break };
            match f {
                Ok(Frame::Record { .. }) if start < skip_to => {}
                Err(c) => {
                    rep.corrupt = Some(c.label().to_owned());
                    break;
                }
                Ok(Frame::Topics(t)) => {
                    topics.extend(t.into_iter().map(|(s, n)| (s, n.to_owned())));
                }
                Ok(Frame::Stream { number, sids: s }) => {
                    sids.insert(number, s[0].to_owned());
                }
                Ok(Frame::Counters(_)) => {}
                Ok(Frame::Record { meta, payload }) => {
                    rep.records += 1;
                    let (kind, what) = describe(meta.kind, meta.aux);
                    out.records.push(RecordReport {
                        segment: id,
                        kind,
                        topic: topics.get(&meta.slot).cloned(),
                        stream_sid: sids.get(&meta.stream).cloned(),
                        what,
                        seq: meta.seq,
                        chunk: meta.chunk,
                        chunks: meta.chunks,
                        timestamp_ms: meta.timestamp_ms,
                        payload_bytes: payload.len(),
                    });
                }
            }
        }
        out.segments.push(rep);
    }
    Ok(out)
}

fn describe(kind: u8, aux: u8) -> (&'static str, &'static str) {
    let event = || {
        EventType::ALL
            .get(aux as usize)
            .map_or("unknown", |e| e.as_str())
    };
    match kind {
        k if k == Kind::Audio as u8 => (
            "audio",
            if aux as usize == Track::Outbound.index() {
                "outbound"
            } else {
                "inbound"
            },
        ),
        k if k == Kind::Event as u8 => ("event", event()),
        k if k == Kind::Terminal as u8 => ("terminal", event()),
        _ => ("unknown", "unknown"),
    }
}
