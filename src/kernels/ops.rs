//! Fused CPU kernels for the transformer's elementwise parts, each with its own backward:
//! RMS norm, rotary embedding and SwiGLU (the causal softmax is fused into the attention op in
//! `attention.rs`; `causal_softmax` here is its composite form for other devices). candle's
//! built-in fast versions drop gradients, and the composite (differentiable) versions materialise
//! 4–6 full-size intermediates each, which dominated step time and memory. On other devices and
//! dtypes the composite versions are used.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};

use super::buffer::written_whole;
use super::gemm::with_slice;
use super::simd::{vectorized, Kernel};
use super::spin::{for_each_chunk_mut, for_each_chunk_mut2, rows_per_task};

/// Whether the fused CPU f32 kernels can run on `t` (see [`super::fused_allowed`]).
pub(crate) fn cpu_f32(t: &Tensor) -> bool {
    super::fused_allowed(t)
}

/// The contiguous f32 data of a CPU storage, or an error naming `op`.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// All values of an f32 tensor, in row-major order.
pub(crate) fn tensor_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

// ---------------------------------------------------------------- vectorizable math

/// `eˣ` within 2 ulp of `f32::exp` on the range that matters here (results below ~1e-38 are
/// flushed to the smallest normal, above ~1.7e38 clamped), written so that loops over it
/// vectorize: libm's `expf` is a scalar call and was 5% of a training step (softmax over a 49k
/// vocabulary, attention, SiLU). Range reduction `x = n·ln2 + r`, |r| ≤ ln2/2, then a degree-6
/// Taylor polynomial for `eʳ` (truncation error < 1.2e-7 relative) and `2ⁿ` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sum of `xs` in 16 independent lanes (so it vectorizes; the order differs from a plain fold).
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest value of `xs` (−∞ for an empty slice), in 16 lanes.
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |a, &b| a.max(b))
}

// ---------------------------------------------------------------- RMS norm

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension. Gradients flow to `x` only (norm
/// weights are frozen in LoRA training).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if cpu_f32(x) && cpu_f32(w) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let dt = x.dtype();
    let xf = x.to_dtype(super::compute_dtype(dt))?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(w)
}

struct RmsNorm {
    eps: f32,
}

/// 1 / RMS of `row` (with `eps`): the scale an RMS norm applies to that row.
#[inline(always)]
pub(crate) fn rstd(row: &[f32], eps: f32) -> f32 {
    let ms = dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `Σ aᵢ·bᵢ` in 16 independent lanes (so it vectorizes; the order differs from a plain fold).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ aᵢ·bᵢ·cᵢ` in 16 independent lanes, like [`dot`].
#[inline(always)]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb, cc) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    let tail: f32 = (ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder()))
        .map(|((x, y), z)| x * y * z)
        .sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((s, x), y), z) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += x * y * z;
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "rms_norm")?;
        let w = slice(s2, l2, "rms_norm")?;
        let d = w.len();
        if l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms_norm: weight has {d} elements, input {:?}", l1.shape())
        }
        let mut out = written_whole(x.len());
        let rows = rows_per_task(x.len() / d.max(1), 1) * d;
        for_each_chunk_mut(&mut out, rows, |i, o| {
            for (o, xr) in o.chunks_exact_mut(d).zip(x[i * rows..].chunks_exact(d)) {
                vectorized(RmsNormRow {
                    out: o,
                    x: xr,
                    w,
                    eps: self.eps,
                })
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let wv = tensor_vec(w)?;
        let d = wv.len();
        if x.dims().last() != Some(&d) || g.elem_count() != x.elem_count() {
            candle_core::bail!("rms_norm backward: weight has {d} elements, input {:?}", x.shape())
        }
        let mut dx = written_whole(x.elem_count());
        // The saved input and the incoming gradient are read in place, not copied.
        with_slice(x, |xv| {
            with_slice(g, |gv| {
                let rows = rows_per_task(xv.len() / d.max(1), 1) * d;
                for_each_chunk_mut(&mut dx, rows, |i, o| {
                    let inputs = xv[i * rows..].chunks_exact(d).zip(gv[i * rows..].chunks_exact(d));
                    for (o, (xr, gr)) in o.chunks_exact_mut(d).zip(inputs) {
                        vectorized(RmsNormRowBackward {
                            dx: o,
                            x: xr,
                            w: &wv,
                            grad: gr,
                            eps: self.eps,
                        })
                    }
                });
                Ok(())
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None))
    }
}

/// One row of the RMS norm's forward pass.
struct RmsNormRow<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    w: &'a [f32],
    eps: f32,
}

impl Kernel for RmsNormRow<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let r = rstd(self.x, self.eps);
        for (o, (&x, &w)) in self.out.iter_mut().zip(self.x.iter().zip(self.w)) {
            *o = x * r * w;
        }
    }
}

/// One row of the RMS norm's backward pass: `dx = r·(g∘w) − x·r³·mean((g∘w)∘x)`.
struct RmsNormRowBackward<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    w: &'a [f32],
    grad: &'a [f32],
    eps: f32,
}

impl Kernel for RmsNormRowBackward<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let r = rstd(self.x, self.eps);
        let k = r * r * r * dot3(self.grad, self.w, self.x) / self.x.len() as f32;
        let inputs = self.grad.iter().zip(self.w).zip(self.x);
        for (o, ((&g, &w), &x)) in self.dx.iter_mut().zip(inputs) {
            *o = r * g * w - x * k;
        }
    }
}

// ---------------------------------------------------------------- rotary embedding

/// Hugging Face rotate-half rope on `x: [b, h, t, d]` with tables `cos`, `sin`: `[t, r/2]`
/// (row = position). The first `r` dimensions of each head are rotated (pairs `i`, `i + r/2`)
/// and the rest pass through: `r = d` is the usual full rotary, `r < d` Phi-3's partial rotary
/// (`partial_rotary_factor`). Gradients flow to `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = cos.dim(D::Minus1)?;
    let d = x.dim(D::Minus1)?;
    if 2 * half > d {
        candle_core::bail!("rope: tables rotate {} dimensions of heads of {d}", 2 * half)
    }
    if cpu_f32(x) && cpu_f32(cos) {
        let op = Rope {
            cos: tensor_vec(cos)?,
            sin: tensor_vec(sin)?,
            half,
            sign: 1.0,
        };
        return x.contiguous()?.apply_op1(op);
    }
    let rot = 2 * half;
    let (xr, pass) = if rot < d {
        (x.narrow(D::Minus1, 0, rot)?, Some(x.narrow(D::Minus1, rot, d - rot)?))
    } else {
        (x.clone(), None)
    };
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = xr.narrow(D::Minus1, 0, half)?;
    let x2 = xr.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = (xr.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    match pass {
        Some(p) => Tensor::cat(&[&out, &p], D::Minus1),
        None => Ok(out),
    }
}

/// Rotates one head row (`sign` +1) or rotates it back (`sign` −1), rotate-half convention over
/// the first `2 · cos.len()` dimensions; the others are copied (partial rotary).
pub(crate) fn rope_row(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (src[i], src[i + half]);
        let s = sign * sin[i];
        dst[i] = a * cos[i] - b * s;
        dst[i + half] = b * cos[i] + a * s;
    }
    dst[2 * half..].copy_from_slice(&src[2 * half..]);
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Entries per table row: half the rotated dimensions.
    half: usize,
    /// +1 rotates by the position angle, −1 rotates back (the backward pass).
    sign: f32,
}

impl Rope {
    fn apply(&self, x: &[f32], dims: &[usize]) -> candle_core::Result<Vec<f32>> {
        let [_, _, t, d] = dims else {
            candle_core::bail!("rope: expected [b, h, t, d], got {dims:?}")
        };
        let (t, d, half) = (*t, *d, self.half);
        if self.cos.len() < t * half {
            candle_core::bail!(
                "rope: tables cover {} positions, need {t}",
                self.cos.len() / half.max(1)
            )
        }
        let mut out = written_whole(x.len());
        for_each_chunk_mut(&mut out, t * d, |i, o| {
            let xh = &x[i * t * d..(i + 1) * t * d];
            for p in 0..t {
                let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
                rope_row(&xh[p * d..(p + 1) * d], &mut o[p * d..(p + 1) * d], c, s, self.sign);
            }
        });
        Ok(out)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "rope")?;
        Ok((CpuStorage::F32(self.apply(x, l.shape().dims())?), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The rotation is orthogonal: its transpose rotates by the opposite angle.
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            half: self.half,
            sign: -self.sign,
        };
        let gv = tensor_vec(g)?;
        let dx = back.apply(&gv, x.dims())?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

// ---------------------------------------------------------------- causal softmax

/// `softmax(scale · scores + causal mask)` over the last dimension of `scores: [.., t, t]`,
/// where query `i` sees keys `0..=i`, or only the last `window` of them (`i + 1 - window..=i`)
/// when `window` is set (sliding-window layers). Gradients flow to `scores`.
///
/// Composite ops on every device: the CPU f32 training path fuses it into
/// [`crate::model::attention::causal_attention`].
pub fn causal_softmax(scores: &Tensor, scale: f64, window: Option<usize>) -> candle_core::Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let w = window.unwrap_or(t).max(1);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i && i - j < w { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    // In f32 for bf16/f16 models (GPUs): exponentials of half-precision scores lose the small
    // probabilities.
    let dt = scores.dtype();
    let ct = super::compute_dtype(dt);
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?.to_dtype(ct)?;
    let scores = (scores.to_dtype(ct)? * scale)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dt)
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) · up`. Gradients flow to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_f32(gate) && cpu_f32(up) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

struct SwiGlu;

/// Values per task of SwiGLU's loops over the pool (64 KiB of each operand).
const CHUNK: usize = 16 * 1024;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, "swiglu")?, slice(s2, l2, "swiglu")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.shape(), l2.shape())
        }
        let mut out = written_whole(g.len());
        for_each_chunk_mut(&mut out, CHUNK, |i, o| {
            let at = i * CHUNK..i * CHUNK + o.len();
            vectorized(SwiGluForward {
                out: o,
                gate: &g[at.clone()],
                up: &u[at],
            })
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        if up.elem_count() != n || grad.elem_count() != n {
            candle_core::bail!(
                "swiglu backward: shapes {:?}, {:?} and {:?} differ",
                gate.shape(),
                up.shape(),
                grad.shape()
            )
        }
        let mut dg = written_whole(n);
        let mut du = written_whole(n);
        // The saved inputs and the incoming gradient are read in place (a copy of each was a
        // serial pass that took most of this op's time), in chunks the loop vectorizes.
        with_slice(gate, |gv| {
            with_slice(up, |uv| {
                with_slice(grad, |dv| {
                    for_each_chunk_mut2((&mut dg, CHUNK), (&mut du, CHUNK), |i, dgc, duc| {
                        let at = i * CHUNK..i * CHUNK + dgc.len();
                        vectorized(SwiGluBackward {
                            d_gate: dgc,
                            d_up: duc,
                            gate: &gv[at.clone()],
                            up: &uv[at.clone()],
                            grad: &dv[at],
                        })
                    });
                    Ok(())
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// A chunk of SwiGLU's forward pass.
struct SwiGluForward<'a> {
    out: &'a mut [f32],
    gate: &'a [f32],
    up: &'a [f32],
}

impl Kernel for SwiGluForward<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (o, (&x, &u)) in self.out.iter_mut().zip(self.gate.iter().zip(self.up)) {
            *o = x * sigmoid(x) * u;
        }
    }
}

/// A chunk of SwiGLU's backward pass.
struct SwiGluBackward<'a> {
    d_gate: &'a mut [f32],
    d_up: &'a mut [f32],
    gate: &'a [f32],
    up: &'a [f32],
    grad: &'a [f32],
}

impl Kernel for SwiGluBackward<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let outs = self.d_gate.iter_mut().zip(self.d_up.iter_mut());
        let ins = self.gate.iter().zip(self.up.iter().zip(self.grad));
        for ((dg, du), (&x, (&u, &d))) in outs.zip(ins) {
            let s = sigmoid(x);
            *du = d * x * s;
            *dg = d * u * s * (1.0 + x * (1.0 - s));
        }
    }
}

/// AdamW's constants for one update, as f32 the way candle's tensor-by-scalar ops apply them
/// (`affine(mul, add)` computes `v·mul + add` in f32; `t / c` is `affine(1/c, 0)`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 / (1 − β₂ᵗ)` and `1 / (1 − β₁ᵗ)`.
    pub inv_bc2: f32,
    pub inv_bc1: f32,
    pub eps: f32,
    /// `1 − lr·weight_decay`, when there is weight decay.
    pub decay: Option<f32>,
    pub lr: f32,
}

/// One AdamW update of a parameter in one pass: the new `θ`, `m` and `v` from the old ones and
/// the gradient `g`. The same f32 operations in the same order as `train::optim`'s composite
/// candle ops (bit for bit: `tests::fused_adamw_equals_the_composite_ops`), which take ~14
/// passes over the parameters and their moments, each on one thread.
pub(crate) fn adamw_step(
    step: AdamWStep,
    (theta, g, m, v): (&[f32], &[f32], &[f32], &[f32]),
    (theta_out, m_out, v_out): (&mut [f32], &mut [f32], &mut [f32]),
) {
    vectorized(AdamWChunk {
        step,
        ins: (theta, g, m, v),
        outs: (theta_out, m_out, v_out),
    })
}

struct AdamWChunk<'a> {
    step: AdamWStep,
    ins: (&'a [f32], &'a [f32], &'a [f32], &'a [f32]),
    outs: (&'a mut [f32], &'a mut [f32], &'a mut [f32]),
}

impl Kernel for AdamWChunk<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let c = self.step;
        let (theta, g, m, v) = self.ins;
        let (theta_out, m_out, v_out) = self.outs;
        let n = theta.len().min(g.len()).min(m.len()).min(v.len());
        let outs = theta_out[..n]
            .iter_mut()
            .zip(m_out[..n].iter_mut().zip(&mut v_out[..n]));
        let ins = theta[..n].iter().zip(g[..n].iter().zip(m[..n].iter().zip(&v[..n])));
        // Each `+ 0.0` is the `add` of the candle `affine` it stands for (not a no-op on −0).
        for ((to, (mo, vo)), (&t, (&g, (&m, &v)))) in outs.zip(ins) {
            let m = (m * c.beta1 + 0.0) + (g * c.one_minus_beta1 + 0.0);
            let v = (v * c.beta2 + 0.0) + ((g * g) * c.one_minus_beta2 + 0.0);
            let denom = (v * c.inv_bc2 + 0.0).sqrt() * 1.0 + c.eps;
            let update = (m * c.inv_bc1 + 0.0) / denom;
            let t = match c.decay {
                Some(d) => t * d + 0.0,
                None => t,
            };
            *to = t - (update * c.lr + 0.0);
            *mo = m;
            *vo = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 5) as f32 - 2.0).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
    }

    /// The SwiGLU and RMS-norm loops give the same bits in every kernel family's build.
    #[test]
    fn elementwise_kernels_agree_bitwise_across_families() {
        use crate::kernels::cpu::Family;
        use crate::kernels::simd::vectorized_on;
        let n = 1000;
        let v = |k: f32| {
            (0..n)
                .map(|i| ((i as f32 + k) * 0.731).sin() * 3.0)
                .collect::<Vec<f32>>()
        };
        let (g, u, d, w) = (v(0.0), v(1.0), v(2.0), v(3.0));
        let run = |family: Family| {
            let mut out = vec![vec![0f32; n]; 5];
            let [o0, o1, o2, o3, o4] = &mut out[..] else {
                unreachable!()
            };
            vectorized_on(
                family,
                SwiGluForward {
                    out: o0,
                    gate: &g,
                    up: &u,
                },
            );
            vectorized_on(
                family,
                SwiGluBackward {
                    d_gate: o1,
                    d_up: o2,
                    gate: &g,
                    up: &u,
                    grad: &d,
                },
            );
            vectorized_on(
                family,
                RmsNormRow {
                    out: o3,
                    x: &g,
                    w: &w,
                    eps: 1e-5,
                },
            );
            vectorized_on(
                family,
                RmsNormRowBackward {
                    dx: o4,
                    x: &g,
                    w: &w,
                    grad: &d,
                    eps: 1e-5,
                },
            );
            out
        };
        let want = run(Family::Portable);
        for family in Family::available() {
            let got = run(family);
            for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                assert_eq!(a.to_bits(), b.to_bits(), "{family:?}");
            }
        }
    }
    use candle_core::{Device, Var};

    #[test]
    fn exp_fast_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (a, b) = (exp_fast(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_fast(f32::NEG_INFINITY), exp_fast(-87.0));
        assert!(exp_fast(1000.0).is_finite());
        assert!(exp_fast(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sum_and_max_agree_with_folds() {
        let xs: Vec<f32> = (0..1001).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for n in [0, 1, 15, 16, 17, 1001] {
            let s: f64 = xs[..n].iter().map(|&x| x as f64).sum();
            assert!((sum(&xs[..n]) as f64 - s).abs() < 1e-3);
            assert_eq!(max(&xs[..n]), xs[..n].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
        }
    }

    /// Forward values and input gradients of a fused op equal those of candle's composite ops.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
        weights: &Tensor,
    ) {
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&xs), reference(&xs));
        assert!(
            crate::testing::max_abs_diff(&a, &b) < 1e-5,
            "forward differs by {}",
            crate::testing::max_abs_diff(&a, &b)
        );
        let ga = (a * weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * weights).unwrap().sum_all().unwrap().backward().unwrap();
        for v in inputs {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            assert!(
                crate::testing::max_abs_diff(x, y) < 1e-4,
                "gradient differs by {}",
                crate::testing::max_abs_diff(x, y)
            );
        }
    }

    #[test]
    fn fused_ops_match_composite_ops() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let gw = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        check(
            std::slice::from_ref(&x),
            |t| rms_norm(&t[0], &w, 1e-5).unwrap(),
            |t| {
                let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&w)
                    .unwrap()
            },
            &gw,
        );

        let q = Var::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let ang: Vec<f32> = (0..5 * 4).map(|i| (i / 4) as f32 * 0.3 / (1 + i % 4) as f32).collect();
        let ang = Tensor::from_vec(ang, (5, 4), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let gq = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        check(
            std::slice::from_ref(&q),
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| candle_nn::rotary_emb::rope_slow(&t[0], &cos, &sin).unwrap(),
            &gq,
        );

        // Partial rotary (Phi-3): 4 of 8 dimensions rotated, the rest passed through.
        let (cos2, sin2) = (cos.narrow(1, 0, 2).unwrap(), sin.narrow(1, 0, 2).unwrap());
        check(
            std::slice::from_ref(&q),
            |t| rope(&t[0], &cos2, &sin2).unwrap(),
            |t| {
                let r = candle_nn::rotary_emb::rope_slow(&t[0].narrow(3, 0, 4).unwrap(), &cos2, &sin2).unwrap();
                Tensor::cat(&[&r, &t[0].narrow(3, 4, 4).unwrap()], 3).unwrap()
            },
            &gq,
        );
        let composite = {
            let q = q.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
            let c = cos2.to_dtype(candle_core::DType::F64).unwrap();
            let s = sin2.to_dtype(candle_core::DType::F64).unwrap();
            rope(&q, &c, &s).unwrap().to_dtype(candle_core::DType::F32).unwrap()
        };
        let fused = rope(q.as_tensor(), &cos2, &sin2).unwrap();
        assert!(crate::testing::max_abs_diff(&fused, &composite) < 1e-5);

        let s = Var::randn(0f32, 2.0, (2, 3, 5, 5), &dev).unwrap();
        let gs = Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &dev).unwrap();
        let mask: Vec<f32> = (0..5)
            .flat_map(|i| (0..5).map(move |j| if j <= i { 0.0 } else { -1e9 }))
            .collect();
        let mask = Tensor::from_vec(mask, (5, 5), &dev).unwrap();
        check(
            std::slice::from_ref(&s),
            |t| causal_softmax(&t[0], 0.125, None).unwrap(),
            |t| candle_nn::ops::softmax(&(&t[0] * 0.125).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap(),
            &gs,
        );

        let g = Var::randn(0f32, 2.0, (3, 7), &dev).unwrap();
        let u = Var::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let gg = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        check(
            &[g.clone(), u.clone()],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            &gg,
        );
    }
}
