//! Output profiles on the Kafka path: each configured profile's topic slots, and the
//! per-stream publisher that runs a stream's audio through every profile and hands the
//! resulting records to the drain like any audio record.
//!
//! ## Topics
//! A mono profile `name` adds `<prefix>.audio.<name>.inbound` and `<prefix>.audio.<name>.outbound`
//! (two slots), a stereo profile adds `<prefix>.audio.<name>.stereo` (one slot), after the default
//! topics and in configuration order. They are created at start-up with the others.
//!
//! ## Cost
//! Without profiles a stream has no [`ProfilePublisher`] and the session's per-chunk hook is one
//! `None` check. With profiles, per chunk and profile: the resampler (`profile` module), then per
//! record one compare-and-swap on the budget, one allocation for the payload copy (as for every
//! audio record), a reference-count increment and one lock-free channel send. No lock, no
//! formatting, no metric looked up by name (handles are resolved once per process).
//!
//! ## Accounting
//! Profile records carry [`FLAG_PROFILE`]: they hold the stream until they are settled (so the
//! terminal event follows them) but do not count as frames in the terminal event's
//! `frames_*` accounting, which stays about the chunks Twilio sent. They are counted in
//! `gateway_profile_records_total{outcome}` (published, delivered, dropped).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::record::{Kind, SpoolRecord, COMPACT_OVERHEAD};
use super::stream::StreamEntry;
use super::{OverflowPolicy, Sink, TopicKind, TopicSpec, Topics};
use crate::profile::{Channel, ChunkIn, Layout, ProfileRecord, ProfileSpec, ProfileStream};
use crate::protocol::Track;

/// Flag: a record of an output profile (see the module docs).
pub const FLAG_PROFILE: u8 = 2;

/// Most profiles one gateway runs (topic slots are a `u8`; each profile costs CPU per chunk).
pub const MAX_PROFILES: usize = 16;

/// One configured profile and the first of its topic slots (mono: inbound, outbound = +1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSlot {
    /// The profile.
    pub spec: ProfileSpec,
    /// Its first topic slot.
    pub first_slot: u8,
}

/// Topic names of `spec` under `prefix`, in slot order.
pub fn profile_topic_names(prefix: &str, spec: &ProfileSpec) -> Vec<String> {
    match spec.layout {
        Layout::Mono => vec![
            format!("{prefix}.audio.{}.inbound", spec.name),
            format!("{prefix}.audio.{}.outbound", spec.name),
        ],
        Layout::Stereo => vec![format!("{prefix}.audio.{}.stereo", spec.name)],
    }
}

impl Topics {
    /// Adds the topics of `profiles` after the existing slots; returns each profile's slots.
    /// At most [`MAX_PROFILES`] (configuration enforces it; extra ones are ignored here).
    pub fn add_profiles(&mut self, prefix: &str, profiles: &[ProfileSpec]) -> Vec<ProfileSlot> {
        let mut slots = Vec::with_capacity(profiles.len());
        for spec in profiles.iter().take(MAX_PROFILES) {
            let first_slot = self.specs.len() as u8;
            let tracks: &[Track] = match spec.layout {
                Layout::Mono => &[Track::Inbound, Track::Outbound],
                Layout::Stereo => &[Track::Inbound],
            };
            for (name, &track) in profile_topic_names(prefix, spec).into_iter().zip(tracks) {
                self.specs.push(TopicSpec {
                    name,
                    kind: TopicKind::Audio {
                        track,
                        encoding: spec.encoding(),
                        sample_rate: spec.rate,
                        channels: spec.channels(),
                        profile: Some(spec.name.clone()),
                        expand_mulaw: false,
                    },
                });
            }
            slots.push(ProfileSlot {
                spec: spec.clone(),
                first_slot,
            });
        }
        slots
    }
}

/// Parses the configured profile list (`--profile`, `GATEWAY_PROFILES` lines, the file's
/// `profile` list): blank items and `#` comments are skipped; every bad spec, a repeated name
/// and more than [`MAX_PROFILES`] profiles are errors (all pushed to `errors`).
pub fn parse_profiles(items: &[String], errors: &mut Vec<String>) -> Vec<ProfileSpec> {
    let mut specs: Vec<ProfileSpec> = Vec::new();
    for item in items.iter().map(|i| i.trim()) {
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        match ProfileSpec::parse(item) {
            Ok(spec) if specs.iter().any(|s| s.name == spec.name) => {
                errors.push(format!(
                    "--profile: profile name {:?} given twice",
                    spec.name
                ));
            }
            Ok(spec) => specs.push(spec),
            Err(e) => errors.push(format!("--profile: {e}")),
        }
    }
    if specs.len() > MAX_PROFILES {
        errors.push(format!(
            "--profile: {} profiles, at most {MAX_PROFILES}",
            specs.len()
        ));
    }
    specs
}

/// The `track` header of a record on an audio topic: `stereo` for two-channel topics.
pub fn track_header(channels: u32, track: Track) -> &'static str {
    if channels == 2 {
        Channel::Stereo.as_str()
    } else {
        track.as_str()
    }
}

/// One chunk as the session hands it to the profiles.
#[derive(Debug, Clone, Copy)]
pub struct ProfileChunk<'a> {
    /// The chunk as the profiles take it (μ-law bytes non-empty).
    pub chunk: ChunkIn<'a>,
    /// Gateway receive time, unix µs.
    pub received_at_us: u64,
}

struct Output {
    stream: ProfileStream,
    first_slot: u8,
}

/// One stream's profiles: a [`ProfileStream`] per configured profile.
pub struct ProfilePublisher {
    outputs: Vec<Output>,
}

impl ProfilePublisher {
    /// The state for a new stream, `None` when no profile is configured.
    pub fn new(slots: &[ProfileSlot]) -> Option<ProfilePublisher> {
        if slots.is_empty() {
            return None;
        }
        let outputs = slots
            .iter()
            .filter_map(|s| {
                // Specs were validated by configuration; a failure here would be a bug, and
                // skipping that profile beats failing the stream.
                let stream = ProfileStream::new(&s.spec).ok()?;
                Some(Output {
                    stream,
                    first_slot: s.first_slot,
                })
            })
            .collect();
        Some(ProfilePublisher { outputs })
    }

    /// Runs one chunk through every profile; publishes the records that became complete.
    pub fn push(&mut self, sink: &Sink, entry: &Arc<StreamEntry>, c: &ProfileChunk<'_>) {
        for o in &mut self.outputs {
            let first_slot = o.first_slot;
            let received = c.received_at_us;
            o.stream.push(c.chunk, &mut |r| {
                emit(sink, entry, first_slot, received, &r)
            });
        }
    }

    /// End of the stream: flushes every profile (before the terminal event is sent).
    pub fn finish(&mut self, sink: &Sink, entry: &Arc<StreamEntry>, at_us: u64) {
        for o in &mut self.outputs {
            let first_slot = o.first_slot;
            o.stream
                .finish(&mut |r| emit(sink, entry, first_slot, at_us, &r));
        }
    }
}

/// Admits one profile record against the budget and hands it to the drain.
fn emit(
    sink: &Sink,
    entry: &Arc<StreamEntry>,
    first_slot: u8,
    received_at_us: u64,
    r: &ProfileRecord<'_>,
) {
    let shared = &sink.shared;
    let m = &shared.metrics;
    let cost = r.payload.len() as u64 + COMPACT_OVERHEAD;
    if !shared
        .budget
        .try_admit(cost, shared.overflow == OverflowPolicy::DropOldest)
    {
        m.profile_records_dropped.inc();
        return;
    }
    let (slot, aux) = match r.channel {
        Channel::Inbound => (first_slot, Track::Inbound.index() as u8),
        Channel::Outbound => (first_slot + 1, Track::Outbound.index() as u8),
        Channel::Stereo => (first_slot, Track::Inbound.index() as u8),
    };
    entry.outstanding.fetch_add(1, Ordering::Relaxed);
    let record = SpoolRecord {
        stream: Some(entry.clone()),
        payload: r.payload.into(),
        seq: r.first_seq,
        timestamp_ms: r.timestamp_ms,
        received_at_us,
        chunk: r.first_chunk.min(u32::MAX as u64) as u32,
        chunks: r.chunks.min(u16::MAX as u32) as u16,
        slot,
        kind: Kind::Audio,
        aux,
        flags: FLAG_PROFILE,
    };
    match sink.send(record) {
        Ok(()) => m.profile_records_published.inc(),
        Err(_) => {
            // The drain thread is gone (shutdown finished): undo and count.
            shared.budget.credit(cost);
            entry.outstanding.fetch_sub(1, Ordering::Relaxed);
            m.profile_records_dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::AudioEncoding;

    #[test]
    fn profile_topics_follow_the_default_slots() {
        let mut topics = Topics::new("tw", AudioEncoding::PcmS16le);
        let specs = [
            ProfileSpec::parse("wb16:rate=16000").unwrap(),
            ProfileSpec::parse("rec:rate=16000,layout=stereo").unwrap(),
            ProfileSpec::parse("hd:rate=48000,format=f32le").unwrap(),
        ];
        let slots = topics.add_profiles("tw", &specs);
        assert_eq!(
            slots.iter().map(|s| s.first_slot).collect::<Vec<_>>(),
            [3, 5, 6]
        );
        assert_eq!(
            topics.names(),
            [
                "tw.events",
                "tw.audio.inbound",
                "tw.audio.outbound",
                "tw.audio.wb16.inbound",
                "tw.audio.wb16.outbound",
                "tw.audio.rec.stereo",
                "tw.audio.hd.inbound",
                "tw.audio.hd.outbound",
            ]
        );
        let Some(TopicKind::Audio {
            encoding,
            sample_rate,
            channels,
            profile,
            expand_mulaw,
            ..
        }) = topics.kind(6)
        else {
            panic!("slot 6 is audio");
        };
        assert_eq!(
            (
                *encoding,
                *sample_rate,
                *channels,
                profile.as_deref(),
                *expand_mulaw
            ),
            ("pcm_f32le", 48000, 1, Some("hd"), false)
        );
        assert_eq!(topics.get(5).map(|t| t.track_label()), Some("stereo"));
        assert_eq!(topics.get(4).map(|t| t.track_label()), Some("outbound"));
    }

    #[test]
    fn profile_lists_report_every_mistake() {
        let items: Vec<String> = [
            "wb16:rate=16000",
            "",
            "# a comment",
            "wb16:rate=24000",
            "bad:rate=44100",
            " rec : layout=stereo ",
        ]
        .map(String::from)
        .to_vec();
        let mut errors = Vec::new();
        let specs = parse_profiles(&items, &mut errors);
        assert_eq!(
            specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            [
                "wb16:rate=16000,format=s16le,layout=mono",
                "rec:rate=16000,format=s16le,layout=stereo"
            ]
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("given twice") && errors[1].contains("44100"));
        let many: Vec<String> = (0..=MAX_PROFILES).map(|i| format!("p{i}")).collect();
        let mut errors = Vec::new();
        parse_profiles(&many, &mut errors);
        assert_eq!(errors.len(), 1);
    }
}
