//! Thread-per-core variant of the `floor` server: the same read-and-discard (tokio + hyper +
//! fastwebsockets, upgrade then read every frame), but on N current-thread tokio runtimes, one
//! per OS thread, each with its own listener bound to the same port with `SO_REUSEPORT`. The
//! kernel spreads new connections over the listeners; a connection lives and dies on the thread
//! that accepted it (no work stealing, no cross-thread wake-ups). Compared with `floor` in
//! `docs/benchmarks.md`, `docs/decisions.md`.
//!
//! `tpc_floor 127.0.0.1:8099 [--threads N] [--pace-us N]` (default: one thread per available
//! core; any path is accepted).
//!
//! `--pace-us N` is the read-coalescing experiment (issue 13, "read coalescing"): each runtime
//! also runs a pacer task that blocks its thread for N µs and then yields. tokio's current-
//! thread scheduler polls its I/O driver without blocking whenever a yielded task is waiting,
//! so each turn of the loop sleeps once and then serves every socket that became readable
//! meanwhile, instead of parking in `epoll_wait` and waking for each message. The price is up
//! to N µs of added latency per message.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn handle(
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Empty<Bytes>>, fastwebsockets::WebSocketError> {
    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
    // A current-thread runtime: the task stays on this thread.
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

/// A listening socket on `addr` that shares the port with the other threads' listeners.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// One thread: a current-thread runtime serving its own listener until the process ends.
fn serve(
    listener: std::net::TcpListener,
    pace: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(pace) = pace {
            tokio::spawn(async move {
                loop {
                    // Blocking on purpose: the thread sleeps while sockets fill up.
                    std::thread::sleep(pace);
                    tokio::task::yield_now().await;
                }
            });
        }
        let listener = tokio::net::TcpListener::from_std(listener)?;
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
    })
}

fn raise_nofile_limit() {
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
}

fn main() -> std::io::Result<()> {
    raise_nofile_limit();
    let mut addr: SocketAddr = "127.0.0.1:8099".parse().expect("default address");
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pace = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .ok_or_else(|| std::io::Error::other("--threads needs a positive number"))?;
            }
            "--pace-us" => {
                pace = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &u64| n > 0)
                    .map(std::time::Duration::from_micros);
                if pace.is_none() {
                    return Err(std::io::Error::other("--pace-us needs a positive number"));
                }
            }
            s => {
                addr = s
                    .parse()
                    .map_err(|e| std::io::Error::other(format!("{s}: {e}")))?
            }
        }
    }
    // Bind every listener before serving, so the port is fully open when the first accepts.
    let listeners = (0..threads)
        .map(|_| reuseport_listener(addr))
        .collect::<std::io::Result<Vec<_>>>()?;
    eprintln!(
        "tpc_floor: listening on {addr} with {threads} current-thread runtimes, pace {pace:?}"
    );
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            std::thread::Builder::new()
                .name(format!("tpc-{i}"))
                .spawn(move || serve(l, pace))
        })
        .collect::<std::io::Result<_>>()?;
    for h in handles {
        match h.join() {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::other("a runtime thread panicked")),
        }
    }
    Ok(())
}
