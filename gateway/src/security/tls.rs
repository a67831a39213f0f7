//! TLS termination with rustls (ring provider): TLS 1.2 and 1.3, ALPN `http/1.1`.
//!
//! The `ServerConfig` lives behind `RwLock<Arc<_>>`: the accept path takes the read lock once
//! per connection to clone the `Arc`, a reload swaps in a new one. Sessions already
//! established keep the config they were built from, so reloading never touches live streams.
//! Reloads happen on SIGHUP and when the files' modification time or size changes (polled).
//! A reload that fails (unreadable file, key not matching the certificate) is logged and the
//! previous certificate stays in use.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use super::config::TlsFiles;

/// Problems loading the certificate or key.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    /// The key file holds no private key.
    #[error("{0}: no PEM private key found")]
    NoKey(PathBuf),
    /// rustls refused the pair (e.g. key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Builds a server configuration from PEM files.
pub fn load_server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = std::fs::read(&files.cert).map_err(read_err(&files.cert))?;
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut BufReader::new(&cert_pem[..]))
            .collect::<Result<_, _>>()
            .map_err(read_err(&files.cert))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key_pem = std::fs::read(&files.key).map_err(read_err(&files.key))?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut BufReader::new(&key_pem[..]))
            .map_err(read_err(&files.key))?
            .ok_or_else(|| TlsError::NoKey(files.key.clone()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Modification time and size of both files: what the poll compares.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(files: &TlsFiles) -> Stamp {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.modified().ok(), m.len()))
            .unwrap_or((None, 0))
    };
    [one(&files.cert), one(&files.key)]
}

/// The current TLS configuration and how to refresh it.
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// Files' stamp at the last load attempt (successful or not: no log spam every poll).
    seen: Mutex<Stamp>,
}

impl TlsReloader {
    /// Loads the files once; a failure here is a start-up error.
    pub fn new(files: TlsFiles) -> Result<Arc<TlsReloader>, TlsError> {
        let seen = stamp(&files);
        let cfg = load_server_config(&files)?;
        Ok(Arc::new(TlsReloader {
            files,
            current: RwLock::new(cfg),
            seen: Mutex::new(seen),
        }))
    }

    /// An acceptor for one new connection, with the configuration current right now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let cfg = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        TlsAcceptor::from(cfg)
    }

    /// Reloads the files; on error the previous configuration stays.
    pub fn reload(&self, trigger: &'static str) -> Result<(), TlsError> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&self.files);
        match load_server_config(&self.files) {
            Ok(cfg) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = cfg;
                tracing::info!(trigger, cert = %self.files.cert.display(), "TLS certificate reloaded; new connections use it");
                Ok(())
            }
            Err(e) => {
                tracing::error!(trigger, error = %e, "TLS reload failed; keeping the previous certificate");
                Err(e)
            }
        }
    }

    /// Reloads if either file's modification time or size changed since the last attempt.
    pub fn reload_if_changed(&self) {
        let now = stamp(&self.files);
        let changed = *self.seen.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            let _ = self.reload("file change");
        }
    }

    /// Spawns the task that reloads when either file changes (polled every `poll`). SIGHUP
    /// reloads too: the process's signal handler calls [`Self::reload`].
    pub fn spawn_watcher(self: &Arc<Self>, poll: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                this.reload_if_changed();
            }
        })
    }
}
