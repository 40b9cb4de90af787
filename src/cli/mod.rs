//! The `finch` command line. Each subcommand lives in its own file; this module only parses
//! and dispatches. Commands print progress on stderr and one JSON result on stdout.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod chat;
pub mod compare;
pub mod data;
pub mod eval;
pub mod export;
pub mod handoff;
pub mod hub;
pub mod progress;
pub mod train;

#[derive(Debug, Parser)]
#[command(
    name = "finch",
    version,
    about = "Instruction-tune small language models with LoRA, on your own machine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model with LoRA.
    Train(Box<train::TrainArgs>),
    /// Benchmarks (one JSON line on stdout).
    Bench(bench::BenchArgs),
    /// Search, download and manage Hugging Face Hub models
    Hub(hub::HubArgs),
    /// Inspect and validate instruction datasets.
    Data(data::DataArgs),
    /// Chat with a model (and adapter) on the terminal.
    Chat(Box<chat::ChatArgs>),
    /// The same prompt to the base model and each adapter, side by side.
    Compare(Box<compare::CompareArgs>),
    /// Held-out loss/perplexity and generation metrics (exact match, ROUGE-L).
    Eval(Box<eval::EvalArgs>),
    /// Export an adapter: PEFT folder, merged Hugging Face folder, or GGUF + Ollama Modelfile.
    Export(Box<export::ExportArgs>),
    /// Hand a run to LLaMA-Factory, axolotl or TRL: its data, template, mask and settings for N GPUs.
    ExportRun(Box<handoff::ExportRunArgs>),
    /// Turn a PEFT adapter folder (from LLaMA-Factory, axolotl, TRL, ...) into a Finch run.
    ImportAdapter(Box<handoff::ImportAdapterArgs>),
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        None => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            println!();
            Ok(0)
        }
        Some(command) => match command {
            Command::Train(args) => train::run(*args),
            Command::Bench(args) => bench::run(args),
            Command::Hub(args) => hub::run(args),
            Command::Data(args) => data::run(args),
            Command::Chat(args) => chat::run(*args),
            Command::Compare(args) => compare::run(*args),
            Command::Eval(args) => eval::run(*args),
            Command::Export(args) => export::run(*args),
            Command::ExportRun(args) => handoff::run_export(*args),
            Command::ImportAdapter(args) => handoff::run_import(*args),
        },
    }
}
