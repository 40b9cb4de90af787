//! Benchmarks that print one JSON line. `finch bench train` measures LoRA training throughput in
//! the reference setting (r=16, alpha 32, all 7 targets, batch 4 × 256 tokens, f32, AdamW,
//! 3 warm-up + 10 timed steps), or on short examples of mixed lengths (random ones, or a dataset
//! file's rows), unpacked or packed ([`BenchExamples`]). Every result names the machine it ran on
//! ([`Machine`]).

pub mod generate;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::DType;
use serde::Serialize;

use crate::data::TokenizedExample;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::kernels::KernelPath;
use crate::lora::LoraConfig;
use crate::model::tiny::TinySpec;
use crate::model::weights::TensorMap;
use crate::model::Transformer;
use crate::rng::Rng;
use crate::train::config::Precision;
use crate::train::{Duration, PaddingTally, TrainConfig, TrainData, TrainEvent, Trainer};

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
    /// What the steps train on.
    pub examples: BenchExamples,
    /// Several examples per row, as `finch train --pack` ([`crate::data::pack`]).
    pub pack: bool,
}

/// What `bench train` trains on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BenchExamples {
    /// Eight random sequences of exactly `seq_len` tokens, cycled: no padding, the reference
    /// setting every earlier figure was measured in.
    #[default]
    FullRows,
    /// Random-token examples, loss on every token, with lengths drawn uniformly from
    /// `min..=max`: as many as hold the full rows' eight × `seq_len` tokens, cycled. Unpacked,
    /// each batch is padded to its longest example.
    Lengths { min: usize, max: usize },
    /// A dataset file's rows, loaded and tokenized with the model's chat template as
    /// `finch train --data` does (needs a model with a tokenizer).
    Data(PathBuf),
}

impl BenchExamples {
    /// `MIN-MAX` token lengths (`16-200`), checked against `seq_len`.
    pub fn parse_lengths(text: &str, seq_len: usize) -> Result<BenchExamples> {
        let bad = |reason: String| Error::config("example_lengths", reason);
        let (min, max) = text
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?)))
            .ok_or_else(|| bad(format!("`{text}` is not MIN-MAX token lengths, e.g. 16-200")))?;
        if min < 2 {
            return Err(bad(format!(
                "{min}-{max}: an example needs at least 2 tokens (one to predict from, one to predict)"
            )));
        }
        if min > max {
            return Err(bad(format!("{min}-{max}: MIN is larger than MAX")));
        }
        if max > seq_len {
            return Err(bad(format!(
                "{min}-{max}: MAX is longer than the sequence length {seq_len}; raise --seq-len or lower MAX"
            )));
        }
        Ok(BenchExamples::Lengths { min, max })
    }
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
            examples: BenchExamples::FullRows,
            pack: false,
        }
    }
}

/// The machine facts a benchmark figure depends on, in every bench JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `/proc/cpuinfo`'s model name.
    pub cpu_model: Option<&'static str>,
    /// Vendor, family, model and stepping (x86-64) or implementer and part (ARM): the
    /// microarchitecture where a hypervisor shortens the model name (`kernels::cpu::identity`).
    pub cpu_id: Option<&'static str>,
    /// The family of Finch's own f32 kernels (gemv, the elementwise loops; `FINCH_CPU` forces one).
    pub kernel_family: &'static str,
    /// The family of the gemm microkernels behind Finch's matrix products (the same as
    /// `kernel_family`: Finch drives gemm's public per-family kernels when `FINCH_CPU` asks for
    /// less than the CPU's best). candle's own matmuls, outside Finch's kernels (the decode
    /// attention scores), keep gemm's choice: `gemm_family_candle`.
    pub gemm_family: &'static str,
    pub gemm_family_candle: &'static str,
    /// The family of the quantized block kernels (Q8_0/Q4_1 products): `kernel_family`, except
    /// on Zen 4, where they keep AVX-512 (`kernels::cpu::quantized_family`).
    pub quantized_kernel_family: &'static str,
    /// How bf16 weights (`--precision bf16` on the CPU) are multiplied in products of more than
    /// two token rows: `amx-bf16` (Intel AMX tiles), `avx512-bf16` (`vdpbf16ps` tiles) or
    /// `widened` (to f32, then the f32 gemm): `kernels::bf16`, `kernels::cpu::amx`,
    /// `kernels::cpu::tiles`.
    pub bf16_products: &'static str,
    /// How f32 frozen weights (`--precision f32`) are multiplied in training's products (256 or
    /// more token rows): `avx512-tiles` (Finch's own AVX-512 register tiles) or `gemm` (the gemm
    /// crate in `gemm_family`): `kernels::panel`, `kernels::cpu::tiles`. Products of 16–255
    /// rows (prefill) run the tiles on every AVX-512 CPU unless `FINCH_TILES=off`.
    pub f32_products: &'static str,
    /// Transparent huge pages: `always`, `madvise` or `never`.
    pub thp_mode: Option<&'static str>,
}

impl Machine {
    pub fn now() -> Machine {
        use crate::kernels::cpu;
        let family = cpu::family().name();
        Machine {
            cpu_model: cpu::model_name(),
            cpu_id: cpu::identity(),
            kernel_family: family,
            gemm_family: family,
            gemm_family_candle: cpu::best().name(),
            quantized_kernel_family: cpu::quantized_family().name(),
            bf16_products: crate::kernels::bf16::products_name(),
            f32_products: crate::kernels::panel::f32_products_name(),
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
    /// The most heap memory live at once (`finch`'s allocator counts it; `None` elsewhere), in
    /// MiB: `peak_rss_mb` less it is what the allocator kept mapped beyond what was in use.
    pub allocated_peak_mb: Option<f64>,
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
    /// `fused` (Finch's CPU kernels) or `composite` (candle ops: GPUs, `FINCH_FUSED=0`, f16).
    pub path: &'static str,
    /// `--example-lengths`: the random examples' shortest and longest length.
    pub example_lengths: Option<[usize; 2]>,
    /// `--data`: the dataset file trained on.
    pub data: Option<String>,
    pub pack: bool,
    /// With `pack`: how many rows the examples were packed into.
    pub packed_rows: Option<usize>,
    /// Positions computed per second, padding included (`tokens_per_sec` counts non-padding
    /// tokens only, so the two differ by the padding).
    pub padded_tokens_per_sec: f64,
    /// The timed steps' padding share: 1 − non-padding tokens / positions computed.
    pub padding_fraction: f64,
}

pub fn bench_train(opts: &BenchTrainOptions) -> Result<BenchTrainResult> {
    let device = opts.device.open()?;
    let dtype = opts.precision.dtype();
    // bf16 on the CPU runs an f32 model over bf16 projections through the fused kernels.
    let path = if device.is_cpu() && matches!(dtype, DType::F32 | DType::BF16) {
        crate::kernels::kernel_path()
    } else {
        KernelPath::Composite
    };
    let total = opts.warmup_steps + opts.timed_steps;
    let cfg = TrainConfig {
        model: opts.model.clone().unwrap_or_default(),
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
        pack: opts.pack,
        ..TrainConfig::default()
    };
    let (mut trainer, name, estimated_peak_mb) = match &opts.examples {
        BenchExamples::Data(file) => data_trainer(opts, cfg, file)?,
        examples => {
            let (model, name) = bench_model(opts, dtype, &device)?;
            let train = random_examples(examples, opts.seq_len, model.cfg.vocab_size);
            let cfg = TrainConfig {
                model: name.clone(),
                ..cfg
            };
            let estimated_peak_mb = crate::train::memory::estimate(&model.cfg, &cfg).total_mb;
            let mut model = model;
            model.add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))?;
            let data = TrainData {
                train,
                eval: vec![],
                pad_id: 0,
            };
            (Trainer::new(cfg, model, data, None)?, name, estimated_peak_mb)
        }
    };
    let stop = AtomicBool::new(false);
    let mut losses = vec![];
    let mut timed_start = None;
    let (mut faults_start, mut faults_end) = (None, None);
    let mut timed = PaddingTally::default();
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
                timed.add(m);
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
        tokens_per_sec: timed.tokens as f64 / secs.max(1e-9),
        secs_per_step: secs / opts.timed_steps.max(1) as f64,
        peak_rss_mb: crate::system::peak_rss_mb(),
        estimated_peak_mb,
        allocated_peak_mb: crate::alloc::peak_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        minor_page_faults_per_step: faults,
        machine: Machine::now(),
        loss_first: losses.first().copied().unwrap_or(f32::NAN),
        loss_last: losses.last().copied().unwrap_or(f32::NAN),
        trainable_params: trainable,
        device: crate::device::name(&device),
        precision: opts.precision,
        checkpoint_activations: opts.checkpoint_activations,
        path: path.as_str(),
        example_lengths: match opts.examples {
            BenchExamples::Lengths { min, max } => Some([min, max]),
            _ => None,
        },
        data: match &opts.examples {
            BenchExamples::Data(file) => Some(file.display().to_string()),
            _ => None,
        },
        pack: opts.pack,
        packed_rows: trainer.packed_rows(),
        padded_tokens_per_sec: timed.padded_tokens as f64 / secs.max(1e-9),
        padding_fraction: timed.share(),
    })
}

/// The model `bench train` loads (`--model`) or builds with random weights (`--preset`).
fn bench_model(opts: &BenchTrainOptions, dtype: DType, device: &candle_core::Device) -> Result<(Transformer, String)> {
    let quantized = opts.precision.quantized_base();
    if let Some(m) = &opts.model {
        return Ok((
            crate::hub::open_model(m)?.load_with_base(dtype, quantized, device)?,
            m.clone(),
        ));
    }
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
        Transformer::load_with_base(&cfg, &src, dtype, quantized, device)?
    } else {
        Transformer::load_with_base(&cfg, &spec.lazy_weights(), dtype, quantized, device)?
    };
    Ok((model, name))
}

/// Random-token training sequences, loss on every token. Full rows: eight fixed sequences of
/// `seq_len` tokens, cycled (the loss must fall as the adapter memorises them). Lengths: examples
/// of lengths drawn uniformly from `min..=max`, as many as hold the same eight × `seq_len` tokens.
fn random_examples(examples: &BenchExamples, seq_len: usize, vocab: usize) -> Vec<TokenizedExample> {
    let mut rng = Rng::new(7);
    let example = |len: usize, rng: &mut Rng| TokenizedExample {
        input_ids: (0..len).map(|_| rng.below(vocab) as u32).collect(),
        loss_mask: vec![true; len],
        truncated: false,
    };
    match *examples {
        BenchExamples::Lengths { min, max } => {
            let mut lengths = Rng::derive(7, "bench-lengths");
            let mut out = vec![];
            let mut tokens = 0;
            while tokens < 8 * seq_len {
                let len = min + lengths.below(max - min + 1);
                tokens += len;
                out.push(example(len, &mut rng));
            }
            out
        }
        _ => (0..8).map(|_| example(seq_len, &mut rng)).collect(),
    }
}

/// A trainer on a dataset file's rows, built as `finch train` builds one (the model's chat
/// template, its loss mask, `--seq-len` truncation), without a run folder, evaluation or probes.
fn data_trainer(opts: &BenchTrainOptions, cfg: TrainConfig, file: &std::path::Path) -> Result<(Trainer, String, f64)> {
    let Some(model) = &opts.model else {
        return Err(Error::config(
            "data",
            "a dataset is tokenized with a model's tokenizer and chat template: add --model",
        ));
    };
    let cfg = TrainConfig {
        data: file.display().to_string(),
        eval_every: 0,
        ignore_memory_check: true,
        ..cfg
    };
    // Notes (rejected rows, truncation) are for `finch train`; the figure is the point here.
    let trainer = crate::train::run::build(&cfg, None, &mut |_| {})?;
    let estimated_peak_mb = crate::train::memory::estimate(&trainer.model().cfg, &cfg).total_mb;
    Ok((trainer, model.clone(), estimated_peak_mb))
}
