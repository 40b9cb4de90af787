//! f32 matrix × vector, the product of single-token decoding: `y[j] (+)= Σ_c x[c]·W[j, c]` with
//! `W` row-major (a linear layer's `[out, in]` weight, the lm_head).
//!
//! Why not gemm: for one input row the gemm crate takes its generic matrix×vector path, which
//! `perf` showed at 61% of a decode token on an AVX-512 Xeon, well below the memory bandwidth
//! the product is bound by. Here each weight row is read once, four rows at a time against the
//! same loaded slice of `x`, with one family of vector instructions chosen by
//! [`crate::kernels::cpu::family`]. Rows are split over the current rayon pool in a few large
//! chunks per thread (no task per row), and small products stay on the calling thread.
//!
//! The families differ only in the order of the f32 additions.

// std::arch intrinsics are `unsafe` (they need the CPU feature, guaranteed by `Family`, which
// only names families `Family::available` found) and the inner loops use unchecked loads
// whose bounds are checked once per call.
#![allow(unsafe_code)]

use crate::kernels::cpu::Family;

/// Below this many weight bytes a product runs on the calling thread: handing it to another
/// thread costs more than reading it (a 576×576 f32 projection is 1.3 MB).
const PARALLEL_BYTES: usize = 256 << 10;

/// `y[j] (+)= Σ_c x[c]·w[j·rs + c]` for every `j < y.len()`, with `k = x.len()` columns, on up
/// to `threads` threads of the current rayon pool.
/// Errors when `w` does not hold `y.len()` rows of `k` values `rs` apart.
pub(crate) fn gemv(
    y: &mut [f32],
    accumulate: bool,
    x: &[f32],
    w: &[f32],
    rs: usize,
    family: Family,
    threads: usize,
) -> candle_core::Result<()> {
    let (n, k) = (y.len(), x.len());
    if n == 0 {
        return Ok(());
    }
    if rs < k || (n - 1) * rs + k > w.len() {
        candle_core::bail!(
            "gemv: {n} rows of {k} values, {rs} apart, do not fit in {} values",
            w.len()
        )
    }
    let threads = threads.min(crate::kernels::spin::threads());
    if threads <= 1 || n * k * 4 < PARALLEL_BYTES || n < 8 {
        rows(y, accumulate, x, w, rs, family);
        return Ok(());
    }
    // Two chunks per thread (multiples of 4 rows): enough for a thread slowed by other work on
    // the machine to be helped, few enough that each task streams a long stretch of weights.
    let chunk = n.div_ceil(threads * 2).next_multiple_of(4);
    crate::kernels::spin::for_each_chunk_mut(y, chunk, |i, yc| {
        let w0 = i * chunk * rs;
        rows(yc, accumulate, x, &w[w0..], rs, family);
    });
    Ok(())
}

/// The rows of `y` from the rows of `w` starting at `w[0]` (bounds checked by [`gemv`]).
fn rows(y: &mut [f32], accumulate: bool, x: &[f32], w: &[f32], rs: usize, family: Family) {
    let k = x.len();
    let mut j = 0;
    while j < y.len() {
        let r = (y.len() - j).min(4);
        let mut out = [0f32; 4];
        if r == 4 {
            let w4: [&[f32]; 4] = std::array::from_fn(|i| &w[(j + i) * rs..(j + i) * rs + k]);
            out = dots::<4>(family, x, w4);
        } else {
            for (i, o) in out.iter_mut().enumerate().take(r) {
                *o = dots::<1>(family, x, [&w[(j + i) * rs..(j + i) * rs + k]])[0];
            }
        }
        for (dst, v) in y[j..j + r].iter_mut().zip(out) {
            *dst = if accumulate { *dst + v } else { v };
        }
        j += r;
    }
}

/// The dot products of `x` with `R` rows of its length.
#[inline]
fn dots<const R: usize>(family: Family, x: &[f32], w: [&[f32]; R]) -> [f32; R] {
    debug_assert!(w.iter().all(|r| r.len() == x.len()));
    match family {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Family` other than `Portable` only comes from `Family::available`, which
        // checked the CPU features; every row has `x.len()` values.
        Family::Avx512 => unsafe { x86::dots_avx512(x, w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Family::Avx2 => unsafe { x86::dots_avx2(x, w) },
        _ => portable::dots(x, w),
    }
}

mod portable {
    /// Eight lanes per row: the compiler keeps them in vector registers of the baseline target.
    pub(super) fn dots<const R: usize>(x: &[f32], w: [&[f32]; R]) -> [f32; R] {
        const L: usize = 8;
        let mut acc = [[0f32; L]; R];
        let chunks = x.len() / L;
        for c in 0..chunks {
            let xs = &x[c * L..(c + 1) * L];
            for (a, row) in acc.iter_mut().zip(w.iter()) {
                let ws = &row[c * L..(c + 1) * L];
                for ((a, w), x) in a.iter_mut().zip(ws).zip(xs) {
                    *a += w * x;
                }
            }
        }
        let mut out = [0f32; R];
        for ((o, a), row) in out.iter_mut().zip(acc.iter()).zip(w.iter()) {
            let tail: f32 = (chunks * L..x.len()).map(|c| row[c] * x[c]).sum();
            *o = a.iter().sum::<f32>() + tail;
        }
        out
    }
}

// The AVX-512 intrinsics are stable since Rust 1.89, later than the crate's declared
// `rust-version`; the toolchain this project builds with (1.95) has them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop, clippy::incompatible_msrv)]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Safety: the CPU has AVX-512F; every row of `w` has `x.len()` values.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dots_avx512<const R: usize>(x: &[f32], w: [&[f32]; R]) -> [f32; R] {
        let k = x.len();
        let xp = x.as_ptr();
        let wp: [*const f32; R] = std::array::from_fn(|i| w[i].as_ptr());
        // Two accumulators per row: with four rows, eight independent FMA chains.
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let mut c = 0;
        while c + 32 <= k {
            let x0 = _mm512_loadu_ps(xp.add(c));
            let x1 = _mm512_loadu_ps(xp.add(c + 16));
            for i in 0..R {
                a0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(wp[i].add(c)), x0, a0[i]);
                a1[i] = _mm512_fmadd_ps(_mm512_loadu_ps(wp[i].add(c + 16)), x1, a1[i]);
            }
            c += 32;
        }
        while c < k {
            // Masked loads read nothing past the row's end.
            let left = (k - c).min(16);
            let mask: __mmask16 = if left == 16 { 0xFFFF } else { (1u16 << left) - 1 };
            let xv = _mm512_maskz_loadu_ps(mask, xp.add(c));
            for i in 0..R {
                a0[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, wp[i].add(c)), xv, a0[i]);
            }
            c += left;
        }
        let mut out = [0f32; R];
        for i in 0..R {
            out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
        }
        out
    }

    /// Safety: the CPU has AVX2 and FMA; every row of `w` has `x.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_avx2<const R: usize>(x: &[f32], w: [&[f32]; R]) -> [f32; R] {
        let k = x.len();
        let xp = x.as_ptr();
        let wp: [*const f32; R] = std::array::from_fn(|i| w[i].as_ptr());
        let mut a0 = [_mm256_setzero_ps(); R];
        let mut a1 = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c + 16 <= k {
            let x0 = _mm256_loadu_ps(xp.add(c));
            let x1 = _mm256_loadu_ps(xp.add(c + 8));
            for i in 0..R {
                a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[i].add(c)), x0, a0[i]);
                a1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[i].add(c + 8)), x1, a1[i]);
            }
            c += 16;
        }
        let mut out = [0f32; R];
        for i in 0..R {
            let mut s = hsum256(_mm256_add_ps(a0[i], a1[i]));
            for cc in c..k {
                s += *wp[i].add(cc) * *xp.add(cc);
            }
            out[i] = s;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every family this CPU runs against an f64 reference, over row counts that leave every
    /// remainder of the 4-row groups, column counts that leave every vector tail, strided rows,
    /// accumulation, and threads (rows split into chunks give the same values bit for bit).
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn every_family_matches_an_f64_reference() {
        let mut rng = Rng::new(9);
        for (n, k, rs) in [
            (1, 1, 1),
            (3, 7, 7),
            (5, 16, 20),
            (9, 33, 33),
            (64, 576, 576),
            (700, 100, 101),
        ] {
            let w: Vec<f32> = (0..(n - 1) * rs + k).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let x: Vec<f32> = (0..k).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let base: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let want: Vec<f64> = (0..n)
                .map(|j| (0..k).map(|c| w[j * rs + c] as f64 * x[c] as f64).sum())
                .collect();
            for family in Family::available() {
                for accumulate in [false, true] {
                    let mut y = base.clone();
                    gemv(&mut y, accumulate, &x, &w, rs, family, 1).unwrap();
                    for j in 0..n {
                        let r = want[j] + if accumulate { base[j] as f64 } else { 0.0 };
                        assert!(
                            (y[j] as f64 - r).abs() <= 1e-5 * (1.0 + k as f64).sqrt() * (1.0 + r.abs()),
                            "{family:?} {n}x{k} row {j}: {} vs {r}",
                            y[j]
                        );
                    }
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
                    let mut y3 = base.clone();
                    pool.install(|| gemv(&mut y3, accumulate, &x, &w, rs, family, 3))
                        .unwrap();
                    assert_eq!(y, y3, "{family:?}: threads changed the values");
                }
            }
        }
    }

    #[test]
    fn rows_that_do_not_fit_are_an_error() {
        let mut y = [0f32; 3];
        let err = gemv(&mut y, false, &[1.0; 4], &[0.0; 11], 4, Family::Portable, 1).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }
}
