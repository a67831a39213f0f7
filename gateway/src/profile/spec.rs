//! What a profile is: its name, output rate, sample format and channel layout, and the text
//! form an operator writes (`wb16:rate=16000,format=s16le,layout=mono`).
//!
//! Parsing is strict — an unknown key, a repeated key, an unsupported rate or an empty item is
//! an error naming the offending text — because a typo in a profile would otherwise publish
//! audio of a shape nobody asked for under a topic consumers trust. Whitespace around items is
//! tolerated so that specs read naturally in a TOML list.

use std::fmt;

use dsp::resample::OUTPUT_RATES_HZ;

/// Output rate when the spec does not say.
pub const DEFAULT_RATE_HZ: u32 = 16_000;

/// Longest profile name: it becomes part of topic names and the `profile` header.
pub const MAX_NAME_LEN: usize = 32;

/// How samples are written into a record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleFormat {
    /// Signed 16-bit little-endian, rounded to nearest (ties to even) and saturated.
    S16le,
    /// IEEE-754 binary32 little-endian, full scale ±1.0 (the resampler's output unchanged).
    F32le,
}

impl SampleFormat {
    /// The spelling in a spec (`s16le`, `f32le`).
    pub fn as_str(self) -> &'static str {
        match self {
            SampleFormat::S16le => "s16le",
            SampleFormat::F32le => "f32le",
        }
    }

    /// The `encoding` header value, in the same vocabulary as the default topics
    /// (`pcm_s16le`, `pcm_f32le`).
    pub fn encoding(self) -> &'static str {
        match self {
            SampleFormat::S16le => "pcm_s16le",
            SampleFormat::F32le => "pcm_f32le",
        }
    }

    /// Bytes per sample of one channel.
    pub fn bytes_per_sample(self) -> usize {
        match self {
            SampleFormat::S16le => 2,
            SampleFormat::F32le => 4,
        }
    }
}

/// Whether the tracks stay apart or are interleaved into one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// One output per track: records of the inbound and of the outbound track, 1 channel.
    Mono,
    /// One output per call: frames `L R L R …` with inbound left and outbound right.
    Stereo,
}

impl Layout {
    /// The spelling in a spec (`mono`, `stereo`).
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Mono => "mono",
            Layout::Stereo => "stereo",
        }
    }

    /// The `channels` header value.
    pub fn channels(self) -> u32 {
        match self {
            Layout::Mono => 1,
            Layout::Stereo => 2,
        }
    }
}

/// One output profile. Build it with [`ProfileSpec::parse`]; its [`Display`](fmt::Display)
/// form is the canonical spec and parses back to the same value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProfileSpec {
    /// `[a-z0-9_-]{1,32}`: goes into topic names and the `profile` header.
    pub name: String,
    /// Output sample rate in Hz: one of 8000, 16000, 24000, 48000.
    pub rate: u32,
    /// Sample format of the payload.
    pub format: SampleFormat,
    /// Mono (per track) or stereo (per call).
    pub layout: Layout,
}

impl ProfileSpec {
    /// Parses `name[:key=value,...]` with keys `rate` (8000 | 16000 | 24000 | 48000, default
    /// 16000), `format` (`s16le` | `f32le`, default `s16le`) and `layout` (`mono` | `stereo`,
    /// default `mono`). The error names what is wrong and where.
    pub fn parse(s: &str) -> Result<ProfileSpec, String> {
        let s = s.trim();
        let (name, options) = match s.split_once(':') {
            Some((name, options)) => (name.trim(), Some(options)),
            None => (s, None),
        };
        validate_name(name)?;
        let mut spec = ProfileSpec {
            name: name.to_owned(),
            rate: DEFAULT_RATE_HZ,
            format: SampleFormat::S16le,
            layout: Layout::Mono,
        };
        let Some(options) = options else {
            return Ok(spec);
        };
        // Each key at most once: a spec saying `rate=16000,…,rate=8000` is a mistake, not an
        // override.
        let mut seen = [false; 3];
        for item in options.split(',') {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!(
                    "profile {name}: expected key=value, got {item:?} (keys: rate, format, layout)"
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                "rate" => {
                    spec.rate = parse_rate(value)
                        .ok_or_else(|| format!("profile {name}: unsupported rate {value:?} (supported: 8000, 16000, 24000, 48000)"))?;
                    0
                }
                "format" => {
                    spec.format = match value {
                        "s16le" => SampleFormat::S16le,
                        "f32le" => SampleFormat::F32le,
                        _ => {
                            return Err(format!(
                                "profile {name}: unknown format {value:?} (s16le or f32le)"
                            ))
                        }
                    };
                    1
                }
                "layout" => {
                    spec.layout = match value {
                        "mono" => Layout::Mono,
                        "stereo" => Layout::Stereo,
                        _ => {
                            return Err(format!(
                                "profile {name}: unknown layout {value:?} (mono or stereo)"
                            ))
                        }
                    };
                    2
                }
                _ => {
                    return Err(format!(
                        "profile {name}: unknown key {key:?} (keys: rate, format, layout)"
                    ))
                }
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(format!("profile {name}: {key} given twice"));
            }
        }
        Ok(spec)
    }

    /// Checks a spec built by hand (the fields are public): the same rules as
    /// [`parse`](Self::parse).
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        if !OUTPUT_RATES_HZ.contains(&self.rate) {
            return Err(format!(
                "profile {}: unsupported rate {} (supported: 8000, 16000, 24000, 48000)",
                self.name, self.rate
            ));
        }
        Ok(())
    }

    /// The `encoding` header of this profile's records.
    pub fn encoding(&self) -> &'static str {
        self.format.encoding()
    }

    /// The `channels` header of this profile's records.
    pub fn channels(&self) -> u32 {
        self.layout.channels()
    }

    /// Payload bytes of one 20 ms chunk of audio (160 input samples) in this profile: what a
    /// mono record of a standard chunk or a stereo record holds.
    pub fn bytes_per_chunk(&self) -> usize {
        160 * (self.rate / 8000) as usize
            * self.format.bytes_per_sample()
            * self.channels() as usize
    }
}

impl fmt::Display for ProfileSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:rate={},format={},layout={}",
            self.name,
            self.rate,
            self.format.as_str(),
            self.layout.as_str()
        )
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok_len = (1..=MAX_NAME_LEN).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "profile name {name:?} must be 1-{MAX_NAME_LEN} characters of a-z, 0-9, _ and -"
        ))
    }
}

fn parse_rate(value: &str) -> Option<u32> {
    // `str::parse` would accept `+16000`; only plain decimal digits are a rate here.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rate: u32 = value.parse().ok()?;
    OUTPUT_RATES_HZ.contains(&rate).then_some(rate)
}
