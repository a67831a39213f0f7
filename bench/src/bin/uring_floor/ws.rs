//! The least of RFC 6455 a read-and-discard server needs, shared by both backends: answer the
//! HTTP/1.1 upgrade (`Sec-WebSocket-Accept` = base64(SHA-1(key + GUID))), then find frame
//! boundaries in the byte stream and skip payloads without unmasking or copying them. A close
//! frame is answered with close 1000; a framing violation with close 1002.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 §1.3.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest frame payload accepted (the `floor` server's `max_message_size`).
pub const MAX_PAYLOAD: u64 = 64 * 1024;
/// Largest HTTP request accepted before the upgrade.
const MAX_REQUEST: usize = 8 * 1024;
/// An unmasked server close frame with status 1000.
const CLOSE_NORMAL: [u8; 4] = [0x88, 0x02, 0x03, 0xe8];
/// An unmasked server close frame with status 1002 (protocol error).
const CLOSE_PROTOCOL: [u8; 4] = [0x88, 0x02, 0x03, 0xea];
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64_simd::STANDARD.encode_to_string(h.finalize())
}

/// What a (partial) HTTP request amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// The header block has not ended yet.
    Incomplete,
    /// A usable upgrade: the 101 response, and how many bytes the request took.
    Upgrade { response: Vec<u8>, consumed: usize },
    /// Not a WebSocket upgrade we can answer.
    Bad,
}

/// Parses the request head in `buf` (any path is accepted; only the key is required).
pub fn parse_request(buf: &[u8]) -> Request {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Request::Incomplete;
    };
    let head = &buf[..end];
    let mut lines = head.split(|&b| b == b'\n');
    if !lines.next().is_some_and(|l| l.starts_with(b"GET ")) {
        return Request::Bad;
    }
    let mut key = None;
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"sec-websocket-key") {
            key = Some(line[colon + 1..].trim_ascii());
        }
    }
    match key {
        Some(k) if !k.is_empty() => {
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(k)
            );
            Request::Upgrade {
                response: response.into_bytes(),
                consumed: end + 4,
            }
        }
        _ => Request::Bad,
    }
}

/// What one [`FrameReader::feed`] call found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Feed {
    /// Text frames whose header was read.
    pub texts: u64,
    /// A close frame arrived (nothing after it is read).
    pub close: bool,
    /// A framing violation (nothing after it is read).
    pub error: bool,
}

/// Finds frame boundaries in a client byte stream: collects each header (2–14 bytes), then
/// skips the payload. State survives across reads, so frames may be split anywhere.
#[derive(Debug)]
pub struct FrameReader {
    hdr: [u8; 14],
    have: usize,
    need: usize,
    skip: u64,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            hdr: [0; 14],
            have: 0,
            need: 2,
            skip: 0,
        }
    }
}

impl FrameReader {
    /// Consumes `data`, adding what it found to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Feed) {
        while !data.is_empty() && !out.close && !out.error {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let take = (self.need - self.have).min(data.len());
            self.hdr[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have < self.need {
                return;
            }
            if self.need == 2 {
                let ext = match self.hdr[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.hdr[1] & 0x80 != 0 { 4 } else { 0 };
                if ext + mask > 0 {
                    self.need = 2 + ext + mask;
                    continue;
                }
            }
            self.header_done(out);
        }
    }

    fn header_done(&mut self, out: &mut Feed) {
        let (b0, b1) = (self.hdr[0], self.hdr[1]);
        let len = match b1 & 0x7f {
            126 => u16::from_be_bytes([self.hdr[2], self.hdr[3]]) as u64,
            127 => u64::from_be_bytes(self.hdr[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        };
        self.have = 0;
        self.need = 2;
        // Clients must mask; no extension is negotiated, so RSV bits must be clear.
        if b1 & 0x80 == 0 || b0 & 0x70 != 0 || len > MAX_PAYLOAD {
            out.error = true;
            return;
        }
        match b0 & 0x0f {
            0x1 => out.texts += 1,
            0x8 => out.close = true,
            0x0 | 0x2 | 0x9 | 0xa => {}
            _ => out.error = true,
        }
        self.skip = len;
    }
}

/// Per-thread counters (only this thread writes them; the main thread reads them at exit).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Text frames read.
    pub frames: AtomicU64,
    /// Reads that returned data (`recv` calls or receive completions).
    pub reads: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        // Single writer: a relaxed load + store, no locked instruction.
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
    /// Counts one accepted connection.
    pub fn connection(&self) {
        Self::add(&self.connections, 1);
    }
    /// Counts one read that returned data.
    pub fn read(&self) {
        Self::add(&self.reads, 1);
    }
}

/// What the backend must do with the socket after [`Conn::on_data`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep reading.
    Open,
    /// We answered a close (or refused the request): shut the socket down.
    Close,
}

enum Phase {
    Http(Vec<u8>),
    Ws(FrameReader),
}

/// One connection's protocol state.
pub struct Conn {
    phase: Phase,
}

impl Default for Conn {
    fn default() -> Self {
        Conn {
            phase: Phase::Http(Vec::new()),
        }
    }
}

impl Conn {
    /// Feeds bytes read from `fd`; writes the 101 or the close reply to `fd` itself.
    pub fn on_data(&mut self, fd: RawFd, data: &[u8], stats: &Stats) -> Outcome {
        match &mut self.phase {
            Phase::Http(buf) => {
                buf.extend_from_slice(data);
                match parse_request(buf) {
                    Request::Incomplete if buf.len() <= MAX_REQUEST => Outcome::Open,
                    Request::Incomplete | Request::Bad => {
                        send_all(fd, BAD_REQUEST);
                        Outcome::Close
                    }
                    Request::Upgrade { response, consumed } => {
                        send_all(fd, &response);
                        let rest = buf.split_off(consumed);
                        self.phase = Phase::Ws(FrameReader::default());
                        if rest.is_empty() {
                            Outcome::Open
                        } else {
                            self.on_data(fd, &rest, stats)
                        }
                    }
                }
            }
            Phase::Ws(reader) => {
                let mut feed = Feed::default();
                reader.feed(data, &mut feed);
                if feed.texts > 0 {
                    Stats::add(&stats.frames, feed.texts);
                }
                if feed.close {
                    send_all(fd, &CLOSE_NORMAL);
                    Outcome::Close
                } else if feed.error {
                    send_all(fd, &CLOSE_PROTOCOL);
                    Outcome::Close
                } else {
                    Outcome::Open
                }
            }
        }
    }
}

/// Writes `bytes` to `fd` (small control writes: a full socket buffer simply truncates them).
fn send_all(fd: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice; `fd` is a socket this thread owns.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_request_is_answered_with_101() {
        let req = b"GET /stream HTTP/1.1\r\nHost: x\r\nupgrade: websocket\r\n\
                    sec-websocket-key:  dGhlIHNhbXBsZSBub25jZQ== \r\nsec-websocket-version: 13\r\n\r\nXY";
        assert_eq!(parse_request(&req[..20]), Request::Incomplete);
        match parse_request(req) {
            Request::Upgrade { response, consumed } => {
                let text = String::from_utf8(response).unwrap();
                assert!(text.starts_with("HTTP/1.1 101 "));
                assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
                assert_eq!(consumed, req.len() - 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_request(b"POST / HTTP/1.1\r\n\r\n"), Request::Bad);
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Bad
        );
    }

    #[test]
    fn frames_are_found_across_any_split() {
        let mut stream = Vec::new();
        for i in 0..20 {
            stream.extend(frame(0x1, &vec![b'a'; 300 + i]));
        }
        stream.extend(frame(0x9, b"ping"));
        stream.extend(frame(0x1, &vec![b'b'; 70_000 - 6_000])); // 16-bit length
        stream.extend(frame(0x1, b""));
        stream.extend(frame(0x8, &[0x03, 0xe8]));
        for chunk in [1, 2, 3, 7, 13, 64, 333, 4096, stream.len()] {
            let mut r = FrameReader::default();
            let mut out = Feed::default();
            for piece in stream.chunks(chunk) {
                r.feed(piece, &mut out);
            }
            assert_eq!(
                out,
                Feed {
                    texts: 22,
                    close: true,
                    error: false
                },
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn violations_are_errors() {
        let cases: [Vec<u8>; 4] = [
            vec![0x81, 0x02, b'h', b'i'],    // unmasked
            frame(0x3, b"x"),                // reserved opcode
            frame(0x1, &vec![0; 70_000]),    // over the payload cap (64-bit length)
            [0xc1, 0x80, 0, 0, 0, 0].into(), // RSV1 without an extension
        ];
        for bytes in cases {
            let mut out = Feed::default();
            FrameReader::default().feed(&bytes, &mut out);
            assert!(out.error, "{bytes:?}");
        }
    }
}
