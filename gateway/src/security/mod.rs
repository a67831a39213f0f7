//! Security on the stream listener: TLS termination, Twilio request signatures, the
//! Twilio-facing HTTP endpoints and the caps that protect the process from handshake floods.
//!
//! ## Layout
//! - [`config`]: the flags (`--tls-cert`, `--public-url`, `--twilio-auth-token`, ...), validated
//!   with the rest of the configuration; auth tokens are [`config::Secret`]s that never print.
//! - [`url`]: the public URL from `--public-url` and the URL variants Twilio may have signed.
//! - [`signature`]: `X-Twilio-Signature` (HMAC-SHA1, base64), constant-time verification
//!   against a primary and an optional secondary token.
//! - [`tls`]: rustls server configuration from PEM files, swapped atomically on SIGHUP or when
//!   the files change; live streams keep the session they started with.
//! - [`limits`]: the handshakes-per-second token bucket checked at accept.
//!
//! Twilio's HTTP endpoints (`/twilio/status`, `/twilio/voice`) live in
//! [`crate::twilio_http`]; the allow-list and trusted proxies in [`crate::server::access`].

pub mod config;
pub mod limits;
pub mod signature;
pub mod tls;
pub mod url;

use std::sync::Arc;

use tokio::sync::Semaphore;

use self::config::SecurityConfig;
use self::signature::SignatureValidator;
use self::tls::TlsReloader;
use self::url::PublicUrl;
use crate::twilio_http::twiml::TwimlConfig;

/// Run-time security state of the stream listener, shared by every connection.
pub struct Security {
    /// TLS acceptor source; `None` = plain `ws://` (see `docs/decisions.md`).
    pub tls: Option<Arc<TlsReloader>>,
    /// Signature checks; `None` only with `--insecure-skip-signature` and no token.
    pub validator: Option<SignatureValidator>,
    /// `--public-url`; needed for signatures and TwiML.
    pub public_url: Option<PublicUrl>,
    /// URL forms an upgrade signature may cover (precomputed from `public_url`).
    pub stream_urls: Vec<String>,
    /// TwiML served at `/twilio/voice`.
    pub twiml: TwimlConfig,
    /// Permits = `--max-concurrent-handshakes`; held from accept to upgrade (TLS + HTTP).
    pub handshakes: Arc<Semaphore>,
    /// `--max-handshakes-per-second` (0 = unlimited); the bucket itself lives in the accept loop.
    pub handshakes_per_second: u32,
}

impl Security {
    /// Builds the run-time state from validated configuration (loads the TLS files).
    pub fn from_config(cfg: &SecurityConfig) -> Result<Security, tls::TlsError> {
        let tls = match &cfg.tls {
            Some(files) => Some(TlsReloader::new(files.clone())?),
            None => None,
        };
        Ok(Security {
            tls,
            validator: SignatureValidator::new(&cfg.tokens),
            public_url: cfg.public_url.clone(),
            stream_urls: cfg
                .public_url
                .as_ref()
                .map(PublicUrl::stream_candidates)
                .unwrap_or_default(),
            twiml: cfg.twiml.clone(),
            handshakes: Arc::new(Semaphore::new(cfg.max_concurrent_handshakes)),
            handshakes_per_second: cfg.max_handshakes_per_second,
        })
    }

    /// Listener mode for the start-up line.
    pub fn mode(&self) -> &'static str {
        if self.tls.is_some() {
            "on (wss://, TLS 1.2/1.3, reload on SIGHUP or file change)"
        } else {
            "off (plain ws://; terminate TLS in front, or set --tls-cert/--tls-key)"
        }
    }

    /// Logs which protections run (never a token).
    pub fn log_startup(&self, cfg: &SecurityConfig) {
        match (&self.validator, &self.public_url) {
            (Some(_), Some(url)) => tracing::info!(
                public_url = url.as_str(),
                tokens = cfg.tokens.len(),
                status_callback = %url.webhook_url(crate::twilio_http::STATUS_PATH),
                twiml = %url.webhook_url(crate::twilio_http::VOICE_PATH),
                "Twilio signature validation on (upgrade and webhooks)"
            ),
            _ => tracing::warn!(
                "--insecure-skip-signature: Twilio signatures are NOT checked; anyone who can \
                 reach the listener can publish audio and status records"
            ),
        }
        if self.validator.is_some() && cfg.insecure_skip_signature {
            tracing::warn!("--insecure-skip-signature ignored: a Twilio auth token is configured");
        }
        if self.tls.is_none() {
            tracing::warn!(
                "TLS off: the stream listener speaks plain ws:// (Twilio requires wss:// in front)"
            );
        }
    }
}
