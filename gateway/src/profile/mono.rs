//! Mono layout: one output per track, one record per input chunk.
//!
//! Record `k` of a track holds exactly `L ×` the samples of chunk `k`, placed at the chunk's
//! own timestamp. The upsampler needs ~2 ms of look-ahead (`D` output samples), so chunk `k`'s
//! output is complete only once the next chunk of the run has been processed (or the run was
//! flushed): records leave **one chunk late** (20 ms at Twilio's pace), except at 8 kHz, where
//! the pass-through has no look-ahead and every record leaves with its own chunk. A chunk that
//! does not continue the run flushes it first, so the run's last record completes with
//! silence as look-ahead and nothing is smeared across the gap.

use super::spec::SampleFormat;
use super::track::{input_position, ChunkInfo, TrackRun, CHUNK_SAMPLES};
use super::{encode_into, Channel, ChunkIn, ProfileRecord};

/// Per-track resamplers and the samples not yet handed over.
#[derive(Debug)]
pub(super) struct Mono {
    format: SampleFormat,
    tracks: [TrackRun; 2],
    /// Per track: output samples not yet emitted; `samples[t][0]` is the first sample of
    /// `tracks[t].front()`. Holds at most the chunks waiting for look-ahead plus the current
    /// one (with 160-sample chunks: two chunks' worth); grows only for larger payloads.
    samples: [Vec<f32>; 2],
    /// Payload of the record being emitted (reused).
    bytes: Vec<u8>,
}

impl Mono {
    pub fn new(rate: u32, format: SampleFormat) -> Result<Self, String> {
        let make = || TrackRun::new(rate).map_err(|e| e.to_string());
        let tracks = [make()?, make()?];
        let per_chunk = CHUNK_SAMPLES * tracks[0].factor() as usize;
        Ok(Mono {
            format,
            tracks,
            // Two chunks plus the look-ahead: steady streaming never grows these.
            samples: [
                Vec::with_capacity(2 * per_chunk + 96),
                Vec::with_capacity(2 * per_chunk + 96),
            ],
            bytes: Vec::with_capacity(per_chunk * format.bytes_per_sample()),
        })
    }

    /// See [`super::ProfileStream::push`].
    pub fn push(&mut self, c: ChunkIn<'_>, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        let ChunkIn {
            track,
            ulaw,
            timestamp_ms,
            seq,
            chunk,
            contiguous,
        } = c;
        // The index is checked once here; everything below indexes with it.
        if track >= self.tracks.len() || ulaw.is_empty() {
            return;
        }
        let input_pos = input_position(timestamp_ms);
        let continues = self.tracks[track].continues(input_pos, contiguous);
        if !continues {
            if self.tracks[track].is_open() {
                self.tracks[track].flush(&mut self.samples[track]);
                self.emit(track, u64::MAX, out);
            }
            self.tracks[track].open_at(input_pos);
        }
        let info = ChunkInfo {
            timestamp_ms,
            seq,
            chunk,
        };
        let run = &mut self.tracks[track];
        run.process(ulaw, info, continues, &mut self.samples[track]);
        let complete = run.produced_end();
        self.emit(track, complete, out);
    }

    /// See [`super::ProfileStream::finish`].
    pub fn finish(&mut self, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        for track in 0..self.tracks.len() {
            self.tracks[track].flush(&mut self.samples[track]);
            self.emit(track, u64::MAX, out);
            self.tracks[track].reset();
            self.samples[track].clear();
        }
    }

    /// Emits, in order, every waiting chunk of `track` whose output ends at or before
    /// `complete` (an output position; `u64::MAX` after a flush, when all are complete).
    fn emit(&mut self, track: usize, complete: u64, out: &mut dyn FnMut(ProfileRecord<'_>)) {
        let run = &mut self.tracks[track];
        let samples = &mut self.samples[track];
        let channel = if track == 0 {
            Channel::Inbound
        } else {
            Channel::Outbound
        };
        while let Some(&placed) = run.front() {
            if placed.end > complete {
                break;
            }
            // A chunk's output is exactly `end − start` samples (L × its input samples), all
            // produced by now, and the buffer always starts at the front chunk's first sample.
            let n = ((placed.end - placed.start) as usize).min(samples.len());
            self.bytes.clear();
            encode_into(self.format, &samples[..n], &mut self.bytes);
            out(ProfileRecord {
                channel,
                timestamp_ms: placed.info.timestamp_ms,
                chunks: 1,
                first_seq: placed.info.seq,
                first_chunk: placed.info.chunk,
                contiguous: placed.continues,
                payload: &self.bytes,
            });
            samples.drain(..n);
            run.pop_front();
        }
    }
}
