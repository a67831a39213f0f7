//! Output profiles: per-stream audio shaping into records of another rate, sample format and
//! channel layout, published to a profile's own topics.
//!
//! A [`ProfileSpec`] (`wb16:rate=16000,format=s16le,layout=mono`) picks
//! * a sample rate — 8000, 16000, 24000 or 48000 Hz, through [`dsp::Upsampler`] (a
//!   delay-compensated polyphase filter; 8000 Hz is an exact pass-through);
//! * a sample format — `s16le` (rounded, saturated: [`dsp::pcm::f32_to_s16le_into`]) or `f32le`
//!   (the filter's output unchanged, full scale ±1.0);
//! * a layout — `mono`: one record per input chunk per track; `stereo`: one record per 20 ms of
//!   the call, inbound left and outbound right, interleaved, aligned on Twilio's timestamps.
//!
//! A [`ProfileStream`] holds one stream's state for one profile; the session feeds it every
//! non-empty chunk with [`ProfileStream::push`] and ends it with [`ProfileStream::finish`].
//! Records come out through a callback with the payload borrowed from an internal buffer, so
//! steady streaming allocates nothing (buffers are sized at construction and reused; measured
//! with a counting allocator in `tests/profile_quality.rs`).
//!
//! # Contract
//!
//! * **Exact counts and placement.** A chunk of `n` μ-law bytes becomes exactly `n·L` samples
//!   per channel (`L` = rate / 8000): a 20 ms chunk at 16 kHz is 320 samples, whatever the
//!   filter's latency. A record's first sample belongs at its `timestamp_ms` on the stream
//!   timeline; its samples are contiguous from there.
//! * **Continuity.** Resampler state is per stream and track and runs across chunks: the
//!   output of a contiguous run is bit-identical to resampling its audio in one go (no clicks
//!   at chunk edges), and does not depend on how the audio was cut into payloads. At a chunk
//!   that does not continue its track (`contiguous == false`, or its timestamp is not where the
//!   previous chunk ended), the track's resampler is flushed — the previous chunk completes
//!   with silence as look-ahead — and restarted, so nothing is smeared across a gap.
//! * **Latency.** The filter needs ~2 ms of look-ahead, so a chunk's output is complete only
//!   when the next chunk of its track arrives: mono records leave one chunk late (none at
//!   8 kHz), stereo spans when both tracks have passed them or one track is more than the lag
//!   bound (200 ms by default) ahead. `finish` emits everything pending.
//! * **Headers.** `sample_rate` = [`ProfileSpec::rate`], `encoding` = [`ProfileSpec::encoding`]
//!   (`pcm_s16le` | `pcm_f32le`), `channels` = [`ProfileSpec::channels`] (1 mono, 2 stereo),
//!   `track` = [`Channel::as_str`]; `seq`/`chunk`/`timestamp_ms`/`chunks` from the record.
//!
//! Layout-specific rules: [`mono`] and [`stereo`]. This module uses only `std` and `dsp`:
//! plain values in, plain values out, so it can be tested and benchmarked on its own.

mod mono;
mod spec;
mod stereo;
mod track;

pub use spec::{Layout, ProfileSpec, SampleFormat, DEFAULT_RATE_HZ, MAX_NAME_LEN};
pub use stereo::{DEFAULT_MAX_LAG_MS, MAX_LAG_LIMIT_MS};

use mono::Mono;
use stereo::Stereo;

/// Which output a record belongs to (selects the topic of the profile's topic set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Mono record of the inbound track.
    Inbound,
    /// Mono record of the outbound track.
    Outbound,
    /// Stereo record of the call (inbound left, outbound right).
    Stereo,
}

impl Channel {
    /// `inbound`, `outbound` or `stereo` (topic suffix, `track` header).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Inbound => "inbound",
            Channel::Outbound => "outbound",
            Channel::Stereo => "stereo",
        }
    }
}

/// One record of a profile. The payload is borrowed from the stream's reused buffer: copy it
/// (or hand it to the producer, which copies) before the callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileRecord<'a> {
    /// Inbound, outbound (mono) or stereo.
    pub channel: Channel,
    /// Where the first sample belongs on the stream timeline (ms since stream start): the
    /// chunk's Twilio timestamp (mono) or the span's start on the 20 ms grid (stereo).
    pub timestamp_ms: u64,
    /// Twilio chunks the record covers: always 1 (mono: one record per chunk, whatever its
    /// length; stereo: one 20 ms span).
    pub chunks: u32,
    /// `sequenceNumber` of the chunk (mono); stereo: of the inbound chunk that supplied the
    /// span's earliest inbound sample — the chunk at the span start when inbound covers it —
    /// or, when inbound has nothing in the span, of the outbound one.
    pub first_seq: u64,
    /// `media.chunk` of the same chunk as [`first_seq`](Self::first_seq).
    pub first_chunk: u64,
    /// True when the record's first sample directly follows the previous record of the same
    /// channel (same run, no gap): records can be concatenated while this holds.
    pub contiguous: bool,
    /// Samples: mono `n·L` samples; stereo `160·L` frames `L R`; each sample 2 bytes (`s16le`)
    /// or 4 (`f32le`), little-endian.
    pub payload: &'a [u8],
}

/// One Twilio chunk as a profile takes it.
#[derive(Debug, Clone, Copy)]
pub struct ChunkIn<'a> {
    /// 0 = inbound, 1 = outbound.
    pub track: usize,
    /// The μ-law bytes.
    pub ulaw: &'a [u8],
    /// Twilio `timestamp`, ms.
    pub timestamp_ms: u64,
    /// `sequenceNumber`.
    pub seq: u64,
    /// `chunk`.
    pub chunk: u64,
    /// The session's judgement that the chunk starts exactly where the previous chunk of its
    /// track ended.
    pub contiguous: bool,
}

/// One stream's state for one profile: a resampler per track (mono) or the stereo assembler.
#[derive(Debug)]
pub struct ProfileStream {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Mono(Mono),
    Stereo(Stereo),
}

impl ProfileStream {
    /// The state for a new stream under `spec`. Errors only for a spec that
    /// [`ProfileSpec::validate`] rejects (specs from [`ProfileSpec::parse`] never fail).
    pub fn new(spec: &ProfileSpec) -> Result<Self, String> {
        Self::with_max_lag(spec, DEFAULT_MAX_LAG_MS)
    }

    /// Like [`new`](Self::new) with another stereo lag bound (ms; clamped to
    /// [`MAX_LAG_LIMIT_MS`]; ignored by mono profiles).
    pub fn with_max_lag(spec: &ProfileSpec, max_lag_ms: u32) -> Result<Self, String> {
        spec.validate()?;
        let inner = match spec.layout {
            Layout::Mono => Inner::Mono(Mono::new(spec.rate, spec.format)?),
            Layout::Stereo => Inner::Stereo(Stereo::new(spec.rate, spec.format, max_lag_ms)?),
        };
        Ok(ProfileStream { inner })
    }

    /// One chunk (see [`ChunkIn`]; other tracks and empty payloads are ignored). When it does
    /// not continue its track (`contiguous` false, or the timestamps say otherwise) the track's
    /// resampler is flushed and restarted. Every record that became complete is passed to
    /// `out`, in order per channel.
    pub fn push(&mut self, c: ChunkIn<'_>, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        match &mut self.inner {
            Inner::Mono(m) => m.push(c, out),
            Inner::Stereo(s) => s.push(c, out),
        }
    }

    /// End of stream: flushes every resampler and the stereo assembler (silence-padded) and
    /// passes the remaining records to `out`. The state is then as new (a later `push` starts
    /// another stream).
    pub fn finish(&mut self, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        match &mut self.inner {
            Inner::Mono(m) => m.finish(out),
            Inner::Stereo(s) => s.finish(out),
        }
    }

    /// Output samples (per channel) a stereo profile dropped because they arrived for a span
    /// already emitted (a track more than the lag bound late) or for a position its track had
    /// already filled (duplicates, steps back). Always 0 for mono. Since construction.
    pub fn dropped_samples(&self) -> u64 {
        match &self.inner {
            Inner::Mono(_) => 0,
            Inner::Stereo(s) => s.dropped_samples(),
        }
    }
}

/// Appends `samples` to `out` in `format`.
fn encode_into(format: SampleFormat, samples: &[f32], out: &mut Vec<u8>) {
    match format {
        SampleFormat::S16le => dsp::pcm::f32_to_s16le_into(samples, out),
        SampleFormat::F32le => dsp::pcm::f32_to_f32le_into(samples, out),
    }
}
