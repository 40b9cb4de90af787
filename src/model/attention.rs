//! Causal self-attention with rotary embeddings and grouped key/value heads, as one CPU op with
//! its own backward pass.
//!
//! Composed from candle ops, attention costs per layer: three transposed copies of q/k/v, two
//! rotary outputs, two `repeat_kv` copies, two batched matmuls whose backward allocates and
//! accumulates four more full-size buffers, and the transposed copy back. The fused op reads
//! q/k/v where the projections wrote them (`[b, t, heads·hd]`), works per (batch, head) on
//! small contiguous tiles, keeps the rotated q/k and the probabilities for the backward pass,
//! and writes the output in the layout the o projection reads. Grouped heads share their key
//! and value tiles instead of copying them. Other devices and dtypes use the composite ops.
//!
//! Packed rows ([`Segments`]: several training examples in one row) keep attention inside each
//! example: query `i` sees keys from the start of its own example to `i`, and rotary positions
//! restart at every example. Both paths implement it; rows without segments take the plain
//! causal path unchanged.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::kernels::buffer::written_whole;
use crate::kernels::gemm::{gemm_into_on, with_slice, Mat};
use crate::kernels::ops::{self, cpu_f32, exp_fast, rope_row, slice};
use crate::kernels::spin::{for_each_chunk_mut, for_each_chunk_mut2, for_each_chunk_mut3, FirstError};

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding-window layers: a query sees only the last `window` positions, its own included.
    pub window: Option<usize>,
    /// Keep the attention probabilities for the backward pass rounded to bf16 (half the
    /// memory): set under bf16 base weights, where PyTorch's bf16 attention keeps them in bf16
    /// too. The forward's output is computed from the f32 probabilities either way.
    pub bf16_probabilities: bool,
}

/// Where the examples of packed batch rows begin: for every (row, position) of a `[b, t]` batch,
/// the first position of the example that token belongs to. Examples are contiguous, so a
/// token's rotary position is its distance from that start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    b: usize,
    t: usize,
    starts: Vec<u32>,
}

impl Segments {
    /// Segments of `[b, t]` rows from each row's example lengths, in order; positions after a
    /// row's last example (padding) form one more segment, which no real token attends to.
    pub fn from_lengths(t: usize, rows: &[Vec<usize>]) -> std::result::Result<Self, String> {
        let mut starts = Vec::with_capacity(rows.len() * t);
        for (r, lengths) in rows.iter().enumerate() {
            let used: usize = lengths.iter().sum();
            if used > t {
                return Err(format!(
                    "packed row {r} holds {used} tokens, more than its {t} positions"
                ));
            }
            let mut at = 0usize;
            for &len in lengths.iter().chain(std::iter::once(&(t - used))) {
                starts.extend(std::iter::repeat_n(at as u32, len));
                at += len;
            }
        }
        Ok(Segments {
            b: rows.len(),
            t,
            starts,
        })
    }

    /// The batch shape `(b, t)` these segments describe.
    pub fn dims(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// The first position of the example that position `p` of row `bi` belongs to.
    fn start(&self, bi: usize, p: usize) -> usize {
        self.starts[bi * self.t + p] as usize
    }

    /// Rotary position of position `p` of row `bi`: its place in its own example.
    pub fn position(&self, bi: usize, p: usize) -> usize {
        p - self.start(bi, p)
    }

    /// The examples of row `bi` (and its padding) as `(start, len)`, in order.
    fn spans(&self, bi: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = vec![];
        for p in 0..self.t {
            match out.last_mut() {
                Some((_, len)) if self.start(bi, p) != p => *len += 1,
                _ => out.push((p, 1)),
            }
        }
        out
    }

    /// The longest example (one more than the largest rotary position).
    pub fn longest(&self) -> usize {
        (0..self.b)
            .flat_map(|bi| (0..self.t).map(move |p| (bi, p)))
            .map(|(bi, p)| self.position(bi, p) + 1)
            .max()
            .unwrap_or(0)
    }
}

/// `softmax(scale · rope(q)·rope(k)ᵀ + causal mask) · v`, per head, with query head `h`
/// reading key/value head `h / (q_heads / kv_heads)`, and with `heads.window` set, query `i`
/// seeing only keys `i + 1 - window..=i`.
///
/// `q: [b, t, q_heads·hd]`, `k, v: [b, t, kv_heads·hd]`; `cos, sin: [t, r/2]` rotary tables
/// (rotate-half convention over the first `r ≤ hd` dimensions of each head; `r < hd` is partial
/// rotary). Returns `[b, t, q_heads·hd]`. Gradients flow to q, k and v.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
    scale: f64,
) -> candle_core::Result<Tensor> {
    attention(q, k, v, cos, sin, heads, scale, None)
}

/// [`causal_attention`], and with `segments` over packed rows: query `i` of row `r` sees only
/// keys of its own example (and of the window), rotated by their positions within it.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
    scale: f64,
    segments: Option<&Segments>,
) -> candle_core::Result<Tensor> {
    let Heads {
        q_heads: nh,
        kv_heads: nkv,
        head_dim: hd,
        ..
    } = heads;
    let (b, t, q_dim) = q.dims3()?;
    if nkv == 0 || nh % nkv != 0 || q_dim != nh * hd || k.dims3()? != (b, t, nkv * hd) || v.dims3()? != (b, t, nkv * hd)
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {nh} query heads, {nkv} kv heads of size {hd}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let rot_half = cos.dim(1)?;
    if 2 * rot_half > hd {
        candle_core::bail!(
            "attention: rotary tables rotate {} dimensions of heads of {hd}",
            2 * rot_half
        )
    }
    if let Some(seg) = segments {
        if seg.dims() != (b, t) {
            candle_core::bail!(
                "attention: segments of {:?} rows for a batch of {:?}",
                seg.dims(),
                (b, t)
            )
        }
        if seg.longest() > cos.dim(0)? {
            candle_core::bail!("attention: rotary tables cover fewer than {} positions", seg.longest())
        }
    }
    if [q, k, v, cos, sin].iter().all(|x| cpu_f32(x)) {
        let op = FusedAttention {
            segments: segments.cloned(),
            b,
            t,
            heads,
            rot_half,
            scale: scale as f32,
            cos: ops::tensor_vec(cos)?,
            sin: ops::tensor_vec(sin)?,
            saved: Mutex::new(None),
        };
        if op.cos.len() < t * rot_half || op.sin.len() != op.cos.len() {
            candle_core::bail!("attention: rotary tables cover fewer than {t} positions")
        }
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    match segments {
        None => composite(q, k, v, cos, sin, heads, scale, None),
        Some(seg) => composite_packed(q, k, v, cos, sin, heads, scale, seg),
    }
}

/// The composite path over packed rows, one row at a time: the row's rotary table rows are
/// gathered by position, and an additive mask keeps each query inside its example.
#[allow(clippy::too_many_arguments)]
fn composite_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
    scale: f64,
    seg: &Segments,
) -> candle_core::Result<Tensor> {
    let (b, t) = seg.dims();
    let w = heads.window.unwrap_or(t).max(1);
    let dev = q.device();
    let mut rows = Vec::with_capacity(b);
    for bi in 0..b {
        let pos: Vec<u32> = (0..t).map(|p| seg.position(bi, p) as u32).collect();
        let pos = Tensor::from_vec(pos, t, dev)?;
        let (c, s) = (cos.index_select(&pos, 0)?, sin.index_select(&pos, 0)?);
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                let lo = seg.start(bi, i);
                (0..t).map(move |j| {
                    if j <= i && j >= lo && i - j < w {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), dev)?;
        let (qr, kr, vr) = (q.narrow(0, bi, 1)?, k.narrow(0, bi, 1)?, v.narrow(0, bi, 1)?);
        rows.push(composite(&qr, &kr, &vr, &c, &s, heads, scale, Some(&mask))?);
    }
    Tensor::cat(&rows, 0)
}

/// The same attention from candle ops: runs on every device and dtype. `mask`: an additive
/// f32 `[t, t]` mask used instead of the causal (and window) one.
#[allow(clippy::too_many_arguments)]
fn composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (nh, nkv, hd) = (heads.q_heads, heads.kv_heads, heads.head_dim);
    let (b, t, _) = q.dims3()?;
    let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
    let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
    let q = ops::rope(&q, cos, sin)?;
    let k = repeat_kv(ops::rope(&k, cos, sin)?, nh / nkv)?.contiguous()?;
    let v = repeat_kv(v, nh / nkv)?.contiguous()?;
    let scores = q.matmul(&k.t()?)?;
    let att = match mask {
        None => ops::causal_softmax(&scores, scale, heads.window)?,
        Some(mask) => {
            // In f32, as `causal_softmax` does for half-precision scores.
            let dt = scores.dtype();
            let ct = crate::kernels::compute_dtype(dt);
            let scores = (scores.to_dtype(ct)? * scale)?.broadcast_add(&mask.to_dtype(ct)?)?;
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?.to_dtype(dt)?
        }
    };
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))
}

/// `[b, h, t, d]` → `[b, h·n_rep, t, d]`, each head repeated `n_rep` times in a row.
pub(crate) fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .reshape((b, h * n_rep, t, d))
}

/// What the forward pass keeps for the backward pass: the attention probabilities, one buffer
/// per (batch row, query head) holding only its causal row blocks ([`FusedAttention::blocks`]):
/// about half of a `t×t` square. Separate buffers stay under the allocator's large-object size
/// at long sequences, where one `[b, nh, t, t]` buffer (36 MiB a layer at 9 heads × 1024
/// positions) took whole arena chunks and faulted in fresh pages every step.
///
/// The rotated queries, keys and values are not kept: the backward gathers and rotates them
/// again from the op's inputs, which the graph holds anyway (keeping copies cost 118 MB at
/// SmolLM2-135M, b4×256; rotating again took `rope_row` from 0.8% to 1.4% of a bf16 step's
/// samples).
struct Saved(Vec<Kept>);

/// One head's kept probabilities.
enum Kept {
    F32(Vec<f32>),
    /// Rounded to bf16 ([`Heads::bf16_probabilities`]), block by block while in cache.
    Bf16(Vec<u16>),
}

/// One causal row block of a head's scores: rows `s + r0 .. s + r0 + rl` of the diagonal span
/// starting at `s`, against that span's keys `s .. s + r0 + rl`, kept row-major (`rl × e`,
/// `e = r0 + rl`) at offset `at` of the head's probability buffer.
#[derive(Debug, Clone, Copy)]
struct Block {
    s: usize,
    r0: usize,
    rl: usize,
    at: usize,
}

impl Block {
    /// Columns of the block: the span's keys up to its last row.
    fn e(&self) -> usize {
        self.r0 + self.rl
    }

    fn len(&self) -> usize {
        self.rl * self.e()
    }
}

/// Probabilities the fused op keeps for one head of an unpacked `t`-position row: the causal
/// row blocks, `Σ rows·(first row + rows)` over blocks of [`ROWS`] rows (`t²/2 + 32·t` for a
/// multiple of 64; packed rows keep less). The memory estimate counts them with this.
pub fn saved_probabilities_per_head(t: usize) -> usize {
    row_blocks(t).map(|(r0, rl)| rl * (r0 + rl)).sum()
}

struct FusedAttention {
    /// Packed rows: where each token's example starts (`None`: one sequence per row).
    segments: Option<Segments>,
    b: usize,
    t: usize,
    heads: Heads,
    /// Entries per rotary table row (half the rotated dimensions of a head).
    rot_half: usize,
    scale: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
    saved: Mutex<Option<Saved>>,
}

/// Rows per block of the causal products: a block of rows is multiplied against the keys up to
/// its own last row only, so a `t`-row tile costs about `(t + ROWS)/2t` of the full square
/// (62% at 256 positions, 53% at 1024).
const ROWS: usize = 64;

/// `(first row, rows)` of each block of [`ROWS`] rows of an `n`-row span.
fn row_blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(ROWS).map(move |r0| (r0, ROWS.min(n - r0)))
}

/// In-place causal softmax of one row block's scores (`block.rl` rows of `block.e()` columns):
/// row `a = s + r0 + i` keeps columns up to its own, or only the last `window` of them, and
/// with `starts` (packed rows) none before `starts[a]` (the span's own start). Masked columns
/// become 0, which the backward relies on.
fn causal_softmax_block(p: &mut [f32], block: Block, scale: f32, window: Option<usize>, starts: Option<&[u32]>) {
    let Block { s, r0, .. } = block;
    for (i, row) in p.chunks_exact_mut(block.e()).enumerate() {
        let a = s + r0 + i;
        let lo = (a + 1).saturating_sub(window.unwrap_or(usize::MAX).max(1)).max(s);
        let lo = starts.map_or(lo, |st| lo.max(st[a] as usize)) - s;
        let (before, row) = row.split_at_mut(lo);
        before.fill(0.0);
        let (seen, masked) = row.split_at_mut(r0 + i + 1 - lo);
        let m = seen.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) * scale;
        for x in seen.iter_mut() {
            *x = exp_fast(*x * scale - m);
        }
        let inv = 1.0 / ops::sum(seen);
        seen.iter_mut().for_each(|x| *x *= inv);
        masked.fill(0.0);
    }
}

impl FusedAttention {
    /// The diagonal blocks of row `bi`'s scores that can be non-zero, as `(start, len)`: one
    /// per packed example, or the whole `t×t` tile. Packed rows compute only these blocks, so
    /// attention costs the sum of the squared example lengths instead of `t²`.
    fn spans(&self, bi: usize) -> Vec<(usize, usize)> {
        self.segments
            .as_ref()
            .map_or_else(|| vec![(0, self.t)], |s| s.spans(bi))
    }

    /// The causal row blocks of row `bi`'s scores, span by span, with their offsets in a
    /// head's probability buffer (whose length is the last block's end).
    fn blocks(&self, bi: usize) -> Vec<Block> {
        let mut at = 0;
        let mut out = vec![];
        for (s, n) in self.spans(bi) {
            for (r0, rl) in row_blocks(n) {
                let block = Block { s, r0, rl, at };
                at += block.len();
                out.push(block);
            }
        }
        out
    }

    /// The rotary table rows of position `p` of batch row `bi`.
    fn tables(&self, bi: usize, p: usize) -> (&[f32], &[f32]) {
        let p = self.segments.as_ref().map_or(p, |s| s.position(bi, p));
        let half = self.rot_half;
        (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half])
    }

    /// Gathers head `h` of `x: [b, t, heads·hd]` for batch `bi` into `dst: [t, hd]`, rotated
    /// when `rotate`.
    fn gather(&self, x: &[f32], heads: usize, bi: usize, h: usize, dst: &mut [f32], rotate: bool) {
        let (t, hd) = (self.t, self.heads.head_dim);
        for p in 0..t {
            let src = &x[(bi * t + p) * heads * hd + h * hd..][..hd];
            let row = &mut dst[p * hd..(p + 1) * hd];
            if rotate {
                let (c, s) = self.tables(bi, p);
                rope_row(src, row, c, s, 1.0);
            } else {
                row.copy_from_slice(src);
            }
        }
    }

    /// The forward pass of query head `i` (batch row `i / q_heads`): its rotated rows into
    /// `qt`, its output rows into `ot` (both `[t, hd]`), reading the rotated key and value tiles
    /// `kr`, `vr` (`[b, kv_heads, t, hd]`); returns the probabilities kept for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn forward_head(
        &self,
        q: &[f32],
        kr: &[f32],
        vr: &[f32],
        i: usize,
        qt: &mut [f32],
        ot: &mut [f32],
    ) -> candle_core::Result<Kept> {
        let Heads {
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.heads;
        let (t, tile, n_rep) = (self.t, self.t * hd, nh / nkv);
        let (bi, h) = (i / nh, i % nh);
        let kv = bi * nkv + h / n_rep;
        self.gather(q, nh, bi, h, qt, true);
        let starts = self.segments.as_ref().map(|s| &s.starts[bi * t..(bi + 1) * t]);
        let blocks = self.blocks(bi);
        let len = blocks.last().map_or(0, |l| l.at + l.len());
        let bf16 = self.heads.bf16_probabilities;
        let mut kept = if bf16 {
            Kept::Bf16(vec![0u16; len])
        } else {
            Kept::F32(written_whole(len))
        };
        let mut scratch = vec![
            0f32;
            if bf16 {
                blocks.iter().map(Block::len).max().unwrap_or(0)
            } else {
                0
            }
        ];
        // Each block of rows against the keys up to its last row only (the rest of the
        // row is masked, so it is neither computed nor kept): scores, softmax, then the
        // block's output rows while its probabilities are in cache (and rounded to bf16
        // there, when kept so).
        for &blk in &blocks {
            let Block { s, r0, rl, at } = blk;
            let e = blk.e();
            let pb = match &mut kept {
                Kept::F32(p) => &mut p[at..at + blk.len()],
                Kept::Bf16(_) => &mut scratch[..blk.len()],
            };
            let qb = Mat::row_major(&qt[(s + r0) * hd..(s + e) * hd], rl, hd);
            let kb = Mat::row_major(&kr[kv * tile + s * hd..][..e * hd], e, hd);
            gemm_into_on(pb, false, qb, kb.t(), 1)?;
            causal_softmax_block(pb, blk, self.scale, self.heads.window, starts);
            let vb = Mat::row_major(&vr[kv * tile + s * hd..][..e * hd], e, hd);
            let pm = Mat::row_major(pb, rl, e);
            gemm_into_on(&mut ot[(s + r0) * hd..(s + e) * hd], false, pm, vb, 1)?;
            if let Kept::Bf16(p) = &mut kept {
                for (d, &x) in p[at..at + blk.len()].iter_mut().zip(&scratch[..blk.len()]) {
                    *d = crate::kernels::bf16::round(x);
                }
            }
        }
        Ok(kept)
    }

    /// Writes head-major tiles `[b, heads, t, hd]` into `[b, t, heads·hd]`.
    fn scatter(&self, tiles: &[f32], heads: usize) -> Vec<f32> {
        let (b, t, hd) = (self.b, self.t, self.heads.head_dim);
        let mut out = written_whole(b * t * heads * hd);
        for_each_chunk_mut(&mut out, t * heads * hd, |bi, ob| {
            for h in 0..heads {
                let tile = &tiles[(bi * heads + h) * t * hd..][..t * hd];
                for p in 0..t {
                    ob[p * heads * hd + h * hd..][..hd].copy_from_slice(&tile[p * hd..(p + 1) * hd]);
                }
            }
        });
        out
    }

    /// Rotates every row of head-major tiles `[b, heads, t, hd]` back by its position's angle,
    /// in place.
    fn unrotate(&self, tiles: &mut [f32], heads: usize) {
        let (t, hd) = (self.t, self.heads.head_dim);
        for_each_chunk_mut(tiles, t * hd, |i, tile| {
            let mut row = vec![0f32; hd];
            for p in 0..t {
                let (c, s) = self.tables(i / heads, p);
                let r = &mut tile[p * hd..(p + 1) * hd];
                rope_row(r, &mut row, c, s, -1.0);
                r.copy_from_slice(&row);
            }
        });
    }

    /// The backward pass of one key/value head of one batch row (`kv` counts both) and of the
    /// query heads that read it: writes their rows of dQ (`dqs`, `n_rep` head-major tiles) and
    /// the head's dK and dV tiles. `inputs`: the op's q, k, v and the incoming gradient, each
    /// `[b, t, heads·hd]`.
    #[allow(clippy::too_many_arguments)]
    fn backward_group(
        &self,
        saved: &Saved,
        inputs: [&[f32]; 4],
        kv: usize,
        dqs: &mut [f32],
        dkt: &mut [f32],
        dvt: &mut [f32],
    ) -> candle_core::Result<()> {
        let [qs, ks, vs, g] = inputs;
        let Heads {
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.heads;
        let tile = self.t * hd;
        let bi = kv / nkv;
        let blocks = self.blocks(bi);
        let longest = blocks.iter().map(Block::len).max().unwrap_or(0);
        let (mut kr, mut vr) = (written_whole(tile), written_whole(tile));
        self.gather(ks, nkv, bi, kv % nkv, &mut kr, true);
        self.gather(vs, nkv, bi, kv % nkv, &mut vr, false);
        let (mut qr, mut go) = (written_whole(tile), written_whole(tile));
        let mut dp = written_whole(longest);
        let mut wide = vec![0f32; if self.heads.bf16_probabilities { longest } else { 0 }];
        for (r, dqt) in dqs.chunks_exact_mut(tile).enumerate() {
            let h = (kv % nkv) * (nh / nkv) + r;
            let qh = bi * nh + h;
            self.gather(qs, nh, bi, h, &mut qr, true);
            self.gather(g, nh, bi, h, &mut go, false);
            // One causal row block at a time (the forward's): every row belongs to one block, so
            // each block writes its own rows of dQ; dK and dV start at zero and add up every row
            // block's and head's share.
            for &blk in &blocks {
                let Block { s, r0, rl, at } = blk;
                let e = blk.e();
                let (rows, upto) = ((s + r0) * hd..(s + e) * hd, s * hd..(s + e) * hd);
                let pb: &[f32] = match &saved.0[qh] {
                    Kept::F32(p) => &p[at..at + blk.len()],
                    Kept::Bf16(p) => {
                        let wide = &mut wide[..blk.len()];
                        for (w, &x) in wide.iter_mut().zip(&p[at..at + blk.len()]) {
                            *w = f32::from_bits(u32::from(x) << 16);
                        }
                        wide
                    }
                };
                let pm = Mat::row_major(pb, rl, e);
                let gom = Mat::row_major(&go[rows.clone()], rl, hd);
                let kt = Mat::row_major(&kr[upto.clone()], e, hd);
                let vt = Mat::row_major(&vr[upto.clone()], e, hd);
                let dp = &mut dp[..rl * e];
                // dV += Pᵀ·dO; dP = dO·Vᵀ.
                gemm_into_on(&mut dvt[upto.clone()], true, pm.t(), gom, 1)?;
                gemm_into_on(dp, false, gom, vt.t(), 1)?;
                // dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), causal rows only.
                for (i, (pr, dr)) in pb.chunks_exact(e).zip(dp.chunks_exact_mut(e)).enumerate() {
                    let (pr, (dr, above)) = (&pr[..r0 + i + 1], dr.split_at_mut(r0 + i + 1));
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (d, &pv) in dr.iter_mut().zip(pr) {
                        *d = self.scale * pv * (*d - dot);
                    }
                    above.fill(0.0);
                }
                let dsm = Mat::row_major(dp, rl, e);
                // dQ = dS·K; dK += dSᵀ·Q (both in rotated space).
                gemm_into_on(&mut dqt[rows.clone()], false, dsm, kt, 1)?;
                let qm = Mat::row_major(&qr[rows], rl, hd);
                gemm_into_on(&mut dkt[upto], true, dsm.t(), qm, 1)?;
            }
        }
        Ok(())
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
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
        let (q, k, v) = (
            slice(s1, l1, "attention")?,
            slice(s2, l2, "attention")?,
            slice(s3, l3, "attention")?,
        );
        let (b, t) = (self.b, self.t);
        let Heads {
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.heads;
        let tile = t * hd;
        let mut kr = written_whole(b * nkv * tile);
        let mut vr = written_whole(b * nkv * tile);
        for_each_chunk_mut2((&mut kr, tile), (&mut vr, tile), |i, kt, vt| {
            self.gather(k, nkv, i / nkv, i % nkv, kt, true);
            self.gather(v, nkv, i / nkv, i % nkv, vt, false);
        });
        let mut qr = written_whole(b * nh * tile);
        let mut o = written_whole(b * nh * tile);
        // Head `i`'s kept probabilities land in slot `i`, beside its rows of q and the output.
        let mut kept: Vec<Option<candle_core::Result<Kept>>> = (0..b * nh).map(|_| None).collect();
        for_each_chunk_mut3((&mut qr, tile), (&mut o, tile), (&mut kept, 1), |i, qt, ot, slot| {
            if let [slot] = slot {
                *slot = Some(self.forward_head(q, &kr, &vr, i, qt, ot));
            }
        });
        let p = kept
            .into_iter()
            .map(|slot| {
                slot.unwrap_or_else(|| Err(candle_core::Error::Msg("attention: a head was not computed".into())))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        drop((qr, kr, vr));
        let out = self.scatter(&o, nh);
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Saved(p));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, nh * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .ok_or_else(|| candle_core::Error::Msg("attention: backward ran twice or without forward".into()))?;
        let (b, t) = (self.b, self.t);
        let Heads {
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            ..
        } = self.heads;
        let n_rep = nh / nkv;
        let tile = t * hd;
        let mut dq = written_whole(b * nh * tile);
        let mut dk = vec![0f32; b * nkv * tile];
        let mut dv = vec![0f32; b * nkv * tile];
        with_slice(q, |qs| {
            with_slice(k, |ks| {
                with_slice(v, |vs| {
                    with_slice(grad, |g| {
                        let error = FirstError::new();
                        let parts = ((&mut dq[..], n_rep * tile), (&mut dk[..], tile), (&mut dv[..], tile));
                        for_each_chunk_mut3(parts.0, parts.1, parts.2, |kv, dqs, dkt, dvt| {
                            error.keep(self.backward_group(&saved, [qs, ks, vs, g], kv, dqs, dkt, dvt))
                        });
                        error.result()
                    })
                })
            })
        })?;
        self.unrotate(&mut dq, nh);
        self.unrotate(&mut dk, nkv);
        let dq = Tensor::from_vec(self.scatter(&dq, nh), q.shape(), q.device())?;
        let dk = Tensor::from_vec(self.scatter(&dk, nkv), k.shape(), k.device())?;
        let dv = Tensor::from_vec(self.scatter(&dv, nkv), v.shape(), v.device())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(super) fn tables(t: usize, half: usize) -> (Tensor, Tensor) {
        let (mut c, mut s) = (vec![], vec![]);
        for p in 0..t {
            for i in 0..half {
                let a = p as f32 / 10f32.powf(i as f32 / half as f32);
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        let dev = Device::Cpu;
        (
            Tensor::from_vec(c, (t, half), &dev).unwrap(),
            Tensor::from_vec(s, (t, half), &dev).unwrap(),
        )
    }

    /// The fused op against the composite candle ops (the path other devices take), forward
    /// and all three gradients, with grouped heads, causal and with a sliding window.
    #[test]
    fn fused_attention_matches_composite_ops() {
        for (window, rot_half) in [(None, 4), (Some(3), 4), (None, 3), (Some(3), 2)] {
            fused_attention_matches_composite_ops_with(window, rot_half, 7);
        }
        // Several causal row blocks (`ROWS`), the last one short; a window across blocks.
        for window in [None, Some(70)] {
            fused_attention_matches_composite_ops_with(window, 4, 2 * ROWS + 22);
        }
    }

    /// Probabilities kept in bf16: the same forward, bit for bit, and gradients within bf16's
    /// rounding of the f32-kept ones (and not equal to them: the rounded ones are used).
    #[test]
    fn bf16_kept_probabilities_change_only_the_gradients_and_by_their_rounding() {
        let dev = Device::Cpu;
        let (b, t, nh, nkv, hd) = (2, ROWS + 23, 4, 2, 8);
        let q = Var::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
        let (cos, sin) = tables(t, hd / 2);
        let run = |bf16_probabilities| {
            let heads = Heads {
                q_heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                window: None,
                bf16_probabilities,
            };
            let y = causal_attention(&q, &k, &v, &cos, &sin, heads, 0.35).unwrap();
            let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = [&q, &k, &v]
                .iter()
                .map(|x| g.get(x.as_tensor()).unwrap().clone())
                .collect();
            (y, grads)
        };
        let (y32, g32) = run(false);
        let (y16, g16) = run(true);
        assert_eq!(crate::testing::max_abs_diff(&y32, &y16), 0.0);
        for (name, (a, b)) in ["q", "k", "v"].iter().zip(g32.iter().zip(&g16)) {
            let d = crate::testing::max_abs_diff(a, b);
            let size = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d > 0.0 && d < 1e-2 * size, "gradient of {name}: {d} against {size}");
        }
    }

    /// `rot_half` < head_dim / 2: partial rotary (Phi-3).
    fn fused_attention_matches_composite_ops_with(window: Option<usize>, rot_half: usize, t: usize) {
        let dev = Device::Cpu;
        let (b, nh, nkv, hd) = (2, 6, 2, 8);
        let heads = Heads {
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window,
            bf16_probabilities: false,
        };
        let q = Var::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
        let (cos, sin) = tables(t, rot_half);
        let scale = 1.0 / (hd as f64).sqrt();
        let fused = causal_attention(&q, &k, &v, &cos, &sin, heads, scale).unwrap();

        let reference = composite(&q, &k, &v, &cos, &sin, heads, scale, None).unwrap();
        let d = crate::testing::max_abs_diff(&fused, &reference);
        assert!(d < 1e-5, "forward differs by {d}");

        let c = Tensor::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
        let g = (fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (reference * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let d = crate::testing::max_abs_diff(g.get(var.as_tensor()).unwrap(), g_ref.get(var.as_tensor()).unwrap());
            assert!(d < 1e-5, "gradient of {name} differs by {d}");
        }
    }
}

#[cfg(test)]
mod packed_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Packed rows: the fused op (and the composite path) on a row holding several examples
    /// gives each example's output and q/k/v gradients exactly as running that example alone,
    /// with grouped heads, sliding windows and partial rotary.
    #[test]
    fn the_kept_probabilities_are_the_causal_row_blocks() {
        // 256 positions: four blocks of 64 rows against 64, 128, 192 and 256 keys.
        assert_eq!(saved_probabilities_per_head(256), 64 * (64 + 128 + 192 + 256));
        assert_eq!(saved_probabilities_per_head(1024), 1024 * 1024 / 2 + 32 * 1024);
        assert_eq!(saved_probabilities_per_head(7), 49);
        assert_eq!(saved_probabilities_per_head(ROWS + 1), ROWS * ROWS + ROWS + 1);
        // Packed rows keep each example's own blocks, laid end to end.
        let seg = Segments::from_lengths(2 * ROWS + 6, &[vec![ROWS + 9, 40, 11]]).unwrap();
        let heads = Heads {
            q_heads: 2,
            kv_heads: 1,
            head_dim: 4,
            window: None,
            bf16_probabilities: false,
        };
        let op = FusedAttention {
            segments: Some(seg),
            b: 1,
            t: 2 * ROWS + 6,
            heads,
            rot_half: 2,
            scale: 1.0,
            cos: vec![],
            sin: vec![],
            saved: Mutex::new(None),
        };
        let blocks = op.blocks(0);
        let spans: Vec<_> = blocks.iter().map(|b| (b.s, b.r0, b.rl)).collect();
        // The examples (73 = 64 + 9, 40, 11 positions) and the 10 padding positions.
        assert_eq!(
            spans,
            [
                (0, 0, ROWS),
                (0, ROWS, 9),
                (ROWS + 9, 0, 40),
                (ROWS + 49, 0, 11),
                (ROWS + 60, 0, 10)
            ]
        );
        let total = blocks.last().map(|l| l.at + l.len()).unwrap();
        let expected = saved_probabilities_per_head(ROWS + 9) + 40 * 40 + 11 * 11 + 10 * 10;
        assert_eq!(total, expected);
        assert!(blocks.windows(2).all(|w| w[0].at + w[0].len() == w[1].at));
    }

    #[test]
    fn packed_rows_equal_each_example_run_alone() {
        // Row 1 ends in 3 padding positions.
        let short = vec![vec![5, 4, 3], vec![7, 2]];
        let seg = Segments::from_lengths(12, &short).unwrap();
        assert_eq!(seg.longest(), 7);
        assert_eq!((seg.position(0, 9), seg.position(1, 8), seg.position(1, 11)), (0, 1, 2));
        for (window, rot_half) in [(None, 4), (Some(3), 4), (None, 3), (Some(2), 2)] {
            packed_rows_equal_each_example_run_alone_with(window, rot_half, 12, &short);
        }
        // Examples longer than one causal row block (`ROWS`), and one that ends mid-block.
        let long = vec![vec![ROWS + 9, 40, 11], vec![2 * ROWS + 3]];
        for window in [None, Some(ROWS + 1)] {
            packed_rows_equal_each_example_run_alone_with(window, 4, 2 * ROWS + 6, &long);
        }
    }

    fn packed_rows_equal_each_example_run_alone_with(
        window: Option<usize>,
        rot_half: usize,
        t: usize,
        rows: &[Vec<usize>],
    ) {
        let dev = Device::Cpu;
        let (nh, nkv, hd) = (6, 2, 8);
        let b = rows.len();
        let seg = Segments::from_lengths(t, rows).unwrap();
        let heads = Heads {
            q_heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            window,
            bf16_probabilities: false,
        };
        let q = Var::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (b, t, nkv * hd), &dev).unwrap();
        let (cos, sin) = super::tests::tables(t, rot_half);
        let scale = 1.0 / (hd as f64).sqrt();
        // Weights of the outputs, zero at the padding positions (not part of any example).
        let mut w = Tensor::randn(0f32, 1.0, (b, t, nh * hd), &dev).unwrap();
        let keep: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                let used: usize = r.iter().sum();
                (0..t).map(move |p| if p < used { 1.0 } else { 0.0 })
            })
            .collect();
        let keep = Tensor::from_vec(keep, (b, t, 1), &dev).unwrap();
        w = w.broadcast_mul(&keep).unwrap();

        let packed = attention(&q, &k, &v, &cos, &sin, heads, scale, Some(&seg)).unwrap();
        let composite = composite_packed(&q, &k, &v, &cos, &sin, heads, scale, &seg).unwrap();
        let g_packed = (&packed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_composite = (&composite * &w).unwrap().sum_all().unwrap().backward().unwrap();

        let mut alone_loss = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
        for (bi, lengths) in rows.iter().enumerate() {
            let mut at = 0;
            for &len in lengths {
                let part = |x: &Tensor| x.narrow(0, bi, 1).unwrap().narrow(1, at, len).unwrap();
                let (c, s) = (cos.narrow(0, 0, len).unwrap(), sin.narrow(0, 0, len).unwrap());
                let alone = causal_attention(&part(&q), &part(&k), &part(&v), &c, &s, heads, scale).unwrap();
                for (name, y) in [("fused", &packed), ("composite", &composite)] {
                    let d = crate::testing::max_abs_diff(&part(y), &alone);
                    assert!(d < 1e-5, "{name}: row {bi} example at {at}: output differs by {d}");
                }
                alone_loss = (alone_loss + (alone * part(&w)).unwrap().sum_all().unwrap()).unwrap();
                at += len;
            }
        }
        let g_alone = alone_loss.backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let reference = g_alone.get(var.as_tensor()).unwrap();
            for (path, g) in [("fused", &g_packed), ("composite", &g_composite)] {
                let d = crate::testing::max_abs_diff(g.get(var.as_tensor()).unwrap(), reference);
                assert!(
                    d < 1e-5,
                    "{path} ({window:?}, {rot_half}): gradient of {name} differs by {d}"
                );
            }
        }
    }
}
