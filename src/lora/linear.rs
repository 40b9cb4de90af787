//! The one LoRA-wrapped linear layer every model family uses:
//! `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`, with `W` (and `b`) frozen and never copied.

use candle_core::{Tensor, Var};

use std::sync::Arc;

use crate::kernels::gemm::{
    frozen_linear, lora_linear, lora_linear_quantized, lora_linear_supported, quantized_linear,
};
use crate::kernels::quant::QMatrix;
use crate::rng::Rng;

/// Trainable low-rank update of one linear layer. `a: [r, in]`, `b: [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

/// Per-forward state: whether dropout is active and where its randomness comes from.
pub struct ForwardCtx<'a> {
    pub dropout_rng: Option<&'a mut Rng>,
}

impl ForwardCtx<'_> {
    /// Evaluation / inference: no dropout.
    pub fn eval() -> ForwardCtx<'static> {
        ForwardCtx { dropout_rng: None }
    }
}

/// The frozen base weight `[out, in]` of a linear layer.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A tensor in the model's dtype, on its device.
    Dense(Tensor),
    /// GGUF blocks (Q8_0/Q4_1) kept as they are in memory, multiplied through dequantized
    /// panels ([`crate::kernels::gemm::quantized_linear`]): CPU, f32 activations.
    Quantized(Arc<QMatrix>),
}

/// A linear layer with frozen base weights and an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
}

impl LoraLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight: FrozenWeight::Dense(weight),
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.dims()[1],
            FrozenWeight::Quantized(q) => q.cols(),
        }
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            FrozenWeight::Dense(w) => w.dims()[0],
            FrozenWeight::Quantized(q) => q.rows(),
        }
    }

    /// `x·Wᵀ` with the frozen weight alone (no gradient to it).
    fn base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => frozen_linear(x, w),
            FrozenWeight::Quantized(q) => quantized_linear(x, q),
        }
    }

    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        let bias = self.bias.as_ref();
        let mut y = match &self.lora {
            None => self.base(x)?,
            Some(l) => {
                let dropout_on = l.dropout > 0.0 && ctx.dropout_rng.is_some();
                // The fused op adds the bias itself (the graph then keeps no bias-free copy).
                match &self.weight {
                    FrozenWeight::Dense(w) if !dropout_on && lora_linear_supported(x, w, l.a.as_tensor()) => {
                        return lora_linear(x, w, l.a.as_tensor(), l.b.as_tensor(), l.scale, bias);
                    }
                    FrozenWeight::Quantized(q) if !dropout_on && lora_linear_supported(x, x, l.a.as_tensor()) => {
                        return lora_linear_quantized(x, q, l.a.as_tensor(), l.b.as_tensor(), l.scale, bias);
                    }
                    _ => {
                        let xd = match &mut ctx.dropout_rng {
                            Some(rng) if dropout_on => dropout(x, l.dropout, rng)?,
                            _ => x.clone(),
                        };
                        // Mixed precision: the adapter (and its optimizer) stay f32 over a bf16/f16
                        // base; its input is cast up and its update cast down to the base's dtype.
                        let xd = xd.to_dtype(l.a.dtype())?;
                        // Scale the [tokens, r] product, not the [tokens, out] one.
                        let h = (xd.broadcast_matmul(&l.a.as_tensor().t()?)? * l.scale)?;
                        let update = h.broadcast_matmul(&l.b.as_tensor().t()?)?.to_dtype(x.dtype())?;
                        (self.base(x)? + update)?
                    }
                }
            }
        };
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// The frozen weight as a dense tensor (a quantized one dequantized, in f32 on the CPU).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Quantized(q) => {
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &candle_core::Device::Cpu)
            }
        }
    }

    /// The dense weight with the adapter folded in: `W + scale · B·A`, a plain tensor (no
    /// backprop graph back to the adapter's variables).
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let w = self.dense_weight()?;
        match &self.lora {
            None => Ok(w),
            Some(l) => {
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                Ok(w.add(&delta.to_dtype(w.dtype())?)?.detach())
            }
        }
    }
}

/// Inverted dropout with a mask drawn from our own seeded RNG (so runs are reproducible and
/// resumable; candle's CPU RNG cannot be seeded).
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> candle_core::Result<Tensor> {
    let keep = 1.0 - p;
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.next_f32() < keep { 1.0 / keep } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::QType;
    use candle_core::{Device, Var};

    /// A random rank-`r` adapter for a `[out, inp]` projection, scale 2, no dropout.
    fn random_lora(out: usize, inp: usize, r: usize) -> LoraWeights {
        LoraWeights {
            a: Var::randn(0f32, 0.3, (r, inp), &Device::Cpu).unwrap(),
            b: Var::randn(0f32, 0.3, (out, r), &Device::Cpu).unwrap(),
            scale: 2.0,
            dropout: 0.0,
        }
    }

    /// The fused op adds a frozen bias once, last: output and gradients equal the composite
    /// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ + b`, on few tokens and on enough to be split by token blocks.
    #[test]
    fn the_fused_op_adds_the_bias_once() {
        let dev = Device::Cpu;
        let (out, inp, r) = (40, 24, 4);
        for tokens in [7, 300] {
            let w = Tensor::randn(0f32, 0.5, (out, inp), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let lora = random_lora(out, inp, r);
            let lin = LoraLinear {
                weight: FrozenWeight::Dense(w.clone()),
                bias: Some(b.clone()),
                lora: Some(lora.clone()),
            };
            let x = Var::randn(0f32, 1.0, (1, tokens, inp), &dev).unwrap();
            let c = Tensor::randn(0f32, 1.0, (1, tokens, out), &dev).unwrap();
            let fused = lin.forward(x.as_tensor(), &mut ForwardCtx::eval()).unwrap();
            let h = (x.broadcast_matmul(&lora.a.t().unwrap()).unwrap() * 2.0).unwrap();
            let reference = (x.broadcast_matmul(&w.t().unwrap()).unwrap()
                + h.broadcast_matmul(&lora.b.t().unwrap()).unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
            assert!(
                crate::testing::max_abs_diff(&fused, &reference) < 1e-4,
                "{tokens} tokens: output"
            );
            let g = (&fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&reference * &c).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("A", &lora.a), ("B", &lora.b)] {
                let d = crate::testing::max_abs_diff(g.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap());
                assert!(d < 1e-3, "{tokens} tokens: gradient of {name} differs by {d}");
            }
        }
    }

    /// A quantized frozen base trains exactly as the dense base holding the same (dequantized)
    /// weights: outputs and the gradients of x, A and B agree to float precision, for both
    /// block types, with and without a bias; the frozen weight gets no gradient either way.
    #[test]
    fn quantized_base_gives_the_dense_base_gradients() {
        let dev = Device::Cpu;
        let (out, inp, r) = (48, 96, 4);
        for qtype in [QType::Q8_0, QType::Q4_1] {
            for bias in [false, true] {
                let w = Tensor::randn(0f32, 0.5, (out, inp), &dev).unwrap();
                let q =
                    QMatrix::quantize(qtype, out, inp, &w.flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
                let wd = Tensor::from_vec(q.dequantize(), (out, inp), &dev).unwrap();
                let b = bias.then(|| Tensor::randn(0f32, 1.0, out, &dev).unwrap());
                let lora = random_lora(out, inp, r);
                let dense = LoraLinear {
                    weight: FrozenWeight::Dense(wd.clone()),
                    bias: b.clone(),
                    lora: Some(lora.clone()),
                };
                let quant = LoraLinear {
                    weight: FrozenWeight::Quantized(Arc::new(q)),
                    bias: b,
                    lora: Some(lora.clone()),
                };
                assert_eq!((quant.in_features(), quant.out_features()), (inp, out));
                let x = Var::randn(0f32, 1.0, (2, 7, inp), &dev).unwrap();
                let c = Tensor::randn(0f32, 1.0, (2, 7, out), &dev).unwrap();
                let run = |lin: &LoraLinear| {
                    let y = lin.forward(x.as_tensor(), &mut ForwardCtx::eval()).unwrap();
                    let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads: Vec<Tensor> = [x.as_tensor(), lora.a.as_tensor(), lora.b.as_tensor()]
                        .map(|v| g.get(v).unwrap().clone())
                        .to_vec();
                    assert!(g.get(&wd).is_none(), "the frozen weight must get no gradient");
                    (y, grads)
                };
                let (yd, gd) = run(&dense);
                let (yq, gq) = run(&quant);
                let tol = |t: &Tensor| 1e-5 * (1.0 + t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap());
                assert!(crate::testing::max_abs_diff(&yd, &yq) < tol(&yd), "{qtype:?} output");
                for (name, (a, b)) in ["x", "A", "B"].iter().zip(gd.iter().zip(&gq)) {
                    let d = crate::testing::max_abs_diff(a, b);
                    assert!(d < tol(a), "{qtype:?} bias {bias}: gradient of {name} differs by {d}");
                }
                // The merged weight of the quantized layer is the dequantized base plus B·A.
                let m = quant.merged_weight().unwrap();
                assert!(crate::testing::max_abs_diff(&m, &dense.merged_weight().unwrap()) < 1e-6);
            }
        }
    }

    /// A quantized base refuses what it cannot run instead of computing something else.
    #[test]
    fn quantized_base_needs_f32_inputs() {
        let q = QMatrix::quantize(QType::Q8_0, 2, 32, &[0.25; 64]).unwrap();
        let lin = LoraLinear {
            weight: FrozenWeight::Quantized(Arc::new(q)),
            bias: None,
            lora: None,
        };
        let x = Tensor::zeros((1, 32), candle_core::DType::BF16, &Device::Cpu).unwrap();
        let e = lin.forward(&x, &mut ForwardCtx::eval()).unwrap_err().to_string();
        assert!(e.contains("f32"), "{e}");
    }
}
