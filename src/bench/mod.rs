//! Benchmarks that print one JSON line. `finch bench train` measures LoRA training throughput in
//! the reference setting (r=16, alpha 32, all 7 targets, batch 4 × 256 tokens, f32, AdamW,
//! 3 warm-up + 10 timed steps). Every result names the machine it ran on ([`Machine`]).

pub mod generate;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::DType;
use serde::Serialize;

use crate::data::TokenizedExample;
use crate::device::DeviceChoice;
use crate::error::Result;
use crate::kernels::KernelPath;
use crate::lora::LoraConfig;
use crate::model::tiny::TinySpec;
use crate::model::weights::TensorMap;
use crate::model::Transformer;
use crate::rng::Rng;
use crate::train::config::Precision;
use crate::train::{Duration, TrainConfig, TrainData, TrainEvent, Trainer};

#[derive(Debug, Clone)]
pub struct BenchTrainOptions {
    /// A model to load; `None` builds random weights with [`BenchTrainOptions::preset`]'s shapes.
    pub model: Option<String>,
    /// The shapes of the random model ([`TinySpec::preset`]): `smollm2-135m` by default.
    pub preset: Option<String>,
    pub batch_size: usize,
    pub seq_len: usize,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub lora: LoraConfig,
    pub device: DeviceChoice,
    /// Base weights' precision (the adapter and optimizer are f32).
    pub precision: Precision,
    /// Activation checkpointing ([`crate::train::checkpointing`]).
    pub checkpoint_activations: bool,
}

impl Default for BenchTrainOptions {
    fn default() -> Self {
        BenchTrainOptions {
            model: None,
            preset: None,
            batch_size: 4,
            seq_len: 256,
            warmup_steps: 3,
            timed_steps: 10,
            lora: LoraConfig {
                r: 16,
                alpha: 32.0,
                ..LoraConfig::default()
            },
            device: DeviceChoice::Auto,
            precision: Precision::F32,
            checkpoint_activations: false,
        }
    }
}

/// The machine facts a benchmark figure depends on, in every bench JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `/proc/cpuinfo`'s model name.
    pub cpu_model: Option<&'static str>,
    /// The family of Finch's own kernels (gemv, quantized products; `FINCH_CPU` forces one).
    pub kernel_family: &'static str,
    /// The family of the gemm microkernels behind Finch's matrix products (the same as
    /// `kernel_family`: Finch drives gemm's public per-family kernels when `FINCH_CPU` asks for
    /// less than the CPU's best). candle's own matmuls, outside Finch's kernels (the decode
    /// attention scores), keep gemm's choice: `gemm_family_candle`.
    pub gemm_family: &'static str,
    pub gemm_family_candle: &'static str,
    /// Transparent huge pages: `always`, `madvise` or `never`.
    pub thp_mode: Option<&'static str>,
}

impl Machine {
    pub fn now() -> Machine {
        use crate::kernels::cpu;
        let family = cpu::family().name();
        Machine {
            cpu_model: cpu::model_name(),
            kernel_family: family,
            gemm_family: family,
            gemm_family_candle: cpu::best().name(),
            thp_mode: cpu::thp_mode(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchTrainResult {
    pub bench: &'static str,
    pub model: String,
    pub threads: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub timed_steps: usize,
    pub tokens_per_sec: f64,
    pub secs_per_step: f64,
    pub peak_rss_mb: Option<f64>,
    /// What [`crate::train::memory::estimate`] predicts for this run's peak, in MiB.
    pub estimated_peak_mb: f64,
    /// Minor page faults per timed step (fresh pages the kernel mapped and zeroed); near zero
    /// when steps reuse their buffers.
    pub minor_page_faults_per_step: Option<f64>,
    #[serde(flatten)]
    pub machine: Machine,
    pub loss_first: f32,
    pub loss_last: f32,
    pub trainable_params: usize,
    /// `cpu`, `cuda`, `cuda:1`, `metal`.
    pub device: String,
    pub precision: Precision,
    pub checkpoint_activations: bool,
    /// `fused` (Finch's CPU kernels) or `composite` (candle ops: GPUs, `FINCH_FUSED=0`, bf16/f16).
    pub path: &'static str,
}

pub fn bench_train(opts: &BenchTrainOptions) -> Result<BenchTrainResult> {
    let device = opts.device.open()?;
    let dtype = opts.precision.dtype();
    let path = if device.is_cpu() && dtype == DType::F32 {
        crate::kernels::kernel_path()
    } else {
        KernelPath::Composite
    };
    let (model, name): (Transformer, String) = match &opts.model {
        Some(m) => (
            crate::hub::open_model(m)?.load_with_base(dtype, opts.precision.quantized_base(), &device)?,
            m.clone(),
        ),
        None => {
            let preset = opts.preset.as_deref().unwrap_or("smollm2-135m");
            let spec = TinySpec::preset(preset)?;
            let name = format!("random-{preset}");
            let cfg = crate::model::ModelConfig::from_json(&spec.config_json(), name.as_ref())?;
            let model = if preset == "smollm2-135m" {
                // The weights every earlier figure was measured with.
                let src = TensorMap {
                    tensors: spec.weights()?,
                    origin: name.clone().into(),
                };
                Transformer::load_with_base(&cfg, &src, dtype, opts.precision.quantized_base(), &device)?
            } else {
                Transformer::load_with_base(
                    &cfg,
                    &spec.lazy_weights(),
                    dtype,
                    opts.precision.quantized_base(),
                    &device,
                )?
            };
            (model, name)
        }
    };
    let vocab = model.cfg.vocab_size;
    // Eight fixed random sequences, cycled: the loss must fall as the adapter memorises them.
    let mut rng = Rng::new(7);
    let train: Vec<TokenizedExample> = (0..8)
        .map(|_| TokenizedExample {
            input_ids: (0..opts.seq_len).map(|_| rng.below(vocab) as u32).collect(),
            loss_mask: vec![true; opts.seq_len],
            truncated: false,
        })
        .collect();
    let total = opts.warmup_steps + opts.timed_steps;
    let cfg = TrainConfig {
        model: name.clone(),
        data: "random".into(),
        lora: opts.lora.clone(),
        duration: Duration::Steps(total),
        batch_size: opts.batch_size,
        seq_len: opts.seq_len,
        lr: 1e-3,
        eval_split: 0.0,
        device: opts.device,
        precision: opts.precision,
        checkpoint_activations: opts.checkpoint_activations,
        ..TrainConfig::default()
    };
    let estimated_peak_mb = crate::train::memory::estimate(&model.cfg, &cfg).total_mb;
    let mut model = model;
    model.add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))?;
    let mut trainer = Trainer::new(
        cfg,
        model,
        TrainData {
            train,
            eval: vec![],
            pad_id: 0,
        },
        None,
    )?;
    let stop = AtomicBool::new(false);
    let mut losses = vec![];
    let mut timed_start = None;
    let (mut faults_start, mut faults_end) = (None, None);
    let mut timed_tokens = 0usize;
    let mut trainable = 0;
    trainer.run(&stop, &mut |e| match e {
        TrainEvent::Started { trainable_params, .. } => {
            trainable = *trainable_params;
            if opts.warmup_steps == 0 {
                timed_start = Some(Instant::now());
                faults_start = crate::system::minor_page_faults();
            }
        }
        TrainEvent::Step(m) => {
            losses.push(m.loss);
            if m.step == opts.warmup_steps {
                timed_start = Some(Instant::now());
                faults_start = crate::system::minor_page_faults();
            }
            if m.step > opts.warmup_steps {
                timed_tokens += m.tokens;
            }
            if m.step == total {
                faults_end = crate::system::minor_page_faults();
            }
        }
        _ => {}
    })?;
    let secs = timed_start.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    let faults = faults_start
        .zip(faults_end)
        .map(|(a, b)| b.saturating_sub(a) as f64 / opts.timed_steps.max(1) as f64);
    Ok(BenchTrainResult {
        bench: "train",
        model: name,
        threads: crate::kernels::cpu::threads(),
        batch_size: opts.batch_size,
        seq_len: opts.seq_len,
        timed_steps: opts.timed_steps,
        tokens_per_sec: timed_tokens as f64 / secs.max(1e-9),
        secs_per_step: secs / opts.timed_steps.max(1) as f64,
        peak_rss_mb: crate::system::peak_rss_mb(),
        estimated_peak_mb,
        minor_page_faults_per_step: faults,
        machine: Machine::now(),
        loss_first: losses.first().copied().unwrap_or(f32::NAN),
        loss_last: losses.last().copied().unwrap_or(f32::NAN),
        trainable_params: trainable,
        device: crate::device::name(&device),
        precision: opts.precision,
        checkpoint_activations: opts.checkpoint_activations,
        path: path.as_str(),
    })
}
