//! f32 matrix × vector, the product of single-token decoding: `y[j] (+)= Σ_c x[c]·W[j, c]` with
//! `W` row-major (a linear layer's `[out, in]` weight, the lm_head).
//!
//! Why not gemm: for one input row the gemm crate takes its generic matrix×vector path, which
//! `perf` showed at 61% of a decode token on an AVX-512 Xeon, well below the memory bandwidth
//! the product is bound by. Here each weight row is read once, one row after the other (one
//! sequential stream per thread, see [`rows`]), with one family of vector instructions chosen by
//! [`crate::kernels::cpu::family`]. Rows are split over the spin pool in a few large
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
    // (Four, eight, sixteen or 32 chunks per thread, and guided parts shrinking to 16 or 64 rows,
    // measured the same within the noise: 53–61 tokens/s against 51–61, SmolLM2-135M, Zen 4.)
    let chunk = n.div_ceil(threads * 2).next_multiple_of(4);
    crate::kernels::spin::for_each_chunk_mut(y, chunk, |i, yc| {
        let w0 = i * chunk * rs;
        rows(yc, accumulate, x, &w[w0..], rs, family);
    });
    Ok(())
}

/// The rows of `y` from the rows of `w` starting at `w[0]` (bounds checked by [`gemv`]).
///
/// One weight row at a time, so that each thread reads its share of `w` as one sequential
/// stream. Interleaving four rows (four short streams of `k` values each, restarted every
/// group) halved what the hardware prefetchers delivered: SmolLM2-135M f32 decode on a 2-core
/// Zen 4 VM went from 27–28 to 40–44 tokens/s on one thread and from 46–50 to 54–70 on two
/// (same sitting; two rows at a time was slower still, 23–24 on one thread).
fn rows(y: &mut [f32], accumulate: bool, x: &[f32], w: &[f32], rs: usize, family: Family) {
    let k = x.len();
    for (j, dst) in y.iter_mut().enumerate() {
        let v = dot(family, x, &w[j * rs..j * rs + k]);
        *dst = if accumulate { *dst + v } else { v };
    }
}

/// The dot product of `x` with one row of its length.
#[inline]
fn dot(family: Family, x: &[f32], w: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    match family {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Family` other than `Portable` only comes from `Family::available`, which
        // checked the CPU features; the row has `x.len()` values.
        Family::Avx512 => unsafe { x86::dot_avx512(x, w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Family::Avx2 => unsafe { x86::dot_avx2(x, w) },
        _ => portable::dot(x, w),
    }
}

mod portable {
    /// Four times eight lanes: the compiler keeps them in vector registers of the baseline
    /// target, four independent chains.
    pub(super) fn dot(x: &[f32], w: &[f32]) -> f32 {
        const L: usize = 32;
        let mut acc = [0f32; L];
        let chunks = x.len() / L;
        for (xs, ws) in x.chunks_exact(L).zip(w.chunks_exact(L)) {
            for ((a, w), x) in acc.iter_mut().zip(ws).zip(xs) {
                *a += w * x;
            }
        }
        let tail: f32 = (chunks * L..x.len()).map(|c| w[c] * x[c]).sum();
        acc.iter().sum::<f32>() + tail
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

    /// Values ahead of the one being read that [`prefetch_ahead`] asks the cache for: 2 KB,
    /// about one 576-wide row. The hardware prefetchers stop at each 4 KB page; asking ahead
    /// crosses it. SmolLM2-135M f32 decode on a 2-core Intel Xeon (family 6 model 207),
    /// alternating in one sitting: 42.1, 41.4, 40.8 tokens/s without, 46.8, 45.8, 43.0 with 2 KB,
    /// 46.2, 44.3, 44.4 with 8 KB; in a noisier round (none 33.1, 33.3, 33.1): 1 KB 45.1, 43.0,
    /// 37.8, 4 KB 41.0, 45.8, 34.6.
    const AHEAD: usize = 512;

    /// Asks for the cache line `AHEAD` values past `w[c]` (never faults, even past the end).
    #[inline(always)]
    unsafe fn prefetch_ahead(w: *const f32, c: usize) {
        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c + AHEAD).cast::<i8>());
    }

    /// Safety: the CPU has AVX-512F; `w` has `x.len()` values.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dot_avx512(x: &[f32], w: &[f32]) -> f32 {
        let k = x.len();
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        // Four independent FMA chains.
        let mut a = [_mm512_setzero_ps(); 4];
        let mut c = 0;
        while c + 64 <= k {
            for i in 0..4 {
                prefetch_ahead(wp, c + 16 * i);
            }
            for i in 0..4 {
                let (wv, xv) = (_mm512_loadu_ps(wp.add(c + 16 * i)), _mm512_loadu_ps(xp.add(c + 16 * i)));
                a[i] = _mm512_fmadd_ps(wv, xv, a[i]);
            }
            c += 64;
        }
        while c < k {
            // Masked loads read nothing past the row's end.
            let left = (k - c).min(16);
            let mask: __mmask16 = if left == 16 { 0xFFFF } else { (1u16 << left) - 1 };
            let (wv, xv) = (
                _mm512_maskz_loadu_ps(mask, wp.add(c)),
                _mm512_maskz_loadu_ps(mask, xp.add(c)),
            );
            a[0] = _mm512_fmadd_ps(wv, xv, a[0]);
            c += left;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])))
    }

    /// Safety: the CPU has AVX2 and FMA; `w` has `x.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(x: &[f32], w: &[f32]) -> f32 {
        let k = x.len();
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c + 32 <= k {
            for i in 0..2 {
                prefetch_ahead(wp, c + 16 * i);
            }
            for i in 0..4 {
                let (wv, xv) = (_mm256_loadu_ps(wp.add(c + 8 * i)), _mm256_loadu_ps(xp.add(c + 8 * i)));
                a[i] = _mm256_fmadd_ps(wv, xv, a[i]);
            }
            c += 32;
        }
        while c + 8 <= k {
            a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(c)), _mm256_loadu_ps(xp.add(c)), a[0]);
            c += 8;
        }
        let mut s = hsum256(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        for cc in c..k {
            s += *wp.add(cc) * *xp.add(cc);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every family this CPU runs against an f64 reference, over column counts that leave every
    /// vector tail and partial unrolled step, strided rows,
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
            (4, 64, 64),
            (11, 130, 131),
            (2, 1537, 1540),
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
