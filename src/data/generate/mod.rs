//! Making instruction data with the local model: Self-Instruct, Evol-Instruct and instruction
//! back-translation (Humpback). One engine for the CLI (`finch data generate`) and the studio's
//! data page: it runs on any [`TextModel`] (the loaded model, f32 or quantized, with or without
//! an adapter — or a scripted fake in tests), reports every kept and rejected row through a
//! callback as it happens, stops between model calls when the cancel flag is set, and appends
//! each kept row to the output file as one flushed JSON line, with its provenance (method,
//! model, seed rows or original, settings and the call's sampling seed).
//!
//! Resuming: running again with the same output file first checks it (a partial last line left
//! by a crash is reported and cut off; any other bad line is an error naming it), counts its rows
//! towards the target, adds its instructions to the duplicate check and continues after the last
//! attempt recorded in it.

pub mod backtranslate;
pub mod evol;
pub mod prompts;
pub mod self_instruct;

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::{Message, Role};
use crate::error::{Error, Result};
use crate::generate::{chat_with, CachedTransformer, ChatFormat, GenerateOptions, SamplingParams};
use crate::model::quantized::QuantizedModel;
use crate::model::transformer::Transformer;

pub use crate::train::eval::rouge_l;

/// Which generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    SelfInstruct,
    EvolInstruct,
    BackTranslation,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::SelfInstruct, Method::EvolInstruct, Method::BackTranslation];

    pub fn name(self) -> &'static str {
        match self {
            Method::SelfInstruct => "self-instruct",
            Method::EvolInstruct => "evol-instruct",
            Method::BackTranslation => "back-translation",
        }
    }
}

/// A model the generators can ask: one chat turn in, the reply out.
pub trait TextModel {
    /// The reply to `messages` (a conversation ending with the user).
    fn reply(&mut self, messages: &[Message], opts: &GenerateOptions, cancel: &AtomicBool) -> Result<Reply>;
    /// Tokens `text` takes (segmenting documents by a token budget).
    fn count_tokens(&self, text: &str) -> Result<usize>;
    /// What provenance records as the model.
    fn label(&self) -> String;
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    /// The reply hit `max_new_tokens` or the context length (cut off).
    pub truncated: bool,
    pub cancelled: bool,
    /// Tokens the model generated for it (speed reporting).
    pub tokens: usize,
}

/// The local model Finch loaded: f32 (with an unmerged adapter) or a quantized GGUF.
pub struct LocalModel {
    backend: Backend,
    pub format: ChatFormat,
    label: String,
}

enum Backend {
    F32(Box<Transformer>),
    Quantized(Box<QuantizedModel>),
}

impl LocalModel {
    /// Opens `spec` (folder, GGUF or Hub id) on the CPU, with `adapter` (a run or PEFT folder)
    /// applied unmerged; `quantized` runs a Q4_1/Q8_0 GGUF without dequantizing.
    pub fn open(spec: &str, adapter: Option<&Path>, quantized: bool) -> Result<Self> {
        let files = crate::hub::open_model(spec)?;
        let format = ChatFormat::from_files(&files)?;
        let mut label = spec.to_string();
        let backend = if quantized {
            let mut q = QuantizedModel::open(&files.path, &files.config)?;
            if let Some(a) = adapter {
                q.set_adapter(a)?;
            }
            label.push_str(" (quantized)");
            Backend::Quantized(Box::new(q))
        } else {
            let base = files.load(candle_core::DType::F32, &candle_core::Device::Cpu)?;
            match adapter {
                Some(a) => Backend::F32(Box::new(crate::generate::with_adapter(&base, a)?)),
                None => Backend::F32(Box::new(base)),
            }
        };
        if let Some(a) = adapter {
            label.push_str(&format!(" + adapter {}", a.display()));
        }
        Ok(LocalModel { backend, format, label })
    }
}

impl TextModel for LocalModel {
    fn reply(&mut self, messages: &[Message], opts: &GenerateOptions, cancel: &AtomicBool) -> Result<Reply> {
        let g = match &mut self.backend {
            Backend::F32(m) => chat_with(
                &mut CachedTransformer::new(m.as_ref()),
                &self.format,
                messages,
                opts,
                cancel,
                &mut |_| {},
            )?,
            Backend::Quantized(q) => chat_with(q.as_mut(), &self.format, messages, opts, cancel, &mut |_| {})?,
        };
        use crate::generate::FinishReason;
        Ok(Reply {
            tokens: g.token_ids.len(),
            text: g.text,
            truncated: g.finish_reason == FinishReason::Length,
            cancelled: g.finish_reason == FinishReason::Cancelled,
        })
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.format.encode(text)?.len())
    }

    fn label(&self) -> String {
        self.label.clone()
    }
}

/// Settings shared by every generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenSettings {
    /// Rows the output file should hold when the run ends (back-translation: at most this many;
    /// `None` = every segment / every input row).
    pub count: Option<usize>,
    /// Self-Instruct: new instructions asked for per prompt.
    pub batch_size: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// A new instruction is kept only when its ROUGE-L F1 against every kept and seed
    /// instruction is below this (Self-Instruct: 0.7).
    pub rouge_threshold: f64,
    /// Back-translation: the lowest self-curation score (1–5) kept.
    pub min_score: u8,
    /// Back-translation: most tokens in one document segment.
    pub segment_tokens: usize,
    /// Give up after this many model prompts without reaching the count (`None`: 20 per row).
    pub max_attempts: Option<usize>,
}

impl Default for GenSettings {
    fn default() -> Self {
        GenSettings {
            count: None,
            batch_size: 4,
            temperature: 0.7,
            top_p: 0.95,
            seed: 0,
            max_new_tokens: 256,
            rouge_threshold: 0.7,
            min_score: 4,
            segment_tokens: 384,
            max_attempts: None,
        }
    }
}

impl GenSettings {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch-size", "must be at least 1"));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::config("max-new-tokens", "must be at least 1"));
        }
        if self.count == Some(0) {
            return Err(Error::config("count", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.rouge_threshold) {
            return Err(Error::config("rouge-threshold", "must be in [0, 1]"));
        }
        if !(1..=5).contains(&self.min_score) {
            return Err(Error::config(
                "min-score",
                format!("must be 1 to 5, got {}", self.min_score),
            ));
        }
        if self.segment_tokens < 16 {
            return Err(Error::config("segment-tokens", "must be at least 16"));
        }
        self.sampling(0).validate()
    }

    /// Sampling for one model call; `call_seed` makes every call reproducible on its own.
    pub fn sampling(&self, call_seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: call_seed,
            ..SamplingParams::default()
        }
    }

    pub fn options(&self, call_seed: u64) -> GenerateOptions {
        GenerateOptions {
            sampling: self.sampling(call_seed),
            max_new_tokens: self.max_new_tokens,
            stop: vec![],
            ignore_eos: false,
        }
    }

    /// The seed of the `call`-th model call of attempt `attempt` (SplitMix64 of both, so nearby
    /// attempts do not get correlated streams).
    pub fn call_seed(&self, attempt: usize, call: usize) -> u64 {
        splitmix(self.seed ^ splitmix((attempt as u64) << 8 | call as u64))
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Where a generated row came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub method: Method,
    pub model: String,
    /// Which attempt (prompt round, input row visit or document segment) made it; resuming
    /// continues after the highest.
    pub attempt: usize,
    /// Self-Instruct: the example instructions in the prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seed_rows: Vec<String>,
    /// Evol-Instruct: the row that was evolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<SourceRow>,
    /// Evol-Instruct: add-constraints, deepen, concretize, increase-reasoning or breadth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evolution: Option<String>,
    /// Back-translation: the document and the segment's number in it (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<usize>,
    /// Back-translation: the self-curation score (1–5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u8>,
    /// The row was changed by hand after it was generated (the rest describes the original).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
    pub settings: ProvenanceSettings,
}

impl Provenance {
    /// The fields every method records; the method-specific ones (seed rows, original,
    /// document, score) start empty for the generator to fill in.
    pub fn new(method: Method, model: String, attempt: usize, settings: ProvenanceSettings) -> Self {
        Provenance {
            method,
            model,
            attempt,
            seed_rows: vec![],
            original: None,
            evolution: None,
            document: None,
            segment: None,
            score: None,
            edited: false,
            settings,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceSettings {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// The sampling seed of the call that wrote the answer.
    pub call_seed: u64,
}

impl ProvenanceSettings {
    pub fn new(s: &GenSettings, call_seed: u64) -> Self {
        ProvenanceSettings {
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
            max_new_tokens: s.max_new_tokens,
            call_seed,
        }
    }
}

/// An instruction row (Alpaca fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRow {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    #[serde(default)]
    pub output: String,
}

impl SourceRow {
    /// The user message: the instruction, then the input after a blank line.
    pub fn prompt(&self) -> String {
        if self.input.trim().is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n\n{}", self.instruction, self.input)
        }
    }

    /// The first user and assistant turns of a conversation (`None` for raw text or a
    /// conversation without a user turn).
    pub fn from_example(example: &crate::data::Example) -> Option<Self> {
        let (messages, _) = example.conversation()?;
        let user = messages.iter().find(|m| m.role == Role::User)?;
        let output = messages
            .iter()
            .find(|m| m.role == Role::Assistant)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        Some(SourceRow {
            instruction: user.content.clone(),
            input: String::new(),
            output,
        })
    }
}

/// One generated row as written: Alpaca fields (any Finch loader reads them) plus provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedRow {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
    pub provenance: Provenance,
}

impl GeneratedRow {
    pub fn source(&self) -> SourceRow {
        SourceRow {
            instruction: self.instruction.clone(),
            input: self.input.clone(),
            output: self.output.clone(),
        }
    }

    /// The row as a training example (user turn, assistant turn).
    pub fn example(&self) -> crate::data::Example {
        crate::data::Example::chat(vec![
            Message::new(Role::User, self.source().prompt()),
            Message::new(Role::Assistant, self.output.clone()),
        ])
    }

    /// What the dataset keeps about the row besides its content: its provenance.
    pub fn meta(&self) -> crate::data::meta::RowMeta {
        crate::data::meta::RowMeta {
            provenance: Some(self.provenance.clone()),
            scores: None,
        }
    }
}

/// What a generator reports while it runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GenEvent {
    /// Something the user should know that does not stop the run (a partial line cut off).
    Warning { message: String },
    /// A row was kept and written (its 0-based index in the output file).
    Row { index: usize, row: Box<GeneratedRow> },
    /// A candidate was dropped.
    Rejected {
        reason: RejectReason,
        detail: String,
        instruction: String,
    },
    /// After each attempt.
    Progress {
        kept: usize,
        target: Option<usize>,
        attempts: usize,
        elapsed_secs: f64,
    },
}

/// Why a candidate row was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectReason {
    /// No instruction could be read from the reply.
    NoInstruction,
    /// Too few or too many words, or starts with punctuation / a non-ASCII character.
    BadInstruction,
    /// Asks for images, files, audio… (Self-Instruct's keyword filter).
    UnsupportedTask,
    /// ROUGE-L against a kept or seed instruction at or above the threshold.
    Duplicate,
    /// Evol-Instruct: no information gain over the original (ROUGE-L at or above the threshold).
    NoGain,
    /// Evol-Instruct: words of the evolving prompt copied into the instruction.
    PromptCopied,
    EmptyAnswer,
    /// Hit the token limit.
    OverlongAnswer,
    /// The same words again and again.
    RepetitiveAnswer,
    /// The answer repeats the prompt.
    CopiedAnswer,
    /// "Sorry, I cannot…" and nothing else of use.
    UnusableAnswer,
    /// Back-translation: the self-curation score is below the minimum.
    LowScore,
    /// Back-translation: no 1–5 score could be read from the rating.
    UnparseableScore,
    /// Back-translation: a segment too short to be an answer.
    ShortSegment,
}

impl RejectReason {
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenSummary {
    pub method: Method,
    pub out: PathBuf,
    /// Rows in the file at the start (resumed) and at the end.
    pub rows_before: usize,
    pub rows: usize,
    pub kept: usize,
    pub rejected: BTreeMap<String, usize>,
    pub attempts: usize,
    pub cancelled: bool,
    /// Stopped by the attempt limit before reaching the count.
    pub gave_up: bool,
    pub elapsed_secs: f64,
    /// Model calls made and the tokens they generated (kept and rejected rows alike).
    pub model_calls: usize,
    pub generated_tokens: usize,
}

/// What every generator needs: the model, settings, output, event sink and cancel flag.
pub struct Run<'a> {
    pub model: &'a mut dyn TextModel,
    pub settings: &'a GenSettings,
    pub out: &'a Path,
    pub cancel: &'a AtomicBool,
    pub on_event: &'a mut dyn FnMut(GenEvent),
}

/// The per-run bookkeeping the generators share: the open output file, counts, timing.
pub(crate) struct Session<'r, 'a> {
    pub run: &'r mut Run<'a>,
    pub method: Method,
    pub file: std::fs::File,
    pub existing: Vec<GeneratedRow>,
    pub kept: usize,
    pub attempts: usize,
    pub rejected: BTreeMap<String, usize>,
    pub start: Instant,
    pub label: String,
    /// Rows the file should hold at the end (`None`: until the input runs out).
    pub target: Option<usize>,
    pub model_calls: usize,
    pub generated_tokens: usize,
}

impl<'r, 'a> Session<'r, 'a> {
    pub fn open(run: &'r mut Run<'a>, method: Method) -> Result<Self> {
        run.settings.validate()?;
        let (file, existing, warning) = open_output(run.out, method)?;
        if let Some(message) = warning {
            (run.on_event)(GenEvent::Warning { message });
        }
        let label = run.model.label();
        let target = run.settings.count;
        Ok(Session {
            run,
            method,
            file,
            existing,
            kept: 0,
            attempts: 0,
            rejected: BTreeMap::new(),
            start: Instant::now(),
            label,
            target,
            model_calls: 0,
            generated_tokens: 0,
        })
    }

    pub fn rows(&self) -> usize {
        self.existing.len() + self.kept
    }

    /// The first attempt number this run makes (after the last one in the file).
    pub fn first_attempt(&self) -> usize {
        self.existing
            .iter()
            .map(|r| r.provenance.attempt + 1)
            .max()
            .unwrap_or(0)
    }

    pub fn cancelled(&self) -> bool {
        self.run.cancel.load(Ordering::Relaxed)
    }

    pub fn target_reached(&self) -> bool {
        self.target.is_some_and(|c| self.rows() >= c)
    }

    pub fn ask(&mut self, prompt: &str, call_seed: u64) -> Result<Reply> {
        let messages = [Message::new(Role::User, prompt)];
        let opts = self.run.settings.options(call_seed);
        let reply = self.run.model.reply(&messages, &opts, self.run.cancel)?;
        self.model_calls += 1;
        self.generated_tokens += reply.tokens;
        Ok(reply)
    }

    pub fn provenance(&self, attempt: usize, call_seed: u64) -> Provenance {
        Provenance::new(
            self.method,
            self.label.clone(),
            attempt,
            ProvenanceSettings::new(self.run.settings, call_seed),
        )
    }

    /// Appends the row as one JSON line, flushed to disk, and reports it.
    pub fn keep(&mut self, row: GeneratedRow) -> Result<()> {
        let mut line = serde_json::to_string(&row).map_err(|e| Error::Data(format!("cannot serialize a row: {e}")))?;
        line.push('\n');
        let out = self.run.out;
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io(out, "cannot append a generated row", e))?;
        let index = self.rows();
        self.kept += 1;
        (self.run.on_event)(GenEvent::Row {
            index,
            row: Box::new(row),
        });
        Ok(())
    }

    pub fn reject(&mut self, reason: RejectReason, detail: impl Into<String>, instruction: &str) {
        *self.rejected.entry(reason.name()).or_default() += 1;
        (self.run.on_event)(GenEvent::Rejected {
            reason,
            detail: detail.into(),
            instruction: instruction.to_string(),
        });
    }

    pub fn progress(&mut self) {
        let event = GenEvent::Progress {
            kept: self.rows(),
            target: self.target,
            attempts: self.attempts,
            elapsed_secs: self.start.elapsed().as_secs_f64(),
        };
        (self.run.on_event)(event);
    }

    /// The attempt limit: `max_attempts`, or 20 per row still to make.
    pub fn attempt_limit(&self, rows_to_make: usize) -> usize {
        self.run
            .settings
            .max_attempts
            .unwrap_or(rows_to_make.saturating_mul(20).max(20))
    }

    /// Reports the final progress and sums the run up.
    pub fn finish(mut self, gave_up: bool) -> GenSummary {
        self.progress();
        GenSummary {
            method: self.method,
            out: self.run.out.to_path_buf(),
            rows_before: self.existing.len(),
            rows: self.existing.len() + self.kept,
            kept: self.kept,
            rejected: self.rejected,
            attempts: self.attempts,
            cancelled: self.run.cancel.load(Ordering::Relaxed),
            gave_up,
            elapsed_secs: self.start.elapsed().as_secs_f64(),
            model_calls: self.model_calls,
            generated_tokens: self.generated_tokens,
        }
    }
}

/// Opens (creating) the output for appending. An existing file must hold rows of `method`, one
/// per line; a last line without its newline (a crash mid-write) is cut off and reported.
pub fn open_output(path: &Path, method: Method) -> Result<(std::fs::File, Vec<GeneratedRow>, Option<String>)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "cannot create the output folder", e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, "cannot open the output file", e))?;
    let mut bytes = vec![];
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, "cannot read the output file", e))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut warning = None;
    if complete < bytes.len() {
        file.set_len(complete as u64)
            .map_err(|e| Error::io(path, "cannot cut off the partial last line", e))?;
        let line = bytes[..complete].iter().filter(|&&b| b == b'\n').count() + 1;
        warning = Some(format!(
            "{}: line {line} was a partial row ({} bytes, left by an interrupted run); removed it",
            path.display(),
            bytes.len() - complete
        ));
    }
    file.seek(std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(path, "cannot seek the output file", e))?;
    let text = std::str::from_utf8(&bytes[..complete])
        .map_err(|_| Error::invalid(path, "output file", "is not UTF-8 text; choose another --out"))?;
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: GeneratedRow = serde_json::from_str(line).map_err(|e| {
            Error::invalid(
                path,
                format!("line {}", i + 1),
                format!("is not a row Finch generated ({e}); choose another --out or remove the line"),
            )
        })?;
        if row.provenance.method != method {
            return Err(Error::invalid(
                path,
                format!("line {}", i + 1),
                format!(
                    "was made by {}, not {}; choose another --out",
                    row.provenance.method.name(),
                    method.name()
                ),
            ));
        }
        rows.push(row);
    }
    Ok((file, rows, warning))
}

/// Instruction checks of Self-Instruct (and the other generators): a usable instruction has 3
/// to 150 words, does not start with punctuation or a non-ASCII character, and does not ask for
/// images, files or audio.
pub fn instruction_problem(instruction: &str) -> Option<(RejectReason, String)> {
    let text = instruction.trim();
    if text.is_empty() {
        return Some((RejectReason::NoInstruction, "empty instruction".into()));
    }
    let words = text.split_whitespace().count();
    if !(3..=150).contains(&words) {
        return Some((
            RejectReason::BadInstruction,
            format!("{words} words (3 to 150 expected)"),
        ));
    }
    let first = text.chars().next().unwrap_or(' ');
    if first.is_ascii_punctuation() || !first.is_ascii() {
        return Some((RejectReason::BadInstruction, format!("starts with `{first}`")));
    }
    let lower = text.to_lowercase();
    let word_list: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for blocked in prompts::SELF_INSTRUCT_BLOCKED_WORDS {
        let hit = if blocked.contains(' ') {
            lower.contains(blocked)
        } else {
            word_list.contains(blocked)
        };
        if hit {
            return Some((RejectReason::UnsupportedTask, format!("mentions `{blocked}`")));
        }
    }
    None
}

/// The most similar of `kept` to `instruction` when at or above `threshold`.
pub fn too_similar<'k>(
    instruction: &str,
    kept: impl IntoIterator<Item = &'k String>,
    threshold: f64,
) -> Option<(f64, &'k str)> {
    kept.into_iter()
        .map(|k| (rouge_l(instruction, k), k.as_str()))
        .filter(|(r, _)| *r >= threshold)
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// Answer checks: empty, cut off at the token limit, repetitive (degenerate decoding), a copy
/// of the prompt, or a refusal with nothing else in it (WizardLM's "sorry" rule).
pub fn answer_problem(answer: &Reply, prompt: &str) -> Option<(RejectReason, String)> {
    let text = answer.text.trim();
    if text.is_empty() || !text.chars().any(char::is_alphanumeric) {
        return Some((RejectReason::EmptyAnswer, "no words in the answer".into()));
    }
    if answer.truncated {
        return Some((RejectReason::OverlongAnswer, "the answer hit the token limit".into()));
    }
    if let Some(detail) = repetition(text) {
        return Some((RejectReason::RepetitiveAnswer, detail));
    }
    let copied = rouge_l(text, prompt);
    if copied >= 0.9 || text.eq_ignore_ascii_case(prompt.trim()) {
        return Some((
            RejectReason::CopiedAnswer,
            format!("ROUGE-L {copied:.2} against the prompt"),
        ));
    }
    // A short answer copied out of a longer prompt scores a low ROUGE-L against the whole
    // prompt (seen on SmolLM2-135M: "… The rain is coming. It is a beautiful day." answered
    // "The rain is coming. It is a beautiful day."): a run of the prompt's words, verbatim.
    let (answer_words, prompt_words) = (plain_words(text), plain_words(prompt));
    if answer_words.len() >= 4
        && prompt_words
            .windows(answer_words.len())
            .any(|w| w == answer_words.as_slice())
    {
        return Some((
            RejectReason::CopiedAnswer,
            format!(
                "the answer's {} words appear in the prompt verbatim",
                answer_words.len()
            ),
        ));
    }
    let lower = text.to_lowercase();
    let words = text.split_whitespace().count();
    if words < 80
        && ["sorry", "i cannot", "i can't", "as an ai"]
            .iter()
            .any(|w| lower.contains(w))
    {
        return Some((RejectReason::UnusableAnswer, "a refusal or apology".into()));
    }
    None
}

/// `text`'s words in lower case without the punctuation around them.
fn plain_words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Degenerate decoding: a word 3-gram making up a large share of a long answer, or few distinct
/// character 4-grams in a long answer without spaces.
fn repetition(text: &str) -> Option<String> {
    let words: Vec<String> = text.split_whitespace().map(str::to_lowercase).collect();
    if words.len() >= 12 {
        let grams: Vec<&[String]> = words.windows(3).collect();
        let distinct: std::collections::HashSet<&[String]> = grams.iter().copied().collect();
        let ratio = distinct.len() as f64 / grams.len() as f64;
        if ratio < 0.5 {
            return Some(format!("only {:.0}% of its word 3-grams are distinct", ratio * 100.0));
        }
    }
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if chars.len() >= 40 {
        let grams: std::collections::HashSet<&[char]> = chars.windows(4).collect();
        let ratio = grams.len() as f64 / (chars.len() - 3) as f64;
        if ratio < 0.2 {
            return Some(format!(
                "only {:.0}% of its character 4-grams are distinct",
                ratio * 100.0
            ));
        }
    }
    None
}

/// Runs the generator of `method` on `input`: seed rows (Self-Instruct), rows to evolve
/// (Evol-Instruct) or documents (back-translation).
pub fn run(method: Method, input: &Path, run: &mut Run) -> Result<GenSummary> {
    match method {
        Method::SelfInstruct => {
            let seeds = load_rows(input)?;
            self_instruct::run(&seeds, run)
        }
        Method::EvolInstruct => {
            let rows = load_rows(input)?;
            evol::run(&rows, run)
        }
        Method::BackTranslation => {
            let docs = backtranslate::read_documents(input)?;
            backtranslate::run(&docs, run)
        }
    }
}

/// The instruction rows of a dataset file (any format Finch loads; raw text rows are an error).
pub fn load_rows(path: &Path) -> Result<Vec<SourceRow>> {
    let report = crate::data::load::load_file(path, &crate::data::load::LoadOptions::default())?;
    let mut rows = vec![];
    for row in &report.rows {
        match SourceRow::from_example(&row.example) {
            Some(r) => rows.push(r),
            None => {
                return Err(Error::invalid(
                    path,
                    format!("line {}", row.line),
                    "has no user instruction (raw text rows cannot seed generation)",
                ))
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
