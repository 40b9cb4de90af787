//! Taking a tuned model elsewhere: the adapter as a PEFT folder, a merged Hugging Face model
//! folder, or GGUF files (f16 and q8_0) with an Ollama `Modelfile`.
//!
//! The classic failure of exported chat models is that they never stop: the runtime does not
//! know the chat template's end-of-turn token. Here the merged folder's `generation_config.json`
//! lists every end token, the GGUF's EOS is the end-of-turn token, and the `Modelfile` has a
//! `stop` parameter for each end marker and a TEMPLATE derived by rendering the model's own
//! chat template (so it writes the same text for a conversation).

pub mod handoff;
pub mod run;

pub use run::{run, ExportError, ExportEvent, ExportFormat, ExportRequest, Exported};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use serde_json::json;

use crate::data::{Message, Role};
use crate::error::{Error, Result};
use crate::generate::ChatFormat;
use crate::model::config::{Family, LayerType, ModelConfig};
use crate::model::gguf::write_gguf;
use crate::model::gguf_tokenizer::GgufTokenizerMetadata;
use crate::model::load::TemplateSource;
use crate::model::transformer::Transformer;
use crate::model::{GgufModel, ModelFiles};
use crate::template::ChatTemplate;

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create export folder", e))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::invalid(path, "JSON", e.to_string()))?;
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Copies a PEFT adapter folder's two files into `out`.
pub fn export_peft(adapter_dir: &Path, out: &Path) -> Result<()> {
    create_dir(out)?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let (from, to) = (adapter_dir.join(f), out.join(f));
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, format!("cannot copy to {}", to.display()), e))?;
    }
    Ok(())
}

/// `config.json` for `cfg` as `transformers` writes it.
pub fn hf_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let arch = cfg.family.architecture();
    let mut v = json!({
        "architectures": [arch],
        "model_type": cfg.family.name(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": "float32",
    });
    if cfg.family != Family::Qwen2 {
        v["attention_bias"] = json!(cfg.qkv_bias);
    }
    if let Some(s) = &cfg.rope_scaling {
        v["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    if cfg.family == Family::Gemma3 {
        gemma3_config_fields(cfg, &mut v);
    }
    if cfg.family == Family::Phi3 {
        phi3_config_fields(cfg, &mut v);
    }
    if cfg.family == Family::SmolLM3 {
        v["no_rope_layers"] = json!((0..cfg.num_hidden_layers)
            .map(|l| u8::from(cfg.uses_rope(l)))
            .collect::<Vec<_>>());
    }
    if let Some(b) = cfg.bos_token_id {
        v["bos_token_id"] = json!(b);
    }
    // The checkpoint's padding id; without one, a value where transformers' family default
    // lies outside smaller vocabularies (and transformers then refuses the folder):
    // Phi3Config's 32000 (the released Phi models pad with their end of text, Phi-3.5: 32000,
    // Phi-4-mini: 199999, their first eos), SmolLM3Config's 128004.
    match (cfg.pad_token_id, cfg.family) {
        (Some(p), _) => v["pad_token_id"] = json!(p),
        (None, Family::Phi3) => v["pad_token_id"] = json!(cfg.eos_token_ids.first()),
        (None, Family::SmolLM3) => v["pad_token_id"] = serde_json::Value::Null,
        (None, _) => {}
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => v["eos_token_id"] = json!(one),
        many => v["eos_token_id"] = json!(many),
    }
    v
}

fn model_dir(files: &ModelFiles) -> PathBuf {
    if files.path.is_dir() {
        files.path.clone()
    } else {
        files.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// A Hugging Face model folder with the adapter of `model` folded in: `config.json`,
/// `model.safetensors` (f32), `tokenizer.json`, `tokenizer_config.json` (with the chat
/// template), `generation_config.json` (every end token as `eos_token_id`).
pub fn export_merged(files: &ModelFiles, format: &ChatFormat, model: &Transformer, out: &Path) -> Result<()> {
    create_dir(out)?;
    write_json(&out.join("config.json"), &hf_config_json(&model.cfg))?;
    let tensors: HashMap<String, candle_core::Tensor> = model
        .merged_weights()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let st = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st)?;
    let tok = out.join("tokenizer.json");
    format
        .tokenizer
        .save(&tok, false)
        .map_err(|e| Error::invalid(&tok, "tokenizer", e.to_string()))?;
    let tc = out.join("tokenizer_config.json");
    match &files.template {
        TemplateSource::TokenizerConfig(p) => {
            std::fs::copy(p, &tc).map_err(|e| Error::io(p, format!("cannot copy to {}", tc.display()), e))?;
        }
        _ => write_json(
            &tc,
            &json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": format.template.source(),
                "bos_token": format.template.bos_token(),
                "eos_token": format.template.eos_token(),
                "model_max_length": model.cfg.max_position_embeddings,
            }),
        )?,
    }
    let gen_path = model_dir(files).join("generation_config.json");
    let mut gen = match std::fs::read_to_string(&gen_path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| Error::invalid(&gen_path, "JSON", e.to_string()))?,
        Err(_) => json!({}),
    };
    if !gen.is_object() {
        gen = json!({});
    }
    if let Some(b) = model.cfg.bos_token_id {
        gen["bos_token_id"] = json!(b);
    }
    gen["eos_token_id"] = json!(format.stop_token_ids);
    write_json(&out.join("generation_config.json"), &gen)
}

/// Phi-3's own fields, in the layout of the Hub's Phi-3.5 / Phi-4-mini configs (which
/// transformers 4.x and 5.x both read): `partial_rotary_factor`, `original_max_position_embeddings`,
/// `rope_scaling` with LongRoPE's factors (and `attention_factor` only when it is not the one
/// transformers derives), `sliding_window`. Phi-3 has no bias flags.
fn phi3_config_fields(cfg: &ModelConfig, v: &mut serde_json::Value) {
    if let Some(obj) = v.as_object_mut() {
        obj.remove("attention_bias");
        obj.remove("mlp_bias");
    }
    if cfg.rotary_dims() != cfg.head_dim {
        v["partial_rotary_factor"] = json!(cfg.rotary_dims() as f64 / cfg.head_dim as f64);
    }
    v["sliding_window"] = json!(cfg.sliding_window);
    match &cfg.longrope {
        None => {
            v["original_max_position_embeddings"] = json!(cfg.max_position_embeddings);
            v["rope_scaling"] = serde_json::Value::Null;
        }
        Some(r) => {
            let original = r.original_max_position_embeddings;
            v["original_max_position_embeddings"] = json!(original);
            let mut scaling = json!({
                "type": "longrope",
                "long_factor": r.long_factor,
                "short_factor": r.short_factor,
            });
            let scale = cfg.max_position_embeddings as f64 / original as f64;
            let derived = if scale <= 1.0 {
                1.0
            } else {
                (1.0 + scale.ln() / (original as f64).ln()).sqrt()
            };
            if (r.attention_factor - derived).abs() > 1e-12 {
                scaling["attention_factor"] = json!(r.attention_factor);
            }
            v["rope_scaling"] = scaling;
        }
    }
}

/// Gemma 3's own fields, in the layout transformers 5 writes (`rope_parameters` per layer type).
fn gemma3_config_fields(cfg: &ModelConfig, v: &mut serde_json::Value) {
    if let Some(obj) = v.as_object_mut() {
        obj.remove("hidden_act");
        obj.remove("rope_theta");
        obj.remove("mlp_bias");
    }
    let full = match cfg.rope_linear_factor {
        Some(f) => json!({"rope_type": "linear", "factor": f, "rope_theta": cfg.rope_theta}),
        None => json!({"rope_type": "default", "rope_theta": cfg.rope_theta}),
    };
    v["rope_parameters"] = json!({
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta.unwrap_or(10_000.0)},
    });
    v["hidden_activation"] = json!("gelu_pytorch_tanh");
    // An integer field in transformers' strict config class.
    let scalar = cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64);
    v["query_pre_attn_scalar"] = if scalar.fract() == 0.0 {
        json!(scalar as u64)
    } else {
        json!(scalar)
    };
    v["sliding_window"] = json!(cfg.sliding_window);
    v["layer_types"] = json!((0..cfg.num_hidden_layers)
        .map(|l| match cfg.layer_type(l) {
            LayerType::FullAttention => "full_attention",
            LayerType::SlidingAttention => "sliding_attention",
        })
        .collect::<Vec<_>>());
    v["final_logit_softcapping"] = serde_json::Value::Null;
    v["attn_logit_softcapping"] = serde_json::Value::Null;
}

/// llama.cpp's pre-tokenizer name for a Hugging Face tokenizer, by family and vocabulary size
/// (the names `convert_hf_to_gguf.py` assigns to the models Finch supports).
fn pre_tokenizer_name(cfg: &ModelConfig) -> &'static str {
    match (cfg.family, cfg.vocab_size) {
        // convert_hf_to_gguf.py names Qwen3's pre-tokenizer `qwen2` too.
        (Family::Qwen2 | Family::Qwen3, _) => "qwen2",
        (Family::Llama, v) if v >= 128_000 => "llama-bpe",
        (Family::Llama, 49_152) => "smollm",
        _ => "default",
    }
}

fn gguf_tokenizer(files: &ModelFiles, format: &ChatFormat, cfg: &ModelConfig) -> Result<GgufTokenizerMetadata> {
    let is_gguf = files.path.is_file() && files.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let mut tok = if is_gguf && !model_dir(files).join("tokenizer.json").is_file() {
        GgufModel::open(&files.path)?.tokenizer_metadata()?
    } else {
        let text = format
            .tokenizer
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::invalid(&files.path, "tokenizer", e.to_string()))?;
        let mut t = GgufTokenizerMetadata::from_tokenizer_json(&json, pre_tokenizer_name(cfg), &files.path)?;
        t.bos_token_id = cfg.bos_token_id;
        t.padding_token_id = cfg.pad_token_id;
        t.add_bos_token = !crate::data::tokenize::post_processor_prefix(&format.tokenizer)?.is_empty();
        t
    };
    // Runtimes stop on EOS: make it the token that ends an assistant turn.
    let eot = format
        .template
        .end_of_turn()
        .and_then(|m| format.tokenizer.token_to_id(&m));
    tok.eos_token_id = eot.or(tok.eos_token_id).or(cfg.eos_token_ids.first().copied());
    tok.chat_template = Some(format.template.source().to_string());
    Ok(tok)
}

/// Writes `model-f16.gguf`, `model-q8_0.gguf` and a `Modelfile` (for the q8_0 file) into `out`;
/// returns the GGUF paths.
pub fn export_gguf(files: &ModelFiles, format: &ChatFormat, model: &Transformer, out: &Path) -> Result<Vec<PathBuf>> {
    create_dir(out)?;
    let tensors: HashMap<String, candle_core::Tensor> = model.merged_weights()?.into_iter().collect();
    let tok = gguf_tokenizer(files, format, &model.cfg)?;
    let mut paths = vec![];
    for (name, dtype) in [("model-f16.gguf", GgmlDType::F16), ("model-q8_0.gguf", GgmlDType::Q8_0)] {
        let path = out.join(name);
        write_gguf(&path, &model.cfg, &tensors, Some(&tok), dtype)?;
        paths.push(path);
    }
    let modelfile = modelfile("./model-q8_0.gguf", format)?;
    crate::fsutil::write_atomic(&out.join("Modelfile"), modelfile.as_bytes())?;
    Ok(paths)
}

/// An Ollama `Modelfile` for `gguf` with the chat template translated to Go template syntax and
/// a `stop` parameter for every end marker.
pub fn modelfile(gguf: &str, format: &ChatFormat) -> Result<String> {
    let t = OllamaTemplate::derive(&format.template)?;
    let mut out = format!("FROM {gguf}\n\nTEMPLATE \"\"\"{}\"\"\"\n", t.go_template());
    if let Some(system) = &t.default_system {
        out.push_str(&format!("\nSYSTEM \"\"\"{system}\"\"\"\n"));
    }
    out.push('\n');
    for stop in stop_markers(format) {
        out.push_str(&format!("PARAMETER stop {}\n", go_quote(&stop)));
    }
    Ok(out)
}

/// The strings that end an answer: the end-of-turn marker, the EOS token and every stop token.
pub fn stop_markers(format: &ChatFormat) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    let mut add = |s: String| {
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    };
    if let Some(m) = format.template.end_of_turn() {
        add(m);
    }
    if let Some(e) = format.template.eos_token() {
        add(e.to_string());
    }
    for id in &format.stop_token_ids {
        if let Some(tok) = format.tokenizer.id_to_token(*id) {
            add(tok);
        }
    }
    for s in &format.stop_strings {
        add(s.clone());
    }
    out
}

fn go_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A chat template reduced to the text around each message, which is what an Ollama (Go)
/// template can express: `prefix + content + suffix` per role, then the generation prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaTemplate {
    pub system: (String, String),
    pub user: (String, String),
    pub assistant: (String, String),
    pub generation_prompt: String,
    /// The system message the template inserts when the conversation has none (SmolLM2, Qwen2).
    pub default_system: Option<String>,
}

const PROBE_S: &str = "FinchSystemProbe";
const PROBE_U: &str = "FinchUserProbe";
const PROBE_A: &str = "FinchAssistantProbe";
const PROBE_U2: &str = "FinchSecondUserProbe";

fn split_at_probes<'a>(text: &'a str, probes: &[&str]) -> Option<Vec<&'a str>> {
    let mut parts = vec![];
    let mut rest = text;
    for p in probes {
        let at = rest.find(p)?;
        parts.push(&rest[..at]);
        rest = &rest[at + p.len()..];
    }
    parts.push(rest);
    Some(parts)
}

fn common_suffix_len(a: &str, b: &str) -> usize {
    let n = a
        .chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum::<usize>();
    n.min(a.len()).min(b.len())
}

impl OllamaTemplate {
    /// Derives the per-role text by rendering probe conversations with `template`.
    pub fn derive(template: &ChatTemplate) -> Result<Self> {
        let cannot = |why: &str| {
            Error::Data(format!(
                "the chat template cannot be expressed as an Ollama template ({why}); write the Modelfile TEMPLATE by hand"
            ))
        };
        let conv = [
            Message::new(Role::System, PROBE_S),
            Message::new(Role::User, PROBE_U),
            Message::new(Role::Assistant, PROBE_A),
            Message::new(Role::User, PROBE_U2),
        ];
        let text = template.render(&conv, true)?;
        let parts = split_at_probes(&text, &[PROBE_S, PROBE_U, PROBE_A, PROBE_U2])
            .ok_or_else(|| cannot("a message does not appear verbatim"))?;
        let (head, s_u, u_a, a_u2, tail) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
        // A BOS the template writes itself is left to the runtime (GGUF `add_bos_token`). Only
        // when the template names `bos_token`: SmolLM2's BOS is `<|im_start|>`, which its
        // template writes as the start of every turn.
        let bos = template
            .bos_token()
            .filter(|b| !b.is_empty() && template.source().contains("bos_token"));
        let head = match bos {
            Some(bos) => head.strip_prefix(bos).unwrap_or(head),
            None => head,
        };
        // Between an assistant message and the next user message: the assistant's end-of-turn
        // marker (and the whitespace after it) closes the turn, the rest opens the user turn.
        let (assistant_post, user_pre) = match template.end_of_turn() {
            Some(eot) if a_u2.starts_with(&eot) => {
                let after = &a_u2[eot.len()..];
                let close = eot.len() + after.len() - after.trim_start().len();
                (&a_u2[..close], &a_u2[close..])
            }
            _ => {
                let k = common_suffix_len(s_u, a_u2);
                (&a_u2[..a_u2.len() - k], &a_u2[a_u2.len() - k..])
            }
        };
        let system_post = s_u
            .strip_suffix(user_pre)
            .ok_or_else(|| cannot("a user turn opens differently after the system message"))?;
        if u_a != tail {
            return Err(cannot("the generation prompt differs from an assistant turn's opening"));
        }
        // Without a system message: does the template insert one of its own?
        let user_only = template.render(&[Message::new(Role::User, PROBE_U)], true)?;
        let user_only = match bos {
            Some(bos) => user_only.strip_prefix(bos).unwrap_or(&user_only).to_string(),
            None => user_only,
        };
        let bare = format!("{user_pre}{PROBE_U}{u_a}");
        let default_system = if user_only == bare {
            None
        } else {
            let inner = user_only
                .strip_prefix(head)
                .and_then(|r| r.strip_suffix(&bare))
                .and_then(|r| r.strip_suffix(system_post))
                .ok_or_else(|| cannot("it changes shape without a system message"))?;
            Some(inner.to_string())
        };
        // The user turn's own closing marker (ChatML's `<|im_end|>\n`) belongs to the user message,
        // so a conversation ending on a user turn without a generation prompt is closed too.
        let user_post = match template.end_of_turn() {
            Some(eot) if u_a.starts_with(&eot) => {
                let after = &u_a[eot.len()..];
                &u_a[..eot.len() + after.len() - after.trim_start().len()]
            }
            _ => "",
        };
        let assistant_pre = &u_a[user_post.len()..];
        Ok(OllamaTemplate {
            system: (head.to_string(), system_post.to_string()),
            user: (user_pre.to_string(), user_post.to_string()),
            assistant: (assistant_pre.to_string(), assistant_post.to_string()),
            generation_prompt: assistant_pre.to_string(),
            default_system,
        })
    }

    /// What the Go template produces for `messages` (a system message, if any, first) with the
    /// generation prompt; used to check the translation against the Jinja template.
    pub fn render(&self, messages: &[Message]) -> String {
        let mut out = String::new();
        for m in messages {
            let (pre, post) = match m.role {
                Role::System => &self.system,
                // Modelfile templates have no tool turns; a tool result reads as user input.
                Role::User | Role::Tool => &self.user,
                Role::Assistant => &self.assistant,
            };
            out.push_str(pre);
            out.push_str(&m.content);
            out.push_str(post);
        }
        out.push_str(&self.generation_prompt);
        out
    }

    /// The Go template text (Ollama's `.Messages` form). No whitespace trimming markers, so the
    /// literal newlines of the chat template are kept exactly.
    pub fn go_template(&self) -> String {
        let esc = |s: &str| s.replace("{{", "{{ \"{{\" }}");
        format!(
            "{{{{ range .Messages }}}}{{{{ if eq .Role \"system\" }}}}{}{{{{ .Content }}}}{}\
             {{{{ else if eq .Role \"user\" }}}}{}{{{{ .Content }}}}{}\
             {{{{ else if eq .Role \"assistant\" }}}}{}{{{{ .Content }}}}{}\
             {{{{ end }}}}{{{{ end }}}}{}",
            esc(&self.system.0),
            esc(&self.system.1),
            esc(&self.user.0),
            esc(&self.user.1),
            esc(&self.assistant.0),
            esc(&self.assistant.1),
            esc(&self.generation_prompt),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::hf_config_json;
    use crate::model::config::ModelConfig;

    fn fixture(name: &str) -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformers");
        ModelConfig::from_file(&dir.join(name).join("config.json")).unwrap()
    }

    /// The checkpoint's padding id goes into the exported config: transformers' own default
    /// differs by family (SmolLM3's 128004 lies outside a smaller vocabulary, and transformers
    /// then refuses the merged folder: found by the PEFT check of every family).
    #[test]
    fn exported_configs_keep_the_padding_id() {
        let mut cfg = fixture("smollm3");
        assert_eq!(cfg.pad_token_id, Some(0));
        assert_eq!(hf_config_json(&cfg)["pad_token_id"], 0);
        cfg.pad_token_id = None;
        assert!(hf_config_json(&cfg)["pad_token_id"].is_null());
        let mut phi = fixture("phi4_mini");
        phi.pad_token_id = None;
        assert_eq!(
            hf_config_json(&phi)["pad_token_id"],
            serde_json::json!(phi.eos_token_ids.first())
        );
    }
}
