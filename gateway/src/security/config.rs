//! Security flags, their `GATEWAY_*` environment variables and TOML keys, validated with the
//! rest of [`crate::config`] (every problem reported at once, exit 64).
//!
//! Modes chosen at start-up (see `docs/decisions.md`):
//! - TLS: `--tls-cert` + `--tls-key` → `wss://`; neither → plain `ws://` (logged as such).
//! - Signatures: on whenever a token is configured. With no token the gateway refuses to start
//!   unless `--insecure-skip-signature` is given; a token always wins over that flag.

use std::convert::Infallible;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use serde::Deserialize;

use super::url::PublicUrl;
use crate::twilio_http::twiml::{ThenVerb, TwimlConfig, TwimlMode};

/// A secret (an auth token): `Debug` prints `<redacted>`; only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself: for the HMAC key only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(Secret(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Security flags (flattened into [`crate::config::RunArgs`]).
#[derive(Debug, Args, Default)]
pub struct SecurityArgs {
    /// PEM certificate chain, leaf first; with --tls-key the listener speaks wss:// (TLS 1.2/1.3).
    /// Reloaded on SIGHUP and when the file changes [default: none = plain ws://].
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The public stream URL exactly as written in the TwiML, e.g. wss://gw.example.com/stream.
    /// Signatures are checked against it (never against request headers).
    #[arg(long, env = "GATEWAY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Twilio auth token (primary) used to check X-Twilio-Signature.
    #[arg(long, env = "GATEWAY_TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub twilio_auth_token: Option<Secret>,
    /// Secondary auth token (accepted too, for rotation).
    #[arg(
        long,
        env = "GATEWAY_TWILIO_AUTH_TOKEN_SECONDARY",
        hide_env_values = true
    )]
    pub twilio_auth_token_secondary: Option<Secret>,
    /// File with the auth token on the first line and an optional secondary on the second.
    #[arg(long, env = "GATEWAY_TWILIO_AUTH_TOKEN_FILE")]
    pub twilio_auth_token_file: Option<PathBuf>,
    /// Accept unsigned requests when no token is configured (development only).
    #[arg(
        long,
        env = "GATEWAY_INSECURE_SKIP_SIGNATURE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub insecure_skip_signature: Option<bool>,
    /// Concurrent TLS + HTTP handshakes; more are closed at accept [default: 1024].
    #[arg(long, env = "GATEWAY_MAX_CONCURRENT_HANDSHAKES")]
    pub max_concurrent_handshakes: Option<usize>,
    /// New connections per second (token bucket, 1 s burst); 0 = unlimited [default: 1000].
    #[arg(long, env = "GATEWAY_MAX_HANDSHAKES_PER_SECOND")]
    pub max_handshakes_per_second: Option<u32>,
    /// TwiML at /twilio/voice: start (one-way <Start><Stream>) or connect [default: start].
    #[arg(long, env = "GATEWAY_TWIML_MODE")]
    pub twiml_mode: Option<String>,
    /// TwiML track: inbound_track, outbound_track or both_tracks [default: inbound_track].
    #[arg(long, env = "GATEWAY_TWIML_TRACK")]
    pub twiml_track: Option<String>,
    /// Verb after the stream: pause:SECONDS, hangup or none [default: pause:60 / none for connect].
    #[arg(long, env = "GATEWAY_TWIML_THEN")]
    pub twiml_then: Option<String>,
    /// Webhook fields passed as <Parameter>s, e.g. From,To,CallSid [default: none].
    #[arg(long, env = "GATEWAY_TWIML_PARAMETERS", value_delimiter = ',')]
    pub twiml_parameters: Vec<String>,
}

/// The same keys from the TOML file.
#[derive(Debug, Default)]
pub struct SecurityFile {
    /// `tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`.
    pub tls_key: Option<PathBuf>,
    /// `public_url`.
    pub public_url: Option<String>,
    /// `twilio_auth_token`.
    pub twilio_auth_token: Option<Secret>,
    /// `twilio_auth_token_secondary`.
    pub twilio_auth_token_secondary: Option<Secret>,
    /// `twilio_auth_token_file`.
    pub twilio_auth_token_file: Option<PathBuf>,
    /// `insecure_skip_signature`.
    pub insecure_skip_signature: Option<bool>,
    /// `max_concurrent_handshakes`.
    pub max_concurrent_handshakes: Option<usize>,
    /// `max_handshakes_per_second`.
    pub max_handshakes_per_second: Option<u32>,
    /// `twiml_mode`.
    pub twiml_mode: Option<String>,
    /// `twiml_track`.
    pub twiml_track: Option<String>,
    /// `twiml_then`.
    pub twiml_then: Option<String>,
    /// `twiml_parameters`.
    pub twiml_parameters: Option<Vec<String>>,
}

/// Certificate chain and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Validated security settings.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// TLS files; `None` = plain `ws://`.
    pub tls: Option<TlsFiles>,
    /// `--public-url`.
    pub public_url: Option<PublicUrl>,
    /// Auth tokens, primary first; empty = signatures off (only with the insecure flag).
    pub tokens: Vec<Secret>,
    /// `--insecure-skip-signature` was given (ignored when a token is configured).
    pub insecure_skip_signature: bool,
    /// `--max-concurrent-handshakes`.
    pub max_concurrent_handshakes: usize,
    /// `--max-handshakes-per-second` (0 = unlimited).
    pub max_handshakes_per_second: u32,
    /// TwiML served at `/twilio/voice`.
    pub twiml: TwimlConfig,
}

/// Reads a token file: first line primary, optional second line secondary.
fn read_token_file(path: &PathBuf) -> Result<(Secret, Option<Secret>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--twilio-auth-token-file {}: {e}", path.display()))?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let primary = lines
        .next()
        .ok_or_else(|| format!("--twilio-auth-token-file {}: empty", path.display()))?;
    Ok((Secret::new(primary), lines.next().map(Secret::new)))
}

impl SecurityConfig {
    /// Merges flags/env over the file over defaults; pushes every problem onto `errors`.
    pub fn from_parts(
        a: SecurityArgs,
        f: SecurityFile,
        errors: &mut Vec<String>,
    ) -> SecurityConfig {
        let cert = a.tls_cert.or(f.tls_cert);
        let key = a.tls_key.or(f.tls_key);
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                let files = TlsFiles { cert, key };
                // Load once now so a bad file is a configuration error (exit 64), reported
                // with everything else; the server loads it again when it starts.
                if let Err(e) = super::tls::load_server_config(&files) {
                    errors.push(format!("--tls-cert/--tls-key: {e}"));
                }
                Some(files)
            }
            (None, None) => None,
            _ => {
                errors.push("--tls-cert and --tls-key must be given together".into());
                None
            }
        };
        let public_url = match a.public_url.or(f.public_url) {
            Some(s) => match PublicUrl::parse(&s) {
                Ok(u) => Some(u),
                Err(e) => {
                    errors.push(format!("--public-url: {e}"));
                    None
                }
            },
            None => None,
        };

        let primary = a.twilio_auth_token.or(f.twilio_auth_token);
        let secondary = a
            .twilio_auth_token_secondary
            .or(f.twilio_auth_token_secondary);
        let token_file = a.twilio_auth_token_file.or(f.twilio_auth_token_file);
        let mut tokens = Vec::new();
        let token_given = token_file.is_some() || primary.is_some() || secondary.is_some();
        match (token_file, primary, secondary) {
            (Some(path), None, None) => match read_token_file(&path) {
                Ok((p, s)) => tokens.extend(std::iter::once(p).chain(s)),
                Err(e) => errors.push(e),
            },
            (Some(_), _, _) => errors.push(
                "--twilio-auth-token-file excludes --twilio-auth-token and --twilio-auth-token-secondary"
                    .into(),
            ),
            (None, Some(p), s) => tokens.extend(std::iter::once(p).chain(s)),
            (None, None, Some(_)) => errors
                .push("--twilio-auth-token-secondary needs --twilio-auth-token".into()),
            (None, None, None) => {}
        }
        for t in &tokens {
            if t.expose().is_empty() || t.expose().chars().any(|c| c.is_whitespace()) {
                errors.push("Twilio auth token: must be non-empty without whitespace".into());
                break;
            }
        }
        let insecure_skip_signature = a
            .insecure_skip_signature
            .or(f.insecure_skip_signature)
            .unwrap_or(false);
        if !token_given && !insecure_skip_signature {
            errors.push(
                "no Twilio auth token: set --twilio-auth-token (or GATEWAY_TWILIO_AUTH_TOKEN, \
                 --twilio-auth-token-file), or run unauthenticated with --insecure-skip-signature"
                    .into(),
            );
        }
        if token_given && public_url.is_none() {
            errors.push(
                "--public-url is required to check signatures (the wss:// URL written in the TwiML)"
                    .into(),
            );
        }

        let max_concurrent_handshakes = a
            .max_concurrent_handshakes
            .or(f.max_concurrent_handshakes)
            .unwrap_or(1024);
        if !(1..=1_000_000).contains(&max_concurrent_handshakes) {
            errors.push(format!(
                "--max-concurrent-handshakes: {max_concurrent_handshakes} must be between 1 and 1000000"
            ));
        }
        let max_handshakes_per_second = a
            .max_handshakes_per_second
            .or(f.max_handshakes_per_second)
            .unwrap_or(1000);

        let mode = match a.twiml_mode.or(f.twiml_mode).as_deref().unwrap_or("start") {
            "start" => TwimlMode::Start,
            "connect" => TwimlMode::Connect,
            other => {
                errors.push(format!("--twiml-mode: {other:?} must be start or connect"));
                TwimlMode::Start
            }
        };
        let track = a
            .twiml_track
            .or(f.twiml_track)
            .unwrap_or_else(|| "inbound_track".into());
        if !matches!(
            track.as_str(),
            "inbound_track" | "outbound_track" | "both_tracks"
        ) {
            errors.push(format!(
                "--twiml-track: {track:?} must be inbound_track, outbound_track or both_tracks"
            ));
        }
        let then = match a.twiml_then.or(f.twiml_then) {
            Some(s) => ThenVerb::parse(&s).unwrap_or_else(|| {
                errors.push(format!(
                    "--twiml-then: {s:?} must be pause:SECONDS (1-14400), hangup or none"
                ));
                ThenVerb::None
            }),
            None if mode == TwimlMode::Start => ThenVerb::Pause(60),
            None => ThenVerb::None,
        };
        let parameters: Vec<String> = if a.twiml_parameters.is_empty() {
            f.twiml_parameters.unwrap_or_default()
        } else {
            a.twiml_parameters
        };
        let mut parameters: Vec<String> = parameters
            .into_iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        // One `<Parameter>` per name: Twilio would forward a repeated name twice in
        // `customParameters`, which the parser refuses (decision 54).
        let mut seen = std::collections::HashSet::new();
        parameters.retain(|p| seen.insert(p.clone()));
        SecurityConfig {
            tls,
            public_url,
            tokens,
            insecure_skip_signature,
            max_concurrent_handshakes,
            max_handshakes_per_second,
            twiml: TwimlConfig {
                mode,
                track,
                then,
                parameters,
            },
        }
    }

    /// `print-config` lines. Tokens are never printed, only whether they are set.
    pub fn to_toml(&self) -> String {
        let q = crate::config::toml_string;
        let mut s = String::new();
        if let Some(t) = &self.tls {
            s.push_str(&format!(
                "tls_cert = {}\n",
                q(&t.cert.display().to_string())
            ));
            s.push_str(&format!("tls_key = {}\n", q(&t.key.display().to_string())));
        }
        if let Some(u) = &self.public_url {
            s.push_str(&format!("public_url = {}\n", q(u.as_str())));
        }
        s.push_str(&format!(
            "# twilio auth tokens: {} configured (values redacted)\n",
            self.tokens.len()
        ));
        s.push_str(&format!(
            "insecure_skip_signature = {}\n",
            self.insecure_skip_signature
        ));
        s.push_str(&format!(
            "max_concurrent_handshakes = {}\nmax_handshakes_per_second = {}\n",
            self.max_concurrent_handshakes, self.max_handshakes_per_second
        ));
        let mode = match self.twiml.mode {
            TwimlMode::Start => "start",
            TwimlMode::Connect => "connect",
        };
        s.push_str(&format!("twiml_mode = {}\n", q(mode)));
        s.push_str(&format!("twiml_track = {}\n", q(&self.twiml.track)));
        s.push_str(&format!(
            "twiml_then = {}\n",
            q(&self.twiml.then.to_string())
        ));
        s.push_str(&format!(
            "twiml_parameters = {}\n",
            crate::config::toml_array(&self.twiml.parameters)
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        s: SecurityArgs,
    }

    fn parse(args: &[&str]) -> (SecurityConfig, Vec<String>) {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        let mut errors = Vec::new();
        let c = SecurityConfig::from_parts(
            T::try_parse_from(v).unwrap().s,
            SecurityFile::default(),
            &mut errors,
        );
        (c, errors)
    }

    #[test]
    fn no_token_needs_the_insecure_flag() {
        let (_, e) = parse(&[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("--insecure-skip-signature"));
        let (c, e) = parse(&["--insecure-skip-signature"]);
        assert!(e.is_empty(), "{e:?}");
        assert!(c.tokens.is_empty() && c.insecure_skip_signature);
        let (_, e) = parse(&["--insecure-skip-signature=false"]);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn tokens_need_public_url_and_are_redacted() {
        let (_, e) = parse(&["--twilio-auth-token", "s3cr3t"]);
        assert!(e[0].contains("--public-url"), "{e:?}");
        let (c, e) = parse(&[
            "--twilio-auth-token",
            "s3cr3t",
            "--twilio-auth-token-secondary",
            "0ther",
            "--public-url",
            "wss://gw.example.com/stream",
            "--insecure-skip-signature",
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.tokens.len(), 2);
        let printed = format!("{c:?}\n{}", c.to_toml());
        assert!(
            !printed.contains("s3cr3t") && !printed.contains("0ther"),
            "{printed}"
        );
    }

    #[test]
    fn token_file_first_and_second_line() {
        let dir = std::env::temp_dir().join(format!("gwsec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "prim\nsec\n").unwrap();
        let (c, e) = parse(&[
            "--twilio-auth-token-file",
            path.to_str().unwrap(),
            "--public-url",
            "wss://h/s",
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.tokens, [Secret::new("prim"), Secret::new("sec")]);
        let (_, e) = parse(&[
            "--twilio-auth-token-file",
            path.to_str().unwrap(),
            "--twilio-auth-token",
            "x",
            "--public-url",
            "wss://h/s",
        ]);
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn tls_pair_and_twiml_values() {
        let (_, e) = parse(&["--insecure-skip-signature", "--tls-cert", "c.pem"]);
        assert_eq!(e.len(), 1, "{e:?}");
        let (c, e) = parse(&[
            "--insecure-skip-signature",
            "--twiml-mode",
            "connect",
            "--twiml-parameters",
            "From, To",
        ]);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.twiml.then, ThenVerb::None);
        assert_eq!(c.twiml.parameters, ["From", "To"]);
        // A repeated name once: Twilio would send it twice, which the parser refuses.
        let (c, _) = parse(&[
            "--insecure-skip-signature",
            "--twiml-parameters",
            "From,To, From",
        ]);
        assert_eq!(c.twiml.parameters, ["From", "To"]);
        let (_, e) = parse(&[
            "--insecure-skip-signature",
            "--twiml-track",
            "left",
            "--twiml-then",
            "dance",
            "--twiml-mode",
            "x",
        ]);
        assert_eq!(e.len(), 3, "{e:?}");
    }
}
