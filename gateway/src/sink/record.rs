//! The compact form of a record between a connection and librdkafka.
//!
//! A [`SpoolRecord`] is what connections hand to the drain thread and what waits in the spool:
//! the payload plus fixed metadata, 64 bytes in all besides the payload (asserted below). Kafka
//! headers and SIDs are not stored per record: the drain rebuilds headers at produce time from
//! the metadata and the stream's shared [`StreamEntry`]. Default-profile audio is stored as the
//! μ-law bytes Twilio sent (half the size of PCM) and expanded when produced.

use std::sync::Arc;

use super::stream::StreamEntry;
use crate::metrics::EventType;
use crate::protocol::Track;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An audio record (one or more chunks of one track).
    Audio = 0,
    /// An event for the events topic (JSON payload, produced in order with the audio).
    Event = 1,
    /// A stream's terminal event: the payload is [`crate::events::TerminalInfo`] JSON, rendered
    /// into the final event once every audio record of the stream is resolved.
    Terminal = 2,
}

/// Flag: audio the gateway played into the call (published with `source: playback`).
pub const FLAG_PLAYBACK: u8 = 1;

pub use super::profiles::FLAG_PROFILE;

/// One record in the compact form.
#[derive(Debug)]
pub struct SpoolRecord {
    /// The stream (identity, key, accounting); `None` for events without a stream (an
    /// `error` before `start`).
    pub stream: Option<Arc<StreamEntry>>,
    /// The value: μ-law bytes (default-profile audio), profile samples, or JSON.
    pub payload: Box<[u8]>,
    /// `sequenceNumber` of the first chunk (audio).
    pub seq: u64,
    /// `media.timestamp` of the first chunk, ms since the stream started (audio).
    pub timestamp_ms: u64,
    /// Gateway receive time of the first chunk, unix µs.
    pub received_at_us: u64,
    /// `media.chunk` of the first chunk (audio).
    pub chunk: u32,
    /// Chunks in this record (audio).
    pub chunks: u16,
    /// Topic slot (see [`super::Topics`]).
    pub slot: u8,
    /// What the record is.
    pub kind: Kind,
    /// Track index (audio) or [`EventType`] index (events).
    pub aux: u8,
    /// [`FLAG_PLAYBACK`], ...
    pub flags: u8,
}

/// Per-record metadata beyond the payload must stay within 64 bytes (issue contract: a spooled
/// record costs at most payload + 64 bytes of memory).
const _: () = assert!(std::mem::size_of::<SpoolRecord>() <= 64);

/// Fixed charge of a queued record on top of its payload.
pub const COMPACT_OVERHEAD: u64 = 64;

/// Fixed charge of a record inside librdkafka on top of key and value: librdkafka's message
/// struct, the separately allocated headers, the copy in the produce request being built, and
/// allocator slack. Calibrated by measurement: with the broker falling behind, 309,041 queued
/// audio records (354 bytes of key + value each) grew RSS by ~665 MB, ~2.15 KB per record
/// (docs/benchmarks.md), so key + value + 1,792 is what a record really costs there.
pub const RECORD_OVERHEAD: u64 = 1792;

impl SpoolRecord {
    /// Budget charge while queued in the gateway.
    pub fn compact_cost(&self) -> u64 {
        self.payload.len() as u64 + COMPACT_OVERHEAD
    }

    /// The track of an audio record.
    pub fn track(&self) -> Track {
        if self.aux == Track::Outbound.index() as u8 {
            Track::Outbound
        } else {
            Track::Inbound
        }
    }

    /// The event type of an event record.
    pub fn event_type(&self) -> EventType {
        EventType::ALL
            .get(self.aux as usize)
            .copied()
            .unwrap_or(EventType::Status)
    }

    /// A new event record.
    pub fn event(
        stream: Option<Arc<StreamEntry>>,
        kind: EventType,
        json: &[u8],
        at_us: u64,
    ) -> SpoolRecord {
        SpoolRecord {
            stream,
            payload: json.into(),
            seq: 0,
            timestamp_ms: 0,
            received_at_us: at_us,
            chunk: 0,
            chunks: 0,
            slot: super::EVENTS_SLOT,
            kind: Kind::Event,
            aux: kind.index() as u8,
            flags: 0,
        }
    }
}

/// Budget charge of a record inside librdkafka (plus the compact copy the drain keeps until the
/// delivery report, so a rebuilt producer can send it again).
pub fn window_cost(key_len: usize, value_len: usize, compact: u64) -> u64 {
    (key_len + value_len) as u64 + RECORD_OVERHEAD + compact
}
