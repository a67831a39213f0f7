//! The epoll backend (the fallback when io_uring is unavailable, and the control that isolates
//! what io_uring itself buys): the same thread-per-core layout, the same hand-written protocol
//! code, but readiness-based. Level-triggered: each ready socket gets exactly one `recv` per
//! `epoll_wait` (no second `recv` to see `EAGAIN`, which an edge-triggered reactor such as
//! tokio's needs), so the cost is one `recv` per message plus one `epoll_wait` per batch.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};

use crate::ws::{Conn, Outcome, Stats};

/// `epoll_event.u64` of the listener.
const LISTENER: u64 = u64::MAX;

fn ctl(ep: RawFd, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: a live event struct and descriptors this thread owns.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a live c_int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Serves `listener` (non-blocking) on this thread until the process ends.
pub fn run(listener: TcpListener, stats: &Stats) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let lfd = listener.as_raw_fd();
    ctl(ep, libc::EPOLL_CTL_ADD, lfd, LISTENER)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        // SAFETY: `events` is a live buffer of the length passed.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == LISTENER {
                loop {
                    // SAFETY: accept on our listener without asking for the peer address.
                    let fd = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        break; // EAGAIN (or a transient error: retried at the next event)
                    }
                    set_nodelay(fd);
                    stats.connection();
                    let i = fd as usize;
                    if conns.len() <= i {
                        conns.resize_with(i + 1, || None);
                    }
                    conns[i] = Some(Conn::default());
                    if ctl(ep, libc::EPOLL_CTL_ADD, fd, fd as u64).is_err() {
                        conns[i] = None;
                        // SAFETY: our descriptor, registered nowhere.
                        unsafe { libc::close(fd) };
                    }
                }
                continue;
            }
            let fd = token as RawFd;
            let Some(conn) = conns.get_mut(fd as usize).and_then(Option::as_mut) else {
                continue;
            };
            // SAFETY: `buf` is a live buffer of the length passed.
            let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let close = if r > 0 {
                stats.read();
                conn.on_data(fd, &buf[..r as usize], stats) == Outcome::Close
            } else {
                r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
            };
            if close {
                conns[fd as usize] = None;
                // SAFETY: our descriptor; closing it also removes it from the epoll set.
                unsafe { libc::close(fd) };
            }
        }
    }
}
