//! Opening one WebSocket: TCP, optional TLS, and the HTTP/1.1 upgrade.
//!
//! The upgrade looks like Twilio's: `user-agent: Twilio.TmeWs/1.0`, no subprotocol, no
//! `Origin`, and `x-twilio-signature` when an auth token is configured. The target address
//! is resolved once per run, not per connection.

use crate::sign;
use bytes::Bytes;
use fastwebsockets::WebSocket;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A connected, upgraded client WebSocket.
pub type Ws = WebSocket<TokioIo<Upgraded>>;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL cannot be used.
    #[error("bad url: {0}")]
    Url(String),
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// TLS setup or handshake failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The server answered something other than 101.
    #[error("upgrade answered HTTP {0}")]
    Status(u16),
    /// The HTTP upgrade failed otherwise.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// Connect plus upgrade took longer than the limit.
    #[error("handshake timed out")]
    Timeout,
}

impl ClientError {
    /// A short, low-cardinality reason for counters.
    pub fn reason(&self) -> String {
        match self {
            ClientError::Url(_) => "bad_url".into(),
            ClientError::Connect(e) => format!("connect_{:?}", e.kind()).to_lowercase(),
            ClientError::Tls(_) => "tls".into(),
            ClientError::Status(s) => format!("http_{s}"),
            ClientError::Upgrade(_) => "upgrade".into(),
            ClientError::Timeout => "handshake_timeout".into(),
        }
    }
}

/// Parsed `ws://` or `wss://` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL exactly as given: what the signature covers.
    pub url: String,
    /// `wss`?
    pub tls: bool,
    /// Host name or address, without brackets.
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path (and query, if any), at least `/`.
    pub path: String,
    /// Value of the `Host` header.
    pub authority: String,
}

impl Target {
    /// Parses `ws[s]://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Target, ClientError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(ClientError::Url(format!("{url}: scheme must be ws or wss")));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(ClientError::Url(format!("{url}: no host")));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
            let end = stripped
                .find(']')
                .ok_or_else(|| ClientError::Url(format!("{url}: unclosed [")))?;
            let host = &stripped[..end];
            let port = match stripped[end + 1..].strip_prefix(':') {
                Some(p) => p
                    .parse()
                    .map_err(|_| ClientError::Url(format!("{url}: bad port")))?,
                None => default_port,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse()
                        .map_err(|_| ClientError::Url(format!("{url}: bad port")))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        Ok(Target {
            url: url.to_string(),
            tls,
            host,
            port,
            path: path.to_string(),
            authority: authority.to_string(),
        })
    }
}

/// Ties hyper's background connection task to tokio.
struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// Opens upgraded WebSockets to one target; shared by all streams of a run.
pub struct Connector {
    target: Target,
    addr: SocketAddr,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    signature: Option<String>,
    timeout: Duration,
}

impl Connector {
    /// Resolves the target and prepares TLS (roots from `ca_file`, else the webpki roots)
    /// and the signature.
    pub async fn new(
        url: &str,
        auth_token: Option<&str>,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Connector, ClientError> {
        let target = Target::parse(url)?;
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(ClientError::Connect)?
            .next()
            .ok_or_else(|| ClientError::Url(format!("{}: no address", target.host)))?;
        let tls = if target.tls {
            Some((
                tls_connector(ca_file)?,
                rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| ClientError::Tls(e.to_string()))?,
            ))
        } else {
            None
        };
        let signature = auth_token.map(|t| sign::signature(t, &target.url));
        Ok(Connector {
            target,
            addr,
            tls,
            signature,
            timeout,
        })
    }

    /// The parsed target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Connects and upgrades, within the configured timeout.
    pub async fn connect(&self) -> Result<Ws, ClientError> {
        match tokio::time::timeout(self.timeout, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    async fn connect_inner(&self) -> Result<Ws, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.upgrade(tcp).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                self.upgrade(tls).await
            }
        }
    }

    async fn upgrade<S>(&self, io: S) -> Result<Ws, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut req = hyper::Request::builder()
            .method("GET")
            .uri(self.target.path.as_str())
            .header("host", self.target.authority.as_str())
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13")
            .header("user-agent", "Twilio.TmeWs/1.0");
        if let Some(sig) = &self.signature {
            req = req.header(sign::SIGNATURE_HEADER, sig.as_str());
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Upgrade(e.to_string()))?;
        let executor = SpawnExecutor;
        match fastwebsockets::handshake::client(&executor, req, io).await {
            Ok((ws, _resp)) => Ok(ws),
            Err(fastwebsockets::WebSocketError::InvalidStatusCode(s)) => {
                Err(ClientError::Status(s))
            }
            Err(e) => Err(ClientError::Upgrade(e.to_string())),
        }
    }
}

/// Builds a rustls connector trusting `ca_file` (PEM) or, without it, the webpki roots.
fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let file = std::fs::File::open(path)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
            let mut reader = std::io::BufReader::new(file);
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert =
                    cert.map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Tls(format!(
                    "{}: no certificates",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:8080/stream").expect("valid");
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 8080, "/stream")
        );
        assert_eq!(t.authority, "127.0.0.1:8080");
        let t = Target::parse("wss://gw.example.com").expect("valid");
        assert_eq!((t.tls, t.port, t.path.as_str()), (true, 443, "/"));
        let t = Target::parse("ws://[::1]:9000/a/b").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert!(Target::parse("http://x/").is_err());
        assert!(Target::parse("ws://host:notaport/").is_err());
        assert!(Target::parse("ws:///x").is_err());
    }
}
