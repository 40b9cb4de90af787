//! Attention of a few new queries over a KV cache: the attention of decoding, shared by the f32
//! transformer (one token at a time, [`decode_attention`]) and the quantized GGUF path.
//!
//! Why not candle's ops for one decoded token: per layer they were two batched matmuls with a
//! single query row per kv-head group (gemm's generic matrix×vector path), a softmax and three
//! reshaped copies, all on the decoding thread while the spin pool's other threads waited.
//! `perf` on a 512-token f32 decode of SmolLM2-135M (AMD EPYC Zen 4, 2 threads) put those
//! matmuls at ~40% of the work done outside the weight products. Here each head's scores,
//! softmax and weighted sum of values run in one pass over the cache where it lies (no copy
//! of the keys or values), heads split over the spin pool once the context is long enough.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::ops::{cpu_f32, dot, exp_fast, sum};
use crate::kernels::simd::{vectorized, Kernel};

/// One layer's cached keys or values: position `p` of kv head `h` starts at
/// `data[h * head_stride + p * pos_stride]` and runs `head_dim` values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvView<'a> {
    pub data: &'a [f32],
    pub head_stride: usize,
    pub pos_stride: usize,
}

impl<'a> KvView<'a> {
    /// Rows `[position, kv_heads·head_dim]`, row-major.
    pub fn by_position(data: &'a [f32], kv_heads: usize, head_dim: usize) -> Self {
        KvView {
            data,
            head_stride: head_dim,
            pos_stride: kv_heads * head_dim,
        }
    }

    fn at(&self, head: usize, p: usize, hd: usize) -> &'a [f32] {
        let s = head * self.head_stride + p * self.pos_stride;
        &self.data[s..s + hd]
    }

    /// Whether positions `0..positions` of `kv_heads` heads lie inside `data`.
    fn holds(&self, kv_heads: usize, positions: usize, hd: usize) -> bool {
        kv_heads == 0
            || positions == 0
            || (kv_heads - 1) * self.head_stride + (positions - 1) * self.pos_stride + hd <= self.data.len()
    }
}

/// The shape of one call: `heads` query heads over `kv_heads` cached heads of `head_dim`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheHeads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding-window layers: a query sees only the last `window` positions, its own included.
    pub window: Option<usize>,
    /// Multiplies every score (`1/√head_dim` or the family's own).
    pub scale: f32,
}

/// Causal grouped-query attention of the `t` new queries `q` (`[t, heads·head_dim]`, positions
/// `past..past + t`) over the cache, which holds positions `0..past + t`; writes
/// `out: [t, heads·head_dim]`. Heads run in parallel: on rayon for a prompt, on the spin pool
/// for one token once the context is long enough to be worth handing over.
pub(crate) fn over_cache(q: &[f32], keys: KvView, values: KvView, past: usize, h: CacheHeads, out: &mut [f32]) {
    let (heads, hd) = (h.heads, h.head_dim);
    let q_dim = heads * hd;
    let t = q.len() / q_dim.max(1);
    let group = heads / h.kv_heads.max(1);
    // Per head, `[t, hd]`, so that heads can be written in parallel; copied into `out` after.
    let mut by_head = vec![0f32; heads * t * hd];
    let work = |(head, dst): (usize, &mut [f32])| {
        vectorized(HeadAttention {
            q,
            q_dim,
            head,
            kvh: head / group.max(1),
            keys,
            values,
            past,
            h,
            dst,
        })
    };
    // Heads in parallel for a prompt, and for one token once the context is long enough that
    // a head's scores outweigh handing it to another thread (on SmolLM2-135M at 1,000 tokens of
    // context, a single-threaded decode attention was a third of the quantized decode time).
    // One token runs outside rayon (see `kernels::spin::without_rayon`): the spin pool's threads.
    if t > 1 {
        by_head.par_chunks_mut(t * hd).enumerate().for_each(work);
    } else if heads * (past + 1) * hd >= 1 << 15 {
        crate::kernels::spin::for_each_chunk_mut(&mut by_head, hd, |head, dst| work((head, dst)));
    } else {
        by_head.chunks_mut(t * hd).enumerate().for_each(work);
    }
    for (head, src) in by_head.chunks_exact(t * hd).enumerate() {
        for i in 0..t {
            out[i * q_dim + head * hd..i * q_dim + (head + 1) * hd].copy_from_slice(&src[i * hd..(i + 1) * hd]);
        }
    }
}

/// One query head's attention over the cache, as a loop compiled for the CPU's vector width
/// ([`vectorized`]): the scores' dot products, their exponentials and the weighted sum of values.
struct HeadAttention<'a> {
    q: &'a [f32],
    q_dim: usize,
    head: usize,
    kvh: usize,
    keys: KvView<'a>,
    values: KvView<'a>,
    past: usize,
    h: CacheHeads,
    /// `[t, head_dim]`.
    dst: &'a mut [f32],
}

impl Kernel for HeadAttention<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let (hd, q_dim, h) = (self.h.head_dim, self.q_dim, self.h);
        let t = self.dst.len() / hd.max(1);
        let mut scores = vec![0f32; self.past + t];
        for i in 0..t {
            let qi = &self.q[i * q_dim + self.head * hd..i * q_dim + (self.head + 1) * hd];
            let seen = self.past + i + 1;
            let first = h.window.map_or(0, |w| seen.saturating_sub(w.max(1)));
            let scores = &mut scores[first..seen];
            let mut max = f32::NEG_INFINITY;
            for (p, s) in (first..).zip(scores.iter_mut()) {
                *s = dot(qi, self.keys.at(self.kvh, p, hd)) * h.scale;
                max = max.max(*s);
            }
            scores.iter_mut().for_each(|s| *s = exp_fast(*s - max));
            let inv = 1.0 / sum(scores);
            let o = &mut self.dst[i * hd..(i + 1) * hd];
            o.fill(0.0);
            for (p, s) in (first..).zip(scores.iter()) {
                let w = s * inv;
                o.iter_mut()
                    .zip(self.values.at(self.kvh, p, hd))
                    .for_each(|(a, b)| *a += w * b);
            }
        }
    }
}

/// Whether [`decode_attention`] runs for these tensors (f32 on the CPU; other devices and
/// dtypes take candle's ops).
pub fn decode_attention_supported(q: &Tensor) -> bool {
    cpu_f32(q)
}

/// One decoded token's attention: `q: [1, heads, 1, head_dim]` (rotated, not yet scaled) over
/// the cache views `k`, `v: [1, kv_heads, positions, head_dim]` (the last position is the new
/// token's; the views may be narrowed from larger buffers), scores multiplied by `scale`,
/// attending to the last `window` positions when set. Returns `[1, 1, heads·head_dim]`, the
/// layout the o projection reads. Inference only: it has no backward pass.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            window,
            scale: scale as f32,
        },
    )
}

struct DecodeAttention {
    window: Option<usize>,
    scale: f32,
}

/// The strides of a `[1, heads, positions, head_dim]` cache view whose rows are contiguous.
fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<(KvView<'a>, usize, usize, usize)> {
    let (b, heads, positions, hd) = l.shape().dims4()?;
    let st = l.stride();
    if b != 1 || (hd > 1 && st[3] != 1) {
        candle_core::bail!("decode attention: the cached {what} must be one sequence of contiguous head rows")
    }
    let data = &s.as_slice::<f32>()?[l.start_offset()..];
    let kv = KvView {
        data,
        head_stride: st[1],
        pos_stride: st[2],
    };
    if !kv.holds(heads, positions, hd) {
        candle_core::bail!("decode attention: the cached {what} view runs past its buffer")
    }
    Ok((kv, heads, positions, hd))
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, heads, t, hd) = l1.shape().dims4()?;
        let q = crate::kernels::ops::slice(s1, l1, "decode attention")?;
        let (keys, kv_heads, positions, khd) = view(s2, l2, "keys")?;
        let (values, v_heads, v_positions, vhd) = view(s3, l3, "values")?;
        if b != 1 || t != 1 {
            candle_core::bail!("decode attention: one query position of one sequence, got [{b}, {heads}, {t}, {hd}]")
        }
        if (kv_heads, positions, khd) != (v_heads, v_positions, vhd)
            || khd != hd
            || kv_heads == 0
            || heads % kv_heads != 0
            || positions == 0
        {
            candle_core::bail!(
                "decode attention: {heads} query heads of {hd} over keys [{kv_heads}, {positions}, {khd}] and values [{v_heads}, {v_positions}, {vhd}]"
            )
        }
        let mut out = vec![0f32; heads * hd];
        let shape = CacheHeads {
            heads,
            kv_heads,
            head_dim: hd,
            window: self.window,
            scale: self.scale,
        };
        over_cache(q, keys, values, positions - 1, shape, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((1, 1, heads * hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The composite attention of one query over `positions` keys: softmax(q·kᵀ·scale)·v with
    /// the kv heads repeated for their query heads, and an optional sliding window.
    fn composite(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>, scale: f64) -> Tensor {
        let (_, heads, _, hd) = q.dims4().unwrap();
        let kv_heads = k.dim(1).unwrap();
        let positions = k.dim(2).unwrap();
        let k = crate::model::attention::repeat_kv(k.contiguous().unwrap(), heads / kv_heads).unwrap();
        let v = crate::model::attention::repeat_kv(v.contiguous().unwrap(), heads / kv_heads).unwrap();
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(w) = window {
            let mask: Vec<f32> = (0..positions)
                .map(|p| if positions - p <= w { 0.0 } else { f32::NEG_INFINITY })
                .collect();
            let mask = Tensor::from_vec(mask, positions, &Device::Cpu).unwrap();
            s = s.broadcast_add(&mask).unwrap();
        }
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v).unwrap().reshape((1, 1, heads * hd)).unwrap()
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Grouped heads, a view narrowed from a larger buffer (as the KV cache hands it), short
    /// and long contexts (the long one splits heads over the pool) and a sliding window: the
    /// same outputs as candle's matmuls and softmax.
    #[test]
    fn one_token_over_a_narrowed_cache_equals_the_composite_attention() {
        for (heads, kv_heads, hd, positions, window) in [
            (9, 3, 64, 1usize, None),
            (9, 3, 64, 37, None),
            (4, 4, 16, 300, None),
            (14, 2, 64, 700, None),
            (8, 2, 32, 90, Some(16)),
        ] {
            let cap = positions.next_multiple_of(256);
            let kb = random(&[1, kv_heads, cap, hd], 1);
            let vb = random(&[1, kv_heads, cap, hd], 2);
            let q = random(&[1, heads, 1, hd], 3);
            let (k, v) = (kb.narrow(2, 0, positions).unwrap(), vb.narrow(2, 0, positions).unwrap());
            let scale = 1.0 / (hd as f64).sqrt();
            let got = decode_attention(&q, &k, &v, window, scale).unwrap();
            let want = composite(&q, &k, &v, window, scale);
            assert_eq!(got.dims(), want.dims());
            let d = crate::testing::max_abs_diff(&got, &want);
            assert!(
                d < 1e-5,
                "heads {heads}/{kv_heads}, {positions} positions, window {window:?}: {d}"
            );
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = random(&[1, 9, 1, 64], 1);
        let k = random(&[1, 3, 10, 64], 2);
        let v = random(&[1, 3, 11, 64], 3);
        let e = decode_attention(&q, &k, &v, None, 0.125).unwrap_err().to_string();
        assert!(e.contains("decode attention"), "{e}");
        let q2 = random(&[1, 9, 2, 64], 1);
        assert!(decode_attention(&q2, &k, &k, None, 0.125).is_err());
        let k5 = random(&[1, 4, 10, 64], 2);
        assert!(decode_attention(&q, &k5, &k5, None, 0.125).is_err());
    }
}
