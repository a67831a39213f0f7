//! One record of the playback topic, decoded into what to do with the stream (pure).
//!
//! Contract (README, "Playback"): key = streamSid; headers `type` (`media` when absent |
//! `mark` | `clear` | `stop`), `encoding` (`pcm_s16le` when absent | `mulaw`), `sample_rate`
//! (`8000` when absent; nothing else until the gateway can resample), `name` (marks); value =
//! the audio for `media`, empty otherwise. Anything else is refused with a [`Refusal`] that
//! becomes the `reason` label of `gateway_playback_dropped_total`.

use crate::metrics::PlaybackDrop;

/// What a playback record asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Play this μ-law audio (PCM records are encoded on the way in).
    Media(Vec<u8>),
    /// Send a mark after the audio before it.
    Mark(String),
    /// Discard what is buffered (here and at Twilio).
    Clear,
    /// End the stream (close 1000).
    Stop,
}

/// Why a record was refused.
pub type Refusal = PlaybackDrop;

/// Longest mark name accepted (Twilio echoes it back in a JSON message).
pub const MAX_MARK_NAME: usize = 256;

/// The headers that matter, borrowed from the record.
#[derive(Debug, Default, Clone, Copy)]
pub struct Headers<'a> {
    /// `type`.
    pub kind: Option<&'a [u8]>,
    /// `encoding`.
    pub encoding: Option<&'a [u8]>,
    /// `sample_rate`.
    pub sample_rate: Option<&'a [u8]>,
    /// `name`.
    pub name: Option<&'a [u8]>,
}

/// Decodes one record; PCM is G.711-encoded into `scratch`'s replacement vector.
pub fn decode(headers: &Headers<'_>, value: &[u8]) -> Result<Command, Refusal> {
    let kind = headers.kind.unwrap_or(b"media");
    match kind {
        b"media" => media(headers, value),
        b"mark" => {
            let name = headers.name.ok_or(PlaybackDrop::BadHeader)?;
            let name = std::str::from_utf8(name).map_err(|_| PlaybackDrop::BadHeader)?;
            if name.is_empty() || name.len() > MAX_MARK_NAME {
                return Err(PlaybackDrop::BadHeader);
            }
            Ok(Command::Mark(name.to_owned()))
        }
        b"clear" => Ok(Command::Clear),
        b"stop" => Ok(Command::Stop),
        _ => Err(PlaybackDrop::UnknownType),
    }
}

fn media(headers: &Headers<'_>, value: &[u8]) -> Result<Command, Refusal> {
    match headers.sample_rate {
        None | Some(b"8000") => {}
        Some(_) => return Err(PlaybackDrop::UnsupportedSampleRate),
    }
    if value.is_empty() {
        return Err(PlaybackDrop::EmptyMedia);
    }
    match headers.encoding.unwrap_or(b"pcm_s16le") {
        b"pcm_s16le" => {
            if !value.len().is_multiple_of(2) {
                return Err(PlaybackDrop::OddPcmLength);
            }
            let mut ulaw = Vec::with_capacity(value.len() / 2);
            dsp::g711::encode_pcm16le_into(value, &mut ulaw);
            Ok(Command::Media(ulaw))
        }
        b"mulaw" => Ok(Command::Media(value.to_vec())),
        _ => Err(PlaybackDrop::UnsupportedEncoding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(
        kind: Option<&'a str>,
        enc: Option<&'a str>,
        rate: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Headers<'a> {
        Headers {
            kind: kind.map(str::as_bytes),
            encoding: enc.map(str::as_bytes),
            sample_rate: rate.map(str::as_bytes),
            name: name.map(str::as_bytes),
        }
    }

    #[test]
    fn defaults_are_pcm_media_at_8khz() {
        let pcm: Vec<u8> = [0i16, 1000, -1000, 32767]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let want: Vec<u8> = [0i16, 1000, -1000, 32767]
            .iter()
            .map(|&s| dsp::g711::encode(s))
            .collect();
        assert_eq!(
            decode(&h(None, None, None, None), &pcm),
            Ok(Command::Media(want))
        );
        assert_eq!(
            decode(
                &h(Some("media"), Some("mulaw"), Some("8000"), None),
                &[1, 2, 3]
            ),
            Ok(Command::Media(vec![1, 2, 3]))
        );
    }

    #[test]
    fn control_records() {
        assert_eq!(
            decode(&h(Some("mark"), None, None, Some("greeting")), b""),
            Ok(Command::Mark("greeting".into()))
        );
        assert_eq!(
            decode(&h(Some("clear"), None, None, None), b""),
            Ok(Command::Clear)
        );
        assert_eq!(
            decode(&h(Some("stop"), None, None, None), b""),
            Ok(Command::Stop)
        );
    }

    #[test]
    fn malformed_records_are_refused_with_a_reason() {
        use PlaybackDrop::*;
        let cases = [
            (
                h(Some("media"), None, None, None),
                &[1u8, 2, 3][..],
                OddPcmLength,
            ),
            (
                h(None, None, Some("16000"), None),
                &[0, 0][..],
                UnsupportedSampleRate,
            ),
            (
                h(None, Some("opus"), None, None),
                &[0, 0][..],
                UnsupportedEncoding,
            ),
            (h(Some("play"), None, None, None), &[][..], UnknownType),
            (h(Some("mark"), None, None, None), &[][..], BadHeader),
            (h(Some("mark"), None, None, Some("")), &[][..], BadHeader),
            (h(None, None, None, None), &[][..], EmptyMedia),
        ];
        for (headers, value, want) in cases {
            assert_eq!(decode(&headers, value), Err(want), "{headers:?}");
        }
        let long = "x".repeat(MAX_MARK_NAME + 1);
        assert_eq!(
            decode(&h(Some("mark"), None, None, Some(&long)), b""),
            Err(BadHeader)
        );
    }
}
