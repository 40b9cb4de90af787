//! Preparing a run from a `TrainConfig`: open the model, load and tokenize the data with the
//! model's chat template, split off the evaluation set, create the run folder (writing
//! `config.toml`), attach fresh adapters or restore the newest checkpoint. [`build`] does all of
//! it except touching the run folder, for the preflight.

use std::path::{Path, PathBuf};

use crate::data::load::{describe_rejection, load_file, Format, LoadOptions, Row, TIE_REASON};
use crate::data::split::{apply_split, train_validation_split};
use crate::data::{Example, TokenizedExample};
use crate::error::{Error, Result};
use crate::generate::ChatFormat;
use crate::model::ModelFiles;
use crate::rng::Rng;
use crate::train::{checkpoint, PairData, TokenizedPair, TrainConfig, TrainData, Trainer};

/// Loads a dataset file (any format `finch data inspect` reads), reporting rejected rows.
pub fn load_examples(path: &Path, note: &mut dyn FnMut(String)) -> Result<Vec<Example>> {
    Ok(load_rows(path, note)?.into_iter().map(|r| r.example).collect())
}

/// [`load_examples`] keeping each row's line number.
pub fn load_rows(path: &Path, note: &mut dyn FnMut(String)) -> Result<Vec<Row>> {
    let report = load_file(path, &LoadOptions::default())?;
    let ties = report.rejected.iter().filter(|r| r.reason.contains(TIE_REASON)).count();
    if report.format == Format::Preference && ties > 0 {
        note(format!(
            "{}: {ties} rows are ties (chosen and rejected are the same answer) and are not preferences; skipped",
            path.display()
        ));
    }
    if !report.rejected.is_empty() {
        note(format!("{}: {}", path.display(), report.summary()));
        for r in report.rejected.iter().take(5) {
            note(format!("  {}", describe_rejection(r)));
        }
        if report.rejected.len() > 5 {
            note(format!(
                "  … see `finch data inspect {}` for all of them",
                path.display()
            ));
        }
    }
    Ok(report.rows)
}

/// Opens the model named in `cfg` and loads its template.
pub fn open_model(spec: &str) -> Result<(ModelFiles, crate::template::ChatTemplate)> {
    let files = crate::hub::open_model(spec)?;
    let template = files.chat_template()?.ok_or_else(|| {
        Error::invalid(
            &files.path,
            "model",
            "it has no chat template; pick one explicitly (chatml, llama3, alpaca)",
        )
    })?;
    Ok((files, template))
}

/// Tokenized training sequences, how many rows were skipped for having no trained token, and
/// how many windows the raw-text rows were cut into. A row the template cannot render (e.g. tool
/// calls under a template without tool support) fails the run with its line.
fn tokenize_all(
    rows: &[Row],
    source: &str,
    files: &ModelFiles,
    template: &crate::template::ChatTemplate,
    cfg: &TrainConfig,
) -> Result<(Vec<TokenizedExample>, usize, usize)> {
    let mut out = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    let mut text_windows = 0;
    for row in rows {
        let sequences = crate::data::tokenize::encode_for_training(
            &row.example,
            template,
            &files.tokenizer,
            cfg.loss_on,
            cfg.seq_len,
            cfg.text_overlap,
        )
        .map_err(|e| match e {
            Error::Data(reason) => Error::Data(format!("{source}: line {}: {reason}", row.line)),
            other => other,
        })?;
        if matches!(row.example, Example::Text { .. }) {
            text_windows += sequences.len();
        }
        for t in sequences {
            if t.trained_tokens() == 0 {
                dropped += 1;
            } else {
                out.push(t);
            }
        }
    }
    Ok((out, dropped, text_windows))
}

/// Tokenized preference pairs, and how many were skipped because truncation to `seq_len` left
/// one of their answers without a trained token.
fn tokenize_pairs(
    rows: &[Row],
    source: &str,
    files: &ModelFiles,
    template: &crate::template::ChatTemplate,
    cfg: &TrainConfig,
) -> Result<(Vec<TokenizedPair>, usize)> {
    let mut out = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    for row in rows {
        if !row.example.is_preference() {
            return Err(Error::Data(format!(
                "{source}: line {}: not a preference pair; --method {} trains on rows with `chosen` and `rejected` \
                 answers",
                row.line,
                cfg.method.name()
            )));
        }
        let (chosen, rejected) = crate::data::tokenize::encode_preference(
            &row.example,
            template,
            &files.tokenizer,
            cfg.loss_on,
            cfg.seq_len,
        )
        .map_err(|e| match e {
            Error::Data(reason) => Error::Data(format!("{source}: line {}: {reason}", row.line)),
            other => other,
        })?;
        if chosen.trained_tokens() == 0 || rejected.trained_tokens() == 0 {
            dropped += 1;
        } else {
            out.push(TokenizedPair { chosen, rejected });
        }
    }
    Ok((out, dropped))
}

/// Builds a ready-to-run trainer. With `resume`, the newest checkpoint in `cfg.out` is restored.
/// `note` receives human-readable remarks (truncation counts, resume point).
pub fn prepare(cfg: &TrainConfig, resume: bool, note: &mut dyn FnMut(String)) -> Result<Trainer> {
    cfg.validate()?;
    let run_dir = PathBuf::from(&cfg.out);
    let latest = checkpoint::latest(&run_dir);
    if resume && latest.is_none() {
        return Err(Error::MissingFile {
            path: run_dir.join("checkpoints"),
            file: "step-N".into(),
            hint: "nothing to resume: this run folder has no checkpoint".into(),
        });
    }
    if !resume && latest.is_some() {
        return Err(Error::config(
            "out",
            format!(
                "{} already holds a run; use --resume to continue it or choose another --out",
                run_dir.display()
            ),
        ));
    }
    let mut trainer = build(cfg, Some(run_dir.clone()), note)?;
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, "cannot create run folder", e))?;
    crate::fsutil::write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    if let Some((step, dir)) = latest {
        trainer.restore(&dir)?;
        super::truncate_metrics(&run_dir, step)?;
        note(format!("resuming from {}", dir.display()));
    }
    Ok(trainer)
}

/// The trainer a run of `cfg` starts with (model with fresh adapters, tokenized data, chat format
/// for the probes), writing nothing: `run_dir` is only where the trainer will log once it runs.
pub fn build(cfg: &TrainConfig, run_dir: Option<PathBuf>, note: &mut dyn FnMut(String)) -> Result<Trainer> {
    cfg.validate()?;
    let device = cfg.device.open()?;
    let (files, template) = open_model(&cfg.model)?;
    let template = match cfg.enable_thinking {
        // A template that never reads the variable would silently ignore the setting.
        Some(_) if !template.source().contains("enable_thinking") => {
            return Err(Error::config(
                "enable_thinking",
                format!(
                "{}'s chat template does not read enable_thinking, so the setting would change nothing: leave it unset",
                cfg.model
            ),
            ))
        }
        Some(on) => template.with_variable("enable_thinking", serde_json::Value::Bool(on))?,
        None => template,
    };
    if !cfg.ignore_memory_check {
        crate::train::memory::check_machine_fits(&files.config, cfg)?;
    }
    let examples = load_rows(Path::new(&cfg.data), note)?;
    let (mut train_ex, eval_ex) = match &cfg.eval_data {
        Some(p) => (examples, load_rows(Path::new(p), note)?),
        None => {
            let split = train_validation_split(examples.len(), cfg.eval_split as f32, cfg.seed)?;
            apply_split(&examples, &split)
        }
    };
    if train_ex.is_empty() {
        return Err(Error::Data(format!("{}: no training examples", cfg.data)));
    }
    let preference_rows = train_ex.iter().filter(|r| r.example.is_preference()).count();
    if cfg.method.is_preference() {
        if preference_rows == 0 {
            return Err(Error::config(
                "method",
                format!(
                    "{} is not preference data: --method {} needs rows with `prompt`, `chosen` and `rejected` \
                     (or train it with --method sft)",
                    cfg.data,
                    cfg.method.name()
                ),
            ));
        }
        let (train, dropped) = tokenize_pairs(&train_ex, &cfg.data, &files, &template, cfg)?;
        let eval_source = cfg.eval_data.as_deref().unwrap_or(&cfg.data);
        let (eval, _) = tokenize_pairs(&eval_ex, eval_source, &files, &template, cfg)?;
        let truncated = train
            .iter()
            .filter(|p| p.chosen.truncated || p.rejected.truncated)
            .count();
        if truncated > 0 {
            note(format!(
                "{truncated} training pairs had an answer longer than seq_len = {} and were truncated",
                cfg.seq_len
            ));
        }
        if dropped > 0 {
            note(format!(
                "{dropped} training pairs lost every answer token to truncation and were skipped"
            ));
        }
        let pad_id = files.config.eos_token_ids.first().copied().unwrap_or(0);
        let mut model = files.load_with_base(cfg.precision.dtype(), cfg.precision.quantized_base(), &device)?;
        model.add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))?;
        let pairs = PairData { train, eval, pad_id };
        let mut trainer = Trainer::with_pairs(cfg.clone(), model, pairs, run_dir)?;
        if !cfg.probe_prompts.is_empty() {
            trainer.set_chat_format(ChatFormat::new(files.tokenizer.clone(), template, &files.config)?);
        }
        return Ok(trainer);
    }
    if preference_rows > 0 {
        note(format!(
            "{} holds preference pairs; --method sft trains on their chosen answers alone (dpo or orpo also learn \
             from the rejected ones)",
            cfg.data
        ));
    }
    let (train, dropped, text_windows) = tokenize_all(&train_ex, &cfg.data, &files, &template, cfg)?;
    let eval_source = cfg.eval_data.as_deref().unwrap_or(&cfg.data);
    let (eval, _, _) = tokenize_all(&eval_ex, eval_source, &files, &template, cfg)?;
    let text_rows = train_ex
        .iter()
        .filter(|r| matches!(r.example, Example::Text { .. }))
        .count();
    if text_windows > text_rows {
        note(format!(
            "{text_rows} raw-text rows were cut into {text_windows} windows of up to {} tokens ({} tokens of overlap)",
            cfg.seq_len, cfg.text_overlap
        ));
    }
    train_ex.clear();
    let truncated = train.iter().filter(|t| t.truncated).count();
    if truncated > 0 {
        note(format!(
            "{truncated} training examples were longer than seq_len = {} and were truncated",
            cfg.seq_len
        ));
    }
    if dropped > 0 {
        note(format!(
            "{dropped} training examples had no trained tokens after truncation and were skipped"
        ));
    }
    let pad_id = files.config.eos_token_ids.first().copied().unwrap_or(0);
    let mut model = files.load_with_base(cfg.precision.dtype(), cfg.precision.quantized_base(), &device)?;
    model.add_lora(&cfg.lora, &mut Rng::derive(cfg.seed, "lora-init"))?;
    let examples = train.len();
    let tokens: usize = train.iter().map(|t| t.len()).sum();
    let mut trainer = Trainer::new(cfg.clone(), model, TrainData { train, eval, pad_id }, run_dir)?;
    if let Some(rows) = trainer.packed_rows() {
        note(format!(
            "packed {examples} training examples into {rows} rows of up to {} tokens ({:.0}% of positions used)",
            cfg.seq_len,
            100.0 * tokens as f64 / (rows * cfg.seq_len).max(1) as f64
        ));
    }
    if !cfg.probe_prompts.is_empty() {
        trainer.set_chat_format(ChatFormat::new(files.tokenizer.clone(), template, &files.config)?);
    }
    Ok(trainer)
}
