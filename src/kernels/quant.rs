//! Matrix products with GGUF-quantized weights, the hot loop of the quantized chat path
//! ([`crate::model::quantized`]). Weights stay in their GGUF blocks, byte for byte as the file holds
//! them: Q4_1 (32 weights per 20-byte block: f16 scale `d`, f16 minimum `m`, 16 bytes of
//! nibbles, weight = d·q + m) and Q8_0 (32 weights per 34-byte block: f16 `d`, 32 `i8`,
//! weight = d·q). Activations are quantized per 32-value block to **16 bits** (scale `d` and
//! `d·Σq`), so a block's dot product is one integer dot product plus a scale: for Q4_1,
//! `d_w·d_x·Σ(q_w·q_x) + m_w·(d_x·Σq_x)`.
//!
//! Why 16 and not llama.cpp's 8 bits: SmolLM-class models carry a few outlier channels whose
//! magnitude sets each 32-value block's scale, and 8-bit rounding of the other 31 values moved
//! logits by up to 2.7 on SmolLM2-135M. That flipped near-ties (f32 margins of 0.01–0.3) at 2% of
//! positions, e.g. "What is the capital of France?" was answered "L'Étoile…" instead of
//! "The capital of France is Paris." With 16 bits (relative rounding ≤ 1.5e-5 of a block's
//! largest value) the products equal the f32 products of the same dequantized weights to float
//! precision, so quantized chat answers what the f32 model answers; the integer dot products
//! cost about twice as many instructions, which decode (bound by reading the weights) barely
//! notices.
//!
//! Three kernels compute the same sums: AVX-512 (`vpmaddwd` on 32 values; for a decoded
//! token's Q4_1 rows two blocks per step, with VNNI's `vpdpwssd` where the CPU has it), AVX2
//! (`vpmaddwd`, two instructions a block) and portable scalar code, picked at run time with
//! [`Kernel::detect`] (NEON on aarch64). Integer sums are exact in every kernel, so the kernels
//! differ only in the order of f32 additions. The row kernels prefetch the weights a few KB
//! ahead: the hardware prefetcher alone left a decoding thread waiting on memory. One token's
//! rows are split over the spin pool ([`crate::kernels::spin`]), the products of one input
//! (q, k, v; gate, up) as one job ([`matmul_group`]); a block of tokens (a short prompt) is split
//! over a rayon pool and reuses each weight block, unpacked once, for up to [`TOKEN_TILE`]
//! tokens.
//!
//! A prompt, from 16 tokens on, and training over a quantized frozen base multiply through
//! [`matmul_f32`] / [`matmul_f32_backward`] instead: panels of weights (~[`PANEL_BYTES`] each)
//! dequantized into L2 with vector instructions, then f32 gemm on the spin pool's threads, the
//! f32 products' own split. Dequantizing a panel costs about one gemm pass over it, so against
//! hundreds of tokens it is noise, and the product runs at the f32 gemm's speed with a
//! fraction of its weight memory.

// std::arch intrinsics are `unsafe` (they need the CPU feature, checked by `Kernel::detect`
// before any of them is reached) and raw pointer loads replace bounds-checked slices in the
// innermost loops; every pointer offset is checked against the slice lengths first.
#![allow(unsafe_code)]

use half::f16;
use rayon::prelude::*;

/// Weights (and activations) per quantization block.
pub const BLOCK: usize = 32;
/// Tokens that share one unpacked weight block in the prompt kernel.
pub const TOKEN_TILE: usize = 8;

/// A GGUF block type the kernels read directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_1,
    Q8_0,
}

impl QType {
    /// Bytes of one 32-weight block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }
}

/// What is wrong with a quantized matrix or a product's operands.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QError {
    #[error("a {rows}x{cols} quantized matrix needs a column count that is a multiple of {BLOCK}")]
    Columns { rows: usize, cols: usize },
    #[error("a {rows}x{cols} {qtype:?} matrix needs {expected} bytes of blocks, found {found}")]
    DataSize {
        qtype: QType,
        rows: usize,
        cols: usize,
        expected: usize,
        found: usize,
    },
    #[error("{what}: expected {expected} values, found {found}")]
    Length {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("dequantized product: {0}")]
    Gemm(String),
    #[error("row permutation of length {found} for {rows} rows is not a permutation")]
    Permutation { rows: usize, found: usize },
}

/// A `[rows, cols]` weight matrix in GGUF blocks, row-major (a row is `cols / 32` blocks).
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    /// Wraps GGUF block bytes (as stored in the file) of a `[rows, cols]` matrix.
    pub fn from_blocks(qtype: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, QError> {
        if cols % BLOCK != 0 {
            return Err(QError::Columns { rows, cols });
        }
        let expected = rows * cols / BLOCK * qtype.block_bytes();
        if data.len() != expected {
            return Err(QError::DataSize {
                qtype,
                rows,
                cols,
                expected,
                found: data.len(),
            });
        }
        Ok(QMatrix {
            qtype,
            rows,
            cols,
            data,
        })
    }

    /// Quantizes row-major f32 `values` to `qtype` with llama.cpp's reference rounding
    /// (`quantize_row_q8_0` / `quantize_row_q4_1`).
    pub fn quantize(qtype: QType, rows: usize, cols: usize, values: &[f32]) -> Result<Self, QError> {
        if cols % BLOCK != 0 {
            return Err(QError::Columns { rows, cols });
        }
        if values.len() != rows * cols {
            return Err(QError::Length {
                what: "matrix values",
                expected: rows * cols,
                found: values.len(),
            });
        }
        let mut data = Vec::with_capacity(values.len() / BLOCK * qtype.block_bytes());
        for block in values.chunks_exact(BLOCK) {
            match qtype {
                QType::Q8_0 => {
                    let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    data.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
                }
                QType::Q4_1 => {
                    let min = block.iter().cloned().fold(f32::INFINITY, f32::min);
                    let max = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    data.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                    data.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
                }
            }
        }
        Self::from_blocks(qtype, rows, cols, data)
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block bytes, as in the GGUF file.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.qtype.block_bytes()
    }

    fn row_data(&self, row: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[row * n..(row + 1) * n]
    }

    /// Row `row` in f32 (weights exactly as the dequantizing loader computes them).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QError> {
        if row >= self.rows || out.len() != self.cols {
            return Err(QError::Length {
                what: "dequantized row",
                expected: self.cols,
                found: if row >= self.rows { 0 } else { out.len() },
            });
        }
        dequantize_blocks(Kernel::Scalar, self.qtype, self.row_data(row), out);
        Ok(())
    }

    /// Rows `r0..r0 + n` in f32 into `out` (`[n, cols]`, row-major), with `kernel`'s vector
    /// instructions; the values equal [`QMatrix::dequantize_row`]'s bit for bit.
    fn dequantize_rows(&self, kernel: Kernel, r0: usize, n: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let bytes = &self.data[r0 * rb..(r0 + n) * rb];
        dequantize_blocks(kernel, self.qtype, bytes, &mut out[..n * self.cols]);
    }

    /// Columns `c0..c0 + n` (whole blocks: both multiples of 32) of every row in f32 into `out`
    /// (`[rows, n]`, row-major); values as [`QMatrix::dequantize_rows`].
    fn dequantize_columns(&self, kernel: Kernel, c0: usize, n: usize, out: &mut [f32]) {
        debug_assert!(c0 % BLOCK == 0 && n % BLOCK == 0 && c0 + n <= self.cols);
        let bb = self.qtype.block_bytes();
        let (from, to) = (c0 / BLOCK * bb, (c0 + n) / BLOCK * bb);
        for (r, dst) in out[..self.rows * n].chunks_exact_mut(n).enumerate() {
            dequantize_blocks(kernel, self.qtype, &self.row_data(r)[from..to], dst);
        }
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            // Cannot fail: `r < rows` and every chunk has `cols` values.
            let _ = self.dequantize_row(r, dst);
        }
        out
    }

    /// A copy whose row `i` is this matrix's row `from[i]` (whole rows of blocks move, so the
    /// weights are unchanged bit for bit).
    /// Rows `start..start + count` as a matrix of their own (blocks copied, nothing
    /// requantized): how Phi-3's fused `attn_qkv` and `ffn_up` are split into q/k/v and gate/up.
    pub fn row_range(&self, start: usize, count: usize) -> Result<QMatrix, QError> {
        if start + count > self.rows {
            return Err(QError::Length {
                what: "row range",
                expected: self.rows,
                found: start + count,
            });
        }
        let n = self.row_bytes();
        Ok(QMatrix {
            data: self.data[start * n..(start + count) * n].to_vec(),
            rows: count,
            ..self.clone()
        })
    }

    pub fn permute_rows(&self, from: &[usize]) -> Result<QMatrix, QError> {
        let mut seen = vec![false; self.rows];
        if from.len() != self.rows
            || from
                .iter()
                .any(|&r| r >= self.rows || std::mem::replace(&mut seen[r], true))
        {
            return Err(QError::Permutation {
                rows: self.rows,
                found: from.len(),
            });
        }
        let mut data = Vec::with_capacity(self.data.len());
        for &r in from {
            data.extend_from_slice(self.row_data(r));
        }
        Ok(QMatrix { data, ..self.clone() })
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The blocks `bytes` (whole blocks of `qtype`) as f32 values into `out` (32 per block): `d·q`
/// for Q8_0, `d·q + m` for Q4_1 (a product, then a sum: no fused multiply-add, so every kernel
/// gives the same bits).
fn dequantize_blocks(kernel: Kernel, qtype: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = qtype.block_bytes();
    debug_assert_eq!(bytes.len() / bb * BLOCK, out.len());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Avx2` / `Avx512` only come from `available()`, which checked the CPU
        // features; `out` has 32 values per block of `bytes` (asserted by the callers' shapes).
        Kernel::Avx2 if out.len() == bytes.len() / bb * BLOCK => unsafe { x86::dequantize_avx2(qtype, bytes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512 if out.len() == bytes.len() / bb * BLOCK => unsafe { x86::dequantize_avx512(qtype, bytes, out) },
        _ => dequantize_blocks_scalar(qtype, bytes, out),
    }
}

#[allow(clippy::needless_range_loop)] // j and j + 16 share one byte
fn dequantize_blocks_scalar(qtype: QType, bytes: &[u8], out: &mut [f32]) {
    for (block, dst) in bytes.chunks_exact(qtype.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(block, 0);
        match qtype {
            QType::Q8_0 => {
                for (o, &q) in dst.iter_mut().zip(&block[2..]) {
                    *o = d * (q as i8) as f32;
                }
            }
            QType::Q4_1 => {
                let m = f16_at(block, 2);
                for j in 0..16 {
                    dst[j] = d * (block[4 + j] & 0x0F) as f32 + m;
                    dst[j + 16] = d * (block[4 + j] >> 4) as f32 + m;
                }
            }
        }
    }
}

/// Largest magnitude of a quantized activation (16-bit, symmetric).
const ACT_MAX: f32 = 32767.0;

/// `tokens` activation rows of `cols` values quantized to 16 bits per 32-value block:
/// value ≈ `d[block]·qs[i]`, and `s[block] = d[block]·Σ qs` (the sum Q4_1's minimum needs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QActivations {
    tokens: usize,
    cols: usize,
    qs: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// `qs` with each pair of blocks `(b, b + 1)` interleaved by halves, `[b 0..16, b+1 0..16,
    /// b 16..32, b+1 16..32]` (an odd last block as it is): the order in which the AVX-512
    /// Q4_1 kernel unpacks two blocks' low and high nibbles at once.
    paired: Vec<i16>,
}

impl QActivations {
    /// Quantizes row-major `x: [tokens, cols]`.
    pub fn quantize(x: &[f32], tokens: usize, cols: usize) -> Result<Self, QError> {
        let mut a = QActivations::default();
        a.quantize_from(x, tokens, cols)?;
        Ok(a)
    }

    /// [`QActivations::quantize`] into this value's buffers (no allocation once they are big enough).
    pub fn quantize_from(&mut self, x: &[f32], tokens: usize, cols: usize) -> Result<(), QError> {
        if cols % BLOCK != 0 {
            return Err(QError::Columns { rows: tokens, cols });
        }
        if x.len() != tokens * cols {
            return Err(QError::Length {
                what: "activations",
                expected: tokens * cols,
                found: x.len(),
            });
        }
        self.tokens = tokens;
        self.cols = cols;
        self.qs.resize(x.len(), 0);
        self.d.resize(x.len() / BLOCK, 0.0);
        self.s.resize(x.len() / BLOCK, 0.0);
        for (((src, qs), d), s) in x
            .chunks_exact(BLOCK)
            .zip(self.qs.chunks_exact_mut(BLOCK))
            .zip(self.d.iter_mut())
            .zip(self.s.iter_mut())
        {
            let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / ACT_MAX;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(src) {
                *q = (v * inv).round() as i16;
                sum += *q as i32;
            }
            *d = scale;
            *s = scale * sum as f32;
        }
        self.paired.resize(x.len(), 0);
        for (row, out) in self.qs.chunks_exact(cols).zip(self.paired.chunks_exact_mut(cols)) {
            let (pairs, odd) = row.split_at(cols / (2 * BLOCK) * 2 * BLOCK);
            for (src, dst) in pairs.chunks_exact(2 * BLOCK).zip(out.chunks_exact_mut(2 * BLOCK)) {
                let h = BLOCK / 2;
                dst[..h].copy_from_slice(&src[..h]);
                dst[h..2 * h].copy_from_slice(&src[2 * h..3 * h]);
                dst[2 * h..3 * h].copy_from_slice(&src[h..2 * h]);
                dst[3 * h..].copy_from_slice(&src[3 * h..]);
            }
            out[pairs.len()..].copy_from_slice(odd);
        }
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, t: usize) -> ActRow<'_> {
        let nb = self.cols / BLOCK;
        ActRow {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * nb..(t + 1) * nb],
            s: &self.s[t * nb..(t + 1) * nb],
            paired: &self.paired[t * self.cols..(t + 1) * self.cols],
        }
    }
}

#[derive(Clone, Copy)]
struct ActRow<'a> {
    qs: &'a [i16],
    d: &'a [f32],
    s: &'a [f32],
    /// [`QActivations::paired`]'s row (empty where a kernel does not read it). Only the x86-64
    /// Q4_1 kernels read it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    paired: &'a [i16],
}

/// Which instruction set computes the block dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Avx2,
    Avx512,
    /// aarch64 NEON (`quant_neon.rs`); every aarch64 CPU has it.
    Neon,
}

impl Kernel {
    /// The fastest kernel of the family [`crate::kernels::cpu::quantized_family`] allows
    /// (`FINCH_CPU` caps it; by default the fastest this CPU runs).
    pub fn detect() -> Kernel {
        let cap = crate::kernels::cpu::quantized_family();
        Self::available()
            .into_iter()
            .rfind(|k| k.family() <= cap)
            .unwrap_or(Kernel::Scalar)
    }

    /// [`Kernel::detect`], decided once per process (products ask for it on every call).
    pub fn current() -> Kernel {
        static CURRENT: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CURRENT.get_or_init(Kernel::detect)
    }

    /// The instruction-set family this kernel belongs to.
    pub fn family(self) -> crate::kernels::cpu::Family {
        use crate::kernels::cpu::Family;
        match self {
            Kernel::Scalar => Family::Portable,
            Kernel::Avx2 => Family::Avx2,
            Kernel::Avx512 => Family::Avx512,
            Kernel::Neon => Family::Neon,
        }
    }

    /// Every kernel this CPU runs, slowest first (tests compare them all).
    pub fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut out = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                out.push(Kernel::Avx2);
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                    out.push(Kernel::Avx512);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        out.push(Kernel::Neon);
        out
    }

    /// The dot product of weight row bytes `w` with one activation row (decoding). The x86
    /// kernels convert the blocks' f16 scales sixteen (AVX2: eight) at a time and keep the
    /// Q4_1 minimum terms in a vector: per block, those scalar conversions cost as much as the
    /// integer dot product itself. Same sums as [`Kernel::dots`], added in another order.
    fn row_dot(self, qtype: QType, w: &[u8], x: ActRow<'_>) -> f32 {
        debug_assert!(x.d.len() == w.len() / qtype.block_bytes());
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dots`; the row has the activation row's block count.
            Kernel::Avx2 => unsafe { x86::row_dot_avx2(qtype, w, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx512 => unsafe { x86::row_dot_avx512(qtype, w, x) },
            _ => self.dots(qtype, w, [x])[0],
        }
    }

    /// `Σ_t` dot products of weight row bytes `w` with the `N` activation rows `x`.
    fn dots<const N: usize>(self, qtype: QType, w: &[u8], x: [ActRow<'_>; N]) -> [f32; N] {
        let nb = w.len() / qtype.block_bytes();
        debug_assert!(x.iter().all(|r| r.d.len() == nb && r.qs.len() == nb * BLOCK));
        match self {
            Kernel::Scalar => scalar::dots(qtype, w, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` / `Avx512` only come from `available()`, which checked
            // the CPU features; the row lengths agree (checked by `matmul`).
            Kernel::Avx2 => unsafe { x86::dots_avx2(qtype, w, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx512 => unsafe { x86::dots_avx512(qtype, w, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is baseline on aarch64; the row lengths agree (checked by `matmul`).
            Kernel::Neon => unsafe { neon::dots(qtype, w, x) },
            // Kernels of another architecture never come from `available()`.
            #[allow(unreachable_patterns)]
            _ => scalar::dots(qtype, w, x),
        }
    }
}

/// The pool the products run on: [`crate::kernels::cpu::threads`] threads (the count the f32
/// matmuls use, from `RAYON_NUM_THREADS` or the core count), built once.
pub fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = crate::kernels::cpu::threads();
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("finch-qmatmul-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// `out[t, r] = Σ_c w[r, c]·x[t, c]` for every token `t` of `x` and row `r` of `w`; `out` is
/// row-major `[tokens, rows]`. Rows are split over the current rayon pool (run it inside
/// [`pool`]'s `install` to use the quantized path's threads).
pub fn matmul(w: &QMatrix, x: &QActivations, out: &mut [f32], kernel: Kernel) -> Result<(), QError> {
    check_product(w, x, out.len())?;
    if w.rows == 0 || x.tokens == 0 {
        return Ok(());
    }
    if x.tokens == 1 {
        return matmul_group(&mut [(w, out)], x, kernel);
    }
    // Several tokens: the current rayon pool's threads, a few chunks per thread so that a
    // thread slowed by other work on the machine is helped.
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = w.rows.div_ceil(threads * 4).max(16);
    // Several tokens: compute `[rows, tokens]` (each task owns whole rows), then transpose.
    let tokens = x.tokens;
    let mut by_row = vec![0f32; w.rows * tokens];
    let work = |(i, dst): (usize, &mut [f32])| {
        let r0 = i * chunk_rows;
        for (r, o) in (r0..).zip(dst.chunks_exact_mut(tokens)) {
            rows_times_tokens(kernel, w, r, x, o);
        }
    };
    if threads > 1 && w.rows > chunk_rows {
        by_row.par_chunks_mut(chunk_rows * tokens).enumerate().for_each(work);
    } else {
        by_row.chunks_mut(chunk_rows * tokens).enumerate().for_each(work);
    }
    for (r, row) in by_row.chunks_exact(tokens).enumerate() {
        for (t, v) in row.iter().enumerate() {
            out[t * w.rows + r] = *v;
        }
    }
    Ok(())
}

/// `x` fits `w`'s columns and `out_len` is `[tokens, rows]`.
fn check_product(w: &QMatrix, x: &QActivations, out_len: usize) -> Result<(), QError> {
    if x.cols != w.cols {
        return Err(QError::Length {
            what: "activation columns",
            expected: w.cols,
            found: x.cols,
        });
    }
    if out_len != x.tokens * w.rows {
        return Err(QError::Length {
            what: "matmul output",
            expected: x.tokens * w.rows,
            found: out_len,
        });
    }
    Ok(())
}

/// [`matmul`] of several matrices with the same input (q, k and v; gate and up): for one token
/// (decoding) the rows of all of them are split over the spin pool as one job, so the threads
/// meet once per group instead of once per matrix (its workers do not sleep between a token's
/// products); several tokens go through [`matmul`] one matrix at a time.
pub fn matmul_group(products: &mut [(&QMatrix, &mut [f32])], x: &QActivations, kernel: Kernel) -> Result<(), QError> {
    for (w, out) in products.iter() {
        check_product(w, x, out.len())?;
    }
    if x.tokens != 1 {
        for (w, out) in products.iter_mut() {
            matmul(w, x, out, kernel)?;
        }
        return Ok(());
    }
    // Tasks of `chunk` rows (a few per thread, so that a thread slowed by other work on the
    // machine is helped), none spanning two matrices.
    let total: usize = products.iter().map(|(w, _)| w.rows).sum();
    let chunk = total.div_ceil(crate::kernels::spin::threads() * 8).max(16);
    let mut tasks = Vec::new();
    for (i, (w, _)) in products.iter().enumerate() {
        tasks.extend((0..w.rows).step_by(chunk).map(|r0| (i, r0, chunk.min(w.rows - r0))));
    }
    let mats: Vec<&QMatrix> = products.iter().map(|(w, _)| *w).collect();
    let outs: Vec<Shared> = products
        .iter_mut()
        .map(|(_, o)| Shared(o.as_mut_ptr(), o.len()))
        .collect();
    let row = x.row(0);
    crate::kernels::spin::run(tasks.len(), &|j| {
        let (i, r0, n) = tasks[j];
        let w = mats[i];
        // SAFETY: task j alone writes rows r0..r0 + n of output i (the tasks' row ranges of one
        // matrix are disjoint), inside it (r0 + n <= rows = the output's length).
        let dst = unsafe { outs[i].rows(r0, n, 1) };
        for (r, o) in (r0..).zip(dst.iter_mut()) {
            *o = kernel.row_dot(w.qtype, w.row_data(r), row);
        }
    });
    Ok(())
}

/// Bytes of dequantized f32 weights one task of [`matmul_f32`] / [`matmul_f32_backward`] holds
/// at a time: a panel this size stays in the core's L2 while gemm packs it. Measured on the
/// training shapes of SmolLM2-135M (1,024 tokens, 2-core Intel Xeon): 128 KB panels were 30%
/// slower than the f32 product, 1 MB ones level with it.
const PANEL_BYTES: usize = 1 << 20;

/// Fewest weight rows (forward) or columns (backward) of a panel: narrower panels make gemm
/// re-read the activations (or output gradients) once per panel for little work each.
const PANEL_MIN: usize = 64;

/// Token rows from which a product is split by tokens (each thread dequantizing every panel for
/// its own rows) rather than by panels (each panel dequantized once, all tokens at a time).
/// Each thread then dequantizes the whole matrix once: for 128 tokens that is ~1/50 of the
/// product's arithmetic, for a training step's 1,024 well under 1%.
const SPLIT_TOKENS: usize = 128;

/// Most token rows of one task when split by tokens (bounds the task's output buffer).
const CHUNK_TOKENS: usize = 1024;

/// How [`matmul_f32`] / [`matmul_f32_backward`] divide a product: `chunks` runs of `chunk`
/// tokens times `panels` panels of `panel` weight rows (forward) or columns (backward).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Split {
    chunk: usize,
    chunks: usize,
    panel: usize,
    panels: usize,
}

impl Split {
    /// `tokens` rows against `width` panel units (rows forward, columns backward) of `depth`
    /// values each; a unit count that is a multiple of `align` (32 for columns: whole blocks).
    fn new(tokens: usize, width: usize, depth: usize, align: usize, threads: usize) -> Split {
        let chunks = if threads > 1 && tokens >= SPLIT_TOKENS {
            threads
                .max(tokens.div_ceil(CHUNK_TOKENS))
                .min(tokens / (SPLIT_TOKENS / 2))
        } else {
            1
        };
        let chunk = tokens.div_ceil(chunks.max(1));
        let chunks = tokens.div_ceil(chunk);
        let units = |n: usize| n.div_ceil(align) * align;
        let mut panel = units((PANEL_BYTES / 4 / depth.max(1)).max(PANEL_MIN)).min(width);
        if chunks == 1 && threads > 1 {
            // Tokens are not split: the panels are the tasks, a few per thread.
            panel = panel.min(units(width.div_ceil(threads * 4)).max(align.max(16)));
        }
        // Equal panels (a 576-row matrix in 455-row panels would leave a 121-row one).
        let panels = width.div_ceil(panel.max(1));
        let panel = units(width.div_ceil(panels)).min(width);
        Split {
            chunk,
            chunks,
            panel,
            panels: width.div_ceil(panel.max(1)),
        }
    }
}

thread_local! {
    /// Each thread's dequantized panel and panel output, reused across products (a training step
    /// runs hundreds; fresh buffers would be fresh pages for the kernel to clear each time).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f(panel, tmp)` with this thread's scratch buffers resized to `panel` and `tmp` values.
fn with_scratch<R>(panel: usize, tmp: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let (p, t) = &mut *s;
            if p.len() < panel {
                p.resize(panel, 0.0);
            }
            if t.len() < tmp {
                t.resize(tmp, 0.0);
            }
            f(&mut p[..panel], &mut t[..tmp])
        }
        // Only reachable from a nested call on this thread; plain buffers then.
        Err(_) => f(&mut vec![0f32; panel], &mut vec![0f32; tmp]),
    })
}

/// A destination written by several tasks at disjoint positions.
struct Shared(*mut f32, usize);
// SAFETY: tasks write disjoint elements (each owns a block of rows × columns), and the product
// waits for every task before the buffer is used again.
unsafe impl Sync for Shared {}

impl Shared {
    /// Copies the row-major `[n_rows, width]` `src` to rows `r0..` and columns `c0..c0 + width`
    /// of the `[_, stride]` destination. Safety: the block is inside the destination and no other
    /// task writes it.
    unsafe fn put(&self, src: &[f32], width: usize, r0: usize, c0: usize, stride: usize) {
        for (i, row) in src.chunks_exact(width).enumerate() {
            let at = (r0 + i) * stride + c0;
            debug_assert!(at + width <= self.1);
            std::ptr::copy_nonoverlapping(row.as_ptr(), self.0.add(at), width);
        }
    }

    /// Where row `r0`, column `c0` of a `[_, stride]` destination is. Safety: inside it.
    unsafe fn at(&self, r0: usize, c0: usize, stride: usize) -> *mut f32 {
        debug_assert!(r0 * stride + c0 <= self.1);
        self.0.add(r0 * stride + c0)
    }

    /// Rows `r0..r0 + n` of a `[_, stride]` destination as one slice. Safety: as [`Shared::put`].
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, r0: usize, n: usize, stride: usize) -> &mut [f32] {
        debug_assert!((r0 + n) * stride <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(r0 * stride), n * stride)
    }
}

/// Runs `task(chunk, panel)` for every pair of `split` on the spin pool (the f32 products'
/// threads); the first error is returned.
fn run_split(split: Split, task: impl Fn(usize, usize) -> Result<(), QError> + Sync) -> Result<(), QError> {
    let error = crate::kernels::spin::FirstError::new();
    crate::kernels::spin::run(split.chunks * split.panels, &|i| {
        error.keep(task(i / split.panels, i % split.panels))
    });
    error.result()
}

/// `out[t, r] = Σ_c w[r, c]·x[t, c]` in f32 for row-major `x: [tokens, cols]`: panels of weight
/// rows are dequantized (never the whole matrix) and multiplied with gemm. For a prompt this
/// beats the integer kernels (which pay the activations' quantization and a dot product per
/// row and token) once there are a few dozen tokens, and it is exact: the products are the f32
/// products of the same dequantized weights.
///
/// Tall products (training: hundreds of tokens) are split by tokens like the f32 path's gemm,
/// each thread dequantizing the panels for its own rows of `x`; shorter ones by panels.
pub fn matmul_f32(w: &QMatrix, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<(), QError> {
    if x.len() != tokens * w.cols {
        return Err(QError::Length {
            what: "activations",
            expected: tokens * w.cols,
            found: x.len(),
        });
    }
    if out.len() != tokens * w.rows {
        return Err(QError::Length {
            what: "matmul output",
            expected: tokens * w.rows,
            found: out.len(),
        });
    }
    if w.rows == 0 || tokens == 0 {
        return Ok(());
    }
    use crate::kernels::gemm::{gemm_into_on, Mat};
    let (rows, cols) = (w.rows, w.cols);
    let split = Split::new(tokens, rows, cols, 1, threads_for_panels());
    let kernel = Kernel::current();
    let dst = Shared(out.as_mut_ptr(), out.len());
    run_split(split, |c, p| {
        let (t0, r0) = (c * split.chunk, p * split.panel);
        let (mt, n) = (split.chunk.min(tokens - t0), split.panel.min(rows - r0));
        let whole = n == rows;
        let row_tile = crate::kernels::rowdot::takes(mt);
        with_scratch(n * cols, if whole || row_tile { 0 } else { mt * n }, |panel, tmp| {
            w.dequantize_rows(kernel, r0, n, panel);
            let xs = &x[t0 * cols..(t0 + mt) * cols];
            if row_tile {
                // On the AVX2 family, a task of 16–255 token rows (a prompt's share, or a short
                // training batch's: the split is per task here, per product on the f32 path):
                // the panel's rows read in place by the row tile, written straight into this
                // task's block (no packing, no copy).
                // SAFETY: the block (tokens t0..t0 + mt, rows r0..r0 + n) of the `[tokens, rows]`
                // output is this task's alone; the product writes nothing outside it.
                return unsafe {
                    crate::kernels::rowdot::product(xs, mt, panel, n, cols, dst.at(t0, r0, rows), rows, false)
                }
                .map_err(|e| QError::Gemm(e.to_string()));
            }
            let xm = Mat::row_major(xs, mt, cols);
            let rhs = Mat::row_major(panel, n, cols).t();
            let gemm = |d: &mut [f32]| gemm_into_on(d, false, xm, rhs, 1).map_err(|e| QError::Gemm(e.to_string()));
            if whole {
                // SAFETY: this task is the only one writing rows t0..t0 + mt (one panel).
                gemm(unsafe { dst.rows(t0, mt, rows) })
            } else {
                gemm(tmp)?;
                // SAFETY: the block (tokens t0.., rows r0..r0 + n) is this task's alone.
                unsafe { dst.put(tmp, n, t0, r0, rows) };
                Ok(())
            }
        })
    })
}

/// Threads the panel products are split over: the spin pool's, or 1 inside one of its tasks.
fn threads_for_panels() -> usize {
    if crate::kernels::spin::in_task() {
        1
    } else {
        crate::kernels::spin::threads()
    }
}

/// The input gradient of `y = x·Wᵀ`: `dx[t, c] = Σ_r g[t, r]·w[r, c]` for row-major
/// `g: [tokens, rows]`, written to `dx: [tokens, cols]`. Each task dequantizes a panel of whole
/// blocks of columns of every row (`W[:, c0..c0 + n]`) and writes its columns of `dx` with one
/// full-depth gemm, so the f32 weights never exist whole and nothing is accumulated across
/// panels; split over threads as [`matmul_f32`].
pub fn matmul_f32_backward(w: &QMatrix, g: &[f32], tokens: usize, dx: &mut [f32]) -> Result<(), QError> {
    if g.len() != tokens * w.rows {
        return Err(QError::Length {
            what: "output gradient",
            expected: tokens * w.rows,
            found: g.len(),
        });
    }
    if dx.len() != tokens * w.cols {
        return Err(QError::Length {
            what: "input gradient",
            expected: tokens * w.cols,
            found: dx.len(),
        });
    }
    if w.rows == 0 || tokens == 0 {
        dx.fill(0.0);
        return Ok(());
    }
    use crate::kernels::gemm::{gemm_into_on, Mat};
    let (rows, cols) = (w.rows, w.cols);
    let split = Split::new(tokens, cols, rows, BLOCK, threads_for_panels());
    let kernel = Kernel::current();
    let dst = Shared(dx.as_mut_ptr(), dx.len());
    run_split(split, |c, p| {
        let (t0, c0) = (c * split.chunk, p * split.panel);
        let (mt, n) = (split.chunk.min(tokens - t0), split.panel.min(cols - c0));
        let whole = n == cols;
        with_scratch(rows * n, if whole { 0 } else { mt * n }, |panel, tmp| {
            w.dequantize_columns(kernel, c0, n, panel);
            let gm = Mat::row_major(&g[t0 * rows..(t0 + mt) * rows], mt, rows);
            let rhs = Mat::row_major(panel, rows, n);
            let gemm = |d: &mut [f32]| gemm_into_on(d, false, gm, rhs, 1).map_err(|e| QError::Gemm(e.to_string()));
            if whole {
                // SAFETY: this task is the only one writing rows t0..t0 + mt (one panel).
                gemm(unsafe { dst.rows(t0, mt, cols) })
            } else {
                gemm(tmp)?;
                // SAFETY: the block (tokens t0.., columns c0..c0 + n) is this task's alone.
                unsafe { dst.put(tmp, n, t0, c0, cols) };
                Ok(())
            }
        })
    })
}

/// Row `r` of `w` times every token of `x`, [`TOKEN_TILE`] tokens per pass over the row.
fn rows_times_tokens(kernel: Kernel, w: &QMatrix, r: usize, x: &QActivations, out: &mut [f32]) {
    fn tile<const N: usize>(kernel: Kernel, qtype: QType, row: &[u8], x: &QActivations, t: usize, out: &mut [f32]) {
        let v = kernel.dots(qtype, row, std::array::from_fn::<_, N, _>(|i| x.row(t + i)));
        out[t..t + N].copy_from_slice(&v);
    }
    let row = w.row_data(r);
    let mut t = 0;
    while t + TOKEN_TILE <= x.tokens {
        tile::<TOKEN_TILE>(kernel, w.qtype, row, x, t, out);
        t += TOKEN_TILE;
    }
    match x.tokens - t {
        7 => tile::<7>(kernel, w.qtype, row, x, t, out),
        6 => tile::<6>(kernel, w.qtype, row, x, t, out),
        5 => tile::<5>(kernel, w.qtype, row, x, t, out),
        4 => tile::<4>(kernel, w.qtype, row, x, t, out),
        3 => tile::<3>(kernel, w.qtype, row, x, t, out),
        2 => tile::<2>(kernel, w.qtype, row, x, t, out),
        1 => tile::<1>(kernel, w.qtype, row, x, t, out),
        _ => {}
    }
}

#[allow(clippy::needless_range_loop)] // j and j + 16 share one byte
mod scalar {
    use super::{f16_at, ActRow, QType, BLOCK};

    pub(super) fn dots<const N: usize>(qtype: QType, w: &[u8], x: [ActRow<'_>; N]) -> [f32; N] {
        let mut out = [0f32; N];
        for (b, block) in w.chunks_exact(qtype.block_bytes()).enumerate() {
            let dw = f16_at(block, 0);
            for (o, x) in out.iter_mut().zip(x.iter()) {
                let xq = &x.qs[b * BLOCK..(b + 1) * BLOCK];
                *o += match qtype {
                    QType::Q8_0 => {
                        let sum: i32 = block[2..]
                            .iter()
                            .zip(xq)
                            .map(|(&w, &x)| (w as i8) as i32 * x as i32)
                            .sum();
                        dw * x.d[b] * sum as f32
                    }
                    QType::Q4_1 => {
                        let mut sum = 0i32;
                        for j in 0..16 {
                            sum += (block[4 + j] & 0x0F) as i32 * xq[j] as i32;
                            sum += (block[4 + j] >> 4) as i32 * xq[j + 16] as i32;
                        }
                        dw * x.d[b] * sum as f32 + f16_at(block, 2) * x.s[b]
                    }
                };
            }
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
#[path = "quant_neon.rs"]
mod neon;

// Indexed loops over the `N` tokens keep the accumulators in registers (N is a constant).
// The AVX-512 intrinsics are stable since Rust 1.89, later than the crate's declared
// `rust-version`; the toolchain this project builds with (1.95) has them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop, clippy::incompatible_msrv)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ActRow, QType, BLOCK};

    /// f16 at `p` (little endian) to f32 with one F16C conversion.
    #[inline(always)]
    unsafe fn f16_ptr(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 weights of the Q4_1 block at `p` as u8 in element order (low nibbles are
    /// elements 0..16, high nibbles 16..32).
    #[inline(always)]
    unsafe fn q4_1_unpack(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p.add(4) as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4))
    }

    /// The 32 weights of block `p` as i16 in element order, elements 0..16 and 16..32.
    #[inline(always)]
    unsafe fn widen_avx2(qtype: QType, p: *const u8) -> [__m256i; 2] {
        match qtype {
            QType::Q4_1 => {
                // Each byte widened to 16 bits holds both of its nibbles: the low one is
                // element j, the high one (the 16-bit value shifted right by 4) element j + 16.
                let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(4) as *const __m128i));
                [_mm256_and_si256(v, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(v, 4)]
            }
            QType::Q8_0 => [
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(2) as *const __m128i)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(18) as *const __m128i)),
            ],
        }
    }

    /// Q4_1's minimum term of block `b` (at `p`) for each token: `m_w · d_x·Σq_x`.
    #[inline(always)]
    unsafe fn add_min_terms<const N: usize>(
        qtype: QType,
        p: *const u8,
        x: &[ActRow<'_>; N],
        b: usize,
        min_acc: &mut [f32; N],
    ) {
        if qtype == QType::Q4_1 {
            let mw = f16_ptr(p.add(2));
            for t in 0..N {
                min_acc[t] += mw * *x[t].s.get_unchecked(b);
            }
        }
    }

    /// [`super::dequantize_blocks`] on AVX-512. Safety: the CPU has AVX-512 F/BW, AVX2 and F16C;
    /// `out` holds 32 values per block of `bytes`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_avx512(qtype: QType, bytes: &[u8], out: &mut [f32]) {
        let bb = qtype.block_bytes();
        let (mut p, mut o) = (bytes.as_ptr(), out.as_mut_ptr());
        for _ in 0..bytes.len() / bb {
            let d = _mm512_set1_ps(f16_ptr(p));
            let (lo, hi) = match qtype {
                QType::Q8_0 => {
                    let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                    (
                        _mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)),
                        _mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)),
                    )
                }
                QType::Q4_1 => {
                    let q = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let m4 = _mm_set1_epi8(0x0F);
                    (
                        _mm512_cvtepu8_epi32(_mm_and_si128(q, m4)),
                        _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4)),
                    )
                }
            };
            let (mut lo, mut hi) = (
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)),
                _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)),
            );
            if qtype == QType::Q4_1 {
                let m = _mm512_set1_ps(f16_ptr(p.add(2)));
                lo = _mm512_add_ps(lo, m);
                hi = _mm512_add_ps(hi, m);
            }
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o.add(16), hi);
            p = p.add(bb);
            o = o.add(BLOCK);
        }
    }

    /// [`super::dequantize_blocks`] on AVX2. Safety: the CPU has AVX2 and F16C; `out` holds 32
    /// values per block of `bytes`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_avx2(qtype: QType, bytes: &[u8], out: &mut [f32]) {
        let bb = qtype.block_bytes();
        let (mut p, mut o) = (bytes.as_ptr(), out.as_mut_ptr());
        for _ in 0..bytes.len() / bb {
            let d = _mm256_set1_ps(f16_ptr(p));
            // Eight weights at a time, in element order.
            let eight: [__m256i; 4] = match qtype {
                QType::Q8_0 => {
                    let q0 = _mm_loadu_si128(p.add(2) as *const __m128i);
                    let q1 = _mm_loadu_si128(p.add(18) as *const __m128i);
                    [
                        _mm256_cvtepi8_epi32(q0),
                        _mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)),
                        _mm256_cvtepi8_epi32(q1),
                        _mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)),
                    ]
                }
                QType::Q4_1 => {
                    let q = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let m4 = _mm_set1_epi8(0x0F);
                    let (lo, hi) = (_mm_and_si128(q, m4), _mm_and_si128(_mm_srli_epi16(q, 4), m4));
                    [
                        _mm256_cvtepu8_epi32(lo),
                        _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                        _mm256_cvtepu8_epi32(hi),
                        _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
                    ]
                }
            };
            let m = _mm256_set1_ps(if qtype == QType::Q4_1 { f16_ptr(p.add(2)) } else { 0.0 });
            for (i, v) in eight.into_iter().enumerate() {
                let mut w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(v));
                if qtype == QType::Q4_1 {
                    w = _mm256_add_ps(w, m);
                }
                _mm256_storeu_ps(o.add(8 * i), w);
            }
            p = p.add(bb);
            o = o.add(BLOCK);
        }
    }

    /// Safety: the CPU has AVX2, FMA and F16C; every activation row has `w.len() / block_bytes`
    /// blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots_avx2<const N: usize>(qtype: QType, w: &[u8], x: [ActRow<'_>; N]) -> [f32; N] {
        let bb = qtype.block_bytes();
        let nb = w.len() / bb;
        let mut acc = [_mm256_setzero_ps(); N];
        let mut min_acc = [0f32; N];
        let wp = w.as_ptr();
        for b in 0..nb {
            let p = wp.add(b * bb);
            let dw = f16_ptr(p);
            let [w0, w1] = widen_avx2(qtype, p);
            for t in 0..N {
                let xp = x[t].qs.as_ptr().add(b * BLOCK);
                let x0 = _mm256_loadu_si256(xp as *const __m256i);
                let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
                let sum = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                let scale = _mm256_set1_ps(dw * *x[t].d.get_unchecked(b));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[t]);
            }
            add_min_terms(qtype, p, &x, b, &mut min_acc);
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = hsum256(acc[t]) + min_acc[t];
        }
        out
    }

    /// The header of block `p`: its f16 scale `d` (low half) and, for Q4_1, its f16 minimum.
    #[inline(always)]
    unsafe fn header(p: *const u8) -> u32 {
        (p as *const u32).read_unaligned()
    }

    /// [`dots_avx2`] for one activation row, eight blocks' scales at a time. Safety: as
    /// [`dots_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dot_avx2(qtype: QType, w: &[u8], x: ActRow<'_>) -> f32 {
        const G: usize = 8;
        let bb = qtype.block_bytes();
        let nb = w.len() / bb;
        let wp = w.as_ptr();
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut min_acc = _mm256_setzero_ps();
        let mut scales = [0f32; G];
        let (mut d16, mut m16) = ([0u16; G], [0u16; G]);
        let mut b0 = 0;
        while b0 + G <= nb {
            for i in 0..G {
                let h = header(wp.add((b0 + i) * bb));
                d16[i] = h as u16;
                m16[i] = (h >> 16) as u16;
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(d16.as_ptr() as *const __m128i));
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(b0));
            _mm256_storeu_ps(scales.as_mut_ptr(), _mm256_mul_ps(dw, dx));
            if qtype == QType::Q4_1 {
                let mw = _mm256_cvtph_ps(_mm_loadu_si128(m16.as_ptr() as *const __m128i));
                min_acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x.s.as_ptr().add(b0)), min_acc);
            }
            // Two named accumulators, as in `row_dot_avx512`.
            for i in (0..G).step_by(2) {
                let (b, s) = (b0 + i, scales.as_ptr().add(i));
                prefetch(wp, b * bb);
                acc0 = _mm256_fmadd_ps(block_sum_avx2(qtype, wp.add(b * bb), &x, b), _mm256_set1_ps(*s), acc0);
                let b = b + 1;
                acc1 = _mm256_fmadd_ps(
                    block_sum_avx2(qtype, wp.add(b * bb), &x, b),
                    _mm256_set1_ps(*s.add(1)),
                    acc1,
                );
            }
            b0 += G;
        }
        let mut min_tail = 0f32;
        for b in b0..nb {
            let p = wp.add(b * bb);
            let scale = _mm256_set1_ps(f16_ptr(p) * *x.d.get_unchecked(b));
            acc0 = _mm256_fmadd_ps(block_sum_avx2(qtype, p, &x, b), scale, acc0);
            if qtype == QType::Q4_1 {
                min_tail += f16_ptr(p.add(2)) * *x.s.get_unchecked(b);
            }
        }
        hsum256(_mm256_add_ps(acc0, acc1)) + hsum256(min_acc) + min_tail
    }

    /// The integer dot product of block `b` (weights at `p`) with the activation row's block
    /// `b`, as 8 f32 lanes.
    #[inline(always)]
    unsafe fn block_sum_avx2(qtype: QType, p: *const u8, x: &ActRow<'_>, b: usize) -> __m256 {
        let [w0, w1] = widen_avx2(qtype, p);
        let xp = x.qs.as_ptr().add(b * BLOCK);
        let x0 = _mm256_loadu_si256(xp as *const __m256i);
        let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
        _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)))
    }

    /// [`dots_avx512`] for one activation row: Q4_1 through [`row_dot_q4_1_avx512`] (with
    /// `vpdpwssd` where the CPU has AVX-512 VNNI), Q8_0 through [`row_dot_blocks_avx512`].
    /// Safety: as [`dots_avx512`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn row_dot_avx512(qtype: QType, w: &[u8], x: ActRow<'_>) -> f32 {
        match qtype {
            QType::Q8_0 => row_dot_blocks_avx512(qtype, w, x),
            QType::Q4_1 if has_vnni() => row_dot_q4_1_vnni(w, x),
            QType::Q4_1 => row_dot_q4_1_no_vnni(w, x),
        }
    }

    /// Whether the CPU has AVX-512 VNNI (`vpdpwssd`), decided once.
    pub(super) fn has_vnni() -> bool {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| std::arch::is_x86_feature_detected!("avx512vnni"))
    }

    /// [`row_dot_q4_1_avx512`] with `vpdpwssd`. Safety: as [`dots_avx512`], and the CPU has
    /// AVX-512 VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn row_dot_q4_1_vnni(w: &[u8], x: ActRow<'_>) -> f32 {
        row_dot_q4_1_avx512::<true>(w, x)
    }

    /// [`row_dot_q4_1_avx512`] without VNNI. Safety: as [`dots_avx512`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn row_dot_q4_1_no_vnni(w: &[u8], x: ActRow<'_>) -> f32 {
        row_dot_q4_1_avx512::<false>(w, x)
    }

    /// One Q4_1 row against one activation row (`x.paired` filled), two blocks per step: the
    /// sixteen nibble bytes of blocks `b` and `b + 1` are widened to 16 bits in one register,
    /// where `v & 15` holds both blocks' elements 0..16 and `v >> 4` their elements 16..32, the
    /// order of the activations' paired layout; so one `vpmaddwd` and one `vpdpwssd` (or a
    /// second `vpmaddwd` and an add) give both blocks' integer sums, in the low and high
    /// halves of one register, scaled there by a vector holding each block's `d_w·d_x` in its
    /// half. Block headers come sixteen at a time with one gather (a masked one for the rest of
    /// the row), and the weights are prefetched [`PREFETCH`] bytes ahead. On a 2-core Intel
    /// Xeon (AVX-512 VNNI) this read 12 GB/s of a cache-resident 1536×576 matrix where the
    /// one-block kernel read 8.4, and 9 GB/s from memory on one thread where it read 5.1.
    #[inline(always)]
    unsafe fn row_dot_q4_1_avx512<const VNNI: bool>(w: &[u8], x: ActRow<'_>) -> f32 {
        const G: usize = 16;
        const BB: usize = 20;
        let nb = w.len() / BB;
        let wp = w.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 2];
        let offsets = _mm512_setr_epi32(0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220, 240, 260, 280, 300);
        let m4 = _mm512_set1_epi16(0x0F);
        // Lane i of a pair's scale vector takes scale 2·pair + (i >= 8) of the group's sixteen.
        let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let two = _mm512_set1_epi32(2);
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(G);
            let mask: __mmask16 = if n == G { 0xFFFF } else { (1u16 << n) - 1 };
            let h =
                _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, offsets, wp.add(b0 * BB) as *const i32);
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
            let scales = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(mask, x.d.as_ptr().add(b0)));
            // The minimum terms m_w·(d_x·Σq_x), one lane per block.
            let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
            acc[1] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(mask, x.s.as_ptr().add(b0)), acc[1]);
            let mut sel = halves;
            for i in 0..n / 2 {
                let b = b0 + 2 * i;
                let p = wp.add(b * BB);
                prefetch(wp, b * BB);
                let raw = _mm256_loadu2_m128i(p.add(BB + 4) as *const __m128i, p.add(4) as *const __m128i);
                let v = _mm512_cvtepu8_epi16(raw);
                let (lo, hi) = (_mm512_and_si512(v, m4), _mm512_srli_epi16(v, 4));
                let xq = x.paired.as_ptr().add(b * BLOCK);
                let xl = _mm512_loadu_si512(xq as *const _);
                let xh = _mm512_loadu_si512(xq.add(BLOCK) as *const _);
                let sum = if VNNI {
                    _mm512_dpwssd_epi32(_mm512_madd_epi16(lo, xl), hi, xh)
                } else {
                    _mm512_add_epi32(_mm512_madd_epi16(lo, xl), _mm512_madd_epi16(hi, xh))
                };
                let scale = _mm512_permutexvar_ps(sel, scales);
                sel = _mm512_add_epi32(sel, two);
                acc[i % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[i % 2]);
            }
            if n % 2 == 1 {
                // The row's odd last block, alone (its activations are unpaired too).
                let b = b0 + n - 1;
                let scale = _mm512_permutexvar_ps(_mm512_set1_epi32(n as i32 - 1), scales);
                acc[0] = _mm512_fmadd_ps(block_sum_avx512(QType::Q4_1, wp.add(b * BB), &x, b), scale, acc[0]);
            }
            b0 += n;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    /// Bytes ahead of the block being read that the row kernels prefetch: the hardware
    /// prefetcher alone kept a decoding thread at ~5 GB/s on a 2-core Intel Xeon, 4 KB ahead it
    /// read 9 (512 B: 6.3, 2 KB: 8.0, 8 KB: 8.5).
    const PREFETCH: usize = 4096;

    /// Prefetches the cache line [`PREFETCH`] bytes after `base + at` (a hint: an address past
    /// the matrix row is never read, only its line requested).
    #[inline(always)]
    unsafe fn prefetch(base: *const u8, at: usize) {
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at + PREFETCH) as *const i8);
    }

    /// One block at a time (any block type), sixteen blocks' scales at a time. Safety: as
    /// [`dots_avx512`].
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn row_dot_blocks_avx512(qtype: QType, w: &[u8], x: ActRow<'_>) -> f32 {
        const G: usize = 16;
        let bb = qtype.block_bytes();
        let nb = w.len() / bb;
        let wp = w.as_ptr();
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut min_acc = _mm512_setzero_ps();
        let mut scales = [0f32; G];
        let mut headers = [0u32; G];
        let mut b0 = 0;
        while b0 + G <= nb {
            for (i, h) in headers.iter_mut().enumerate() {
                *h = header(wp.add((b0 + i) * bb));
            }
            let h = _mm512_loadu_si512(headers.as_ptr() as *const _);
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
            let dx = _mm512_loadu_ps(x.d.as_ptr().add(b0));
            _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_mul_ps(dw, dx));
            if qtype == QType::Q4_1 {
                let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
                min_acc = _mm512_fmadd_ps(mw, _mm512_loadu_ps(x.s.as_ptr().add(b0)), min_acc);
            }
            // Two accumulators (named, so that they stay in registers): one chain of FMAs
            // would wait on its latency every block.
            for i in (0..G).step_by(2) {
                let (b, s) = (b0 + i, scales.as_ptr().add(i));
                prefetch(wp, b * bb);
                prefetch(wp, b * bb + 64);
                acc0 = _mm512_fmadd_ps(block_sum_avx512(qtype, wp.add(b * bb), &x, b), _mm512_set1_ps(*s), acc0);
                let b = b + 1;
                acc1 = _mm512_fmadd_ps(
                    block_sum_avx512(qtype, wp.add(b * bb), &x, b),
                    _mm512_set1_ps(*s.add(1)),
                    acc1,
                );
            }
            b0 += G;
        }
        let mut min_tail = 0f32;
        for b in b0..nb {
            let p = wp.add(b * bb);
            let scale = _mm512_set1_ps(f16_ptr(p) * *x.d.get_unchecked(b));
            acc0 = _mm512_fmadd_ps(block_sum_avx512(qtype, p, &x, b), scale, acc0);
            if qtype == QType::Q4_1 {
                min_tail += f16_ptr(p.add(2)) * *x.s.get_unchecked(b);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + _mm512_reduce_add_ps(min_acc) + min_tail
    }

    /// The integer dot product of block `b` (weights at `p`) with the activation row's block
    /// `b`, as 16 f32 lanes.
    #[inline(always)]
    unsafe fn block_sum_avx512(qtype: QType, p: *const u8, x: &ActRow<'_>, b: usize) -> __m512 {
        let w16 = match qtype {
            QType::Q4_1 => _mm512_cvtepu8_epi16(q4_1_unpack(p)),
            QType::Q8_0 => _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(2) as *const __m256i)),
        };
        let xq = _mm512_loadu_si512(x.qs.as_ptr().add(b * BLOCK) as *const _);
        _mm512_cvtepi32_ps(_mm512_madd_epi16(w16, xq))
    }

    /// Safety: the CPU has AVX-512 F/BW, AVX2, FMA and F16C; every activation row has
    /// `w.len() / block_bytes` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dots_avx512<const N: usize>(qtype: QType, w: &[u8], x: [ActRow<'_>; N]) -> [f32; N] {
        let bb = qtype.block_bytes();
        let nb = w.len() / bb;
        let mut acc = [_mm512_setzero_ps(); N];
        let mut min_acc = [0f32; N];
        let wp = w.as_ptr();
        for b in 0..nb {
            let p = wp.add(b * bb);
            let dw = f16_ptr(p);
            let w16 = match qtype {
                QType::Q4_1 => _mm512_cvtepu8_epi16(q4_1_unpack(p)),
                QType::Q8_0 => _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(2) as *const __m256i)),
            };
            for t in 0..N {
                let xq = _mm512_loadu_si512(x[t].qs.as_ptr().add(b * BLOCK) as *const _);
                let sum = _mm512_madd_epi16(w16, xq);
                let scale = _mm512_set1_ps(dw * *x[t].d.get_unchecked(b));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[t]);
            }
            add_min_terms(qtype, p, &x, b, &mut min_acc);
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = _mm512_reduce_add_ps(acc[t]) + min_acc[t];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * scale).collect()
    }

    /// Reference: dequantized weights times dequantized activations, in f64.
    fn reference(w: &QMatrix, x: &QActivations) -> Vec<f64> {
        let wf = w.dequantize();
        let mut out = vec![0f64; x.tokens * w.rows];
        for t in 0..x.tokens {
            let xr = x.row(t);
            for r in 0..w.rows {
                let mut s = 0f64;
                for c in 0..w.cols {
                    s += wf[r * w.cols + c] as f64 * (xr.d[c / BLOCK] * xr.qs[c] as f32) as f64;
                }
                out[t * w.rows + r] = s;
            }
        }
        out
    }

    /// Every kernel (the scalar one included, whatever the CPU) against the f64 sum of the
    /// dequantized operands, over odd and even block counts, one token and prompt-sized
    /// blocks of tokens (full tiles and every remainder), both block types, and weights with
    /// extreme values (all-negative Q8_0 blocks with -128-free rounding, zero blocks).
    #[test]
    fn every_kernel_matches_dequantize_then_dot() {
        let mut rng = Rng::new(7);
        let kernels = Kernel::available();
        eprintln!("kernels on this CPU: {kernels:?}");
        for qtype in [QType::Q4_1, QType::Q8_0] {
            for (rows, cols, tokens) in [
                (1, 32, 1),
                (3, 64, 1),
                (17, 96, 2),
                (40, 160, 5),
                (64, 576, 7),
                (33, 1536, 1),
                (19, 32, 4),
                (21, 64, 11),
                (9, 96, 16),
                (5, 128, 23),
                (130, 96, 3),
            ] {
                let mut wv = random(&mut rng, rows * cols, 0.3);
                // A zero block and a block of one sign.
                wv[..BLOCK].iter_mut().for_each(|v| *v = 0.0);
                if rows > 1 {
                    wv[cols..cols + BLOCK].iter_mut().for_each(|v| *v = -v.abs() - 0.01);
                }
                let w = QMatrix::quantize(qtype, rows, cols, &wv).unwrap();
                let mut xv = random(&mut rng, tokens * cols, 2.0);
                xv[cols - BLOCK..cols].iter_mut().for_each(|v| *v *= 100.0);
                let x = QActivations::quantize(&xv, tokens, cols).unwrap();
                let want = reference(&w, &x);
                for &kernel in &kernels {
                    let mut got = vec![f32::NAN; tokens * rows];
                    matmul(&w, &x, &mut got, kernel).unwrap();
                    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                        let tol = 1e-4 * (1.0 + r.abs()) + 1e-5 * cols as f64;
                        assert!(
                            (*g as f64 - r).abs() <= tol,
                            "{qtype:?} {kernel:?} {rows}x{cols}x{tokens} at {i}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    /// The same products on a pool of several threads (rows split into chunks) equal the
    /// single-threaded ones bit for bit: each output is computed by one task in one order.
    /// The prompt path: panels of dequantized rows through gemm equal the f64 products of the
    /// dequantized weights with the unquantized activations (no 16-bit rounding on this path),
    /// for row counts around the panel size.
    #[test]
    fn dequantized_panels_match_f64_products() {
        let mut rng = Rng::new(5);
        for qtype in [QType::Q4_1, QType::Q8_0] {
            for (rows, cols, tokens) in [(1, 32, 1), (63, 64, 16), (64, 96, 17), (130, 576, 20)] {
                let w = QMatrix::quantize(qtype, rows, cols, &random(&mut rng, rows * cols, 0.3)).unwrap();
                let x = random(&mut rng, tokens * cols, 2.0);
                let wf = w.dequantize();
                let mut got = vec![f32::NAN; tokens * rows];
                matmul_f32(&w, &x, tokens, &mut got).unwrap();
                for t in 0..tokens {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64)
                            .sum();
                        let g = got[t * rows + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{qtype:?} {rows}x{cols} t{t} r{r}: {g} vs {want}"
                        );
                    }
                }
            }
        }
        let w = QMatrix::quantize(QType::Q8_0, 2, 32, &[0.5; 64]).unwrap();
        assert!(matmul_f32(&w, &[1.0; 31], 1, &mut [0.0; 2]).is_err());
        assert!(matmul_f32(&w, &[1.0; 32], 1, &mut [0.0; 3]).is_err());
    }

    /// Every kernel's vector dequantization gives the scalar one's bits (a product and a sum, no
    /// fused multiply-add), for whole rows and for column ranges of whole blocks.
    #[test]
    fn every_kernel_dequantizes_to_the_same_bits() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (5, 256);
        for qtype in [QType::Q4_1, QType::Q8_0] {
            let w = QMatrix::quantize(qtype, rows, cols, &random(&mut rng, rows * cols, 3.0)).unwrap();
            let want = w.dequantize();
            for kernel in Kernel::available() {
                let mut got = vec![f32::NAN; rows * cols];
                w.dequantize_rows(kernel, 0, rows, &mut got);
                assert_eq!(got, want, "{qtype:?} {kernel:?} rows");
                let (c0, n) = (64, 96);
                let mut cols_got = vec![f32::NAN; rows * n];
                w.dequantize_columns(kernel, c0, n, &mut cols_got);
                for r in 0..rows {
                    assert_eq!(
                        cols_got[r * n..(r + 1) * n],
                        want[r * cols + c0..r * cols + c0 + n],
                        "{qtype:?} {kernel:?} columns"
                    );
                }
            }
        }
    }

    /// The ways a panel product is divided cover every token and every row (or block of
    /// columns) exactly once: tokens split only when there are enough of them and threads to
    /// share, panels within the size bounds and of whole blocks where asked.
    #[test]
    fn splits_cover_every_token_and_row() {
        for (tokens, width, depth, align, threads) in [
            (1024, 576, 576, 1, 2),
            (1024, 1536, 576, 1, 2),
            (1024, 576, 1536, 32, 2),
            (16, 576, 576, 1, 2),
            (5000, 8192, 3072, 32, 16),
            (127, 100, 64, 1, 2),
            (300, 64, 32, 32, 1),
        ] {
            let s = Split::new(tokens, width, depth, align, threads);
            assert!(
                s.chunks * s.chunk >= tokens && (s.chunks - 1) * s.chunk < tokens,
                "{s:?}"
            );
            assert!(s.panels * s.panel >= width && (s.panels - 1) * s.panel < width, "{s:?}");
            assert!(s.panel % align == 0 || s.panel == width, "{s:?}");
            assert!(s.chunk <= CHUNK_TOKENS || s.chunks == 1, "{s:?}");
            if threads == 1 || tokens < SPLIT_TOKENS {
                assert_eq!(s.chunks, 1, "{s:?}");
            }
        }
        assert_eq!(Split::new(1024, 576, 576, 1, 2).chunks, 2);
    }

    /// Panel products of training shapes (more tokens than [`SPLIT_TOKENS`], so split by tokens,
    /// and matrices wider than one panel) and prompt shapes, forward and backward, against f64
    /// products of the dequantized weights.
    #[test]
    fn panel_products_forward_and_backward_match_f64() {
        let mut rng = Rng::new(13);
        for (qtype, rows, cols, tokens) in [
            (QType::Q4_1, 300, 2048, 200),
            (QType::Q8_0, 2048, 256, 150),
            (QType::Q8_0, 96, 64, 40),
            (QType::Q4_1, 40, 96, 1),
        ] {
            let w = QMatrix::quantize(qtype, rows, cols, &random(&mut rng, rows * cols, 0.3)).unwrap();
            let wf = w.dequantize();
            let x = random(&mut rng, tokens * cols, 2.0);
            let g = random(&mut rng, tokens * rows, 1.0);
            let mut y = vec![f32::NAN; tokens * rows];
            matmul_f32(&w, &x, tokens, &mut y).unwrap();
            let mut dx = vec![f32::NAN; tokens * cols];
            matmul_f32_backward(&w, &g, tokens, &mut dx).unwrap();
            for t in 0..tokens {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| wf[r * cols + c] as f64 * x[t * cols + c] as f64)
                        .sum();
                    let got = y[t * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{qtype:?} {rows}x{cols} y[{t},{r}]"
                    );
                }
                for c in 0..cols {
                    let want: f64 = (0..rows)
                        .map(|r| g[t * rows + r] as f64 * wf[r * cols + c] as f64)
                        .sum();
                    let got = dx[t * cols + c] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{qtype:?} {rows}x{cols} dx[{t},{c}]"
                    );
                }
            }
        }
    }

    #[test]
    fn threads_change_nothing() {
        let mut rng = Rng::new(3);
        let (rows, cols) = (301, 192);
        let w = QMatrix::quantize(QType::Q4_1, rows, cols, &random(&mut rng, rows * cols, 1.0)).unwrap();
        for tokens in [1, 6] {
            let x = QActivations::quantize(&random(&mut rng, tokens * cols, 1.0), tokens, cols).unwrap();
            let kernel = Kernel::detect();
            let mut one = vec![0f32; tokens * rows];
            let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            single.install(|| matmul(&w, &x, &mut one, kernel)).unwrap();
            let mut three = vec![0f32; tokens * rows];
            let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            pool.install(|| matmul(&w, &x, &mut three, kernel)).unwrap();
            assert_eq!(one, three);
        }
    }

    /// The AVX-512 Q4_1 row kernel gives the same bits with and without VNNI (the integer sums
    /// are exact either way), and the grouped product of several matrices (one job over the
    /// threads) gives each matrix's own product bit for bit.
    #[test]
    fn vnni_and_grouped_products_change_nothing() {
        let mut rng = Rng::new(17);
        let cols = 576 + 64 + 32; // 21 blocks: a full group of 16, two pairs and an odd block
        let w = QMatrix::quantize(QType::Q4_1, 3, cols, &random(&mut rng, 3 * cols, 0.5)).unwrap();
        let x = QActivations::quantize(&random(&mut rng, cols, 2.0), 1, cols).unwrap();
        #[cfg(target_arch = "x86_64")]
        if Kernel::available().contains(&Kernel::Avx512) && x86::has_vnni() {
            for r in 0..3 {
                // SAFETY: AVX-512 and VNNI checked above; one row of the activations' width.
                let (a, b) = unsafe {
                    (
                        x86::row_dot_q4_1_vnni(w.row_data(r), x.row(0)),
                        x86::row_dot_q4_1_no_vnni(w.row_data(r), x.row(0)),
                    )
                };
                assert_eq!(a, b);
            }
        }
        let v = QMatrix::quantize(QType::Q8_0, 70, cols, &random(&mut rng, 70 * cols, 0.5)).unwrap();
        for kernel in Kernel::available() {
            let (mut one, mut two) = (vec![0f32; 3], vec![0f32; 70]);
            matmul_group(&mut [(&w, &mut one), (&v, &mut two)], &x, kernel).unwrap();
            let (mut a, mut b) = (vec![0f32; 3], vec![0f32; 70]);
            matmul(&w, &x, &mut a, kernel).unwrap();
            matmul(&v, &x, &mut b, kernel).unwrap();
            assert_eq!((one, two), (a, b), "{kernel:?}");
        }
        let mut short = vec![0f32; 2];
        assert!(matmul_group(&mut [(&w, &mut short)], &x, Kernel::Scalar).is_err());
    }

    /// Quantization round trips follow llama.cpp's definitions: Q8_0 is within half a step of
    /// the input, Q4_1 within half a step of its 16 levels between the block's min and max,
    /// and activation blocks keep `s = d·Σq`.
    #[test]
    fn quantization_errors_stay_within_half_a_step() {
        let mut rng = Rng::new(11);
        let (rows, cols) = (5, 128);
        let v = random(&mut rng, rows * cols, 3.0);
        for qtype in [QType::Q8_0, QType::Q4_1] {
            let m = QMatrix::quantize(qtype, rows, cols, &v).unwrap();
            assert_eq!(m.data().len(), rows * cols / BLOCK * qtype.block_bytes());
            let back = m.dequantize();
            for (block, got) in v.chunks(BLOCK).zip(back.chunks(BLOCK)) {
                let (lo, hi) = block
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
                let step = match qtype {
                    QType::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                    QType::Q4_1 => (hi - lo) / 15.0,
                };
                for (a, b) in block.iter().zip(got) {
                    // f16 scales and minimums add a relative error of ~5e-4 each.
                    let tol = 0.5 * step + 1e-3 * (lo.abs() + hi.abs()) + 1e-2 * step;
                    assert!((a - b).abs() <= tol, "{qtype:?}: {a} vs {b}");
                }
            }
        }
        let x = QActivations::quantize(&v, rows, cols).unwrap();
        for b in 0..x.d.len() {
            let sum: i32 = x.qs[b * BLOCK..(b + 1) * BLOCK].iter().map(|&q| q as i32).sum();
            assert_eq!(x.s[b], x.d[b] * sum as f32);
            let amax = v[b * BLOCK..(b + 1) * BLOCK].iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(
                x.qs[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .any(|q| q.unsigned_abs() == 32767)
                    || amax == 0.0
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        assert_eq!(
            QMatrix::from_blocks(QType::Q4_1, 2, 48, vec![0; 60]).unwrap_err(),
            QError::Columns { rows: 2, cols: 48 }
        );
        let err = QMatrix::from_blocks(QType::Q8_0, 2, 64, vec![0; 100]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a 2x64 Q8_0 matrix needs 136 bytes of blocks, found 100"
        );
        let w = QMatrix::quantize(QType::Q8_0, 2, 64, &[0.5; 128]).unwrap();
        let x = QActivations::quantize(&[1.0; 32], 1, 32).unwrap();
        let err = matmul(&w, &x, &mut [0.0; 2], Kernel::Scalar).unwrap_err();
        assert_eq!(err.to_string(), "activation columns: expected 64 values, found 32");
        let x = QActivations::quantize(&[1.0; 64], 1, 64).unwrap();
        assert!(matmul(&w, &x, &mut [0.0; 3], Kernel::Scalar).is_err());
        assert!(w.permute_rows(&[0, 0]).is_err());
        assert!(w.dequantize_row(2, &mut [0.0; 64]).is_err());
    }

    /// Moving whole rows of blocks moves exactly the dequantized rows.
    #[test]
    fn permuted_rows_are_the_same_weights() {
        let mut rng = Rng::new(5);
        let w = QMatrix::quantize(QType::Q4_1, 4, 64, &random(&mut rng, 256, 1.0)).unwrap();
        let p = w.permute_rows(&[2, 0, 3, 1]).unwrap();
        let (a, b) = (w.dequantize(), p.dequantize());
        for (i, &from) in [2, 0, 3, 1].iter().enumerate() {
            assert_eq!(b[i * 64..(i + 1) * 64], a[from * 64..(from + 1) * 64]);
        }
    }
}
