//! Every setting of a training run, as one serde type. It is written to `config.toml` in the run
//! folder so `finch train --config runs/x/config.toml` repeats the run exactly.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::LossOn;
use crate::error::{Error, Result};
use crate::lora::LoraConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::config(
                "schedule",
                format!("`{other}` is not one of constant, linear, cosine"),
            )),
        }
    }
}

/// Numeric precision of the base weights during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
    /// The seven projections kept in Q8_0 blocks (8.5 bits a weight), trained through in f32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// The seven projections kept in Q4_1 blocks (5 bits a weight), trained through in f32.
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            "q8_0" => Ok(Precision::Q8_0),
            "q4_1" => Ok(Precision::Q4_1),
            other => Err(Error::config(
                "precision",
                format!("`{other}` is not one of f32, bf16, f16, q8_0, q4_1"),
            )),
        }
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
            Precision::Q8_0 | Precision::Q4_1 => candle_core::DType::F32,
        }
    }

    /// The block type the frozen projections are kept in, for a quantized base.
    pub fn quantized_base(self) -> Option<crate::kernels::quant::QType> {
        use crate::kernels::quant::QType;
        match self {
            Precision::Q8_0 => Some(QType::Q8_0),
            Precision::Q4_1 => Some(QType::Q4_1),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
            Precision::Q8_0 => "q8_0",
            Precision::Q4_1 => "q4_1",
        }
    }
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Supervised fine-tuning: cross-entropy on the trained tokens (on a preference pair, its
    /// chosen answer).
    #[default]
    Sft,
    /// Direct Preference Optimization (Rafailov et al. 2023), TRL's `sigmoid` loss: the adapter
    /// learns to prefer `chosen` over `rejected` relative to the base model (the same weights
    /// with the adapter switched off).
    Dpo,
    /// Odds Ratio Preference Optimization (Hong et al. 2024), as TRL's `ORPOTrainer`: NLL on the
    /// chosen sequence plus λ times an odds-ratio penalty, no reference model.
    Orpo,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Sft, Method::Dpo, Method::Orpo];

    pub fn parse(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| Error::config("method", format!("`{s}` is not one of sft, dpo, orpo")))
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Orpo => "orpo",
        }
    }

    /// Whether the method trains on preference pairs.
    pub fn is_preference(self) -> bool {
        self != Method::Sft
    }
}

/// Which device trains (`auto`, `cpu`, `cuda[:N]`, `metal`); see [`crate::device`].
pub use crate::device::DeviceChoice;

/// How long to train: a number of optimizer steps, or whole passes over the training data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Duration {
    Steps(usize),
    Epochs(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model folder, GGUF file, or Hub id.
    pub model: String,
    /// Training data (JSONL with Alpaca fields or OpenAI `messages`, or any format the data loader reads).
    pub data: String,
    /// Optional separate validation file; otherwise `eval_split` of `data` is held out.
    #[serde(default)]
    pub eval_data: Option<String>,
    /// Run folder.
    pub out: String,
    pub lora: LoraConfig,
    pub duration: Duration,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub schedule: Schedule,
    /// Warm-up steps (linear from 0 to `lr`).
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clipping; 0 disables it.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub loss_on: LossOn,
    /// Fraction of `data` held out for evaluation (0 disables evaluation unless `eval_data` is set).
    pub eval_split: f64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end or when stopped).
    pub save_every: usize,
    /// How many step checkpoints to keep (oldest removed first).
    pub keep_checkpoints: usize,
    pub precision: Precision,
    pub device: DeviceChoice,
    /// Up to [`MAX_PROBE_PROMPTS`] prompts the model answers (greedily, with the current
    /// adapter) before training, at every evaluation and at the end, to watch its behaviour change.
    #[serde(default)]
    pub probe_prompts: Vec<String>,
    /// Longest probe answer, in tokens.
    #[serde(default = "default_probe_max_tokens")]
    pub probe_max_tokens: usize,
    /// Raw-text documents are cut into `seq_len`-token windows that share this many tokens with
    /// the previous window (0: back to back). Must be below `seq_len`.
    #[serde(default)]
    pub text_overlap: usize,
    /// The chat template's `enable_thinking` (Qwen3: `false` renders every answer with an empty
    /// think block, as `apply_chat_template(..., enable_thinking=False)`); `None`: the template's
    /// default.
    #[serde(default)]
    pub enable_thinking: Option<bool>,
    /// The objective; configs written before preference training existed are `sft`.
    #[serde(default)]
    pub method: Method,
    /// DPO's β: how far the adapter may move from the base model (TRL's default 0.1).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// DPO label smoothing ε (cDPO: the share of preferences assumed flipped); 0 is plain DPO.
    #[serde(default)]
    pub label_smoothing: f64,
    /// ORPO's λ, the weight of the odds-ratio term (TRL's `beta` of `ORPOConfig`, default 0.1).
    #[serde(default = "default_orpo_lambda")]
    pub orpo_lambda: f64,
    /// Activation (gradient) checkpointing: keep only each decoder block's input during the
    /// forward pass and recompute the block in the backward pass (less memory, ~1/3 more compute).
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// Sequence packing (sft): several short examples per row of up to `seq_len` tokens, each
    /// attending only to itself with positions restarting at 0, so no compute goes to padding.
    #[serde(default)]
    pub pack: bool,
    /// Start even when the memory estimate ([`crate::train::memory`]) exceeds the memory the
    /// machine has free (`--ignore-memory-check`). Not saved: it is a decision for one start.
    #[serde(skip)]
    pub ignore_memory_check: bool,
}

fn default_beta() -> f64 {
    0.1
}

fn default_orpo_lambda() -> f64 {
    0.1
}

/// How many probe prompts a run may carry: each one costs a generation at every evaluation.
pub const MAX_PROBE_PROMPTS: usize = 3;

fn default_probe_max_tokens() -> usize {
    48
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            data: String::new(),
            eval_data: None,
            out: "runs/run".into(),
            lora: LoraConfig::default(),
            duration: Duration::Steps(100),
            batch_size: 4,
            grad_accum: 1,
            seq_len: 512,
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            loss_on: LossOn::Assistant,
            eval_split: 0.1,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 3,
            precision: Precision::F32,
            device: DeviceChoice::Auto,
            probe_prompts: Vec::new(),
            probe_max_tokens: default_probe_max_tokens(),
            text_overlap: 0,
            enable_thinking: None,
            method: Method::Sft,
            beta: default_beta(),
            label_smoothing: 0.0,
            orpo_lambda: default_orpo_lambda(),
            checkpoint_activations: false,
            pack: false,
            ignore_memory_check: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("batch_size", self.batch_size)?;
        positive("grad_accum", self.grad_accum)?;
        if self.seq_len < 2 {
            return Err(Error::config("seq_len", "must be at least 2 tokens"));
        }
        if self.text_overlap >= self.seq_len {
            return Err(Error::config(
                "text_overlap",
                format!(
                    "{} tokens of overlap must be fewer than seq_len = {}",
                    self.text_overlap, self.seq_len
                ),
            ));
        }
        if self.checkpoint_activations && self.method != Method::Sft {
            return Err(Error::config(
                "checkpoint_activations",
                format!(
                    "is implemented for sft only, not for {} (turn it off, or use --method sft)",
                    self.method.name()
                ),
            ));
        }
        if self.pack && self.method != Method::Sft {
            return Err(Error::config(
                "pack",
                format!(
                    "packing is implemented for sft only, not for {} (turn it off, or use --method sft)",
                    self.method.name()
                ),
            ));
        }
        match self.duration {
            Duration::Steps(0) => return Err(Error::config("steps", "must be at least 1")),
            Duration::Epochs(e) if !(e > 0.0 && e.is_finite()) => {
                return Err(Error::config("epochs", format!("{e} must be a positive number")))
            }
            _ => {}
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("lr", format!("{} must be a positive number", self.lr)));
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return Err(Error::config(
                "eval_split",
                format!("{} is not in [0, 1)", self.eval_split),
            ));
        }
        for (f, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(f, format!("{v} is not in [0, 1)")));
            }
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 || self.eps <= 0.0 {
            return Err(Error::config("weight_decay/max_grad_norm/eps", "must not be negative"));
        }
        if self.model.is_empty() {
            return Err(Error::config("model", "no model given (--model)"));
        }
        if self.data.is_empty() {
            return Err(Error::config("data", "no training data given (--data)"));
        }
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(Error::config(
                "beta",
                format!("{} must be a positive number", self.beta),
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(Error::config(
                "label_smoothing",
                format!("{} is not in [0, 0.5)", self.label_smoothing),
            ));
        }
        if !(self.orpo_lambda >= 0.0 && self.orpo_lambda.is_finite()) {
            return Err(Error::config(
                "orpo_lambda",
                format!("{} must be a number ≥ 0", self.orpo_lambda),
            ));
        }
        self.validate_probes()
    }

    /// At most [`MAX_PROBE_PROMPTS`] non-empty prompts and a positive answer length.
    pub fn validate_probes(&self) -> Result<()> {
        if self.probe_prompts.len() > MAX_PROBE_PROMPTS {
            return Err(Error::config(
                "probe_prompts",
                format!(
                    "{} prompts given; at most {MAX_PROBE_PROMPTS} are answered at every evaluation",
                    self.probe_prompts.len()
                ),
            ));
        }
        if let Some(i) = self.probe_prompts.iter().position(|p| p.trim().is_empty()) {
            return Err(Error::config(
                "probe_prompts",
                format!("probe prompt {} is empty", i + 1),
            ));
        }
        if !self.probe_prompts.is_empty() && self.probe_max_tokens == 0 {
            return Err(Error::config("probe_max_tokens", "must be at least 1"));
        }
        Ok(())
    }

    /// Total optimizer steps for `n_train` training examples.
    pub fn total_steps(&self, n_train: usize) -> usize {
        match self.duration {
            Duration::Steps(s) => s,
            Duration::Epochs(e) => {
                let per_step = self.batch_size * self.grad_accum;
                ((e * n_train as f64) / per_step as f64).ceil().max(1.0) as usize
            }
        }
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::config("config", e.to_string()))
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read run config", e))?;
        toml::from_str(&text).map_err(|e| Error::invalid(path, "run config", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> TrainConfig {
        TrainConfig {
            model: "m".into(),
            data: "d.jsonl".into(),
            ..TrainConfig::default()
        }
    }

    #[test]
    fn a_config_written_before_probes_existed_still_reads() {
        let mut text = valid().to_toml().unwrap();
        let before = text.len();
        text = text
            .lines()
            .filter(|l| !l.starts_with("probe_"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.len() < before, "the probe settings are written to config.toml");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = TrainConfig::from_toml_file(&path).unwrap();
        assert!(cfg.probe_prompts.is_empty());
        assert_eq!(cfg.probe_max_tokens, 48);
    }

    #[test]
    fn a_config_without_a_method_is_sft_and_methods_round_trip() {
        let text: String = valid()
            .to_toml()
            .unwrap()
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or_default().trim();
                !["method", "beta", "label_smoothing", "orpo_lambda"].contains(&key)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = TrainConfig::from_toml_file(&path).unwrap();
        assert_eq!(
            (cfg.method, cfg.beta, cfg.label_smoothing, cfg.orpo_lambda),
            (Method::Sft, 0.1, 0.0, 0.1)
        );
        let mut cfg = valid();
        cfg.method = Method::Orpo;
        cfg.beta = 0.25;
        cfg.orpo_lambda = 0.5;
        std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
        assert_eq!(TrainConfig::from_toml_file(&path).unwrap(), cfg);
        assert_eq!(Method::parse("DPO").unwrap(), Method::Dpo);
        assert!(Method::parse("ppo").unwrap_err().to_string().contains("sft, dpo, orpo"));
        cfg.label_smoothing = 0.5;
        assert!(cfg.validate().unwrap_err().to_string().contains("label_smoothing"));
        cfg.label_smoothing = 0.0;
        cfg.beta = 0.0;
        assert!(cfg.validate().unwrap_err().to_string().contains("beta"));
        cfg.beta = 0.1;
        cfg.checkpoint_activations = true;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("checkpoint_activations") && err.contains("orpo"), "{err}");
    }

    #[test]
    fn probe_prompts_round_trip_and_are_validated() {
        let mut cfg = valid();
        cfg.probe_prompts = vec!["What is 2+2?".into(), "Say \"hi\"\nin French.".into()];
        cfg.probe_max_tokens = 20;
        cfg.checkpoint_activations = true;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
        assert_eq!(TrainConfig::from_toml_file(&path).unwrap(), cfg);
        cfg.validate().unwrap();

        cfg.probe_prompts = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("probe_prompts") && err.contains("at most 3"), "{err}");
        cfg.probe_prompts = vec!["a".into(), "  ".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("probe prompt 2 is empty"), "{err}");
        cfg.probe_prompts = vec!["a".into()];
        cfg.probe_max_tokens = 0;
        assert!(cfg.validate().unwrap_err().to_string().contains("probe_max_tokens"));
    }
}
