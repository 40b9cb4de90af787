//! Products with at most 16 output columns and rows read in place, on AVX-512: LoRA's rank side
//! (`h = x·Aᵀ`, `∂h = g·B`, rank ≤ 16), one 16-lane accumulator per token row.
//!
//! Why not the gemm crate: gemm computes a row-major product as its transpose, so the 16 output
//! columns become the rows of its register tile, and its AVX-512 tile for 16 rows (`x1x6`) keeps
//! only six accumulators — fewer than the eight the two FMA ports need in flight — and loads one
//! broadcast per FMA from six token rows. Measured on a 2-core Intel Xeon (family 6 model 207),
//! one thread, `[136, 576] · [576, 16]`: gemm 54–70 GFLOP/s; its `x1x6` was 4.6% of a short-row
//! f32 training step (SmolLM2-135M, b4, seq 128). This tile keeps twelve rows' accumulators and
//! one load of the packed right side per twelve FMAs.

#![allow(unsafe_code)]

use crate::kernels::cpu::{self, Family};

/// Most output columns (one 16-lane f32 vector) this kernel takes.
pub(crate) const MAX_COLS: usize = 16;

/// Token rows per register tile: twelve accumulators, enough in flight for two FMA ports with a
/// latency of four cycles, and twelve broadcasts plus one load per twelve FMAs.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ROWS: usize = 12;

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` for `n ≤ 16` on the calling thread, where row `i` of
/// `lhs` is `lhs[i·lda ..][..k]` and element `(p, j)` of `rhs` is `rhs[p·rs + j·cs]`. Returns
/// `false`, writing nothing, where it does not apply: `family` is not AVX-512 (or this CPU lacks
/// it), or `n` is outside `1..=16`.
///
/// Safety: row `i < m` of `dst` is `dst + i·ldd .. + n`, writable and touched by nothing else
/// during the call; every element of `lhs` and `rhs` named above is inside its slice.
pub(crate) unsafe fn product(
    family: Family,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    (lhs, lda): (&[f32], usize),
    (rhs, rs, cs): (&[f32], usize, usize),
) -> bool {
    // `best()` is an order, not a set: on aarch64 `Neon` sorts above `Avx512`.
    if family != Family::Avx512 || cpu::best() != Family::Avx512 || !(1..=MAX_COLS).contains(&n) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    PACKED.with(|packed| {
        let mut packed = packed.borrow_mut();
        packed.clear();
        packed.resize(k * MAX_COLS, 0.0);
        if rs == 1 && cs >= k {
            // SAFETY: AVX-512 F (checked above); `rhs`'s columns are `cs ≥ k` values apart, each
            // `k` values inside `rhs`; `packed` holds `k` rows of 16 values.
            unsafe { x86::pack_columns(rhs, (k, n), cs, &mut packed) };
        } else {
            pack(rhs, (k, n), (rs, cs), &mut packed);
        }
        // SAFETY: AVX-512 F (checked above); `packed` holds `k` rows of 16 values; `lhs` and
        // `dst` as the caller guarantees.
        unsafe { x86::rows((m, n, k), lhs.as_ptr(), lda, packed.as_ptr(), dst, ldd, accumulate) };
    });
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ((m, k), dst, ldd, accumulate, (lhs, lda), (rhs, rs, cs));
    // Avx512 is an x86 family: elsewhere `cpu::best()` is not Avx512 and it returned above.
    cfg!(target_arch = "x86_64")
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The right side packed `k` rows of 16 values, kept per thread between calls.
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `rhs` (`k × n`, element `(p, j)` at `rhs[p·rs + j·cs]`) into `packed` as `k` rows of 16 values,
/// columns past `n` left zero.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack(rhs: &[f32], (k, n): (usize, usize), (rs, cs): (usize, usize), packed: &mut [f32]) {
    if cs == 1 {
        for (p, row) in packed.chunks_exact_mut(MAX_COLS).take(k).enumerate() {
            row[..n].copy_from_slice(&rhs[p * rs..p * rs + n]);
        }
    } else {
        // Columns contiguous (`Aᵀ` of a row-major `A`): one column at a time, each read in order.
        for j in 0..n {
            for p in 0..k {
                packed[p * MAX_COLS + j] = rhs[p * rs + j * cs];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
mod x86 {
    use super::{MAX_COLS, ROWS};
    use std::arch::x86_64::*;

    /// [`super::pack`] of a right side whose columns are contiguous (`Aᵀ` of a row-major `A`):
    /// 16 reduction values of every column loaded and transposed in registers.
    ///
    /// Safety: AVX-512 F; column `j < n ≤ 16` is `rhs[j·cs ..][..k]`; `packed` holds `k·16`
    /// values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_columns(rhs: &[f32], (k, n): (usize, usize), cs: usize, packed: &mut [f32]) {
        let full = k / MAX_COLS * MAX_COLS;
        for p0 in (0..full).step_by(MAX_COLS) {
            let mut cols = [_mm512_setzero_si512(); MAX_COLS];
            for (j, v) in cols.iter_mut().enumerate().take(n) {
                *v = _mm512_loadu_si512(rhs.as_ptr().add(j * cs + p0) as *const _);
            }
            for (p, v) in crate::kernels::panel::x86::transpose16(cols).into_iter().enumerate() {
                _mm512_storeu_si512(packed.as_mut_ptr().add((p0 + p) * MAX_COLS) as *mut _, v);
            }
        }
        for p in full..k {
            for j in 0..n {
                packed[p * MAX_COLS + j] = rhs[j * cs + p];
            }
        }
    }

    /// All of `m` rows, [`ROWS`] at a time, then the remainder.
    ///
    /// Safety: AVX-512 F; `a` holds `m` rows of `k` values at stride `lda`, `b` `k` rows of 16
    /// values, `c` `m` rows of `n ≤ 16` writable values at stride `ldc`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        (m, n, k): (usize, usize, usize),
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mask: __mmask16 = if n >= MAX_COLS { 0xffff } else { (1u16 << n) - 1 };
        let mut i = 0;
        while i + ROWS <= m {
            tile::<ROWS>(a.add(i * lda), lda, b, k, c.add(i * ldc), ldc, mask, accumulate);
            i += ROWS;
        }
        let (a, c) = (a.add(i * lda), c.add(i * ldc));
        macro_rules! rest {
            ($($r:literal)*) => {
                match m - i {
                    $($r => tile::<$r>(a, lda, b, k, c, ldc, mask, accumulate),)*
                    _ => {}
                }
            };
        }
        rest!(1 2 3 4 5 6 7 8 9 10 11);
    }

    /// `R` rows: `c[r] (+)= Σ_p a[r, p] · b[p]`, masked to the first columns.
    ///
    /// Safety: as [`rows`], for `R` rows.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        k: usize,
        c: *mut f32,
        ldc: usize,
        mask: __mmask16,
        accumulate: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        for p in 0..k {
            let bv = _mm512_loadu_ps(b.add(p * MAX_COLS));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * lda + p)), bv, *acc);
            }
        }
        for (r, acc) in acc.into_iter().enumerate() {
            let dst = c.add(r * ldc);
            let v = if accumulate {
                _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, dst))
            } else {
                acc
            };
            _mm512_mask_storeu_ps(dst, mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Every row remainder of the register tile, 1..=16 columns, both packings of the right
    /// side, writing and accumulating, against a loop in f64.
    #[test]
    fn narrow_products_equal_the_reference() {
        if cpu::best() != Family::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512 F (the narrow kernel's only family)");
            // SAFETY: nothing is read or written: the family is not AVX-512.
            assert!(!unsafe {
                product(
                    cpu::best(),
                    (2, 2, 2),
                    [0f32; 4].as_mut_ptr(),
                    2,
                    false,
                    (&[0.0; 4], 2),
                    (&[0.0; 4], 2, 1),
                )
            });
            return;
        }
        let mut rng = crate::rng::Rng::new(7);
        for &(m, k) in &[(1, 1), (5, 17), (12, 64), (23, 576), (37, 33)] {
            for n in [1, 7, 15, 16] {
                let lda = k + 3;
                let lhs: Vec<f32> = (0..m * lda).map(|_| rng.next_f32() - 0.5).collect();
                // Right side row-major (`B`) and column-contiguous (`Aᵀ`, columns `k + 2` apart).
                let rhs: Vec<f32> = (0..k * (n + 1) + (k + 2) * n).map(|_| rng.next_f32() - 0.5).collect();
                for (rs, cs) in [(n + 1, 1), (1, k + 2)] {
                    for accumulate in [false, true] {
                        let ldd = n + 2;
                        let start: Vec<f32> = (0..m * ldd).map(|_| rng.next_f32()).collect();
                        let mut dst = start.clone();
                        // SAFETY: `dst` holds `m` rows `ldd ≥ n` apart; the indices below are in
                        // bounds of `lhs` and `rhs`.
                        let ran = unsafe {
                            product(
                                Family::Avx512,
                                (m, n, k),
                                dst.as_mut_ptr(),
                                ldd,
                                accumulate,
                                (&lhs, lda),
                                (&rhs, rs, cs),
                            )
                        };
                        assert!(ran);
                        for i in 0..m {
                            for j in 0..ldd {
                                let got = dst[i * ldd + j];
                                if j >= n {
                                    assert_eq!(got, start[i * ldd + j], "column {j} past n = {n} was written");
                                    continue;
                                }
                                let mut want: f64 = (0..k)
                                    .map(|p| f64::from(lhs[i * lda + p]) * f64::from(rhs[p * rs + j * cs]))
                                    .sum();
                                if accumulate {
                                    want += f64::from(start[i * ldd + j]);
                                }
                                assert!(
                                    (f64::from(got) - want).abs() < 1e-4,
                                    "m {m} n {n} k {k} rs {rs} cs {cs}: ({i}, {j}) {got} against {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
