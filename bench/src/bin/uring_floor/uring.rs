//! The io_uring backend: one ring per thread, driven by our own loop on the `io-uring` crate.
//!
//! - One multishot accept on the thread's own `SO_REUSEPORT` listener.
//! - One multishot receive per connection, reading into a provided-buffer ring (kernel ≥ 5.19
//!   for buffer rings, ≥ 6.0 for multishot receive): the kernel picks a buffer for each arrival
//!   and posts a completion; we parse it in place and hand the buffer straight back. No
//!   per-message submission, no per-connection buffer.
//! - The loop is `io_uring_enter(submit, wait ≥ 1)`, then every completion that is ready: one
//!   system call for all the messages that arrived on all this thread's connections since the
//!   last one. The ring is `SINGLE_ISSUER | DEFER_TASKRUN` when the kernel takes it (completion
//!   work runs only when we enter, not as interrupts to whatever the thread is doing).
//! - Replies (the 101, a close) are rare and tiny: plain `send` calls.
//!
//! A connection's descriptor is closed only after its receive has posted its last completion
//! (`IORING_CQE_F_MORE` clear), so a descriptor number is never reused while a completion for
//! its previous owner can still arrive.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, Fd};
use io_uring::{cqueue, opcode, squeue, IoUring};

use crate::ws::{Conn, Outcome, Stats};

/// Buffer group of the receive buffers.
const BGID: u16 = 0;
/// `user_data` tag of the multishot accept.
const TAG_ACCEPT: u64 = 1 << 32;
/// `user_data` tag of a connection's multishot receive (the low 32 bits are its descriptor).
const TAG_RECV: u64 = 2 << 32;

/// Sizes of the ring and of the provided buffers.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Provided buffers per thread (a power of two, at most 32,768).
    pub buffers: u16,
    /// Bytes per provided buffer.
    pub buffer_size: u32,
    /// Ask for `SINGLE_ISSUER | DEFER_TASKRUN` (falls back silently when refused).
    pub defer_taskrun: bool,
}

/// Checks at run time that this kernel lets us use what the backend needs; the reason if not.
pub fn probe() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err("kernel.io_uring_disabled = 2".into());
        }
    }
    let ring: IoUring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (name, code) in [
        ("RECV", opcode::RecvMulti::CODE),
        ("ACCEPT", opcode::AcceptMulti::CODE),
    ] {
        if !p.is_supported(code) {
            return Err(format!("IORING_OP_{name} not supported"));
        }
    }
    // Multishot receive arrived in 6.0; the probe cannot see the flag, the release can.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if major < 6 {
        return Err(format!(
            "kernel {} has no multishot receive",
            release.trim()
        ));
    }
    // Buffer rings (5.19): register a tiny one and take it back.
    let bufs = BufRing::new(&ring, 2, 64).map_err(|e| format!("IORING_REGISTER_PBUF_RING: {e}"))?;
    let _ = ring.submitter().unregister_buf_ring(BGID);
    drop(bufs);
    Ok(())
}

/// A provided-buffer ring: the ring of descriptors shared with the kernel (page-aligned, mapped
/// anonymously) and the slab the descriptors point into.
struct BufRing {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    entries: u16,
    slab: Vec<u8>,
    size: usize,
    /// Our producer index; published to the kernel by [`BufRing::publish`].
    tail: u16,
}

impl BufRing {
    fn new(uring: &IoUring, entries: u16, size: u32) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let ring_bytes = entries as usize * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked for failure below.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut bufs = BufRing {
            ring: ring.cast(),
            ring_bytes,
            entries,
            slab: vec![0; entries as usize * size as usize],
            size: size as usize,
            tail: 0,
        };
        // SAFETY: the mapping lives until `Drop`, which unregisters the group first.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, entries, BGID, 0)?;
        }
        for bid in 0..entries {
            bufs.give(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Queues buffer `bid` for the kernel (visible after [`BufRing::publish`]).
    fn give(&mut self, bid: u16) {
        let slot = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `slot` < entries; only the kernel's reads race with this write, and the kernel
        // reads a slot only once the published tail covers it.
        let entry = unsafe { &mut *self.ring.add(slot) };
        let start = bid as usize * self.size;
        entry.set_addr(self.slab[start..].as_ptr() as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes every buffer given so far (one release store of the shared tail).
    fn publish(&self) {
        // SAFETY: the tail is a u16 at a fixed offset of the mapping, suitably aligned; the
        // kernel reads it with acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`.
    fn data(&self, bid: u16, len: usize) -> &[u8] {
        let start = bid as usize * self.size;
        &self.slab[start..start + len.min(self.size)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length.
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
        }
    }
}

/// A connection slot: its protocol state and whether we already shut it down.
struct Slot {
    conn: Conn,
    closing: bool,
}

/// Pushes `entry`, submitting first when the submission queue is full.
fn push(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every entry we build refers to descriptors and buffers that outlive it (the
        // buffer ring is registered, receives and accepts carry no pointers of ours).
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

fn recv_entry(fd: RawFd) -> squeue::Entry {
    opcode::RecvMulti::new(Fd(fd), BGID)
        .build()
        .user_data(TAG_RECV | fd as u32 as u64)
}

fn accept_entry(fd: RawFd) -> squeue::Entry {
    opcode::AcceptMulti::new(Fd(fd))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(TAG_ACCEPT)
}

fn build_ring(cfg: &Config) -> io::Result<IoUring> {
    let sq = 1024;
    let cq = 16 * 1024;
    if cfg.defer_taskrun {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq)
            .setup_single_issuer()
            .setup_defer_taskrun();
        if let Ok(r) = b.build(sq) {
            return Ok(r);
        }
        eprintln!("uring_floor: SINGLE_ISSUER|DEFER_TASKRUN refused, using a plain ring");
    }
    IoUring::builder().setup_cqsize(cq).build(sq)
}

/// Serves `listener` on this thread until the process ends.
pub fn run(listener: TcpListener, cfg: Config, stats: &Stats) -> io::Result<()> {
    let mut ring = build_ring(&cfg)?;
    let mut bufs = BufRing::new(&ring, cfg.buffers, cfg.buffer_size)?;
    let lfd = listener.as_raw_fd();
    push(&mut ring, &accept_entry(lfd))?;
    let mut slots: Vec<Option<Slot>> = Vec::new();
    let mut ready: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // EBUSY: the completion queue overflowed; reaping below makes room.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        ready.clear();
        ready.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let mut gave = false;
        for &(data, res, flags) in &ready {
            let more = cqueue::more(flags);
            if data == TAG_ACCEPT {
                if res >= 0 {
                    let fd = res;
                    set_nodelay(fd);
                    stats.connection();
                    let i = fd as usize;
                    if slots.len() <= i {
                        slots.resize_with(i + 1, || None);
                    }
                    slots[i] = Some(Slot {
                        conn: Conn::default(),
                        closing: false,
                    });
                    push(&mut ring, &recv_entry(fd))?;
                } else if res != -libc::EAGAIN && res != -libc::EINTR {
                    eprintln!(
                        "uring_floor: accept: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                if !more {
                    push(&mut ring, &accept_entry(lfd))?;
                }
                continue;
            }
            let fd = (data & 0xffff_ffff) as RawFd;
            let Some(slot) = slots.get_mut(fd as usize).and_then(Option::as_mut) else {
                continue;
            };
            if res > 0 {
                let Some(bid) = cqueue::buffer_select(flags) else {
                    continue;
                };
                stats.read();
                if !slot.closing
                    && slot.conn.on_data(fd, bufs.data(bid, res as usize), stats) == Outcome::Close
                {
                    slot.closing = true;
                    // Ends the multishot receive with a final completion; closed there.
                    // SAFETY: `fd` is a socket this thread owns.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
                bufs.give(bid);
                gave = true;
            } else if res == 0 || res != -libc::ENOBUFS {
                // End of stream or an error: this receive is over for good.
                slot.closing = true;
            }
            if !more {
                if slot.closing {
                    // SAFETY: the receive posted its last completion: nothing refers to `fd`.
                    unsafe { libc::close(fd) };
                    slots[fd as usize] = None;
                } else {
                    // The buffer ring ran dry (ENOBUFS) or the kernel ended the multishot
                    // receive: re-arm it (buffers given back above are published first).
                    if gave {
                        bufs.publish();
                        gave = false;
                    }
                    push(&mut ring, &recv_entry(fd))?;
                }
            }
        }
        if gave {
            bufs.publish();
        }
    }
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
