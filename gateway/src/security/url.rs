//! The public URL of the stream endpoint (`--public-url`) and the URLs Twilio signs.
//!
//! Twilio signs the URL **exactly as written in the TwiML** (for streams, the `wss://` URL; for
//! webhooks, the `https://` URL it requested). Its own validators accept the URL with and
//! without an explicit default port, so [`PublicUrl::stream_candidates`] returns both forms.
//! Nothing here looks at request headers: a proxy cannot make us validate another URL.
//!
//! Webhook URLs (`/twilio/status`, `/twilio/voice`) are derived from the same host: scheme
//! `wss` → `https` (`ws` → `http`), the port as written, the path replaced by the endpoint path.

/// A parsed `--public-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// The URL as configured (used verbatim in TwiML and as the first signature candidate).
    written: String,
    /// `true` for `wss`, `false` for `ws`.
    tls: bool,
    /// Host as written (IPv6 literals keep their brackets).
    host: String,
    /// Explicit port, if written.
    port: Option<u16>,
    /// Path, starting with `/`.
    path: String,
}

impl PublicUrl {
    /// Parses `wss://host[:port]/path` (or `ws://`). No user info, query or fragment.
    pub fn parse(s: &str) -> Result<PublicUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(format!("{s:?} must start with wss:// (or ws://)"));
        };
        if s.contains('?') || s.contains('#') {
            return Err(format!("{s:?} must have no query or fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{s:?} needs a host (and no user info)"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{s:?} has whitespace in its path"));
        }
        let (host, port) =
            split_host_port(authority).ok_or_else(|| format!("{s:?}: bad host or port"))?;
        Ok(PublicUrl {
            written: s.to_owned(),
            tls,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.written
    }

    /// `wss` or `ws`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The path of the public URL.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn default_port(&self) -> u16 {
        if self.tls {
            443
        } else {
            80
        }
    }

    /// `scheme://host[:port]path` with the port written, omitted or made explicit.
    fn build(&self, scheme: &str, port: Option<u16>, path: &str) -> String {
        match port {
            Some(p) => format!("{scheme}://{}:{p}{path}", self.host),
            None => format!("{scheme}://{}{path}", self.host),
        }
    }

    /// The written URL plus its other default-port form: `wss://h/p` ↔ `wss://h:443/p`.
    fn candidates(&self, scheme: &str, path: &str) -> Vec<String> {
        let dflt = self.default_port();
        let mut v = vec![self.build(scheme, self.port, path)];
        match self.port {
            None => v.push(self.build(scheme, Some(dflt), path)),
            Some(p) if p == dflt => v.push(self.build(scheme, None, path)),
            Some(_) => {}
        }
        v
    }

    /// URLs a valid upgrade signature may cover (the written one first).
    pub fn stream_candidates(&self) -> Vec<String> {
        let mut v = self.candidates(if self.tls { "wss" } else { "ws" }, &self.path);
        // The configured string itself, in case it was written unusually (e.g. upper case).
        if !v.contains(&self.written) {
            v.insert(0, self.written.clone());
        }
        v
    }

    /// The public `https://` URL of a webhook endpoint at `path` (as written in TwiML).
    pub fn webhook_url(&self, path: &str) -> String {
        self.build(self.webhook_scheme(), self.port, path)
    }

    /// URLs a valid webhook signature may cover (before any query string).
    pub fn webhook_candidates(&self, path: &str) -> Vec<String> {
        self.candidates(self.webhook_scheme(), path)
    }

    fn webhook_scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// Splits `host[:port]` / `[v6]:port`; `None` when the port is not a number or the host empty.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let host = &authority[..=end];
        return match &authority[end + 1..] {
            "" => Some((host, None)),
            rest => Some((host, Some(rest.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_with_and_without_default_port() {
        let u = PublicUrl::parse("wss://gw.example.com/stream").unwrap();
        assert_eq!(
            u.stream_candidates(),
            [
                "wss://gw.example.com/stream",
                "wss://gw.example.com:443/stream"
            ]
        );
        assert_eq!(
            u.webhook_candidates("/twilio/status"),
            [
                "https://gw.example.com/twilio/status",
                "https://gw.example.com:443/twilio/status"
            ]
        );
        let u = PublicUrl::parse("wss://gw.example.com:443/s").unwrap();
        assert_eq!(
            u.stream_candidates(),
            ["wss://gw.example.com:443/s", "wss://gw.example.com/s"]
        );
        assert_eq!(
            u.webhook_url("/twilio/voice"),
            "https://gw.example.com:443/twilio/voice"
        );
        let u = PublicUrl::parse("wss://[::1]:8443/s").unwrap();
        assert_eq!(u.stream_candidates(), ["wss://[::1]:8443/s"]);
        let u = PublicUrl::parse("ws://h:80/s").unwrap();
        assert_eq!(u.stream_candidates(), ["ws://h:80/s", "ws://h/s"]);
        assert_eq!(u.webhook_url("/x"), "http://h:80/x");
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "https://h/s",
            "wss://",
            "wss://h/s?x=1",
            "wss://u@h/s",
            "wss://h:port/s",
            "wss://h:99999/s",
            "wss://[::1/s",
        ] {
            assert!(PublicUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
