//! Cross-entropy over the vocabulary. On CPU in f32 it is one fused op whose backward writes
//! `softmax − onehot` directly, instead of materialising log-softmax, gather and their
//! gradients (several `[tokens, vocab]` buffers, ~200 MB each for a batch of 4×256 with a
//! 49k vocabulary).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

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
}

fn rows(s: &CpuStorage, l: &Layout) -> candle_core::Result<(Vec<f32>, usize)> {
    let (_, v) = l.shape().dims2()?;
    let data = s.as_slice::<f32>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross_entropy: logits must be contiguous")
    };
    Ok((data[a..b].to_vec(), v))
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|x| (x - m).exp()).sum();
    m + s.ln()
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
        let losses: Vec<f32> = data
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| log_sum_exp(row) - row.get(t as usize).copied().unwrap_or(f32::NAN))
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("cross_entropy: fused backward runs on CPU only")
        };
        let (mut data, _) = rows(cpu, layout)?;
        drop(storage);
        data.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            let lse = log_sum_exp(row);
            let gi = g[i];
            for x in row.iter_mut() {
                *x = (*x - lse).exp() * gi;
            }
            if let Some(x) = row.get_mut(self.targets[i] as usize) {
                *x -= gi;
            }
        });
        Ok(Some(Tensor::from_vec(data, (n, v), arg.device())?))
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
