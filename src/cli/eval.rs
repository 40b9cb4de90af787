//! `finch eval`: loss/perplexity and generation metrics of a model (and adapter) on a JSONL
//! file; one JSON line on stdout, per-row details to `--details FILE` (JSONL).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;

use crate::generate::{with_adapter, LoadedModel};
use crate::train::eval::{evaluate, Metric};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: String,
    /// A `finch train` run folder or a PEFT adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL with Alpaca fields or OpenAI `messages` (the last assistant message is the reference).
    #[arg(long)]
    pub data: PathBuf,
    /// loss, exact, rouge-l (repeatable or comma-separated).
    #[arg(long, default_value = "loss", value_delimiter = ',')]
    pub metric: Vec<String>,
    /// Per-row results (JSONL).
    #[arg(long)]
    pub details: Option<PathBuf>,
    /// Longest generated answer for exact / rouge-l.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// auto, cpu, cuda[:N], metal (auto: the GPU when there is one).
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceChoice,
}

pub fn run(args: EvalArgs) -> anyhow::Result<i32> {
    let metrics = args
        .metric
        .iter()
        .map(|m| Metric::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    let examples = crate::train::run::load_examples(&args.data, &mut |m| eprintln!("{m}"))?;
    let device = args.device.open()?;
    let loaded =
        LoadedModel::open_on(&args.model, &device).with_context(|| format!("cannot open model `{}`", args.model))?;
    let model = match &args.adapter {
        Some(a) => with_adapter(&loaded.model, a).with_context(|| format!("cannot load adapter `{}`", a.display()))?,
        None => loaded.model.clone(),
    };
    eprintln!("evaluating {} rows ...", examples.len());
    let no_cancel = AtomicBool::new(false);
    let (summary, rows) = evaluate(
        &model,
        &loaded.format,
        &examples,
        &metrics,
        args.max_new_tokens,
        &no_cancel,
    )?;
    if let Some(path) = &args.details {
        let mut text = String::new();
        for r in &rows {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    Ok(0)
}
