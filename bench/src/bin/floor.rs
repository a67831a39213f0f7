//! The "floor" server: the least a tokio + hyper + fastwebsockets server can do with a Twilio
//! stream — upgrade, then read and discard every frame. The end-to-end benchmark runs it under
//! the same load as the gateway, so `docs/benchmarks.md` can show how close the gateway's CPU
//! per message is to the cost of framing alone.
//!
//! `floor 127.0.0.1:8099` (any path is accepted).

use bytes::Bytes;
use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn handle(
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Empty<Bytes>>, fastwebsockets::WebSocketError> {
    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let Ok(mut ws) = fut.await else { return };
        ws.set_max_message_size(64 * 1024);
        while let Ok(frame) = ws.read_frame().await {
            if frame.opcode == fastwebsockets::OpCode::Close {
                break;
            }
        }
    });
    Ok(resp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // SAFETY: plain libc calls on a local struct.
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
        .unwrap_or_else(|| "127.0.0.1:8099".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("floor: listening on {addr}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service_fn(handle))
                .with_upgrades()
                .await;
        });
    }
}
