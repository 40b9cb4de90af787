//! `finch bench generate`: prefill and decode speed of the KV-cached inference path, batch 1,
//! f32 on the CPU (or, with `--quantized`, the GGUF's own blocks through
//! [`crate::kernels::quant`]), for a fixed prompt and a 128-token greedy answer that ignores end tokens (so
//! every run decodes the same number of tokens). Detokenization is not timed.
//!
//! Decoding one token reads every weight once, so its speed limit is the memory bandwidth: the
//! result reports the bandwidth measured on this machine (a streaming read of a buffer larger
//! than any cache) and decode's share of it.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use serde::Serialize;

use crate::data::{Message, Role};
use crate::error::{Error, Result};
use crate::generate::adapter::with_adapter;
use crate::generate::sampling::argmax;
use crate::generate::{CachedTransformer, ChatFormat, Decoder, LoadedModel};
use crate::model::quantized::QuantizedModel;
use crate::model::tiny::TinySpec;
use crate::model::transformer::Transformer;
use crate::model::weights::TensorMap;
use crate::rng::Rng;

/// The fixed user message of the benchmark prompt (about 150 tokens with SmolLM2's template).
const PROMPT: &str = "You are helping a small bakery plan its week. On Monday they bake bread and \
croissants, on Tuesday they bake cakes for birthdays, on Wednesday the oven is serviced, on \
Thursday they bake bread again and on Friday they prepare pastries for the weekend market. \
The owner wants to add a gluten-free line without disturbing the existing schedule, and asks \
which day is best, what equipment must be cleaned in between, and how to explain the change to \
regular customers. Write a short, friendly plan with concrete steps, and end with a one-line \
summary.";

#[derive(Debug, Clone, Serialize)]
pub struct BenchGenerateResult {
    pub bench: &'static str,
    pub model: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
    pub peak_rss_mb: Option<f64>,
    /// Weight bytes one decoded token reads (the layers' matrices and the output head).
    pub weight_bytes_per_token: usize,
    /// This machine's streaming-read bandwidth on the decode threads, GB/s (10⁹ bytes).
    pub memory_bandwidth_gb_per_s: f64,
    /// `weight_bytes_per_token · decode_tokens_per_sec / bandwidth`: 1.0 is the memory limit.
    pub decode_bandwidth_share: f64,
    #[serde(flatten)]
    pub machine: super::Machine,
}

/// What `finch bench generate` runs.
#[derive(Debug, Clone, Default)]
pub struct BenchGenerateOptions {
    /// Model folder, GGUF file or Hub id; `None`: random weights with SmolLM2-135M's shapes.
    pub model: Option<String>,
    pub new_tokens: usize,
    /// The GGUF's own blocks through the integer kernels.
    pub quantized: bool,
    /// A run or PEFT adapter folder attached to the f32 model (unmerged unless `merge`).
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights first.
    pub merge: bool,
    /// Where the f32 path runs (`--quantized` runs on the CPU).
    pub device: crate::device::DeviceChoice,
}

/// Times one greedy answer of `new_tokens` tokens (after a short warm-up answer). Without a
/// model, random weights with SmolLM2-135M's shapes and a random 150-token prompt.
pub fn bench_generate(opts: &BenchGenerateOptions) -> Result<BenchGenerateResult> {
    let (model, new_tokens) = (opts.model.as_deref(), opts.new_tokens);
    if opts.adapter.is_some() && model.is_none() {
        return Err(Error::config("adapter", "an adapter needs --model"));
    }
    if opts.merge && (opts.adapter.is_none() || opts.quantized) {
        return Err(Error::config(
            "merge",
            "--merge needs --adapter and the f32 path (not --quantized)",
        ));
    }
    if opts.quantized {
        opts.device.cpu_only("--quantized")?;
        let spec = model.ok_or_else(|| Error::config("quantized", "needs --model (a GGUF file)"))?;
        let files = crate::hub::open_model(spec)?;
        let prompt = prompt_ids(&ChatFormat::from_files(&files)?)?;
        let mut q = QuantizedModel::open(&files.path, &files.config)?;
        let mut name = format!("{spec} (quantized)");
        if let Some(a) = &opts.adapter {
            q.set_adapter(a)?;
            name = format!("{spec} + {} (quantized, unmerged)", a.display());
        }
        greedy_timed(&mut q, &prompt, 8)?;
        let timing = greedy_timed(&mut q, &prompt, new_tokens)?;
        return Ok(result(name, prompt.len(), timing, q.weight_bytes_per_token()));
    }
    let device = opts.device.open()?;
    let (transformer, prompt, name): (Transformer, Vec<u32>, String) = match model {
        Some(spec) => {
            let m = LoadedModel::open_on(spec, &device)?;
            let prompt = prompt_ids(&m.format)?;
            match &opts.adapter {
                Some(a) => {
                    let tuned = with_adapter(&m.model, a)?;
                    let (tuned, how) = if opts.merge {
                        (tuned.merged()?, "merged")
                    } else {
                        (tuned, "unmerged")
                    };
                    (tuned, prompt, format!("{spec} + {} ({how})", a.display()))
                }
                None => (m.model, prompt, spec.to_string()),
            }
        }
        None => {
            let spec = TinySpec::smollm2_135m();
            let name = "random-smollm2-135m";
            let cfg = crate::model::ModelConfig::from_json(&spec.config_json(), name.as_ref())?;
            let src = TensorMap {
                tensors: spec.weights()?,
                origin: name.into(),
            };
            let model = Transformer::load(&cfg, &src, DType::F32, &device)?;
            let mut rng = Rng::new(1);
            let prompt = (0..150).map(|_| rng.below(cfg.vocab_size) as u32).collect();
            (model, prompt, name.to_string())
        }
    };
    let mut cached = CachedTransformer::new(&transformer);
    greedy_timed(&mut cached, &prompt, 8)?;
    let timing = greedy_timed(&mut cached, &prompt, new_tokens)?;
    Ok(result(
        name,
        prompt.len(),
        timing,
        f32_weight_bytes_per_token(&transformer.cfg),
    ))
}

/// Bytes of f32 weights one token's forward reads: every layer's seven projections and the
/// output head (one embedding row and the norms are negligible; adapters are small).
fn f32_weight_bytes_per_token(cfg: &crate::model::ModelConfig) -> usize {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let layer = h * q * 2 + h * kv * 2 + h * i * 3;
    (layer * cfg.num_hidden_layers + cfg.vocab_size * h) * std::mem::size_of::<f32>()
}

/// Streaming-read bandwidth in GB/s: the best of three passes summing a 256 MiB buffer (8× the
/// largest L3 of the machines measured) on the quantized path's thread pool, the threads decode
/// runs on.
pub fn memory_bandwidth_gb_per_s() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1f32; 64 << 20];
    let chunk = 1 << 16;
    let pass = || {
        let t = Instant::now();
        let total: f32 = buf.par_chunks(chunk).map(crate::kernels::ops::sum).sum();
        (t.elapsed().as_secs_f64(), total)
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let (secs, total) = match crate::kernels::quant::pool() {
            Some(pool) => pool.install(pass),
            None => pass(),
        };
        // The sum is used, so the reads cannot be optimised away.
        if total > 0.0 {
            best = best.min(secs);
        }
    }
    (buf.len() * std::mem::size_of::<f32>()) as f64 / best.max(1e-9) / 1e9
}

fn result(
    model: String,
    prompt_tokens: usize,
    (prefill_secs, decode_secs, produced): (f64, f64, usize),
    weight_bytes_per_token: usize,
) -> BenchGenerateResult {
    let decode_tokens_per_sec = produced.saturating_sub(1) as f64 / decode_secs.max(1e-9);
    // Before the bandwidth pass, whose buffer would count as the model's memory.
    let peak_rss_mb = crate::system::peak_rss_mb();
    let bandwidth = memory_bandwidth_gb_per_s();
    BenchGenerateResult {
        bench: "generate",
        model,
        threads: crate::kernels::cpu::threads(),
        prompt_tokens,
        new_tokens: produced,
        prefill_tokens_per_sec: prompt_tokens as f64 / prefill_secs.max(1e-9),
        // The first answer token comes from the prefill's logits.
        decode_tokens_per_sec,
        peak_rss_mb,
        weight_bytes_per_token,
        memory_bandwidth_gb_per_s: bandwidth,
        decode_bandwidth_share: weight_bytes_per_token as f64 * decode_tokens_per_sec / (bandwidth * 1e9),
        machine: super::Machine::now(),
    }
}

fn prompt_ids(format: &ChatFormat) -> Result<Vec<u32>> {
    format.encode_prompt(&[Message::new(Role::User, PROMPT)])
}

/// (prefill seconds, decode seconds, tokens produced).
fn greedy_timed(model: &mut (dyn Decoder + Send), prompt: &[u32], new_tokens: usize) -> Result<(f64, f64, usize)> {
    model.reset()?;
    let t = Instant::now();
    let mut logits = model.step(prompt)?;
    let prefill_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut produced = 0;
    let room = model.context_len().saturating_sub(prompt.len());
    while produced < new_tokens.min(room) {
        let token = argmax(&logits.to_vec1::<f32>()?);
        produced += 1;
        if produced == new_tokens.min(room) {
            break;
        }
        logits = crate::generate::on_decode_pool(|| model.step(&[token]))?;
    }
    Ok((prefill_secs, t.elapsed().as_secs_f64(), produced))
}
