//! PROXY protocol v1 and v2 (HAProxy's spec), read from connections of `--trusted-proxy`
//! addresses so the gateway sees the real client behind a TCP load balancer.
//!
//! The header is optional: a trusted proxy may also speak TLS or HTTP straight away (an HTTP
//! load balancer that sends `X-Forwarded-For` instead). [`read_header`] reads only as many
//! bytes as it needs to tell: it stops as soon as the bytes cannot start a PROXY header, and
//! whatever it read beyond the header is replayed to the next layer by [`Prefixed`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1 headers are at most 107 bytes; v2 headers here at most this (address block + TLVs).
const MAX_HEADER: usize = 4096;

/// What the start of a trusted proxy's connection said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A PROXY header naming the client.
    Client(SocketAddr),
    /// A PROXY header without a client (v1 `UNKNOWN`, v2 `LOCAL`: health checks).
    Local,
    /// No PROXY header: the connection starts with TLS or HTTP.
    Absent,
}

/// A malformed PROXY header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed PROXY protocol header: {0}")]
pub struct ProxyError(pub &'static str);

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner` with nothing put back.
    pub fn new(inner: S) -> Prefixed<S> {
        Prefixed {
            prefix: Vec::new(),
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The outcome of parsing what has been read so far.
enum Parse {
    /// Need more bytes.
    More,
    /// Not a PROXY header.
    Absent,
    /// A header of this many bytes.
    Header(ProxyHeader, usize),
}

fn could_be(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn parse(buf: &[u8]) -> Result<Parse, ProxyError> {
    if could_be(buf, V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return Ok(Parse::More);
        }
        return parse_v1(buf);
    }
    if could_be(buf, V2_SIGNATURE) {
        if buf.len() < 16 {
            return Ok(Parse::More);
        }
        return parse_v2(buf);
    }
    Ok(Parse::Absent)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= 107 {
            Err(ProxyError("v1 line longer than 107 bytes"))
        } else {
            Ok(Parse::More)
        };
    };
    if end + 2 > 107 {
        return Err(ProxyError("v1 line longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError("v1 not ASCII"))?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let header = match parts.next() {
        Some("UNKNOWN") => ProxyHeader::Local,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let src = parts.next().ok_or(ProxyError("v1 missing source"))?;
            let _dst = parts.next().ok_or(ProxyError("v1 missing destination"))?;
            let sport = parts.next().ok_or(ProxyError("v1 missing source port"))?;
            let _dport = parts
                .next()
                .ok_or(ProxyError("v1 missing destination port"))?;
            let ip: IpAddr = src.parse().map_err(|_| ProxyError("v1 bad source"))?;
            if (proto == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError("v1 address family mismatch"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError("v1 bad port"))?;
            ProxyHeader::Client(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError("v1 unknown protocol")),
    };
    Ok(Parse::Header(header, end + 2))
}

fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError("v2 unknown version"));
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if 16 + len > MAX_HEADER {
        return Err(ProxyError("v2 header too long"));
    }
    if buf.len() < 16 + len {
        return Ok(Parse::More);
    }
    let body = &buf[16..16 + len];
    let header = match ver_cmd & 0x0F {
        0 => ProxyHeader::Local,
        1 => match buf[13] >> 4 {
            1 => {
                if body.len() < 12 {
                    return Err(ProxyError("v2 short IPv4 block"));
                }
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let port = u16::from_be_bytes([body[8], body[9]]);
                ProxyHeader::Client(SocketAddr::new(IpAddr::V4(ip), port))
            }
            2 => {
                if body.len() < 36 {
                    return Err(ProxyError("v2 short IPv6 block"));
                }
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[..16]);
                let port = u16::from_be_bytes([body[32], body[33]]);
                ProxyHeader::Client(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
            }
            // UNSPEC or UNIX: no usable client address.
            _ => ProxyHeader::Local,
        },
        _ => return Err(ProxyError("v2 unknown command")),
    };
    Ok(Parse::Header(header, 16 + len))
}

/// Reads an optional PROXY header from `io`. Returns what it said and the stream with any
/// bytes read past the header put back. The caller bounds the time.
pub async fn read_header<S: AsyncRead + Unpin>(
    mut io: S,
) -> Result<(ProxyHeader, Prefixed<S>), ProxyError> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 512];
    loop {
        match parse(&buf)? {
            Parse::Absent => {
                return Ok((
                    ProxyHeader::Absent,
                    Prefixed {
                        prefix: buf,
                        pos: 0,
                        inner: io,
                    },
                ))
            }
            Parse::Header(h, used) => {
                buf.drain(..used);
                return Ok((
                    h,
                    Prefixed {
                        prefix: buf,
                        pos: 0,
                        inner: io,
                    },
                ));
            }
            Parse::More => {}
        }
        // Read no further than a header can reach, so TLS or HTTP bytes after a short header
        // stay in the kernel where possible.
        let want = chunk.len().min(MAX_HEADER.saturating_sub(buf.len()).max(1));
        let n = io
            .read(&mut chunk[..want])
            .await
            .map_err(|_| ProxyError("connection failed before the header ended"))?;
        if n == 0 {
            return Err(ProxyError("connection closed before the header ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn run(bytes: &[u8]) -> Result<(ProxyHeader, Vec<u8>), ProxyError> {
        let (h, mut rest) = read_header(bytes).await?;
        let mut after = Vec::new();
        rest.read_to_end(&mut after).await.unwrap();
        Ok((h, after))
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_and_unknown() {
        let (h, rest) = run(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\nGET /")
            .await
            .unwrap();
        assert_eq!(h, ProxyHeader::Client("203.0.113.7:56324".parse().unwrap()));
        assert_eq!(rest, b"GET /");
        let (h, _) = run(b"PROXY TCP6 2001:db8::1 ::1 1000 443\r\n")
            .await
            .unwrap();
        assert_eq!(
            h,
            ProxyHeader::Client("[2001:db8::1]:1000".parse().unwrap())
        );
        let (h, _) = run(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(h, ProxyHeader::Local);
        assert!(run(b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n").await.is_err());
        assert!(run(b"PROXY TCP4 1.2.3.4\r\n").await.is_err());
        assert!(run(&[b"PROXY TCP4 ".as_slice(), &[b'9'; 120]].concat())
            .await
            .is_err());
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn v2_ipv4_ipv6_local_and_tlvs() {
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1];
        body.extend_from_slice(&4242u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xAA]); // a TLV, skipped
        let mut bytes = v2(1, 0x11, &body);
        bytes.extend_from_slice(&[0x16, 0x03, 0x01]); // TLS ClientHello follows
        let (h, rest) = run(&bytes).await.unwrap();
        assert_eq!(h, ProxyHeader::Client("198.51.100.9:4242".parse().unwrap()));
        assert_eq!(rest, [0x16, 0x03, 0x01]);
        let mut body6 = [0u8; 36].to_vec();
        body6[15] = 1;
        body6[32..34].copy_from_slice(&7u16.to_be_bytes());
        let (h, _) = run(&v2(1, 0x21, &body6)).await.unwrap();
        assert_eq!(h, ProxyHeader::Client("[::1]:7".parse().unwrap()));
        let (h, _) = run(&v2(0, 0x00, &[])).await.unwrap();
        assert_eq!(h, ProxyHeader::Local);
        assert!(run(&v2(1, 0x11, &[1, 2, 3])).await.is_err(), "short block");
        let mut bad = v2(1, 0x11, &body);
        bad[12] = 0x31;
        assert!(run(&bad).await.is_err(), "version 3");
    }

    #[tokio::test]
    async fn no_header_passes_every_byte_through() {
        for start in [
            &b"GET /stream HTTP/1.1\r\n"[..],
            &[0x16, 0x03, 0x01, 0x02, 0x00][..],
            b"P",
        ] {
            let (h, rest) = run(start).await.unwrap_or((ProxyHeader::Local, vec![]));
            if start == b"P" {
                continue; // a lone "P" could still become "PROXY ": EOF is an error
            }
            assert_eq!(h, ProxyHeader::Absent);
            assert_eq!(rest, start);
        }
        assert!(run(b"PRO").await.is_err(), "EOF inside a possible header");
    }
}
