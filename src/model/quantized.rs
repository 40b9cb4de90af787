//! Chat straight from a quantized GGUF file: the weight matrices stay in their GGUF blocks and
//! every matrix product runs on Finch's own integer kernels ([`crate::kernels::quant`]), so a Q4_1
//! model reads ~6x less memory per token than the dequantized f32 model. Llama, Qwen2, Qwen3 and
//! Gemma 3 families (Llama 3 rope scaling included; Gemma's norms are stored by llama.cpp as
//! `1 + w`, which is the factor they multiply by here). A LoRA adapter is applied unmerged in f32
//! (`y += scale·(x·Aᵀ)·Bᵀ` on the product's f32 input), as the f32 model applies it.
//!
//! The forward is the f32 [`crate::model::Transformer`]'s, step for step (RMSNorm, rotate-half
//! rope, grouped-query attention, SwiGLU, tied or separate output head), on plain `f32` buffers
//! with its own KV cache. llama.cpp stores Llama's q/k projection rows permuted for its
//! interleaved rope; whole rows of blocks are moved back at load (as the dequantizing loader
//! does for f32), so both paths use the same weights and the same rope. The only numerical
//! difference from the f32 model on the same file is the 16-bit quantization of the activations
//! entering each product (per 32 values; see [`crate::kernels::quant`] for why not 8): logits agree
//! to ~0.01 and greedy answers are the f32 model's.
//!
//! Matrices stored as Q4_1 or Q8_0 are used as they are; matrices of other types (F32, F16,
//! Q4_0, K-quants…) are dequantized and re-quantized to Q8_0 at load (error below 0.4% of a
//! block's largest weight). The token embedding is read one row per token (dequantized).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::quant::{self, Kernel, QActivations, QMatrix, QType};
use crate::lora::Target;
use crate::model::cached_attention::{over_cache, CacheHeads, KvView};
use crate::model::config::{Activation, LayerType, ModelConfig};
use crate::model::decoder::Decoder;
use crate::model::gguf::{hf_rows_from_gguf, GgufModel};

/// One adapted projection: `y += scale·(x·Aᵀ)·Bᵀ`, `a: [r, in]`, `b: [out, r]`, f32.
struct LowRank {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scale: f32,
}

impl LowRank {
    /// Adds the update for the `[t, in]` input `x` to the `[t, out]` output `y`.
    fn add_to(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        use crate::kernels::gemm::{gemm_into_on, Mat};
        let k = self.a.len() / self.r;
        let out = self.b.len() / self.r;
        let t = x.len() / k;
        // The rank-r products are small: one thread (as the f32 path's LoRA op for decoding).
        let threads = if t * self.r * (k + out) < 1 << 20 {
            1
        } else {
            crate::kernels::cpu::threads()
        };
        let mut h = vec![0f32; t * self.r];
        gemm_into_on(
            &mut h,
            false,
            Mat::row_major(x, t, k),
            Mat::row_major(&self.a, self.r, k).t(),
            threads,
        )?;
        h.iter_mut().for_each(|v| *v *= self.scale);
        gemm_into_on(
            y,
            true,
            Mat::row_major(&h, t, self.r),
            Mat::row_major(&self.b, out, self.r).t(),
            threads,
        )?;
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    q: QMatrix,
    k: QMatrix,
    v: QMatrix,
    /// Qwen2's q/k/v biases.
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Qwen3's per-head RMS norm weights for q and k (`[head_dim]` each), before rotary.
    qk_norm: Option<[Vec<f32>; 2]>,
    o: QMatrix,
    /// Gemma: norms of the attention and MLP outputs before the residual add.
    attn_out_norm: Option<Vec<f32>>,
    ffn_out_norm: Option<Vec<f32>>,
    /// Gemma 3: this layer sees only the last `window` positions.
    window: Option<usize>,
    /// Gemma 3: this layer uses the local (sliding) rotary tables.
    local_rope: bool,
    /// SmolLM3's NoPE layers apply no rotary embeddings.
    rope: bool,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// An adapter's update per projection of one layer, in [`Target::ALL`] order (a fused
/// adapter, Phi-3's `qkv_proj` or `gate_up_proj`, is held as the updates of its parts).
type LayerLora = [Option<LowRank>; 7];

/// The place of split projection `t` in [`LayerLora`].
fn slot(t: Target) -> Option<usize> {
    Target::ALL.iter().position(|&x| x == t)
}

impl Layer {
    /// Split projection `t` (q, k, v, o, gate, up or down).
    fn matrix(&self, t: Target) -> Option<&QMatrix> {
        match t {
            Target::Q => Some(&self.q),
            Target::K => Some(&self.k),
            Target::V => Some(&self.v),
            Target::O => Some(&self.o),
            Target::Gate => Some(&self.gate),
            Target::Up => Some(&self.up),
            Target::Down => Some(&self.down),
            Target::Qkv | Target::GateUp => None,
        }
    }
}

/// A fused projection's parts, as `(split target, first row, rows)` of its output.
fn fused_parts(cfg: &ModelConfig, t: Target) -> Vec<(Target, usize, usize)> {
    let (q_dim, kv_dim) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let i = cfg.intermediate_size;
    match t {
        Target::Qkv => vec![
            (Target::Q, 0, q_dim),
            (Target::K, q_dim, kv_dim),
            (Target::V, q_dim + kv_dim, kv_dim),
        ],
        Target::GateUp => vec![(Target::Gate, 0, i), (Target::Up, i, i)],
        other => vec![(other, 0, 0)],
    }
}

/// Keys and values of one layer, `[position, kv_heads * head_dim]` row-major.
#[derive(Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The weights of a quantized model (shared by its forks).
struct Weights {
    cfg: ModelConfig,
    embed: QMatrix,
    /// `None`: the output head is the token embedding (tied).
    output: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    /// Phi-3 LongRoPE: the frequencies of forwards past `original_max_position_embeddings`.
    long_inv_freq: Option<Vec<f32>>,
    /// Gemma 3's sliding layers' rotary frequencies.
    local_inv_freq: Option<Vec<f32>>,
}

/// A GGUF model run without dequantizing its matrices. [`QuantizedModel::fork`] gives another
/// decoder over the same weights (and adapter) with its own cache, for concurrent answers.
pub struct QuantizedModel {
    w: Arc<Weights>,
    /// Per layer; empty without an adapter.
    lora: Arc<Vec<LayerLora>>,
    cache: Vec<LayerCache>,
    position: usize,
    /// The token ids behind the cached positions (LongRoPE recomputes them once, when a
    /// sequence first passes the pretraining context, as the f32 model does).
    ids: Vec<u32>,
    context_len: usize,
    kernel: Kernel,
    /// Diagnostic mode ([`QuantizedModel::set_exact_activations`]): every matrix dequantized
    /// to f32 (keyed by the address of its blocks) and multiplied with f32 activations.
    exact: Option<Arc<HashMap<usize, Vec<f32>>>>,
}

impl QuantizedModel {
    /// Opens the GGUF file `path`; `cfg` is the model's configuration (from `ModelFiles`).
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        if !path.is_file() || !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Err(Error::invalid(
                path,
                "model",
                "the quantized path needs a .gguf file (safetensors models run in f32)",
            ));
        }
        let gguf = GgufModel::open(path)?;
        let mut reader = Reader {
            gguf: &gguf,
            file: File::open(path).map_err(|e| Error::io(path, "cannot open GGUF file", e))?,
        };
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let permuted = matches!(gguf.architecture()?.as_str(), "llama" | "smollm3");
        let fused = cfg.family.fused_projections();
        let i = cfg.intermediate_size;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let name = |m: &str| format!("blk.{l}.{m}");
            // Phi-3 (llama.cpp `phi3`): q, k, v in one `attn_qkv` and gate, up in one `ffn_up`
            // (gate rows first), split here by whole rows of blocks.
            let (mut q, mut k, v, gate, up) = if fused {
                let qkv_name = name("attn_qkv.weight");
                let qkv = reader.matrix(&qkv_name, q_dim + 2 * kv_dim, h)?;
                let up_name = name("ffn_up.weight");
                let gate_up = reader.matrix(&up_name, 2 * i, h)?;
                let part = |m: &QMatrix, at: usize, n: usize, what: &str| {
                    m.row_range(at, n).map_err(|e| reader.invalid(what, e))
                };
                (
                    part(&qkv, 0, q_dim, &qkv_name)?,
                    part(&qkv, q_dim, kv_dim, &qkv_name)?,
                    part(&qkv, q_dim + kv_dim, kv_dim, &qkv_name)?,
                    part(&gate_up, 0, i, &up_name)?,
                    part(&gate_up, i, i, &up_name)?,
                )
            } else {
                (
                    reader.matrix(&name("attn_q.weight"), q_dim, h)?,
                    reader.matrix(&name("attn_k.weight"), kv_dim, h)?,
                    reader.matrix(&name("attn_v.weight"), kv_dim, h)?,
                    reader.matrix(&name("ffn_gate.weight"), i, h)?,
                    reader.matrix(&name("ffn_up.weight"), i, h)?,
                )
            };
            let mut qkv_bias = if cfg.qkv_bias {
                Some([
                    reader.vector(&name("attn_q.bias"), q_dim)?,
                    reader.vector(&name("attn_k.bias"), kv_dim)?,
                    reader.vector(&name("attn_v.bias"), kv_dim)?,
                ])
            } else {
                None
            };
            if permuted {
                let qp = hf_rows_from_gguf(cfg.num_attention_heads, hd);
                let kp = hf_rows_from_gguf(cfg.num_key_value_heads, hd);
                q = q
                    .permute_rows(&qp)
                    .map_err(|e| reader.invalid(&name("attn_q.weight"), e))?;
                k = k
                    .permute_rows(&kp)
                    .map_err(|e| reader.invalid(&name("attn_k.weight"), e))?;
                if let Some([qb, kb, _]) = &mut qkv_bias {
                    *qb = qp.iter().map(|&r| qb[r]).collect();
                    *kb = kp.iter().map(|&r| kb[r]).collect();
                }
            }
            layers.push(Layer {
                attn_norm: reader.vector(&name("attn_norm.weight"), h)?,
                q,
                k,
                v,
                qkv_bias,
                qk_norm: if cfg.qk_norm {
                    Some([
                        reader.vector(&name("attn_q_norm.weight"), hd)?,
                        reader.vector(&name("attn_k_norm.weight"), hd)?,
                    ])
                } else {
                    None
                },
                o: reader.matrix(&name("attn_output.weight"), h, q_dim)?,
                attn_out_norm: if cfg.sandwich_norms {
                    Some(reader.vector(&name("post_attention_norm.weight"), h)?)
                } else {
                    None
                },
                ffn_out_norm: if cfg.sandwich_norms {
                    Some(reader.vector(&name("post_ffw_norm.weight"), h)?)
                } else {
                    None
                },
                window: cfg.window(l),
                local_rope: cfg.layer_type(l) == LayerType::SlidingAttention && cfg.rope_local_theta.is_some(),
                rope: cfg.uses_rope(l),
                ffn_norm: reader.vector(&name("ffn_norm.weight"), h)?,
                gate,
                up,
                down: reader.matrix(&name("ffn_down.weight"), h, i)?,
            });
        }
        if cfg.o_bias || cfg.mlp_bias {
            return Err(Error::invalid(
                path,
                "model",
                "o_proj/MLP biases are not supported by the quantized path; run it in f32",
            ));
        }
        let embed = reader.matrix("token_embd.weight", cfg.vocab_size, h)?;
        let output = if gguf.content().tensor_infos.contains_key("output.weight") {
            Some(reader.matrix("output.weight", cfg.vocab_size, h)?)
        } else {
            None
        };
        let norm = reader.vector("output_norm.weight", h)?;
        Ok(QuantizedModel {
            w: Arc::new(Weights {
                cfg: cfg.clone(),
                embed,
                output,
                norm,
                layers,
                inv_freq: crate::model::transformer::rope_inv_freq(cfg),
                long_inv_freq: cfg
                    .longrope
                    .as_ref()
                    .map(|_| crate::model::transformer::rope_inv_freq_for_len(cfg, usize::MAX)),
                local_inv_freq: cfg
                    .rope_local_theta
                    .map(|theta| crate::model::transformer::default_inv_freq(cfg.rotary_dims(), theta)),
            }),
            lora: Arc::new(Vec::new()),
            cache: vec![],
            position: 0,
            ids: vec![],
            context_len: cfg.max_position_embeddings,
            kernel: Kernel::detect(),
            exact: None,
        })
    }

    /// Another decoder over the same weights and adapter (nothing copied) with an empty cache.
    pub fn fork(&self) -> QuantizedModel {
        QuantizedModel {
            w: self.w.clone(),
            lora: self.lora.clone(),
            cache: vec![],
            position: 0,
            ids: vec![],
            context_len: self.context_len,
            kernel: self.kernel,
            exact: self.exact.clone(),
        }
    }

    /// Bytes of quantized weight blocks one token's forward reads: every layer's seven
    /// matrices and the output head (one embedding row is negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        let head = self.w.output.as_ref().unwrap_or(&self.w.embed);
        let layers: usize = self
            .w
            .layers
            .iter()
            .map(|l| {
                Target::ALL
                    .iter()
                    .filter_map(|&t| l.matrix(t))
                    .map(|m| m.data().len())
                    .sum::<usize>()
            })
            .sum();
        layers + head.data().len()
    }

    /// Uses `kernel` for every product (tests compare kernels; the default is the fastest).
    pub fn set_kernel(&mut self, kernel: Kernel) {
        self.kernel = kernel;
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Applies the adapter at `path` (a PEFT folder, Finch's or Python PEFT's, or a `finch
    /// train` run folder) unmerged, replacing any
    /// adapter set before. Its q/k rows are in Hugging Face order, as this model's are.
    pub fn set_adapter(&mut self, path: &Path) -> Result<()> {
        let dir = &crate::lora::resolve_adapter_dir(path)?;
        let adapter = crate::lora::load_adapter(dir, &Device::Cpu)?;
        let cfg = &adapter.config;
        let mut lora: Vec<LayerLora> = (0..self.w.layers.len()).map(|_| Default::default()).collect();
        let mut used = 0;
        let model_cfg = &self.w.cfg;
        for (l, layer) in self.w.layers.iter().enumerate() {
            for &t in Target::all_for(model_cfg.family.fused_projections()) {
                let module = t.module_path(l);
                let Some((a, b)) = adapter.weights.get(&module) else {
                    continue;
                };
                let parts = fused_parts(model_cfg, t);
                let first = layer
                    .matrix(parts[0].0)
                    .ok_or_else(|| Error::invalid(dir, format!("module `{module}`"), "has no matrix in this model"))?;
                let (cols, rows) = match t {
                    Target::Qkv | Target::GateUp => (first.cols(), parts.iter().map(|p| p.2).sum()),
                    _ => (first.cols(), first.rows()),
                };
                if a.dims() != [cfg.r, cols] || b.dims() != [rows, cfg.r] {
                    return Err(Error::ShapeMismatch {
                        path: dir.to_path_buf(),
                        tensor: format!("{module}.lora_A/lora_B"),
                        expected: vec![cfg.r, cols, rows, cfg.r],
                        found: [a.dims(), b.dims()].concat(),
                    });
                }
                let values = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>();
                let (a, b) = (values(a)?, values(b)?);
                // A fused adapter `B·A` over stacked outputs is, part by part, `B[rows]·A`.
                for (part, start, n) in parts {
                    let (start, n) = if n == 0 { (0, rows) } else { (start, n) };
                    let Some(s) = slot(part) else { continue };
                    lora[l][s] = Some(LowRank {
                        a: a.clone(),
                        b: b[start * cfg.r..(start + n) * cfg.r].to_vec(),
                        r: cfg.r,
                        scale: cfg.scale() as f32,
                    });
                }
                used += 1;
            }
        }
        if used != adapter.weights.len() {
            return Err(Error::invalid(
                dir,
                "adapter",
                format!(
                    "{} of its {} LoRA modules do not exist in this model (was it trained for another base model?)",
                    adapter.weights.len() - used,
                    adapter.weights.len()
                ),
            ));
        }
        self.lora = Arc::new(lora);
        Ok(())
    }

    /// Removes the adapter: the base model again.
    pub fn clear_adapter(&mut self) {
        self.lora = Arc::new(Vec::new());
    }

    /// Diagnostic mode: `true` dequantizes every matrix to f32 (~4 bytes per weight) and runs
    /// the products on f32 activations, so the forward computes exactly what the f32 model
    /// computes from the same file. Tests use it to tell a forward bug from the rounding of
    /// the 8-bit activations; `false` returns to the integer kernels.
    pub fn set_exact_activations(&mut self, exact: bool) {
        let w = &self.w;
        self.exact = exact.then(|| {
            let mut all: Vec<&QMatrix> = vec![&w.embed];
            all.extend(w.output.as_ref());
            for l in &w.layers {
                all.extend([&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
            }
            Arc::new(all.into_iter().map(|m| (matrix_key(m), m.dequantize())).collect())
        });
    }

    /// Runs `ids` after the cached positions; returns the logits of the last position
    /// (`all = false`, `[vocab]`) or of every new position (`[ids.len() * vocab]`).
    pub fn forward(&mut self, ids: &[u32], all: bool) -> Result<Vec<f32>> {
        if ids.len() == 1 {
            // One token: its products split over the spin pool (see `kernels::spin`).
            return crate::kernels::spin::without_rayon(|| self.forward_here(ids, all));
        }
        match quant::pool() {
            Some(pool) => pool.install(|| self.forward_here(ids, all)),
            None => self.forward_here(ids, all),
        }
    }

    fn forward_here(&mut self, ids: &[u32], all: bool) -> Result<Vec<f32>> {
        let w = self.w.clone();
        let cfg = &w.cfg;
        if let Some(r) = &cfg.longrope {
            let (past, switch) = (self.position, r.original_max_position_embeddings);
            if past > 0 && past <= switch && past + ids.len() > switch && self.ids.len() == past {
                // Every position again with the long factors (transformers' Phi-3 `generate`).
                let mut every = std::mem::take(&mut self.ids);
                every.extend_from_slice(ids);
                self.reset_cache();
                let logits = self.forward_here(&every, all)?;
                let vocab = logits.len() / if all { every.len() } else { 1 };
                return Ok(if all { logits[past * vocab..].to_vec() } else { logits });
            }
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let t = ids.len();
        let past = self.position;
        if self.cache.len() != w.layers.len() {
            self.cache = (0..w.layers.len()).map(|_| LayerCache::default()).collect();
        }
        let mut x = vec![0f32; t * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if id as usize >= cfg.vocab_size {
                return Err(Error::config(
                    "prompt",
                    format!("token id {id} is outside the vocabulary of {} tokens", cfg.vocab_size),
                ));
            }
            w.embed.dequantize_row(id as usize, row).map_err(kernel_err)?;
        }
        if cfg.embed_scale {
            let scale = (h as f64).sqrt() as f32;
            x.iter_mut().for_each(|v| *v *= scale);
        }
        // LongRoPE's factor set follows the forward's last position, as in the f32 model.
        let global = match (&w.long_inv_freq, &cfg.longrope) {
            (Some(long), Some(r)) if past + t > r.original_max_position_embeddings => long,
            _ => &w.inv_freq,
        };
        let table_scale = crate::model::transformer::rope_table_scale(cfg);
        let (cos, sin) = rope_tables(global, past, t, table_scale);
        let local = w.local_inv_freq.as_ref().map(|f| rope_tables(f, past, t, table_scale));
        let rot_half = cfg.rotary_dims() / 2;
        let mut mm = Products {
            kernel: self.kernel,
            exact: self.exact.as_deref(),
            acts: QActivations::default(),
        };
        let mut xn = vec![0f32; t * h];
        let (mut q, mut k, mut v) = (vec![0f32; t * q_dim], vec![0f32; t * kv_dim], vec![0f32; t * kv_dim]);
        let mut attn = vec![0f32; t * q_dim];
        let mut proj = vec![0f32; t * h];
        let (mut gate, mut up) = (
            vec![0f32; t * cfg.intermediate_size],
            vec![0f32; t * cfg.intermediate_size],
        );
        let eps = cfg.rms_norm_eps as f32;
        for (l, (layer, cache)) in w.layers.iter().zip(self.cache.iter_mut()).enumerate() {
            let lora = self.lora.get(l);
            rms_norm(&x, &layer.attn_norm, eps, &mut xn);
            mm.set_input(&xn, t, h)?;
            mm.run_group(
                layer,
                lora,
                &mut [(Target::Q, &mut q), (Target::K, &mut k), (Target::V, &mut v)],
                &xn,
            )?;
            if let Some([qb, kb, vb]) = &layer.qkv_bias {
                add_rows(&mut q, qb);
                add_rows(&mut k, kb);
                add_rows(&mut v, vb);
            }
            if let Some([qn, kn]) = &layer.qk_norm {
                rms_norm_in_place(&mut q, qn, eps);
                rms_norm_in_place(&mut k, kn, eps);
            }
            let (c, s) = match (&local, layer.local_rope) {
                (Some((c, s)), true) => (c, s),
                _ => (&cos, &sin),
            };
            if layer.rope {
                rope(&mut q, hd, rot_half, c, s);
                rope(&mut k, hd, rot_half, c, s);
            }
            cache.k.extend_from_slice(&k);
            cache.v.extend_from_slice(&v);
            let (kv_heads, scale) = (cfg.num_key_value_heads, cfg.attention_scale() as f32);
            over_cache(
                &q,
                KvView::by_position(&cache.k, kv_heads, hd),
                KvView::by_position(&cache.v, kv_heads, hd),
                past,
                CacheHeads {
                    heads: cfg.num_attention_heads,
                    kv_heads,
                    head_dim: hd,
                    window: layer.window,
                    scale,
                },
                &mut attn,
            );
            mm.set_input(&attn, t, q_dim)?;
            mm.run(layer, lora, Target::O, &attn, &mut proj)?;
            if let Some(n) = &layer.attn_out_norm {
                rms_norm_in_place(&mut proj, n, eps);
            }
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            rms_norm(&x, &layer.ffn_norm, eps, &mut xn);
            mm.set_input(&xn, t, h)?;
            mm.run_group(
                layer,
                lora,
                &mut [(Target::Gate, &mut gate), (Target::Up, &mut up)],
                &xn,
            )?;
            match cfg.activation {
                Activation::Silu => gate
                    .iter_mut()
                    .zip(&up)
                    .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u),
                Activation::GeluTanh => gate.iter_mut().zip(&up).for_each(|(g, u)| *g = gelu_tanh(*g) * u),
            }
            mm.set_input(&gate, t, cfg.intermediate_size)?;
            mm.run(layer, lora, Target::Down, &gate, &mut proj)?;
            if let Some(n) = &layer.ffn_out_norm {
                rms_norm_in_place(&mut proj, n, eps);
            }
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        self.position += t;
        self.ids.extend_from_slice(ids);
        let rows = if all { t } else { 1 };
        let last = &x[(t - rows) * h..];
        let mut normed = vec![0f32; rows * h];
        rms_norm(last, &w.norm, eps, &mut normed);
        mm.set_input(&normed, rows, h)?;
        let head = w.output.as_ref().unwrap_or(&w.embed);
        let mut logits = vec![0f32; rows * head.rows()];
        mm.product(head, &normed, &mut logits)?;
        Ok(logits)
    }
}

impl QuantizedModel {
    fn reset_cache(&mut self) {
        self.position = 0;
        self.ids.clear();
        self.cache.iter_mut().for_each(|c| {
            c.k.clear();
            c.v.clear();
        });
    }
}

impl Decoder for QuantizedModel {
    fn reset(&mut self) -> Result<()> {
        self.reset_cache();
        Ok(())
    }

    fn step(&mut self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::config("prompt", "no tokens to run"));
        }
        if self.position + ids.len() > self.context_len {
            return Err(Error::config(
                "context",
                format!(
                    "{} tokens exceed the quantized model's context length of {}",
                    self.position + ids.len(),
                    self.context_len
                ),
            ));
        }
        let logits = self.forward(ids, false)?;
        let n = logits.len();
        Ok(Tensor::from_vec(logits, n, &Device::Cpu)?)
    }

    fn context_len(&self) -> usize {
        self.context_len
    }
}

/// From this many tokens on (a prompt), products dequantize panels of weights and run f32
/// gemm ([`quant::matmul_f32`]) instead of the integer kernels.
const F32_PANEL_TOKENS: usize = 16;

/// The matrix products of one forward: integer kernels on 16-bit activations for a few tokens,
/// dequantized panels through f32 gemm for a prompt, or (diagnostic mode) f32 products with
/// the whole dequantized matrices.
struct Products<'a> {
    kernel: Kernel,
    exact: Option<&'a HashMap<usize, Vec<f32>>>,
    acts: QActivations,
}

impl Products<'_> {
    /// Quantizes `x` (`[t, cols]`) once for the products that read it.
    fn set_input(&mut self, x: &[f32], t: usize, cols: usize) -> Result<()> {
        if self.exact.is_none() && t < F32_PANEL_TOKENS {
            self.acts.quantize_from(x, t, cols).map_err(kernel_err)?;
        }
        Ok(())
    }

    /// Projection `target` of `layer` (with its adapter update, if any) on `x`, the input last
    /// given to `set_input`.
    fn run(&self, layer: &Layer, lora: Option<&LayerLora>, target: Target, x: &[f32], out: &mut [f32]) -> Result<()> {
        let w = layer
            .matrix(target)
            .ok_or_else(|| Error::config("targets", format!("`{}` is not a split projection", target.peft_name())))?;
        self.product(w, x, out)?;
        match lora.and_then(|l| l[slot(target)?].as_ref()) {
            Some(l) => l.add_to(x, out),
            None => Ok(()),
        }
    }

    /// [`Products::run`] for several projections of the same input (q, k, v; gate, up): one
    /// token's integer products run as one job over the threads ([`quant::matmul_group`]).
    fn run_group(
        &self,
        layer: &Layer,
        lora: Option<&LayerLora>,
        outs: &mut [(Target, &mut Vec<f32>)],
        x: &[f32],
    ) -> Result<()> {
        let one_token = x.len() == layer.matrix(outs[0].0).map_or(0, |w| w.cols());
        if self.exact.is_some() || !one_token {
            for (target, out) in outs.iter_mut() {
                self.run(layer, lora, *target, x, out)?;
            }
            return Ok(());
        }
        let mut products = Vec::with_capacity(outs.len());
        for (target, out) in outs.iter_mut() {
            let w = layer.matrix(*target).ok_or_else(|| {
                Error::config("targets", format!("`{}` is not a split projection", target.peft_name()))
            })?;
            products.push((w, &mut out[..]));
        }
        quant::matmul_group(&mut products, &self.acts, self.kernel).map_err(kernel_err)?;
        for (target, out) in outs.iter_mut() {
            if let Some(l) = lora.and_then(|l| l[slot(*target)?].as_ref()) {
                l.add_to(x, out)?;
            }
        }
        Ok(())
    }

    /// `out[t, r] = Σ_c w[r, c]·x[t, c]`; `x` is the input last given to `set_input`.
    fn product(&self, w: &QMatrix, x: &[f32], out: &mut [f32]) -> Result<()> {
        match self.exact.and_then(|m| m.get(&matrix_key(w))) {
            Some(wf) => {
                use crate::kernels::gemm::{gemm_into, Mat};
                let t = x.len() / w.cols();
                gemm_into(
                    out,
                    false,
                    Mat::row_major(x, t, w.cols()),
                    Mat::row_major(wf, w.rows(), w.cols()).t(),
                )?;
                Ok(())
            }
            None => {
                let t = x.len() / w.cols().max(1);
                if t >= F32_PANEL_TOKENS {
                    quant::matmul_f32(w, x, t, out).map_err(kernel_err)
                } else {
                    quant::matmul(w, &self.acts, out, self.kernel).map_err(kernel_err)
                }
            }
        }
    }
}

fn matrix_key(m: &QMatrix) -> usize {
    m.data().as_ptr() as usize
}

fn kernel_err(e: quant::QError) -> Error {
    Error::config("quantized", e.to_string())
}

/// Reads tensors of one GGUF file by GGUF name, checking their shapes.
struct Reader<'a> {
    gguf: &'a GgufModel,
    file: File,
}

impl Reader<'_> {
    fn invalid(&self, name: &str, e: impl std::fmt::Display) -> Error {
        Error::invalid(self.gguf.path(), format!("tensor `{name}`"), e.to_string())
    }

    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<candle_core::quantized::QTensor> {
        let info = self
            .gguf
            .content()
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.gguf.path().to_path_buf(),
                tensor: name.to_string(),
                hint: String::new(),
            })?;
        if info.shape.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: self.gguf.path().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
            });
        }
        info.read(&mut self.file, self.gguf.content().tensor_data_offset, &Device::Cpu)
            .map_err(|e| self.invalid(name, e))
    }

    /// A `[rows, cols]` matrix: Q4_1/Q8_0 blocks as stored, other types re-quantized to Q8_0.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let t = self.qtensor(name, &[rows, cols])?;
        let native = match t.dtype() {
            GgmlDType::Q4_1 => Some(QType::Q4_1),
            GgmlDType::Q8_0 => Some(QType::Q8_0),
            _ => None,
        };
        let m = match native {
            Some(qtype) => {
                let data = t.data().map_err(|e| self.invalid(name, e))?.into_owned();
                QMatrix::from_blocks(qtype, rows, cols, data)
            }
            None => {
                let values = t
                    .dequantize(&Device::Cpu)
                    .and_then(|v| v.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| self.invalid(name, e))?;
                QMatrix::quantize(QType::Q8_0, rows, cols, &values)
            }
        };
        m.map_err(|e| self.invalid(name, e))
    }

    /// A vector (norm weights, biases) in f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.qtensor(name, &[len])?;
        t.dequantize(&Device::Cpu)
            .and_then(|v| v.to_vec1::<f32>())
            .map_err(|e| self.invalid(name, e))
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let r = crate::kernels::ops::rstd(row, eps);
        for ((o, v), g) in dst.iter_mut().zip(row).zip(w) {
            *o = v * r * g;
        }
    }
}

/// [`rms_norm`] over each `w.len()`-wide row of `x`, in place (Qwen3's per-head q/k norms).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let r = crate::kernels::ops::rstd(row, eps);
        row.iter_mut().zip(w).for_each(|(v, g)| *v *= r * g);
    }
}

fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(a, c)| *a += c);
    }
}

/// cos/sin of `position · inv_freq` times `scale`, `[t, rotary_dim/2]`, for positions
/// `start..start + t`.
fn rope_tables(inv_freq: &[f32], start: usize, t: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(t * inv_freq.len());
    let mut sin = Vec::with_capacity(t * inv_freq.len());
    for p in start..start + t {
        for f in inv_freq {
            // The same f32 arithmetic as the f32 model's tables.
            let a = p as f32 * f;
            cos.push(a.cos() * scale);
            sin.push(a.sin() * scale);
        }
    }
    (cos, sin)
}

/// Hugging Face rotate-half rope on rows `[t, heads * head_dim]`, in place, over the first
/// `2 · half` dimensions of each head (the rest, under Phi-3's partial rotary, unchanged).
fn rope(x: &mut [f32], head_dim: usize, half: usize, cos: &[f32], sin: &[f32]) {
    let t = cos.len() / half.max(1);
    let width = x.len() / t.max(1);
    for (p, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for head in row.chunks_exact_mut(head_dim) {
            let (a, b) = head[..2 * half].split_at_mut(half);
            for (((x1, x2), c), s) in a.iter_mut().zip(b.iter_mut()).zip(c).zip(s) {
                let (u, v) = (*x1, *x2);
                *x1 = u * c - v * s;
                *x2 = v * c + u * s;
            }
        }
    }
}

/// `gelu_pytorch_tanh`, the formula candle's `gelu` (the f32 path's) computes.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row map inverts llama.cpp's permutation (`convert_hf_to_gguf.py`'s `permute`),
    /// which the f32 loader's tests pin against the Python row order.
    #[test]
    fn row_map_inverts_the_gguf_permutation() {
        let (heads, hd) = (3, 8);
        let rows: Vec<f32> = (0..heads * hd).map(|r| r as f32).collect();
        let hf = Tensor::from_vec(rows, heads * hd, &Device::Cpu).unwrap();
        let gguf = crate::model::gguf::permute_qk_for_gguf(&hf, heads)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let back: Vec<f32> = hf_rows_from_gguf(heads, hd).iter().map(|&r| gguf[r]).collect();
        assert_eq!(back, hf.to_vec1::<f32>().unwrap());
    }
}
