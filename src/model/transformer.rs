//! The differentiable decoder-only transformer used for training (Llama, Qwen2, Qwen3 and Gemma 3;
//! family differences are flags in `ModelConfig`). Unlike candle's fast kernels and the stock
//! `candle-transformers` models, every op here propagates gradients, and the forward returns
//! hidden states for all positions.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::quant::{QMatrix, QType};
use crate::kernels::{ops, KernelPath};
use crate::lora::{ForwardCtx, FrozenWeight, LoraConfig, LoraLinear, LoraWeights, Target};
use crate::model::attention::{attention, Heads, Segments};
use crate::model::cached_attention::{decode_attention, decode_attention_supported};
use crate::model::config::{Activation, LayerType, ModelConfig};
use crate::model::weights::WeightSource;
use crate::rng::Rng;

/// The q, k and v projections: three matrices, or Phi-3's one `qkv_proj` whose output rows
/// are q, then k, then v (kept fused so an adapter on it has PEFT's shapes).
#[derive(Debug, Clone)]
enum QkvProj {
    Split {
        q: LoraLinear,
        k: LoraLinear,
        v: LoraLinear,
    },
    Fused {
        qkv: LoraLinear,
        q_dim: usize,
        kv_dim: usize,
    },
}

impl QkvProj {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            QkvProj::Split { q, k, v } => Ok((q.forward(x, ctx)?, k.forward(x, ctx)?, v.forward(x, ctx)?)),
            QkvProj::Fused { qkv, q_dim, kv_dim } => {
                let y = qkv.forward(x, ctx)?;
                let last = y.rank() - 1;
                Ok((
                    y.narrow(last, 0, *q_dim)?,
                    y.narrow(last, *q_dim, *kv_dim)?,
                    y.narrow(last, q_dim + kv_dim, *kv_dim)?,
                ))
            }
        }
    }
}

/// The gate and up projections: two matrices, or Phi-3's one `gate_up_proj` (gate rows first).
#[derive(Debug, Clone)]
enum GateUpProj {
    Split { gate: LoraLinear, up: LoraLinear },
    Fused { gate_up: LoraLinear, inner: usize },
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: QkvProj,
    o: LoraLinear,
    /// Per-head RMS norms `[head_dim]` for q and k (Qwen3, Gemma 3), applied before rotary.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
}

/// An RMS norm's weight as the checkpoint stores it, and the factor the forward multiplies by:
/// the same tensor, or `1 + w` computed in f32 for Gemma (whose weights are centred on 0).
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    scale: Tensor,
}

impl Norm {
    fn load(
        src: &dyn WeightSource,
        name: &str,
        dim: usize,
        cfg: &ModelConfig,
        dt: DType,
        dev: &Device,
    ) -> Result<Self> {
        let weight = src.get(name, &[dim], dt, dev)?;
        let scale = if cfg.norm_plus_one {
            (weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(dt)?
        } else {
            weight.clone()
        };
        Ok(Norm { weight, scale })
    }

    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.scale, eps)?)
    }
}

impl Attention {
    /// q and k `[.., heads·head_dim]` after the per-head norms (when the family has them).
    fn norm_qk(&self, q: Tensor, k: Tensor, head_dim: usize, eps: f64) -> Result<(Tensor, Tensor)> {
        let per_head = |x: Tensor, w: &Option<Norm>| -> Result<Tensor> {
            let Some(w) = w else { return Ok(x) };
            let dims = x.dims().to_vec();
            let last = dims[dims.len() - 1];
            let mut split = dims[..dims.len() - 1].to_vec();
            split.extend([last / head_dim, head_dim]);
            Ok(w.forward(&x.reshape(split)?, eps)?.reshape(dims)?)
        };
        Ok((per_head(q, &self.q_norm)?, per_head(k, &self.k_norm)?))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUpProj,
    down: LoraLinear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, act: Activation, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUpProj::Split { gate, up } => (gate.forward(x, ctx)?, up.forward(x, ctx)?),
            GateUpProj::Fused { gate_up, inner } => {
                let y = gate_up.forward(x, ctx)?;
                let last = y.rank() - 1;
                (
                    y.narrow(last, 0, *inner)?.contiguous()?,
                    y.narrow(last, *inner, *inner)?.contiguous()?,
                )
            }
        };
        let h = match act {
            Activation::Silu => ops::swiglu(&g, &u)?,
            // candle's `gelu` is the tanh approximation (`gelu_pytorch_tanh`), with a backward.
            Activation::GeluTanh => (g.gelu()? * u)?,
        };
        Ok(self.down.forward(&h, ctx)?)
    }
}

/// One decoder block. Llama/Qwen: `x += attn(norm(x)); x += mlp(mlp_norm(x))`, where
/// `mlp_norm` is the checkpoint's `post_attention_layernorm`. Gemma also norms both outputs
/// before they join the residual: its `post_attention_layernorm` is `attn_out_norm`, and
/// `pre_feedforward_layernorm` / `post_feedforward_layernorm` are `mlp_norm` / `mlp_out_norm`.
#[derive(Debug, Clone)]
struct Block {
    input_norm: Norm,
    attn_out_norm: Option<Norm>,
    mlp_norm: Norm,
    mlp_out_norm: Option<Norm>,
    attn: Attention,
    mlp: Mlp,
}

impl Block {
    /// The block's norms by Hugging Face name.
    fn norms(&self, l: usize) -> Vec<(String, &Norm)> {
        let p = format!("model.layers.{l}");
        let mut out = vec![(format!("{p}.input_layernorm.weight"), &self.input_norm)];
        match (&self.attn_out_norm, &self.mlp_out_norm) {
            (Some(a), Some(m)) => out.extend([
                (format!("{p}.post_attention_layernorm.weight"), a),
                (format!("{p}.pre_feedforward_layernorm.weight"), &self.mlp_norm),
                (format!("{p}.post_feedforward_layernorm.weight"), m),
            ]),
            _ => out.push((format!("{p}.post_attention_layernorm.weight"), &self.mlp_norm)),
        }
        if let Some(n) = &self.attn.q_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), n));
        }
        if let Some(n) = &self.attn.k_norm {
            out.push((format!("{p}.self_attn.k_norm.weight"), n));
        }
        out
    }

    /// `x + attn_out_norm(y)` (or `x + y`), the residual update after the attention.
    fn add_attention(&self, x: Tensor, y: Tensor, eps: f64) -> Result<Tensor> {
        let y = match &self.attn_out_norm {
            Some(n) => n.forward(&y, eps)?,
            None => y,
        };
        Ok((x + y)?)
    }

    /// The MLP half of the block: `x + mlp_out_norm(mlp(mlp_norm(x)))`.
    fn mlp_residual(&self, x: Tensor, cfg: &ModelConfig, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let hs = self.mlp_norm.forward(&x, cfg.rms_norm_eps)?;
        let y = self.mlp.forward(&hs, cfg.activation, ctx)?;
        let y = match &self.mlp_out_norm {
            Some(n) => n.forward(&y, cfg.rms_norm_eps)?,
            None => y,
        };
        Ok((x + y)?)
    }
}

/// cos/sin tables `[t, head_dim/2]` of the full-attention layers and, for Gemma 3, the
/// sliding-window ones; for packed rows, where each example starts (rotary positions restart
/// there and attention stays inside each example).
pub struct RopeTables {
    segments: Option<Segments>,
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
    /// cos = 1, sin = 0: the rotation by nothing of SmolLM3's NoPE layers (exact in floats).
    identity: Option<(Tensor, Tensor)>,
}

impl RopeTables {
    fn for_layer(&self, cfg: &ModelConfig, l: usize) -> (&Tensor, &Tensor) {
        let (c, s) = match (cfg.layer_type(l), &self.local, &self.identity) {
            (_, _, Some(identity)) if !cfg.uses_rope(l) => identity,
            (LayerType::SlidingAttention, Some(local), _) => local,
            _ => &self.global,
        };
        (c, s)
    }
}

/// Rotary inverse frequencies of the full-attention layers and, when they differ (Gemma 3), of
/// the sliding-window layers; Phi-3's LongRoPE adds the long set and the table scale.
#[derive(Debug, Clone)]
struct RopeFreqs {
    global: Vec<f32>,
    local: Option<Vec<f32>>,
    /// LongRoPE: the frequencies of sequences longer than `long_after` positions.
    long: Option<Vec<f32>>,
    long_after: usize,
    /// cos and sin are multiplied by this (LongRoPE's attention factor; 1 otherwise).
    table_scale: f32,
}

impl RopeFreqs {
    fn new(cfg: &ModelConfig) -> Self {
        RopeFreqs {
            global: rope_inv_freq(cfg),
            local: cfg
                .rope_local_theta
                .map(|theta| default_inv_freq(cfg.rotary_dims(), theta)),
            long: cfg.longrope.as_ref().map(|_| rope_inv_freq_for_len(cfg, usize::MAX)),
            long_after: cfg
                .longrope
                .as_ref()
                .map_or(usize::MAX, |r| r.original_max_position_embeddings),
            table_scale: rope_table_scale(cfg),
        }
    }

    /// The full-attention frequencies of a forward whose last position is `end - 1`.
    fn global_for(&self, end: usize) -> &[f32] {
        match &self.long {
            Some(long) if end > self.long_after => long,
            _ => &self.global,
        }
    }
}

/// Positions a [`KvCache`] grows by: growing copies the cache, so a sequence of `n` positions
/// copies about `n²/(2·KV_GROW)` of them in all (the per-token `Tensor::cat` this replaces
/// copied `n²/2`), and at most `KV_GROW - 1` positions stand unused.
const KV_GROW: usize = 256;

/// Keys and values of the positions a sequence has run through, per layer, for
/// [`Transformer::forward_with_cache`].
///
/// Each layer's keys and values live in buffers of `[1, kv_heads, capacity, head_dim]` that new
/// positions are written into in place (`Tensor::slice_set`), and attention reads the first
/// `len` positions as a view. Appending with `Tensor::cat` copied the whole cache at every
/// token: at 2,048 positions of SmolLM2-135M, 190 MB of copies a token beside its 538 MB of
/// weights. Capacity grows by [`KV_GROW`] positions. Not `Clone`: two caches sharing buffers
/// would write into each other.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// The token ids behind the cached positions (LongRoPE recomputes them when a sequence
    /// first passes the pretraining context).
    ids: Vec<u32>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
        self.ids.clear();
    }

    /// Keeps the first `len` positions (to reuse a shared prompt prefix); later positions are
    /// written over.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        self.len = len;
        self.ids.truncate(len);
        Ok(())
    }

    /// Writes `k` and `v` (`[1, kv_heads, t, head_dim]`, contiguous) at positions
    /// `past..past + t` of a layer's buffers, growing them when full, and returns the views of
    /// positions `0..past + t`.
    fn append(slot: &mut Option<(Tensor, Tensor)>, past: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, heads, t, hd) = k.dims4()?;
        let need = past + t;
        // The slot is never left empty: on an error it still holds every kept position.
        let (kb, vb) = match slot.as_ref() {
            Some((kb, vb)) if kb.dim(2)? >= need => (kb.clone(), vb.clone()),
            old => {
                // Full (or none yet): new buffers with room for the next KV_GROW positions,
                // holding the positions kept so far.
                let grown = |old: Option<&Tensor>| -> Result<Tensor> {
                    let buf = Tensor::zeros((b, heads, need.next_multiple_of(KV_GROW), hd), k.dtype(), k.device())?;
                    if let (Some(old), true) = (old, past > 0) {
                        buf.slice_set(&old.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                    }
                    Ok(buf)
                };
                let (kb, vb) = (grown(old.map(|(kb, _)| kb))?, grown(old.map(|(_, vb)| vb))?);
                *slot = Some((kb.clone(), vb.clone()));
                (kb, vb)
            }
        };
        kb.slice_set(k, 2, past)?;
        vb.slice_set(v, 2, past)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// A base model with optional LoRA adapters. Cloning shares the frozen weights (candle tensors
/// are reference counted), so several adapters can sit on one copy of the base in memory.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Tensor,
    rope: RopeFreqs,
    dtype: DType,
    device: Device,
}

/// How the frozen weights of the projections are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// In the model's dtype.
    AsModel,
    /// In GGUF blocks (`--precision q8_0/q4_1`).
    Blocks(QType),
    /// In bf16 under an f32 model: `--precision bf16` on the CPU ([`crate::kernels::bf16`]).
    Bf16,
}

#[allow(clippy::too_many_arguments)]
fn linear(
    src: &dyn WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
    dt: DType,
    base: Keep,
    dev: &Device,
) -> Result<LoraLinear> {
    let b = if bias {
        Some(src.get(&format!("{name}.bias"), &[out], dt, dev)?)
    } else {
        None
    };
    if let Keep::Blocks(qtype) = base {
        if let Some(q) = src.blocks(&format!("{name}.weight"), &[out, inp], qtype)? {
            // The file's own blocks: never dequantized, never rounded a second time.
            return Ok(LoraLinear {
                weight: FrozenWeight::Quantized(std::sync::Arc::new(q)),
                bias: b,
                lora: None,
            });
        }
    }
    let wdt = if base == Keep::Bf16 { DType::BF16 } else { dt };
    let w = src.get(&format!("{name}.weight"), &[out, inp], wdt, dev)?;
    let mut lin = LoraLinear::new(w, b);
    if let Keep::Blocks(qtype) = base {
        let values = lin.dense_weight()?.flatten_all()?.to_vec1::<f32>()?;
        let q = QMatrix::quantize(qtype, out, inp, &values)
            .map_err(|e| Error::config("precision", format!("`{name}` cannot be kept as {qtype:?}: {e}")))?;
        lin.weight = FrozenWeight::Quantized(std::sync::Arc::new(q));
    }
    Ok(lin)
}

/// Default rotary inverse frequencies `1 / theta^(2i/d)`, `i < d/2` (`d`: rotated dimensions).
pub fn default_inv_freq(rot_dim: usize, theta: f64) -> Vec<f32> {
    (0..rot_dim / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / rot_dim as f64)) as f32)
        .collect()
}

/// Rotary inverse frequencies of the full-attention layers, with Llama 3 rope scaling, linear
/// scaling (Gemma 3) or LongRoPE's short factors (Phi-3) when configured.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    rope_inv_freq_for_len(cfg, 0)
}

/// [`rope_inv_freq`] for a forward pass whose positions end at `seq_len` (exclusive): Phi-3's
/// LongRoPE takes its long factors when `seq_len` exceeds `original_max_position_embeddings`, as
/// transformers does per forward pass (`longrope_frequency_update`: `max(position_ids) + 1`).
pub fn rope_inv_freq_for_len(cfg: &ModelConfig, seq_len: usize) -> Vec<f32> {
    let d = cfg.rotary_dims();
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    if let Some(r) = &cfg.longrope {
        let ext = if seq_len > r.original_max_position_embeddings {
            &r.long_factor
        } else {
            &r.short_factor
        };
        return base.iter().zip(ext).map(|(f, e)| (f / e) as f32).collect();
    }
    if let Some(factor) = cfg.rope_linear_factor {
        return base.into_iter().map(|f| (f / factor) as f32).collect();
    }
    let Some(s) = &cfg.rope_scaling else {
        return base.into_iter().map(|f| f as f32).collect();
    };
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / s.factor
            } else {
                let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * freq / s.factor + smooth * freq
            };
            f as f32
        })
        .collect()
}

/// The factor cos and sin tables are multiplied by: LongRoPE's attention factor (transformers'
/// `attention_scaling`, applied whichever factor set is in use), else 1.
pub fn rope_table_scale(cfg: &ModelConfig) -> f32 {
    cfg.longrope.as_ref().map_or(1.0, |r| r.attention_factor as f32)
}

impl Transformer {
    /// Builds the model from `src`, checking every tensor's shape.
    pub fn load(cfg: &ModelConfig, src: &dyn WeightSource, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_base(cfg, src, dtype, None, device)
    }

    /// [`Transformer::load`], with the seven projections of every layer kept in `base` blocks
    /// (Q8_0/Q4_1) instead of `dtype`: a LoRA run over a quantized frozen base. A GGUF matrix
    /// already stored as `base` is used as the file's blocks ([`WeightSource::blocks`]); any
    /// other is quantized one tensor at a time as it is read. Embeddings, norms and the output
    /// head stay in `dtype`.
    ///
    /// bf16 on the CPU (with the fused kernels) keeps the projections, embeddings and output head
    /// in bf16 under an f32 model: their products run as bf16 products summed in f32
    /// ([`crate::kernels::bf16`], PyTorch's bf16 autocast), everything else (norms, attention,
    /// activations, adapters) in f32.
    /// candle's bf16 CPU ops, which the whole model ran through before (and still does with
    /// `FINCH_FUSED=0`), trained SmolLM2-135M shapes at b4×256 at 69 tokens/s with 9.8 GB resident,
    /// against 380–436 tokens/s and 2.1–2.2 GB now (AMD EPYC Zen 4, 2 threads).
    pub fn load_with_base(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        dtype: DType,
        base: Option<QType>,
        device: &Device,
    ) -> Result<Self> {
        crate::device::check_precision(device, dtype)?;
        if base.is_some() && (!device.is_cpu() || dtype != DType::F32) {
            return Err(Error::config(
                "precision",
                "a q8_0/q4_1 base trains on the CPU in f32 (choose --device cpu, or f32/bf16 on a GPU)",
            ));
        }
        let (dtype, base) = match base {
            Some(q) => (dtype, Keep::Blocks(q)),
            None if dtype == DType::BF16 && device.is_cpu() && crate::kernels::kernel_path() == KernelPath::Fused => {
                (DType::F32, Keep::Bf16)
            }
            None => (dtype, Keep::AsModel),
        };
        let h = cfg.hidden_size;
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        // With bf16 projections the embeddings and the output head are bf16 too (looked-up rows
        // are widened to f32; the head is a bf16 product).
        let head_dtype = if base == Keep::Bf16 { DType::BF16 } else { dtype };
        let embed = src.get("model.embed_tokens.weight", &[cfg.vocab_size, h], head_dtype, device)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let norm = |name: &str, dim: usize| Norm::load(src, &format!("{p}.{name}.weight"), dim, cfg, dtype, device);
            let (attn_out_norm, mlp_norm, mlp_out_norm) = if cfg.sandwich_norms {
                (
                    Some(norm("post_attention_layernorm", h)?),
                    norm("pre_feedforward_layernorm", h)?,
                    Some(norm("post_feedforward_layernorm", h)?),
                )
            } else {
                (None, norm("post_attention_layernorm", h)?, None)
            };
            layers.push(Block {
                input_norm: norm("input_layernorm", h)?,
                attn_out_norm,
                mlp_norm,
                mlp_out_norm,
                attn: Attention {
                    qkv: if cfg.family.fused_projections() {
                        QkvProj::Fused {
                            qkv: linear(
                                src,
                                &format!("{a}.qkv_proj"),
                                q_dim + 2 * kv_dim,
                                h,
                                false,
                                dtype,
                                base,
                                device,
                            )?,
                            q_dim,
                            kv_dim,
                        }
                    } else {
                        QkvProj::Split {
                            q: linear(src, &format!("{a}.q_proj"), q_dim, h, cfg.qkv_bias, dtype, base, device)?,
                            k: linear(
                                src,
                                &format!("{a}.k_proj"),
                                kv_dim,
                                h,
                                cfg.qkv_bias,
                                dtype,
                                base,
                                device,
                            )?,
                            v: linear(
                                src,
                                &format!("{a}.v_proj"),
                                kv_dim,
                                h,
                                cfg.qkv_bias,
                                dtype,
                                base,
                                device,
                            )?,
                        }
                    },
                    o: linear(src, &format!("{a}.o_proj"), h, q_dim, cfg.o_bias, dtype, base, device)?,
                    q_norm: if cfg.qk_norm {
                        Some(norm("self_attn.q_norm", cfg.head_dim)?)
                    } else {
                        None
                    },
                    k_norm: if cfg.qk_norm {
                        Some(norm("self_attn.k_norm", cfg.head_dim)?)
                    } else {
                        None
                    },
                },
                mlp: Mlp {
                    gate_up: if cfg.family.fused_projections() {
                        GateUpProj::Fused {
                            gate_up: linear(src, &format!("{m}.gate_up_proj"), 2 * i, h, false, dtype, base, device)?,
                            inner: i,
                        }
                    } else {
                        GateUpProj::Split {
                            gate: linear(src, &format!("{m}.gate_proj"), i, h, cfg.mlp_bias, dtype, base, device)?,
                            up: linear(src, &format!("{m}.up_proj"), i, h, cfg.mlp_bias, dtype, base, device)?,
                        }
                    },
                    down: linear(src, &format!("{m}.down_proj"), h, i, cfg.mlp_bias, dtype, base, device)?,
                },
            });
        }
        let norm = Norm::load(src, "model.norm.weight", h, cfg, dtype, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else if src.contains("lm_head.weight") {
            src.get("lm_head.weight", &[cfg.vocab_size, h], head_dtype, device)?
        } else {
            return Err(Error::MissingTensor {
                path: src.origin().to_path_buf(),
                tensor: "lm_head.weight".into(),
                hint: " (config.json says tie_word_embeddings is false)".into(),
            });
        };
        Ok(Transformer {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: RopeFreqs::new(cfg),
            dtype,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The projections this model has, as LoRA targets (Phi-3: the fused ones).
    pub fn projections(&self) -> &'static [Target] {
        Target::all_for(self.cfg.family.fused_projections())
    }

    /// Projection `t` of layer `layer`; `None` when the model has no such matrix (`q` of a
    /// fused model, `qkv` of a split one).
    fn linear_mut(&mut self, layer: usize, t: Target) -> Option<&mut LoraLinear> {
        let b = &mut self.layers[layer];
        match (t, &mut b.attn.qkv, &mut b.mlp.gate_up) {
            (Target::Q, QkvProj::Split { q, .. }, _) => Some(q),
            (Target::K, QkvProj::Split { k, .. }, _) => Some(k),
            (Target::V, QkvProj::Split { v, .. }, _) => Some(v),
            (Target::Qkv, QkvProj::Fused { qkv, .. }, _) => Some(qkv),
            (Target::O, _, _) => Some(&mut b.attn.o),
            (Target::Gate, _, GateUpProj::Split { gate, .. }) => Some(gate),
            (Target::Up, _, GateUpProj::Split { up, .. }) => Some(up),
            (Target::GateUp, _, GateUpProj::Fused { gate_up, .. }) => Some(gate_up),
            (Target::Down, _, _) => Some(&mut b.mlp.down),
            _ => None,
        }
    }

    fn linear_ref(&self, layer: usize, t: Target) -> Option<&LoraLinear> {
        let b = &self.layers[layer];
        match (t, &b.attn.qkv, &b.mlp.gate_up) {
            (Target::Q, QkvProj::Split { q, .. }, _) => Some(q),
            (Target::K, QkvProj::Split { k, .. }, _) => Some(k),
            (Target::V, QkvProj::Split { v, .. }, _) => Some(v),
            (Target::Qkv, QkvProj::Fused { qkv, .. }, _) => Some(qkv),
            (Target::O, _, _) => Some(&b.attn.o),
            (Target::Gate, _, GateUpProj::Split { gate, .. }) => Some(gate),
            (Target::Up, _, GateUpProj::Split { up, .. }) => Some(up),
            (Target::GateUp, _, GateUpProj::Fused { gate_up, .. }) => Some(gate_up),
            (Target::Down, _, _) => Some(&b.mlp.down),
            _ => None,
        }
    }

    /// The frozen weight of projection `t` in layer `layer` (`None` when the model has no such
    /// matrix): dense, or the blocks a quantized base keeps.
    pub fn base_weight(&self, layer: usize, t: Target) -> Option<&FrozenWeight> {
        self.layers.get(layer).and(self.linear_ref(layer, t)).map(|l| &l.weight)
    }

    /// `targets` as this model has them ([`Target::resolve`]: q, k, v become qkv on Phi-3).
    pub fn resolve_targets(&self, targets: &[Target]) -> Result<Vec<Target>> {
        Target::resolve(targets, self.cfg.family.fused_projections())
    }

    /// Attaches fresh adapters (A random, B zero) to every target of every layer, replacing any
    /// existing ones. Initialisation order is fixed (layer, then target), so a seed gives one result.
    pub fn add_lora(&mut self, cfg: &LoraConfig, rng: &mut Rng) -> Result<()> {
        cfg.validate()?;
        let device = self.device.clone();
        // Mixed precision: adapters (and so the optimizer's moments) are f32 over a bf16/f16 base.
        let dtype = crate::kernels::compute_dtype(self.dtype);
        let targets = self.resolve_targets(&cfg.targets)?;
        for l in 0..self.layers.len() {
            for &t in &targets {
                let lin = self
                    .linear_mut(l, t)
                    .ok_or_else(|| Error::config("targets", format!("this model has no `{}`", t.peft_name())))?;
                let w = cfg.init_weights(lin.in_features(), lin.out_features(), rng, dtype, &device)?;
                lin.lora = Some(w);
            }
        }
        Ok(())
    }

    /// Attaches a loaded adapter (`module path -> (A, B)`), checking that every module exists
    /// and every shape fits. The adapter tensors become trainable variables.
    pub fn set_adapter(&mut self, adapter: &crate::lora::Adapter, origin: &std::path::Path) -> Result<()> {
        self.remove_lora();
        let cfg = &adapter.config;
        let device = self.device.clone();
        let dtype = crate::kernels::compute_dtype(self.dtype);
        let mut used = 0;
        for l in 0..self.layers.len() {
            for &t in &cfg.targets {
                let module = t.module_path(l);
                let Some((a, b)) = adapter.weights.get(&module) else {
                    continue;
                };
                let Some(lin) = self.linear_mut(l, t) else {
                    return Err(Error::invalid(
                        origin,
                        "field `target_modules`",
                        format!(
                            "`{}` does not exist in this {} model (it has {}); was the adapter trained for another base model?",
                            t.peft_name(),
                            self.cfg.family.name(),
                            self.projections().iter().map(|t| t.peft_name()).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                };
                let (inp, out) = (lin.in_features(), lin.out_features());
                if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
                    return Err(Error::ShapeMismatch {
                        path: origin.to_path_buf(),
                        tensor: format!("{module}.lora_A/lora_B"),
                        expected: vec![cfg.r, inp, out, cfg.r],
                        found: [a.dims(), b.dims()].concat(),
                    });
                }
                lin.lora = Some(LoraWeights {
                    a: candle_core::Var::from_tensor(&a.to_device(&device)?.to_dtype(dtype)?)?,
                    b: candle_core::Var::from_tensor(&b.to_device(&device)?.to_dtype(dtype)?)?,
                    scale: cfg.scale(),
                    dropout: cfg.dropout,
                });
                used += 1;
            }
        }
        if used != adapter.weights.len() {
            return Err(Error::invalid(
                origin,
                "adapter",
                format!(
                    "{} of its {} LoRA modules do not exist in this model (was it trained for another base model?)",
                    adapter.weights.len() - used,
                    adapter.weights.len()
                ),
            ));
        }
        Ok(())
    }

    /// The same model with its adapters switched off: the base model, as PEFT's
    /// `disable_adapter()` gives it. The frozen weights are shared, not copied (tensors are
    /// reference-counted), so this costs a few hundred handles; DPO's reference model.
    pub fn without_adapters(&self) -> Transformer {
        let mut base = self.clone();
        base.remove_lora();
        base
    }

    pub fn remove_lora(&mut self) {
        for l in 0..self.layers.len() {
            for &t in self.projections() {
                if let Some(lin) = self.linear_mut(l, t) {
                    lin.lora = None;
                }
            }
        }
    }

    /// Every adapter with its Hugging Face module path, in a fixed order (layer, then target).
    pub fn lora_weights(&self) -> Vec<(String, &LoraWeights)> {
        let mut out = vec![];
        for l in 0..self.layers.len() {
            for &t in self.projections() {
                if let Some(w) = self.linear_ref(l, t).and_then(|lin| lin.lora.as_ref()) {
                    out.push((t.module_path(l), w));
                }
            }
        }
        out
    }

    /// The trainable variables (A then B of each adapter, in `lora_weights` order).
    pub fn trainable_vars(&self) -> Vec<candle_core::Var> {
        self.lora_weights()
            .into_iter()
            .flat_map(|(_, w)| [w.a.clone(), w.b.clone()])
            .collect()
    }

    /// Base weights with every adapter folded in (`W + scale·B·A`), by Hugging Face name.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.layers.iter().enumerate() {
            out.extend(b.norms(l).into_iter().map(|(name, n)| (name, n.weight.clone())));
            for &t in self.projections() {
                let Some(lin) = self.linear_ref(l, t) else { continue };
                let module = t.module_path(l);
                out.push((format!("{module}.weight"), lin.merged_weight()?));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{module}.bias"), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        Ok(out)
    }

    /// Final-normed hidden states `[b, t, hidden]` for token ids `[b, t]` at positions 0..t.
    /// Right padding is safe: with a causal mask, real tokens never attend to later pads.
    pub fn hidden_states(&self, input_ids: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.hidden_states_packed(input_ids, None, ctx)
    }

    /// [`Transformer::hidden_states`] of packed rows: with `segments`, each row holds several
    /// examples, every one attending only to itself at positions restarting from 0.
    pub fn hidden_states_packed(
        &self,
        input_ids: &Tensor,
        segments: Option<&Segments>,
        ctx: &mut ForwardCtx,
    ) -> Result<Tensor> {
        let (mut x, tables) = self.embed_for_training(input_ids, segments)?;
        for l in 0..self.layers.len() {
            x = self.block_forward(l, &x, &tables, ctx)?;
        }
        self.final_norm(&x)
    }

    /// Decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The first block's input `[b, t, hidden]` for token ids `[b, t]` (no gradient: the
    /// embedding is frozen) and the rotary tables of positions `0..t` that
    /// [`Transformer::block_forward`] needs. With [`Transformer::block_forward`] and
    /// [`Transformer::final_norm`], the pieces of [`Transformer::hidden_states`], for a loop that
    /// runs (and reruns) the blocks one at a time: activation checkpointing. With `segments`
    /// (packed rows) the tables carry them to every block.
    pub fn embed_for_training(&self, input_ids: &Tensor, segments: Option<&Segments>) -> Result<(Tensor, RopeTables)> {
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::config(
                "seq_len",
                format!(
                    "{t} tokens exceed the model's context length of {}",
                    self.cfg.max_position_embeddings
                ),
            ));
        }
        let mut tables = match segments {
            None => self.rope_tables_from(0, t)?,
            Some(seg) => {
                if seg.dims() != (b, t) {
                    return Err(Error::Data(format!(
                        "packed segments describe {:?} rows, the batch is {:?}",
                        seg.dims(),
                        (b, t)
                    )));
                }
                // LongRoPE picks its factors by the longest position, as for each example alone.
                self.rope_tables(0, t, seg.longest())?
            }
        };
        tables.segments = segments.cloned();
        let x = self
            .embed_tokens(&input_ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden_size))?;
        Ok((x, tables))
    }

    /// Whether this is an f32 model over bf16 weights (`--precision bf16` on the CPU): its
    /// attention keeps its probabilities for the backward pass in bf16, as PyTorch's bf16 run.
    fn bf16_base(&self) -> bool {
        self.dtype == DType::F32 && self.embed.dtype() == DType::BF16
    }

    /// Decoder block `l` on `x: [b, t, hidden]` at positions 0..t (causal, no cache).
    pub fn block_forward(&self, l: usize, x: &Tensor, tables: &RopeTables, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let cfg = &self.cfg;
        let block = self
            .layers
            .get(l)
            .ok_or_else(|| Error::config("layer", format!("the model has no block {l}")))?;
        let heads = Heads {
            q_heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            window: cfg.window(l),
            bf16_probabilities: self.bf16_base(),
        };
        let (cos, sin) = tables.for_layer(cfg, l);
        let hs = block.input_norm.forward(x, cfg.rms_norm_eps)?;
        let (q, k, v) = block.attn.qkv.forward(&hs, ctx)?;
        let (q, k) = block.attn.norm_qk(q, k, cfg.head_dim, cfg.rms_norm_eps)?;
        let y = attention(
            &q,
            &k,
            &v,
            cos,
            sin,
            heads,
            cfg.attention_scale(),
            tables.segments.as_ref(),
        )?;
        let y = block.attn.o.forward(&y, ctx)?;
        let x = block.add_attention(x.clone(), y, cfg.rms_norm_eps)?;
        block.mlp_residual(x, cfg, ctx)
    }

    /// The final norm applied to the last block's output.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x, self.cfg.rms_norm_eps)
    }

    /// Token embeddings of `ids` `[n]` → `[n, hidden]`, scaled by √hidden for Gemma (the scale
    /// rounded to the weights' dtype first, as transformers does).
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        // bf16 embeddings under an f32 model (bf16 on the CPU) are widened as they are looked up.
        let x = self.embed.embedding(ids)?.to_dtype(self.dtype)?;
        if !self.cfg.embed_scale {
            return Ok(x);
        }
        let scale = (self.cfg.hidden_size as f64).sqrt() as f32;
        let scale = Tensor::new(scale, &self.device)?.to_dtype(self.dtype)?;
        Ok(x.broadcast_mul(&scale)?)
    }

    /// Rotary tables for positions `start..start + t`, rows as `ops::rope` expects them, for
    /// each rotary setting the model has.
    fn rope_tables_from(&self, start: usize, t: usize) -> candle_core::Result<RopeTables> {
        self.rope_tables(start, t, start + t)
    }

    /// [`Transformer::rope_tables_from`] with the full-attention frequencies of a forward whose
    /// positions end at `end` (LongRoPE's choice of factors).
    fn rope_tables(&self, start: usize, t: usize, end: usize) -> candle_core::Result<RopeTables> {
        let global = self.rope_table(self.rope.global_for(end), start, t)?;
        let local = match &self.rope.local {
            Some(f) => Some(self.rope_table(f, start, t)?),
            None => None,
        };
        let identity = if self.cfg.rope_layers.contains(&false) {
            let half = self.rope.global.len();
            Some((
                Tensor::ones((t, half), self.dtype, &self.device)?,
                Tensor::zeros((t, half), self.dtype, &self.device)?,
            ))
        } else {
            None
        };
        Ok(RopeTables {
            segments: None,
            global,
            local,
            identity,
        })
    }

    fn rope_table(&self, inv_freq: &[f32], start: usize, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        let scale = self.rope.table_scale;
        for p in start..start + t {
            for f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * scale);
                sin.push(a.sin() * scale);
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Inference forward for one sequence: runs `ids` at positions `cache.len()..`, appends
    /// their keys and values to `cache`, and returns the logits of the new positions
    /// `[ids.len(), vocab]`. Same weights (and unmerged adapters) as [`Transformer::logits`].
    pub fn forward_with_cache(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.cached_forward(ids, cache, false)
    }

    /// Like [`Transformer::forward_with_cache`] but only the last position's logits `[vocab]`
    /// (what sampling needs; skips the `[t, vocab]` head matmul of a long prompt).
    pub fn forward_last_with_cache(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let logits = self.cached_forward(ids, cache, true)?;
        Ok(logits.squeeze(0)?)
    }

    fn cached_forward(&self, ids: &[u32], cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        let t = ids.len();
        if t == 0 {
            return Err(Error::config("prompt", "no tokens to run"));
        }
        let past = cache.len();
        let cfg = &self.cfg;
        if let Some(r) = &cfg.longrope {
            let switch = r.original_max_position_embeddings;
            if past > 0 && past <= switch && past + t > switch && cache.ids.len() == past {
                // The sequence passes the pretraining context: every position is run again with
                // the long factors, as transformers' Phi-3 `generate` drops its cache here
                // (`prepare_inputs_for_generation`), so cached decoding equals recomputation.
                let mut all = std::mem::take(&mut cache.ids);
                all.extend_from_slice(ids);
                cache.clear();
                let logits = self.cached_forward(&all, cache, last_only)?;
                return Ok(if last_only { logits } else { logits.narrow(0, past, t)? });
            }
        }
        if past + t > cfg.max_position_embeddings {
            return Err(Error::config(
                "context",
                format!(
                    "{} tokens exceed the model's context length of {}",
                    past + t,
                    cfg.max_position_embeddings
                ),
            ));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let tables = self.rope_tables_from(past, t)?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let n_rep = nh / nkv;
        let scale = cfg.attention_scale();
        let total = past + t;
        // Query row r of a kv group is query position p = past + r % t; it sees keys 0..=p, or
        // in a sliding-window layer only the last `window` of them.
        let mask = |window: Option<usize>| -> Result<Option<Tensor>> {
            let w = window.unwrap_or(total).max(1);
            if t == 1 && total <= w {
                return Ok(None);
            }
            let m: Vec<f32> = (0..n_rep * t)
                .flat_map(|r| {
                    let p = past + r % t;
                    (0..total).map(move |j| if j <= p && p - j < w { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            Ok(Some(
                Tensor::from_vec(m, (n_rep * t, total), &self.device)?.to_dtype(self.dtype)?,
            ))
        };
        let ctx = &mut ForwardCtx::eval();
        let input = Tensor::from_slice(ids, t, &self.device)?;
        let mut x = self.embed_tokens(&input)?.reshape((1, t, cfg.hidden_size))?;
        // One decoded token on the CPU in f32 attends with `decode_attention`, which applies the
        // causal window itself: no masks to build.
        let one_token = t == 1 && decode_attention_supported(&x);
        let (full_mask, window_mask) = match (one_token, cfg.sliding_window) {
            (true, _) => (None, None),
            (false, Some(w)) => (mask(None)?, mask(Some(w))?),
            (false, None) => (mask(None)?, None),
        };
        for (l, (block, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let (cos, sin) = tables.for_layer(cfg, l);
            let hs = block.input_norm.forward(&x, cfg.rms_norm_eps)?;
            let (q, k, v) = block.attn.qkv.forward(&hs, ctx)?;
            let (q, k) = block.attn.norm_qk(q, k, hd, cfg.rms_norm_eps)?;
            let q = q.reshape((1, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((1, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = ops::rope(&q, cos, sin)?;
            let k = ops::rope(&k, cos, sin)?;
            // Detached: an adapter's A and B are variables, so every op after them records its
            // inputs for backprop; a cache entry holding that graph would keep every earlier
            // step's activations and caches alive (measured: 2.4 GB and 2.5x slower decoding).
            let (k, v) = KvCache::append(slot, past, &k.detach(), &v.detach())?;
            let y = if one_token {
                // One decoded token: scores, softmax and values in one pass over the cache.
                decode_attention(&q, &k, &v, cfg.window(l), scale)?
            } else {
                let q = (q * scale)?;
                let mask = match cfg.window(l) {
                    Some(_) => &window_mask,
                    None => &full_mask,
                };
                // Grouped-query attention without copying k/v per head: the n_rep query heads
                // that share a kv head become n_rep·t rows of one matmul.
                let q = q.reshape((1, nkv, n_rep * t, hd))?;
                let scores = q.matmul(&k.t()?)?;
                let scores = match mask {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                let att = candle_nn::ops::softmax_last_dim(&scores)?;
                att.matmul(&v)?
                    .reshape((1, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((1, t, nh * hd))?
            };
            let y = block.attn.o.forward(&y, ctx)?;
            x = block.add_attention(x, y, cfg.rms_norm_eps)?;
            // Detached for the same reason as the cache: each block's activations are freed
            // when the next block starts instead of at the end of the forward.
            x = block.mlp_residual(x, cfg, ctx)?.detach();
        }
        cache.len = total;
        cache.ids.extend_from_slice(ids);
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        let h = self.norm.forward(&x, cfg.rms_norm_eps)?;
        Ok(self.lm_head(&h)?.squeeze(0)?)
    }

    /// A copy with every adapter folded into the base weights (faster to run; the shared base
    /// is not modified).
    pub fn merged(&self) -> Result<Transformer> {
        let tensors = self.merged_weights()?.into_iter().collect();
        let src = crate::model::weights::TensorMap {
            tensors,
            origin: std::path::PathBuf::from("<merged adapter>"),
        };
        Transformer::load(&self.cfg, &src, self.dtype, &self.device)
    }

    /// Logits for hidden states `[.., hidden]` → `[.., vocab]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(crate::kernels::gemm::frozen_linear(hidden, &self.lm_head)?)
    }

    /// The output head's weight `[vocab, hidden]` (the embeddings when they are tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Logits for every position: `[b, t, vocab]`.
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, &mut ForwardCtx::eval())?;
        self.lm_head(&h)
    }
}
