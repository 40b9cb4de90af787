//! Cross-entropy over the vocabulary. Training on CPU in f32 fuses it with the output head
//! ([`linear_cross_entropy`]), whose forward pass writes `(softmax − onehot)·W` directly instead
//! of materialising logits, log-softmax, gather and their gradients (several `[tokens, vocab]`
//! buffers, ~200 MB each for a batch of 4×256 with a 49k vocabulary). [`cross_entropy`] is the
//! composite form other devices use.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use crate::kernels::buffer::written_whole;
use crate::kernels::gemm::with_dense;
use crate::kernels::ops::{self, cpu_f32, exp_fast, max};
use crate::kernels::spin::{for_each_chunk_mut, for_each_chunk_mut2, rows_per_task};

/// Mean cross-entropy of `logits: [n, vocab]` against `targets` (`n` token ids).
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if n != targets.len() {
        candle_core::bail!("cross_entropy: {n} rows but {} targets", targets.len())
    }
    if n == 0 {
        candle_core::bail!("cross_entropy: no target tokens")
    }
    let t = Tensor::from_slice(targets, n, logits.device())?;
    let logp = candle_nn::ops::log_softmax(
        &logits.to_dtype(crate::kernels::compute_dtype(logits.dtype()))?,
        D::Minus1,
    )?;
    let picked = logp.gather(&t.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

/// Bytes of logits held at once by [`linear_cross_entropy`] (a few rows × the vocabulary).
const LOGITS_CHUNK_BYTES: usize = 64 << 20;

/// Mean cross-entropy of `hidden: [n, d] · wᵀ` (`w: [vocab, d]`, frozen: the output head)
/// against `targets`, without ever holding the `[n, vocab]` logits or their gradient.
///
/// The logits are computed a chunk of rows at a time; each chunk's softmax gradient is turned
/// into the gradient of its hidden rows right away (`(softmax − onehot) · w`), so the backward
/// pass only scales stored rows. With a 49k vocabulary and 1024 rows this drops three 200 MB
/// buffers per step (logits, their gradient, and candle's zero-filled gradient accumulator)
/// and the passes over them. `for_backward: false` (evaluation) skips that extra product; a
/// backward pass then recomputes it. Other devices and dtypes use the head + [`cross_entropy`].
pub fn linear_cross_entropy(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    for_backward: bool,
) -> candle_core::Result<Tensor> {
    linear_token_nll(hidden, w, targets, for_backward)?.mean_all()
}

/// The cross-entropy of every row, `[n]` (−log p of each target): what
/// [`linear_cross_entropy`] averages, for losses that weigh tokens differently (preference
/// training sums them per sequence). Same fused path, same memory; the backward pass scales
/// each row's prepared gradient by its own incoming gradient.
pub fn linear_token_nll(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    for_backward: bool,
) -> candle_core::Result<Tensor> {
    let (n, d) = hidden.dims2()?;
    let (_, wd) = w.dims2()?;
    if n != targets.len() {
        candle_core::bail!("cross_entropy: {n} rows but {} targets", targets.len())
    }
    if n == 0 {
        candle_core::bail!("cross_entropy: no target tokens")
    }
    if d != wd {
        candle_core::bail!("cross_entropy: hidden size {d} but the head expects {wd}")
    }
    if cpu_f32(hidden) && crate::kernels::gemm::cpu_dense(w) {
        let op = LinearCrossEntropy {
            w: w.contiguous()?,
            targets: targets.to_vec(),
            for_backward,
            chunk_bytes: LOGITS_CHUNK_BYTES,
            dx: Default::default(),
        };
        return hidden.contiguous()?.apply_op1(op);
    }
    token_cross_entropy(&crate::kernels::gemm::frozen_linear(hidden, w)?, targets)
}

/// Per-row cross-entropy of `logits: [n, vocab]` against `targets`, `[n]` (composite ops).
pub fn token_cross_entropy(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if n != targets.len() {
        candle_core::bail!("cross_entropy: {n} rows but {} targets", targets.len())
    }
    let t = Tensor::from_slice(targets, n, logits.device())?;
    let logp = candle_nn::ops::log_softmax(
        &logits.to_dtype(crate::kernels::compute_dtype(logits.dtype()))?,
        D::Minus1,
    )?;
    logp.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

struct LinearCrossEntropy {
    w: Tensor,
    targets: Vec<u32>,
    for_backward: bool,
    chunk_bytes: usize,
    /// `∂loss_i/∂hidden_i` for every row (unscaled by the incoming gradient), from the forward pass.
    dx: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LinearCrossEntropy {
    /// Per-row losses and, when `with_grad`, the per-row hidden gradients `[n, d]`.
    fn run(&self, h: &[f32], n: usize, with_grad: bool) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
        with_dense(&self.w, |w| {
            let d = h.len() / n;
            let v = w.len() / d.max(1);
            let threads = crate::kernels::cpu::threads();
            let rows = (self.chunk_bytes / (4 * v).max(1)).clamp(1, n);
            let mut losses = vec![0f32; n];
            let mut dx = with_grad.then(|| written_whole(n * d));
            let mut logits = written_whole(rows * v);
            for r0 in (0..n).step_by(rows) {
                let r1 = (r0 + rows).min(n);
                let buf = &mut logits[..(r1 - r0) * v];
                w.times_t_into((v, d), &h[r0 * d..r1 * d], r1 - r0, buf, false, threads)?;
                let targets = &self.targets[r0..r1];
                let per = rows_per_task(r1 - r0, 1);
                for_each_chunk_mut2((buf, per * v), (&mut losses[r0..r1], per), |i, block, block_losses| {
                    let rows = block.chunks_exact_mut(v).zip(block_losses);
                    for ((row, loss), &t) in rows.zip(&targets[i * per..]) {
                        *loss = crate::kernels::simd::vectorized(RowLoss {
                            row,
                            target: t,
                            with_grad,
                        })
                    }
                });
                if let Some(dx) = dx.as_mut() {
                    w.times_into((v, d), buf, r1 - r0, &mut dx[r0 * d..r1 * d], false, threads)?;
                }
            }
            Ok((losses, dx))
        })
    }
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _) = l.shape().dims2()?;
        let h = rows(s, l)?;
        let (losses, dx) = self.run(h, n, self.for_backward)?;
        if let Ok(mut saved) = self.dx.lock() {
            *saved = dx;
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, d) = arg.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let saved = self.dx.lock().ok().and_then(|mut s| s.take());
        let mut dx = match saved {
            Some(dx) => dx,
            None => {
                let h = ops::tensor_vec(arg)?;
                self.run(&h, n, true)?.1.unwrap_or_default()
            }
        };
        let per = rows_per_task(n, 1);
        for_each_chunk_mut(&mut dx, per * d, |i, block| {
            for (row, &gi) in block.chunks_exact_mut(d.max(1)).zip(&g[i * per..]) {
                row.iter_mut().for_each(|x| *x *= gi);
            }
        });
        Ok(Some(Tensor::from_vec(dx, (n, d), arg.device())?))
    }
}

/// One row of logits: its loss `logsumexp − logit[target]`, and with `with_grad` the row
/// replaced by its gradient `softmax − onehot(target)`.
struct RowLoss<'a> {
    row: &'a mut [f32],
    target: u32,
    with_grad: bool,
}

impl crate::kernels::simd::Kernel for RowLoss<'_> {
    type Output = f32;
    #[inline(always)]
    fn run(self) -> f32 {
        let target = self.row.get(self.target as usize).copied().unwrap_or(f32::NAN);
        // The row is scratch: its exponentials are kept in place, and the gradient reuses them
        // (`eˣ⁻ᵐ / Σ` instead of `eˣ⁻ˡˢᵉ`, one exponential a logit instead of two; the output
        // head's softmax is 50M values a step at b4×256 with SmolLM2's vocabulary).
        let m = max(self.row);
        let sum = exp_sum_in_place(self.row, m);
        if self.with_grad {
            let inv = 1.0 / sum;
            self.row.iter_mut().for_each(|x| *x *= inv);
            if let Some(x) = self.row.get_mut(self.target as usize) {
                *x -= 1.0;
            }
        }
        m + sum.ln() - target
    }
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross_entropy: logits must be contiguous")
    };
    Ok(&data[a..b])
}

/// Replaces every `x` of `row` by `eˣ⁻ᵐ` and returns their sum, in sixteen lanes so that the
/// exponentials and the sum vectorize.
#[inline(always)]
fn exp_sum_in_place(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp_fast(*x - m);
            *a += *x;
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|x| {
            *x = exp_fast(*x - m);
            *x
        })
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused head + loss equals the head followed by the plain fused loss, in value and
    /// in the gradient of the hidden states, over several row chunks, whether the gradient was
    /// prepared in the forward pass or recomputed in the backward pass.
    #[test]
    fn linear_cross_entropy_matches_head_then_loss() {
        let dev = Device::Cpu;
        let (n, d, v) = (7, 5, 13);
        let h = Var::randn(0f32, 1.0, (n, d), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap();
        let targets = [0u32, 12, 3, 3, 7, 1, 9];
        let reference = cross_entropy(
            &crate::kernels::gemm::frozen_linear(h.as_tensor(), &w).unwrap(),
            &targets,
        )
        .unwrap();
        let g_ref = reference.backward().unwrap();
        for for_backward in [true, false] {
            let op = LinearCrossEntropy {
                w: w.clone(),
                targets: targets.to_vec(),
                for_backward,
                // Three rows of logits per chunk: chunks of 3, 3 and 1 rows.
                chunk_bytes: 3 * v * 4,
                dx: Default::default(),
            };
            let loss = h.as_tensor().apply_op1(op).unwrap().mean_all().unwrap();
            let (a, b) = (loss.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            let g = loss.backward().unwrap();
            let diff = crate::testing::max_abs_diff(g.get(&h).unwrap(), g_ref.get(&h).unwrap());
            assert!(diff < 1e-5, "gradient differs by {diff} (for_backward: {for_backward})");
        }
        let public = linear_cross_entropy(h.as_tensor(), &w, &targets, true).unwrap();
        assert!((public.to_scalar::<f32>().unwrap() - reference.to_scalar::<f32>().unwrap()).abs() < 1e-5);
    }
}
