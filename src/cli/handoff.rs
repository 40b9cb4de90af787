//! `finch export-run` and `finch import-adapter`: a run handed to LLaMA-Factory, axolotl or TRL
//! for multi-GPU training, and the PEFT adapter it trains brought back as a Finch run, through
//! the engine the studio's Export page also calls ([`crate::export::handoff`]). What the target
//! cannot reproduce and that changes the result goes to stderr; one JSON line on stdout.

use std::path::PathBuf;

use clap::Args;

use crate::export::handoff::{export_run, import_adapter, HandoffRequest, ImportRequest, Target};

fn parse_target(name: &str) -> Result<Target, String> {
    Target::from_name(name).ok_or_else(|| format!("unknown target `{name}` (expected llamafactory, axolotl or trl)"))
}

#[derive(Debug, Args)]
pub struct ExportRunArgs {
    /// A run folder written by `finch train`.
    pub run: PathBuf,
    /// llamafactory, axolotl or trl.
    #[arg(long, value_parser = parse_target)]
    pub to: Target,
    /// A new or empty folder.
    #[arg(long)]
    pub out: PathBuf,
    /// The base model as the tool should load it (Hugging Face folder or Hub id), when the run's
    /// model is a GGUF file or a path that machine does not have.
    #[arg(long)]
    pub base_model: Option<String>,
}

pub fn run_export(args: ExportRunArgs) -> anyhow::Result<i32> {
    let handoff = export_run(&HandoffRequest {
        run: args.run,
        target: args.to,
        out: args.out,
        base_model: args.base_model,
    })?;
    for w in &handoff.warnings {
        eprintln!("warning: not carried over, changes the result: {w}");
    }
    eprintln!(
        "wrote {} training and {} held-out rows for {} into {}; launch with:\n  cd {} && {}",
        handoff.train_rows,
        handoff.eval_rows,
        handoff.target.title(),
        handoff.out.display(),
        handoff.out.display(),
        handoff.command
    );
    let v = serde_json::json!({
        "target": handoff.target.name(),
        "out": handoff.out,
        "files": handoff.files,
        "train_rows": handoff.train_rows,
        "eval_rows": handoff.eval_rows,
        "command": handoff.command,
        "not_carried_over": handoff.not_carried,
        "warnings": handoff.warnings,
    });
    println!("{v}");
    Ok(0)
}

#[derive(Debug, Args)]
pub struct ImportAdapterArgs {
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    pub dir: PathBuf,
    /// The new run's name (default: imported-<folder name>).
    #[arg(long)]
    pub name: Option<String>,
    /// The runs folder the new run goes into.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The base model, when the adapter's base_model_name_or_path does not open on this machine.
    #[arg(long)]
    pub model: Option<String>,
}

pub fn run_import(args: ImportAdapterArgs) -> anyhow::Result<i32> {
    let imported = import_adapter(&ImportRequest {
        dir: args.dir,
        name: args.name,
        runs_dir: args.runs_dir,
        model: args.model,
        fallback_model: None,
    })?;
    match &imported.trainer_state {
        Some(p) => eprintln!("loss history: {} steps from {}", imported.logged_steps, p.display()),
        None => eprintln!("no trainer_state.json found: the run has no loss history"),
    }
    eprintln!(
        "imported as {} (rank {}, base {}); try: finch chat --model {} --adapter {}",
        imported.run.display(),
        imported.rank,
        imported.model,
        imported.model,
        imported.run.display()
    );
    let v = serde_json::json!({
        "run": imported.run,
        "model": imported.model,
        "rank": imported.rank,
        "targets": imported.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "logged_steps": imported.logged_steps,
        "trainer_state": imported.trainer_state,
    });
    println!("{v}");
    Ok(0)
}
