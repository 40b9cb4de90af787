//! `finch data …`: dataset commands. `inspect` loads a file, validates every row and prints one
//! JSON summary on stdout; with `--model` it also tokenizes every row with the model's template;
//! with `--show N` it prints row N as the model sees it, masked text in `⟦…⟧`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::data::inspect::{inspect, loss_segments, mark_segments};
use crate::data::load::{load_file, FileKind, Format, LoadOptions};
use crate::data::LossOn;
use crate::template::{special_tokens_from_config, BuiltinTemplate, ChatTemplate};

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Load a dataset, validate every row, print a JSON summary (and optionally one row).
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Dataset file: .jsonl, .json, .csv or .parquet.
    pub file: PathBuf,
    /// Model folder (tokenizer.json, tokenizer_config.json): adds token-length statistics.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequence length used for `over_seq_len` and truncation.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Print row N (1-based, counting loaded rows) rendered, masked text in ⟦…⟧.
    #[arg(long, value_name = "N")]
    pub show: Option<usize>,
    /// Record format (detected when omitted): alpaca, sharegpt, messages, prompt_completion, text.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// File type (taken from the extension when omitted): jsonl, json, csv, parquet.
    #[arg(long = "file-type", value_parser = parse_file_kind)]
    pub file_type: Option<FileKind>,
    /// Map a field to another name in the file, e.g. `--field output=response` (repeatable).
    #[arg(long = "field", value_name = "KEY=NAME")]
    pub fields: Vec<String>,
    /// Chat template: the model's own (default), or chatml, llama3, alpaca, none.
    #[arg(long, value_parser = parse_template)]
    pub template: Option<BuiltinTemplate>,
    /// Which tokens carry loss.
    #[arg(long, value_enum, default_value_t = LossOnArg::Assistant)]
    pub loss_on: LossOnArg,
    /// Keep exact duplicate rows instead of rejecting them.
    #[arg(long)]
    pub keep_duplicates: bool,
    /// Colour the `--show` output on stderr.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossOnArg {
    Assistant,
    All,
    LastTurn,
}

impl From<LossOnArg> for LossOn {
    fn from(arg: LossOnArg) -> Self {
        match arg {
            LossOnArg::Assistant => LossOn::Assistant,
            LossOnArg::All => LossOn::All,
            LossOnArg::LastTurn => LossOn::LastTurn,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
        format!("unknown format `{s}` (expected one of: {})", names.join(", "))
    })
}

fn parse_file_kind(s: &str) -> Result<FileKind, String> {
    FileKind::from_name(s).ok_or_else(|| format!("unknown file type `{s}` (expected jsonl, json, csv or parquet)"))
}

fn parse_template(s: &str) -> Result<BuiltinTemplate, String> {
    BuiltinTemplate::from_name(s)
        .ok_or_else(|| format!("unknown template `{s}` (expected chatml, llama3, alpaca or none)"))
}

pub fn run(args: DataArgs) -> anyhow::Result<i32> {
    match args.command {
        DataCommand::Inspect(args) => run_inspect(args),
    }
}

/// The tokenizer of a model folder. Only folders with a `tokenizer.json` are read here; models
/// that exist only as a GGUF file get their tokenizer from the model loader.
pub fn model_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        anyhow::bail!(
            "{}: no tokenizer.json in this model folder (GGUF-only models are not supported by `data inspect` yet)",
            dir.display()
        );
    }
    Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))
}

/// The template to use: an explicit built-in (with the model's special tokens), the model's own,
/// or ChatML when there is neither (with a warning).
fn choose_template(
    model: Option<&Path>,
    explicit: Option<BuiltinTemplate>,
    warnings: &mut Vec<String>,
) -> anyhow::Result<ChatTemplate> {
    let (bos, eos) = match model {
        Some(dir) => special_tokens_from_config(dir)?,
        None => (None, None),
    };
    if let Some(kind) = explicit {
        return Ok(ChatTemplate::builtin(kind).with_special_tokens(bos, eos));
    }
    if let Some(dir) = model {
        if let Some(template) = ChatTemplate::from_tokenizer_config(dir)? {
            return Ok(template);
        }
        warnings.push(format!(
            "{} has no chat template; using chatml (pick one with --template)",
            dir.display()
        ));
    }
    Ok(ChatTemplate::builtin(BuiltinTemplate::ChatMl).with_special_tokens(bos, eos))
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<i32> {
    let mut options = LoadOptions {
        format: args.format,
        file_kind: args.file_type,
        keep_duplicates: args.keep_duplicates,
        ..LoadOptions::default()
    };
    for pair in &args.fields {
        options.fields.set_pair(pair)?;
    }
    if args.seq_len == 0 {
        anyhow::bail!("--seq-len must be at least 1");
    }
    let report = load_file(&args.file, &options)?;
    eprintln!("{}: {}", args.file.display(), report.summary());
    let loss_on = LossOn::from(args.loss_on);
    let mut warnings = vec![];
    let tokenizer = args.model.as_deref().map(model_tokenizer).transpose()?;
    let needs_template = tokenizer.is_some() || args.show.is_some();
    let template = if needs_template {
        Some(choose_template(args.model.as_deref(), args.template, &mut warnings)?)
    } else {
        None
    };
    let model = tokenizer.as_ref().zip(template.as_ref());
    let mut inspection = inspect(&report, model, loss_on, args.seq_len)?;
    warnings.append(&mut inspection.warnings);
    inspection.warnings = warnings;
    let mut out = serde_json::to_value(&inspection).context("cannot serialize the summary")?;
    // The flat field names, next to the nested summary the studio uses.
    if let Some(tokens) = &inspection.tokens {
        out["token_lengths"] = serde_json::to_value(tokens.token_lengths)?;
        out["over_seq_len"] = json!(tokens.over_seq_len);
    }
    if let (Some(n), Some(template)) = (args.show, template.as_ref()) {
        let row = n
            .checked_sub(1)
            .and_then(|i| report.rows.get(i))
            .with_context(|| format!("--show {n}: the dataset has rows 1 to {}", report.rows.len()))?;
        let segments = loss_segments(&row.example, template, tokenizer.as_ref(), loss_on, args.seq_len)?;
        let ansi = match args.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => std::io::stderr().is_terminal(),
        };
        eprintln!("row {n} (line {}), loss on the unbracketed text:", row.line);
        eprintln!("{}", mark_segments(&segments, ansi));
        out["show"] = json!({
            "row": n,
            "line": row.line,
            "marked": mark_segments(&segments, false),
            "segments": segments,
        });
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(0)
}
