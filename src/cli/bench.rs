//! `finch bench …`: benchmarks that print one JSON line on stdout.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::bench::generate::BenchGenerateOptions;
use crate::bench::{bench_train, BenchExamples, BenchTrainOptions};
use crate::device::DeviceChoice;
use crate::lora::Target;
use crate::train::config::Precision;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// LoRA training throughput (r=16, alpha 32, all targets, batch 4 × 256, f32, AdamW).
    ///
    /// By default every example fills a whole `--seq-len` row. To see what packing gains on short
    /// examples of mixed lengths, run the same command with and without `--pack` on
    /// `--example-lengths MIN-MAX` (random examples) or `--data FILE --model M` (your dataset):
    /// `tokens_per_sec` counts non-padding tokens only, `padded_tokens_per_sec` every position
    /// computed, and `padding_fraction` is the share of padding in the timed steps.
    Train {
        /// Model folder or GGUF file; default: random weights with SmolLM2-135M's shapes.
        #[arg(long, conflicts_with = "preset")]
        model: Option<String>,
        /// Random weights with a released model's shapes: smollm2-135m, qwen2.5-0.5b,
        /// qwen2.5-1.5b, llama3.2-3b.
        #[arg(long)]
        preset: Option<String>,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value = "all")]
        targets: String,
        /// auto, cpu, cuda[:N], metal (auto: the GPU when there is one).
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Base-weight precision: f32, bf16, f16, or q8_0 / q4_1 (the projections kept in GGUF
        /// blocks; the adapter and optimizer stay f32). bf16 on the CPU: bf16 projections and
        /// output head, bf16 products summed in f32, the rest f32.
        #[arg(long, alias = "base-precision", default_value = "f32")]
        precision: String,
        /// Activation (gradient) checkpointing, as `finch train --checkpoint-activations`.
        #[arg(long)]
        checkpoint_activations: bool,
        /// Train on random examples of mixed lengths, drawn uniformly from MIN to MAX tokens
        /// (e.g. 16-200, MAX at most --seq-len), as many as fill 8 full rows; unpacked, each
        /// batch is padded to its longest example.
        #[arg(long, value_name = "MIN-MAX", conflicts_with = "data")]
        example_lengths: Option<String>,
        /// Train on a dataset file's rows, tokenized with --model's chat template and loss mask
        /// as `finch train --data` does (rows longer than --seq-len are cut).
        #[arg(long, value_name = "FILE", requires = "model")]
        data: Option<PathBuf>,
        /// Pack several examples into each --seq-len row, as `finch train --pack` (attention kept
        /// inside each example).
        #[arg(long)]
        pack: bool,
    },
    /// Inference speed: prefill and decode tokens/s for a 128-token greedy answer, batch 1.
    Generate {
        /// Model folder or GGUF file; default: random weights with SmolLM2-135M's shapes.
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Run the GGUF without dequantizing (Finch's quantized kernels).
        #[arg(long, requires = "model")]
        quantized: bool,
        /// A `finch train` run folder or a PEFT adapter folder, applied unmerged.
        #[arg(long, requires = "model")]
        adapter: Option<PathBuf>,
        /// Fold the adapter into the weights first (as `chat --merge`; f32 path only).
        #[arg(long, requires = "adapter", conflicts_with = "quantized")]
        merge: bool,
        /// auto, cpu, cuda[:N], metal (the f32 path; --quantized runs on the CPU).
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
}

pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    match args.what {
        BenchCommand::Train {
            model,
            preset,
            batch,
            seq_len,
            warmup,
            steps,
            rank,
            targets,
            device,
            precision,
            checkpoint_activations,
            example_lengths,
            data,
            pack,
        } => {
            let examples = match (example_lengths, data) {
                (Some(lengths), _) => BenchExamples::parse_lengths(&lengths, seq_len)?,
                (None, Some(file)) => BenchExamples::Data(file),
                (None, None) => BenchExamples::FullRows,
            };
            let mut opts = BenchTrainOptions {
                model,
                preset,
                batch_size: batch,
                seq_len,
                warmup_steps: warmup,
                timed_steps: steps,
                device,
                precision: Precision::parse(&precision)?,
                checkpoint_activations,
                examples,
                pack,
                ..BenchTrainOptions::default()
            };
            opts.lora.r = rank;
            opts.lora.alpha = 2.0 * rank as f64;
            opts.lora.targets = Target::parse_list(&targets)?;
            let r = bench_train(&opts)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(0)
        }
        BenchCommand::Generate {
            model,
            new_tokens,
            quantized,
            adapter,
            merge,
            device,
        } => {
            let r = crate::bench::generate::bench_generate(&BenchGenerateOptions {
                model,
                new_tokens,
                quantized,
                adapter,
                merge,
                device,
            })?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(0)
        }
    }
}
