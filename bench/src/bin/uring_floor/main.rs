//! The io_uring ingest prototype: a read-and-discard WebSocket server in the role of `floor`
//! (same upgrade from loadtest, every frame read and discarded), built to measure what
//! completion-based I/O saves at real-time pace, where every 20 ms message is otherwise its own
//! readiness event and `recv`. See `docs/benchmarks.md`, `docs/decisions.md`.
//!
//! Thread-per-core: N threads, each with its own `SO_REUSEPORT` listener on the same port and
//! its own event loop; connections never migrate. The WebSocket handshake and framing are done
//! by hand ([`ws`]): answer the upgrade, find frame boundaries, skip payloads, answer a close.
//! Two backends run that same code:
//!
//! - [`uring`]: multishot accept + multishot receive into a provided-buffer ring, one
//!   `io_uring_enter` per batch of completions (needs Linux ≥ 6.0 and io_uring not disabled);
//! - [`epoll`]: level-triggered epoll, one `recv` per ready socket — the fallback, and the
//!   control that separates io_uring's gain from the hand-written protocol code's.
//!
//! ```text
//! uring_floor 127.0.0.1:8099 [--mode auto|uring|epoll] [--threads N]
//!             [--buffers 1024] [--buffer-size 4096] [--no-defer-taskrun]
//! ```
//!
//! `auto` (the default) probes io_uring at start-up and falls back to epoll, saying why. On
//! SIGTERM or SIGINT it prints one JSON line of counters (connections, text frames, reads) to
//! stderr and exits.

#[cfg(target_os = "linux")]
mod epoll;
#[cfg(target_os = "linux")]
mod uring;
#[cfg(target_os = "linux")]
mod ws;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("uring_floor: Linux only");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
fn main() {
    if let Err(e) = linux::main() {
        eprintln!("uring_floor: {e}");
        std::process::exit(1);
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use socket2::{Domain, Protocol, Socket, Type};

    use crate::uring;
    use crate::ws::Stats;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Auto,
        Uring,
        Epoll,
    }

    struct Args {
        addr: SocketAddr,
        mode: Mode,
        threads: usize,
        uring: uring::Config,
    }

    fn parse_args() -> Result<Args, String> {
        let mut a = Args {
            addr: "127.0.0.1:8099".parse().expect("default address"),
            mode: Mode::Auto,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            uring: uring::Config {
                buffers: 1024,
                buffer_size: 4096,
                defer_taskrun: true,
            },
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--mode" => {
                    a.mode = match value("--mode")?.as_str() {
                        "auto" => Mode::Auto,
                        "uring" => Mode::Uring,
                        "epoll" => Mode::Epoll,
                        m => return Err(format!("--mode {m}: auto, uring or epoll")),
                    }
                }
                "--threads" => {
                    a.threads = value("--threads")?
                        .parse()
                        .ok()
                        .filter(|&n: &usize| n > 0)
                        .ok_or("--threads needs a positive number")?
                }
                "--buffers" => {
                    a.uring.buffers = value("--buffers")?
                        .parse()
                        .ok()
                        .filter(|n: &u16| n.is_power_of_two())
                        .ok_or("--buffers needs a power of two ≤ 32768")?
                }
                "--buffer-size" => {
                    a.uring.buffer_size = value("--buffer-size")?
                        .parse()
                        .ok()
                        .filter(|&n: &u32| n >= 64)
                        .ok_or("--buffer-size needs a number ≥ 64")?
                }
                "--no-defer-taskrun" => a.uring.defer_taskrun = false,
                s if !s.starts_with("--") => {
                    a.addr = s.parse().map_err(|e| format!("{s}: {e}"))?;
                }
                s => return Err(format!("unknown argument {s}")),
            }
        }
        Ok(a)
    }

    fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        Ok(socket.into())
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

    /// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns afterwards).
    fn block_exit_signals() -> libc::sigset_t {
        // SAFETY: a local sigset initialised by sigemptyset before use.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        }
    }

    pub fn main() -> Result<(), String> {
        let args = parse_args()?;
        raise_nofile_limit();
        let use_uring = match args.mode {
            Mode::Epoll => false,
            Mode::Uring => {
                uring::probe().map_err(|e| format!("io_uring unavailable: {e}"))?;
                true
            }
            Mode::Auto => match uring::probe() {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("uring_floor: io_uring unavailable ({e}); falling back to epoll");
                    false
                }
            },
        };
        let backend = if use_uring { "io_uring" } else { "epoll" };
        let listeners = (0..args.threads)
            .map(|_| reuseport_listener(args.addr))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("bind {}: {e}", args.addr))?;
        let signals = block_exit_signals();
        let stats: Vec<Arc<Stats>> = (0..args.threads).map(|_| Arc::default()).collect();
        for (i, listener) in listeners.into_iter().enumerate() {
            let st = stats[i].clone();
            let cfg = args.uring;
            std::thread::Builder::new()
                .name(format!("{backend}-{i}"))
                .spawn(move || {
                    let r = if use_uring {
                        uring::run(listener, cfg, &st)
                    } else {
                        crate::epoll::run(listener, &st)
                    };
                    if let Err(e) = r {
                        eprintln!("uring_floor: thread {i}: {e}");
                        std::process::exit(1);
                    }
                })
                .map_err(|e| format!("spawn: {e}"))?;
        }
        eprintln!(
            "uring_floor: listening on {} with {} {backend} threads",
            args.addr, args.threads
        );
        let mut sig: libc::c_int = 0;
        // SAFETY: `signals` is an initialised set blocked in every thread.
        unsafe { libc::sigwait(&signals, &mut sig) };
        let sum = |f: fn(&Stats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
        let per_thread: Vec<u64> = stats
            .iter()
            .map(|s| s.frames.load(Ordering::Relaxed))
            .collect();
        eprintln!(
            "uring_floor: summary {{\"backend\":\"{backend}\",\"threads\":{},\"connections\":{},\
             \"frames\":{},\"reads\":{},\"frames_per_thread\":{per_thread:?}}}",
            args.threads,
            sum(|s| s.connections.load(Ordering::Relaxed)),
            sum(|s| s.frames.load(Ordering::Relaxed)),
            sum(|s| s.reads.load(Ordering::Relaxed)),
        );
        std::process::exit(0);
    }
}
