//! `finch data …`: dataset commands. Each prints one JSON object on stdout.
//! - `inspect` loads a file, validates every row and summarizes it; with `--model` it also
//!   tokenizes every row with the model's template; `--show N` prints row N as the model sees
//!   it, masked text in `⟦…⟧`.
//! - `filter` removes exact / near-duplicates and rows with too short or too long answers and
//!   writes the kept rows as JSONL.
//! - `split` writes a deterministic train / validation split as two JSONL files.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::model::template_choice::choose_template;
use crate::model::ModelFiles;
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::data::edit::DatasetEditor;
use crate::data::inspect::{inspect, loss_segments, mark_segments};
use crate::data::load::{describe_rejection, load_file, FileKind, Format, LoadOptions, LoadReport, Rejection};
use crate::data::quality::{exact_duplicates, near_duplicates, response_chars, NearDuplicateConfig};
use crate::data::split::{apply_split, train_validation_split};
use crate::data::LossOn;
use crate::template::BuiltinTemplate;

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Load a dataset, validate every row, print a JSON summary (and optionally one row).
    Inspect(InspectArgs),
    /// Remove duplicates and rows with too short or too long answers; write the rest as JSONL.
    Filter(FilterArgs),
    /// Write a deterministic train / validation split as two JSONL files.
    Split(SplitArgs),
    /// Score every row by the model's loss on its answer; optionally keep the hardest or easiest share.
    Score(ScoreArgs),
    /// Make instruction rows with the local model: Self-Instruct, Evol-Instruct or back-translation.
    Generate(GenerateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    SelfInstruct,
    EvolInstruct,
    BackTranslation,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Self-Instruct: rows (at least 3, any dataset format) whose instructions seed the prompts.
    #[arg(long)]
    pub seed_data: Option<PathBuf>,
    /// Evol-Instruct: rows whose instructions are evolved.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Back-translation: a .txt/.md/.jsonl (`text` field) document, or a folder of them.
    #[arg(long)]
    pub documents: Option<PathBuf>,
    /// Rows the output should hold at the end (Self-Instruct: required; Evol-Instruct: default
    /// one per input row; back-translation: default every segment).
    #[arg(long)]
    pub count: Option<usize>,
    /// Output JSONL; an existing file from an earlier run of the same method is continued.
    #[arg(long)]
    pub out: PathBuf,
    /// Model folder, GGUF file or Hub id that generates.
    #[arg(long)]
    pub model: String,
    /// A `finch train` run folder or a PEFT adapter folder, applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Run a Q4_1/Q8_0 GGUF model without dequantizing.
    #[arg(long)]
    pub quantized: bool,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens in one model reply.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Self-Instruct: new instructions taken from one prompt.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// New instructions need a ROUGE-L below this against every kept and seed instruction.
    #[arg(long, default_value_t = 0.7)]
    pub rouge_threshold: f64,
    /// Back-translation: lowest self-curation score (1-5) kept.
    #[arg(long, default_value_t = 4)]
    pub min_score: u8,
    /// Back-translation: most tokens in one document segment.
    #[arg(long, default_value_t = 384)]
    pub segment_tokens: usize,
    /// Stop after this many prompts (default: 20 per row still to make).
    #[arg(long)]
    pub max_attempts: Option<usize>,
    /// Print every kept and rejected row on stderr as one JSON line (default: a short line each).
    #[arg(long)]
    pub events: bool,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Model folder, GGUF file or Hub id that scores the rows.
    #[arg(long)]
    pub model: String,
    /// Rows are cut to this many tokens before scoring.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Keep the rows with the highest loss (hardest, or noisy) or the lowest (most typical).
    #[arg(long, value_enum, requires = "out")]
    pub keep: Option<KeepArg>,
    /// Share of rows to keep with --keep (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    pub fraction: f32,
    /// Where to write rows (JSONL), each with its scores (and any provenance it had): the
    /// kept ones with --keep, else every row.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON line per row with its line number and loss (and IFD with --ifd).
    #[arg(long)]
    pub details: Option<PathBuf>,
    /// Also compute IFD (instruction-following difficulty, Li et al. 2023): the answer's loss
    /// given the instruction ÷ its loss alone. IFD >= 1 means the instruction does not help.
    #[arg(long)]
    pub ifd: bool,
    /// What --keep ranks by: the answer loss, or IFD (implies --ifd; rows with IFD >= 1 are
    /// never kept).
    #[arg(long, value_enum, default_value_t = ScoreBy::Loss)]
    pub by: ScoreBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScoreBy {
    Loss,
    Ifd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeepArg {
    Top,
    Bottom,
}

/// How to read the dataset file (shared by every `data` command).
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Dataset file (.jsonl, .json, .csv, .parquet, or raw text: .txt, .md), or a folder of
    /// .txt / .md documents.
    pub file: PathBuf,
    /// Record format (detected when omitted): alpaca, sharegpt, messages, prompt_completion, text.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// File type (taken from the extension when omitted): jsonl, json, csv, parquet, text.
    #[arg(long = "file-type", value_parser = parse_file_kind)]
    pub file_type: Option<FileKind>,
    /// Map a field to another name in the file, e.g. `--field output=response` (repeatable).
    #[arg(long = "field", value_name = "KEY=NAME")]
    pub fields: Vec<String>,
    /// Keep exact duplicate rows instead of rejecting them.
    #[arg(long)]
    pub keep_duplicates: bool,
}

impl LoadArgs {
    /// Loads the file, reporting the row counts on stderr.
    fn load(&self) -> anyhow::Result<LoadReport> {
        let mut options = LoadOptions {
            format: self.format,
            file_kind: self.file_type,
            keep_duplicates: self.keep_duplicates,
            ..LoadOptions::default()
        };
        for pair in &self.fields {
            options.fields.set_pair(pair)?;
        }
        let report = load_file(&self.file, &options)?;
        eprintln!("{}: {}", self.file.display(), report.summary());
        Ok(report)
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Model folder, GGUF file or Hub id: adds token-length statistics.
    #[arg(long)]
    pub model: Option<String>,
    /// Sequence length used for `over_seq_len` and truncation (raw text: the window length).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Tokens each raw-text window shares with the previous one (as `finch train --text-overlap`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub text_overlap: usize,
    /// Print row N (1-based, counting loaded rows) rendered, masked text in ⟦…⟧.
    #[arg(long, value_name = "N")]
    pub show: Option<usize>,
    /// Chat template: the model's own (default), or chatml, llama3, alpaca, none.
    #[arg(long, value_parser = parse_template)]
    pub template: Option<BuiltinTemplate>,
    /// Which tokens carry loss.
    #[arg(long, value_enum, default_value_t = LossOnArg::Assistant)]
    pub loss_on: LossOnArg,
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
    FileKind::from_name(s)
        .ok_or_else(|| format!("unknown file type `{s}` (expected jsonl, json, csv, parquet or text)"))
}

fn parse_template(s: &str) -> Result<BuiltinTemplate, String> {
    BuiltinTemplate::from_name(s)
        .ok_or_else(|| format!("unknown template `{s}` (expected chatml, llama3, alpaca or none)"))
}

pub fn run(args: DataArgs) -> anyhow::Result<i32> {
    match args.command {
        DataCommand::Inspect(args) => run_inspect(args),
        DataCommand::Filter(args) => run_filter(args),
        DataCommand::Split(args) => run_split(args),
        DataCommand::Score(args) => run_score(args),
        DataCommand::Generate(args) => run_generate(args),
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<i32> {
    if args.seq_len == 0 {
        anyhow::bail!("--seq-len must be at least 1");
    }
    if args.text_overlap >= args.seq_len {
        anyhow::bail!("--text-overlap must be below --seq-len");
    }
    let report = args.load.load()?;
    let loss_on = LossOn::from(args.loss_on);
    let mut warnings = vec![];
    let files = args.model.as_deref().map(ModelFiles::open).transpose()?;
    let tokenizer = files.as_ref().map(|f| f.tokenizer.clone());
    let needs_template = tokenizer.is_some() || args.show.is_some();
    let template = if needs_template {
        let choice = choose_template(files.as_ref(), args.template);
        if let Some(note) = choice.note {
            warnings.push(format!("{note} (pick one with --template)"));
        }
        Some(choice.template)
    } else {
        None
    };
    let model = tokenizer.as_ref().zip(template.as_ref());
    let mut inspection = inspect(&report, model, loss_on, args.seq_len, args.text_overlap)?;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dedupe {
    /// Keep every row.
    None,
    /// Rows equal after ignoring case, punctuation and spacing.
    Exact,
    /// Exact duplicates plus MinHash near-duplicates (see --near-threshold).
    Near,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Where to write the kept rows (JSONL; written atomically).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Dedupe::Near)]
    pub dedupe: Dedupe,
    /// Similarity (estimated Jaccard of word 3-grams) from which rows count as near-duplicates.
    #[arg(long, default_value_t = 0.8)]
    pub near_threshold: f32,
    /// Drop rows whose answers (all assistant turns, or the text) have fewer characters.
    #[arg(long)]
    pub min_response_chars: Option<usize>,
    /// Drop rows whose answers have more characters.
    #[arg(long)]
    pub max_response_chars: Option<usize>,
}

fn run_filter(args: FilterArgs) -> anyhow::Result<i32> {
    let report = args.load.load()?;
    let examples: Vec<_> = report.examples().cloned().collect();
    // Why each row goes, first reason wins; indices into `examples`.
    let mut removed: Vec<Option<String>> = vec![None; examples.len()];
    let line = |i: usize| report.rows[i].line;
    let duplicates = match args.dedupe {
        Dedupe::None => vec![],
        Dedupe::Exact => exact_duplicates(&examples),
        Dedupe::Near => {
            let cfg = NearDuplicateConfig {
                threshold: args.near_threshold,
                ..NearDuplicateConfig::default()
            };
            near_duplicates(&examples, &cfg)?
        }
    };
    let (mut exact, mut near, mut short, mut long) = (0usize, 0usize, 0usize, 0usize);
    for d in &duplicates {
        if d.similarity >= 1.0 {
            exact += 1;
        } else {
            near += 1;
        }
        removed[d.index] = Some(format!(
            "duplicate of line {} (similarity {:.2})",
            line(d.of),
            d.similarity
        ));
    }
    for (i, ex) in examples.iter().enumerate() {
        if removed[i].is_some() {
            continue;
        }
        let chars = response_chars(ex);
        if args.min_response_chars.is_some_and(|min| chars < min) {
            short += 1;
            removed[i] = Some(format!("answer has {chars} characters, fewer than the minimum"));
        } else if args.max_response_chars.is_some_and(|max| chars > max) {
            long += 1;
            removed[i] = Some(format!("answer has {chars} characters, more than the maximum"));
        }
    }
    // Kept rows keep their provenance and scores.
    let kept: Vec<_> = report
        .rows
        .iter()
        .zip(&removed)
        .filter(|(_, why)| why.is_none())
        .map(|(row, _)| (row.example.clone(), row.meta.clone()))
        .collect();
    let removed_rows: Vec<Rejection> = removed
        .iter()
        .enumerate()
        .filter_map(|(i, why)| {
            why.as_ref().map(|reason| Rejection {
                line: line(i),
                field: String::new(),
                reason: reason.clone(),
            })
        })
        .collect();
    for r in removed_rows.iter().take(5) {
        eprintln!("removed {}", describe_rejection(r));
    }
    let kept_rows = kept.len();
    DatasetEditor::with_meta(kept).save_jsonl(&args.out)?;
    let out = json!({
        "file": args.load.file.display().to_string(),
        "out": args.out.display().to_string(),
        "rows_in": examples.len(),
        "rows_rejected_on_load": report.rejected.len(),
        "kept": kept_rows,
        "removed": {
            "exact_duplicates": exact,
            "near_duplicates": near,
            "too_short": short,
            "too_long": long,
        },
        "removed_rows": removed_rows.iter().take(20).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(0)
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Fraction of rows for validation, in [0, 1).
    #[arg(long, default_value_t = 0.1)]
    pub validation_fraction: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for train.jsonl and validation.jsonl (created if needed).
    #[arg(long)]
    pub out_dir: PathBuf,
}

fn run_split(args: SplitArgs) -> anyhow::Result<i32> {
    let report = args.load.load()?;
    let rows: Vec<_> = report
        .rows
        .iter()
        .map(|r| (r.example.clone(), r.meta.clone()))
        .collect();
    let split = train_validation_split(rows.len(), args.validation_fraction, args.seed)?;
    let (train, validation) = apply_split(&rows, &split);
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let train_path = args.out_dir.join("train.jsonl");
    let validation_path = args.out_dir.join("validation.jsonl");
    DatasetEditor::with_meta(train).save_jsonl(&train_path)?;
    DatasetEditor::with_meta(validation).save_jsonl(&validation_path)?;
    let out = json!({
        "file": args.load.file.display().to_string(),
        "seed": args.seed,
        "validation_fraction": args.validation_fraction,
        "train": {"path": train_path.display().to_string(), "rows": split.train.len()},
        "validation": {"path": validation_path.display().to_string(), "rows": split.validation.len()},
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(0)
}

fn run_score(args: ScoreArgs) -> anyhow::Result<i32> {
    use crate::data::quality::{select_by, Keep, ScoreKind};
    use crate::train::score::{DataScorer, ScoreProgress};
    let report = args.load.load()?;
    let scorer = DataScorer::open(&args.model).with_context(|| format!("cannot open model `{}`", args.model))?;
    if let Some(note) = &scorer.template_note {
        eprintln!("warning: {note}");
    }
    let examples: Vec<_> = report.examples().cloned().collect();
    let want_ifd = args.ifd || args.by == ScoreBy::Ifd;
    let never = std::sync::atomic::AtomicBool::new(false);
    let mut last_phase = None;
    let table = scorer
        .score(&examples, args.seq_len, want_ifd, &never, &mut |p| {
            let (what, done, total) = match p {
                ScoreProgress::Loss { done, total } => ("scored", done, total),
                ScoreProgress::Ifd { done, total } => ("IFD", done, total),
            };
            if last_phase.is_some_and(|w| w != what) {
                eprintln!();
            }
            last_phase = Some(what);
            eprint!("\r{what} {done} / {total} rows");
        })?
        .context("scoring was stopped")?;
    eprintln!();
    for (i, why) in &table.unscored {
        eprintln!("warning: line {} not scored: {why}", report.rows[*i].line);
    }
    let losses = &table.loss;
    let ifd = &table.ifd;
    if let Some(path) = &args.details {
        let mut text = String::new();
        for (i, (row, loss)) in report.rows.iter().zip(losses).enumerate() {
            let mut line = json!({"line": row.line, "loss": loss});
            if let Some(s) = ifd {
                line["ifd"] = json!(s.ifd[i]);
                line["answer_loss_given_instruction"] = json!(s.conditioned[i]);
                line["answer_loss_alone"] = json!(s.alone[i]);
                line["instruction_does_not_help"] = json!(s.ifd[i] >= 1.0);
            }
            text.push_str(&line.to_string());
            text.push('\n');
        }
        crate::fsutil::write_atomic(path, text.as_bytes())?;
    }
    let finite: Vec<f32> = losses.iter().copied().filter(|l| l.is_finite()).collect();
    let mean = finite.iter().sum::<f32>() / finite.len().max(1) as f32;
    let mut out = json!({
        "file": args.load.file.display().to_string(),
        "model": args.model,
        "rows": losses.len(),
        "scored": finite.len(),
        "mean_loss": mean,
        "min_loss": finite.iter().copied().fold(f32::INFINITY, f32::min),
        "max_loss": finite.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    });
    if let Some(s) = ifd {
        let finite: Vec<f32> = s.ifd.iter().copied().filter(|v| v.is_finite()).collect();
        out["ifd"] = json!({
            "scored": finite.len(),
            "mean": finite.iter().sum::<f32>() / finite.len().max(1) as f32,
            "min": finite.iter().copied().fold(f32::INFINITY, f32::min),
            "max": finite.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            "at_least_1": finite.iter().filter(|v| **v >= 1.0).count(),
        });
        let flagged: Vec<usize> = s
            .ifd
            .iter()
            .zip(&report.rows)
            .filter(|(v, _)| **v >= 1.0)
            .map(|(_, r)| r.line)
            .collect();
        if !flagged.is_empty() {
            eprintln!(
                "{} rows have IFD >= 1 (the instruction does not help predict the answer), lines {:?}{}",
                flagged.len(),
                &flagged[..flagged.len().min(10)],
                if flagged.len() > 10 { " ..." } else { "" }
            );
        }
        out["ifd"]["lines_at_least_1"] = json!(flagged.iter().take(50).collect::<Vec<_>>());
    }
    if let Some(path) = &args.out {
        let (kind, ranked) = match (ifd, args.by) {
            (Some(s), ScoreBy::Ifd) => (ScoreKind::Ifd, &s.ifd),
            _ => (ScoreKind::Loss, losses),
        };
        let chosen = match args.keep {
            Some(KeepArg::Top) => select_by(kind, ranked, args.fraction, Keep::Top)?,
            Some(KeepArg::Bottom) => select_by(kind, ranked, args.fraction, Keep::Bottom)?,
            None => (0..report.rows.len()).collect(),
        };
        // The kept rows carry their scores (and any provenance they had) into the file.
        let kept = chosen.iter().map(|&i| {
            let row = &report.rows[i];
            let mut meta = row.meta.clone();
            meta.scores = Some(table.row(i));
            (row.example.clone(), meta)
        });
        DatasetEditor::with_meta(kept).save_jsonl(path)?;
        out["kept"] = json!(chosen.len());
        if args.keep.is_some() {
            out["by"] = json!(if kind == ScoreKind::Ifd { "ifd" } else { "loss" });
        }
        out["out"] = json!(path.display().to_string());
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(0)
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<i32> {
    use crate::data::generate::{self as gen, GenEvent, GenSettings, LocalModel, Method};
    use std::sync::atomic::{AtomicBool, Ordering};
    let method = match args.method {
        MethodArg::SelfInstruct => Method::SelfInstruct,
        MethodArg::EvolInstruct => Method::EvolInstruct,
        MethodArg::BackTranslation => Method::BackTranslation,
    };
    let inputs = [
        ("--seed-data", &args.seed_data, Method::SelfInstruct),
        ("--input", &args.input, Method::EvolInstruct),
        ("--documents", &args.documents, Method::BackTranslation),
    ];
    let mut input = None;
    for (flag, value, for_method) in inputs {
        match (value, for_method == method) {
            (Some(path), true) => input = Some(path.clone()),
            (None, true) => anyhow::bail!("--method {} needs {flag}", method.name()),
            (Some(_), false) => anyhow::bail!("{flag} is for --method {}, not {}", for_method.name(), method.name()),
            (None, false) => {}
        }
    }
    let input = input.context("no input")?;
    let settings = GenSettings {
        count: args.count,
        batch_size: args.batch_size,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        rouge_threshold: args.rouge_threshold,
        min_score: args.min_score,
        segment_tokens: args.segment_tokens,
        max_attempts: args.max_attempts,
    };
    settings.validate()?;
    if method == Method::SelfInstruct && args.count.is_none() {
        anyhow::bail!("--method self-instruct needs --count (rows the output should hold)");
    }
    // Read and check the input before loading the model (and before touching --out).
    let source = match method {
        Method::BackTranslation => Source::Documents(gen::backtranslate::read_documents(&input)?),
        _ => Source::Rows(gen::load_rows(&input)?),
    };
    eprintln!("loading {} ...", args.model);
    let mut model = LocalModel::open(&args.model, args.adapter.as_deref(), args.quantized)
        .with_context(|| format!("cannot open model `{}`", args.model))?;
    let cancel = std::sync::Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("stopping after the current model call (Ctrl-C again to quit now) ...");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let mut on_event = |e: GenEvent| {
        if args.events {
            if let Ok(line) = serde_json::to_string(&e) {
                eprintln!("{line}");
            }
            return;
        }
        match &e {
            GenEvent::Warning { message } => eprintln!("warning: {message}"),
            GenEvent::Row { index, row } => eprintln!("row {}: {}", index + 1, one_line(&row.instruction)),
            GenEvent::Rejected { reason, detail, .. } => eprintln!("rejected ({}): {detail}", reason.name()),
            GenEvent::Progress { .. } => {}
        }
    };
    let mut run = gen::Run {
        model: &mut model,
        settings: &settings,
        out: &args.out,
        cancel: &cancel,
        on_event: &mut on_event,
    };
    let summary = match &source {
        Source::Rows(rows) if method == Method::SelfInstruct => gen::self_instruct::run(rows, &mut run)?,
        Source::Rows(rows) => gen::evol::run(rows, &mut run)?,
        Source::Documents(docs) => gen::backtranslate::run(docs, &mut run)?,
    };
    if summary.gave_up {
        eprintln!(
            "warning: stopped after {} prompts with {} rows (raise --max-attempts or --temperature)",
            summary.attempts, summary.rows
        );
    }
    let mut out = serde_json::to_value(&summary)?;
    out["model"] = json!(args.model);
    out["generated_tokens_per_sec"] = json!(summary.generated_tokens as f64 / summary.elapsed_secs.max(1e-9));
    println!("{}", serde_json::to_string(&out)?);
    Ok(if summary.cancelled { 130 } else { 0 })
}

enum Source {
    Rows(Vec<crate::data::generate::SourceRow>),
    Documents(Vec<crate::data::generate::backtranslate::Document>),
}

fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(100) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}
