//! Matrix products with a frozen weight kept in bf16 on the CPU: `--precision bf16` there keeps the
//! seven projections of every layer, the embeddings and the output head in bf16 (half the memory
//! of f32) and multiplies them with bf16 products summed in f32, as PyTorch's bf16 autocast does.
//! Norms, attention, activations, the adapters and their gradients stay f32.
//!
//! Every path computes the same thing: each activation (or incoming gradient) is rounded to bf16
//! (round to nearest even), multiplied by the bf16 weight exactly (a bf16×bf16 product fits in
//! f32) and summed in f32. The paths differ only in the order of the sums:
//!
//! * AMD Zen 4 runs `vdpbf16ps`, which multiplies and sums pairs of bf16 values into f32 lanes
//!   at twice the f32 FMA rate there (on a 2-core Zen 4 VM, one thread: 235 GFLOP/s against 117
//!   for f32 FMA, docs/performance.md). The weight is packed into 32-column panels of
//!   `k`-pairs, one panel and block of `k` at a time, as GotoBLAS packs its right-hand side (in
//!   registers: 16×16 transposes, or interleaved row pairs); a 6×32 register tile accumulates.
//!   One or two token rows (decoding) go through a matrix×vector loop over the weight's rows
//!   instead, which reads the weight once, at half the bytes of f32: on every CPU with AVX-512
//!   BF16.
//! * Other CPUs widen the weight to f32, 256 rows at a time, and run the f32 gemm on the
//!   bf16-rounded activations: correct everywhere, as fast as f32 training, in less memory. On
//!   an Intel Xeon with AVX-512 BF16 (family 6 model 207), where `vdpbf16ps` runs at the f32 FMA
//!   rate, this trained 25–30% faster than the tiles ([`cpu::tiles`]).
//!
//! The panel layout, the tile's store and the split over the spin pool (by token rows, or by
//! output columns when the rows are few: the output head's chunks of a large vocabulary,
//! decoding) are shared with the f32 tiles in [`crate::kernels::panel`].
//!
//! Hand-written rather than a crate's: the `gemm` crate (0.19, behind candle's matmul) has no
//! `vdpbf16ps` kernel, and candle's bf16 CPU ops trained SmolLM2-135M shapes at a quarter of the
//! f32 speed (69 tokens/s at 9.8 GB, b4×256, 2-core Zen 4) where these kernels run 380–436.

#![allow(unsafe_code)]

use half::bf16;
use std::cell::RefCell;

use crate::kernels::cpu;
use crate::kernels::gemm::{gemm_block_into, Mat};
use crate::kernels::panel::{split, Job, Side, Weight, NR};

/// `k`-pairs per packed block: 512 pairs × 32 columns × 4 bytes = 64 KB, read from L2. Larger
/// blocks mean fewer passes over the f32 output (each block adds into it): the hidden and
/// vocabulary products of SmolLM2 (`k` = 576) take one pass, the down projection two.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const KB: usize = 512;
/// `x` rounded to bf16 (round to nearest even), as PyTorch and `half` round; a NaN stays a
/// (quiet) NaN. Branch-free, so that loops over it vectorize.
#[inline(always)]
pub(crate) fn round(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// A frozen bf16 weight `[rows, cols]`, row-major.
pub(crate) type Bf16Weight<'a> = Weight<'a, bf16>;

/// Whether this process multiplies bf16 weights with `vdpbf16ps`: the CPU has AVX-512 BF16 and
/// `FINCH_CPU` does not force a family below AVX-512 ([`cpu::quantized_family`]: Zen 4's default
/// f32 family is AVX2, [`cpu::preferred`], a choice measured on f32 kernels that does not apply
/// here).
pub fn uses_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu::quantized_family() == cpu::Family::Avx512 && x86::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether products of more than two token rows run `vdpbf16ps` tiles: AVX-512 BF16 and the
/// tiles chosen for this CPU ([`cpu::bf16_tiles`]: AMD Zen 4 and Zen 5; on an Intel Xeon, where
/// `vdpbf16ps` runs at the f32 FMA rate, widening for gemm's AVX-512 kernels trained 25–30%
/// faster). Decoding's row loop ([`row_loop`]) runs wherever AVX-512 BF16 is: it reads the
/// weight at half f32's bytes.
fn tall_tiles() -> bool {
    uses_avx512_bf16() && cpu::bf16_tiles()
}

/// Whether a product goes through the decoding row loop rather than tiles (AVX-512 BF16 only).
fn row_loop(m: usize, side: Side, k: usize) -> bool {
    m <= 2 && side == Side::Transposed && k % 2 == 0
}

/// How this process multiplies bf16 weights in products of more than two token rows
/// (training, prefill), as `bench` JSON names it: `amx-bf16`, `avx512-bf16` or `widened`.
pub fn products_name() -> &'static str {
    match tall_path() {
        Path::Amx => "amx-bf16",
        Path::Avx512 => "avx512-bf16",
        Path::Widened => "widened",
    }
}

/// The path of products of more than two token rows: AMX tiles ([`cpu::amx`]), else the
/// `vdpbf16ps` tiles ([`tall_tiles`]), else widening.
fn tall_path() -> Path {
    if uses_avx512_bf16() && cpu::amx() {
        Path::Amx
    } else if tall_tiles() {
        Path::Avx512
    } else {
        Path::Widened
    }
}

/// `out[m, ·] (+)= a[m, ·] · w` on `side` (`Transposed`: `x·wᵀ`, a linear layer's forward
/// pass; `Plain`: `g·w`, its input gradient), on `threads` threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    w: Bf16Weight,
    side: Side,
    a: &[f32],
    m: usize,
    out: &mut [f32],
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    let (avx512, tall) = (uses_avx512_bf16(), tall_path());
    let k = w.dims(side).0;
    let path = |rows: usize| {
        if avx512 && row_loop(rows, side, k) {
            Path::Avx512
        } else {
            tall
        }
    };
    product_with(w, side, a, m, out, accumulate, threads, path)
}

/// The code that multiplies one thread's share of a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// `vdpbf16ps` tiles, or the decoding row loop for one or two rows ([`x86::product`]);
    /// only where [`uses_avx512_bf16`].
    Avx512,
    /// The weight widened to f32 for gemm ([`widened`]).
    Widened,
    /// Intel AMX tiles over the `vdpbf16ps` path's packing ([`x86::product`]); only where
    /// [`crate::kernels::amx::available`] (and AVX-512 BF16, for the packing).
    Amx,
}

/// [`product`] with each job's path chosen by `path(job rows)` (tests force one).
#[allow(clippy::too_many_arguments)]
fn product_with(
    w: Bf16Weight,
    side: Side,
    a: &[f32],
    m: usize,
    out: &mut [f32],
    accumulate: bool,
    threads: usize,
    path: impl Fn(usize) -> Path + Sync,
) -> candle_core::Result<()> {
    split(w, side, a, m, out, accumulate, threads, |job| match path(job.m) {
        Path::Avx512 => {
            #[cfg(target_arch = "x86_64")]
            if x86::available() {
                // SAFETY: the CPU has AVX-512 BF16 (checked just above); `split` checked the
                // shapes, and each job's rows and columns lie inside `out`.
                unsafe { x86::product(job, false) };
                return Ok(());
            }
            candle_core::bail!("bf16 product: this CPU has no AVX-512 BF16")
        }
        Path::Widened => widened(job),
        Path::Amx => {
            #[cfg(target_arch = "x86_64")]
            if x86::available() && crate::kernels::amx::available() {
                // SAFETY: the CPU has AVX-512 BF16 and AMX, and Linux granted the tiles (checked
                // just above); `split` checked the shapes, and each job's rows and columns lie
                // inside `out`.
                unsafe { x86::product(job, true) };
                return Ok(());
            }
            candle_core::bail!("bf16 product: this CPU has no AMX bf16 tiles")
        }
    })
}

/// Per-thread buffers reused across calls, so that a training step allocates nothing new after
/// the first.
struct Scratch {
    /// The activations as bf16 pairs ([`pairs_of`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pairs: Vec<u32>,
    /// One packed panel block ([`pack`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    panel: Vec<u32>,
    /// The portable path's widened weight rows and the rounded activations they multiply.
    wide: Vec<f32>,
    rounded: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            pairs: Vec::new(),
            panel: Vec::new(),
            wide: Vec::new(),
            rounded: Vec::new(),
        })
    };
}

/// Weight rows the portable path widens at a time (bounded scratch: the output head of a
/// 152k-token vocabulary is 136M values).
const WIDE_ROWS: usize = 256;

/// The portable path: the weight widened to f32 `WIDE_ROWS` rows at a time, the f32 gemm over
/// bf16-rounded inputs, written straight into the job's columns of `out`. The scratch is a
/// block of weight rows and the rounded inputs it multiplies, never the output: an output block
/// (the output head's 341 rows × half of a 49k vocabulary, twice) cost 150 MB of peak memory.
fn widened(job: Job<bf16>) -> candle_core::Result<()> {
    let Job {
        w,
        side,
        a,
        m,
        out,
        ldc,
        cols: (c_lo, c_hi),
        accumulate,
        ..
    } = job;
    let k = w.dims(side).0;
    let widen = |v: &bf16| v.to_f32();
    let rounded = |v: &f32| f32::from_bits((round(*v) as u32) << 16);
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        match side {
            Side::Transposed => {
                // Output columns are weight rows: one block of rows at a time.
                s.rounded.clear();
                s.rounded.extend(a.iter().map(rounded));
                for r0 in (c_lo..c_hi).step_by(WIDE_ROWS) {
                    let r1 = (r0 + WIDE_ROWS).min(c_hi);
                    s.wide.clear();
                    s.wide.extend(w.data[r0 * w.cols..r1 * w.cols].iter().map(widen));
                    // SAFETY: rows `0..m`, columns `r0..r1` (inside `c_lo..c_hi`) of `out`
                    // belong to this job; rows are `ldc` apart.
                    unsafe {
                        gemm_block_into(
                            out.add(r0),
                            ldc,
                            accumulate,
                            Mat::row_major(&s.rounded, m, k),
                            Mat::row_major(&s.wide, r1 - r0, w.cols).t(),
                        )?
                    };
                }
            }
            Side::Plain => {
                // The reduction runs over weight rows: add one block of rows (and the matching
                // columns of the rounded input) at a time.
                let width = c_hi - c_lo;
                for r0 in (0..w.rows).step_by(WIDE_ROWS) {
                    let r1 = (r0 + WIDE_ROWS).min(w.rows);
                    s.wide.clear();
                    for row in r0..r1 {
                        let src = &w.data[row * w.cols + c_lo..row * w.cols + c_hi];
                        s.wide.extend(src.iter().map(widen));
                    }
                    s.rounded.clear();
                    for row in a.chunks_exact(k) {
                        s.rounded.extend(row[r0..r1].iter().map(rounded));
                    }
                    // SAFETY: rows `0..m`, columns `c_lo..c_hi` of `out` belong to this job.
                    unsafe {
                        gemm_block_into(
                            out.add(c_lo),
                            ldc,
                            accumulate || r0 > 0,
                            Mat::row_major(&s.rounded, m, r1 - r0),
                            Mat::row_major(&s.wide, r1 - r0, width),
                        )?
                    };
                }
            }
        }
        Ok(())
    })
}

/// `a[m, k]` (f32) as bf16 pairs `[m, ⌈k/2⌉]`: pair `p` of row `i` holds `a[i, 2p]` in its low
/// half and `a[i, 2p+1]` (or 0 past the end) in its high half — the layout `vdpbf16ps` sums.
#[cfg(test)]
fn pairs_of(a: &[f32], m: usize, k: usize, out: &mut Vec<u32>) {
    let kp = k.div_ceil(2);
    out.clear();
    out.resize(m * kp, 0);
    for (row, dst) in a.chunks_exact(k).zip(out.chunks_exact_mut(kp)) {
        for (p, d) in dst.iter_mut().enumerate() {
            let lo = round(row[2 * p]) as u32;
            let hi = row.get(2 * p + 1).map_or(0, |&v| round(v) as u32);
            *d = lo | (hi << 16);
        }
    }
}

/// Packs pairs `p0..p0+len` of the reduction for output columns `c0..c0+NR` of `w` on `side`
/// into `panel[p * NR + j]`, zero past either edge.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack(w: Bf16Weight, side: Side, c0: usize, p0: usize, len: usize, panel: &mut [u32]) {
    let (k, n) = w.dims(side);
    // The value at reduction index `red` of output column `col` on the plain side.
    let at = |red: usize, col: usize| -> u32 {
        if red >= k || col >= n {
            return 0;
        }
        w.data[red * w.cols + col].to_bits() as u32
    };
    let cols = NR.min(n - c0);
    match side {
        Side::Transposed => {
            // Both values of a pair sit side by side in a weight row.
            for j in 0..NR {
                let col = c0 + j;
                if col >= n {
                    (0..len).for_each(|p| panel[p * NR + j] = 0);
                    continue;
                }
                let row = &w.data[col * w.cols..(col + 1) * w.cols];
                for p in 0..len {
                    let red = 2 * (p0 + p);
                    let hi = row.get(red + 1).map_or(0, |v| v.to_bits() as u32);
                    panel[p * NR + j] = row[red].to_bits() as u32 | hi << 16;
                }
            }
        }
        Side::Plain => {
            for p in 0..len {
                let red = 2 * (p0 + p);
                let dst = &mut panel[p * NR..(p + 1) * NR];
                if red + 1 < k && cols == NR {
                    let r0 = &w.data[red * w.cols + c0..red * w.cols + c0 + NR];
                    let r1 = &w.data[(red + 1) * w.cols + c0..(red + 1) * w.cols + c0 + NR];
                    for ((d, a), b) in dst.iter_mut().zip(r0).zip(r1) {
                        *d = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
                    }
                } else {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = at(red, c0 + j) | at(red + 1, c0 + j) << 16;
                    }
                }
            }
        }
    }
}

// AVX-512 intrinsics (and their types) were stabilized in Rust 1.89, after this crate's
// `rust-version`; the toolchain this project builds with (1.95) has them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
mod x86 {
    use super::*;
    use crate::kernels::panel::row_tiles;
    use crate::kernels::panel::x86::{store_tile, transpose16};
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| has!("avx512f") && has!("avx512bw") && has!("avx512bf16"))
    }

    /// One job through packed panels (see the module doc): `vdpbf16ps` register tiles, or with
    /// `amx` Intel AMX tiles ([`crate::kernels::amx::block`], 32×32 blocks of the output). For
    /// the AMX tiles, which read whole tile rows, the activation pairs are padded with zeros to
    /// a multiple of 32 rows and 16 pairs, and each panel's pairs to a multiple of 16.
    ///
    /// Safety: the CPU has AVX-512 F/BW/BF16, and AMX where `amx`; `job.a` holds `m·k` values
    /// and `job.out` rows `< m` at stride `ldc` hold columns `job.cols`.
    pub(super) unsafe fn product(job: Job<half::bf16>, amx: bool) {
        use crate::kernels::amx::{self, BLOCK, PAIRS};
        // The panels are the AMX tiles' right-hand sides: 32 columns, two tiles wide.
        const _: () = assert!(NR == BLOCK);
        let Job {
            w,
            side,
            a,
            m,
            out,
            ldc,
            cols: (c_lo, c_hi),
            accumulate,
            ..
        } = job;
        let (k, n) = w.dims(side);
        let kp = k.div_ceil(2);
        let lda = if amx { kp.next_multiple_of(PAIRS) } else { kp };
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            let (pairs, panel) = (&mut s.pairs, &mut s.panel);
            if amx {
                // Only the padding is zeroed: the rows are written whole.
                pairs.resize(m.next_multiple_of(BLOCK) * lda, 0);
                pairs_into(a, m, k, lda, pairs);
                for row in pairs.chunks_exact_mut(lda).take(m) {
                    row[kp..].fill(0);
                }
                pairs[m * lda..].fill(0);
            } else {
                pairs_avx512(a, m, k, pairs);
                if row_loop(m, side, k) {
                    // Decoding: each weight row read once, as contiguous pairs.
                    rows_kernel(w, pairs, m, out, ldc, (c_lo, c_hi), accumulate);
                    return;
                }
            }
            // Grown once per thread; every block is packed whole before a tile reads it.
            panel.resize(KB * NR, 0);
            let _tiles = amx.then(|| amx::Tiles::configure());
            for p0 in (0..kp).step_by(KB) {
                let len = KB.min(kp - p0);
                let acc = accumulate || p0 > 0;
                for c0 in (c_lo..c_hi).step_by(NR) {
                    pack_panel(w, side, c0, p0, len, panel);
                    let cols = NR.min(c_hi - c0).min(n - c0);
                    let a = pairs.as_ptr().add(p0);
                    if amx {
                        let steps = len.next_multiple_of(PAIRS);
                        panel[len * NR..steps * NR].fill(0);
                        for r0 in (0..m).step_by(BLOCK) {
                            let c = out.add(r0 * ldc + c0);
                            let rows = BLOCK.min(m - r0);
                            amx::block(a.add(r0 * lda), lda, panel.as_ptr(), steps, c, ldc, (rows, cols), acc);
                        }
                    } else {
                        row_tiles!(m, |r0| tile(
                            a.add(r0 * kp),
                            kp,
                            panel.as_ptr(),
                            len,
                            out.add(r0 * ldc + c0),
                            ldc,
                            cols,
                            acc
                        ));
                    }
                }
            }
        })
    }

    /// Packs pairs `p0..p0+len` of output columns `c0..c0+32` into `panel`: in registers where
    /// the panel lies inside the weight and `k` is even, else with the scalar [`pack`].
    ///
    /// Safety: AVX-512 F/BW; `panel` holds `len·32` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_panel(w: Bf16Weight, side: Side, c0: usize, p0: usize, len: usize, panel: &mut [u32]) {
        let (k, n) = w.dims(side);
        if k % 2 == 0 && c0 + NR <= n {
            match side {
                Side::Transposed => pack_rows(w, c0, p0, len, panel),
                Side::Plain => pack_columns(w, c0, p0, len, panel),
            }
        } else {
            pack(w, side, c0, p0, len, panel);
        }
    }

    /// [`pairs_of`] with `vcvtne2ps2bf16` (round to nearest even; it flushes f32 subnormals,
    /// below 1.2e-38, to zero, where [`round`] keeps them).
    ///
    /// Safety: AVX-512 F/BW/BF16; `a` holds `m·k` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pairs_avx512(a: &[f32], m: usize, k: usize, out: &mut Vec<u32>) {
        let kp = k.div_ceil(2);
        out.clear();
        out.resize(m * kp, 0);
        pairs_into(a, m, k, kp, out);
    }

    /// [`pairs_avx512`] into rows `lda ≥ ⌈k/2⌉` pairs apart (the rest of each row untouched).
    ///
    /// Safety: AVX-512 F/BW/BF16; `a` holds `m·k` values, `out` at least `m·lda`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_into(a: &[f32], m: usize, k: usize, lda: usize, out: &mut [u32]) {
        assert!(lda >= k.div_ceil(2) && out.len() >= m * lda && a.len() >= m * k);
        for i in 0..m {
            let src = a.as_ptr().add(i * k);
            let dst = out.as_mut_ptr().add(i * lda);
            let mut c = 0;
            while c + 32 <= k {
                let lo = _mm512_loadu_ps(src.add(c));
                let hi = _mm512_loadu_ps(src.add(c + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(c / 2) as *mut _, v);
                c += 32;
            }
            if c < k {
                let rest = k - c;
                let m0: __mmask16 = if rest >= 16 {
                    0xffff
                } else {
                    ((1u32 << rest) - 1) as u16
                };
                let m1: __mmask16 = if rest > 16 {
                    ((1u32 << (rest - 16)) - 1) as u16
                } else {
                    0
                };
                let lo = _mm512_maskz_loadu_ps(m0, src.add(c));
                let hi = _mm512_maskz_loadu_ps(m1, src.add(c + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let pairs = rest.div_ceil(2);
                _mm512_mask_storeu_epi32(dst.add(c / 2) as *mut i32, ((1u32 << pairs) - 1) as u16, v);
            }
        }
    }

    /// [`pack`] of a whole panel on the transposed side (32 weight rows inside the weight, even
    /// `k`): 16 rows × 16 pairs loaded and transposed in registers. The scalar transposition was
    /// ~5% of a bf16 training step's samples (b4×256, SmolLM2 shapes; `vpgatherdd`, tried first,
    /// was no faster on Zen 4).
    ///
    /// Safety: AVX-512 F; rows `c0..c0 + 32` and pairs `p0..p0 + len` lie inside `w`, whose
    /// row length is even; `panel` holds `len·32` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_rows(w: Bf16Weight, c0: usize, p0: usize, len: usize, panel: &mut [u32]) {
        let full = len / 16 * 16;
        for half in 0..2 {
            let row0 = c0 + 16 * half;
            for pb in (0..full).step_by(16) {
                let mut r = [_mm512_setzero_si512(); 16];
                for (i, v) in r.iter_mut().enumerate() {
                    let at = w.data.as_ptr().add((row0 + i) * w.cols + 2 * (p0 + pb));
                    *v = _mm512_loadu_si512(at as *const _);
                }
                for (c, v) in transpose16(r).into_iter().enumerate() {
                    _mm512_storeu_si512(panel.as_mut_ptr().add((pb + c) * NR + 16 * half) as *mut _, v);
                }
            }
            for p in full..len {
                let red = 2 * (p0 + p);
                for i in 0..16 {
                    let row = &w.data[(row0 + i) * w.cols..(row0 + i + 1) * w.cols];
                    panel[p * NR + 16 * half + i] = row[red].to_bits() as u32 | (row[red + 1].to_bits() as u32) << 16;
                }
            }
        }
    }

    /// [`pack`] of a whole panel on the plain side (32 weight columns inside the weight, an even
    /// number of rows): each pair of weight rows interleaved 16 bits at a time, in registers.
    ///
    /// Safety: AVX-512 F/BW; columns `c0..c0 + 32` and row pairs `p0..p0 + len` lie inside `w`;
    /// `panel` holds `len·32` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_columns(w: Bf16Weight, c0: usize, p0: usize, len: usize, panel: &mut [u32]) {
        for p in 0..len {
            let red = 2 * (p0 + p);
            let a = _mm512_loadu_si512(w.data.as_ptr().add(red * w.cols + c0) as *const _);
            let b = _mm512_loadu_si512(w.data.as_ptr().add((red + 1) * w.cols + c0) as *const _);
            // Per 128-bit lane L: columns 8L..8L+4 (lo) and 8L+4..8L+8 (hi) as (a, b) pairs.
            let lo = _mm512_unpacklo_epi16(a, b);
            let hi = _mm512_unpackhi_epi16(a, b);
            // Lanes in column order: lo.L0 hi.L0 lo.L1 hi.L1 | lo.L2 hi.L2 lo.L3 hi.L3.
            let first = _mm512_shuffle_i32x4::<0x44>(lo, hi);
            let second = _mm512_shuffle_i32x4::<0xEE>(lo, hi);
            let dst = panel.as_mut_ptr().add(p * NR);
            _mm512_storeu_si512(dst as *mut _, _mm512_shuffle_i32x4::<0xD8>(first, first));
            _mm512_storeu_si512(dst.add(16) as *mut _, _mm512_shuffle_i32x4::<0xD8>(second, second));
        }
    }

    /// `R` token rows × 32 columns: `c (+)= Σ_p a[·, p] ⊙ panel[p]` over `len` pairs.
    ///
    /// Safety: AVX-512 F/BW/BF16; `a` holds `R` rows of `len` pairs at stride `lda`, `panel`
    /// `len·32` pairs, `c` `R` rows of `cols ≤ 32` values at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<const R: usize>(
        a: *const u32,
        lda: usize,
        panel: *const u32,
        len: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for p in 0..len {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16) as *const _));
            for r in 0..R {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
                lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
                hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
            }
        }
        store_tile(lo, hi, c, ldc, cols, accumulate);
    }

    /// `out[t, j] (+)= ⟨pairs[t], w[j]⟩` for `m ≤ 2` token rows, even `k` and the weight rows
    /// `j` in `cols`: one pass over those rows, 32 values a step.
    ///
    /// Safety: AVX-512 F/BW/BF16; `pairs` holds `m` rows of `k/2` pairs, `out` rows `< m` at
    /// stride `ldc` hold columns `cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn rows_kernel(
        w: Bf16Weight,
        pairs: &[u32],
        m: usize,
        out: *mut f32,
        ldc: usize,
        (c_lo, c_hi): (usize, usize),
        accumulate: bool,
    ) {
        let kp = w.cols / 2;
        let steps = kp / 16;
        for j in c_lo..c_hi {
            let row = w.data.as_ptr().add(j * w.cols) as *const u32;
            for t in 0..m {
                let x = pairs.as_ptr().add(t * kp);
                let mut acc = _mm512_setzero_ps();
                for s in 0..steps {
                    let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(s * 16) as *const _));
                    let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(x.add(s * 16) as *const _));
                    acc = _mm512_dpbf16_ps(acc, xv, wv);
                }
                let rest = kp - steps * 16;
                if rest > 0 {
                    let mask: __mmask16 = ((1u32 << rest) - 1) as u16;
                    let wv: __m512bh =
                        std::mem::transmute(_mm512_maskz_loadu_epi32(mask, row.add(steps * 16) as *const i32));
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_maskz_loadu_epi32(mask, x.add(steps * 16) as *const i32));
                    acc = _mm512_dpbf16_ps(acc, xv, wv);
                }
                let v = _mm512_reduce_add_ps(acc);
                let o = out.add(t * ldc + j);
                *o = if accumulate { *o + v } else { v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference over the bf16-rounded inputs.
    fn reference(w: &[bf16], rows: usize, cols: usize, side: Side, a: &[f32], m: usize) -> Vec<f64> {
        let wb = Bf16Weight { data: w, rows, cols };
        let (k, n) = wb.dims(side);
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for c in 0..k {
                    let av = bf16::from_f32(a[i * k + c]).to_f64();
                    let wv = match side {
                        Side::Transposed => w[j * cols + c],
                        Side::Plain => w[c * cols + j],
                    };
                    s += av * wv.to_f64();
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    /// Every path (packed `vdpbf16ps` tiles, AMX tiles, the decoding row loop, the widened f32 gemm) gives
    /// the products of the bf16-rounded inputs, on ragged shapes (odd `k`, partial panels and
    /// tiles, several `k` blocks), plain and accumulating, on one thread and split by rows.
    #[test]
    fn every_path_equals_the_rounded_reference() {
        let mut rng = crate::rng::Rng::new(9);
        for (m, rows, cols) in [
            (1, 70, 64),
            (2, 33, 576),
            (1, 5, 7),
            (7, 45, 301),
            (130, 96, 40),
            (13, 40, 96),
            // More weight rows than the widened path widens at a time (`WIDE_ROWS`): its
            // output columns (forward) or reduction (input gradient) come in blocks.
            (5, 600, 40),
            (40, 520, 24),
            // Two blocks of `KB` pairs, the second not a whole number of AMX tile steps; 35
            // rows: a full and a partial 32-row AMX block; 40 outputs: a partial panel.
            (35, 40, 1100),
        ] {
            let w: Vec<bf16> = (0..rows * cols).map(|_| bf16::from_f32(rng.next_f32() - 0.5)).collect();
            let wb = Bf16Weight { data: &w, rows, cols };
            for side in [Side::Transposed, Side::Plain] {
                let (k, n) = wb.dims(side);
                let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
                let want = reference(&w, rows, cols, side, &a, m);
                let base: Vec<f32> = (0..m * n).map(|_| rng.next_f32()).collect();
                for accumulate in [false, true] {
                    let check = |got: &[f32], what: &str| {
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            let w = w + if accumulate { base[i] as f64 } else { 0.0 };
                            assert!(
                                (*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()) * (k as f64).sqrt(),
                                "{what} {m}x{k}x{n} at {i}: {g} vs {w}"
                            );
                        }
                    };
                    for threads in [1, 2] {
                        let mut out = base.clone();
                        product(wb, side, &a, m, &mut out, accumulate, threads).unwrap();
                        check(&out, "default path");
                        // Each path, whether or not this CPU's products use it by default: the
                        // `vdpbf16ps` tiles and row loop where the CPU has them.
                        let mut paths = vec![Path::Widened];
                        #[cfg(target_arch = "x86_64")]
                        if x86::available() {
                            paths.push(Path::Avx512);
                            if crate::kernels::amx::available() {
                                paths.push(Path::Amx);
                            }
                        }
                        for p in paths {
                            let mut out = base.clone();
                            product_with(wb, side, &a, m, &mut out, accumulate, threads, |_| p).unwrap();
                            check(&out, &format!("{p:?} path on {threads} threads"));
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 conversion rounds as the portable one does (ties to even, odd `k` padded).
    #[test]
    fn activation_pairs_round_alike() {
        let mut rng = crate::rng::Rng::new(3);
        for (m, k) in [(3, 77), (2, 64), (1, 5)] {
            let mut a: Vec<f32> = (0..m * k).map(|_| (rng.next_f32() - 0.5) * 1e3).collect();
            a[1] = f32::from_bits(0x3f80_8000); // a tie: rounds to even (1.0)
            a[2] = f32::from_bits(0x3f81_8000); // a tie: rounds up to even
            let mut want = Vec::new();
            pairs_of(&a, m, k, &mut want);
            assert_eq!(want[0] >> 16, 0x3f80);
            assert_eq!(want[1] & 0xffff, 0x3f82);
            #[cfg(target_arch = "x86_64")]
            if x86::available() {
                let mut got = Vec::new();
                // SAFETY: the CPU has the features (checked above).
                unsafe { x86::pairs_avx512(&a, m, k, &mut got) };
                assert_eq!(got, want, "{m}x{k}");
            }
        }
    }

    /// The register packing (the transposed side: 16×16 transposes, full 16-pair blocks and the
    /// rest; the plain side: interleaved row pairs) fills panels as the scalar loop does.
    #[test]
    fn register_packing_equals_the_scalar_loop() {
        let mut rng = crate::rng::Rng::new(5);
        let (rows, cols) = (64, 100);
        let w: Vec<bf16> = (0..rows * cols).map(|_| bf16::from_f32(rng.next_f32())).collect();
        let wb = Bf16Weight { data: &w, rows, cols };
        for (c0, p0, len) in [(0, 0, 16), (32, 7, 20), (0, 3, 43), (32, 0, 50)] {
            let mut want = vec![0u32; len * NR];
            pack(wb, Side::Transposed, c0, p0, len, &mut want);
            #[cfg(target_arch = "x86_64")]
            if x86::available() {
                let mut got = vec![1u32; len * NR];
                // SAFETY: the CPU has the features; rows c0..c0+32 and pairs p0..p0+len are inside.
                unsafe { x86::pack_rows(wb, c0, p0, len, &mut got) };
                assert_eq!(got, want, "transposed: c0 {c0} p0 {p0} len {len}");
            }
        }
        // The plain side of a [100, 64] weight: columns c0..c0+32, row pairs p0..p0+len.
        let wb = Bf16Weight {
            data: &w,
            rows: 100,
            cols: 64,
        };
        for (c0, p0, len) in [(0, 0, 16), (32, 7, 20), (0, 3, 43), (32, 0, 50)] {
            let mut want = vec![0u32; len * NR];
            pack(wb, Side::Plain, c0, p0, len, &mut want);
            #[cfg(target_arch = "x86_64")]
            if x86::available() {
                let mut got = vec![1u32; len * NR];
                // SAFETY: the CPU has the features; columns and row pairs are inside.
                unsafe { x86::pack_columns(wb, c0, p0, len, &mut got) };
                assert_eq!(got, want, "plain: c0 {c0} p0 {p0} len {len}");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let w = vec![bf16::ZERO; 6];
        let wb = Bf16Weight {
            data: &w,
            rows: 2,
            cols: 3,
        };
        let mut out = vec![0f32; 4];
        assert!(product(wb, Side::Transposed, &[0.0; 5], 2, &mut out, false, 1).is_err());
        let bad = Bf16Weight {
            data: &w,
            rows: 3,
            cols: 3,
        };
        assert!(product(bad, Side::Plain, &[0.0; 6], 2, &mut out, false, 1).is_err());
    }
}
