//! Short forward products with a frozen f32 weight on the AVX2 kernel family, as dot products of
//! whole rows: `y[t, j] (+)= Σ_c a[t, c]·W[j, c]`, where the token rows of `a` and the weight
//! rows of `W` both run along the reduction. A 3×4 register tile (three token rows × four weight
//! rows, twelve 8-lane accumulators) reads both operands in place and sums each accumulator
//! across its lanes once at the end, as llamafile's tinyBLAS does for llama.cpp; nothing is
//! packed.
//!
//! Why not the gemm crate here: a prompt's products (tens to a couple of hundred token rows)
//! through gemm's AVX2 kernels spend about a third as long packing the weight as multiplying
//! (`perf`, `FINCH_CPU=avx2` prefill of a 143-token prompt on a 2-core Intel Xeon, family 6
//! model 207: 8.7% of the samples in its packing against 27% in its 16×6 kernel), and the
//! prompt left Finch at 312–348 tokens/s against llama.cpp's AVX2 build at 395–397 on the same
//! machine (docs/performance.md, twenty-second session). Training's tall products (at least
//! [`crate::kernels::panel::GEMM_FROM_ROWS`] rows) keep gemm, whose packing is spread over
//! hundreds of rows, and so do input gradients (`dx = g·W`, whose reduction runs across the
//! weight's rows). AVX-512 CPUs have their own tiles for these products (`kernels::panel`).
//!
//! A quantized model's prompt takes the tile too: `quant::matmul_f32` dequantizes panels of
//! weight rows and, on the AVX2 family, multiplies them here in place of gemm (no second packing
//! of the panel, no copy out of a temporary block) wherever a task has 16–255 token rows (its
//! split is per task, so a quantized-base training batch of up to 510 tokens takes it too).
//! `FINCH_CPU=avx2 bench generate --quantized` prefill, alternating: 382.8, 336.5, 383.6
//! tokens/s against gemm's 282.4, 310.2, 343.5. A training step's tall products were not faster
//! through the tile (b4×256: 171.3, 169.1 against gemm's 202.6, 162.7), so they stay on gemm.

// std::arch intrinsics are `unsafe`; the job's bounds are checked once before the raw loads.
#![allow(unsafe_code)]

use crate::kernels::cpu::{self, Family};
use crate::kernels::panel::{Job, Side, F32_MIN_ROWS, GEMM_FROM_ROWS};

/// Whether a product of `m` token rows goes through [`job`]: the AVX2 kernel family (an AVX2
/// CPU, or `FINCH_CPU=avx2`) and a prompt's count of rows.
pub(crate) fn takes(m: usize) -> bool {
    (F32_MIN_ROWS..GEMM_FROM_ROWS).contains(&m) && cpu::family() == Family::Avx2
}

/// One job of `panel::split` (chosen where [`takes`] says so): the forward side through the
/// row tile, the input gradient through gemm.
pub(crate) fn job(job: Job<f32>) -> candle_core::Result<()> {
    if job.side == Side::Transposed {
        row_tile_job(job)
    } else {
        crate::kernels::gemm::gemm_job(job)
    }
}

/// [`job`]'s forward side; an error where the CPU lacks AVX2 and FMA.
fn row_tile_job(job: Job<f32>) -> candle_core::Result<()> {
    let (c_lo, c_hi) = job.cols;
    if job.side != Side::Transposed || c_lo > c_hi || c_hi > job.w.rows || c_hi > job.ldc {
        candle_core::bail!(
            "rowdot: {:?} job of {} rows, columns {c_lo}..{c_hi} of {}: not a forward product in bounds",
            job.side,
            job.m,
            job.w.rows
        )
    }
    let k = job.w.cols;
    let w = job.w.data.get(c_lo * k..c_hi * k).unwrap_or_default();
    // SAFETY: the job owns rows `0..m`, columns `c_lo..c_hi` of `out` (rows `ldc` apart, `ldc ≥
    // c_hi` checked above).
    unsafe {
        product(
            job.a,
            job.m,
            w,
            c_hi - c_lo,
            k,
            job.out.add(c_lo),
            job.ldc,
            job.accumulate,
        )
    }
}

/// `out[t·ldc + j] (+)= Σ_c a[t·k + c]·w[j·k + c]` for `t < m`, `j < n`, through the row tile;
/// an error where the operands are short or the CPU lacks AVX2 and FMA.
///
/// Safety: rows `0..m` of `out`, `ldc ≥ n` values apart, hold `n` writable values each that
/// nothing else reads or writes during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    a: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    out: *mut f32,
    ldc: usize,
    accumulate: bool,
) -> candle_core::Result<()> {
    if a.len() < m * k || w.len() < n * k || ldc < n {
        candle_core::bail!(
            "rowdot: {m}x{k} · ({n}x{k})ᵀ from {} and {} values, rows {ldc} apart",
            a.len(),
            w.len()
        )
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were just detected; `a` and `w` hold the values read (checked
        // above); `out` is the caller's contract.
        unsafe { x86::product(a.as_ptr(), m, w.as_ptr(), n, k, out, ldc, accumulate) };
        return Ok(());
    }
    let _ = (out, accumulate);
    candle_core::bail!("rowdot: this CPU has no AVX2 and FMA")
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    /// Token rows of the tile.
    const RM: usize = 3;
    /// Weight rows of the tile.
    const RN: usize = 4;

    /// `out[t, j] (+)= Σ_c a[t·k + c]·w[j·k + c]` for `t < m`, `j < n`.
    ///
    /// Safety: AVX2 and FMA; `a` holds `m·k` values, `w` `n·k`; row `t` of `out` is
    /// `out + t·ldc .. + n`, writable.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product(
        a: *const f32,
        m: usize,
        w: *const f32,
        n: usize,
        k: usize,
        out: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // Four weight rows (9 KB at k = 576) stay in L1 while every token row passes them.
        let mut j = 0;
        while j < n {
            let nj = (n - j).min(RN);
            let mut t = 0;
            while t < m {
                let mt = (m - t).min(RM);
                let (ap, wp, op) = (a.add(t * k), w.add(j * k), out.add(t * ldc + j));
                match (mt, nj) {
                    (3, 4) => tile::<3, 4>(ap, wp, k, op, ldc, accumulate),
                    (3, 3) => tile::<3, 3>(ap, wp, k, op, ldc, accumulate),
                    (3, 2) => tile::<3, 2>(ap, wp, k, op, ldc, accumulate),
                    (3, _) => tile::<3, 1>(ap, wp, k, op, ldc, accumulate),
                    (2, 4) => tile::<2, 4>(ap, wp, k, op, ldc, accumulate),
                    (2, 3) => tile::<2, 3>(ap, wp, k, op, ldc, accumulate),
                    (2, 2) => tile::<2, 2>(ap, wp, k, op, ldc, accumulate),
                    (2, _) => tile::<2, 1>(ap, wp, k, op, ldc, accumulate),
                    (_, 4) => tile::<1, 4>(ap, wp, k, op, ldc, accumulate),
                    (_, 3) => tile::<1, 3>(ap, wp, k, op, ldc, accumulate),
                    (_, 2) => tile::<1, 2>(ap, wp, k, op, ldc, accumulate),
                    (_, _) => tile::<1, 1>(ap, wp, k, op, ldc, accumulate),
                }
                t += mt;
            }
            j += nj;
        }
    }

    /// One `M`×`N` block of the output (`M ≤ 3`, `N ≤ 4`): rows `a + i·k`, weight rows
    /// `w + jj·k`, written at `out + i·ldc + jj`.
    #[inline(always)]
    unsafe fn tile<const M: usize, const N: usize>(
        a: *const f32,
        w: *const f32,
        k: usize,
        out: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let body = k / 8 * 8;
        let mut c = 0;
        while c < body {
            let mut x = [_mm256_setzero_ps(); M];
            for i in 0..M {
                x[i] = _mm256_loadu_ps(a.add(i * k + c));
            }
            for jj in 0..N {
                let wv = _mm256_loadu_ps(w.add(jj * k + c));
                for i in 0..M {
                    acc[i][jj] = _mm256_fmadd_ps(x[i], wv, acc[i][jj]);
                }
            }
            c += 8;
        }
        for i in 0..M {
            let sums = hsum4(acc[i]);
            for jj in 0..N {
                let mut s = sums[jj];
                for cc in body..k {
                    s += *a.add(i * k + cc) * *w.add(jj * k + cc);
                }
                let o = out.add(i * ldc + jj);
                *o = if accumulate { *o + s } else { s };
            }
        }
    }

    /// The lane sums of up to four vectors.
    #[inline(always)]
    unsafe fn hsum4<const N: usize>(v: [__m256; N]) -> [f32; N] {
        let z = _mm256_setzero_ps();
        let get = |i: usize| if i < N { v[i] } else { z };
        let h01 = _mm256_hadd_ps(get(0), get(1));
        let h23 = _mm256_hadd_ps(get(2), get(3));
        let h = _mm256_hadd_ps(h01, h23);
        // Lanes 0..4 of each 128-bit half hold the four partial sums.
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        let mut all = [0f32; 4];
        _mm_storeu_ps(all.as_mut_ptr(), s);
        let mut out = [0f32; N];
        out.copy_from_slice(&all[..N]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::panel::Weight;

    /// Every tile shape and a reduction with a tail: the row tile equals a plain f64 sum of
    /// products to f32 rounding, written or added, inside a wider output.
    #[test]
    fn row_tiles_equal_the_reference() {
        if !Family::available().contains(&Family::Avx2) {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let mut rng = crate::rng::Rng::new(7);
        for (m, n, k) in [(16, 9, 37), (23, 14, 576), (17, 5, 8), (31, 4, 1)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32() - 0.5).collect();
            let wd: Vec<f32> = (0..n * k).map(|_| rng.next_f32() - 0.5).collect();
            let ldc = n + 3;
            for accumulate in [false, true] {
                let mut out = vec![0.25f32; m * ldc];
                let j = Job {
                    w: Weight {
                        data: &wd,
                        rows: n,
                        cols: k,
                    },
                    side: Side::Transposed,
                    a: &a,
                    m,
                    row0: 0,
                    out: out.as_mut_ptr(),
                    ldc,
                    cols: (1, n),
                    accumulate,
                };
                row_tile_job(j).unwrap();
                for t in 0..m {
                    for c in 0..ldc {
                        let want = if (1..n).contains(&c) {
                            let s: f64 = (0..k).map(|i| a[t * k + i] as f64 * wd[c * k + i] as f64).sum();
                            s as f32 + if accumulate { 0.25 } else { 0.0 }
                        } else {
                            0.25
                        };
                        let got = out[t * ldc + c];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{m}x{n}x{k} acc {accumulate} [{t},{c}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
