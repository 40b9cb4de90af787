//! LoRA: which layers get adapters, how they are initialised, and the PEFT file layout
//! (`adapter_config.json` + `adapter_model.safetensors`) used to save and load them, so adapters
//! move freely between Finch and Python PEFT.

pub mod linear;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;
pub use linear::{ForwardCtx, FrozenWeight, LoraLinear, LoraWeights};

/// A projection that can carry an adapter. Short names are what users type (`q,k,v`); PEFT
/// names are what files store (`q_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    /// q, k and v as one matrix (Phi-3's `qkv_proj`): one adapter over the fused output.
    #[serde(rename = "qkv_proj")]
    Qkv,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    /// gate and up as one matrix (Phi-3's `gate_up_proj`).
    #[serde(rename = "gate_up_proj")]
    GateUp,
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    /// Every projection of a model with separate q/k/v and gate/up matrices (what `all` means).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Every projection of a model with fused `qkv_proj` and `gate_up_proj` (Phi-3).
    pub const ALL_FUSED: [Target; 4] = [Target::Qkv, Target::O, Target::GateUp, Target::Down];

    /// The projections of a model with (`fused`) or without fused q/k/v and gate/up matrices.
    pub fn all_for(fused: bool) -> &'static [Target] {
        if fused {
            &Self::ALL_FUSED
        } else {
            &Self::ALL
        }
    }

    /// `targets` as a model with (`fused`) or without fused matrices has them: on a fused
    /// model q, k and v together become `qkv` and gate and up together `gate_up` (one of them
    /// alone cannot be adapted: PEFT's adapter covers the whole matrix); on a split model `qkv`
    /// becomes q, k, v and `gate_up` gate, up. Sorted, without duplicates.
    pub fn resolve(targets: &[Target], fused: bool) -> Result<Vec<Target>> {
        let has = |t: Target| targets.contains(&t);
        let mut out = vec![];
        for &t in targets {
            match (t, fused) {
                (Target::Qkv, false) => out.extend([Target::Q, Target::K, Target::V]),
                (Target::GateUp, false) => out.extend([Target::Gate, Target::Up]),
                (Target::Q | Target::K | Target::V, true) => {
                    if !(has(Target::Qkv) || has(Target::Q) && has(Target::K) && has(Target::V)) {
                        return Err(Error::config(
                            "targets",
                            "this model (Phi-3) holds q, k and v in one matrix, qkv_proj: choose q, k and v together (or qkv), or none of them",
                        ));
                    }
                    out.push(Target::Qkv);
                }
                (Target::Gate | Target::Up, true) => {
                    if !(has(Target::GateUp) || has(Target::Gate) && has(Target::Up)) {
                        return Err(Error::config(
                            "targets",
                            "this model (Phi-3) holds gate and up in one matrix, gate_up_proj: choose gate and up together (or gate_up), or neither",
                        ));
                    }
                    out.push(Target::GateUp);
                }
                (t, _) => out.push(t),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::Qkv => "qkv",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::GateUp => "gate_up",
            Target::Down => "down",
        }
    }

    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::Qkv => "qkv_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::GateUp => "gate_up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Accepts `q` or `q_proj` (case-insensitive), and the fused `qkv` / `gate_up`.
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim().to_ascii_lowercase();
        Target::ALL
            .into_iter()
            .chain([Target::Qkv, Target::GateUp])
            .find(|t| s == t.short() || s == t.peft_name())
    }

    /// Parses a comma-separated list such as `q,k,v,o` or `all`.
    pub fn parse_list(s: &str) -> Result<Vec<Target>> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(Target::ALL.to_vec());
        }
        let mut out = vec![];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let t = Target::parse(part).ok_or_else(|| {
                Error::config(
                    "targets",
                    format!(
                        "unknown target `{}` (use q,k,v,o,gate,up,down, qkv and gate_up for Phi-3, or all)",
                        part.trim()
                    ),
                )
            })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            return Err(Error::config("targets", "no target layers given"));
        }
        out.sort();
        Ok(out)
    }

    /// The Hugging Face module path of this projection in layer `layer`.
    pub fn module_path(self, layer: usize) -> String {
        let group = match self {
            Target::Q | Target::K | Target::V | Target::Qkv | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::GateUp | Target::Down => "mlp",
        };
        format!("model.layers.{layer}.{group}.{}", self.peft_name())
    }
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<Target>,
    /// rsLoRA (Kalajdzievski 2023): scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("rank", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.dropout),
            ));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::config(
                "alpha",
                format!("{} must be a positive number", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::config("targets", "no target layers given"));
        }
        Ok(())
    }

    /// Fresh adapter weights for a `[out, in]` layer: A Kaiming-uniform with a = √5 (PEFT's
    /// default, bound 1/√in), B zero, so the adapted model starts equal to the base.
    pub fn init_weights(
        &self,
        in_features: usize,
        out_features: usize,
        rng: &mut Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<LoraWeights> {
        let bound = 1.0 / (in_features as f32).sqrt();
        let a: Vec<f32> = (0..self.r * in_features)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (self.r, in_features), device)?.to_dtype(dtype)?)?;
        let b = Var::zeros((out_features, self.r), dtype, device)?;
        Ok(LoraWeights {
            a,
            b,
            scale: self.scale(),
            dropout: self.dropout,
        })
    }
}

/// PEFT's `adapter_config.json`, with the fields Python PEFT needs to load the adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub task_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn default_bias() -> String {
    "none".into()
}

impl PeftConfig {
    pub fn from_lora(cfg: &LoraConfig, base_model: Option<String>) -> Self {
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: cfg.r,
            lora_alpha: cfg.alpha,
            lora_dropout: cfg.dropout,
            target_modules: cfg.targets.iter().map(|t| t.peft_name().to_string()).collect(),
            base_model_name_or_path: base_model,
            use_rslora: cfg.use_rslora,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            modules_to_save: None,
            init_lora_weights: serde_json::Value::Bool(true),
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        }
    }

    pub fn to_lora(&self, path: &Path) -> Result<LoraConfig> {
        if self.peft_type != "LORA" {
            return Err(Error::invalid(
                path,
                "field `peft_type`",
                format!("`{}` is not LORA", self.peft_type),
            ));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(Error::invalid(
                path,
                "field `rank_pattern`",
                "per-layer ranks are not supported yet",
            ));
        }
        let mut targets = vec![];
        for m in &self.target_modules {
            let t = Target::parse(m).ok_or_else(|| {
                Error::invalid(path, "field `target_modules`", format!("module `{m}` is not supported"))
            })?;
            targets.push(t);
        }
        targets.sort();
        targets.dedup();
        Ok(LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: self.use_rslora,
        })
    }
}

/// PEFT's tensor names for a module path.
pub fn peft_keys(module: &str) -> (String, String) {
    (
        format!("base_model.model.{module}.lora_A.weight"),
        format!("base_model.model.{module}.lora_B.weight"),
    )
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, each atomically
/// (temporary file, then rename).
pub fn save_adapter(dir: &Path, cfg: &PeftConfig, weights: &[(String, &LoraWeights)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create adapter folder", e))?;
    let mut tensors = HashMap::new();
    for (module, w) in weights {
        let (ka, kb) = peft_keys(module);
        tensors.insert(ka, w.a.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        tensors.insert(kb, w.b.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    let st = dir.join("adapter_model.safetensors");
    // candle writes safetensors to a path, so it writes the temporary file's.
    let file = crate::fsutil::AtomicFile::create(&st).map_err(|e| Error::io(&st, "cannot create adapter file", e))?;
    candle_core::safetensors::save(&tensors, file.temp_path())?;
    file.commit()
        .map_err(|e| Error::io(&st, "cannot move the written adapter into place", e))?;
    let json = serde_json::to_string_pretty(cfg).map_err(|e| Error::invalid(dir, "adapter config", e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join("adapter_config.json"), json.as_bytes())
}

/// The PEFT adapter folder that `path` names: `path` itself when it holds
/// `adapter_config.json`, else `path/adapter` (a training run folder).
pub fn resolve_adapter_dir(path: &Path) -> Result<PathBuf> {
    if path.join("adapter_config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let nested = path.join("adapter");
    if nested.join("adapter_config.json").is_file() {
        return Ok(nested);
    }
    let hint = if !path.exists() {
        "no such folder".to_string()
    } else if path.join("checkpoints").is_dir() {
        "this run folder has no adapter/ yet (the run has not finished); pass a checkpoint's adapter folder".to_string()
    } else {
        "expected a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a \
         `finch train` run folder holding adapter/"
            .to_string()
    };
    Err(Error::MissingFile {
        path: path.to_path_buf(),
        file: "adapter_config.json".into(),
        hint,
    })
}

/// A loaded adapter: its configuration and `(A, B)` per module path.
#[derive(Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    pub peft: PeftConfig,
    pub weights: HashMap<String, (Tensor, Tensor)>,
}

/// Reads a PEFT adapter folder (written by Finch or by Python PEFT).
pub fn load_adapter(dir: &Path, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.is_file() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            file: "adapter_config.json".into(),
            hint: "an adapter folder holds adapter_config.json and adapter_model.safetensors".into(),
        });
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, "cannot read", e))?;
    let peft: PeftConfig =
        serde_json::from_str(&text).map_err(|e| Error::invalid(&cfg_path, "adapter config", e.to_string()))?;
    let config = peft.to_lora(&cfg_path)?;
    let st = dir.join("adapter_model.safetensors");
    if !st.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            "only adapter_model.bin (pickle) is present; Finch never unpickles, re-save with safe_serialization=True"
        } else {
            "the adapter weights are missing"
        };
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            file: "adapter_model.safetensors".into(),
            hint: hint.into(),
        });
    }
    let tensors = candle_core::safetensors::load(&st, device)?;
    let mut a_map = HashMap::new();
    let mut b_map = HashMap::new();
    for (k, t) in tensors {
        let Some(rest) = k.strip_prefix("base_model.model.") else {
            return Err(Error::invalid(
                &st,
                format!("tensor `{k}`"),
                "name does not start with `base_model.model.`",
            ));
        };
        // PEFT may store `lora_A.weight` or, with a named adapter, `lora_A.default.weight`.
        let rest = rest.replace(".default.weight", ".weight");
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            a_map.insert(m.to_string(), t.to_dtype(DType::F32)?);
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            b_map.insert(m.to_string(), t.to_dtype(DType::F32)?);
        } else {
            return Err(Error::invalid(&st, format!("tensor `{k}`"), "not a LoRA A/B weight"));
        }
    }
    let mut weights = HashMap::new();
    for (m, a) in a_map {
        let b = b_map.remove(&m).ok_or_else(|| Error::MissingTensor {
            path: st.clone(),
            tensor: peft_keys(&m).1,
            hint: " (lora_A present without lora_B)".into(),
        })?;
        weights.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        return Err(Error::MissingTensor {
            path: st.clone(),
            tensor: peft_keys(m).0,
            hint: " (lora_B present without lora_A)".into(),
        });
    }
    Ok(Adapter { config, peft, weights })
}
