//! GGUF model files (llama.cpp's format) as a base model for training. This module owns the
//! translation between the two worlds: GGUF metadata becomes a Hugging Face style `config.json`,
//! GGUF tensor names become Hugging Face names, quantized tensors are dequantized on demand, and
//! llama.cpp's q/k row permutation is undone so the tensors are exactly what the Hugging Face
//! checkpoint held. The tokenizer rebuilt from GGUF metadata lives in `gguf_tokenizer`.
//!
//! The reverse direction (`write_gguf`, `permute_qk_for_gguf`, `hf_to_gguf_name`) is here too,
//! so the two directions cannot drift apart; the tests use it to write GGUF fixtures.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::kernels::quant::{QMatrix, QType, BLOCK};
use crate::model::config::{Family, LayerType, ModelConfig, RopeScaling};
use crate::model::gguf_tokenizer::{self, GgufTokenizerMetadata};
use crate::model::weights::WeightSource;

/// A parsed GGUF file. Only the header (metadata and tensor table) is kept in memory; tensor
/// data is read from the file when asked for, so opening a multi-gigabyte file is cheap.
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: Content,
}

impl GgufModel {
    /// Opens a `.gguf` file, or a folder holding exactly one `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        let file_path = if path.is_dir() {
            find_single_gguf(path)?
        } else {
            path.to_path_buf()
        };
        let mut file = File::open(&file_path).map_err(|e| Error::io(&file_path, "cannot open GGUF file", e))?;
        let content = Content::read(&mut file).map_err(|e| {
            let e = crate::error::candle_message(&e);
            let hint = if e.contains("unknown dtype") {
                " (a tensor uses a ggml type that candle cannot read, such as the IQ* i-quants; \
                 use a Q4_0/Q4_1/Q5_*/Q8_0/K-quant/F16/BF16/F32 file or the safetensors model)"
            } else {
                ""
            };
            Error::invalid(&file_path, "GGUF file", format!("cannot parse the header: {e}{hint}"))
        })?;
        Ok(GgufModel {
            path: file_path,
            content,
        })
    }

    /// The `.gguf` file itself (also when `open` was given its folder).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and tensor table (GGUF names, shapes in Hugging Face order).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// `general.architecture`, e.g. `llama` or `qwen2`.
    pub fn architecture(&self) -> Result<String> {
        self.meta()
            .string("general.architecture")?
            .map(str::to_string)
            .ok_or_else(|| Error::invalid(&self.path, "GGUF metadata", "`general.architecture` is missing"))
    }

    pub(crate) fn meta(&self) -> Meta<'_> {
        Meta {
            map: &self.content.metadata,
            path: &self.path,
        }
    }

    /// A Hugging Face style `config.json` rebuilt from the GGUF metadata, which
    /// `ModelConfig::from_json` accepts.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let meta = self.meta();
        let arch = self.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| -> Result<usize> {
            meta.usize(&key(k))?
                .ok_or_else(|| Error::invalid(&self.path, "GGUF metadata", format!("`{}` is missing", key(k))))
        };
        let hidden_size = need("embedding_length")?;
        let num_attention_heads = need("attention.head_count")?;
        let num_key_value_heads = meta
            .usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        // llama.cpp's Phi-3 `rope.dimension_count` is the rotated part of a head only.
        let rope_dims = if arch == "phi3" {
            None
        } else {
            meta.usize(&key("rope.dimension_count"))?
        };
        let head_dim = match meta.usize(&key("attention.key_length"))? {
            Some(h) => h,
            None => match rope_dims {
                Some(h) => h,
                None => hidden_size / num_attention_heads.max(1),
            },
        };
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims().first().copied().unwrap_or(0),
            None => match meta.usize(&key("vocab_size"))? {
                Some(v) => v,
                None => meta.array_len("tokenizer.ggml.tokens")?.unwrap_or(0),
            },
        };
        let rope_theta = meta.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_scaling = self.rope_scaling_json(&arch, head_dim, rope_theta)?;
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        let architectures = match Family::from_model_type(&arch) {
            Some(family) => json!([family.architecture()]),
            None => json!([]),
        };
        let mut config = json!({
            "model_type": arch,
            "architectures": architectures,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "head_dim": head_dim,
            "max_position_embeddings": meta.usize(&key("context_length"))?.unwrap_or(2048),
            "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            "rope_theta": rope_theta,
            "rope_scaling": rope_scaling,
            "hidden_act": "silu",
            // llama.cpp writes no `output.weight` when the head shares the embedding.
            "tie_word_embeddings": !has("output.weight"),
            "attention_bias": has("blk.0.attn_q.bias"),
            "mlp_bias": has("blk.0.ffn_gate.bias") || has("blk.0.ffn_up.bias"),
        });
        if let Some(bos) = meta.usize("tokenizer.ggml.bos_token_id")? {
            config["bos_token_id"] = json!(bos);
        }
        if let Some(eos) = meta.usize("tokenizer.ggml.eos_token_id")? {
            config["eos_token_id"] = json!(eos);
        }
        if let Some(pad) = meta.usize("tokenizer.ggml.padding_token_id")? {
            config["pad_token_id"] = json!(pad);
        }
        if arch == "gemma3" {
            // What llama.cpp's Gemma 3 loader assumes rather than reads: every sixth layer global
            // (the config parser's default pattern), local layers' rotary base 10000 (the
            // parser's default), and q·k scaled by 1/√head_dim.
            config["model_type"] = json!("gemma3_text");
            config["hidden_activation"] = json!("gelu_pytorch_tanh");
            config["query_pre_attn_scalar"] = json!(head_dim);
            config["sliding_window"] = json!(need("attention.sliding_window")?);
            for (field, k) in [
                ("final_logit_softcapping", "final_logit_softcapping"),
                ("attn_logit_softcapping", "attn_logit_softcapping"),
            ] {
                if let Some(v) = meta.f64(&key(k))? {
                    config[field] = json!(v);
                }
            }
        }
        if arch == "phi3" {
            self.phi3_config(&mut config, head_dim)?;
        }
        Ok(config)
    }

    /// Phi-3's rotary and window settings as `convert_hf_to_gguf.py` stores them: the rotated
    /// dimensions (`rope.dimension_count`), LongRoPE's factors as `rope_factors_long/short`
    /// tensors with `rope.scaling.attn_factor` and `rope.scaling.original_context_length`, and
    /// `attention.sliding_window` (0: none).
    fn phi3_config(&self, config: &mut serde_json::Value, head_dim: usize) -> Result<()> {
        let meta = self.meta();
        if let Some(dims) = meta.usize("phi3.rope.dimension_count")? {
            if dims != head_dim {
                config["partial_rotary_factor"] = json!(dims as f64 / head_dim as f64);
            }
        }
        if let Some(w) = meta.usize("phi3.attention.sliding_window")?.filter(|w| *w > 0) {
            config["sliding_window"] = json!(w);
        }
        let original = meta.usize("phi3.rope.scaling.original_context_length")?;
        if let Some(n) = original {
            config["original_max_position_embeddings"] = json!(n);
        }
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        match (has("rope_factors_long.weight"), has("rope_factors_short.weight")) {
            (false, false) => Ok(()),
            (true, true) => {
                let read =
                    |name: &str| -> Result<Vec<f32>> { Ok(self.read_f32_cpu(name)?.flatten_all()?.to_vec1::<f32>()?) };
                let mut scaling = json!({
                    "type": "longrope",
                    "long_factor": read("rope_factors_long.weight")?,
                    "short_factor": read("rope_factors_short.weight")?,
                });
                // Stored as f32: when it is the factor transformers derives from the two
                // context lengths, leave it out so that the exact value is derived again.
                let context = config["max_position_embeddings"].as_f64().unwrap_or(0.0);
                let derived = original
                    .map(|o| o as f64)
                    .filter(|&o| context > o && o > 1.0)
                    .map_or(1.0, |o| (1.0 + (context / o).ln() / o.ln()).sqrt());
                if let Some(a) = meta.f64("phi3.rope.scaling.attn_factor")? {
                    if (a - derived).abs() > 1e-6 {
                        scaling["attention_factor"] = json!(a);
                    }
                }
                config["rope_scaling"] = scaling;
                Ok(())
            }
            (long, _) => Err(Error::invalid(
                &self.path,
                format!(
                    "tensor `{}`",
                    if long {
                        "rope_factors_short.weight"
                    } else {
                        "rope_factors_long.weight"
                    }
                ),
                "is missing (LongRoPE needs both the long and the short factors)",
            )),
        }
    }

    /// `rope_scaling` for `config.json`. llama.cpp stores Llama 3 scaling not as metadata but as
    /// a `rope_freqs.weight` tensor of per-frequency divisors, so the parameters are recovered
    /// from it; linear/yarn scaling is stored as metadata and passed on for `ModelConfig` to judge.
    fn rope_scaling_json(&self, arch: &str, head_dim: usize, rope_theta: f64) -> Result<serde_json::Value> {
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let factors = self
                .read_f32_cpu("rope_freqs.weight")?
                .flatten_all()?
                .to_vec1::<f32>()?;
            return match infer_llama3_rope_scaling(&factors, head_dim, rope_theta) {
                Some(None) => Ok(serde_json::Value::Null),
                Some(Some(s)) => Ok(json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                })),
                None => Err(Error::invalid(
                    &self.path,
                    "tensor `rope_freqs.weight`",
                    "its rotary frequency factors do not follow Llama 3 rope scaling (the only kind Finch supports)",
                )),
            };
        }
        let meta = self.meta();
        match meta.string(&format!("{arch}.rope.scaling.type"))? {
            None | Some("none") => Ok(serde_json::Value::Null),
            Some(kind) => {
                let mut v = json!({ "rope_type": kind });
                if let Some(f) = meta.f64(&format!("{arch}.rope.scaling.factor"))? {
                    v["factor"] = json!(f);
                }
                if let Some(n) = meta.usize(&format!("{arch}.rope.scaling.original_context_length"))? {
                    v["original_max_position_embeddings"] = json!(n);
                }
                Ok(v)
            }
        }
    }

    /// The tokenizer rebuilt from GGUF metadata (byte-level BPE models only).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        gguf_tokenizer::tokenizer_from_gguf(&self.meta())
    }

    /// The tokenizer metadata as stored, for writing it into another GGUF file (export).
    pub fn tokenizer_metadata(&self) -> Result<GgufTokenizerMetadata> {
        let meta = self.meta();
        let missing = |key: &str| Error::invalid(&self.path, "GGUF tokenizer", format!("`{key}` is missing"));
        let id = |key: &str| -> Result<Option<u32>> { Ok(meta.usize(key)?.map(|v| v as u32)) };
        let strings = |key: &str| -> Result<Option<Vec<String>>> {
            Ok(meta
                .string_array(key)?
                .map(|v| v.into_iter().map(str::to_string).collect()))
        };
        let tokens = strings("tokenizer.ggml.tokens")?.ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        let token_types = match meta.int_array("tokenizer.ggml.token_type")? {
            Some(t) => t.into_iter().map(|t| t as i32).collect(),
            None => vec![gguf_tokenizer::token_type::NORMAL as i32; tokens.len()],
        };
        Ok(GgufTokenizerMetadata {
            model: meta
                .string("tokenizer.ggml.model")?
                .ok_or_else(|| missing("tokenizer.ggml.model"))?
                .to_string(),
            pre: meta.string("tokenizer.ggml.pre")?.unwrap_or("default").to_string(),
            tokens,
            token_types,
            merges: strings("tokenizer.ggml.merges")?.unwrap_or_default(),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            padding_token_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos_token: meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            chat_template: self.chat_template(),
        })
    }

    /// `tokenizer.chat_template`, when the file has one.
    pub fn chat_template(&self) -> Option<String> {
        match self.content.metadata.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The (bos, eos) token strings named by `tokenizer.ggml.bos_token_id` / `eos_token_id`.
    pub fn special_tokens(&self) -> (Option<String>, Option<String>) {
        let meta = self.meta();
        let token = |key: &str| -> Option<String> {
            let id = meta.usize(key).ok()??;
            match self.content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => match tokens.get(id) {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            }
        };
        (
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        )
    }

    /// Every tensor that has a Hugging Face name, in Hugging Face naming, sorted. GGUF-only
    /// tensors (such as `rope_freqs.weight`) are left out.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .content
            .tensor_infos
            .keys()
            .filter_map(|n| gguf_to_hf_name(n, self.family()))
            .collect();
        names.sort();
        names
    }

    /// Reads one tensor by its GGUF name and dequantizes it to f32 on the CPU.
    fn read_f32_cpu(&self, gguf_name: &str) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: gguf_name.to_string(),
                hint: String::new(),
            })?;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, "cannot open GGUF file", e))?;
        let qtensor = info
            .read(&mut file, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| {
                Error::invalid(
                    &self.path,
                    format!("tensor `{gguf_name}`"),
                    crate::error::candle_message(&e),
                )
            })?;
        qtensor.dequantize(&Device::Cpu).map_err(|e| {
            Error::invalid(
                &self.path,
                format!("tensor `{gguf_name}`"),
                format!("cannot dequantize: {}", crate::error::candle_message(&e)),
            )
        })
    }

    /// The family `general.architecture` names (Llama's tensor names when it names none).
    fn family(&self) -> Family {
        self.architecture()
            .ok()
            .and_then(|a| Family::from_model_type(&a))
            .unwrap_or(Family::Llama)
    }

    /// The number of heads llama.cpp used to permute the rows of `name`, when it did.
    fn qk_permutation_heads(&self, hf_name: &str) -> Result<Option<usize>> {
        let arch = self.architecture()?;
        if arch != "llama" && arch != "smollm3" {
            return Ok(None);
        }
        let is = |proj: &str| {
            hf_name.ends_with(&format!("self_attn.{proj}.weight"))
                || hf_name.ends_with(&format!("self_attn.{proj}.bias"))
        };
        let key = if is("q_proj") {
            format!("{arch}.attention.head_count")
        } else if is("k_proj") {
            format!("{arch}.attention.head_count_kv")
        } else {
            return Ok(None);
        };
        let meta = self.meta();
        let heads = match meta.usize(&key)? {
            Some(h) => h,
            None => meta.usize(&format!("{arch}.attention.head_count"))?.ok_or_else(|| {
                Error::invalid(
                    &self.path,
                    "GGUF metadata",
                    format!("`{arch}.attention.head_count` is missing"),
                )
            })?,
        };
        Ok(Some(heads))
    }
}

impl WeightSource for GgufModel {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let family = self.family();
        let gguf_name = hf_to_gguf_name(name, family).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint: " (this Hugging Face tensor has no GGUF counterpart)".to_string(),
        })?;
        let info = self
            .content
            .tensor_infos
            .get(&gguf_name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: gguf_name.clone(),
                hint: format!(" (looked up for `{name}`)"),
            })?;
        if info.shape.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                tensor: gguf_name,
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
            });
        }
        let mut tensor = self.read_f32_cpu(&gguf_name)?;
        if let Some(heads) = self.qk_permutation_heads(name)? {
            tensor = unpermute_qk_from_gguf(&tensor, heads)
                .map_err(|e| Error::invalid(&self.path, format!("tensor `{gguf_name}`"), e.to_string()))?;
        }
        if shifts_norm(family, name) {
            // convert_hf_to_gguf.py stores Gemma's norm weights as 1 + w.
            tensor = (tensor - 1.0)?;
        }
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        hf_to_gguf_name(name, self.family()).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    /// The file's Q8_0/Q4_1 blocks, read straight from the file (q/k rows moved back to Hugging
    /// Face order as whole rows of blocks, as [`GgufModel::get`] moves the dequantized rows).
    fn blocks(&self, name: &str, shape: &[usize], qtype: QType) -> Result<Option<QMatrix>> {
        let family = self.family();
        let Some(gguf_name) = hf_to_gguf_name(name, family) else {
            return Ok(None);
        };
        let Some(info) = self.content.tensor_infos.get(&gguf_name) else {
            return Ok(None);
        };
        let stored = match info.ggml_dtype {
            GgmlDType::Q4_1 => QType::Q4_1,
            GgmlDType::Q8_0 => QType::Q8_0,
            _ => return Ok(None),
        };
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        if stored != qtype || info.shape.dims() != shape || shifts_norm(family, name) || cols % BLOCK != 0 {
            return Ok(None);
        }
        let invalid = |e: String| Error::invalid(&self.path, format!("tensor `{gguf_name}`"), e);
        let mut data = vec![0u8; rows * cols / BLOCK * qtype.block_bytes()];
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, "cannot open GGUF file", e))?;
        file.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|e| invalid(format!("cannot read its {} bytes: {e}", data.len())))?;
        let mut q = QMatrix::from_blocks(qtype, rows, cols, data).map_err(|e| invalid(e.to_string()))?;
        if let Some(heads) = self.qk_permutation_heads(name)? {
            if heads == 0 || rows % heads != 0 {
                return Err(invalid(format!("{rows} rows do not split into {heads} heads")));
            }
            q = q
                .permute_rows(&hf_rows_from_gguf(heads, rows / heads))
                .map_err(|e| invalid(e.to_string()))?;
        }
        Ok(Some(q))
    }

    fn origin(&self) -> &Path {
        &self.path
    }
}

fn find_single_gguf(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list model folder", e))?;
    let mut found = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "cannot list model folder", e))?;
        let p = entry.path();
        let is_gguf = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf && p.is_file() {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 => Err(Error::MissingFile {
            path: dir.to_path_buf(),
            file: "*.gguf".to_string(),
            hint: "the folder holds no GGUF file".to_string(),
        }),
        1 => Ok(found.remove(0)),
        _ => {
            let names: Vec<String> = found
                .iter()
                .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect();
            Err(Error::invalid(
                dir,
                "model folder",
                format!(
                    "it holds several GGUF files ({}); pass the one to use",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// Typed access to GGUF metadata with errors that name the file and the key.
pub(crate) struct Meta<'a> {
    pub map: &'a HashMap<String, Value>,
    pub path: &'a Path,
}

impl Meta<'_> {
    fn wrong_type(&self, key: &str, expected: &str, v: &Value) -> Error {
        Error::invalid(
            self.path,
            format!("GGUF metadata `{key}`"),
            format!("expected {expected}, found a value of type {:?}", v.value_type()),
        )
    }

    /// An integer, accepting every GGUF integer type. Per-layer arrays are accepted when all
    /// layers agree (the transformer has one value for all layers).
    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let as_int = |v: &Value| -> Option<i128> {
            match v {
                Value::U8(x) => Some(*x as i128),
                Value::I8(x) => Some(*x as i128),
                Value::U16(x) => Some(*x as i128),
                Value::I16(x) => Some(*x as i128),
                Value::U32(x) => Some(*x as i128),
                Value::I32(x) => Some(*x as i128),
                Value::U64(x) => Some(*x as i128),
                Value::I64(x) => Some(*x as i128),
                _ => None,
            }
        };
        let n = match v {
            Value::Array(items) => {
                let ints: Option<Vec<i128>> = items.iter().map(as_int).collect();
                match ints.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|x| x == first) => *first,
                    Some(_) => {
                        return Err(Error::invalid(
                            self.path,
                            format!("GGUF metadata `{key}`"),
                            "per-layer values that differ between layers are not supported",
                        ))
                    }
                    None => return Err(self.wrong_type(key, "an integer", v)),
                }
            }
            _ => as_int(v).ok_or_else(|| self.wrong_type(key, "an integer", v))?,
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| Error::invalid(self.path, format!("GGUF metadata `{key}`"), format!("{n} is negative")))
    }

    /// A float. f32 values are widened through their shortest decimal form, so a stored
    /// `1e-5f32` reads as `1e-5` (what `config.json` says) rather than `9.99999974e-6`.
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let x = match v {
            Value::F32(x) => x.to_string().parse::<f64>().unwrap_or(*x as f64),
            Value::F64(x) => *x,
            Value::U32(x) => *x as f64,
            Value::I32(x) => *x as f64,
            Value::U64(x) => *x as f64,
            Value::I64(x) => *x as f64,
            _ => return Err(self.wrong_type(key, "a number", v)),
        };
        Ok(Some(x))
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a boolean", v)),
        }
    }

    pub fn array_len(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.len())),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(self.wrong_type(key, "an array of strings", other)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, "an array of strings", v)),
        }
    }

    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    other => Err(self.wrong_type(key, "an array of integers", other)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, "an array of integers", v)),
        }
    }
}

/// Whether llama.cpp stores this tensor of `family` shifted by +1 (Gemma's `(1 + w)` RMS norms).
fn shifts_norm(family: Family, hf_name: &str) -> bool {
    family == Family::Gemma3 && hf_name.ends_with("norm.weight")
}

/// llama.cpp's GGUF name for a Hugging Face tensor name of `family`, or `None` when the tensor
/// has no GGUF counterpart.
pub fn hf_to_gguf_name(hf: &str, family: Family) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let gguf = layer_names(family).find(|(h, _)| *h == module)?.1;
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

/// The Hugging Face name for a GGUF tensor name of `family`, or `None` for GGUF-only tensors.
pub fn gguf_to_hf_name(gguf: &str, family: Family) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = layer_names(family).find(|(_, g)| *g == module)?.0;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// (Hugging Face module, GGUF module) pairs of one decoder layer of `family`.
fn layer_names(family: Family) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let (extra, skip): (&[(&str, &str)], &str) = match family {
        // Gemma's `post_attention_layernorm` norms the attention output; its pre-MLP norm is
        // `pre_feedforward_layernorm` (llama.cpp: `ffn_norm` for both families' pre-MLP norm).
        Family::Gemma3 => (&GEMMA_LAYER_NAMES, "post_attention_layernorm"),
        // Phi-3's fused matrices keep their layout; llama.cpp's `ffn_up` holds gate and up.
        Family::Phi3 => (&PHI3_LAYER_NAMES, "mlp.up_proj"),
        _ => (&[], ""),
    };
    extra.iter().chain(LAYER_NAMES.iter().filter(move |(h, _)| *h != skip))
}

/// Phi-3's fused projections, as `convert_hf_to_gguf.py` names them.
const PHI3_LAYER_NAMES: [(&str, &str); 2] = [("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")];

/// Gemma's extra norms, as llama.cpp's `gguf-py` tensor map names them.
const GEMMA_LAYER_NAMES: [(&str, &str); 3] = [
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// (Hugging Face module, GGUF module) inside one decoder layer.
const LAYER_NAMES: [(&str, &str); 11] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
];

/// llama.cpp's row permutation of Llama q/k projections (weights `[rows, cols]` or biases
/// `[rows]`), as `convert_hf_to_gguf.py` applies it:
/// `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
/// It turns Hugging Face's "rotate halves" rotary layout into GGML's interleaved-pairs layout.
/// `n_head` is the number of query heads for q and of key/value heads for k.
pub fn permute_qk_for_gguf(w: &Tensor, n_head: usize) -> Result<Tensor> {
    swap_head_halves(w, n_head, true)
}

/// For each Hugging Face row of a q/k projection, the GGUF row holding it: llama.cpp stores
/// head `h`'s row `j·(hd/2) + i` (half `j`, pair `i`) at `h·hd + 2i + j` (the row map of
/// [`unpermute_qk_from_gguf`], for moving whole rows of quantized blocks).
pub(crate) fn hf_rows_from_gguf(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut from = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                from.push(h * head_dim + 2 * i + j);
            }
        }
    }
    from
}

/// The inverse of [`permute_qk_for_gguf`]: GGUF rows back to Hugging Face order.
pub fn unpermute_qk_from_gguf(w: &Tensor, n_head: usize) -> Result<Tensor> {
    swap_head_halves(w, n_head, false)
}

fn swap_head_halves(w: &Tensor, n_head: usize, forward: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || rows % (2 * n_head) != 0 || dims.len() > 2 {
        return Err(Error::config(
            "n_head",
            format!("cannot split a tensor of shape {dims:?} into {n_head} heads of two halves"),
        ));
    }
    let half = rows / n_head / 2;
    let cols = dims.get(1).copied().unwrap_or(1);
    // Forward: [head, 2, half] -> [head, half, 2]. Inverse: [head, half, 2] -> [head, 2, half].
    let split = if forward {
        (n_head, 2, half, cols)
    } else {
        (n_head, half, 2, cols)
    };
    Ok(w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Llama 3 rotary frequency divisors, exactly as `convert_hf_to_gguf.py` computes the
/// `rope_freqs.weight` tensor: one factor per rotary frequency (head_dim / 2 of them).
pub fn llama3_rope_factors(s: &RopeScaling, head_dim: usize, rope_theta: f64) -> Vec<f64> {
    let low_freq_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
    let high_freq_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            // The reference computes these exponents in f32.
            let freq = 1.0 / (rope_theta as f32).powf((2 * i) as f32 / head_dim as f32) as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                s.factor
            } else {
                let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            }
        })
        .collect()
}

/// Recovers Llama 3 rope scaling from llama.cpp's per-frequency factors. `Some(None)`: the
/// factors are all 1 (no scaling). `None`: they follow no Llama 3 schedule.
///
/// The factors only pin down `low_freq_factor / original_max_position_embeddings` and
/// `high_freq_factor / original_max_position_embeddings`; scaling all three by one constant
/// gives identical frequencies. So `low_freq_factor` is fixed at 1 (every Llama 3.x uses 1) and
/// the other two follow from a line fit through the smoothly interpolated frequencies. When too
/// few frequencies fall in that band for a fit, Meta's published values (1, 4, 8192) are tried.
fn infer_llama3_rope_scaling(factors: &[f32], head_dim: usize, rope_theta: f64) -> Option<Option<RopeScaling>> {
    if factors.len() != head_dim / 2 || factors.is_empty() {
        return None;
    }
    let factor = factors.iter().copied().fold(f32::MIN, f32::max) as f64;
    if (factor - 1.0).abs() < 1e-6 && factors.iter().all(|f| (*f as f64 - 1.0).abs() < 1e-6) {
        return Some(None);
    }
    if factor <= 1.0 {
        return None;
    }
    let inv_wavelen = |i: usize| {
        let freq = 1.0 / (rope_theta as f32).powf((2 * i) as f32 / head_dim as f32) as f64;
        freq / (2.0 * std::f64::consts::PI)
    };
    // smooth = a * (1 / wavelen) + b on the interpolated band.
    let band: Vec<(f64, f64)> = factors
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            let f = **f as f64;
            f > 1.0 + 1e-4 && f < factor * (1.0 - 1e-4)
        })
        .map(|(i, f)| {
            let smooth = (1.0 / *f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            (inv_wavelen(i), smooth)
        })
        .collect();
    let mut candidates = vec![];
    if band.len() >= 2 {
        let n = band.len() as f64;
        let mean_x = band.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = band.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = band.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        let sxy: f64 = band.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
        if sxx > 0.0 {
            let a = sxy / sxx;
            let b = mean_y - a * mean_x;
            if b < 0.0 && a > 0.0 {
                // With low_freq_factor = 1: b = -1 / (hf - 1), a = L / (hf - 1).
                let high = 1.0 - 1.0 / b;
                let original = (-a / b).round();
                candidates.push(RopeScaling {
                    factor: round_to(factor, 1e-4),
                    low_freq_factor: 1.0,
                    high_freq_factor: round_to(high, 1e-3),
                    original_max_position_embeddings: original as usize,
                });
            }
        }
    }
    candidates.push(RopeScaling {
        factor: round_to(factor, 1e-4),
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    candidates
        .into_iter()
        .find(|s| {
            let expected = llama3_rope_factors(s, head_dim, rope_theta);
            expected
                .iter()
                .zip(factors)
                .all(|(e, f)| (e - *f as f64).abs() <= 1e-3 * e.abs().max(1.0))
        })
        .map(Some)
}

fn round_to(x: f64, step: f64) -> f64 {
    let r = (x / step).round() * step;
    // Strip the binary noise of the multiplication (8.000000000000002 -> 8).
    format!("{r:.6}").parse().unwrap_or(r)
}

/// Writes a GGUF file that llama.cpp and [`GgufModel`] can read: metadata from `config` (and
/// the tokenizer, when given), tensors named and laid out as `convert_hf_to_gguf.py` writes
/// them (q/k permuted for Llama, Llama 3 rope scaling as `rope_freqs.weight`). Matrices are
/// stored as `matrix_dtype` when their rows fit its block size and as F32 otherwise; norms and
/// biases are always F32, as llama.cpp keeps them.
pub fn write_gguf(
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer: Option<&GgufTokenizerMetadata>,
    matrix_dtype: GgmlDType,
) -> Result<()> {
    let arch = config.family.gguf_arch();
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.alignment".into(), Value::U32(32)),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("block_count"), Value::U32(config.num_hidden_layers as u32)),
        (k("context_length"), Value::U32(config.max_position_embeddings as u32)),
        (k("embedding_length"), Value::U32(config.hidden_size as u32)),
        (k("feed_forward_length"), Value::U32(config.intermediate_size as u32)),
        (k("attention.head_count"), Value::U32(config.num_attention_heads as u32)),
        (
            k("attention.head_count_kv"),
            Value::U32(config.num_key_value_heads as u32),
        ),
        (k("attention.key_length"), Value::U32(config.head_dim as u32)),
        (k("attention.value_length"), Value::U32(config.head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(config.rotary_dims() as u32)),
        (k("rope.freq_base"), Value::F32(config.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (k("vocab_size"), Value::U32(config.vocab_size as u32)),
    ];
    if config.family == Family::Gemma3 {
        meta.extend(gemma3_metadata(path, config)?);
    }
    if config.family == Family::Phi3 {
        // As convert_hf_to_gguf.py's Phi3MiniModel writes them (llama.cpp reads the window but
        // runs Phi-3 without it; the original context decides its long/short factor choice).
        let original = config
            .longrope
            .as_ref()
            .map_or(config.max_position_embeddings, |r| r.original_max_position_embeddings);
        meta.push((k("rope.scaling.original_context_length"), Value::U32(original as u32)));
        meta.push((
            k("attention.sliding_window"),
            Value::U32(config.sliding_window.unwrap_or(0) as u32),
        ));
        if let Some(r) = &config.longrope {
            meta.push((k("rope.scaling.attn_factor"), Value::F32(r.attention_factor as f32)));
        }
    }
    if config.family == Family::SmolLM3
        && (0..config.num_hidden_layers).any(|l| config.uses_rope(l) == ((l + 1) % 4 == 0))
    {
        return Err(Error::invalid(
            path,
            "field `no_rope_layers`",
            "llama.cpp's SmolLM3 skips rotary on every fourth layer; this model's layers differ",
        ));
    }
    if let Some(tok) = tokenizer {
        meta.extend(tok.to_metadata());
    }
    let mut order: Vec<(String, QTensor)> = vec![];
    for (hf_name, tensor) in tensors {
        let gguf_name = hf_to_gguf_name(hf_name, config.family).ok_or_else(|| {
            Error::invalid(
                path,
                format!("tensor `{hf_name}`"),
                "has no GGUF name (not a Llama/Qwen2/Qwen3/Gemma 3/SmolLM3/Phi-3 tensor)",
            )
        })?;
        let mut t = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        if shifts_norm(config.family, hf_name) {
            t = (t + 1.0)?;
        }
        // convert_hf_to_gguf.py's SmolLM3 is its Llama, rows permuted alike.
        if matches!(config.family, Family::Llama | Family::SmolLM3) {
            if hf_name.contains("self_attn.q_proj.") {
                t = permute_qk_for_gguf(&t, config.num_attention_heads)?;
            } else if hf_name.contains("self_attn.k_proj.") {
                t = permute_qk_for_gguf(&t, config.num_key_value_heads)?;
            }
        }
        let cols = t.dims().last().copied().unwrap_or(0);
        let dtype = if t.rank() == 2 && cols % matrix_dtype.block_size() == 0 {
            matrix_dtype
        } else {
            GgmlDType::F32
        };
        order.push((gguf_name, QTensor::quantize(&t, dtype)?));
    }
    if let Some(r) = &config.longrope {
        for (name, factors) in [
            ("rope_factors_long.weight", &r.long_factor),
            ("rope_factors_short.weight", &r.short_factor),
        ] {
            let v: Vec<f32> = factors.iter().map(|f| *f as f32).collect();
            let n = v.len();
            let t = Tensor::from_vec(v, n, &Device::Cpu)?;
            order.push((name.into(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
    }
    if let Some(s) = &config.rope_scaling {
        let factors: Vec<f32> = llama3_rope_factors(s, config.head_dim, config.rope_theta)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &Device::Cpu)?;
        order.push(("rope_freqs.weight".into(), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    // llama.cpp's order: embeddings, then layer by layer, then the head.
    order.sort_by_key(|(name, _)| tensor_sort_key(name));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = order.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file =
        crate::fsutil::AtomicFile::create(path).map_err(|e| Error::io(path, "cannot create GGUF file", e))?;
    gguf_file::write(file.file_mut(), &meta_refs, &tensor_refs).map_err(|e| {
        Error::invalid(
            path,
            "GGUF file",
            format!("cannot write: {}", crate::error::candle_message(&e)),
        )
    })?;
    file.commit()
        .map_err(|e| Error::io(path, "cannot move the written GGUF file into place", e))
}

/// Gemma 3's metadata as `convert_hf_to_gguf.py` writes it. llama.cpp reads only the window
/// and the global rotary settings, and assumes the rest (every sixth layer global, local rotary
/// base 10000, q·k scaled by 1/√head_dim), so a config that differs is refused by field rather
/// than written into a file that llama.cpp would run differently.
fn gemma3_metadata(path: &Path, config: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let refuse = |field: &str, why: String| Err(Error::invalid(path, format!("field `{field}`"), why));
    let standard = (0..config.num_hidden_layers).all(|l| {
        let global = (l + 1) % 6 == 0;
        (config.layer_type(l) == LayerType::FullAttention) == global
    });
    if !standard {
        return refuse(
            "layer_types",
            "llama.cpp's Gemma 3 makes every sixth layer global; this model's layers differ".into(),
        );
    }
    if let Some(theta) = config.rope_local_theta.filter(|t| *t != 10_000.0) {
        return refuse(
            "rope_local_base_freq",
            format!("{theta}: llama.cpp's Gemma 3 uses 10000 for the sliding layers"),
        );
    }
    if let Some(s) = config.query_pre_attn_scalar.filter(|s| *s != config.head_dim as f64) {
        return refuse(
            "query_pre_attn_scalar",
            format!(
                "{s}: llama.cpp's Gemma 3 scales by 1/sqrt(head_dim = {})",
                config.head_dim
            ),
        );
    }
    let mut meta = vec![(
        "gemma3.attention.sliding_window".to_string(),
        Value::U32(config.sliding_window.unwrap_or(config.max_position_embeddings) as u32),
    )];
    if let Some(f) = config.rope_linear_factor {
        meta.push(("gemma3.rope.scaling.type".into(), Value::String("linear".into())));
        meta.push(("gemma3.rope.scaling.factor".into(), Value::F32(f as f32)));
    }
    Ok(meta)
}

fn tensor_sort_key(name: &str) -> (usize, usize, String) {
    if let Some(rest) = name.strip_prefix("blk.") {
        let layer = rest
            .split('.')
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        return (1, layer, name.to_string());
    }
    match name {
        "token_embd.weight" => (0, 0, name.into()),
        "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight" => (0, 1, name.into()),
        _ => (2, 0, name.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf_tokenizer::token_type;
    use crate::model::tiny::{tiny_tokenizer_json, TinySpec, CHATML_TEMPLATE};

    /// Texts that exercise every branch of the pre-tokenizers: letters, accents, emoji, code,
    /// digit runs, whitespace runs, contractions, newlines and ChatML special tokens.
    const TEXTS: [&str; 12] = [
        "Hello world",
        "The capital of France is Paris.",
        "Héllo, wörld! Ça va? naïve café",
        "emoji 😀🚀 and CJK 你好世界",
        "fn main() {\n    println!(\"{}\", x + 1);\n}\n",
        "numbers 12345 and 3.14159 and 1,000,000",
        "spaces     and\ttabs\t\tand\n\n\nnewlines   ",
        "I'm sure they've said it's the users' LL'S",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "  leading spaces and trailing  ",
        "<|endoftext|>text after end<|im_end|>",
        "",
    ];

    fn real_model() -> Option<PathBuf> {
        match std::env::var_os("FINCH_REAL_MODEL") {
            Some(p) => Some(PathBuf::from(p)),
            None => {
                eprintln!("skipped: set FINCH_REAL_MODEL to a SmolLM2 GGUF folder to run this test");
                None
            }
        }
    }

    /// `np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)`,
    /// which is what convert_hf_to_gguf.py's `permute` does to row indices.
    #[test]
    fn permutation_matches_llama_cpp_row_order() {
        let rows = Tensor::arange(0f32, 12., &Device::Cpu).unwrap();
        let permuted = permute_qk_for_gguf(&rows, 2).unwrap().to_vec1::<f32>().unwrap();
        // numpy: [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
        assert_eq!(permuted, [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
        let rows8 = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        assert_eq!(
            permute_qk_for_gguf(&rows8, 2).unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );

        // On matrices the rows move as wholes, and unpermute inverts permute.
        let w = Tensor::randn(0f32, 1., (48, 7), &Device::Cpu).unwrap();
        for heads in [1, 2, 3, 4, 6, 8, 12] {
            let p = permute_qk_for_gguf(&w, heads).unwrap();
            assert_ne!(
                crate::testing::max_abs_diff(&p, &w),
                0.0,
                "heads {heads}: permutation is not the identity"
            );
            assert_eq!(
                crate::testing::max_abs_diff(&unpermute_qk_from_gguf(&p, heads).unwrap(), &w),
                0.0
            );
        }
        let p = permute_qk_for_gguf(&w, 2).unwrap();
        assert_eq!(
            crate::testing::max_abs_diff(&p.get(1).unwrap(), &w.get(12).unwrap()),
            0.0
        );
        assert!(
            permute_qk_for_gguf(&w, 5).is_err(),
            "48 rows do not split into 5 heads of two halves"
        );
    }

    fn rope_tables(head_dim: usize, positions: usize, theta: f32) -> (Tensor, Tensor) {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut angles = vec![];
        for p in 0..positions {
            angles.extend(inv.iter().map(|f| p as f32 * f));
        }
        let a = Tensor::from_vec(angles, (positions, head_dim / 2), &Device::Cpu).unwrap();
        (a.cos().unwrap(), a.sin().unwrap())
    }

    /// Attention scores q·k of every query head against its key/value head, for hidden states
    /// `x` (`[positions, hidden]`), with the given rotary embedding.
    fn attention_scores(
        wq: &Tensor,
        wk: &Tensor,
        x: &Tensor,
        heads: usize,
        kv_heads: usize,
        interleaved: bool,
    ) -> Tensor {
        let (t, _) = x.dims2().unwrap();
        let hd = wq.dim(0).unwrap() / heads;
        let (cos, sin) = rope_tables(hd, t, 10_000.0);
        let project = |w: &Tensor, n: usize| {
            let y = x.matmul(&w.t().unwrap()).unwrap().reshape((1, t, n, hd)).unwrap();
            let y = y.transpose(1, 2).unwrap().contiguous().unwrap();
            if interleaved {
                candle_nn::rotary_emb::rope_i(&y, &cos, &sin).unwrap()
            } else {
                candle_nn::rotary_emb::rope(&y, &cos, &sin).unwrap()
            }
        };
        let q = project(wq, heads);
        let k = project(wk, kv_heads);
        let k = k.repeat((1, heads / kv_heads, 1, 1)).unwrap();
        // repeat tiles [kv0, kv1, kv0, kv1]; Llama groups heads as [kv0, kv0, kv1, kv1].
        let groups = heads / kv_heads;
        let order: Vec<u32> = (0..heads)
            .map(|h| ((h % groups) * kv_heads + h / groups) as u32)
            .collect();
        let k = k.index_select(&Tensor::new(order, &Device::Cpu).unwrap(), 1).unwrap();
        q.matmul(&k.transpose(2, 3).unwrap().contiguous().unwrap()).unwrap()
    }

    /// The behavioural proof of the unpermute: llama.cpp applies rotary embeddings to
    /// interleaved pairs on the rows as stored in the file, Hugging Face to split halves on
    /// its own row order. Both must give the same attention scores, which only holds if
    /// `unpermute_qk_from_gguf` restores exactly Hugging Face's order.
    fn assert_rope_layouts_agree(
        gguf_q: &Tensor,
        gguf_k: &Tensor,
        hf_q: &Tensor,
        hf_k: &Tensor,
        heads: usize,
        kv_heads: usize,
    ) {
        let hidden = gguf_q.dim(1).unwrap();
        let x = Tensor::randn(0f32, 1., (5, hidden), &Device::Cpu).unwrap();
        let llama_cpp = attention_scores(gguf_q, gguf_k, &x, heads, kv_heads, true);
        let hf = attention_scores(hf_q, hf_k, &x, heads, kv_heads, false);
        let scale = llama_cpp
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = crate::testing::max_abs_diff(&llama_cpp, &hf);
        assert!(diff <= 1e-4 * scale.max(1.0), "scores differ by {diff} (scale {scale})");
        // Control: skipping the unpermute must break the equality, or this check proves nothing.
        let wrong = attention_scores(gguf_q, gguf_k, &x, heads, kv_heads, false);
        assert!(
            crate::testing::max_abs_diff(&llama_cpp, &wrong) > 1e-2 * scale,
            "the check cannot tell the layouts apart"
        );
    }

    fn write_tiny_gguf(dir: &Path, spec: &TinySpec, dtype: GgmlDType, pre: &str) -> (PathBuf, HashMap<String, Tensor>) {
        let config = ModelConfig::from_json(&spec.config_json(), Path::new("config.json")).unwrap();
        let weights = spec.weights().unwrap();
        let mut tok = GgufTokenizerMetadata::from_tokenizer_json(&tiny_tokenizer_json(), pre, dir).unwrap();
        tok.bos_token_id = Some(1);
        tok.eos_token_id = Some(2);
        tok.chat_template = Some(CHATML_TEMPLATE.to_string());
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &config, &weights, Some(&tok), dtype).unwrap();
        (path, weights)
    }

    #[test]
    fn tiny_gguf_tensors_equal_the_hugging_face_tensors() {
        for family in [
            Family::Llama,
            Family::Qwen2,
            Family::Qwen3,
            Family::Gemma3,
            Family::SmolLM3,
            Family::Phi3,
        ] {
            for tie in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let mut spec = TinySpec::new(family);
                spec.tie_word_embeddings = tie;
                // Tolerances relative to the tensor's largest value: f16 keeps 11 mantissa bits, Q8_0
                // rounds each block to 1/127 of its largest value.
                for (dtype, tolerance) in [(GgmlDType::F32, 0.0), (GgmlDType::F16, 1e-3), (GgmlDType::Q8_0, 5e-3)] {
                    let (path, weights) = write_tiny_gguf(dir.path(), &spec, dtype, "default");
                    let model = GgufModel::open(dir.path()).unwrap();
                    assert_eq!(model.path(), path);
                    let mut expected: Vec<String> = weights.keys().cloned().collect();
                    expected.sort();
                    assert_eq!(model.tensor_names(), expected, "{family:?} tie={tie}");
                    for (name, want) in &weights {
                        assert!(model.contains(name));
                        let got = model.get(name, want.dims(), DType::F32, &Device::Cpu).unwrap();
                        let diff = crate::testing::max_abs_diff(&got, want);
                        let scale = want
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                            .max(1e-6);
                        // Gemma's norms are stored as 1 + w (as llama.cpp wants them) and read
                        // back as (1 + w) − 1: exact up to half an f32 ulp of 1.
                        let shift = if shifts_norm(family, name) { f32::EPSILON } else { 0.0 };
                        assert!(
                            diff <= tolerance * scale + shift,
                            "{family:?} {dtype:?} {name}: max diff {diff} (max {scale})"
                        );
                    }
                    assert_eq!(model.contains("lm_head.weight"), !tie);
                    let bf16 = model
                        .get("model.norm.weight", &[spec.hidden_size], DType::BF16, &Device::Cpu)
                        .unwrap();
                    assert_eq!(bf16.dtype(), DType::BF16);

                    let rebuilt = ModelConfig::from_json(&model.config_json().unwrap(), &path).unwrap();
                    let original = ModelConfig::from_json(&spec.config_json(), &path).unwrap();
                    assert_eq!(rebuilt, original, "{family:?} tie={tie}");
                }
            }
        }
    }

    /// The raw bytes of GGUF tensor `gguf_name`, as the file stores them.
    fn file_bytes(model: &GgufModel, gguf_name: &str) -> (GgmlDType, Vec<u8>) {
        let info = &model.content().tensor_infos[gguf_name];
        let mut file = File::open(model.path()).unwrap();
        let t = info
            .read(&mut file, model.content().tensor_data_offset, &Device::Cpu)
            .unwrap();
        (t.dtype(), t.data().unwrap().into_owned())
    }

    /// Checks every projection of `model` loaded with a `base` training base from `gguf`: a
    /// matrix the file stores as `base` is the file's blocks byte for byte (q/k: the file's rows
    /// moved back to Hugging Face order, dequantizing to what the f32 loader reads); any other
    /// matrix is `base` blocks quantized from the f32 values. Returns how many were the file's.
    fn assert_base_uses_file_blocks(gguf: &GgufModel, model: &crate::model::Transformer, base: QType) -> usize {
        use crate::lora::FrozenWeight;
        let family = gguf.family();
        let mut native = 0;
        for l in 0..model.num_layers() {
            for &t in model.projections() {
                let Some(FrozenWeight::Quantized(q)) = model.base_weight(l, t) else {
                    panic!("layer {l} {t:?} is not quantized")
                };
                assert_eq!(q.qtype(), base);
                let hf = format!("{}.weight", t.module_path(l));
                let gguf_name = hf_to_gguf_name(&hf, family).unwrap();
                let (stored, bytes) = file_bytes(gguf, &gguf_name);
                let same_type = matches!(
                    (stored, base),
                    (GgmlDType::Q4_1, QType::Q4_1) | (GgmlDType::Q8_0, QType::Q8_0)
                );
                let dense = gguf.get(&hf, &[q.rows(), q.cols()], DType::F32, &Device::Cpu).unwrap();
                let dense = dense.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                if !same_type {
                    let want = QMatrix::quantize(base, q.rows(), q.cols(), &dense).unwrap();
                    assert_eq!(q.data(), want.data(), "{hf}: quantized from the f32 values");
                    continue;
                }
                native += 1;
                let file = QMatrix::from_blocks(base, q.rows(), q.cols(), bytes).unwrap();
                match gguf.qk_permutation_heads(&hf).unwrap() {
                    Some(heads) => {
                        let moved = file.permute_rows(&hf_rows_from_gguf(heads, q.rows() / heads)).unwrap();
                        assert_eq!(q.data(), moved.data(), "{hf}: the file's rows, reordered");
                    }
                    None => assert_eq!(q.data(), file.data(), "{hf}: the file's bytes"),
                }
                assert_eq!(q.dequantize(), dense, "{hf}: the f32 loader's values");
            }
        }
        native
    }

    /// A training base of the type a GGUF stores its matrices in takes the file's blocks as
    /// they are (no dequantize-then-requantize); a base of another type is quantized from the
    /// dequantized values. Llama (q/k rows permuted in the file) and Qwen2 (not permuted).
    #[test]
    fn quantized_training_base_takes_the_file_blocks() {
        for family in [Family::Llama, Family::Qwen2] {
            for file_type in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
                let dir = tempfile::tempdir().unwrap();
                let spec = TinySpec::new(family);
                write_tiny_gguf(dir.path(), &spec, file_type, "default");
                let gguf = GgufModel::open(dir.path()).unwrap();
                let cfg = ModelConfig::from_json(&gguf.config_json().unwrap(), gguf.path()).unwrap();
                for base in [QType::Q8_0, QType::Q4_1] {
                    let model =
                        crate::model::Transformer::load_with_base(&cfg, &gguf, DType::F32, Some(base), &Device::Cpu)
                            .unwrap();
                    let native = assert_base_uses_file_blocks(&gguf, &model, base);
                    let matches = matches!(
                        (file_type, base),
                        (GgmlDType::Q4_1, QType::Q4_1) | (GgmlDType::Q8_0, QType::Q8_0)
                    );
                    let all = model.num_layers() * model.projections().len();
                    assert_eq!(
                        native,
                        if matches { all } else { 0 },
                        "{family:?} {file_type:?} {base:?}"
                    );
                }
            }
        }
    }

    /// The real Q4_1 GGUF as a q4_1 training base: every projection is the file's blocks.
    #[test]
    fn real_gguf_q4_1_training_base_is_the_file_blocks() {
        let Some(dir) = real_model() else { return };
        let files = crate::model::ModelFiles::open(dir.to_str().unwrap()).unwrap();
        let gguf = GgufModel::open(&dir).unwrap();
        let model = files
            .load_with_base(DType::F32, Some(QType::Q4_1), &Device::Cpu)
            .unwrap();
        let native = assert_base_uses_file_blocks(&gguf, &model, QType::Q4_1);
        assert_eq!(native, model.num_layers() * model.projections().len());
    }

    #[test]
    fn tiny_llama_gguf_q_k_follow_llama_cpp_rope_layout() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(Family::Llama);
        let (path, weights) = write_tiny_gguf(dir.path(), &spec, GgmlDType::F32, "default");
        // The rows as stored in the file, read with candle's own GGUF reader.
        let mut file = File::open(&path).unwrap();
        let content = Content::read(&mut file).unwrap();
        let mut raw = |n: &str| {
            content
                .tensor(&mut file, n, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        let (gq, gk) = (raw("blk.1.attn_q.weight"), raw("blk.1.attn_k.weight"));
        let model = GgufModel::open(&path).unwrap();
        let q = &weights["model.layers.1.self_attn.q_proj.weight"];
        let k = &weights["model.layers.1.self_attn.k_proj.weight"];
        let hq = model
            .get(
                "model.layers.1.self_attn.q_proj.weight",
                q.dims(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let hk = model
            .get(
                "model.layers.1.self_attn.k_proj.weight",
                k.dims(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_rope_layouts_agree(&gq, &gk, &hq, &hk, spec.num_attention_heads, spec.num_key_value_heads);
    }

    #[test]
    fn qwen2_tensors_are_not_permuted() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(Family::Qwen2);
        let (path, weights) = write_tiny_gguf(dir.path(), &spec, GgmlDType::F32, "qwen2");
        let mut file = File::open(&path).unwrap();
        let content = Content::read(&mut file).unwrap();
        let stored = content.tensor(&mut file, "blk.0.attn_q.weight", &Device::Cpu).unwrap();
        let stored = stored.dequantize(&Device::Cpu).unwrap();
        assert_eq!(
            crate::testing::max_abs_diff(&stored, &weights["model.layers.0.self_attn.q_proj.weight"]),
            0.0
        );
        let bias = &weights["model.layers.0.self_attn.k_proj.bias"];
        let model = GgufModel::open(&path).unwrap();
        let got = model
            .get(
                "model.layers.0.self_attn.k_proj.bias",
                bias.dims(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(crate::testing::max_abs_diff(&got, bias), 0.0);
        assert_eq!(model.config_json().unwrap()["attention_bias"], true);
    }

    #[test]
    fn llama3_rope_scaling_survives_the_rope_freqs_tensor() {
        // Llama 3.1 8B and Llama 3.2 1B settings, then unusual ones that only the line fit
        // (not the fallback to Meta's published values) can recover.
        let cases = [
            (8.0, 4.0, 8192, 500_000.0, 128),
            (32.0, 4.0, 8192, 500_000.0, 64),
            (16.0, 2.0, 4096, 500_000.0, 128),
            (4.0, 8.0, 16384, 1_000_000.0, 128),
        ];
        for (factor, high_freq_factor, original, theta, head_dim) in cases {
            let dir = tempfile::tempdir().unwrap();
            let spec = TinySpec::new(Family::Llama);
            let mut json = spec.config_json();
            json["rope_theta"] = serde_json::json!(theta);
            json["head_dim"] = serde_json::json!(head_dim);
            json["max_position_embeddings"] = serde_json::json!(131072);
            json["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original});
            let config = ModelConfig::from_json(&json, Path::new("config.json")).unwrap();
            let path = dir.path().join("m.gguf");
            write_gguf(&path, &config, &HashMap::new(), None, GgmlDType::F32).unwrap();
            let model = GgufModel::open(&path).unwrap();
            let rebuilt = ModelConfig::from_json(&model.config_json().unwrap(), &path).unwrap();
            assert_eq!(rebuilt.rope_scaling, config.rope_scaling, "factor {factor}");
            assert_eq!(rebuilt.rope_theta, theta);
            assert!(model.tensor_names().is_empty(), "rope_freqs has no Hugging Face name");
        }
        // Factors that follow no Llama 3 schedule are refused rather than misread.
        let factors = [1.0f32, 3.0, 1.0, 3.0];
        assert!(infer_llama3_rope_scaling(&factors, 8, 10_000.0).is_none());
        assert!(matches!(infer_llama3_rope_scaling(&[1.0; 4], 8, 10_000.0), Some(None)));
    }

    #[test]
    fn tiny_gguf_tokenizer_matches_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(Family::Llama);
        write_tiny_gguf(dir.path(), &spec, GgmlDType::F32, "default");
        let model = GgufModel::open(dir.path()).unwrap();
        let ours = model.tokenizer().unwrap();
        let theirs = tokenizers::Tokenizer::from_bytes(tiny_tokenizer_json().to_string()).unwrap();
        for text in TEXTS {
            for specials in [false, true] {
                let a = ours.encode(text, specials).unwrap();
                let b = theirs.encode(text, specials).unwrap();
                assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
                assert_eq!(ours.decode(a.get_ids(), false).unwrap(), text);
            }
        }
        assert_eq!(ours.encode("<|im_start|>", false).unwrap().get_ids(), [1]);
        assert_eq!(model.chat_template().as_deref(), Some(CHATML_TEMPLATE));
        // What export will copy into a new file is what was written.
        let mut written =
            GgufTokenizerMetadata::from_tokenizer_json(&tiny_tokenizer_json(), "default", dir.path()).unwrap();
        written.bos_token_id = Some(1);
        written.eos_token_id = Some(2);
        written.chat_template = Some(CHATML_TEMPLATE.to_string());
        assert_eq!(model.tokenizer_metadata().unwrap(), written);
        assert_eq!(
            model.special_tokens(),
            (Some("<|im_start|>".into()), Some("<|im_end|>".into()))
        );
    }

    /// GGUF metadata for a vocabulary of bytes plus merges that build "12345" digit by digit,
    /// so the ids show how each pre-tokenizer splits digit runs.
    fn digit_vocab_metadata(pre: &str, add_bos: bool) -> HashMap<String, Value> {
        let mut tok = GgufTokenizerMetadata::from_tokenizer_json(&tiny_tokenizer_json(), pre, Path::new("t")).unwrap();
        for merged in ["12", "123", "1234", "12345", "45"] {
            tok.tokens.push(merged.into());
            tok.token_types.push(token_type::NORMAL as i32);
        }
        tok.merges = vec![
            "1 2".into(),
            "12 3".into(),
            "123 4".into(),
            "1234 5".into(),
            "4 5".into(),
        ];
        tok.bos_token_id = Some(1);
        tok.add_bos_token = add_bos;
        tok.to_metadata().into_iter().collect()
    }

    #[test]
    fn pre_tokenizer_names_split_digits_like_their_models() {
        let id = |s: &str| TINY_ID_BASE + s.as_bytes()[0] as u32;
        let digits = [id("1"), id("2"), id("3"), id("4"), id("5")];
        let cases: [(&str, Vec<u32>); 4] = [
            // GPT-2: digit runs stay whole.
            ("default", vec![262]),
            // SmolLM/StarCoder: every digit alone.
            ("smollm", digits.to_vec()),
            // Llama 3: runs of at most three digits.
            ("llama-bpe", vec![260, 263]),
            // Qwen2: every digit alone.
            ("qwen2", digits.to_vec()),
        ];
        for (pre, want) in cases {
            let map = digit_vocab_metadata(pre, false);
            let meta = Meta {
                map: &map,
                path: Path::new("t.gguf"),
            };
            let tok = gguf_tokenizer::tokenizer_from_gguf(&meta).unwrap();
            assert_eq!(
                tok.encode("12345", false).unwrap().get_ids(),
                want.as_slice(),
                "pre = {pre}"
            );
            assert_eq!(tok.decode(&want, false).unwrap(), "12345");
        }
        // Llama 3 GGUFs say `add_bos_token = true`: encoding with special tokens prepends BOS.
        let map = digit_vocab_metadata("llama-bpe", true);
        let tok = gguf_tokenizer::tokenizer_from_gguf(&Meta {
            map: &map,
            path: Path::new("t.gguf"),
        })
        .unwrap();
        assert_eq!(tok.encode("12345", true).unwrap().get_ids(), [1, 260, 263]);
        assert_eq!(tok.encode("12345", false).unwrap().get_ids(), [260, 263]);
    }

    /// Ids of byte symbols in the tiny vocabulary start after the three special tokens.
    const TINY_ID_BASE: u32 = 3;

    #[test]
    fn unsupported_tokenizers_are_refused_with_the_file_and_model_named() {
        let mut map = digit_vocab_metadata("default", false);
        map.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let err = gguf_tokenizer::tokenizer_from_gguf(&Meta {
            map: &map,
            path: Path::new("/m/x.gguf"),
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/m/x.gguf") && msg.contains("`llama`") && msg.contains("tokenizer.json"),
            "{msg}"
        );

        let mut map = digit_vocab_metadata("default", false);
        map.insert("tokenizer.ggml.pre".into(), Value::String("mystery".into()));
        let msg = gguf_tokenizer::tokenizer_from_gguf(&Meta {
            map: &map,
            path: Path::new("/m/x.gguf"),
        })
        .unwrap_err()
        .to_string();
        assert!(msg.contains("/m/x.gguf") && msg.contains("`mystery`"), "{msg}");
    }

    #[test]
    fn open_errors_name_the_folder_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let msg = GgufModel::open(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains("*.gguf"),
            "{msg}"
        );

        std::fs::write(dir.path().join("a.gguf"), b"x").unwrap();
        std::fs::write(dir.path().join("b.GGUF"), b"x").unwrap();
        let msg = GgufModel::open(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("a.gguf") && msg.contains("b.GGUF"), "{msg}");

        let garbage = dir.path().join("a.gguf");
        std::fs::write(&garbage, b"this is not a GGUF file at all").unwrap();
        let msg = GgufModel::open(&garbage).unwrap_err().to_string();
        assert!(
            msg.contains(&garbage.display().to_string()) && msg.contains("GGUF"),
            "{msg}"
        );

        let missing = dir.path().join("nope.gguf");
        let msg = GgufModel::open(&missing).unwrap_err().to_string();
        assert!(msg.contains("nope.gguf"), "{msg}");
    }

    #[test]
    fn truncated_files_and_wrong_requests_give_errors_naming_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(Family::Llama);
        let (path, weights) = write_tiny_gguf(dir.path(), &spec, GgmlDType::F32, "default");
        let bytes = std::fs::read(&path).unwrap();

        // Cut inside the tensor data: the header parses, the last tensors cannot be read.
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let model = GgufModel::open(&cut).unwrap();
        let norm = model
            .get("model.norm.weight", &[spec.hidden_size], DType::F32, &Device::Cpu)
            .unwrap_err();
        let msg = norm.to_string();
        assert!(msg.contains("cut.gguf") && msg.contains("output_norm.weight"), "{msg}");

        // A tensor type candle cannot dequantize (IQ4_NL = 20): patch the type of token_embd.
        let name = b"token_embd.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        let mut patched = bytes.clone();
        // n_dims (u32) and two u64 dims come before the type.
        assert_eq!(patched[at..at + 4], 2u32.to_le_bytes());
        patched[at + 20..at + 24].copy_from_slice(&20u32.to_le_bytes());
        let iq = dir.path().join("iq.gguf");
        std::fs::write(&iq, &patched).unwrap();
        let msg = GgufModel::open(&iq).unwrap_err().to_string();
        assert!(msg.contains("iq.gguf") && msg.contains("IQ* i-quants"), "{msg}");

        // Cut inside the header.
        std::fs::write(&cut, &bytes[..200]).unwrap();
        let msg = GgufModel::open(&cut).unwrap_err().to_string();
        assert!(msg.contains("cut.gguf"), "{msg}");

        let model = GgufModel::open(&path).unwrap();
        let q = &weights["model.layers.0.self_attn.q_proj.weight"];
        match model.get(
            "model.layers.0.self_attn.q_proj.weight",
            &[3, 3],
            DType::F32,
            &Device::Cpu,
        ) {
            Err(Error::ShapeMismatch {
                path: p,
                tensor,
                expected,
                found,
            }) => {
                assert_eq!((p, tensor.as_str()), (path.clone(), "blk.0.attn_q.weight"));
                assert_eq!((expected, found), (vec![3, 3], q.dims().to_vec()));
            }
            other => panic!("expected a shape mismatch, got {other:?}"),
        }
        let msg = model
            .get("lm_head.weight", &[272, 64], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("tiny.gguf") && msg.contains("output.weight"), "{msg}");
        let msg = model.get(
            "model.layers.9.self_attn.q_proj.weight",
            &[64, 64],
            DType::F32,
            &Device::Cpu,
        );
        assert!(msg.unwrap_err().to_string().contains("blk.9.attn_q.weight"));
        assert!(model
            .get("model.rotary.inv_freq", &[1], DType::F32, &Device::Cpu)
            .is_err());
    }

    #[test]
    fn name_maps_are_inverse() {
        let spec = TinySpec::new(Family::Qwen2);
        for name in spec.weights().unwrap().keys() {
            let g = hf_to_gguf_name(name, Family::Qwen2).unwrap();
            assert_eq!(gguf_to_hf_name(&g, Family::Qwen2).as_deref(), Some(name.as_str()));
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.12.mlp.down_proj.weight", Family::Llama).as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.3.post_attention_layernorm.weight", Family::Llama).as_deref(),
            Some("blk.3.ffn_norm.weight")
        );
        assert_eq!(gguf_to_hf_name("rope_freqs.weight", Family::Llama), None);
        // Gemma 3's four norms per block, as convert_hf_to_gguf.py names them.
        for name in TinySpec::new(Family::Gemma3).weights().unwrap().keys() {
            let g = hf_to_gguf_name(name, Family::Gemma3).unwrap();
            assert_eq!(gguf_to_hf_name(&g, Family::Gemma3).as_deref(), Some(name.as_str()));
        }
        for (hf, gguf) in [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
            ("self_attn.q_norm", "attn_q_norm"),
        ] {
            assert_eq!(
                hf_to_gguf_name(&format!("model.layers.2.{hf}.weight"), Family::Gemma3),
                Some(format!("blk.2.{gguf}.weight"))
            );
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.x.mlp.up_proj.weight", Family::Llama),
            None
        );
    }

    #[test]
    fn real_gguf_config_matches_config_json() {
        let Some(dir) = real_model() else { return };
        let model = GgufModel::open(&dir).unwrap();
        let from_gguf = ModelConfig::from_json(&model.config_json().unwrap(), model.path()).unwrap();
        let from_json = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(from_gguf, from_json);
        assert_eq!(
            model.special_tokens(),
            (Some("<|im_start|>".into()), Some("<|im_end|>".into()))
        );
        let template = model.chat_template().unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(Some(template.as_str()), config["chat_template"].as_str());
    }

    #[test]
    fn real_gguf_tokenizer_matches_tokenizer_json() {
        let Some(dir) = real_model() else { return };
        let model = GgufModel::open(&dir).unwrap();
        let ours = model.tokenizer().unwrap();
        let theirs = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        assert_eq!(ours.get_vocab_size(true), theirs.get_vocab_size(true));
        let long = TEXTS.join(" ");
        for text in TEXTS.iter().copied().chain([long.as_str()]) {
            for specials in [false, true] {
                let a = ours.encode(text, specials).unwrap();
                let b = theirs.encode(text, specials).unwrap();
                assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
                assert_eq!(
                    ours.decode(a.get_ids(), false).unwrap(),
                    theirs.decode(b.get_ids(), false).unwrap()
                );
                assert_eq!(ours.decode(a.get_ids(), false).unwrap(), text);
                assert_eq!(
                    ours.decode(a.get_ids(), true).unwrap(),
                    theirs.decode(b.get_ids(), true).unwrap()
                );
            }
        }
        let chat = ours.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
        assert_eq!(chat.get_ids().first(), Some(&1));
        assert_eq!(chat.get_ids().last(), Some(&2));
    }

    #[test]
    fn real_gguf_tensors_dequantize_with_hugging_face_shapes_and_rope_layout() {
        let Some(dir) = real_model() else { return };
        let model = GgufModel::open(&dir).unwrap();
        let config = ModelConfig::from_json(&model.config_json().unwrap(), model.path()).unwrap();
        let (h, heads, kv) = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
        );
        let q_rows = heads * config.head_dim;
        let kv_rows = kv * config.head_dim;
        let embed = model
            .get(
                "model.embed_tokens.weight",
                &[config.vocab_size, h],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let finite = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite())
        };
        assert!(finite(&embed));
        // Real weights, not zeros: the rows of the embedding differ.
        assert!(crate::testing::max_abs_diff(&embed.get(100).unwrap(), &embed.get(200).unwrap()) > 1e-3);
        assert_eq!(model.tensor_names().len(), 2 + 9 * config.num_hidden_layers);
        assert!(!model.contains("lm_head.weight"));

        let q = model
            .get(
                "model.layers.0.self_attn.q_proj.weight",
                &[q_rows, h],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let k = model
            .get(
                "model.layers.0.self_attn.k_proj.weight",
                &[kv_rows, h],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert!(finite(&q) && finite(&k));
        let mut file = File::open(model.path()).unwrap();
        let mut raw = |n: &str| {
            model
                .content()
                .tensor(&mut file, n, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        let (gq, gk) = (raw("blk.0.attn_q.weight"), raw("blk.0.attn_k.weight"));
        assert_rope_layouts_agree(&gq, &gk, &q, &k, heads, kv);
    }

    /// End to end on the real model: candle's llama.cpp-layout GGUF model (interleaved rotary
    /// embeddings on the rows as stored) and candle's Hugging Face Llama on the tensors this
    /// module hands out must give the same logits, and greedy decoding must answer the question.
    /// (Not under `--cfg finch_qemu`, which has no candle-transformers: Cargo.toml.)
    #[cfg(not(finch_qemu))]
    #[test]
    fn real_gguf_weights_reproduce_the_gguf_model_logits() {
        let Some(dir) = real_model() else { return };
        // Every quantized weight of the reference is dequantized to f32 (read per thread at first
        // use), so the only difference left between the two models is our renaming and unpermute.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let dev = Device::Cpu;
        let model = GgufModel::open(&dir).unwrap();
        let mut file = File::open(model.path()).unwrap();
        let content = Content::read(&mut file).unwrap();
        let mut reference =
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &dev).unwrap();

        let config_json = model.config_json().unwrap();
        let config = ModelConfig::from_json(&config_json, model.path()).unwrap();
        let hf_config: candle_transformers::models::llama::LlamaConfig = serde_json::from_value(config_json).unwrap();
        let hf_config = hf_config.into_config(false);
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let mut tensors = HashMap::new();
        let mut load = |name: String, shape: &[usize]| {
            let t = model.get(&name, shape, DType::F32, &dev).unwrap();
            tensors.insert(name, t);
        };
        load("model.embed_tokens.weight".into(), &[config.vocab_size, h]);
        load("model.norm.weight".into(), &[h]);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            load(format!("{p}.input_layernorm.weight"), &[h]);
            load(format!("{p}.post_attention_layernorm.weight"), &[h]);
            load(format!("{p}.self_attn.q_proj.weight"), &[q, h]);
            load(format!("{p}.self_attn.k_proj.weight"), &[kv, h]);
            load(format!("{p}.self_attn.v_proj.weight"), &[kv, h]);
            load(format!("{p}.self_attn.o_proj.weight"), &[h, q]);
            load(format!("{p}.mlp.gate_proj.weight"), &[i, h]);
            load(format!("{p}.mlp.up_proj.weight"), &[i, h]);
            load(format!("{p}.mlp.down_proj.weight"), &[h, i]);
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let ours = candle_transformers::models::llama::Llama::load(vb, &hf_config).unwrap();

        let tokenizer = model.tokenizer().unwrap();
        let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
        let mut ids = tokenizer.encode(prompt, false).unwrap().get_ids().to_vec();
        let forward = |ids: &[u32]| {
            let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
            let mut cache =
                candle_transformers::models::llama::Cache::new(false, DType::F32, &hf_config, &dev).unwrap();
            ours.forward(&input, 0, &mut cache).unwrap().flatten_all().unwrap()
        };
        let input = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let want = reference.forward(&input, 0).unwrap().flatten_all().unwrap();
        let got = forward(&ids);
        let scale = want.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = crate::testing::max_abs_diff(&got, &want);
        eprintln!("logits: max difference {diff}, largest logit {scale}");
        // Measured: 5e-5 on logits up to 28; without the unpermute the difference is 23.
        assert!(diff <= 1e-5 * scale, "logits differ by {diff} (largest logit {scale})");

        let eos = config.eos_token_ids.clone();
        let mut answer = vec![];
        for _ in 0..12 {
            let next = forward(&ids).argmax(0).unwrap().to_scalar::<u32>().unwrap();
            if eos.contains(&next) {
                break;
            }
            ids.push(next);
            answer.push(next);
        }
        let text = tokenizer.decode(&answer, true).unwrap();
        eprintln!("greedy answer: {text:?}");
        assert!(text.contains("Paris"), "greedy answer: {text:?}");
    }
}
