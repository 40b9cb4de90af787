//! Attention of a few new queries over a KV cache: the attention of decoding, shared by the f32
//! transformer (one token at a time, [`decode_attention`]) and the quantized GGUF path.
//!
//! Why not candle's ops for one decoded token: per layer they were two batched matmuls with a
//! single query row per kv-head group (gemm's generic matrix×vector path), a softmax and three
//! reshaped copies, all on the decoding thread while the spin pool's other threads waited.
//! `perf` on a 512-token f32 decode of SmolLM2-135M (AMD EPYC Zen 4, 2 threads) put those
//! matmuls at ~40% of the work done outside the weight products. Here each head's scores,
//! softmax and weighted sum of values run in one pass over the cache where it lies (no copy
//! of the keys or values); one token over a long context runs as runs of positions of each kv
//! head on the spin pool (`one_token_split`).
//! Where the CPU family is AVX2 or AVX-512, a head runs as an explicit AVX2+FMA kernel
//! (`x86::head`, which says why); elsewhere as the portable loop, compiled for the CPU's width.

// The AVX2 head kernel (`x86::head`) uses `std::arch` intrinsics and raw pointer loads, `unsafe`
// to call; it runs only when the CPU has the features and after the views' bounds are checked.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu::{self, Family};
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

impl CacheHeads {
    /// The first position a query that sees positions `0..seen` attends (its window's start).
    fn window_start(&self, seen: usize) -> usize {
        self.window.map_or(0, |w| seen.saturating_sub(w.max(1)))
    }
}

/// Causal grouped-query attention of the `t` new queries `q` (`[t, heads·head_dim]`, positions
/// `past..past + t`) over the cache, which holds positions `0..past + t`; writes
/// `out: [t, heads·head_dim]`. Heads run in parallel: on rayon for a prompt, on the spin pool
/// for one token once the context is long enough to be worth handing over.
pub(crate) fn over_cache(q: &[f32], keys: KvView, values: KvView, past: usize, h: CacheHeads, out: &mut [f32]) {
    over_cache_on(q, keys, values, past, h, out, true)
}

/// [`over_cache`], with the AVX2 kernel allowed or not (tests compare the two).
fn over_cache_on(
    q: &[f32],
    keys: KvView,
    values: KvView,
    past: usize,
    h: CacheHeads,
    out: &mut [f32],
    allow_fast: bool,
) {
    let (heads, hd) = (h.heads, h.head_dim);
    let q_dim = heads * hd;
    let t = q.len() / q_dim.max(1);
    let group = heads / h.kv_heads.max(1);
    // The AVX2 kernel reads the cache through raw pointers: only after checking that both views
    // hold every position of every kv head (the portable loop checks each slice it takes).
    let fast = allow_fast
        && fast_path(hd)
        && keys.holds(h.kv_heads, past + t, hd)
        && values.holds(h.kv_heads, past + t, hd)
        && q.len() >= t * q_dim;
    let attend = |head: usize, positions: (usize, usize), dst: &mut [f32]| -> Partial {
        let job = HeadAttention {
            q,
            q_dim,
            head,
            kvh: head / group.max(1),
            keys,
            values,
            past,
            h,
            positions,
            dst,
        };
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: `fast_path` found AVX2 and FMA on this CPU (through `cpu::family`), and the
            // views and `q` were checked above to hold every position the job reads.
            return unsafe { x86::head(job) };
        }
        let _ = fast;
        vectorized(job)
    };
    if t == 1 && heads * (past + 1) * hd >= 1 << 15 {
        return one_token_split(past, h, &attend, out);
    }
    // Per head, `[t, hd]`, so that heads can be written in parallel; copied into `out` after.
    let mut by_head = vec![0f32; heads * t * hd];
    let work = |(head, dst): (usize, &mut [f32])| {
        attend(head, (0, usize::MAX), dst);
    };
    // Heads in parallel for a prompt (one token over a long context split its positions above).
    if t > 1 {
        by_head.par_chunks_mut(t * hd).enumerate().for_each(work);
    } else {
        by_head.chunks_mut(t * hd).enumerate().for_each(work);
    }
    for (head, src) in by_head.chunks_exact(t * hd).enumerate() {
        for i in 0..t {
            out[i * q_dim + head * hd..i * q_dim + (head + 1) * hd].copy_from_slice(&src[i * hd..(i + 1) * hd]);
        }
    }
}

/// What one head's attention over a run of positions leaves besides its output (which is
/// already divided by `sum`): the largest score and `Σ exp(score − max)`, for the last query row.
/// Runs of the same head are merged by [`merge_runs`].
#[derive(Debug, Clone, Copy, Default)]
struct Partial {
    max: f32,
    sum: f32,
}

/// One token's attention over a long context, split so that every cached key and value is read
/// from memory once. Why: the cache of a layer was evicted by the weights streamed since the
/// last token, so its reads come from DRAM, and with one task per query head the heads that
/// share a kv head (three on SmolLM2-135M) ran on different threads and each fetched it again.
/// Here a task is one kv head over one run of positions, and it attends that run for every
/// query head of its group in turn (the run's keys and values stay in the core's cache between
/// them); runs are cut so that there are about four tasks a thread however few kv heads there
/// are. The runs' outputs are then merged by their softmax sums (flash-decoding). One token runs
/// outside rayon (see `kernels::spin::without_rayon`): on the spin pool's threads.
///
/// Measured on AMD EPYC Zen 4 (2 threads), `bench generate --quantized` on SmolLM2-135M,
/// alternating with one task per query head: decode ahead in 5 of 6 pairs at 128 new tokens
/// (medians ~112 against ~99 tokens/s) and 3 of 4 at 512; f32 decode level (it streams 4× the
/// weight bytes, so attention is a smaller share of its token).
fn one_token_split(
    past: usize,
    h: CacheHeads,
    attend: &(impl Fn(usize, (usize, usize), &mut [f32]) -> Partial + Sync),
    out: &mut [f32],
) {
    let (hd, kv_heads) = (h.head_dim, h.kv_heads.max(1));
    let group = (h.heads / kv_heads).max(1);
    let seen = past + 1;
    let first = h.window_start(seen);
    let visible = seen - first;
    // Runs of at least 32 positions (a run's scores are a few microseconds of work).
    let wanted = (4 * crate::kernels::spin::threads()).div_ceil(kv_heads);
    let len = visible.div_ceil(wanted.min(visible.div_ceil(32)).max(1));
    let runs = visible.div_ceil(len);
    let mut outputs = vec![0f32; kv_heads * runs * group * hd];
    let mut partials = vec![Partial::default(); kv_heads * runs * group];
    crate::kernels::spin::for_each_chunk_mut2(
        (&mut outputs, group * hd),
        (&mut partials, group),
        |task, dst, partial| {
            let (kvh, run) = (task / runs, task % runs);
            let lo = first + run * len;
            let positions = (lo, (lo + len).min(seen));
            for (j, (dst, partial)) in dst.chunks_exact_mut(hd).zip(partial.iter_mut()).enumerate() {
                *partial = attend(kvh * group + j, positions, dst);
            }
        },
    );
    for (head, o) in out.chunks_exact_mut(hd).take(kv_heads * group).enumerate() {
        let (kvh, j) = (head / group, head % group);
        let at = |run: usize| (kvh * runs + run) * group + j;
        merge_runs(
            (0..runs).map(|r| (partials[at(r)], &outputs[at(r) * hd..(at(r) + 1) * hd])),
            o,
        );
    }
}

/// Merges a head's runs (each output divided by its own sum) into `o`: each run weighs
/// `sum · exp(max − overall max)`, its share of the whole softmax.
fn merge_runs<'a>(runs: impl Iterator<Item = (Partial, &'a [f32])> + Clone, o: &mut [f32]) {
    let top = runs.clone().fold(f32::NEG_INFINITY, |m, (p, _)| m.max(p.max));
    let total: f32 = runs.clone().map(|(p, _)| p.sum * (p.max - top).exp()).sum();
    o.fill(0.0);
    for (p, src) in runs {
        let w = p.sum * (p.max - top).exp() / total;
        o.iter_mut().zip(src).for_each(|(a, b)| *a += w * b);
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
    /// The positions `[lo, hi)` attended (with the causal mask and window applied inside them):
    /// all of them, or one run of [`one_token_split`].
    positions: (usize, usize),
    /// `[t, head_dim]`.
    dst: &'a mut [f32],
}

impl Kernel for HeadAttention<'_> {
    type Output = Partial;

    #[inline(always)]
    fn run(self) -> Partial {
        let (hd, q_dim, h) = (self.h.head_dim, self.q_dim, self.h);
        let t = self.dst.len() / hd.max(1);
        let (base, len) = score_span(&self, t);
        let mut scores = vec![0f32; len];
        let mut partial = Partial::default();
        for i in 0..t {
            let qi = &self.q[i * q_dim + self.head * hd..i * q_dim + (self.head + 1) * hd];
            let (first, seen) = attended(&self, i);
            let scores = &mut scores[first - base..seen - base];
            for (p, s) in (first..).zip(scores.iter_mut()) {
                *s = dot(qi, self.keys.at(self.kvh, p, hd)) * h.scale;
            }
            partial = softmax_unnormalized(scores);
            let inv = 1.0 / partial.sum;
            let o = &mut self.dst[i * hd..(i + 1) * hd];
            o.fill(0.0);
            for (p, s) in (first..).zip(scores.iter()) {
                let w = s * inv;
                o.iter_mut()
                    .zip(self.values.at(self.kvh, p, hd))
                    .for_each(|(a, b)| *a += w * b);
            }
        }
        partial
    }
}

/// The positions a job's score buffer covers, `[base, base + len)`: every position its rows
/// attend ([`attended`]), and no more. A run of [`one_token_split`] allocates its own run's
/// scores, not the whole context's (a token's attention has several runs per head).
#[inline(always)]
fn score_span(job: &HeadAttention<'_>, t: usize) -> (usize, usize) {
    let (lo, hi) = job.positions;
    let base = lo.min(job.past);
    (base, hi.min(job.past + t) - base)
}

/// The positions `[first, seen)` that query row `i` of `job` attends: causal, inside the window,
/// inside the job's run. Never empty for a run [`one_token_split`] cuts.
#[inline(always)]
fn attended(job: &HeadAttention<'_>, i: usize) -> (usize, usize) {
    let seen = job.past + i + 1;
    let first = job.h.window_start(seen);
    let (lo, hi) = job.positions;
    let seen = seen.min(hi);
    (first.max(lo).min(seen), seen)
}

/// Replaces `scores` by `exp(score − max)` and returns the max and `Σ`, whose inverse normalizes
/// them (both head loops apply it to the weighted sum). Inlined, so it is compiled for the
/// caller's vector width.
#[inline(always)]
fn softmax_unnormalized(scores: &mut [f32]) -> Partial {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    scores.iter_mut().for_each(|s| *s = exp_fast(*s - max));
    Partial { max, sum: sum(scores) }
}

/// Whether the explicit AVX2 kernel runs for heads of `head_dim` values: on x86-64 when
/// [`cpu::family`] is AVX2 or AVX-512 (so `FINCH_CPU=portable` measures the portable loop) and
/// the head is whole 8-value vectors.
fn fast_path(head_dim: usize) -> bool {
    cfg!(target_arch = "x86_64") && matches!(cpu::family(), Family::Avx2 | Family::Avx512) && head_dim % 8 == 0
}

/// The head loop with AVX2 + FMA intrinsics. Why not the compiler's vectorization of the portable
/// loop: it summed each position's 16-lane dot product with 15 dependent scalar additions, and a
/// version written to keep outputs in registers compiled to 2-wide loads and accumulators on the
/// stack (`perf annotate`). Here four positions' scores are summed together with three `hadd`s,
/// and the weighted sum keeps 64 output values in eight registers across all positions. The
/// order of additions differs from the portable loop's (results agree to float rounding).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{HeadAttention, Partial};

    /// # Safety
    /// The CPU must have AVX2 and FMA; `job.q` must hold `t` query rows and the views every
    /// position `0..past + t` of head `job.kvh`; `head_dim` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn head(job: HeadAttention<'_>) -> Partial {
        let (hd, h) = (job.h.head_dim, job.h);
        let t = job.dst.len() / hd.max(1);
        let kb = job.keys.data.as_ptr().add(job.kvh * job.keys.head_stride);
        let vb = job.values.data.as_ptr().add(job.kvh * job.values.head_stride);
        let (ks, vs) = (job.keys.pos_stride, job.values.pos_stride);
        let (base, len) = super::score_span(&job, t);
        let mut scores = vec![0f32; len];
        let mut partial = Partial::default();
        for i in 0..t {
            let qp = job.q.as_ptr().add(i * job.q_dim + job.head * hd);
            let (first, seen) = super::attended(&job, i);
            let sc = &mut scores[first - base..seen - base];
            let scale = _mm_set1_ps(h.scale);
            let mut p = first;
            while p + 4 <= seen {
                let (k0, k1, k2, k3) = (
                    kb.add(p * ks),
                    kb.add((p + 1) * ks),
                    kb.add((p + 2) * ks),
                    kb.add((p + 3) * ks),
                );
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut c = 0;
                while c < hd {
                    let qv = _mm256_loadu_ps(qp.add(c));
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0.add(c)), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1.add(c)), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2.add(c)), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3.add(c)), a3);
                    c += 8;
                }
                // [a0 a1 a2 a3] summed per vector: lanes 0–3 of the low half and 4–7 of the high.
                let h4 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
                let s4 = _mm_add_ps(_mm256_castps256_ps128(h4), _mm256_extractf128_ps(h4, 1));
                _mm_storeu_ps(sc.as_mut_ptr().add(p - first), _mm_mul_ps(s4, scale));
                p += 4;
            }
            while p < seen {
                let k0 = kb.add(p * ks);
                let mut a0 = _mm256_setzero_ps();
                let mut c = 0;
                while c < hd {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(k0.add(c)), a0);
                    c += 8;
                }
                let h4 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a0), a0);
                let s1 = _mm_add_ss(_mm256_castps256_ps128(h4), _mm256_extractf128_ps(h4, 1));
                sc[p - first] = _mm_cvtss_f32(s1) * h.scale;
                p += 1;
            }
            partial = super::softmax_unnormalized(sc);
            let inv = _mm256_set1_ps(1.0 / partial.sum);
            let o = job.dst.as_mut_ptr().add(i * hd);
            let mut c0 = 0;
            while c0 + 64 <= hd {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (idx, s) in sc.iter().enumerate() {
                    let w = _mm256_set1_ps(*s);
                    let vp = vb.add((first + idx) * vs + c0);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(8 * j)), *a);
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.add(c0 + 8 * j), _mm256_mul_ps(*a, inv));
                }
                c0 += 64;
            }
            while c0 < hd {
                let mut a = _mm256_setzero_ps();
                for (idx, s) in sc.iter().enumerate() {
                    a = _mm256_fmadd_ps(_mm256_set1_ps(*s), _mm256_loadu_ps(vb.add((first + idx) * vs + c0)), a);
                }
                _mm256_storeu_ps(o.add(c0), _mm256_mul_ps(a, inv));
                c0 += 8;
            }
        }
        partial
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
            // Long enough to split positions into runs: SmolLM2's heads, a window that cuts
            // the runs short, and one kv head per query head.
            (9, 3, 64, 301, None),
            (8, 2, 32, 400, Some(50)),
            (4, 4, 16, 1000, Some(700)),
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

    /// The AVX2 kernel against the portable loop: heads of 8 to 256 values (whole 64-value
    /// blocks and 8-value tails), 1 to 37 positions (whole groups of four and the rest), a
    /// window, several new queries, and the quantized path's `[position, kv_dim]` layout.
    #[test]
    fn the_avx2_kernel_equals_the_portable_loop() {
        if !fast_path(64) {
            println!("skipped: this CPU (or FINCH_CPU) runs the portable loop only");
            return;
        }
        let mut rng = crate::rng::Rng::new(7);
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
        for (heads, kv_heads, hd, past, t, window) in [
            (9, 3, 64, 0, 1, None),
            (9, 3, 64, 36, 1, None),
            (4, 2, 128, 13, 3, None),
            (2, 1, 96, 21, 1, Some(6)),
            (2, 2, 256, 5, 2, None),
            (3, 1, 8, 30, 1, Some(1)),
            // One token over contexts long enough to split into runs.
            (9, 3, 64, 400, 1, None),
            (6, 2, 32, 500, 1, Some(77)),
        ] {
            let positions = past + t;
            let (k, v, q) = (
                values(positions * kv_heads * hd),
                values(positions * kv_heads * hd),
                values(t * heads * hd),
            );
            let shape = CacheHeads {
                heads,
                kv_heads,
                head_dim: hd,
                window,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let run = |fast: bool| {
                let mut out = vec![0f32; t * heads * hd];
                let (kv, vv) = (
                    KvView::by_position(&k, kv_heads, hd),
                    KvView::by_position(&v, kv_heads, hd),
                );
                over_cache_on(&q, kv, vv, past, shape, &mut out, fast);
                out
            };
            let (fast, portable) = (run(true), run(false));
            let d = fast
                .iter()
                .zip(&portable)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-5,
                "heads {heads}/{kv_heads} of {hd}, {past}+{t} positions, window {window:?}: {d}"
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
