//! Cross-entropy over the vocabulary. On CPU in f32 it is one fused op whose backward writes
//! `softmax − onehot` directly, instead of materialising log-softmax, gather and their
//! gradients (several `[tokens, vocab]` buffers, ~200 MB each for a batch of 4×256 with a
//! 49k vocabulary).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::ops::{exp_fast, max};

/// Mean cross-entropy of `logits: [n, vocab]` against `targets` (`n` token ids).
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if n != targets.len() {
        candle_core::bail!("cross_entropy: {n} rows but {} targets", targets.len())
    }
    if n == 0 {
        candle_core::bail!("cross_entropy: no target tokens")
    }
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let per_row = logits.contiguous()?.apply_op1(FusedCrossEntropy {
            targets: targets.to_vec(),
            lse: Default::default(),
        })?;
        per_row.mean_all()
    } else {
        let t = Tensor::from_slice(targets, n, logits.device())?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let picked = logp.gather(&t.unsqueeze(1)?, 1)?;
        picked.neg()?.mean_all()
    }
}

struct FusedCrossEntropy {
    targets: Vec<u32>,
    /// Each row's log-sum-exp from the forward pass, so the backward pass does not recompute it.
    lse: std::sync::Mutex<Vec<f32>>,
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross_entropy: logits must be contiguous")
    };
    Ok(&data[a..b])
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let m = max(row);
    // Sixteen lanes so the exponentials and the sum vectorize.
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp_fast(x - m)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp_fast(x - m);
        }
    }
    m + (acc.iter().sum::<f32>() + tail).ln()
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = s.as_slice::<f32>()?;
        let (n, v) = l.shape().dims2()?;
        let Some((a, _)) = l.contiguous_offsets() else {
            candle_core::bail!("cross_entropy: logits must be contiguous")
        };
        let data = &data[a..a + n * v];
        let lse: Vec<f32> = data.par_chunks(v).map(log_sum_exp).collect();
        let losses = lse
            .iter()
            .zip(data.chunks(v).zip(&self.targets))
            .map(|(l, (row, &t))| l - row.get(t as usize).copied().unwrap_or(f32::NAN))
            .collect();
        if let Ok(mut saved) = self.lse.lock() {
            *saved = lse;
        }
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("cross_entropy: fused backward runs on CPU only")
        };
        let logits = rows(cpu, layout)?;
        let saved = self.lse.lock().map(|l| l.clone()).unwrap_or_default();
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let lse = saved.get(i).copied().unwrap_or_else(|| log_sum_exp(row));
                let gi = g[i];
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = exp_fast(x - lse) * gi;
                }
                if let Some(x) = o.get_mut(self.targets[i] as usize) {
                    *x -= gi;
                }
            });
        drop(storage);
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_log_softmax_reference() {
        let dev = Device::Cpu;
        let logits = Var::randn(0f32, 3.0, (5, 11), &dev).unwrap();
        let targets = [0u32, 3, 10, 7, 7];
        let fused = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let t = Tensor::from_slice(&targets, 5, &dev).unwrap();
        let logp = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let reference = logp
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .neg()
            .unwrap()
            .mean_all()
            .unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let g1 = fused.backward().unwrap();
        let g2 = reference.backward().unwrap();
        let d = crate::testing::max_abs_diff(g1.get(&logits).unwrap(), g2.get(&logits).unwrap());
        assert!(d < 1e-6, "gradient differs by {d}");
    }
}
