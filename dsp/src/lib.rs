//! Audio signal processing for the gateway, with no runtime dependencies.
//!
//! * [`g711`] — the G.711 μ-law codec Twilio Media Streams use (8 kHz, 8 bits per sample):
//!   table decoder, branch-free encoder, allocation-free slice helpers.
//! * [`resample`] — a streaming polyphase upsampler from 8 kHz telephone audio to 16, 24 or
//!   48 kHz (and an 8 kHz pass-through), band-limited to the telephone band, delay-compensated
//!   so that output sample `n` sits at time `n / out_rate`, with exact sample counts per stream.
//! * [`pcm`] — conversions from the resampler's `f32` output to s16le or f32le bytes.
//! * [`analysis`] — single-frequency level measurement (Goertzel), used by the tests and the
//!   benchmark to verify filters on real output rather than on paper.
//!
//! `README.md` next to this crate's manifest documents the filter design, the measured
//! response and the benchmark against `rubato`.

// The only unsafe code is the allocation-counting allocator of the test build.
#![cfg_attr(not(any(test, feature = "alloc-count")), forbid(unsafe_code))]
#![warn(missing_docs)]

pub mod analysis;
pub mod g711;
pub mod pcm;
pub mod resample;

pub use resample::Upsampler;

/// Allocation counting for the "no allocation on the hot path" tests (this crate's and the
/// gateway's): install [`alloc_count::Counting`] as the test binary's `#[global_allocator]` and
/// wrap the code under test in [`alloc_count::count`].
///
/// The counter is per thread, so tests running in parallel on other threads do not disturb
/// each other's counts.
#[cfg(any(test, feature = "alloc-count"))]
pub mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The counting allocator (forwards to the system allocator).
    pub struct Counting;

    thread_local! {
        // `const` initialisation: no lazy init and no destructor, so touching it from inside the
        // allocator cannot recurse into the allocator.
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    fn bump() {
        // `try_with` because an allocation can happen while the thread is being torn down.
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: forwards every call unchanged to the system allocator; the counter is a plain
    // thread-local cell.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            bump();
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as our caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            bump();
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            bump();
            // SAFETY: same contract as our caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[cfg(test)]
    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Runs `f` and returns how many allocations (including reallocations) it made on this
    /// thread.
    pub fn count(f: impl FnOnce()) -> u64 {
        let before = ALLOCATIONS.with(Cell::get);
        f();
        ALLOCATIONS.with(Cell::get) - before
    }
}
