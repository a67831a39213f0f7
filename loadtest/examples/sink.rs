//! A read-and-discard WebSocket server for measuring the load generator itself.
//!
//! `cargo run --release -p loadtest --example sink -- 127.0.0.1:8088 [CERT.pem KEY.pem]`
//! then point `loadtest --url ws://127.0.0.1:8088/stream` at it (`wss://` and `--ca-file`
//! when a certificate and key are given). Counts frames and prints the rate every 5 s.

use bytes::Bytes;
use fastwebsockets::{upgrade, OpCode};
use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8088".into());
    let tls = match (std::env::args().nth(2), std::env::args().nth(3)) {
        (Some(cert), Some(key)) => Some(tls_acceptor(&cert, &key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let frames = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    {
        let (frames, open) = (frames.clone(), open.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                let f = frames.load(Ordering::Relaxed);
                println!(
                    "open={} frames/s={}",
                    open.load(Ordering::Relaxed),
                    (f - last) / 5
                );
                last = f;
            }
        });
    }
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (frames, open) = (frames.clone(), open.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                let (frames, open) = (frames.clone(), open.clone());
                async move {
                    let (resp, fut) = match upgrade::upgrade(&mut req) {
                        Ok(x) => x,
                        Err(_) => {
                            return Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(400)
                                    .body(Empty::<Bytes>::new())
                                    .unwrap_or_default(),
                            )
                        }
                    };
                    tokio::spawn(async move {
                        let Ok(mut ws) = fut.await else { return };
                        ws.set_auto_close(true);
                        open.fetch_add(1, Ordering::Relaxed);
                        while let Ok(frame) = ws.read_frame().await {
                            match frame.opcode {
                                OpCode::Close => break,
                                _ => {
                                    frames.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                    Ok(resp)
                }
            });
            match tls {
                None => {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                }
            }
        });
    }
}

/// TLS acceptor from PEM certificate chain and private key files.
fn tls_acceptor(cert: &str, key: &str) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| bad("no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
