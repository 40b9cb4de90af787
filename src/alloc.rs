//! The `finch` binary's allocator: mimalloc, told never to hand freed memory back to the OS
//! during a run, with every block of [`LARGE_BLOCK`] bytes or more kept in an arena of its own.
//!
//! Training frees and re-allocates the same activation buffers every step. Two measured problems
//! with a plain mimalloc, and what this module does about each:
//! - **Fresh pages every step.** By default mimalloc returns freed memory to the OS after 10 ms,
//!   and every step then pays for the kernel zeroing fresh pages: 40% of a step's time. So
//!   [`configure`] turns purging off (`purge_delay = -1`).
//! - **Fragmentation, once nothing is purged.** Small, long-lived blocks (adapter weights and
//!   optimizer state replaced each step, tokenizer data, bookkeeping) land in the holes that freed
//!   activations leave, so the next step's large buffers no longer fit there and the arena grows.
//!   Resident memory kept growing for three steps: Qwen2.5-1.5B shapes at b4×256 (Q4_1 base)
//!   reached 8,848 MiB resident for 6,651 MiB ever live at once (+33%). With large blocks in their
//!   own exclusive arena (reserved address space, committed as used), the same run stays at
//!   7,171 MiB (+8%) from step 2 on; SmolLM2-135M at b4×256: 2,234 → 2,098–2,108 MiB, the same
//!   speed (2 cores, AMD EPYC Zen 4, 2026-11-30).
//!
//! A well-kept allocator does the work; this module only routes sizes and counts bytes
//! (the count gives `finch bench train` its `allocated_peak_mb`). mimalloc's first-class heaps
//! may be used from any thread, and a block is freed with `mi_free` whichever heap it came from.
//! When the arena is full (more than ~15 GiB of large blocks live) or could not be reserved,
//! large blocks come from the default heap as before.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// Blocks of this many bytes or more go to the large-block arena: activations and their
/// gradients (a SmolLM2 b4×256 hidden state is 2.25 MiB), never adapter weights of usual ranks.
pub const LARGE_BLOCK: usize = 1 << 20;

/// Address space reserved for the large-block arena: the most one mimalloc arena can manage
/// (16 GiB less its own bookkeeping). Only what is used is ever committed.
const ARENA_BYTES: usize = 15 << 30;

/// mimalloc's `purge_delay` option (see mimalloc.h; not exported by name by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

static LARGE_HEAP: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The global allocator the `finch` binary installs (`#[global_allocator]` in `main.rs`).
pub struct FinchAlloc;

/// Turns purging off and reserves the large-block arena. Call once, first thing in `main`,
/// before any other thread exists. Returns whether the arena could be reserved (without it,
/// large blocks share the default heap: correct, only more fragmented).
pub fn configure() -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sets a process-wide allocator option; called before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        if cfg!(target_pointer_width = "64") {
            LARGE_HEAP.store(reserve_large_heap(), Ordering::Release);
        }
    });
    !LARGE_HEAP.load(Ordering::Acquire).is_null()
}

/// A heap that allocates only in a fresh exclusive arena; null when none can be reserved.
fn reserve_large_heap() -> *mut c_void {
    let mut arena: libmimalloc_sys::mi_arena_id_t = std::ptr::null_mut();
    // SAFETY: `arena` is a valid out-pointer; reserving address space (not committed, no large
    // OS pages, exclusive: only a heap made for it allocates there) has no other precondition.
    let status = unsafe { libmimalloc_sys::mi_reserve_os_memory_ex(ARENA_BYTES, false, false, true, &mut arena) };
    if status != 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: `arena` was just returned by a successful reservation.
    unsafe { libmimalloc_sys::mi_heap_new_in_arena(arena) }.cast()
}

/// The most bytes live at once since the process started; `None` when [`FinchAlloc`] is not the
/// global allocator (library tests, other binaries).
pub fn peak_bytes() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| PEAK.load(Ordering::Relaxed))
}

/// Read-mostly: a store on every allocation would bounce the flag's cache line between threads.
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

fn count_alloc(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn count_free(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

impl FinchAlloc {
    /// Allocates without counting.
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`]: `layout` has a non-zero size.
    unsafe fn raw_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let heap = LARGE_HEAP.load(Ordering::Relaxed);
        if layout.size() >= LARGE_BLOCK && !heap.is_null() {
            // SAFETY: `heap` came from `mi_heap_new_in_arena` and is never deleted; mimalloc's
            // first-class heaps may allocate from any thread.
            let block = unsafe {
                if zeroed {
                    libmimalloc_sys::mi_heap_zalloc_aligned(heap.cast(), layout.size(), layout.align())
                } else {
                    libmimalloc_sys::mi_heap_malloc_aligned(heap.cast(), layout.size(), layout.align())
                }
            };
            if !block.is_null() {
                return block.cast();
            }
            // The arena is full: the default heap takes it.
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            if zeroed {
                mimalloc::MiMalloc.alloc_zeroed(layout)
            } else {
                mimalloc::MiMalloc.alloc(layout)
            }
        }
    }

    /// [`FinchAlloc::raw_alloc`], counted.
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`].
    unsafe fn counted_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        mark_installed();
        // SAFETY: the caller's guarantees.
        let block = unsafe { self.raw_alloc(layout, zeroed) };
        if !block.is_null() {
            count_alloc(layout.size());
        }
        block
    }
}

// SAFETY: every block comes from mimalloc (either heap) with the requested size and alignment,
// and mimalloc frees and resizes blocks of any of its heaps through the default entry points.
unsafe impl GlobalAlloc for FinchAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees.
        unsafe { self.counted_alloc(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees.
        unsafe { self.counted_alloc(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_free(layout.size());
        // SAFETY: `ptr` came from one of mimalloc's heaps (see `raw_alloc`).
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let heap = LARGE_HEAP.load(Ordering::Relaxed);
        let mut block: *mut u8 = std::ptr::null_mut();
        if new_size >= LARGE_BLOCK && !heap.is_null() {
            // Growing into (or within) the large sizes: mimalloc resizes in place when the block
            // allows, else moves it into the large-block heap. Null when that arena is full; the
            // old block is then untouched and the default heap takes it below.
            // SAFETY: `heap` as in `raw_alloc`; `ptr` came from one of mimalloc's heaps with
            // `layout` (caller's guarantees).
            block =
                unsafe { libmimalloc_sys::mi_heap_realloc_aligned(heap.cast(), ptr.cast(), new_size, layout.align()) }
                    .cast();
        }
        if block.is_null() {
            // SAFETY: the caller's guarantees; mimalloc resizes in the block's own heap.
            block = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        }
        if !block.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the allocator directly (it is not the test binary's global allocator).
    #[test]
    fn blocks_of_every_size_keep_their_bytes_through_realloc_across_the_large_threshold() {
        configure();
        let a = FinchAlloc;
        let small = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: non-zero layouts; every block is written within its size and freed once.
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..1000 {
                *p.add(i) = (i % 251) as u8;
            }
            // Small → large: moves into the arena, bytes kept.
            let q = a.realloc(p, small, 3 * LARGE_BLOCK);
            assert!(!q.is_null());
            assert!((0..1000).all(|i| *q.add(i) == (i % 251) as u8));
            let large = Layout::from_size_align(3 * LARGE_BLOCK, 8).unwrap();
            *q.add(3 * LARGE_BLOCK - 1) = 7;
            // Large → small: back to the default heap.
            let r = a.realloc(q, large, 500);
            assert!((0..500).all(|i| *r.add(i) == (i % 251) as u8));
            a.dealloc(r, Layout::from_size_align(500, 8).unwrap());

            // Zeroed large blocks with a large alignment.
            let aligned = Layout::from_size_align(2 * LARGE_BLOCK + 3, 4096).unwrap();
            let z = a.alloc_zeroed(aligned);
            assert_eq!(z as usize % 4096, 0);
            assert!((0..aligned.size()).all(|i| *z.add(i) == 0));
            a.dealloc(z, aligned);
        }
    }

    extern "C" {
        /// mimalloc v3 (mimalloc.h): whether `p` is a block of `heap`.
        fn mi_heap_contains(heap: *const c_void, p: *const c_void) -> bool;
    }

    #[test]
    fn large_blocks_come_from_the_reserved_arena_when_there_is_one() {
        if !configure() {
            eprintln!("skipped: no large-block arena on this system");
            return;
        }
        let heap = LARGE_HEAP.load(Ordering::Relaxed);
        let a = FinchAlloc;
        let large = Layout::from_size_align(LARGE_BLOCK, 64).unwrap();
        let small = Layout::from_size_align(LARGE_BLOCK - 1, 64).unwrap();
        // SAFETY: non-zero layouts, each block freed once with its layout.
        unsafe {
            let p = a.alloc(large);
            let s = a.alloc(small);
            assert!(mi_heap_contains(heap, p.cast()));
            assert!(!mi_heap_contains(heap, s.cast()));
            // Resizing a large block keeps it in the arena; a small one grown large moves there.
            let p = a.realloc(p, large, 3 * LARGE_BLOCK);
            assert!(mi_heap_contains(heap, p.cast()));
            let s = a.realloc(s, small, 2 * LARGE_BLOCK);
            assert!(mi_heap_contains(heap, s.cast()));
            a.dealloc(p, Layout::from_size_align(3 * LARGE_BLOCK, 64).unwrap());
            a.dealloc(s, Layout::from_size_align(2 * LARGE_BLOCK, 64).unwrap());
        }
    }
}
