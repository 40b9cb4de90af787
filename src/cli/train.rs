//! `finch train`: fine-tune a model with LoRA from the terminal. Settings come from
//! `--config FILE` (a run's `config.toml`), then `--preset NAME`, then flags; flags win. `--preflight [N]` times N
//! steps of that run and prints the estimate as one JSON line instead of training.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::cli::progress::Progress;
use crate::data::LossOn;
use crate::lora::Target;
use crate::train::config::{DeviceChoice, Precision};
use crate::train::presets::Preset;
use crate::train::{Duration, Schedule, TrainConfig};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A run's config.toml to start from (flags override its values).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from a preset (quick-demo, balanced, quality), as the studio's buttons do; applied
    /// after --config, and flags given explicitly override it.
    #[arg(long, value_parser = parse_preset)]
    pub preset: Option<Preset>,
    /// Model folder, .gguf file (or folder holding one), or Hub id.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: JSONL with Alpaca fields or OpenAI `messages` (see `finch data inspect`).
    #[arg(long)]
    pub data: Option<String>,
    /// Separate validation file (otherwise --eval-split of --data is held out).
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Run folder (config.toml, metrics.jsonl, adapter/, checkpoints/).
    #[arg(long)]
    pub out: Option<String>,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the training data (alternative to --steps).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// LoRA rank r.
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha/r).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout probability.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Layers that get adapters: comma-separated among q,k,v,o,gate,up,down, or `all`.
    #[arg(long)]
    pub targets: Option<String>,
    /// rsLoRA scaling (alpha/sqrt(r)).
    #[arg(long)]
    pub rslora: bool,
    /// Which tokens carry loss: assistant, all, last-turn.
    #[arg(long)]
    pub loss_on: Option<String>,
    /// Fraction of --data held out for evaluation.
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps (0: at the end or on Ctrl-C only).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// How many step checkpoints to keep.
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Maximum tokens per example (longer conversations are truncated; raw text is cut into
    /// windows of this many tokens).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Tokens each raw-text window shares with the previous one (below --seq-len; default 0).
    #[arg(long, value_name = "N")]
    pub text_overlap: Option<usize>,
    /// The chat template's `enable_thinking` (Qwen3; default: the template's own, thinking on).
    #[arg(long, value_name = "true|false")]
    pub enable_thinking: Option<bool>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule: constant, linear, cosine.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Warm-up steps.
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Base-weight precision: f32, bf16, f16, or q8_0 / q4_1 (the projections kept in GGUF
    /// blocks on the CPU: LoRA over a quantized frozen base). bf16 on the CPU keeps the
    /// projections and output head in bf16 and multiplies them with bf16 products summed in f32
    /// (AVX-512 BF16 where the CPU has it), the rest of the model in f32.
    #[arg(long, alias = "base-precision")]
    pub precision: Option<String>,
    /// auto, cpu, cuda[:N], metal (auto: the GPU when there is one).
    #[arg(long)]
    pub device: Option<String>,
    /// Activation (gradient) checkpointing: keep only each block's input in the forward pass and
    /// recompute the block in the backward pass (much less memory, ~1/3 more compute).
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Pack several short examples into each --seq-len row (sft), each attending only to itself
    /// with positions restarting at 0: no compute on padding, the same loss.
    #[arg(long)]
    pub pack: bool,
    /// Start even when the estimated peak memory exceeds the memory the machine has free.
    #[arg(long)]
    pub ignore_memory_check: bool,
    /// A prompt the model answers before training, at every evaluation and at the end (up to 3;
    /// repeat the flag). Replaces the probes of --config.
    #[arg(long = "probe", value_name = "PROMPT")]
    pub probes: Vec<String>,
    /// Longest probe answer in tokens.
    #[arg(long)]
    pub probe_max_tokens: Option<usize>,
    /// Objective: sft (supervised), dpo or orpo (preference pairs: rows with `chosen` and
    /// `rejected` answers, e.g. the studio's votes.jsonl).
    #[arg(long)]
    pub method: Option<String>,
    /// DPO β: how far the adapter may move from the base model (default 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO label smoothing (share of preferences assumed flipped, in [0, 0.5); default 0).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// ORPO λ: weight of the odds-ratio term (TRL's ORPO `beta`, default 0.1).
    #[arg(long)]
    pub orpo_lambda: Option<f64>,
    /// Run N steps (default 5) of this run, print seconds/step, tokens/s, peak memory and the
    /// estimated total time as one JSON line, and exit without training or writing anything.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "5")]
    pub preflight: Option<usize>,
}

fn parse_preset(name: &str) -> Result<Preset, String> {
    Preset::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        format!("unknown preset `{name}` (expected one of: {})", names.join(", "))
    })
}

fn parse_enum<T: serde::de::DeserializeOwned>(field: &str, value: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_ascii_lowercase()))
        .map_err(|_| anyhow::anyhow!("invalid --{field} `{value}`"))
}

impl TrainArgs {
    /// The effective configuration: defaults, then --config (or the run's own config.toml when
    /// resuming), then --preset, then flags.
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        let run_config = self
            .out
            .as_ref()
            .map(|o| PathBuf::from(o).join("config.toml"))
            .filter(|p| self.resume && self.config.is_none() && p.is_file());
        let mut c = match self.config.as_ref().or(run_config.as_ref()) {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        if self.config.is_none() && run_config.is_none() {
            c.out = String::new();
        }
        if let Some(preset) = self.preset {
            preset.apply(&mut c);
        }
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(self.model, c.model);
        set!(self.data, c.data);
        if self.eval_data.is_some() {
            c.eval_data = self.eval_data.clone();
        }
        set!(self.out, c.out);
        if let Some(s) = self.steps {
            c.duration = Duration::Steps(s);
        }
        if let Some(e) = self.epochs {
            c.duration = Duration::Epochs(e);
        }
        set!(self.rank, c.lora.r);
        set!(self.alpha, c.lora.alpha);
        set!(self.dropout, c.lora.dropout);
        if let Some(t) = &self.targets {
            c.lora.targets = Target::parse_list(t)?;
        }
        if self.rslora {
            c.lora.use_rslora = true;
        }
        if let Some(l) = &self.loss_on {
            c.loss_on = parse_enum::<LossOn>("loss-on", l)?;
        }
        set!(self.eval_split, c.eval_split);
        set!(self.eval_every, c.eval_every);
        set!(self.save_every, c.save_every);
        set!(self.keep_checkpoints, c.keep_checkpoints);
        set!(self.grad_accum, c.grad_accum);
        set!(self.batch, c.batch_size);
        set!(self.seq_len, c.seq_len);
        set!(self.text_overlap, c.text_overlap);
        if self.enable_thinking.is_some() {
            c.enable_thinking = self.enable_thinking;
        }
        set!(self.lr, c.lr);
        if let Some(m) = &self.method {
            c.method = crate::train::Method::parse(m)?;
        }
        set!(self.beta, c.beta);
        set!(self.label_smoothing, c.label_smoothing);
        set!(self.orpo_lambda, c.orpo_lambda);
        if let Some(s) = &self.schedule {
            c.schedule = Schedule::parse(s)?;
        }
        set!(self.warmup, c.warmup_steps);
        set!(self.weight_decay, c.weight_decay);
        set!(self.max_grad_norm, c.max_grad_norm);
        set!(self.seed, c.seed);
        if let Some(p) = &self.precision {
            c.precision = parse_enum::<Precision>("precision", p)?;
        }
        if let Some(d) = &self.device {
            c.device = DeviceChoice::parse(d)?;
        }
        if self.checkpoint_activations {
            c.checkpoint_activations = true;
        }
        if self.pack {
            c.pack = true;
        }
        c.ignore_memory_check = self.ignore_memory_check;
        if !self.probes.is_empty() {
            c.probe_prompts = self.probes.clone();
        }
        set!(self.probe_max_tokens, c.probe_max_tokens);
        // A preflight writes nothing, so it needs no run folder.
        if c.out.is_empty() && self.preflight.is_none() {
            anyhow::bail!("no run folder given: use --out DIR (e.g. --out runs/demo)");
        }
        Ok(c)
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<i32> {
    let cfg = args.to_config()?;
    if let Some(steps) = args.preflight {
        if args.resume {
            anyhow::bail!("--preflight times a new run; it cannot be combined with --resume");
        }
        resolve_hub_model(&cfg.model)?;
        let report = crate::train::preflight(&cfg, steps, &AtomicBool::new(false))?;
        for note in &report.notes {
            eprintln!("{note}");
        }
        println!("{}", serde_json::to_string(&report)?);
        return Ok(0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // First Ctrl-C: finish the current step, checkpoint and exit cleanly. Second: exit now.
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    resolve_hub_model(&cfg.model)?;
    let mut progress = Progress::default();
    let mut trainer = crate::train::run::prepare(&cfg, args.resume, &mut |msg| eprintln!("{msg}"))?;
    let summary = trainer.run(&stop, &mut |e| progress.on_event(e))?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(if summary.stopped { 130 } else { 0 })
}

/// Downloads (or finds in the cache) a Hub model with a progress bar; the loader then reads the cache.
fn resolve_hub_model(model: &str) -> anyhow::Result<()> {
    if !std::path::Path::new(model).exists() && crate::hub::looks_like_hub_id(model) {
        crate::cli::hub::resolve_model_with_progress(model)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<TrainConfig> {
        let cmd = Cmd::try_parse_from(std::iter::once("train").chain(args.iter().copied()))?;
        cmd.train.to_config()
    }

    #[test]
    fn method_flags_set_the_objective() {
        let cfg = config(&[
            "--method",
            "dpo",
            "--beta",
            "0.2",
            "--label-smoothing",
            "0.1",
            "--out",
            "r",
        ])
        .unwrap();
        assert_eq!(
            (cfg.method, cfg.beta, cfg.label_smoothing),
            (crate::train::Method::Dpo, 0.2, 0.1)
        );
        let cfg = config(&["--method", "orpo", "--orpo-lambda", "0.3", "--out", "r"]).unwrap();
        assert_eq!((cfg.method, cfg.orpo_lambda), (crate::train::Method::Orpo, 0.3));
        assert_eq!(config(&["--out", "r"]).unwrap().method, crate::train::Method::Sft);
        let err = config(&["--method", "ppo", "--out", "r"]).unwrap_err().to_string();
        assert!(err.contains("sft, dpo, orpo"), "{err}");
    }

    #[test]
    fn a_preset_sets_the_studio_values_and_flags_override_it() {
        let cfg = config(&["--preset", "balanced", "--out", "runs/x"]).unwrap();
        let want = Preset::Balanced.config();
        assert_eq!((cfg.lora.r, cfg.seq_len, cfg.duration), (16, 512, want.duration));
        let cfg = config(&[
            "--preset",
            "quick-demo",
            "--rank",
            "4",
            "--steps",
            "7",
            "--out",
            "runs/x",
        ])
        .unwrap();
        assert_eq!(cfg.lora.r, 4, "an explicit flag wins over the preset");
        assert_eq!(cfg.duration, Duration::Steps(7));
        assert_eq!(
            cfg.lora.alpha,
            Preset::QuickDemo.config().lora.alpha,
            "the rest is the preset's"
        );
        let err = Cmd::try_parse_from(["train", "--preset", "fast"])
            .err()
            .expect("refused");
        assert!(err.to_string().contains("quick-demo, balanced, quality"), "{err}");
    }
}
