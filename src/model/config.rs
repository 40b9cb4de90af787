//! The normalized model configuration: one struct for every supported family, parsed from a
//! Hugging Face `config.json` (or the equivalent JSON that the GGUF loader rebuilds from
//! GGUF metadata). Family-specific quirks become explicit flags here so the transformer
//! code never has to know which family it runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The model families Finch can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    /// Gemma 3 text models (`Gemma3ForCausalLM`, `gemma3_text`: Gemma-3-270M, 1B).
    Gemma3,
    /// SmolLM3 (`SmolLM3ForCausalLM`): Llama with rotary skipped on the layers `no_rope_layers` marks.
    SmolLM3,
    /// Phi-3 (`Phi3ForCausalLM`: Phi-3/3.5-mini, Phi-4-mini): fused `qkv_proj` and `gate_up_proj`,
    /// partial rotary, LongRoPE.
    Phi3,
}

impl Family {
    pub const SUPPORTED: &'static str =
        "llama (SmolLM, SmolLM2, TinyLlama, Llama 3.x), qwen2 (Qwen2, Qwen2.5), qwen3 (Qwen3 dense), gemma3_text (Gemma 3 270M, 1B), smollm3 (SmolLM3), phi3 (Phi-3/3.5-mini, Phi-4-mini)";

    /// Maps a `model_type` (or `architectures[0]`) to a family.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        match model_type {
            "llama" | "LlamaForCausalLM" => Some(Family::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Some(Family::Qwen2),
            "qwen3" | "Qwen3ForCausalLM" => Some(Family::Qwen3),
            // `gemma3` is llama.cpp's GGUF architecture name for the same text model.
            "gemma3_text" | "gemma3" | "Gemma3ForCausalLM" => Some(Family::Gemma3),
            "smollm3" | "SmolLM3ForCausalLM" => Some(Family::SmolLM3),
            "phi3" | "Phi3ForCausalLM" => Some(Family::Phi3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
            Family::SmolLM3 => "smollm3",
            Family::Phi3 => "phi3",
        }
    }

    /// Whether q/k/v and gate/up are one matrix each (`qkv_proj`, `gate_up_proj`), as LoRA
    /// targets and in checkpoints.
    pub fn fused_projections(self) -> bool {
        self == Family::Phi3
    }

    /// llama.cpp's `general.architecture` for this family.
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3",
            other => other.name(),
        }
    }

    /// The `architectures[0]` transformers writes for this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::SmolLM3 => "SmolLM3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// Llama 3.x style rope scaling (`rope_type: "llama3"`); other kinds are rejected at load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Phi-3's LongRoPE (`rope_type: "longrope"`, formerly `"su"`): per-frequency divisors, the
/// short set for sequences up to `original_max_position_embeddings` tokens and the long set
/// beyond, with cos and sin multiplied by `attention_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// transformers' `attention_factor`: given, or `sqrt(1 + ln(factor) / ln(original))` with
    /// `factor = max_position_embeddings / original_max_position_embeddings` (1 when ≤ 1).
    pub attention_factor: f64,
}

/// The gate activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu(gate) · up` (Llama, Qwen).
    #[default]
    Silu,
    /// `gelu_tanh(gate) · up` (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// The attention of one layer: over every earlier position, or over the last `sliding_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    FullAttention,
    SlidingAttention,
}

/// Everything the transformer needs to know about a model's shapes and numerics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2, or Llama with `attention_bias: true`).
    pub qkv_bias: bool,
    /// Bias on the o projection (Llama with `attention_bias: true`).
    pub o_bias: bool,
    /// Bias on the gate/up/down projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// RMS norm over each head of q and k before rotary (Qwen3 `q_norm` / `k_norm`).
    #[serde(default)]
    pub qk_norm: bool,
    #[serde(default)]
    pub activation: Activation,
    /// RMS norms multiply by `1 + w` (Gemma stores the weights centred on 0), computed in f32.
    #[serde(default)]
    pub norm_plus_one: bool,
    /// Gemma's four norms per block: the attention and MLP outputs are normed before they join
    /// the residual (`post_attention_layernorm`, `post_feedforward_layernorm`) and the MLP input
    /// has its own norm (`pre_feedforward_layernorm`).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// Token embeddings are multiplied by √hidden_size (rounded to the weights' dtype, as
    /// transformers does).
    #[serde(default)]
    pub embed_scale: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` when set, else `head_dim^-0.5`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// One entry per layer; empty means every layer attends to all earlier positions.
    #[serde(default)]
    pub layer_types: Vec<LayerType>,
    /// How many positions (the query's own included) a sliding-attention layer sees.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Rotary base of sliding-attention layers (Gemma 3 `rope_local_base_freq`, default rotary).
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// Linear rope scaling of the full-attention layers (positions divided by `factor`).
    #[serde(default)]
    pub rope_linear_factor: Option<f64>,
    /// One entry per layer: whether it applies rotary embeddings (SmolLM3's NoPE layers do not);
    /// empty means every layer does.
    #[serde(default)]
    pub rope_layers: Vec<bool>,
    /// Rotated dimensions per head when fewer than `head_dim` (Phi-3 `partial_rotary_factor`).
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// Phi-3 LongRoPE scaling.
    #[serde(default)]
    pub longrope: Option<LongRope>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The padding id the checkpoint's config names, carried into exported configs (the
    /// default transformers fills in differs by family and may lie outside the vocabulary).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// The raw fields of a `config.json` that Finch reads. Fields that change the math and that
/// Finch does not implement are read too, so that a config using them is refused by name rather
/// than silently run differently from transformers; other unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x: `{rope_theta, rope_type, …scaling fields}` instead of the two above.
    rope_parameters: Option<serde_json::Value>,
    layer_types: Option<Vec<String>>,
    use_sliding_window: Option<bool>,
    partial_rotary_factor: Option<f64>,
    attn_logit_softcapping: Option<serde_json::Value>,
    final_logit_softcapping: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    /// Gemma's name for the MLP activation (transformers' Gemma 3 reads only this one).
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    /// Older Gemma 3 configs: every `sliding_window_pattern`-th layer is global, the rest local.
    sliding_window_pattern: Option<usize>,
    /// Gemma 3 (transformers 4.x layout): rotary base of the sliding layers.
    rope_local_base_freq: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    /// SmolLM3: 1 where a layer applies rotary embeddings, 0 for NoPE layers.
    no_rope_layers: Option<Vec<serde_json::Value>>,
    /// SmolLM3 without `no_rope_layers`: every `no_rope_layer_interval`-th layer is NoPE.
    no_rope_layer_interval: Option<usize>,
    /// Phi-3: the pretraining context, which LongRoPE's short/long switch and attention factor use.
    original_max_position_embeddings: Option<usize>,
    /// Multimodal configs (Gemma 3 4B and up) nest the text model here.
    text_config: Option<serde_json::Value>,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read model config", e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(path, "JSON", format!("line {} column {}: {e}", e.line(), e.column())))?;
        Self::from_json(&value, path)
    }

    /// Validates a parsed `config.json`. `path` is only used in error messages.
    pub fn from_json(value: &serde_json::Value, path: &Path) -> Result<Self> {
        let raw: HfConfig =
            serde_json::from_value(value.clone()).map_err(|e| Error::invalid(path, "model config", e.to_string()))?;
        let arch = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .ok_or_else(|| Error::invalid(path, "model config", "neither `model_type` nor `architectures` is set"))?;
        let family = Family::from_model_type(&arch).ok_or_else(|| Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch: arch.clone(),
            supported: Family::SUPPORTED.to_string(),
        })?;
        if raw.text_config.is_some() {
            return Err(Error::invalid(
                path,
                "field `text_config`",
                format!(
                    "`{arch}` is a multimodal model; Finch tunes text-only models (for Gemma 3: gemma3_text, 270M and 1B)"
                ),
            ));
        }
        let need = |field: &str, v: Option<usize>| -> Result<usize> {
            match v {
                Some(0) => Err(Error::invalid(
                    path,
                    format!("field `{field}`"),
                    "must be greater than 0",
                )),
                Some(x) => Ok(x),
                None => Err(Error::invalid(path, format!("field `{field}`"), "is missing")),
            }
        };
        let hidden_size = need("hidden_size", raw.hidden_size)?;
        let num_attention_heads = need("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::invalid(
                path,
                "field `num_key_value_heads`",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::invalid(
                        path,
                        "field `hidden_size`",
                        format!("{hidden_size} is not a multiple of num_attention_heads = {num_attention_heads}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::invalid(
                path,
                "field `head_dim`",
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }
        let activation = if family == Family::Gemma3 {
            match raw.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh") {
                "gelu_pytorch_tanh" => Activation::GeluTanh,
                other => {
                    return Err(Error::invalid(
                        path,
                        "field `hidden_activation`",
                        format!("`{other}` is not supported (only gelu_pytorch_tanh)"),
                    ))
                }
            }
        } else {
            Activation::Silu
        };
        if let (Some(act), false) = (&raw.hidden_act, family == Family::Gemma3) {
            if act != "silu" && act != "swish" {
                return Err(Error::invalid(
                    path,
                    "field `hidden_act`",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        let gemma = family == Family::Gemma3;
        let phi3 = family == Family::Phi3;
        refuse_unimplemented(&raw, path, gemma, phi3)?;
        let num_hidden_layers = need("num_hidden_layers", raw.num_hidden_layers)?;
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(if phi3 { 4096 } else { 2048 });
        let mut phi3_rope = None;
        let (rope_theta, rope_scaling, gemma_rope) = if gemma {
            let g = parse_gemma3_rope(&raw, path)?;
            (g.global_theta, None, Some(g))
        } else if phi3 {
            let p = parse_phi3_rope(&raw, head_dim, max_position_embeddings, path)?;
            let theta = p.theta;
            phi3_rope = Some(p);
            (theta, None, None)
        } else {
            let (t, s) = parse_rope(&raw, path)?;
            (t, s, None)
        };
        let layer_types = if gemma {
            gemma3_layer_types(&raw, num_hidden_layers, path)?
        } else if phi3 && raw.sliding_window.is_some() {
            // transformers' Phi-3 masks every layer to the window when `sliding_window` is set.
            vec![LayerType::SlidingAttention; num_hidden_layers]
        } else {
            vec![]
        };
        let sliding_window = if layer_types.contains(&LayerType::SlidingAttention) {
            Some(need("sliding_window", raw.sliding_window)?)
        } else {
            None
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Llama => (attention_bias, attention_bias),
            Family::Qwen2 => (true, false),
            Family::Qwen3 | Family::Gemma3 | Family::SmolLM3 => (attention_bias, attention_bias),
            Family::Phi3 => {
                // transformers' Phi-3 has no biases whatever the config says; a checkpoint that
                // sets these flags was made for other modeling code.
                for (field, on) in [
                    ("attention_bias", attention_bias),
                    ("mlp_bias", raw.mlp_bias == Some(true)),
                ] {
                    if on {
                        return Err(Error::invalid(
                            path,
                            format!("field `{field}`"),
                            "Phi-3 projections have no biases (transformers' Phi3ForCausalLM ignores it); set it to false",
                        ));
                    }
                }
                (false, false)
            }
        };
        Ok(ModelConfig {
            family,
            vocab_size: need("vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: need("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            // transformers' default when the field is absent differs by family: Gemma 3 and
            // SmolLM3 tie (gemma-3-270m's published config.json leaves the field out).
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(matches!(family, Family::Gemma3 | Family::SmolLM3)),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            activation,
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            embed_scale: gemma,
            query_pre_attn_scalar: if gemma {
                Some(raw.query_pre_attn_scalar.unwrap_or(256.0))
            } else {
                None
            },
            layer_types,
            sliding_window,
            rope_local_theta: gemma_rope.as_ref().map(|g| g.local_theta),
            rope_linear_factor: gemma_rope.and_then(|g| g.linear_factor),
            rope_layers: if family == Family::SmolLM3 {
                smollm3_rope_layers(&raw, num_hidden_layers, path)?
            } else {
                vec![]
            },
            rotary_dim: phi3_rope.as_ref().and_then(|p| p.rotary_dim),
            longrope: phi3_rope.and_then(|p| p.longrope),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
        })
    }

    /// Number of parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn =
            h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size
            + if self.mlp_bias {
                2 * self.intermediate_size + h
            } else {
                0
            };
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h };
        let layer = attn + mlp + norms + qk_norm;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        embed + self.num_hidden_layers * layer + h + head
    }
}

impl ModelConfig {
    /// The attention kind of layer `l`.
    pub fn layer_type(&self, l: usize) -> LayerType {
        self.layer_types.get(l).copied().unwrap_or(LayerType::FullAttention)
    }

    /// How many positions (its own included) a query of layer `l` sees; `None`: all earlier ones.
    pub fn window(&self, l: usize) -> Option<usize> {
        match self.layer_type(l) {
            LayerType::FullAttention => None,
            LayerType::SlidingAttention => self.sliding_window,
        }
    }

    /// Whether layer `l` applies rotary embeddings (false on SmolLM3's NoPE layers).
    pub fn uses_rope(&self, l: usize) -> bool {
        self.rope_layers.get(l).copied().unwrap_or(true)
    }

    /// Rotated dimensions per head (`head_dim` unless Phi-3's partial rotary says fewer).
    pub fn rotary_dims(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim)
    }

    /// The scale of the attention scores (`q·k · scale`).
    pub fn attention_scale(&self) -> f64 {
        1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).sqrt()
    }
}

/// Gemma 3's two rotary settings: global (full-attention) layers and local (sliding) ones.
struct Gemma3Rope {
    global_theta: f64,
    linear_factor: Option<f64>,
    local_theta: f64,
}

/// Gemma 3 rotary settings from either layout: transformers 5.x writes `rope_parameters` with one
/// object per layer type; 4.x configs (those on the Hub) have `rope_theta` + `rope_scaling` for the
/// global layers and `rope_local_base_freq` for the local ones.
fn parse_gemma3_rope(raw: &HfConfig, path: &Path) -> Result<Gemma3Rope> {
    // transformers' defaults for Gemma 3.
    let mut global_theta = raw.rope_theta.unwrap_or(1_000_000.0);
    let mut local_theta = raw.rope_local_base_freq.unwrap_or(10_000.0);
    let mut linear_factor = gemma3_scaling(raw.rope_scaling.as_ref(), "rope_scaling", path)?;
    if let Some(params) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        let obj = params
            .as_object()
            .ok_or_else(|| Error::invalid(path, "field `rope_parameters`", "must be an object"))?;
        if let Some(key) = obj.keys().find(|k| *k != "full_attention" && *k != "sliding_attention") {
            return Err(Error::invalid(
                path,
                "field `rope_parameters`",
                format!("`{key}` is not a Gemma 3 layer type (expected full_attention and sliding_attention)"),
            ));
        }
        let theta = |kind: &str| -> Result<Option<f64>> {
            match obj.get(kind).and_then(|p| p.get("rope_theta")) {
                None => Ok(None),
                Some(t) => t.as_f64().map(Some).ok_or_else(|| {
                    Error::invalid(
                        path,
                        format!("field `rope_parameters.{kind}.rope_theta`"),
                        "must be a number",
                    )
                }),
            }
        };
        if let Some(t) = theta("full_attention")? {
            global_theta = t;
        }
        if let Some(t) = theta("sliding_attention")? {
            local_theta = t;
        }
        if let Some(full) = obj.get("full_attention") {
            linear_factor = gemma3_scaling(Some(full), "rope_parameters.full_attention", path)?;
        }
        if let Some(local) = obj.get("sliding_attention") {
            if gemma3_scaling(Some(local), "rope_parameters.sliding_attention", path)?.is_some() {
                return Err(Error::invalid(
                    path,
                    "field `rope_parameters.sliding_attention.rope_type`",
                    "rope scaling on the sliding-window layers is not supported (only default)",
                ));
            }
        }
    }
    Ok(Gemma3Rope {
        global_theta,
        linear_factor,
        local_theta,
    })
}

/// The linear scaling factor of one Gemma 3 rope setting (`None` for the default rotary).
fn gemma3_scaling(v: Option<&serde_json::Value>, field: &str, path: &Path) -> Result<Option<f64>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "linear" => {
            let f = v
                .get("factor")
                .and_then(|f| f.as_f64())
                .ok_or_else(|| Error::invalid(path, format!("field `{field}.factor`"), "is missing"))?;
            Ok((f != 1.0).then_some(f))
        }
        other => Err(Error::invalid(
            path,
            format!("field `{field}.rope_type`"),
            format!("rope type `{other}` is not supported for Gemma 3 (supported: default, linear)"),
        )),
    }
}

/// Gemma 3's per-layer attention kinds: `layer_types` when given, else transformers' rule from
/// `sliding_window_pattern` (default 6: every sixth layer global, the others local).
fn gemma3_layer_types(raw: &HfConfig, layers: usize, path: &Path) -> Result<Vec<LayerType>> {
    let Some(types) = &raw.layer_types else {
        let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
        return Ok((0..layers)
            .map(|i| {
                if (i + 1) % pattern == 0 {
                    LayerType::FullAttention
                } else {
                    LayerType::SlidingAttention
                }
            })
            .collect());
    };
    if types.len() != layers {
        return Err(Error::invalid(
            path,
            "field `layer_types`",
            format!("has {} entries for {layers} layers", types.len()),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(LayerType::FullAttention),
            "sliding_attention" => Ok(LayerType::SlidingAttention),
            other => Err(Error::invalid(
                path,
                "field `layer_types`",
                format!("layer type `{other}` is not supported (full_attention, sliding_attention)"),
            )),
        })
        .collect()
}

/// SmolLM3's per-layer rotary switch: `no_rope_layers` (1: rotary, 0: NoPE) when given, else
/// transformers' rule from `no_rope_layer_interval` (default 4: every fourth layer NoPE).
fn smollm3_rope_layers(raw: &HfConfig, layers: usize, path: &Path) -> Result<Vec<bool>> {
    let Some(flags) = &raw.no_rope_layers else {
        let interval = raw.no_rope_layer_interval.unwrap_or(4).max(1);
        return Ok((0..layers).map(|i| (i + 1) % interval != 0).collect());
    };
    if flags.len() != layers {
        return Err(Error::invalid(
            path,
            "field `no_rope_layers`",
            format!("has {} entries for {layers} layers", flags.len()),
        ));
    }
    flags
        .iter()
        .map(|f| match f.as_u64() {
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            _ => Err(Error::invalid(
                path,
                "field `no_rope_layers`",
                format!("entries must be 0 or 1, found {f}"),
            )),
        })
        .collect()
}

/// Refuses config fields that change the forward pass in ways Finch does not implement.
/// `gemma`: Gemma 3's sliding-window layers are implemented (read by `gemma3_layer_types`);
/// `phi3`: Phi-3's partial rotary is (read by `parse_phi3_rope`).
fn refuse_unimplemented(raw: &HfConfig, path: &Path, gemma: bool, phi3: bool) -> Result<()> {
    if raw.use_bidirectional_attention == Some(true) {
        return Err(Error::invalid(
            path,
            "field `use_bidirectional_attention`",
            "bidirectional attention (an embedding model) is not supported",
        ));
    }
    if raw.use_sliding_window == Some(true) {
        return Err(Error::invalid(
            path,
            "field `use_sliding_window`",
            "sliding-window attention is not supported (set it to false to use full attention)",
        ));
    }
    if let Some(kind) = raw
        .layer_types
        .iter()
        .flatten()
        .find(|t| t.as_str() != "full_attention" && !gemma)
    {
        return Err(Error::invalid(
            path,
            "field `layer_types`",
            format!("layer type `{kind}` is not supported (only full_attention)"),
        ));
    }
    let nested_factor = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(|f| f.as_f64());
    if let Some(f) = raw.partial_rotary_factor.or(nested_factor).filter(|_| !phi3) {
        if f != 1.0 {
            return Err(Error::invalid(
                path,
                "field `partial_rotary_factor`",
                format!("{f} is not supported (only 1.0: rotary on the whole head)"),
            ));
        }
    }
    for (name, v) in [
        ("attn_logit_softcapping", &raw.attn_logit_softcapping),
        ("final_logit_softcapping", &raw.final_logit_softcapping),
    ] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::invalid(
                path,
                format!("field `{name}`"),
                "logit soft-capping is not supported",
            ));
        }
    }
    Ok(())
}

/// The rotary base and scaling, from either layout: top-level `rope_theta` + `rope_scaling`
/// (transformers 4.x) or `rope_parameters` (transformers 5.x). Both present must agree.
fn parse_rope(raw: &HfConfig, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let Some(params) = params else {
        let scaling = parse_rope_scaling(raw.rope_scaling.as_ref(), "rope_scaling", path)?;
        return Ok((raw.rope_theta.unwrap_or(10_000.0), scaling));
    };
    let Some(obj) = params.as_object() else {
        return Err(Error::invalid(path, "field `rope_parameters`", "must be an object"));
    };
    if obj.values().any(|v| v.is_object()) {
        return Err(Error::invalid(
            path,
            "field `rope_parameters`",
            "per-layer-type rope parameters (one set per attention kind) are not supported",
        ));
    }
    let theta = match obj.get("rope_theta") {
        Some(t) => t
            .as_f64()
            .ok_or_else(|| Error::invalid(path, "field `rope_parameters.rope_theta`", "must be a number"))?,
        None => raw.rope_theta.unwrap_or(10_000.0),
    };
    if let Some(top) = raw.rope_theta {
        if top != theta {
            return Err(Error::invalid(
                path,
                "field `rope_theta`",
                format!("{top} disagrees with `rope_parameters.rope_theta` = {theta}"),
            ));
        }
    }
    let scaling = parse_rope_scaling(Some(params), "rope_parameters", path)?;
    if let (Some(old), Some(new)) = (
        parse_rope_scaling(raw.rope_scaling.as_ref(), "rope_scaling", path)?,
        &scaling,
    ) {
        if &old != new {
            return Err(Error::invalid(
                path,
                "field `rope_scaling`",
                "disagrees with `rope_parameters` (remove one of them)",
            ));
        }
    }
    Ok((theta, scaling))
}

/// `field` names the object in error messages (`rope_scaling` or `rope_parameters`).
fn parse_rope_scaling(v: Option<&serde_json::Value>, field: &str, path: &Path) -> Result<Option<RopeScaling>> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match kind {
        // A `rope_parameters` object without `rope_type` is the default rotary.
        "default" => Ok(None),
        "" if field == "rope_parameters" => Ok(None),
        "llama3" => {
            let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
            let get = |k: &str| f(k).ok_or_else(|| Error::invalid(path, format!("field `{field}.{k}`"), "is missing"));
            Ok(Some(RopeScaling {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position_embeddings: get("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(Error::invalid(
            path,
            format!("field `{field}.rope_type`"),
            format!("rope type `{other}` is not supported (supported: default, llama3)"),
        )),
    }
}

/// Phi-3's rotary settings.
struct Phi3Rope {
    theta: f64,
    /// `None`: every dimension of a head rotates.
    rotary_dim: Option<usize>,
    longrope: Option<LongRope>,
}

/// Phi-3's rotary settings from either layout (4.x: top-level `rope_theta`,
/// `partial_rotary_factor`, `original_max_position_embeddings` and `rope_scaling`; 5.x: the same
/// inside `rope_parameters`), read the way transformers' `Phi3Config` and
/// `_compute_longrope_parameters` read them: the top-level `original_max_position_embeddings`
/// wins, `su` and `yarn` are old names of `longrope`, and a missing `factor` is
/// `max_position_embeddings / original_max_position_embeddings`.
fn parse_phi3_rope(raw: &HfConfig, head_dim: usize, max_positions: usize, path: &Path) -> Result<Phi3Rope> {
    let params = raw
        .rope_parameters
        .as_ref()
        .filter(|v| !v.is_null())
        .or(raw.rope_scaling.as_ref().filter(|v| !v.is_null()));
    let field = if raw.rope_parameters.as_ref().is_some_and(|v| !v.is_null()) {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    if let Some(p) = params {
        if !p.is_object() {
            return Err(Error::invalid(path, format!("field `{field}`"), "must be an object"));
        }
    }
    let get = |k: &str| params.and_then(|p| p.get(k)).filter(|v| !v.is_null());
    let number = |k: &str| -> Result<Option<f64>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::invalid(path, format!("field `{field}.{k}`"), "must be a number")),
        }
    };
    let theta = match (number("rope_theta")?, raw.rope_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::invalid(
                path,
                "field `rope_theta`",
                format!("{b} disagrees with `{field}.rope_theta` = {a}"),
            ))
        }
        (a, b) => a.or(b).unwrap_or(10_000.0),
    };
    let factor = match (number("partial_rotary_factor")?, raw.partial_rotary_factor) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::invalid(
                path,
                "field `partial_rotary_factor`",
                format!("{b} disagrees with `{field}.partial_rotary_factor` = {a}"),
            ))
        }
        (a, b) => a.or(b).unwrap_or(1.0),
    };
    // transformers: `dim = int(head_dim * partial_rotary_factor)`.
    let dim = (head_dim as f64 * factor) as usize;
    if !(factor > 0.0 && factor <= 1.0) || dim == 0 || dim % 2 != 0 {
        return Err(Error::invalid(
            path,
            "field `partial_rotary_factor`",
            format!("{factor} gives {dim} rotary dimensions of a {head_dim}-dimension head; it must give an even number from 2 to head_dim"),
        ));
    }
    let rotary_dim = (dim < head_dim).then_some(dim);
    let kind = get("rope_type")
        .or_else(|| get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let longrope = match kind {
        "default" => None,
        "longrope" | "su" | "yarn" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                let v = get(k).ok_or_else(|| Error::invalid(path, format!("field `{field}.{k}`"), "is missing"))?;
                let list: Option<Vec<f64>> = v.as_array().and_then(|a| a.iter().map(|x| x.as_f64()).collect());
                match list {
                    Some(l) if l.len() == dim / 2 && l.iter().all(|f| f.is_finite() && *f > 0.0) => Ok(l),
                    _ => Err(Error::invalid(
                        path,
                        format!("field `{field}.{k}`"),
                        format!("must list {} positive numbers (one per rotary frequency)", dim / 2),
                    )),
                }
            };
            let original = raw
                .original_max_position_embeddings
                .or(number("original_max_position_embeddings")?.map(|x| x as usize))
                .unwrap_or(max_positions);
            if original == 0 {
                return Err(Error::invalid(
                    path,
                    "field `original_max_position_embeddings`",
                    "must be greater than 0",
                ));
            }
            let scale = number("factor")?.unwrap_or(max_positions as f64 / original as f64);
            let attention_factor = match number("attention_factor")? {
                Some(a) => a,
                None if scale <= 1.0 => 1.0,
                None => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
            };
            Some(LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => {
            return Err(Error::invalid(
                path,
                format!("field `{field}.rope_type`"),
                format!("rope type `{other}` is not supported for Phi-3 (supported: default, longrope)"),
            ))
        }
    };
    Ok(Phi3Rope {
        theta,
        rotary_dim,
        longrope,
    })
}
