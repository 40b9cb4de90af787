//! The quantized block dot products with aarch64 NEON (Advanced SIMD), a child module of
//! [`super`] (`quant.rs`): the same integer block sums as the scalar and x86 kernels, so the
//! results differ from theirs only in the order of f32 additions. NEON is part of the aarch64
//! baseline (every aarch64 CPU and Rust's `aarch64-*` targets have it), so no run-time check is
//! needed. Tested against the scalar kernel here (exact integer sums, float-order tolerance)
//! and, through [`super::Kernel::available`], by every test that compares all kernels; CI runs
//! them under `qemu-aarch64` (`scripts/ci-aarch64.sh`).

// Indexed loops over the `N` tokens keep the accumulators in registers (N is a constant).
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;

use super::{f16_at, ActRow, QType, BLOCK};

/// The 32 weights of block `block` (its bytes) as i16 in element order, four vectors of 8.
///
/// Safety: `block` holds at least `qtype.block_bytes()` bytes.
#[inline(always)]
unsafe fn widen(qtype: QType, block: &[u8]) -> [int16x8_t; 4] {
    let p = block.as_ptr();
    match qtype {
        QType::Q4_1 => {
            // Low nibbles are elements 0..16, high nibbles 16..32.
            let q = vld1q_u8(p.add(4));
            let lo = vandq_u8(q, vdupq_n_u8(0x0F));
            let hi = vshrq_n_u8::<4>(q);
            [
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))),
                vreinterpretq_s16_u16(vmovl_high_u8(lo)),
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
                vreinterpretq_s16_u16(vmovl_high_u8(hi)),
            ]
        }
        QType::Q8_0 => {
            let a = vld1q_s8(p.add(2) as *const i8);
            let b = vld1q_s8(p.add(18) as *const i8);
            [
                vmovl_s8(vget_low_s8(a)),
                vmovl_high_s8(a),
                vmovl_s8(vget_low_s8(b)),
                vmovl_high_s8(b),
            ]
        }
    }
}

/// `Σ_t` dot products of weight row bytes `w` with the `N` activation rows `x` (see
/// `Kernel::dots`). Each block's integer sum is exact in i32 (|q_w| ≤ 128, |q_x| ≤ 32767, 32
/// terms: < 2³¹), then scaled and added in four f32 lanes.
///
/// Safety: every activation row has `w.len() / qtype.block_bytes()` blocks (`d`, `s`) and
/// `BLOCK` values per block (`qs`); NEON itself is always present on aarch64.
pub(super) unsafe fn dots<const N: usize>(qtype: QType, w: &[u8], x: [ActRow<'_>; N]) -> [f32; N] {
    let bb = qtype.block_bytes();
    let mut acc = [vdupq_n_f32(0.0); N];
    let mut min_acc = [0f32; N];
    for (b, block) in w.chunks_exact(bb).enumerate() {
        let dw = f16_at(block, 0);
        let wq = widen(qtype, block);
        for t in 0..N {
            let xp = x[t].qs.as_ptr().add(b * BLOCK);
            let mut sum = vdupq_n_s32(0);
            for (i, wv) in wq.iter().enumerate() {
                let xv = vld1q_s16(xp.add(8 * i));
                sum = vmlal_s16(sum, vget_low_s16(*wv), vget_low_s16(xv));
                sum = vmlal_high_s16(sum, *wv, xv);
            }
            let scale = dw * *x[t].d.get_unchecked(b);
            acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(sum), scale);
        }
        if qtype == QType::Q4_1 {
            let mw = f16_at(block, 2);
            for t in 0..N {
                min_acc[t] += mw * *x[t].s.get_unchecked(b);
            }
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = vaddvq_f32(acc[t]) + min_acc[t];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{scalar, QActivations, QMatrix};
    use super::*;
    use crate::rng::Rng;

    fn block_f16(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    /// With unit scales (and, for Q4_1, a zero minimum) a block's dot product is its integer
    /// sum, which both kernels must give exactly, at the extremes of both operands' ranges
    /// (Q8_0 activations kept below 4096 so that every partial sum is exact in f32 too).
    #[test]
    fn integer_block_sums_equal_the_scalar_kernel_exactly() {
        let mut rng = Rng::new(21);
        for qtype in [QType::Q4_1, QType::Q8_0] {
            for case in 0..40 {
                let mut block = vec![0u8; qtype.block_bytes()];
                block[..2].copy_from_slice(&block_f16(1.0));
                for (i, byte) in block[if qtype == QType::Q4_1 { 4 } else { 2 }..].iter_mut().enumerate() {
                    *byte = match case {
                        0 => 0xFF, // Q4_1: 15 in both nibbles; Q8_0: -1
                        1 => 0x80, // Q8_0: -128
                        2 => 0x7F, // Q8_0: 127
                        _ => (rng.next_f32() * 256.0) as u8 ^ (i as u8),
                    };
                }
                let top = if qtype == QType::Q4_1 { 32767 } else { 4095 };
                let qs: Vec<i16> = (0..BLOCK)
                    .map(|i| match case % 3 {
                        0 => top,
                        1 if i % 2 == 0 => -top,
                        1 => top,
                        _ => ((rng.next_f32() * 2.0 - 1.0) * top as f32) as i16,
                    })
                    .collect();
                let row = ActRow {
                    qs: &qs,
                    d: &[1.0],
                    s: &[0.0],
                    paired: &[],
                };
                // SAFETY: one block of weights and one block of activations.
                let neon = unsafe { dots(qtype, &block, [row]) };
                let want = scalar::dots(qtype, &block, [row]);
                assert_eq!(neon, want, "{qtype:?} case {case}");
            }
        }
    }

    /// Whole rows with real scales, minimums and every token count the prompt kernel uses:
    /// the same sums as the scalar kernel up to f32 summation order.
    #[test]
    fn rows_match_the_scalar_kernel() {
        let mut rng = Rng::new(5);
        let random = |rng: &mut Rng, n: usize, s: f32| -> Vec<f32> {
            (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * s).collect()
        };
        for qtype in [QType::Q4_1, QType::Q8_0] {
            for cols in [32, 96, 576] {
                let w = QMatrix::quantize(qtype, 3, cols, &random(&mut rng, 3 * cols, 0.5)).unwrap();
                let x = QActivations::quantize(&random(&mut rng, 8 * cols, 3.0), 8, cols).unwrap();
                for r in 0..3 {
                    let row = w.row_data(r);
                    let rows: [ActRow<'_>; 8] = std::array::from_fn(|t| x.row(t));
                    // SAFETY: `x` has `cols / BLOCK` blocks per token, as the weight row.
                    let neon = unsafe { dots(qtype, row, rows) };
                    let want = scalar::dots(qtype, row, rows);
                    // SAFETY: as above, with one token.
                    let one = unsafe { dots(qtype, row, [x.row(0)]) };
                    assert_eq!(one[0], neon[0], "{qtype:?}: one token or eight, the same sum");
                    for (t, (a, b)) in neon.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (1.0 + b.abs()) * (cols / BLOCK) as f32;
                        assert!((a - b).abs() <= tol, "{qtype:?} {cols} row {r} token {t}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
