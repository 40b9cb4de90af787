//! CPU kernels for linear layers with frozen weights, each with its own backward pass:
//!
//! * `frozen_linear`: `y = x·Wᵀ`, gradient to `x` only. candle's matmul backward also computes
//!   `∂L/∂W` even when `W` is not trained — a third of all matmul work thrown away in LoRA.
//! * `lora_linear`: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` in one op, gradients to `x`, `A` and `B`. The
//!   composite version materialises three full-size `[tokens, out]` tensors per layer (the
//!   low-rank product, its scaled copy, the sum) and as many again in backward.
//!
//! Both call the `gemm` crate directly on f32 slices, except where Finch has its own kernel: one
//! input row goes to the matrix×vector kernel ([`crate::kernels::gemv`]), and on AVX-512 CPUs a
//! frozen f32 weight in a product of 16 or more rows to the register tiles of
//! [`crate::kernels::panel`] (bf16 weights always go to [`crate::kernels::bf16`]); other devices
//! and dtypes fall back to candle's ops in the callers.

#![allow(unsafe_code)]

use crate::kernels::bf16::Bf16Weight;
use crate::kernels::buffer::written_whole;
use crate::kernels::cpu::{self, Family};
use crate::kernels::narrow;
use crate::kernels::ops::{cpu_f32, slice, tensor_vec};
use crate::kernels::panel::{Side, Weight};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use std::sync::Arc;

use crate::kernels::quant::QMatrix;

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Element `(i, j)` at `data[i * rs + j * cs]`.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    pub(crate) fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, `dst` row-major, on all of the process's threads.
pub(crate) fn gemm_into(dst: &mut [f32], accumulate: bool, lhs: Mat, rhs: Mat) -> candle_core::Result<()> {
    gemm_into_on(dst, accumulate, lhs, rhs, cpu::threads())
}

/// [`gemm_into`] on `threads` threads (1 inside work that is already split across threads).
pub(crate) fn gemm_into_on(
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    threads: usize,
) -> candle_core::Result<()> {
    gemm_into_with(dst, accumulate, lhs, rhs, threads, cpu::family())
}

/// [`gemm_into_on`] with the kernels of `family` (one this CPU runs).
fn gemm_into_with(
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    threads: usize,
    family: Family,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || !lhs.in_bounds() || !rhs.in_bounds() {
        candle_core::bail!(
            "gemm: shapes do not fit ({m}x{k} · {}x{n} into {} values)",
            rhs.rows,
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    // One input row against a row-major weight (`rhs` is `Wᵀ`, so its columns are W's
    // contiguous rows): single-token decoding. gemm's matrix×vector path is far from the
    // memory bandwidth this product is bound by.
    if m == 1 && rhs.rs == 1 && (lhs.cs == 1 || k == 1) {
        return crate::kernels::gemv::gemv(
            dst,
            accumulate,
            &lhs.data[..k],
            rhs.data,
            rhs.cs.max(k),
            family,
            threads,
        );
    }
    // Tall products (prefill, training: hundreds of token rows) are split by rows over the spin
    // pool, each block one single-threaded gemm: gemm's own rayon split wakes a sleeping worker
    // for each of its parallel regions (~90 µs each on a 2-core Intel Xeon VM), and its workers
    // and the spin pool's would compete for the cores.
    if let Some(block) = row_block(m, threads) {
        crate::kernels::spin::for_each_chunk_mut(dst, block * n, |i, d| {
            let r0 = i * block;
            let rows = d.len() / n;
            let part = Mat {
                data: &lhs.data[r0 * lhs.rs..],
                rows,
                ..lhs
            };
            // SAFETY: `d` holds `rows·n` values; `part` is rows r0.. of `lhs`, in bounds
            // because `lhs` is (checked above).
            unsafe {
                gemm_f32(
                    rows,
                    n,
                    k,
                    d.as_mut_ptr(),
                    n,
                    accumulate,
                    part,
                    rhs,
                    gemm::Parallelism::None,
                    family,
                );
            }
        });
        return Ok(());
    }
    let parallelism = if threads > 1 && !crate::kernels::spin::in_task() {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index reached is inside its slice: checked above for lhs and rhs
    // (`in_bounds`) and for dst (m*n, row-major). The slices outlive the call.
    unsafe {
        gemm_f32(m, n, k, dst.as_mut_ptr(), n, accumulate, lhs, rhs, parallelism, family);
    }
    Ok(())
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` on the calling thread, into rows of `n` values
/// `ldd` apart (a block of columns of a wider output), with [`cpu::family`]'s kernels.
///
/// Safety: row `i < m` of `dst` is `dst + i·ldd .. + n`, writable and not read or written by
/// anything else during the call; `ldd ≥ n`.
pub(crate) unsafe fn gemm_block_into(
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || ldd < n || !lhs.in_bounds() || !rhs.in_bounds() {
        candle_core::bail!("gemm: shapes do not fit ({m}x{k} · {}x{n}, rows {ldd} apart)", rhs.rows)
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row `i` of `dst` (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * ldd), n) }.fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the caller's contract for `dst`; `lhs` and `rhs` are in bounds (checked above).
    unsafe {
        gemm_f32(
            m,
            n,
            k,
            dst,
            ldd,
            accumulate,
            lhs,
            rhs,
            gemm::Parallelism::None,
            cpu::family(),
        );
    }
    Ok(())
}

/// One thread's share of a product with a frozen f32 weight through gemm, written into its
/// block of the output: its token rows (the split of [`gemm_into_on`]) or, for a product of
/// a few hundred rows and many columns, its share of the output columns (`panel::split`).
/// Split by rows, each thread packs the whole weight on every call: for the output head's
/// chunks of 341 rows, 113 MB of SmolLM2's head per thread and chunk.
pub(crate) fn gemm_job(job: crate::kernels::panel::Job<f32>) -> candle_core::Result<()> {
    let crate::kernels::panel::Job {
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
    let (k, width) = (w.dims(side).0, c_hi - c_lo);
    let rhs = match side {
        // Output columns are weight rows.
        Side::Transposed => Mat::row_major(&w.data[c_lo * w.cols..c_hi * w.cols], width, w.cols).t(),
        // Output columns are weight columns: `w[·, c_lo..c_hi]`.
        Side::Plain => Mat::strided(&w.data[c_lo..], w.rows, width, w.cols, 1),
    };
    // SAFETY: rows `0..m`, columns `c_lo..c_hi` of `out` (rows `ldc` apart) belong to this job.
    unsafe { gemm_block_into(out.add(c_lo), ldc, accumulate, Mat::row_major(a, m, k), rhs) }
}

/// How each job of `panel::split` multiplies by a frozen f32 weight in a product of `m` token
/// rows: Finch's AVX-512 tiles where [`crate::kernels::panel::f32_tiles`] takes such a product,
/// the AVX2 row tile where [`crate::kernels::rowdot::takes`] does, otherwise gemm ([`gemm_job`]).
fn f32_job(m: usize) -> fn(crate::kernels::panel::Job<f32>) -> candle_core::Result<()> {
    if crate::kernels::panel::f32_tiles(m) {
        crate::kernels::panel::tile_job
    } else if crate::kernels::rowdot::takes(m) {
        crate::kernels::rowdot::job
    } else {
        gemm_job
    }
}

/// Fewest rows of a block when a product is split by rows over the spin pool.
const SPLIT_ROWS: usize = 64;

/// Rows per task when a product of `m` rows on `threads` threads is split by rows over the spin
/// pool (at least [`SPLIT_ROWS`] each, one task per thread), or `None` when it is not: too few
/// rows, one thread, or already inside a pool task.
pub(crate) fn row_block(m: usize, threads: usize) -> Option<usize> {
    let pool = crate::kernels::spin::threads();
    if threads > 1 && pool > 1 && m >= 2 * SPLIT_ROWS && !crate::kernels::spin::in_task() {
        Some(m.div_ceil(threads.min(pool).min(m / SPLIT_ROWS)))
    } else {
        None
    }
}

/// `dst (+)= lhs·rhs` through the gemm crate, with the kernel family [`cpu::family`] chose.
///
/// gemm 0.19 picks its microkernels from the CPU's features alone (no switch). Its generic
/// driver and per-family microkernels are public (`gemm_common::gemm::gemm_basic_generic`,
/// `gemm_f32::microkernel::{fma, scalar}`), so a family below the CPU's best calls the driver
/// with that family's microkernels, exactly as gemm's own dispatch (`gemm_def!`) would on such a
/// CPU. candle's own matmuls (outside Finch's kernels: the decode attention scores) keep gemm's
/// choice.
///
/// Safety: `dst` holds `m` rows of `n` values, row `i` starting at `dst + i·ldd` (`ldd ≥ n`),
/// and every element of `lhs` and `rhs` reached is inside its slice.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallelism: gemm::Parallelism,
    family: Family,
) {
    let best = cpu::best();
    // LoRA's rank side (`h = x·Aᵀ`, `∂h = g·B`): at most 16 output columns, rows read in place.
    if n <= narrow::MAX_COLS && lhs.cs == 1 {
        // SAFETY: the caller's guarantees on `dst`, `lhs` and `rhs`, restated for the kernel.
        let done = unsafe {
            narrow::product(
                family,
                (m, n, k),
                dst,
                ldd,
                accumulate,
                (lhs.data, lhs.rs),
                (rhs.data, rhs.rs, rhs.cs),
            )
        };
        if done {
            return;
        }
    }
    // At most 16 output columns from a column-major left side (LoRA's `∂B = gᵀ·h`): gemm's front
    // end would compute the transpose, putting the 16 columns in its tile's rows (the `x1x6`
    // kernel, see `narrow`'s module doc). Untransposed they are the tile's columns and the left
    // side is read in place. One thread, Intel Xeon (family 6 model 207), [576, 136]·[136, 16]:
    // 105–110 GFLOP/s against 77–89; at 32 columns gemm's way was faster (151 against 107).
    #[cfg(target_arch = "x86_64")]
    let untransposed = family == Family::Avx512 && n <= narrow::MAX_COLS && lhs.rs == 1 && m > n;
    #[cfg(target_arch = "x86_64")]
    if family < best || untransposed {
        // As gemm's front end (`gemm::gemm`) does, a row-major destination is computed as its
        // transpose, dstᵀ = rhsᵀ·lhsᵀ (the microkernels prefer a column-major one), except
        // `untransposed` products.
        // `dst = a·b`, element (i, j) of `dst` at `i·dst_rs + j·dst_cs`.
        let (a, b, dst_rs, dst_cs) = if untransposed {
            (lhs, rhs, ldd as isize, 1isize)
        } else {
            (rhs.t(), lhs.t(), 1isize, ldd as isize)
        };
        let (mm, nn) = (a.rows, b.cols);
        let (l, l_cs, l_rs) = (a.data.as_ptr(), a.cs as isize, a.rs as isize);
        let (r, r_cs, r_rs) = (b.data.as_ptr(), b.cs as isize, b.rs as isize);
        macro_rules! basic {
            // `n`: f32 lanes of the family's vectors (the value gemm's `gemm_def!` gives it).
            ($simd:expr, $n:expr, $($u:ident)::+) => {
                gemm_common::gemm::gemm_basic_generic::<
                    _,
                    f32,
                    $n,
                    { $($u)::+::MR_DIV_N * $n },
                    { $($u)::+::NR },
                    { $($u)::+::MR_DIV_N },
                    { $($u)::+::H_M },
                    { $($u)::+::H_N },
                >(
                    $simd,
                    mm,
                    nn,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    accumulate,
                    l,
                    l_cs,
                    l_rs,
                    r,
                    r_cs,
                    r_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    |a, b, c| a * b + c,
                    &$($u)::+::UKR,
                    &$($u)::+::H_UKR,
                    false,
                    parallelism,
                )
            };
        }
        match family {
            Family::Avx512 => match gemm_common::simd::V4::try_new() {
                Some(simd) => basic!(simd, 16, gemm_f32::microkernel::avx512f::f32),
                None => basic!(gemm_common::simd::Scalar, 1, gemm_f32::microkernel::scalar::f32),
            },
            Family::Avx2 => match gemm_common::simd::V3::try_new() {
                Some(simd) => basic!(simd, 8, gemm_f32::microkernel::fma::f32),
                None => basic!(gemm_common::simd::Scalar, 1, gemm_f32::microkernel::scalar::f32),
            },
            _ => basic!(gemm_common::simd::Scalar, 1, gemm_f32::microkernel::scalar::f32),
        }
        return;
    }
    let _ = (family, best);
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// A dense frozen weight `[out, in]`, row-major: f32, or bf16 multiplied through
/// [`crate::kernels::bf16`] (`--precision bf16` on the CPU).
#[derive(Clone, Copy)]
pub(crate) enum Dense<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl Dense<'_> {
    /// The number of values.
    pub(crate) fn len(&self) -> usize {
        match self {
            Dense::F32(w) => w.len(),
            Dense::Bf16(w) => w.len(),
        }
    }

    /// The contiguous values of a CPU storage holding f32 or bf16.
    fn of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Dense<'a>> {
        match s {
            CpuStorage::BF16(data) => match l.contiguous_offsets() {
                Some((a, b)) => Ok(Dense::Bf16(&data[a..b])),
                None => candle_core::bail!("linear kernel: the weight must be contiguous"),
            },
            _ => Ok(Dense::F32(slice(s, l, "weight")?)),
        }
    }

    /// `y[m, out] (+)= x[m, in]·Wᵀ` on `threads` threads.
    pub(crate) fn times_t_into(
        self,
        dims: (usize, usize),
        x: &[f32],
        m: usize,
        y: &mut [f32],
        accumulate: bool,
        threads: usize,
    ) -> candle_core::Result<()> {
        self.product(dims, Side::Transposed, x, m, y, accumulate, threads)
    }

    /// `dx[m, in] (+)= g[m, out]·W` on `threads` threads.
    pub(crate) fn times_into(
        self,
        dims: (usize, usize),
        g: &[f32],
        m: usize,
        dx: &mut [f32],
        accumulate: bool,
        threads: usize,
    ) -> candle_core::Result<()> {
        self.product(dims, Side::Plain, g, m, dx, accumulate, threads)
    }

    /// `dst (+)= a·Wᵀ` or `a·W` (`side`) for the weight `W: [out, in]`.
    #[allow(clippy::too_many_arguments)]
    fn product(
        self,
        (out, k): (usize, usize),
        side: Side,
        a: &[f32],
        m: usize,
        dst: &mut [f32],
        accumulate: bool,
        threads: usize,
    ) -> candle_core::Result<()> {
        match self {
            // Products of 256 token rows or more go to `panel::split` (by rows, or, with fewer
            // than 256 rows a thread, by output columns: the output head's chunks of the
            // vocabulary), and so do shorter ones where the tiles take them (AVX-512) or, on
            // the AVX2 family, the row tile (`kernels::rowdot`: a prompt's forward products; its
            // input gradients through gemm split by columns). Other short products stay on
            // `gemm_into_on`: one-row decoding's gemv, and products of fewer than 16 rows.
            Dense::F32(w)
                if m >= crate::kernels::panel::GEMM_FROM_ROWS
                    || crate::kernels::panel::f32_tiles(m)
                    || crate::kernels::rowdot::takes(m) =>
            {
                let w = Weight {
                    data: w,
                    rows: out,
                    cols: k,
                };
                let job = f32_job(m);
                crate::kernels::panel::split(w, side, a, m, dst, accumulate, threads, job)
            }
            Dense::F32(w) => {
                let w = Mat::row_major(w, out, k);
                let (rhs, red) = match side {
                    Side::Transposed => (w.t(), k),
                    Side::Plain => (w, out),
                };
                gemm_into_on(dst, accumulate, Mat::row_major(a, m, red), rhs, threads)
            }
            Dense::Bf16(w) => {
                let w = Bf16Weight {
                    data: w,
                    rows: out,
                    cols: k,
                };
                crate::kernels::bf16::product(w, side, a, m, dst, accumulate, threads)
            }
        }
    }
}

/// Runs `f` on the contiguous values of a dense f32 or bf16 CPU weight without copying them.
pub(crate) fn with_dense<R>(w: &Tensor, f: impl FnOnce(Dense) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("linear kernel: expected a CPU tensor")
    };
    f(Dense::of(cpu, layout)?)
}

/// Whether `w` is a bf16 CPU weight the fused kernels multiply ([`crate::kernels::bf16`]).
fn cpu_bf16(w: &Tensor) -> bool {
    w.device().is_cpu()
        && w.dtype() == candle_core::DType::BF16
        && crate::kernels::kernel_path() == crate::kernels::KernelPath::Fused
}

/// Whether the fused kernels take `w` as a dense frozen weight: f32 or bf16 on the CPU.
pub(crate) fn cpu_dense(w: &Tensor) -> bool {
    cpu_f32(w) || cpu_bf16(w)
}

fn matmul(lhs: Mat, rhs: Mat) -> candle_core::Result<Vec<f32>> {
    let mut dst = written_whole(lhs.rows * rhs.cols);
    gemm_into(&mut dst, false, lhs, rhs)?;
    Ok(dst)
}

/// Runs `f` on the contiguous f32 data of a CPU tensor without copying it.
pub(crate) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("linear kernel: expected a CPU tensor")
    };
    f(slice(cpu, layout, "weight")?)
}

/// `(rows, in)` of an input `[.., in]` checked against a weight `[out, in]`.
fn input_rows(x: &Shape, in_features: usize) -> candle_core::Result<(usize, Vec<usize>)> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear kernel: input is a scalar")
    };
    if k != in_features {
        candle_core::bail!("linear kernel: input has {k} features, weight expects {in_features}")
    }
    Ok((lead.iter().product(), lead.to_vec()))
}

// ---------------------------------------------------------------- frozen linear

struct FrozenMatmul;

/// `x: [.., in]`, `w: [out, in]` → `[.., out]`. Gradients flow to `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_f32(x) && cpu_dense(w) {
        x.contiguous()?.apply_op2(&w.contiguous()?, FrozenMatmul)
    } else if x.dtype() != w.dtype() {
        // A bf16 weight under an f32 model (`--precision bf16` on the CPU) on the composite path:
        // the weight widened, the input rounded to bf16 as the kernel rounds it.
        let xr = x.to_dtype(w.dtype())?.to_dtype(x.dtype())?;
        xr.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)
    } else {
        // Other devices and dtypes use candle's matmul (its backward also computes dW,
        // which is wasted but correct).
        x.broadcast_matmul(&w.t()?)
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "input")?;
        let w = Dense::of(s2, l2)?;
        let (out, k) = l2.shape().dims2()?;
        let (m, mut shape) = input_rows(l1.shape(), k)?;
        let mut y = written_whole(m * out);
        w.times_t_into((out, k), x, m, &mut y, false, cpu::threads())?;
        shape.push(out);
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let m = grad.elem_count() / out.max(1);
        let mut dx = written_whole(m * k);
        with_slice(grad, |g| {
            with_dense(w, |w| w.times_into((out, k), g, m, &mut dx, false, cpu::threads()))
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None))
    }
}

// ---------------------------------------------------------------- quantized frozen linear

struct QuantizedMatmul {
    w: Arc<QMatrix>,
}

/// `x: [.., in]` times a frozen GGUF-block weight `w: [out, in]` (Q8_0/Q4_1) → `[.., out]`, in
/// f32 from panels of dequantized rows ([`crate::kernels::quant::matmul_f32`]); the backward
/// pass gives `∂x = ∂y·W` the same way. The f32 weight never exists whole: this is what lets a
/// quantized base train in a fraction of the f32 base's memory. CPU f32 inputs only.
pub fn quantized_linear(x: &Tensor, w: &Arc<QMatrix>) -> candle_core::Result<Tensor> {
    if !cpu_f32(x) {
        candle_core::bail!(
            "a quantized base weight needs f32 inputs on the CPU (--precision q8_0/q4_1 trains on the CPU only)"
        )
    }
    x.contiguous()?.apply_op1(QuantizedMatmul { w: w.clone() })
}

fn qerr(e: crate::kernels::quant::QError) -> candle_core::Error {
    candle_core::Error::Msg(format!("quantized linear: {e}"))
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "quantized-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "input")?;
        let (m, mut shape) = input_rows(l.shape(), self.w.cols())?;
        let mut y = written_whole(m * self.w.rows());
        crate::kernels::quant::matmul_f32(&self.w, x, m, &mut y).map_err(qerr)?;
        shape.push(self.w.rows());
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let m = grad.elem_count() / self.w.rows().max(1);
        let mut dx = written_whole(m * self.w.cols());
        with_slice(grad, |g| {
            crate::kernels::quant::matmul_f32_backward(&self.w, g, m, &mut dx).map_err(qerr)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

// ---------------------------------------------------------------- fused LoRA linear

/// The frozen weight of a fused LoRA linear: f32 or bf16 values, or GGUF blocks read through
/// panels of dequantized rows.
enum Base {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

impl Base {
    /// `(out, in)`.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Base::Dense(w) => w.dims2(),
            Base::Quantized(q) => Ok((q.rows(), q.cols())),
        }
    }

    fn shape(&self) -> Vec<usize> {
        self.dims().map(|(o, i)| vec![o, i]).unwrap_or_default()
    }

    /// `x·Wᵀ` for `x: [m, in]`.
    fn times_t(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let (out, k) = self.dims()?;
        let mut y = written_whole(m * out);
        match self {
            Base::Dense(w) => with_dense(w, |w| w.times_t_into((out, k), x, m, &mut y, false, cpu::threads()))?,
            Base::Quantized(q) => crate::kernels::quant::matmul_f32(q, x, m, &mut y).map_err(qerr)?,
        }
        Ok(y)
    }

    /// `g·W` for `g: [m, out]`.
    fn times(&self, g: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let (out, k) = self.dims()?;
        let mut dx = written_whole(m * k);
        match self {
            Base::Dense(w) => with_dense(w, |w| w.times_into((out, k), g, m, &mut dx, false, cpu::threads()))?,
            Base::Quantized(q) => crate::kernels::quant::matmul_f32_backward(q, g, m, &mut dx).map_err(qerr)?,
        }
        Ok(dx)
    }
}

struct LoraMatmul {
    w: Base,
    scale: f32,
    /// The frozen bias `[out]`, added last (as `y + b` after the op would add it). Inside the
    /// op, the graph keeps no bias-free copy of the output: 113 MB of q/k/v at Qwen2.5-0.5B
    /// shapes, b4×256.
    bias: Option<Vec<f32>>,
}

/// A frozen bias's values for [`LoraMatmul`].
fn bias_values(bias: Option<&Tensor>) -> candle_core::Result<Option<Vec<f32>>> {
    bias.map(|b| tensor_vec(&b.to_dtype(candle_core::DType::F32)?))
        .transpose()
}

/// `y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias)` with `W: [out, in]` and `bias: [out]` frozen,
/// `A: [r, in]`, `B: [out, r]`. Gradients flow to `x`, `A` and `B`. CPU f32 only; callers fall
/// back to composite ops.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let op = LoraMatmul {
        w: Base::Dense(w.contiguous()?),
        scale: scale as f32,
        bias: bias_values(bias)?,
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// [`lora_linear`] over a quantized frozen weight (see [`quantized_linear`]); CPU f32 `x`, `A`
/// and `B` only ([`lora_linear_supported`] with any f32 CPU tensor as the weight).
pub fn lora_linear_quantized(
    x: &Tensor,
    w: &Arc<QMatrix>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let op = LoraMatmul {
        w: Base::Quantized(w.clone()),
        scale: scale as f32,
        bias: bias_values(bias)?,
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// Whether `lora_linear` can run on these tensors (`w` f32 or bf16).
pub fn lora_linear_supported(x: &Tensor, w: &Tensor, a: &Tensor) -> bool {
    cpu_f32(x) && cpu_dense(w) && cpu_f32(a)
}

impl LoraMatmul {
    /// The forward product without the split by token blocks (quantized bases, few tokens).
    fn forward_unsplit(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        (m, k, out, r): (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
        let xm = Mat::row_major(x, m, k);
        let mut y = self.w.times_t(x, m)?;
        // The rank-r products of a few tokens (decoding) are far too small to share between
        // threads: dispatching them cost more than computing them (25 vs 38 tokens/s decode).
        let threads = if m * r * (k + out) < 1 << 20 { 1 } else { cpu::threads() };
        let mut h = vec![0f32; m * r];
        gemm_into_on(&mut h, false, xm, Mat::row_major(a, r, k).t(), threads)?;
        h.iter_mut().for_each(|v| *v *= self.scale);
        gemm_into_on(
            &mut y,
            true,
            Mat::row_major(&h, m, r),
            Mat::row_major(b, out, r).t(),
            threads,
        )?;
        Ok(y)
    }
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "input")?;
        let a = slice(s2, l2, "lora_A")?;
        let b = slice(s3, l3, "lora_B")?;
        let (out, k) = self.w.dims()?;
        let (r, ka) = l2.shape().dims2()?;
        let (ob, rb) = l3.shape().dims2()?;
        if ka != k || ob != out || rb != r {
            candle_core::bail!(
                "lora_linear: A {:?} and B {:?} do not fit W {:?}",
                l2.shape(),
                l3.shape(),
                self.w.shape()
            )
        }
        if self.bias.as_ref().is_some_and(|bias| bias.len() != out) {
            candle_core::bail!(
                "lora_linear: a bias of {:?} values for {out} outputs",
                self.bias.as_ref().map(Vec::len)
            )
        }
        let (m, mut shape) = input_rows(l1.shape(), k)?;
        shape.push(out);
        let mut y = if let (Base::Dense(w), Some(block)) = (&self.w, token_block(m)) {
            with_dense(w, |w| match w {
                Dense::F32(wf) if lora_by_columns(&w, block) => {
                    lora_forward_columns(x, wf, a, b, (m, k, out, r), self.scale, block)
                }
                _ => lora_forward_split(x, w, a, b, (m, k, out, r), self.scale, block),
            })?
        } else {
            self.forward_unsplit(x, a, b, (m, k, out, r))?
        };
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, k) = self.w.dims()?;
        let (r, _) = a.dims2()?;
        let m = grad.elem_count() / out.max(1);
        let (av, bv) = (tensor_vec(a)?, tensor_vec(b)?);
        if let (Base::Dense(w), Some(block)) = (&self.w, token_block(m)) {
            let (dx, da, db) = with_slice(x, |xv| {
                with_slice(grad, |g| {
                    with_dense(w, |w| match w {
                        Dense::F32(wf) if lora_by_columns(&w, block) => {
                            lora_backward_columns(xv, g, wf, &av, &bv, (m, k, out, r), self.scale, block)
                        }
                        _ => lora_backward_split(xv, g, w, &av, &bv, (m, k, out, r), self.scale, block),
                    })
                })
            })?;
            return Ok((
                Some(Tensor::from_vec(dx, x.shape(), x.device())?),
                Some(Tensor::from_vec(da, (r, k), a.device())?),
                Some(Tensor::from_vec(db, (out, r), b.device())?),
            ));
        }
        let (am, bm) = (Mat::row_major(&av, r, k), Mat::row_major(&bv, out, r));
        // x and the incoming gradient are the large operands: read in place, not copied.
        let (dx, da, db) = with_slice(x, |xv| {
            with_slice(grad, |g| {
                let (xm, gm) = (Mat::row_major(xv, m, k), Mat::row_major(g, m, out));
                // h = s·x·Aᵀ (recomputed: [m, r] is cheap), dh = s·g·B.
                let mut h = matmul(xm, am.t())?;
                h.iter_mut().for_each(|v| *v *= self.scale);
                let mut dh = matmul(gm, bm)?;
                dh.iter_mut().for_each(|v| *v *= self.scale);
                let db = matmul(gm.t(), Mat::row_major(&h, m, r))?;
                let dhm = Mat::row_major(&dh, m, r);
                let da = matmul(dhm.t(), xm)?;
                let mut dx = self.w.times(g, m)?;
                gemm_into(&mut dx, true, dhm, am)?;
                Ok((dx, da, db))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(da, (r, k), a.device())?),
            Some(Tensor::from_vec(db, (out, r), b.device())?),
        ))
    }
}

/// Token rows per task when a fused LoRA product over a dense base is split by tokens over the
/// spin pool (the split [`gemm_into_on`] gives a tall product), or `None` when it is not split.
fn token_block(m: usize) -> Option<usize> {
    row_block(m, cpu::threads())
}

/// Runs `f(task, rows r0.., dst)` for each block of `block` token rows of the row-major
/// `[m, width]` `dst` on the spin pool; the first error is returned.
fn for_token_blocks(
    dst: &mut [f32],
    width: usize,
    block: usize,
    f: impl Fn(usize, usize, &mut [f32]) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    let error = crate::kernels::spin::FirstError::new();
    crate::kernels::spin::for_each_chunk_mut(dst, block * width, |i, d| error.keep(f(i, i * block, d)));
    error.result()
}

/// Whether a fused LoRA product of `m` token rows over `w` goes through [`lora_forward_columns`]
/// and [`lora_backward_columns`]: an f32 weight, and a split by rows that would leave each thread
/// fewer than `panel::COLUMN_SPLIT_BELOW` rows (short rows: a batch of 4 × ~68 chat tokens is 272
/// rows, 136 a thread).
fn lora_by_columns(w: &Dense, block: usize) -> bool {
    matches!(w, Dense::F32(_)) && block < crate::kernels::panel::COLUMN_SPLIT_BELOW
}

/// `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for a product of a few hundred token rows, in two hand-offs to the
/// threads: the rank-`r` `h = s·x·Aᵀ` split by token rows, then the base product split as
/// `panel::split` splits it (by output columns at these sizes), each job adding `h·Bᵀ` to its
/// own block of `y`. Split by rows, each thread would pack the whole weight for its half of the
/// rows; by columns it packs half of the weight for all of them. On an Intel Xeon (family 6
/// model 207), 272 rows on two threads, gemm split by columns ran the step's products at
/// 210–294 GFLOP/s against 139–232 split by rows (docs/performance.md, nineteenth session).
fn lora_forward_columns(
    x: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    (m, k, out, r): (usize, usize, usize, usize),
    scale: f32,
    block: usize,
) -> candle_core::Result<Vec<f32>> {
    let at = Mat::row_major(a, r, k).t();
    let mut h = written_whole(m * r);
    for_token_blocks(&mut h, r, block, |_, r0, hd| {
        let rows = hd.len() / r;
        scaled_into(hd, Mat::row_major(&x[r0 * k..(r0 + rows) * k], rows, k), at, scale)
    })?;
    let weight = Weight {
        data: w,
        rows: out,
        cols: k,
    };
    // `Bᵀ[:, c_lo..c_hi]`: rows `c_lo..c_hi` of `B: [out, r]`, transposed.
    base_plus_low_rank(weight, Side::Transposed, x, m, (&h, r), |c_lo, c_hi| {
        Mat::row_major(&b[c_lo * r..c_hi * r], c_hi - c_lo, r).t()
    })
}

/// `a·Wᵀ` or `a·W` (`side`) plus `low·F`, with `low: [m, r]` and `factor(c_lo, c_hi)` the
/// `[r, c_hi - c_lo]` block of `F` for a job's output columns: the base product split as
/// `panel::split` splits it, each job adding its own block's low-rank term.
fn base_plus_low_rank<'f>(
    w: Weight<f32>,
    side: Side,
    a: &[f32],
    m: usize,
    (low, r): (&[f32], usize),
    factor: impl Fn(usize, usize) -> Mat<'f> + Sync,
) -> candle_core::Result<Vec<f32>> {
    let mut out = written_whole(m * w.dims(side).1);
    let base = f32_job(m);
    crate::kernels::panel::split(w, side, a, m, &mut out, false, cpu::threads(), |job| {
        base(job)?;
        let (c_lo, c_hi) = job.cols;
        let lp = Mat::row_major(&low[job.row0 * r..(job.row0 + job.m) * r], job.m, r);
        // SAFETY: rows `0..job.m`, columns `c_lo..c_hi` of the job's output belong to this job.
        unsafe { gemm_block_into(job.out.add(c_lo), job.ldc, true, lp, factor(c_lo, c_hi)) }
    })?;
    Ok(out)
}

/// The backward pass of [`lora_forward_columns`], in two hand-offs: split by token rows,
/// `h = s·x·Aᵀ`, `∂h = s·g·B` and each block's share of `∂A = ∂hᵀ·x` and `∂B = gᵀ·h` (summed in
/// block order); then `∂x = g·W + ∂h·A` split as `panel::split` splits it, each job adding
/// `∂h·A` to its own block of `∂x`.
#[allow(clippy::too_many_arguments)]
fn lora_backward_columns(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    (m, k, out, r): (usize, usize, usize, usize),
    scale: f32,
    block: usize,
) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (am, bm) = (Mat::row_major(a, r, k), Mat::row_major(b, out, r));
    let mut h = written_whole(m * r);
    let mut dh = written_whole(m * r);
    let shares = std::sync::Mutex::new(Vec::new());
    let error = crate::kernels::spin::FirstError::<candle_core::Error>::new();
    crate::kernels::spin::for_each_chunk_mut2((&mut h, block * r), (&mut dh, block * r), |i, hd, dhd| {
        error.keep((|| {
            let (r0, rows) = (i * block, hd.len() / r);
            let xp = Mat::row_major(&x[r0 * k..(r0 + rows) * k], rows, k);
            let gp = Mat::row_major(&g[r0 * out..(r0 + rows) * out], rows, out);
            let (da, db) = low_rank_block(xp, gp, (am, bm), scale, hd, dhd)?;
            shares.lock().unwrap_or_else(|p| p.into_inner()).push((i, da, db));
            Ok(())
        })())
    });
    error.result()?;
    let (da, db) = sum_shares(shares.into_inner().unwrap_or_else(|p| p.into_inner()), (r, k, out));
    let weight = Weight {
        data: w,
        rows: out,
        cols: k,
    };
    // `A[:, c_lo..c_hi]`.
    let dx = base_plus_low_rank(weight, Side::Plain, g, m, (&dh, r), |c_lo, c_hi| {
        Mat::strided(&a[c_lo..], r, c_hi - c_lo, k, 1)
    })?;
    Ok((dx, da, db))
}

/// `dst = scale·(lhs·rhs)` on the calling thread: the rank-`r` products `h = s·x·Aᵀ` and
/// `∂h = s·g·B` of a block of tokens.
fn scaled_into(dst: &mut [f32], lhs: Mat, rhs: Mat, scale: f32) -> candle_core::Result<()> {
    gemm_into_on(dst, false, lhs, rhs, 1)?;
    dst.iter_mut().for_each(|v| *v *= scale);
    Ok(())
}

/// A block of tokens' low-rank products in the fused LoRA backward pass, on the calling thread:
/// `h = s·x·Aᵀ` and `∂h = s·g·B` into `h` and `dh` (`[rows, r]`), and the block's shares of
/// `∂A = ∂hᵀ·x` and `∂B = gᵀ·h`, returned. `x: [rows, in]`, `g: [rows, out]`, `A: [r, in]`,
/// `B: [out, r]`.
fn low_rank_block(
    x: Mat,
    g: Mat,
    (a, b): (Mat, Mat),
    scale: f32,
    h: &mut [f32],
    dh: &mut [f32],
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let (rows, r) = (x.rows, a.rows);
    scaled_into(h, x, a.t(), scale)?;
    scaled_into(dh, g, b, scale)?;
    let mut db = vec![0f32; b.rows * r];
    gemm_into_on(&mut db, false, g.t(), Mat::row_major(h, rows, r), 1)?;
    let mut da = vec![0f32; r * a.cols];
    gemm_into_on(&mut da, false, Mat::row_major(dh, rows, r).t(), x, 1)?;
    Ok((da, db))
}

/// `∂A` and `∂B` from the token blocks' shares `(block, ∂A share, ∂B share)`, summed in block
/// order (the same sums for the same split on every run).
fn sum_shares(
    mut shares: Vec<(usize, Vec<f32>, Vec<f32>)>,
    (r, k, out): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    shares.sort_by_key(|s| s.0);
    let mut parts = shares.into_iter();
    let (_, mut da, mut db) = parts.next().unwrap_or((0, vec![0f32; r * k], vec![0f32; out * r]));
    for (_, pa, pb) in parts {
        da.iter_mut().zip(&pa).for_each(|(d, v)| *d += v);
        db.iter_mut().zip(&pb).for_each(|(d, v)| *d += v);
    }
    (da, db)
}

/// `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with each thread doing all three products for its own block of
/// tokens: one hand-off to the threads per layer instead of three, and the block's `x` read
/// from the core's own cache by the low-rank product right after the base product read it.
/// `dims` is `(m, in, out, rank)`.
fn lora_forward_split(
    x: &[f32],
    w: Dense,
    a: &[f32],
    b: &[f32],
    (m, k, out, r): (usize, usize, usize, usize),
    scale: f32,
    block: usize,
) -> candle_core::Result<Vec<f32>> {
    let mut y = written_whole(m * out);
    let (at, bt) = (Mat::row_major(a, r, k).t(), Mat::row_major(b, out, r).t());
    for_token_blocks(&mut y, out, block, |_, r0, yd| {
        let rows = yd.len() / out;
        let xs = &x[r0 * k..(r0 + rows) * k];
        let xp = Mat::row_major(xs, rows, k);
        w.times_t_into((out, k), xs, rows, yd, false, 1)?;
        let mut h = vec![0f32; rows * r];
        scaled_into(&mut h, xp, at, scale)?;
        gemm_into_on(yd, true, Mat::row_major(&h, rows, r), bt, 1)
    })?;
    Ok(y)
}

/// The backward pass of [`lora_forward_split`]: each thread computes, for its block of tokens,
/// `∂x = g·W + s·(g·B)·A` and its share of `∂A = s·(g·B)ᵀ·x` and `∂B = gᵀ·s·(x·Aᵀ)`; the shares
/// are summed in block order (the same sums for the same split on every run).
#[allow(clippy::too_many_arguments)]
fn lora_backward_split(
    x: &[f32],
    g: &[f32],
    w: Dense,
    a: &[f32],
    b: &[f32],
    (m, k, out, r): (usize, usize, usize, usize),
    scale: f32,
    block: usize,
) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let mut dx = written_whole(m * k);
    let (am, bm) = (Mat::row_major(a, r, k), Mat::row_major(b, out, r));
    let shares = std::sync::Mutex::new(Vec::new());
    for_token_blocks(&mut dx, k, block, |i, r0, dxd| {
        let rows = dxd.len() / k;
        let xp = Mat::row_major(&x[r0 * k..(r0 + rows) * k], rows, k);
        let gs = &g[r0 * out..(r0 + rows) * out];
        let gp = Mat::row_major(gs, rows, out);
        let (mut h, mut dh) = (vec![0f32; rows * r], vec![0f32; rows * r]);
        let (da, db) = low_rank_block(xp, gp, (am, bm), scale, &mut h, &mut dh)?;
        w.times_into((out, k), gs, rows, dxd, false, 1)?;
        gemm_into_on(dxd, true, Mat::row_major(&dh, rows, r), am, 1)?;
        shares.lock().unwrap_or_else(|p| p.into_inner()).push((i, da, db));
        Ok(())
    })?;
    let (da, db) = sum_shares(shares.into_inner().unwrap_or_else(|p| p.into_inner()), (r, k, out));
    Ok((dx, da, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_matmul_and_gives_w_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let y_ref = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(crate::testing::max_abs_diff(&y, &y_ref) < 1e-5);
        let c = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(crate::testing::max_abs_diff(g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap()) < 1e-5);
        assert!(g.get(&w).is_none(), "the frozen weight must get no gradient");
    }

    /// Every kernel family this CPU runs (forced with `FINCH_CPU` in the binary) against an
    /// f64 reference: matrix products of training shapes through gemm, one-row products
    /// (decoding) through the gemv kernel, and products of at most 16 columns (LoRA's rank
    /// side: the narrow kernel from a row-major left side, gemm untransposed from a column-major
    /// one), plain and accumulating.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn every_family_gives_the_same_products() {
        let mut rng = crate::rng::Rng::new(4);
        for (m, k, n) in [
            (1, 576, 300),
            (1, 7, 5),
            (3, 40, 33),
            (70, 96, 130),
            (150, 136, 16),
            (40, 70, 9),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32() - 0.5).collect();
            let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.next_f32() - 0.5).collect();
            let base: Vec<f32> = (0..m * n).map(|_| rng.next_f32()).collect();
            let lhs_ways = [Mat::row_major(&a, m, k), Mat::row_major(&a_t, k, m).t()];
            for (family, lhs) in Family::available().into_iter().flat_map(|f| lhs_ways.map(|l| (f, l))) {
                for accumulate in [false, true] {
                    let mut y = base.clone();
                    let rhs = Mat::row_major(&w, n, k).t();
                    gemm_into_with(&mut y, accumulate, lhs, rhs, 2, family).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|c| a[i * k + c] as f64 * w[j * k + c] as f64).sum();
                            let want = dot + if accumulate { base[i * n + j] as f64 } else { 0.0 };
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{family:?} {m}x{k}x{n} at ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A frozen f32 weight's products of a few hundred token rows (the output head's chunks),
    /// which gemm runs split by output columns over the threads, on both sides, plain and
    /// accumulating, against an f64 reference.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn column_split_products_match_an_f64_reference() {
        let mut rng = crate::rng::Rng::new(6);
        let (m, out, k) = (300, 200, 70);
        let w: Vec<f32> = (0..out * k).map(|_| rng.next_f32() - 0.5).collect();
        for side in [Side::Transposed, Side::Plain] {
            let (red, n) = if side == Side::Transposed { (k, out) } else { (out, k) };
            let a: Vec<f32> = (0..m * red).map(|_| rng.next_f32() - 0.5).collect();
            let base: Vec<f32> = (0..m * n).map(|_| rng.next_f32()).collect();
            for accumulate in [false, true] {
                for threads in [1, 2] {
                    let mut y = base.clone();
                    let dense = Dense::F32(&w);
                    match side {
                        Side::Transposed => dense.times_t_into((out, k), &a, m, &mut y, accumulate, threads),
                        Side::Plain => dense.times_into((out, k), &a, m, &mut y, accumulate, threads),
                    }
                    .unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..red)
                                .map(|c| {
                                    let wv = if side == Side::Transposed {
                                        w[j * k + c]
                                    } else {
                                        w[c * k + j]
                                    };
                                    a[i * red + c] as f64 * wv as f64
                                })
                                .sum();
                            let want = dot + if accumulate { base[i * n + j] as f64 } else { 0.0 };
                            let got = y[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{side:?} {threads} threads at ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The fused LoRA product split by token blocks, and split in two hand-offs with the base
    /// product by columns (training's paths on several threads), gives the output and all three
    /// gradients of the composite candle ops, blocks of any size: outputs narrow enough that
    /// `panel::split` splits by rows (the jobs' `row0`) and wide enough that it splits by columns.
    #[test]
    fn lora_split_by_token_blocks_matches_composite_ops() {
        let dev = Device::Cpu;
        for (m, k, out, r, scale) in [(300, 40, 56, 4, 2.0f32), (300, 70, 200, 4, 0.5)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev).unwrap();
            let a = Var::randn(0f32, 1.0, (r, k), &dev).unwrap();
            let b = Var::randn(0f32, 1.0, (out, r), &dev).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = (xv.matmul(&w.t().unwrap()).unwrap()
                + (xv.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * scale as f64).unwrap())
            .unwrap();
            let c = Tensor::randn(0f32, 1.0, (m, out), &dev).unwrap();
            let grads = (&y_ref * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (xs, ws, as_, bs, cs) = (flat(&x), flat(&w), flat(a.as_tensor()), flat(b.as_tensor()), flat(&c));
            let close = |got: &[f32], want: &Tensor, what: &str| {
                let want = flat(want);
                let d = got.iter().zip(&want).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(d < 1e-3, "{what} ({m}x{k}x{out}): differs by {d}");
            };
            let dims = (m, k, out, r);
            for block in [300, 150, 128, 97] {
                let y = lora_forward_split(&xs, Dense::F32(&ws), &as_, &bs, dims, scale, block).unwrap();
                close(&y, &y_ref, "y");
                let (dx, da, db) =
                    lora_backward_split(&xs, &cs, Dense::F32(&ws), &as_, &bs, dims, scale, block).unwrap();
                close(&dx, grads.get(xv.as_tensor()).unwrap(), "dx");
                close(&da, grads.get(a.as_tensor()).unwrap(), "dA");
                close(&db, grads.get(b.as_tensor()).unwrap(), "dB");
                let y = lora_forward_columns(&xs, &ws, &as_, &bs, dims, scale, block).unwrap();
                close(&y, &y_ref, "y by columns");
                let (dx, da, db) = lora_backward_columns(&xs, &cs, &ws, &as_, &bs, dims, scale, block).unwrap();
                close(&dx, grads.get(xv.as_tensor()).unwrap(), "dx by columns");
                close(&da, grads.get(a.as_tensor()).unwrap(), "dA by columns");
                close(&db, grads.get(b.as_tensor()).unwrap(), "dB by columns");
            }
        }
    }

    /// A bf16 weight (`--precision bf16` on the CPU) through the frozen and the fused LoRA ops,
    /// as one block and split by tokens over threads: the base product is that of the
    /// bf16-rounded input (and, backward, of the rounded incoming gradient) with the weight; the
    /// adapter's products and gradients stay f32.
    #[test]
    fn bf16_weights_multiply_the_rounded_inputs() {
        let dev = Device::Cpu;
        let bf = candle_core::DType::BF16;
        let round = |t: &Tensor| t.to_dtype(bf).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        for m in [3, 300] {
            let (k, out, r, s) = (40, 56, 4, 2.0);
            let x = Var::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w16 = Tensor::randn(0f32, 1.0, (out, k), &dev).unwrap().to_dtype(bf).unwrap();
            let w = w16.to_dtype(candle_core::DType::F32).unwrap();
            let a = Var::randn(0f32, 1.0, (r, k), &dev).unwrap();
            let b = Var::randn(0f32, 1.0, (out, r), &dev).unwrap();
            let c = Tensor::randn(0f32, 1.0, (m, out), &dev).unwrap();
            let close = |got: &Tensor, want: &Tensor, what: &str| {
                let d = crate::testing::max_abs_diff(got, want);
                assert!(d < 1e-3, "m={m} {what}: differs by {d}");
            };
            let base_ref = round(x.as_tensor()).matmul(&w.t().unwrap()).unwrap();
            let dx_base_ref = round(&c).matmul(&w).unwrap();

            let y = frozen_linear(x.as_tensor(), &w16).unwrap();
            close(&y, &base_ref, "frozen y");
            let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            close(g.get(x.as_tensor()).unwrap(), &dx_base_ref, "frozen dx");

            let y = lora_linear(x.as_tensor(), &w16, a.as_tensor(), b.as_tensor(), s, None).unwrap();
            let h = x.as_tensor().matmul(&a.as_tensor().t().unwrap()).unwrap();
            let low = (h.matmul(&b.as_tensor().t().unwrap()).unwrap() * s).unwrap();
            close(&y, &(&base_ref + &low).unwrap(), "lora y");
            let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let dh = (c.matmul(b.as_tensor()).unwrap() * s).unwrap();
            let dx_ref = (&dx_base_ref + dh.matmul(a.as_tensor()).unwrap()).unwrap();
            close(g.get(x.as_tensor()).unwrap(), &dx_ref, "lora dx");
            let da_ref = dh.t().unwrap().matmul(x.as_tensor()).unwrap();
            close(g.get(a.as_tensor()).unwrap(), &da_ref, "lora dA");
            let db_ref = c.t().unwrap().matmul(&(h * s).unwrap()).unwrap();
            close(g.get(b.as_tensor()).unwrap(), &db_ref, "lora dB");
        }
    }

    /// A decode-shaped product (one token) through the op equals candle's matmul.
    #[test]
    fn one_token_products_match_candle_matmul() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 1, 576), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (1000, 576), &dev).unwrap();
        let y = frozen_linear(&x, &w).unwrap();
        let y_ref = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let d = crate::testing::max_abs_diff(&y, &y_ref);
        assert!(d < 1e-3, "differs by {d}");
    }

    #[test]
    fn lora_linear_matches_composite_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        let a = Var::randn(0f32, 1.0, (2, 6), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, (5, 2), &dev).unwrap();
        let s = 1.7;
        let y = lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), s, None).unwrap();
        let x2 = x.as_tensor();
        let low = x2.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
        let low = low.broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap();
        let y_ref = (x2.broadcast_matmul(&w.t().unwrap()).unwrap() + (low * s).unwrap()).unwrap();
        assert!(
            crate::testing::max_abs_diff(&y, &y_ref) < 1e-4,
            "forward differs by {}",
            crate::testing::max_abs_diff(&y, &y_ref)
        );
        let c = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &a, &b] {
            let d = crate::testing::max_abs_diff(g.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        assert!(g.get(&w).is_none());
    }
}
