//! `VI_HEAP_PEAK=1`: the process counts its live heap bytes and prints their peak on exit
//! (`heap peak: N bytes`), for tests and benchmarks that compare what a process really held
//! (tools/tests/multiprocess.rs: ranks taking turns; BENCHMARKS.md's peak tables). Bytes asked
//! of the allocator (not pages: no allocator overhead, no memory-mapped files, no CUDA memory).
//!
//! The live count is kept always (one atomic add per allocation and free); the peak only when
//! the variable is set at start.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// Live bytes (signed: frees of blocks allocated before counting began cannot underflow it).
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static ON: AtomicBool = AtomicBool::new(false);

pub struct Counting;

fn grew(by: usize) {
    let now = LIVE.fetch_add(by as isize, Ordering::Relaxed) + by as isize;
    if ON.load(Ordering::Relaxed) {
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn shrank(by: usize) {
    LIVE.fetch_sub(by as isize, Ordering::Relaxed);
}

// SAFETY: every call goes to the system allocator unchanged; the sizes are only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (hence from `System`) with layout `l`.
        unsafe { System.dealloc(p, l) };
        shrank(l.size());
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new` is the caller's valid new size.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            shrank(l.size());
            grew(new);
        }
        q
    }
}

/// Starts recording the peak when `VI_HEAP_PEAK` is `1`.
pub fn start_from_env() {
    if std::env::var_os("VI_HEAP_PEAK").is_some_and(|v| v == "1") {
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        ON.store(true, Ordering::Relaxed);
    }
}

/// Prints the peak (when recording) on stderr.
pub fn report() {
    if ON.load(Ordering::Relaxed) {
        eprintln!("heap peak: {} bytes", PEAK.load(Ordering::Relaxed).max(0));
    }
}
