//! Tiny random-weight models written to a folder in the Hugging Face layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`).
//! Tests, benchmarks and demos use them so that everything runs offline on a CPU.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::config::Family;
use crate::rng::Rng;

/// ChatML, as SmolLM2 and Qwen2.5 ship it (without the default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Special tokens of the tiny tokenizer, in id order.
pub const TINY_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Shapes of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Standard deviation of the random embedding (tiny models need large ones to learn at all).
    pub embedding_std: f32,
    pub seed: u64,
}

impl TinySpec {
    /// A 2-layer model with grouped-query attention and a byte-level vocabulary. Its embeddings
    /// are large (std 0.5) so logits can separate tokens: with std 0.02 in a 64-wide model the
    /// final norm keeps every logit below ~1 and nothing can be learned.
    pub fn new(family: Family) -> Self {
        TinySpec {
            family,
            vocab_size: 272,
            hidden_size: 64,
            intermediate_size: 128,
            // Gemma 3: five sliding layers and a full one; SmolLM3: three rotary layers and a NoPE one.
            num_hidden_layers: match family {
                Family::Gemma3 => 6,
                Family::SmolLM3 => 4,
                _ => 2,
            },
            num_attention_heads: 4,
            num_key_value_heads: 2,
            // Small Llama and Qwen3 checkpoints tie the head to the embedding; Qwen2.5 ones differ by size.
            tie_word_embeddings: family != Family::Qwen2,
            max_position_embeddings: 1024,
            embedding_std: 0.5,
            seed: 42,
        }
    }

    /// The shapes of a released model, by name, for `finch bench train --preset` (random
    /// weights, so sizes are measured without a download): `smollm2-135m`, `qwen2.5-0.5b`,
    /// `qwen2.5-1.5b`, `llama3.2-3b`.
    pub fn preset(name: &str) -> Result<Self> {
        let shapes = |family, vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads, kv| TinySpec {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            tie_word_embeddings: true,
            max_position_embeddings: 32768,
            embedding_std: 0.02,
            seed: 42,
        };
        Ok(match name {
            "smollm2-135m" => Self::smollm2_135m(),
            "qwen2.5-0.5b" => shapes(Family::Qwen2, 151936, 896, 4864, 24, 14, 2),
            "qwen2.5-1.5b" => shapes(Family::Qwen2, 151936, 1536, 8960, 28, 12, 2),
            "llama3.2-3b" => shapes(Family::Llama, 128256, 3072, 8192, 28, 24, 8),
            other => {
                return Err(Error::config(
                    "preset",
                    format!("`{other}` is not one of smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b, llama3.2-3b"),
                ))
            }
        })
    }

    /// The weights as a [`crate::model::weights::WeightSource`] that draws each tensor when it
    /// is asked for (seeded by its name), so a multi-billion-parameter random model never exists
    /// twice in memory (a quantized base keeps only its blocks).
    pub fn lazy_weights(&self) -> LazyRandomWeights {
        LazyRandomWeights { spec: self.clone() }
    }

    /// SmolLM2-135M's exact shapes (used by `finch bench train` without `--model`).
    pub fn smollm2_135m() -> Self {
        TinySpec {
            family: Family::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            embedding_std: 0.02,
            seed: 42,
        }
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut v = self.base_config_json();
        if self.family == Family::Gemma3 {
            // Gemma 3 as transformers 5 writes it, with a window (4) shorter than test prompts so
            // the sliding layers differ from full ones (`TinySpec::new` gives it 6 layers: five
            // sliding, one full).
            if let Some(obj) = v.as_object_mut() {
                obj.remove("hidden_act");
                obj.remove("rope_theta");
            }
            v["hidden_activation"] = json!("gelu_pytorch_tanh");
            v["head_dim"] = json!(self.hidden_size / self.num_attention_heads);
            v["query_pre_attn_scalar"] = json!(self.hidden_size / self.num_attention_heads);
            v["sliding_window"] = json!(4);
            // Every sixth layer global, as in every Gemma 3 (and as llama.cpp assumes).
            v["layer_types"] = json!((0..self.num_hidden_layers)
                .map(|l| if (l + 1) % 6 == 0 {
                    "full_attention"
                } else {
                    "sliding_attention"
                })
                .collect::<Vec<_>>());
            v["rope_parameters"] = json!({
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            });
            v["final_logit_softcapping"] = serde_json::Value::Null;
            v["attn_logit_softcapping"] = serde_json::Value::Null;
        }
        if self.family == Family::Phi3 {
            // Phi-4-mini's layout: rotary on 3/4 of each head, LongRoPE with a short pretraining
            // context (64) so that prompts past it take the long factors.
            let half = (self.hidden_size / self.num_attention_heads) * 3 / 8;
            v["partial_rotary_factor"] = json!(0.75);
            v["original_max_position_embeddings"] = json!(64);
            v["rope_scaling"] = json!({
                "type": "longrope",
                "short_factor": (0..half).map(|i| 1.0 + 0.25 * i as f64).collect::<Vec<_>>(),
                "long_factor": (0..half).map(|i| 1.5 + 2.0 * i as f64).collect::<Vec<_>>(),
            });
        }
        if self.family == Family::Qwen2 {
            // Fields Qwen2's config.json always carries (candle-transformers requires them).
            v["sliding_window"] = json!(self.max_position_embeddings);
            v["max_window_layers"] = json!(self.num_hidden_layers);
            v["use_sliding_window"] = json!(false);
        }
        v
    }

    fn base_config_json(&self) -> serde_json::Value {
        let (model_type, arch) = match self.family {
            Family::Llama => ("llama", "LlamaForCausalLM"),
            Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            Family::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
            Family::SmolLM3 => ("smollm3", "SmolLM3ForCausalLM"),
            Family::Phi3 => ("phi3", "Phi3ForCausalLM"),
        };
        json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        })
    }

    /// Random weights with Hugging Face names (normal, std 0.02; norms near 1).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut rng = Rng::new(self.seed);
        let dev = Device::Cpu;
        let mut out = HashMap::new();
        let h = self.hidden_size;
        let hd = h / self.num_attention_heads;
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let i = self.intermediate_size;
        // Gemma's norms multiply by (1 + w): its weights sit near 0, not 1.
        let norm_centre = if self.family == Family::Gemma3 { 0.0 } else { 1.0 };
        let mut put = |name: String, shape: &[usize], kind: Init| -> Result<()> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = match kind {
                Init::Normal(std) => (0..n).map(|_| normal(&mut rng) * std).collect(),
                Init::Norm => (0..n).map(|_| norm_centre + 0.1 * normal(&mut rng)).collect(),
            };
            out.insert(name, Tensor::from_vec(data, shape, &dev)?);
            Ok(())
        };
        put(
            "model.embed_tokens.weight".into(),
            &[self.vocab_size, h],
            Init::Normal(self.embedding_std),
        )?;
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), &[h], Init::Norm)?;
            put(format!("{p}.post_attention_layernorm.weight"), &[h], Init::Norm)?;
            if self.family == Family::Gemma3 {
                put(format!("{p}.pre_feedforward_layernorm.weight"), &[h], Init::Norm)?;
                put(format!("{p}.post_feedforward_layernorm.weight"), &[h], Init::Norm)?;
            }
            if self.family.fused_projections() {
                put(
                    format!("{p}.self_attn.qkv_proj.weight"),
                    &[q + 2 * kv, h],
                    Init::Normal(0.02),
                )?;
            } else {
                put(format!("{p}.self_attn.q_proj.weight"), &[q, h], Init::Normal(0.02))?;
                put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], Init::Normal(0.02))?;
                put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], Init::Normal(0.02))?;
            }
            put(format!("{p}.self_attn.o_proj.weight"), &[h, q], Init::Normal(0.02))?;
            if matches!(self.family, Family::Qwen3 | Family::Gemma3) {
                put(format!("{p}.self_attn.q_norm.weight"), &[hd], Init::Norm)?;
                put(format!("{p}.self_attn.k_norm.weight"), &[hd], Init::Norm)?;
            }
            if self.family == Family::Qwen2 {
                put(format!("{p}.self_attn.q_proj.bias"), &[q], Init::Normal(0.02))?;
                put(format!("{p}.self_attn.k_proj.bias"), &[kv], Init::Normal(0.02))?;
                put(format!("{p}.self_attn.v_proj.bias"), &[kv], Init::Normal(0.02))?;
            }
            if self.family.fused_projections() {
                put(format!("{p}.mlp.gate_up_proj.weight"), &[2 * i, h], Init::Normal(0.02))?;
            } else {
                put(format!("{p}.mlp.gate_proj.weight"), &[i, h], Init::Normal(0.02))?;
                put(format!("{p}.mlp.up_proj.weight"), &[i, h], Init::Normal(0.02))?;
            }
            put(format!("{p}.mlp.down_proj.weight"), &[h, i], Init::Normal(0.02))?;
        }
        put("model.norm.weight".into(), &[h], Init::Norm)?;
        if !self.tie_word_embeddings {
            put("lm_head.weight".into(), &[self.vocab_size, h], Init::Normal(0.02))?;
        }
        Ok(out)
    }

    /// Writes a complete model folder into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create model folder", e))?;
        let write = |name: &str, text: String| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, "cannot write", e))
        };
        write("config.json", pretty(&self.config_json()))?;
        write("tokenizer.json", pretty(&tiny_tokenizer_json()))?;
        write(
            "tokenizer_config.json",
            pretty(&json!({
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": CHATML_TEMPLATE,
                "model_max_length": self.max_position_embeddings,
            })),
        )?;
        write(
            "generation_config.json",
            pretty(&json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})),
        )?;
        let weights = self.weights()?;
        candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
        Ok(())
    }
}

enum Init {
    Normal(f32),
    Norm,
}

fn normal(rng: &mut Rng) -> f32 {
    // Box–Muller.
    let u1 = rng.next_f32().max(1e-7);
    let u2 = rng.next_f32();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// GPT-2's reversible map from bytes to printable characters (used by byte-level BPE).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut out = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            out[b as usize] = char::from_u32(256 + extra).unwrap_or('?');
            extra += 1;
        } else {
            out[b as usize] = char::from_u32(b).unwrap_or('?');
        }
    }
    out
}

/// A byte-level BPE tokenizer with the three ChatML special tokens (ids 0–2) and the 256 byte
/// symbols (ids 3–258), without merges: every byte is one token. Small, but it round-trips any
/// UTF-8 text exactly, like the real tokenizers it stands in for.
pub fn tiny_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    for (id, tok) in TINY_SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(tok.to_string(), json!(id));
        added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}));
    }
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(TINY_SPECIAL_TOKENS.len() + b));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes a tiny Llama into `dir` that answers every chat prompt with the same text, the
/// concatenation of `pieces`, under greedy decoding or any temperature. Tests use it to drive
/// generation pipelines through a real model folder (loading, chat template, decoding) to a
/// known reply.
///
/// How: each piece is one (non-special) added token of the tokenizer, and the weights are a
/// bigram table. Every layer's output projections are zero, so the last hidden state is the
/// current token's embedding; the chain's tokens (the `\n` that ends ChatML's
/// `<|im_start|>assistant\n`, then each piece) have one-hot embeddings, and the untied head
/// maps each to the next piece with a logit of 32 (the last piece to `<|im_end|>`), every other
/// logit being 0. The prompt matters only through its last token, which the template fixes.
pub fn write_fixed_reply_model(dir: &Path, pieces: &[&str]) -> Result<()> {
    let first_added = (TINY_SPECIAL_TOKENS.len() + 256) as u32;
    let mut spec = TinySpec::new(Family::Llama);
    spec.tie_word_embeddings = false;
    // Room for the generators' longest prompts (Humpback's rating) in a byte-level vocabulary.
    spec.max_position_embeddings = 4096;
    spec.vocab_size = spec.vocab_size.max(first_added as usize + pieces.len());
    let h = spec.hidden_size;
    if pieces.is_empty() || pieces.len() + 1 > h {
        return Err(Error::Data(format!(
            "a fixed-reply model needs 1 to {} pieces, got {}",
            h - 1,
            pieces.len()
        )));
    }
    spec.write(dir)?;
    let mut tokenizer = tiny_tokenizer_json();
    if let Some(added) = tokenizer["added_tokens"].as_array_mut() {
        for (k, piece) in pieces.iter().enumerate() {
            added.push(
                json!({"id": first_added as usize + k, "content": piece, "single_word": false,
                              "lstrip": false, "rstrip": false, "normalized": false, "special": false}),
            );
        }
    }
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, pretty(&tokenizer)).map_err(|e| Error::io(&path, "cannot write", e))?;

    let dev = Device::Cpu;
    let mut weights = spec.weights()?;
    for l in 0..spec.num_hidden_layers {
        for name in ["self_attn.o_proj", "mlp.down_proj"] {
            let key = format!("model.layers.{l}.{name}.weight");
            if let Some(w) = weights.get(&key) {
                let zero = w.zeros_like()?;
                weights.insert(key, zero);
            }
        }
    }
    weights.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, candle_core::DType::F32, &dev)?,
    );
    let newline = TINY_SPECIAL_TOKENS.len() as u32 + u32::from(b'\n');
    let eos = 2u32; // <|im_end|>
    let chain: Vec<u32> = std::iter::once(newline)
        .chain((0..pieces.len() as u32).map(|k| first_added + k))
        .collect();
    let mut embed = vec![0f32; spec.vocab_size * h];
    let mut head = vec![0f32; spec.vocab_size * h];
    for (dim, &token) in chain.iter().enumerate() {
        embed[token as usize * h + dim] = 1.0;
        let next = chain.get(dim + 1).copied().unwrap_or(eos);
        // The final norm scales a one-hot vector to sqrt(h) = 8: a logit of 32.
        head[next as usize * h + dim] = 4.0;
    }
    weights.insert(
        "model.embed_tokens.weight".into(),
        Tensor::from_vec(embed, (spec.vocab_size, h), &dev)?,
    );
    weights.insert(
        "lm_head.weight".into(),
        Tensor::from_vec(head, (spec.vocab_size, h), &dev)?,
    );
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// Random weights drawn on request: see [`TinySpec::lazy_weights`].
pub struct LazyRandomWeights {
    spec: TinySpec,
}

impl crate::model::weights::WeightSource for LazyRandomWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: candle_core::DType, device: &Device) -> Result<Tensor> {
        // FNV-1a of the name: each tensor its own stream, the same on every run.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ self.spec.seed, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * normal(&mut rng)).collect()
        } else if name == "model.embed_tokens.weight" {
            (0..n).map(|_| normal(&mut rng) * self.spec.embedding_std).collect()
        } else {
            (0..n).map(|_| normal(&mut rng) * 0.02).collect()
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        !(name == "lm_head.weight" && self.spec.tie_word_embeddings)
    }

    fn origin(&self) -> &Path {
        Path::new("random weights")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_tokenizer_round_trips_text_and_specials() {
        let dir = tempfile::tempdir().unwrap();
        TinySpec::new(Family::Llama).write(dir.path()).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let text = "<|im_start|>user\nHéllo, wörld! 😀<|im_end|>\n";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids()[0], 1);
        assert!(enc.get_ids().contains(&2));
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
}
