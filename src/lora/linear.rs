//! The one LoRA-wrapped linear layer every model family uses:
//! `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`, with `W` (and `b`) frozen and never copied.

use candle_core::{Tensor, Var};

use crate::kernels::gemm::{frozen_linear, lora_linear, lora_linear_supported};
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

/// A linear layer with frozen base weights and an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
}

impl LoraLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        let mut y = match &self.lora {
            None => frozen_linear(x, &self.weight)?,
            Some(l) => {
                let dropout_on = l.dropout > 0.0 && ctx.dropout_rng.is_some();
                if !dropout_on && lora_linear_supported(x, &self.weight, l.a.as_tensor()) {
                    lora_linear(x, &self.weight, l.a.as_tensor(), l.b.as_tensor(), l.scale)?
                } else {
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
                    (frozen_linear(x, &self.weight)? + update)?
                }
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// The dense weight with the adapter folded in: `W + scale · B·A`, a plain tensor (no
    /// backprop graph back to the adapter's variables).
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        match &self.lora {
            None => Ok(self.weight.clone()),
            Some(l) => {
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                Ok(self.weight.add(&delta.to_dtype(self.weight.dtype())?)?.detach())
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
