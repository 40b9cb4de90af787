//! Output buffers that a kernel writes whole, allocated without being zero-filled first.
//!
//! A training step allocates every activation and gradient afresh (candle's tensors own their
//! storage), and `vec![0.0; n]` on memory the allocator reuses (which is all of it after the
//! first step: [`crate::alloc`] keeps freed blocks) is a `memset` of the whole buffer, on the
//! thread that then hands the product to the pool: while it zeroes, the other threads wait.
//! Measured on SmolLM2-135M shapes, f32, b4×256 (2-core AMD EPYC Zen 4): `memset` was 1.5–3% of a
//! step's samples, and the spin pool's worker waited as long.
//!
//! [`written_whole`] is for buffers that the caller's kernel overwrites in full before anything
//! reads them (a product with `accumulate = false`, an elementwise map): the same as candle's own
//! CPU backend does for its outputs (`alloc_uninit_vec` in `cpu_backend`). Debug builds (what
//! `cargo test` runs) fill the buffer with NaN instead, so an element a kernel fails to write
//! turns the tests' comparisons with their references into failures rather than passing on
//! a lucky zero.

#![allow(unsafe_code)]

/// A buffer of `n` values that the caller overwrites whole before reading any (see the module
/// doc). In debug builds every value starts as NaN.
#[allow(clippy::uninit_vec)]
pub(crate) fn written_whole(n: usize) -> Vec<f32> {
    if cfg!(debug_assertions) {
        return vec![f32::NAN; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`; `f32` has no invalid bit patterns and no destructor, and every
    // caller writes all `n` values before reading them (the contract of this function).
    unsafe { v.set_len(n) };
    v
}
