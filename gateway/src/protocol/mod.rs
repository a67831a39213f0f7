//! The Twilio Media Streams wire protocol, pure and free of I/O.
//!
//! - [`message`]: parse one inbound JSON text frame in place (simd-json tape, borrowed strings)
//!   into a typed [`Message`]; no allocation for `media`, `dtmf`, `mark`, `stop`.
//! - [`audio`]: base64 payload → μ-law bytes → PCM s16le, straight into caller-owned buffers.
//!
//! Everything here is fuzzable and benchable on its own (see `fuzz/` and `bench/`).

pub mod audio;
pub mod message;

pub use message::{parse, Message, ParseError, Track};
