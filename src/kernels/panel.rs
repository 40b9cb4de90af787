//! Products with a frozen dense weight through packed weight panels and register tiles, the
//! GotoBLAS way: the weight is packed into 32-column panels one block of the reduction at a
//! time, and a 6×32 register tile of token rows × output columns accumulates over the block. The
//! bf16 kernels ([`crate::kernels::bf16`]) and the f32 ones here share the shapes (`Weight`,
//! `Side`, `Job`), the split over the spin pool ([`split`]) and, on x86, the 16×16 transpose and
//! the tile's store.
//!
//! **f32 weights** (`--precision f32` training and prefill): on CPUs with AVX-512 F, products of
//! at least [`F32_MIN_ROWS`] token rows go through a 6×32 tile of `vfmadd231ps` instead of the
//! `gemm` crate, on AMD Zen 4 ([`crate::kernels::cpu::tiles`]: on an Intel Xeon gemm's
//! AVX-512 kernels were faster, so they stay there). Hand-written rather than the crate's
//! because, measured on a 2-core AMD EPYC (Zen 4) VM, f32 training spent 79% of its samples in
//! gemm 0.19's AVX2 16×6 microkernel (~90% of the FMA ceiling) and 5.6% more packing both
//! operands on every call (its AVX-512 kernels were slower still there,
//! [`crate::kernels::cpu::preferred`]); this tile, like the bf16 one, packs only the weight,
//! reads the activations in place and keeps twelve 16-lane accumulators.
//! One thread, the step's shapes: 106–112 GFLOP/s against gemm's 103–109; the output head on two
//! threads 202 against 172; f32 training +4% (median of 11 alternating pairs, within the
//! machine's noise pair by pair): docs/performance.md, fifteenth session. Other CPUs and
//! `FINCH_CPU=avx2` keep the gemm crate. How the tiles block the weight (reduction values per
//! packed block, whether the input-gradient side packs) is chosen per CPU:
//! [`crate::kernels::cpu::f32_blocking`].

#![allow(unsafe_code)]

use crate::kernels::cpu::F32Blocking;
use crate::kernels::gemm::row_block;

/// Output columns of a packed weight panel (two 16-lane f32 vectors).
pub(crate) const NR: usize = 32;
/// Token rows of the register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const MR: usize = 6;
/// Rows per thread below which a product with enough output panels is split by columns rather
/// than by rows. Measured on the output head's input gradient (341 rows against SmolLM2's
/// 49k-token embedding, f32 tiles, 2 threads, 2-core Zen 4): 185–188 GFLOP/s split by rows,
/// 198–200 by columns; its forward product was level (196–202), and so was bf16 training
/// (alternating, 4 pairs).
pub(crate) const COLUMN_SPLIT_BELOW: usize = 256;

/// Fewest token rows an f32 product needs to go through the tiles: shorter ones (decoding, a
/// few prompt tokens) stay on the matrix×vector kernel and gemm.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const F32_MIN_ROWS: usize = 16;

/// Token rows from which f32 products leave the tiles for gemm's AVX-512 kernels where
/// [`crate::kernels::cpu::tiles`] says so (outside Zen 4). On an Intel Xeon (family 6 model
/// 207), alternating: f32 prefill of a 143-token prompt through the tiles 734, 734, 763 tokens/s
/// against gemm's 593, 647, 592, while training's 1,024-row products ran faster on gemm
/// (docs/performance.md, seventeenth session). Between the two is unmeasured.
pub(crate) const GEMM_FROM_ROWS: usize = 256;

/// How the weight `w` (row-major `[n, k]`) enters a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// `y[m, n] = x[m, k] · wᵀ`: the forward pass.
    Transposed,
    /// `dx[m, k] = g[m, n] · w`: the input gradient.
    Plain,
}

/// A frozen weight `[rows, cols]`, row-major.
pub(crate) struct Weight<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
}

// Copy whatever `T` is (derive would ask `T: Copy`): the weight is a borrowed view.
impl<T> Clone for Weight<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Weight<'_, T> {}

impl<T> Weight<'_, T> {
    pub(crate) fn check(&self) -> candle_core::Result<()> {
        if self.data.len() != self.rows * self.cols {
            candle_core::bail!(
                "frozen weight: {} values do not make {}x{}",
                self.data.len(),
                self.rows,
                self.cols
            )
        }
        Ok(())
    }

    /// `(reduction, output columns)` of a product on `side`.
    pub(crate) fn dims(&self, side: Side) -> (usize, usize) {
        match side {
            Side::Transposed => (self.cols, self.rows),
            Side::Plain => (self.rows, self.cols),
        }
    }
}

/// One thread's share of a product: all of `a`'s `m` rows (`[m, k]`, f32), output columns
/// `cols` of `out` (row stride `ldc`).
pub(crate) struct Job<'a, T> {
    pub w: Weight<'a, T>,
    pub side: Side,
    pub a: &'a [f32],
    pub m: usize,
    /// The product's token row that is this job's row 0 (`a` and `out` start there).
    pub row0: usize,
    pub out: *mut f32,
    pub ldc: usize,
    pub cols: (usize, usize),
    pub accumulate: bool,
}

impl<T> Clone for Job<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Job<'_, T> {}

impl<'a, T> Job<'a, T> {
    /// Rows `r0..r0 + rows` (`r0 < m`) and output columns `cols` of this job.
    fn part(self, r0: usize, rows: usize, cols: (usize, usize)) -> Job<'a, T> {
        let k = self.w.dims(self.side).0;
        Job {
            a: &self.a[r0 * k..(r0 + rows) * k],
            m: rows,
            row0: self.row0 + r0,
            // SAFETY: row `r0 < m` is inside the job's output.
            out: unsafe { self.out.add(r0 * self.ldc) },
            cols,
            ..self
        }
    }
}

// SAFETY: a job's `out` is only written at rows `< m`, columns in `cols`, which no other job
// of the same product writes; the caller's `&mut` borrow of the output outlives every job.
unsafe impl<T: Sync> Send for Job<'_, T> {}
// SAFETY: as above; jobs are shared read-only, each run exactly once.
unsafe impl<T: Sync> Sync for Job<'_, T> {}

/// Checks the shapes of `out[m, ·] (+)= a[m, ·] · w` on `side` and runs it as jobs on
/// `threads` threads of the spin pool, each through `run`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn split<T: Sync>(
    w: Weight<T>,
    side: Side,
    a: &[f32],
    m: usize,
    out: &mut [f32],
    accumulate: bool,
    threads: usize,
    run: impl Fn(Job<T>) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    w.check()?;
    let (k, n) = w.dims(side);
    if a.len() != m * k || out.len() != m * n {
        candle_core::bail!(
            "frozen-weight product: {} input values for {m}x{k}, {} output values for {m}x{n}",
            a.len(),
            out.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return Ok(());
    }
    let job = Job {
        w,
        side,
        a,
        m,
        row0: 0,
        out: out.as_mut_ptr(),
        ldc: n,
        cols: (0, n),
        accumulate,
    };
    // Tall products (training) are split by token rows, as the f32 gemm splits them. Shorter ones
    // with many output columns (the output head's chunks of the vocabulary: 341 rows of
    // SmolLM2's 49k, ~110 of Qwen2.5's 152k; decoding) are split by columns: each thread packs,
    // or reads, only its own share of the weight instead of all of it.
    let pool = crate::kernels::spin::threads();
    let threads = if pool > 1 && !crate::kernels::spin::in_task() {
        threads.min(pool)
    } else {
        1
    };
    let panels = n.div_ceil(NR);
    let row_split = row_block(m, threads);
    let by_columns = threads > 1
        && panels >= 2 * threads
        && row_split.map_or(m * n * k >= 1 << 20, |block| block < COLUMN_SPLIT_BELOW);
    let (rows_per, cols_per) = if by_columns {
        (m, panels.div_ceil(threads) * NR)
    } else {
        (row_split.unwrap_or(m), n)
    };
    let col_parts = n.div_ceil(cols_per);
    let tasks = m.div_ceil(rows_per) * col_parts;
    // Task `i`: a block of rows (row split) or of columns (column split), or the whole product.
    let part = |i: usize| {
        let (r0, c0) = (i / col_parts * rows_per, i % col_parts * cols_per);
        job.part(r0, rows_per.min(m - r0), (c0, (c0 + cols_per).min(n)))
    };
    if tasks == 1 {
        return run(part(0));
    }
    let error = crate::kernels::spin::FirstError::new();
    crate::kernels::spin::run(tasks, &|i| error.keep(run(part(i))));
    error.result()
}

/// Whether f32 products of `m` token rows go through the tiles ([`tile_job`]): AVX-512 F on
/// this CPU and the tiles chosen for it ([`crate::kernels::cpu::tiles`]: by default on AMD Zen 4 only;
/// gemm's AVX-512 kernels were faster on an Intel Xeon for training's products), or, by
/// default on other AVX-512 CPUs, fewer than [`GEMM_FROM_ROWS`] rows.
pub(crate) fn f32_tiles(m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::cpu;
        let chosen = match cpu::tiles() {
            cpu::Tiles::Everywhere => true,
            cpu::Tiles::ShortOnly => m < GEMM_FROM_ROWS,
            cpu::Tiles::Off => false,
        };
        m >= F32_MIN_ROWS && chosen && x86::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = m;
        false
    }
}

/// How this process multiplies training's f32 products with a frozen weight (at least
/// [`GEMM_FROM_ROWS`] token rows), as `bench` JSON names it: `avx512-tiles` ([`tile_job`]) or
/// `gemm` (the gemm crate, in `kernel_family`).
pub fn f32_products_name() -> &'static str {
    if f32_tiles(GEMM_FROM_ROWS) {
        "avx512-tiles"
    } else {
        "gemm"
    }
}

/// One job of [`split`] through the f32 tiles, blocked for this CPU; callers check
/// [`f32_tiles`] first (elsewhere this is an error).
pub(crate) fn tile_job(job: Job<f32>) -> candle_core::Result<()> {
    tile_job_with(job, crate::kernels::cpu::f32_blocking())
}

fn tile_job_with(job: Job<f32>, blocking: F32Blocking) -> candle_core::Result<()> {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: `available` checked the CPU's features; a job from `split` has shapes checked
        // and rows and columns inside its product's output.
        unsafe { x86::f32_product(job, blocking) };
        return Ok(());
    }
    let _ = (job, blocking);
    candle_core::bail!("f32 tile product: this CPU has no AVX-512 F")
}

/// Packs reduction values `k0..k0+len` for output columns `c0..c0+NR` of `w` on `side` into
/// `panel[p * NR + j]`, zero past either edge.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack_f32(w: Weight<f32>, side: Side, c0: usize, k0: usize, len: usize, panel: &mut [f32]) {
    let (k, n) = w.dims(side);
    for p in 0..len {
        let red = k0 + p;
        for j in 0..NR {
            let col = c0 + j;
            panel[p * NR + j] = if red >= k || col >= n {
                0.0
            } else {
                match side {
                    Side::Transposed => w.data[col * w.cols + red],
                    Side::Plain => w.data[red * w.cols + col],
                }
            };
        }
    }
}

/// Values from one panel of [`pack_plain_block`] to the next: `len` rows of [`NR`] and one
/// cache line more, so that the block's rows, written a row of every panel at a time, do not
/// all fall in the same L1 set (at 256 rows the panels would be exactly 32 KB apart).
fn plain_panel_stride(len: usize) -> usize {
    len * NR + 16
}

/// Packs reduction values `k0..k0 + len` of output columns `c_lo..c_hi` of `w` on the plain
/// side (`w` is `[k, n]`: the reduction runs down its rows) into 32-column panels, one after
/// another: panel `j` (columns `c_lo + 32j..`) at `panel[j·plain_panel_stride(len)..]`,
/// reduction value `p` at `+ p·NR`, zero past `c_hi`. Each weight row's share is read front to
/// back, so the hardware prefetchers follow it; a panel read in place instead steps to a new
/// weight row (2.3–6 KB further, a new page) every 32 values.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack_plain_block(w: Weight<f32>, (c_lo, c_hi): (usize, usize), k0: usize, len: usize, panel: &mut [f32]) {
    let width = c_hi - c_lo;
    let stride = plain_panel_stride(len);
    for p in 0..len {
        let row = &w.data[(k0 + p) * w.cols + c_lo..][..width];
        for (j, src) in row.chunks(NR).enumerate() {
            let dst = &mut panel[j * stride + p * NR..][..NR];
            match <&[f32; NR]>::try_from(src) {
                Ok(full) => dst.copy_from_slice(full),
                Err(_) => {
                    dst[..src.len()].copy_from_slice(src);
                    dst[src.len()..].fill(0.0);
                }
            }
        }
    }
}

/// Runs `tile::<R>(args…)` over token rows `0..m` in blocks of [`MR`] (the last one shorter),
/// `R` the block's rows and `r0` its first row, which the arguments may use:
/// `row_tiles!(m, |r0| tile(a.add(r0 * lda), …))`.
#[cfg(target_arch = "x86_64")]
macro_rules! row_tiles {
    ($m:expr, |$r0:ident| $tile:ident($($arg:expr),* $(,)?)) => {{
        let mut $r0 = 0;
        while $r0 < $m {
            match $crate::kernels::panel::MR.min($m - $r0) {
                6 => $tile::<6>($($arg),*),
                5 => $tile::<5>($($arg),*),
                4 => $tile::<4>($($arg),*),
                3 => $tile::<3>($($arg),*),
                2 => $tile::<2>($($arg),*),
                _ => $tile::<1>($($arg),*),
            }
            $r0 += $crate::kernels::panel::MR;
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use row_tiles;

// AVX-512 intrinsics (and their types) were stabilized in Rust 1.89, after this crate's
// `rust-version`; the toolchain this project builds with (1.95) has them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
pub(crate) mod x86 {
    use super::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    pub(crate) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| has!("avx512f"))
    }

    thread_local! {
        /// One packed f32 panel block per thread, reused across calls.
        static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// One job through packed f32 panels (see the module doc), blocked as `blocking` says. On
    /// the forward side each panel's 32 weight rows are packed whole (each row read front to
    /// back), then taken a block of the reduction at a time. On the input-gradient side each block of the reduction is packed for all of
    /// the job's columns, weight row by weight row, or, with `pack_plain` off, full panels are
    /// read in place (their rows are 32 contiguous values of a weight row).
    ///
    /// Safety: the CPU has AVX-512 F; `job.a` holds `m·k` values and `job.out` rows `< m` at
    /// stride `ldc` hold columns `job.cols`.
    pub(super) unsafe fn f32_product(job: Job<f32>, blocking: F32Blocking) {
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
        let kf = blocking.reduction;
        // Every tile of token rows against reduction values `k0..k0 + len` of the panel at
        // output columns `c0..`, whose rows start at `b`, `ldb` apart.
        let tiles = |c0: usize, k0: usize, len: usize, b: *const f32, ldb: usize| {
            let acc = accumulate || k0 > 0;
            let cols = NR.min(c_hi - c0);
            let a = a.as_ptr().add(k0);
            row_tiles!(m, |r0| tile_f32(
                a.add(r0 * k),
                k,
                b,
                ldb,
                len,
                out.add(r0 * ldc + c0),
                ldc,
                cols,
                acc
            ));
        };
        PANEL.with(|panel| {
            let panel = &mut *panel.borrow_mut();
            match side {
                Side::Transposed => {
                    // Grown once per thread (kept at its largest); every panel is packed whole
                    // before a tile reads it.
                    if panel.len() < k * NR {
                        panel.resize(k * NR, 0.0);
                    }
                    for c0 in (c_lo..c_hi).step_by(NR) {
                        if c0 + NR <= n {
                            pack_rows_f32(w, c0, 0, k, panel);
                        } else {
                            pack_f32(w, side, c0, 0, k, panel);
                        }
                        for k0 in (0..k).step_by(kf) {
                            tiles(c0, k0, kf.min(k - k0), panel.as_ptr().add(k0 * NR), NR);
                        }
                    }
                }
                Side::Plain => {
                    let panels = (c_hi - c_lo).div_ceil(NR);
                    let size = if blocking.pack_plain {
                        panels * plain_panel_stride(kf)
                    } else {
                        kf * NR
                    };
                    if panel.len() < size {
                        panel.resize(size, 0.0);
                    }
                    for k0 in (0..k).step_by(kf) {
                        let len = kf.min(k - k0);
                        if blocking.pack_plain {
                            pack_plain_block(w, (c_lo, c_hi), k0, len, panel);
                        }
                        for c0 in (c_lo..c_hi).step_by(NR) {
                            let (b, ldb) = if blocking.pack_plain {
                                let j = (c0 - c_lo) / NR;
                                (panel.as_ptr().add(j * plain_panel_stride(len)), NR)
                            } else if c0 + NR <= n {
                                (w.data.as_ptr().add(k0 * w.cols + c0), w.cols)
                            } else {
                                pack_f32(w, side, c0, k0, len, panel);
                                (panel.as_ptr(), NR)
                            };
                            tiles(c0, k0, len, b, ldb);
                        }
                    }
                }
            }
        })
    }

    /// [`pack_f32`] of a whole panel on the transposed side (32 weight rows inside the weight):
    /// 16 rows × 16 values loaded and transposed in registers.
    ///
    /// Safety: AVX-512 F; rows `c0..c0 + 32` and values `k0..k0 + len` lie inside `w`; `panel`
    /// holds `len·32` values.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pack_rows_f32(w: Weight<f32>, c0: usize, k0: usize, len: usize, panel: &mut [f32]) {
        let full = len / 16 * 16;
        for half in 0..2 {
            let row0 = c0 + 16 * half;
            for pb in (0..full).step_by(16) {
                let mut r = [_mm512_setzero_si512(); 16];
                for (i, v) in r.iter_mut().enumerate() {
                    let at = w.data.as_ptr().add((row0 + i) * w.cols + k0 + pb);
                    *v = _mm512_loadu_si512(at as *const _);
                }
                for (c, v) in transpose16(r).into_iter().enumerate() {
                    _mm512_storeu_si512(panel.as_mut_ptr().add((pb + c) * NR + 16 * half) as *mut _, v);
                }
            }
            for p in full..len {
                for i in 0..16 {
                    panel[p * NR + 16 * half + i] = w.data[(row0 + i) * w.cols + k0 + p];
                }
            }
        }
    }

    /// The transpose of a 16×16 matrix of 32-bit values held one row per register.
    ///
    /// Safety: AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        // Within each 128-bit lane: pairs of rows interleaved by 32 bits, then quads by 64 bits,
        // so that u[4g + e], lane L, holds element 4L + e of rows 4g..4g + 4.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
        }
        // Then the 4×4 transpose of 128-bit lanes: column 4L + e gathers lane L of u[4g + e].
        let mut o = [_mm512_setzero_si512(); 16];
        for e in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x44>(u[e], u[4 + e]);
            let v1 = _mm512_shuffle_i32x4::<0xEE>(u[e], u[4 + e]);
            let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + e], u[12 + e]);
            let v3 = _mm512_shuffle_i32x4::<0xEE>(u[8 + e], u[12 + e]);
            o[e] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            o[4 + e] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
            o[8 + e] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            o[12 + e] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
        }
        o
    }

    /// Writes (or adds) an `R`×32 tile's accumulators into `c` (`R` rows of `cols ≤ 32` values
    /// at stride `ldc`).
    ///
    /// Safety: AVX-512 F; `c` as described.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store_tile<const R: usize>(
        lo: [__m512; R],
        hi: [__m512; R],
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let m0: __mmask16 = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        for r in 0..R {
            let dst = c.add(r * ldc);
            let (mut v0, mut v1) = (lo[r], hi[r]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, dst));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, dst.add(16)));
            }
            _mm512_mask_storeu_ps(dst, m0, v0);
            _mm512_mask_storeu_ps(dst.add(16), m1, v1);
        }
    }

    /// `R` token rows × 32 columns: `c (+)= Σ_p a[·, p] · b[p]` over `len` reduction values.
    ///
    /// Safety: AVX-512 F; `a` holds `R` rows of `len` values at stride `lda`, `b` `len` rows of
    /// 32 values at stride `ldb`, `c` `R` rows of `cols ≤ 32` values at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_f32<const R: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        len: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for p in 0..len {
            let b0 = _mm512_loadu_ps(b.add(p * ldb));
            let b1 = _mm512_loadu_ps(b.add(p * ldb + 16));
            for r in 0..R {
                let av = _mm512_set1_ps(*a.add(r * lda + p));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
        }
        store_tile(lo, hi, c, ldc, cols, accumulate);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Zen 4's blocking, the other CPUs', and the two mixed: every path through the tiles.
    const BLOCKINGS: [F32Blocking; 4] = [
        F32Blocking {
            reduction: 640,
            pack_plain: false,
        },
        F32Blocking {
            reduction: 256,
            pack_plain: true,
        },
        F32Blocking {
            reduction: 256,
            pack_plain: false,
        },
        F32Blocking {
            reduction: 640,
            pack_plain: true,
        },
    ];

    /// The f32 tiles give the f64 reference on ragged shapes (partial panels and tiles, several
    /// reduction blocks, both sides), plain and accumulating, on one thread and split, with
    /// every blocking.
    #[test]
    fn f32_tiles_equal_the_reference() {
        // The tiles themselves, whether or not this CPU's products use them by default.
        #[cfg(target_arch = "x86_64")]
        let available = x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let available = false;
        if !available {
            eprintln!("skipped: this CPU has no AVX-512 F for the f32 tiles");
            return;
        }
        let mut rng = crate::rng::Rng::new(17);
        for (m, rows, cols) in [
            (16, 70, 64),
            (31, 33, 700),
            (130, 96, 40),
            (17, 45, 1301),
            (200, 64, 576),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
            let wt = Weight { data: &w, rows, cols };
            for side in [Side::Transposed, Side::Plain] {
                let (k, n) = wt.dims(side);
                let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
                let base: Vec<f32> = (0..m * n).map(|_| rng.next_f32()).collect();
                for (accumulate, blocking) in [false, true].into_iter().flat_map(|acc| BLOCKINGS.map(|b| (acc, b))) {
                    for threads in [1, 2] {
                        let mut out = base.clone();
                        let tiles = |job: Job<f32>| tile_job_with(job, blocking);
                        split(wt, side, &a, m, &mut out, accumulate, threads, tiles).unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let mut s = if accumulate { base[i * n + j] as f64 } else { 0.0 };
                                for c in 0..k {
                                    let wv = match side {
                                        Side::Transposed => w[j * cols + c],
                                        Side::Plain => w[c * cols + j],
                                    };
                                    s += a[i * k + c] as f64 * wv as f64;
                                }
                                let g = out[i * n + j] as f64;
                                assert!(
                                    (g - s).abs() < 1e-5 * (1.0 + s.abs()) * (k as f64).sqrt(),
                                    "{side:?} {m}x{k}x{n} {blocking:?} at ({i}, {j}): {g} vs {s}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The input-gradient side's block packing lays out each panel as the scalar loop packs it,
    /// for a job's columns starting anywhere and ending in a partial panel.
    #[test]
    fn plain_block_packing_equals_the_scalar_loop() {
        let mut rng = crate::rng::Rng::new(9);
        let (rows, cols) = (50, 100);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
        let wt = Weight { data: &w, rows, cols };
        for ((c_lo, c_hi), k0, len) in [
            ((0usize, 100usize), 0, 50),
            ((32, 100), 7, 20),
            ((64, 96), 3, 1),
            ((0, 17), 10, 40),
        ] {
            let panels = (c_hi - c_lo).div_ceil(NR);
            let mut got = vec![1f32; panels * plain_panel_stride(len)];
            pack_plain_block(wt, (c_lo, c_hi), k0, len, &mut got);
            for j in 0..panels {
                let mut want = vec![0f32; len * NR];
                pack_f32(wt, Side::Plain, c_lo + j * NR, k0, len, &mut want);
                // Past `c_hi` the block is zero; past `n` so is the scalar panel.
                for p in 0..len {
                    for (c, v) in want[p * NR..][..NR].iter_mut().enumerate() {
                        if c_lo + j * NR + c >= c_hi {
                            *v = 0.0;
                        }
                    }
                }
                let at = j * plain_panel_stride(len);
                assert_eq!(
                    &got[at..][..len * NR],
                    &want[..],
                    "columns {c_lo}..{c_hi} panel {j} k0 {k0}"
                );
            }
        }
    }

    /// The register packing fills whole panels as the scalar loop does (full 16-value blocks
    /// and the rest).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn register_packing_equals_the_scalar_loop() {
        if !x86::available() {
            eprintln!("skipped: no AVX-512 F");
            return;
        }
        let mut rng = crate::rng::Rng::new(5);
        let (rows, cols) = (64, 100);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
        let wt = Weight { data: &w, rows, cols };
        for (c0, k0, len) in [(0, 0, 16), (32, 7, 20), (0, 3, 43), (32, 0, 100)] {
            let mut want = vec![0f32; len * NR];
            pack_f32(wt, Side::Transposed, c0, k0, len, &mut want);
            let mut got = vec![1f32; len * NR];
            // SAFETY: the CPU has the features; rows c0..c0+32 and values k0..k0+len are inside.
            unsafe { x86::pack_rows_f32(wt, c0, k0, len, &mut got) };
            assert_eq!(got, want, "c0 {c0} k0 {k0} len {len}");
        }
    }
}
