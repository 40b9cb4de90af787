//! Loading instruction datasets: file types (JSONL, JSON, CSV, Parquet), record formats (Alpaca,
//! ShareGPT, messages, prompt/completion, raw text), validation and the load report.
//!
//! Bad input is normal input. Every record either becomes a [`Row`] or a [`Rejection`] naming
//! its line, the field and the reason; nothing is dropped silently and nothing panics. Only a
//! file that cannot be read, is empty, or has no usable row at all is an error, and that error
//! says why (with the first rejections).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::meta::RowMeta;
use crate::data::records::{kind_of, read_records, read_text, RawRecord};
pub use crate::data::records::{FileKind, Rejection};
use crate::data::{Example, Message, Role, ToolCall};
use crate::error::{Error, Result};
use crate::template::OrderedJson;

/// How records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `instruction`, optional `input`, `output`, optional `system`.
    Alpaca,
    /// `conversations: [{from: human|gpt|system, value}]`.
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// OpenAI / TRL `messages: [{role, content}]`.
    Messages,
    /// `prompt`, `completion` (strings, or TRL's conversational lists of messages).
    PromptCompletion,
    /// `text`: continued pre-training, loss on everything.
    Text,
    /// Preference pairs for DPO / ORPO: `chosen` and `rejected` answers to one prompt, given as
    /// `prompt` (TRL), ShareGPT `conversations` (LLaMA-Factory), or implicitly as the messages
    /// both full conversations share. Finch's own `votes.jsonl` is this format.
    Preference,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Alpaca,
        Format::ShareGpt,
        Format::Messages,
        Format::PromptCompletion,
        Format::Text,
        Format::Preference,
    ];

    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::Messages => "messages",
            Format::PromptCompletion => "prompt_completion",
            Format::Text => "text",
            Format::Preference => "preference",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase().replace('-', "_");
        Format::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Which field (JSON key, CSV column, Parquet column) holds what. Defaults are the names each
/// format's datasets use; the user can map any of them (`output=response`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FieldMap {
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub system: String,
    pub conversations: String,
    pub messages: String,
    pub role: String,
    pub content: String,
    pub prompt: String,
    pub completion: String,
    pub text: String,
    /// Tool definitions of a conversation (a list, or JSON text of one).
    pub tools: String,
    /// The preferred answer of a preference pair.
    pub chosen: String,
    /// The dispreferred answer of a preference pair.
    pub rejected: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            conversations: "conversations".into(),
            messages: "messages".into(),
            role: "role".into(),
            content: "content".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            text: "text".into(),
            tools: "tools".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

impl FieldMap {
    pub const KEYS: [&'static str; 14] = [
        "instruction",
        "input",
        "output",
        "system",
        "conversations",
        "messages",
        "role",
        "content",
        "prompt",
        "completion",
        "text",
        "tools",
        "chosen",
        "rejected",
    ];

    /// Maps one logical field to a name in the file, e.g. `set("output", "response")`.
    pub fn set(&mut self, key: &str, name: &str) -> Result<()> {
        let slot = match key {
            "instruction" => &mut self.instruction,
            "input" => &mut self.input,
            "output" => &mut self.output,
            "system" => &mut self.system,
            "conversations" => &mut self.conversations,
            "messages" => &mut self.messages,
            "role" => &mut self.role,
            "content" => &mut self.content,
            "prompt" => &mut self.prompt,
            "completion" => &mut self.completion,
            "text" => &mut self.text,
            "tools" => &mut self.tools,
            "chosen" => &mut self.chosen,
            "rejected" => &mut self.rejected,
            other => {
                return Err(Error::config(
                    "field",
                    format!(
                        "unknown field `{other}`; mappable fields: {}",
                        FieldMap::KEYS.join(", ")
                    ),
                ))
            }
        };
        *slot = name.to_string();
        Ok(())
    }

    /// Parses `key=name` as the command line writes it.
    pub fn set_pair(&mut self, pair: &str) -> Result<()> {
        match pair.split_once('=') {
            Some((key, name)) if !name.trim().is_empty() => self.set(key.trim(), name.trim()),
            _ => Err(Error::config(
                "field",
                format!("expected KEY=NAME (e.g. output=response), got `{pair}`"),
            )),
        }
    }
}

/// How to load a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// Record format; detected from the fields when `None`.
    pub format: Option<Format>,
    /// File type; taken from the extension when `None`.
    pub file_kind: Option<FileKind>,
    pub fields: FieldMap,
    /// Longest accepted record (a JSONL line, a JSON element, a CSV row), in bytes.
    pub max_record_bytes: usize,
    /// Keep exact duplicates instead of rejecting them.
    pub keep_duplicates: bool,
}

/// 1 MiB: a quarter million tokens, far beyond any sequence length Finch trains on a CPU.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            format: None,
            file_kind: None,
            fields: FieldMap::default(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            keep_duplicates: false,
        }
    }
}

/// A usable example and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// 1-based line (or Parquet row) number.
    pub line: usize,
    pub example: Example,
    /// The record's provenance and scores, when it has Finch's (see [`crate::data::meta`]).
    #[serde(default, skip_serializing_if = "RowMeta::is_empty")]
    pub meta: RowMeta,
}

/// What loading a file produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub path: Option<PathBuf>,
    pub format: Format,
    pub file_kind: FileKind,
    pub rows: Vec<Row>,
    /// In line order.
    pub rejected: Vec<Rejection>,
    /// Exact duplicates of an earlier row (also listed in `rejected` unless kept).
    pub duplicates: usize,
}

impl LoadReport {
    /// `"N rows ok, M rejected"`.
    pub fn summary(&self) -> String {
        format!("{} rows ok, {} rejected", self.rows.len(), self.rejected.len())
    }

    pub fn examples(&self) -> impl Iterator<Item = &Example> {
        self.rows.iter().map(|r| &r.example)
    }
}

/// Loads a dataset file, or a folder of `.txt` / `.md` documents ([`load_text_folder`]); see
/// the module docs. Fails on I/O errors, an empty file, an unknown format, or a file without a
/// single usable row.
pub fn load_file(path: &Path, options: &LoadOptions) -> Result<LoadReport> {
    if path.is_dir() {
        return load_text_folder(path, options);
    }
    let kind = match options.file_kind.or_else(|| FileKind::from_path(path)) {
        Some(kind) => kind,
        None => {
            return Err(Error::invalid(
                path,
                "dataset",
                "unknown file type: expected .jsonl, .json, .csv, .parquet, .txt or .md, or a folder of \
                 .txt / .md files (or name the type explicitly)",
            ))
        }
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read dataset", e))?;
    let mut report = load_bytes(&bytes, kind, options).map_err(|e| match e {
        Error::Data(reason) => Error::invalid(path, "dataset", reason),
        other => other,
    })?;
    report.path = Some(path.to_path_buf());
    Ok(report)
}

/// Loads every `.txt` / `.md` / `.markdown` file under `dir` (recursively, in path order) as
/// one document each of the `text` format. A row's `line` is the file's 1-based position in
/// that order; an empty, unreadable or non-UTF-8 file is a rejection whose field is the file's
/// path relative to `dir`. Other files are not datasets and are ignored; a folder without a
/// single text file is an error naming the folder.
pub fn load_text_folder(dir: &Path, options: &LoadOptions) -> Result<LoadReport> {
    if options.format.is_some_and(|f| f != Format::Text) {
        return Err(Error::invalid(
            dir,
            "format",
            "a folder of .txt / .md files holds raw text: its format can only be `text`",
        ));
    }
    let mut files = vec![];
    collect_text_files(dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::invalid(
            dir,
            "dataset",
            "the folder holds no .txt or .md files (a folder is read as raw-text documents)",
        ));
    }
    let names: Vec<String> = files
        .iter()
        .map(|file| {
            file.strip_prefix(dir)
                .unwrap_or(file)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let mut rows = vec![];
    let mut rejected = vec![];
    for (i, (file, name)) in files.iter().zip(&names).enumerate() {
        let line = i + 1;
        let name = name.clone();
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) => {
                rejected.push(rejection(line, &name, format!("cannot read the file: {e}")));
                continue;
            }
        };
        let read = read_text(&bytes, &options.fields.text);
        rejected.extend(read.rejected.into_iter().map(|r| Rejection {
            line,
            field: name.clone(),
            reason: r.reason,
        }));
        for record in &read.records {
            match convert(record, Format::Text, &options.fields) {
                Ok(example) => rows.push(Row {
                    line,
                    example,
                    meta: RowMeta::default(),
                }),
                Err(_) => rejected.push(rejection(line, &name, "empty file (nothing but whitespace)")),
            }
        }
    }
    let duplicates = mark_duplicates(&mut rows, &mut rejected, options.keep_duplicates);
    // A duplicate names its file and the file it repeats.
    for r in rejected.iter_mut().filter(|r| r.field.is_empty()) {
        let name_of = |line: usize| names.get(line.wrapping_sub(1)).cloned().unwrap_or_default();
        if let Some(original) = r
            .reason
            .strip_prefix("duplicate of line ")
            .and_then(|n| n.parse::<usize>().ok())
        {
            r.reason = format!("duplicate of line {original} ({})", name_of(original));
        }
        r.field = name_of(r.line);
    }
    rejected.sort_by_key(|r| r.line);
    if rows.is_empty() {
        let reason = match no_rows_error(files.len(), &rejected) {
            Error::Data(reason) => reason,
            other => other.to_string(),
        };
        return Err(Error::invalid(dir, "dataset", reason));
    }
    Ok(LoadReport {
        path: Some(dir.to_path_buf()),
        format: Format::Text,
        file_kind: FileKind::Text,
        rows,
        rejected,
        duplicates,
    })
}

/// Depth-first; hidden entries (`.git`, `.DS_Store`) are skipped.
fn collect_text_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot read folder", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "cannot read folder", e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_text_files(&path, out)?;
        } else if FileKind::from_path(&path) == Some(FileKind::Text) {
            out.push(path);
        }
    }
    Ok(())
}

/// [`load_file`] on bytes already in memory.
pub fn load_bytes(bytes: &[u8], kind: FileKind, options: &LoadOptions) -> Result<LoadReport> {
    if bytes.iter().all(u8::is_ascii_whitespace) || bytes == b"\xEF\xBB\xBF" {
        return Err(Error::Data("the file is empty".into()));
    }
    let read = if kind == FileKind::Text {
        if options.format.is_some_and(|f| f != Format::Text) {
            return Err(Error::Data(
                "a .txt / .md file holds raw text: its format can only be `text`".into(),
            ));
        }
        read_text(bytes, &options.fields.text)
    } else {
        read_records(bytes, kind, options.max_record_bytes)
    };
    let format = match options.format.or((kind == FileKind::Text).then_some(Format::Text)) {
        Some(format) => format,
        None => detect_format(&read.records, &options.fields).ok_or_else(|| {
            if read.records.is_empty() {
                no_rows_error(0, &read.rejected)
            } else {
                Error::Data(format!(
                    "cannot detect the dataset format: the first records have fields [{}]; expected `{}` (messages), \
                     `{}` (sharegpt), `{}` + `{}` (alpaca), `{}` + `{}` (prompt_completion), `{}` (text) or `{}` + `{}` (preference). \
                     Map other names with --field KEY=NAME or pick the format with --format",
                    field_names(&read.records).join(", "),
                    options.fields.messages,
                    options.fields.conversations,
                    options.fields.instruction,
                    options.fields.output,
                    options.fields.prompt,
                    options.fields.completion,
                    options.fields.text,
                    options.fields.chosen,
                    options.fields.rejected,
                ))
            }
        })?,
    };
    let mut rows = Vec::with_capacity(read.records.len());
    let mut rejected = read.rejected;
    for record in &read.records {
        match convert(record, format, &options.fields) {
            Ok(example) => rows.push(Row {
                line: record.line,
                example,
                meta: RowMeta::from_record(&record.value),
            }),
            Err(rejection) => rejected.push(rejection),
        }
    }
    let duplicates = mark_duplicates(&mut rows, &mut rejected, options.keep_duplicates);
    rejected.sort_by_key(|r| r.line);
    if rows.is_empty() {
        return Err(no_rows_error(read.records.len(), &rejected));
    }
    Ok(LoadReport {
        path: None,
        format,
        file_kind: kind,
        rows,
        rejected,
        duplicates,
    })
}

fn no_rows_error(records: usize, rejected: &[Rejection]) -> Error {
    let mut sorted: Vec<&Rejection> = rejected.iter().collect();
    sorted.sort_by_key(|r| r.line);
    let first: Vec<String> = sorted.iter().take(3).map(|r| describe_rejection(r)).collect();
    if first.is_empty() {
        Error::Data(format!("no usable rows ({records} records read)"))
    } else {
        Error::Data(format!(
            "no usable rows: all {} records were rejected; first: {}",
            rejected.len(),
            first.join("; ")
        ))
    }
}

/// `line 7, field output: empty assistant turn`.
pub fn describe_rejection(r: &Rejection) -> String {
    if r.field.is_empty() {
        format!("line {}: {}", r.line, r.reason)
    } else {
        format!("line {}, field {}: {}", r.line, r.field, r.reason)
    }
}

fn field_names(records: &[RawRecord]) -> Vec<String> {
    let mut names: Vec<String> = vec![];
    for r in records.iter().take(20) {
        if let Value::Object(map) = &r.value {
            for k in map.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
    }
    names.truncate(20);
    names
}

/// Votes over the first records; the most common recognizable layout wins.
pub fn detect_format(records: &[RawRecord], fields: &FieldMap) -> Option<Format> {
    let mut votes = [0usize; Format::ALL.len()];
    for record in records.iter().take(200) {
        let Value::Object(map) = &record.value else { continue };
        let has = |k: &str| map.get(k).is_some_and(|v| !v.is_null());
        // Preference rows may also carry `conversations` or `messages` (the prompt), so their
        // answer fields decide first.
        let format = if has(&fields.chosen) && has(&fields.rejected) {
            Format::Preference
        } else if has(&fields.messages) {
            Format::Messages
        } else if has(&fields.conversations) {
            Format::ShareGpt
        } else if has(&fields.instruction) && has(&fields.output) {
            Format::Alpaca
        } else if has(&fields.prompt) && has(&fields.completion) {
            Format::PromptCompletion
        } else if has(&fields.text) {
            Format::Text
        } else {
            continue;
        };
        votes[Format::ALL.iter().position(|f| *f == format).unwrap_or(0)] += 1;
    }
    let (best, count) = votes.iter().enumerate().max_by_key(|(i, n)| (**n, usize::MAX - i))?;
    (*count > 0).then(|| Format::ALL[best])
}

/// Exact duplicates (same example) after the first are rejected (or only counted when kept).
fn mark_duplicates(rows: &mut Vec<Row>, rejected: &mut Vec<Rejection>, keep: bool) -> usize {
    // Hash -> indices into `kept` of the first occurrences with that hash.
    let mut first_seen: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut duplicates = 0;
    let mut kept: Vec<Row> = Vec::with_capacity(rows.len());
    for row in rows.drain(..) {
        let hash = example_hash(&row.example);
        let original_line = first_seen
            .get(&hash)
            .and_then(|idx| idx.iter().find(|&&i| kept[i].example == row.example))
            .map(|&i| kept[i].line);
        match original_line {
            Some(original_line) => {
                duplicates += 1;
                if keep {
                    kept.push(row);
                } else {
                    rejected.push(Rejection {
                        line: row.line,
                        field: String::new(),
                        reason: format!("duplicate of line {original_line}"),
                    });
                }
            }
            None => {
                first_seen.entry(hash).or_default().push(kept.len());
                kept.push(row);
            }
        }
    }
    *rows = kept;
    duplicates
}

pub(crate) fn example_hash(ex: &Example) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ex.hash(&mut h);
    h.finish()
}

type Converted = std::result::Result<Example, Rejection>;

/// Validates one record as `format` and builds its example.
pub fn convert(record: &RawRecord, format: Format, fields: &FieldMap) -> Converted {
    let line = record.line;
    let Value::Object(map) = &record.value else {
        return Err(rejection(
            line,
            "",
            format!("expected an object with fields, found {}", kind_of(&record.value)),
        ));
    };
    let get = |name: &str| map.get(name).filter(|v| !v.is_null());
    match format {
        Format::Text => {
            let text = required_string(line, &fields.text, get(&fields.text))?;
            if text.trim().is_empty() {
                return Err(rejection(line, &fields.text, "empty text"));
            }
            Ok(Example::Text { text: text.to_string() })
        }
        Format::Alpaca => {
            let instruction = required_string(line, &fields.instruction, get(&fields.instruction))?;
            let output = required_string(line, &fields.output, get(&fields.output))?;
            let input = optional_string(line, &fields.input, get(&fields.input))?;
            let system = optional_string(line, &fields.system, get(&fields.system))?;
            if instruction.trim().is_empty() {
                return Err(rejection(line, &fields.instruction, "empty instruction"));
            }
            if output.trim().is_empty() {
                return Err(rejection(line, &fields.output, "empty assistant turn"));
            }
            let mut messages = vec![];
            if let Some(system) = system.filter(|s| !s.trim().is_empty()) {
                messages.push(Message::new(Role::System, system));
            }
            let user = match input.filter(|s| !s.trim().is_empty()) {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction.to_string(),
            };
            messages.push(Message::new(Role::User, user));
            messages.push(Message::new(Role::Assistant, output));
            Ok(Example::chat(messages))
        }
        Format::PromptCompletion => {
            let prompt = get(&fields.prompt).ok_or_else(|| missing(line, &fields.prompt))?;
            let completion = get(&fields.completion).ok_or_else(|| missing(line, &fields.completion))?;
            let mut messages = match prompt {
                Value::String(s) if !looks_like_message_list(s) => {
                    if s.trim().is_empty() {
                        return Err(rejection(line, &fields.prompt, "empty prompt"));
                    }
                    vec![Message::new(Role::User, s.as_str())]
                }
                other => message_list(line, &fields.prompt, other, None, fields)?,
            };
            let prompt_len = messages.len();
            match completion {
                Value::String(s) if !looks_like_message_list(s) => {
                    messages.push(Message::new(Role::Assistant, s.as_str()))
                }
                other => messages.extend(message_list(line, &fields.completion, other, None, fields)?),
            }
            validate_conversation(line, &fields.completion, &messages, prompt_len)?;
            Ok(Example::chat(messages))
        }
        Format::Preference => preference_pair(record, map, fields),
        Format::Messages | Format::ShareGpt => {
            let key = if format == Format::Messages {
                &fields.messages
            } else {
                &fields.conversations
            };
            let value = get(key).ok_or_else(|| missing(line, key))?;
            // The record as written (key order intact) when it has tool JSON to pass on.
            let ordered = record.ordered.as_ref();
            let mut messages = message_list(line, key, value, ordered.and_then(|o| o.get(key)), fields)?;
            // A separate `system` field next to the list (some ShareGPT exports) is a system turn.
            if let Some(system) = optional_string(line, &fields.system, get(&fields.system))? {
                if !system.trim().is_empty() && messages.first().is_none_or(|m| m.role != Role::System) {
                    messages.insert(0, Message::new(Role::System, system));
                }
            }
            let tools = tool_definitions(
                line,
                &fields.tools,
                get(&fields.tools),
                ordered.and_then(|o| o.get(&fields.tools)),
            )?;
            validate_conversation(line, key, &messages, 0)?;
            Ok(Example::Chat { messages, tools })
        }
    }
}

/// Why a preference row whose two answers are the same is rejected (the votes of a blind
/// comparison where both models answered alike).
pub const TIE_REASON: &str = "a tie is not a preference";

/// One preference pair; see [`Format::Preference`] for the layouts.
fn preference_pair(record: &RawRecord, map: &serde_json::Map<String, Value>, fields: &FieldMap) -> Converted {
    let line = record.line;
    let get = |name: &str| map.get(name).filter(|v| !v.is_null());
    let ordered = |name: &str| record.ordered.as_ref().and_then(|o| o.get(name));
    let chosen_value = get(&fields.chosen).ok_or_else(|| missing(line, &fields.chosen))?;
    let rejected_value = get(&fields.rejected).ok_or_else(|| missing(line, &fields.rejected))?;
    // The prompt: TRL's `prompt` (text or messages), else LLaMA-Factory's ShareGPT
    // `conversations`, else a `messages` list; none means an implicit prompt.
    let prompt_field = [&fields.prompt, &fields.conversations, &fields.messages]
        .into_iter()
        .find(|f| get(f).is_some());
    let mut prompt = match prompt_field {
        None => None,
        Some(field) => Some(match get(field) {
            Some(Value::String(s)) if !looks_like_message_list(s) => {
                if s.trim().is_empty() {
                    return Err(rejection(line, field, "empty prompt"));
                }
                vec![Message::new(Role::User, s.as_str())]
            }
            Some(other) => message_list(line, field, other, ordered(field), fields)?,
            None => vec![],
        }),
    };
    let answer = |field: &str, value: &Value| -> std::result::Result<Vec<Message>, Rejection> {
        match value {
            Value::String(s) if !looks_like_message_list(s) => {
                if s.trim().is_empty() {
                    return Err(rejection(line, field, "empty answer"));
                }
                Ok(vec![Message::new(Role::Assistant, s.as_str())])
            }
            // LLaMA-Factory: one turn object, `{"from": "gpt", "value": …}`.
            Value::Object(_) => Ok(vec![one_message(line, field, value, ordered(field), fields)?]),
            other => message_list(line, field, other, ordered(field), fields),
        }
    };
    let mut chosen = answer(&fields.chosen, chosen_value)?;
    let mut rejected = answer(&fields.rejected, rejected_value)?;
    let prompt = match prompt.take() {
        Some(prompt) => prompt,
        None => {
            // TRL's implicit prompt: the messages both conversations start with.
            let shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
            if shared == 0 {
                return Err(rejection(
                    line,
                    &fields.prompt,
                    format!(
                        "missing field: without a prompt, `{}` and `{}` must be whole conversations that \
                         start with the same messages",
                        fields.chosen, fields.rejected
                    ),
                ));
            }
            let prompt = chosen[..shared].to_vec();
            chosen.drain(..shared);
            rejected.drain(..shared);
            prompt
        }
    };
    let mut prompt = prompt;
    if let Some(system) = optional_string(line, &fields.system, get(&fields.system))? {
        if !system.trim().is_empty() && prompt.first().is_none_or(|m| m.role != Role::System) {
            prompt.insert(0, Message::new(Role::System, system));
        }
    }
    for (field, answer) in [(&fields.chosen, &chosen), (&fields.rejected, &rejected)] {
        if answer.is_empty() {
            return Err(rejection(line, field, "empty answer (the conversation is all prompt)"));
        }
        let whole = [prompt.as_slice(), answer.as_slice()].concat();
        validate_conversation(line, field, &whole, prompt.len())?;
    }
    if chosen == rejected {
        return Err(rejection(
            line,
            &fields.rejected,
            format!("the same answer as `{}`: {TIE_REASON}", fields.chosen),
        ));
    }
    let tools = tool_definitions(line, &fields.tools, get(&fields.tools), ordered(&fields.tools))?;
    Ok(Example::Preference {
        prompt,
        chosen,
        rejected,
        tools,
    })
}

/// Whether a string holds a JSON list of message objects (how CSV stores TRL's conversational
/// prompt/completion). Plain prompts that merely start with `[` do not parse as one.
fn looks_like_message_list(s: &str) -> bool {
    s.trim_start().starts_with('[')
        && serde_json::from_str::<Value>(s).is_ok_and(|v| {
            v.as_array().is_some_and(|items| {
                !items.is_empty()
                    && items
                        .iter()
                        .all(|m| m.get("role").or_else(|| m.get("from")).is_some_and(Value::is_string))
            })
        })
}

/// Checks an example the way loading checks a `messages` record (used by the editor, where
/// rows are built in memory). `line` is reported back in the rejection.
pub fn validate_example(line: usize, ex: &Example) -> std::result::Result<(), Rejection> {
    match ex {
        Example::Text { text } if text.trim().is_empty() => Err(rejection(line, "text", "empty text")),
        Example::Text { .. } => Ok(()),
        Example::Chat { messages, .. } => validate_conversation(line, "messages", messages, 0),
        Example::Preference {
            prompt,
            chosen,
            rejected,
            ..
        } => {
            for (field, answer) in [("chosen", chosen), ("rejected", rejected)] {
                let whole = [prompt.as_slice(), answer.as_slice()].concat();
                validate_conversation(line, field, &whole, prompt.len())?;
            }
            Ok(())
        }
    }
}

fn rejection(line: usize, field: &str, reason: impl Into<String>) -> Rejection {
    Rejection {
        line,
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn missing(line: usize, field: &str) -> Rejection {
    rejection(line, field, "missing field")
}

fn required_string<'a>(line: usize, field: &str, value: Option<&'a Value>) -> std::result::Result<&'a str, Rejection> {
    match value {
        None => Err(missing(line, field)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(rejection(
            line,
            field,
            format!("expected a string, found {}", kind_of(other)),
        )),
    }
}

fn optional_string<'a>(
    line: usize,
    field: &str,
    value: Option<&'a Value>,
) -> std::result::Result<Option<&'a str>, Rejection> {
    match value {
        None => Ok(None),
        Some(v) => required_string(line, field, Some(v)).map(Some),
    }
}

/// A list of `{role, content}` or ShareGPT `{from, value}` objects. In CSV the list arrives as
/// JSON text in a cell.
fn message_list(
    line: usize,
    field: &str,
    value: &Value,
    ordered: Option<&OrderedJson>,
    fields: &FieldMap,
) -> std::result::Result<Vec<Message>, Rejection> {
    let parsed;
    let items = match value {
        Value::Array(items) => items,
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|e| {
                rejection(
                    line,
                    field,
                    format!("expected a list of messages (JSON text in this cell): {e}"),
                )
            })?;
            match &parsed {
                Value::Array(items) => items,
                other => {
                    return Err(rejection(
                        line,
                        field,
                        format!("expected a list of messages, found {}", kind_of(other)),
                    ))
                }
            }
        }
        other => {
            return Err(rejection(
                line,
                field,
                format!("expected a list of messages, found {}", kind_of(other)),
            ))
        }
    };
    if items.is_empty() {
        return Err(rejection(line, field, "empty conversation"));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_ordered = match ordered {
            Some(OrderedJson::Array(items)) => items.get(i),
            _ => None,
        };
        messages.push(one_message(line, &format!("{field}[{i}]"), item, item_ordered, fields)?);
    }
    Ok(messages)
}

/// One `{role, content}` (OpenAI, with optional `tool_calls` / `tool_call_id`) or ShareGPT
/// `{from, value}` message; `at` names it in rejections (`messages[2]`).
/// `ordered` is the same message as written (keys in order), when the record kept it.
fn one_message(
    line: usize,
    at: &str,
    item: &Value,
    ordered: Option<&OrderedJson>,
    fields: &FieldMap,
) -> std::result::Result<Message, Rejection> {
    let sub = |name: &str| format!("{at}.{name}");
    let Value::Object(m) = item else {
        return Err(rejection(
            line,
            at,
            format!("expected a message object, found {}", kind_of(item)),
        ));
    };
    let (role_key, role_value) = [fields.role.as_str(), "from"]
        .into_iter()
        .find_map(|k| m.get(k).filter(|v| !v.is_null()).map(|v| (k, v)))
        .ok_or_else(|| missing(line, &sub(&fields.role)))?;
    let role_name = role_value.as_str().ok_or_else(|| {
        rejection(
            line,
            &sub(role_key),
            format!("expected a string, found {}", kind_of(role_value)),
        )
    })?;
    let role = parse_role(role_name).ok_or_else(|| {
        rejection(
            line,
            &sub(role_key),
            format!(
                "unsupported role `{role_name}` (expected system, user/human, assistant/gpt, \
                 tool/observation or function_call)"
            ),
        )
    })?;
    let content_entry = [fields.content.as_str(), "value"]
        .into_iter()
        .find_map(|k| m.get(k).filter(|v| !v.is_null()).map(|v| (k, v)));
    if role == ParsedRole::FunctionCall {
        // ShareGPT (LLaMA-Factory): the value is the call, `{"name", "arguments"}` as JSON text
        // (or a list of them for parallel calls).
        let (key, value) = content_entry.ok_or_else(|| missing(line, &sub(&fields.content)))?;
        let calls = function_calls(line, &sub(key), value, None)?;
        return Ok(Message::tool_calls("", calls));
    }
    let tool_calls = match m.get("tool_calls").filter(|v| !v.is_null()) {
        None => vec![],
        Some(_) if role != ParsedRole::Plain(Role::Assistant) => {
            return Err(rejection(
                line,
                &sub("tool_calls"),
                format!("only assistant messages call tools, this one is `{role_name}`"),
            ))
        }
        Some(value) => function_calls(
            line,
            &sub("tool_calls"),
            value,
            ordered.and_then(|o| o.get("tool_calls")),
        )?,
    };
    let role = match role {
        ParsedRole::Plain(role) => role,
        ParsedRole::FunctionCall => Role::Assistant,
    };
    let content = match content_entry {
        // An assistant message that only calls tools has no content (`null` in OpenAI's format).
        None if !tool_calls.is_empty() => String::new(),
        None => return Err(missing(line, &sub(&fields.content))),
        Some((content_key, content_value)) => text_content(line, &sub(content_key), content_value)?,
    };
    let tool_call_id = match m.get("tool_call_id").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::String(id)) if role == Role::Tool => Some(id.clone()),
        Some(Value::String(_)) => {
            return Err(rejection(
                line,
                &sub("tool_call_id"),
                "only tool messages answer a tool call",
            ))
        }
        Some(other) => {
            return Err(rejection(
                line,
                &sub("tool_call_id"),
                format!("expected a string, found {}", kind_of(other)),
            ))
        }
    };
    let reasoning_content = match m.get("reasoning_content").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::String(r)) if role == Role::Assistant => Some(r.clone()),
        Some(Value::String(_)) => {
            return Err(rejection(
                line,
                &sub("reasoning_content"),
                "only assistant messages carry reasoning",
            ))
        }
        Some(other) => {
            return Err(rejection(
                line,
                &sub("reasoning_content"),
                format!("expected a string, found {}", kind_of(other)),
            ))
        }
    };
    Ok(Message {
        role,
        content,
        tool_calls,
        tool_call_id,
        reasoning_content,
    })
}

/// A message's content: a string, or OpenAI's list of text parts (`{"type": "text", "text": …}`,
/// or `"value"` in place of `"text"`), joined in order.
fn text_content(line: usize, at: &str, value: &Value) -> std::result::Result<String, Rejection> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                let part_text = part.get("text").or_else(|| part.get("value")).and_then(Value::as_str);
                match part_text {
                    Some(t) if part.get("type").and_then(Value::as_str).is_none_or(|ty| ty == "text") => {
                        text.push_str(t)
                    }
                    _ => return Err(rejection(line, at, "only text content parts are supported")),
                }
            }
            Ok(text)
        }
        other => Err(rejection(
            line,
            at,
            format!("expected a string, found {}", kind_of(other)),
        )),
    }
}

/// Tool calls: a list (or JSON text of a list, or one call) of OpenAI
/// `{"id"?, "type": "function", "function": {"name", "arguments"}}` or flat `{"name", "arguments"}`
/// objects. Arguments are an object or JSON text of one.
/// `ordered` is the same value as written (keys in order), when the record kept it; JSON text is
/// parsed in order here.
fn function_calls(
    line: usize,
    at: &str,
    value: &Value,
    ordered: Option<&OrderedJson>,
) -> std::result::Result<Vec<ToolCall>, Rejection> {
    let parsed;
    // Arguments keep their key order (serde_json's Value sorts keys).
    let mut ordered = ordered.cloned();
    let value = match value {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| rejection(line, at, format!("expected a tool call as JSON text: {e}")))?;
            ordered = OrderedJson::parse(text).ok();
            &parsed
        }
        other => other,
    };
    let items: Vec<&Value> = match value {
        Value::Array(items) if items.is_empty() => return Err(rejection(line, at, "empty list of tool calls")),
        Value::Array(items) => items.iter().collect(),
        object @ Value::Object(_) => vec![object],
        other => {
            return Err(rejection(
                line,
                at,
                format!(
                    "expected a tool call object or a list of them, found {}",
                    kind_of(other)
                ),
            ))
        }
    };
    let list = matches!(value, Value::Array(_));
    let mut calls = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = if list { format!("{at}[{i}]") } else { at.to_string() };
        let Value::Object(call) = item else {
            return Err(rejection(
                line,
                &at,
                format!("expected a tool call object, found {}", kind_of(item)),
            ));
        };
        if let Some(kind) = call.get("type").filter(|v| !v.is_null()) {
            if kind.as_str() != Some("function") {
                return Err(rejection(
                    line,
                    &format!("{at}.type"),
                    format!("unsupported tool call type {kind} (expected \"function\")"),
                ));
            }
        }
        let (function, at_fn) = match call.get("function").filter(|v| !v.is_null()) {
            Some(Value::Object(function)) => (function, format!("{at}.function")),
            Some(other) => {
                return Err(rejection(
                    line,
                    &format!("{at}.function"),
                    format!("expected an object, found {}", kind_of(other)),
                ))
            }
            None => (call, at.clone()),
        };
        let name = match function.get("name") {
            Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
            Some(Value::String(_)) => return Err(rejection(line, &format!("{at_fn}.name"), "empty function name")),
            Some(other) if !other.is_null() => {
                return Err(rejection(
                    line,
                    &format!("{at_fn}.name"),
                    format!("expected a string, found {}", kind_of(other)),
                ))
            }
            _ => return Err(missing(line, &format!("{at_fn}.name"))),
        };
        let arguments_at = format!("{at_fn}.arguments");
        let ordered_arguments = || {
            let item = match (&ordered, list) {
                (Some(OrderedJson::Array(items)), true) => items.get(i)?,
                (Some(single), false) => single,
                _ => return None,
            };
            let function = item.get("function").unwrap_or(item);
            function
                .get("arguments")
                .or_else(|| function.get("parameters"))
                .map(OrderedJson::to_compact)
        };
        let arguments = match function.get("arguments").or_else(|| function.get("parameters")) {
            None | Some(Value::Null) => "{}".to_string(),
            Some(object @ Value::Object(_)) => ordered_arguments().unwrap_or_else(|| object.to_string()),
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(_)) => text.trim().to_string(),
                Ok(other) => {
                    return Err(rejection(
                        line,
                        &arguments_at,
                        format!("expected JSON text of an object, found {}", kind_of(&other)),
                    ))
                }
                Err(e) => return Err(rejection(line, &arguments_at, format!("not valid JSON: {e}"))),
            },
            Some(other) => {
                return Err(rejection(
                    line,
                    &arguments_at,
                    format!("expected an object, found {}", kind_of(other)),
                ))
            }
        };
        let id = match call.get("id") {
            Some(Value::String(id)) => Some(id.clone()),
            _ => None,
        };
        calls.push(ToolCall { id, name, arguments });
    }
    Ok(calls)
}

/// The `tools` column: a list of tool definitions, or JSON text of one. An empty list (or empty
/// text) means no tools.
fn tool_definitions(
    line: usize,
    field: &str,
    value: Option<&Value>,
    ordered: Option<&OrderedJson>,
) -> std::result::Result<Option<String>, Rejection> {
    let value = match value {
        None => return Ok(None),
        Some(Value::String(text)) if text.trim().is_empty() => return Ok(None),
        Some(v) => v,
    };
    let (list, text) = match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(list) => (list, text.trim().to_string()),
            Err(e) => {
                return Err(rejection(
                    line,
                    field,
                    format!("expected a list of tools (JSON text): {e}"),
                ))
            }
        },
        other => (
            other.clone(),
            ordered.map_or_else(|| other.to_string(), OrderedJson::to_compact),
        ),
    };
    match &list {
        Value::Array(items) if items.is_empty() => Ok(None),
        Value::Array(items) => match items.iter().position(|t| !t.is_object()) {
            Some(i) => Err(rejection(
                line,
                &format!("{field}[{i}]"),
                format!("expected a tool definition object, found {}", kind_of(&items[i])),
            )),
            None => Ok(Some(text)),
        },
        other => Err(rejection(
            line,
            field,
            format!("expected a list of tools, found {}", kind_of(other)),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParsedRole {
    Plain(Role),
    /// ShareGPT `function_call`: an assistant message whose value is the call.
    FunctionCall,
}

fn parse_role(name: &str) -> Option<ParsedRole> {
    let role = match name.trim().to_ascii_lowercase().as_str() {
        "system" => Role::System,
        "user" | "human" => Role::User,
        "assistant" | "gpt" | "model" | "bot" | "chatgpt" => Role::Assistant,
        "tool" | "observation" | "ipython" => Role::Tool,
        "function_call" => return Some(ParsedRole::FunctionCall),
        _ => return None,
    };
    Some(ParsedRole::Plain(role))
}

/// Optional system message first, then turns starting with the user: a user message is answered
/// by the assistant; an assistant message that calls tools is answered by one or more tool
/// messages, after which the assistant speaks again. The conversation ends with the assistant;
/// no user or assistant turn is empty (an assistant turn that calls tools may have no text).
/// `first_index` is the index of the first message in the field named by `field` (for
/// prompt/completion the completion starts later).
fn validate_conversation(
    line: usize,
    field: &str,
    messages: &[Message],
    first_index: usize,
) -> std::result::Result<(), Rejection> {
    let name = |i: usize| {
        if i >= first_index {
            format!("{field}[{}]", i - first_index)
        } else {
            format!("message {}", i + 1)
        }
    };
    let mut previous: Option<&Message> = None;
    for (i, m) in messages.iter().enumerate() {
        if m.role == Role::System {
            if i == 0 {
                continue;
            }
            return Err(rejection(
                line,
                &format!("{}.role", name(i)),
                "system message after the start (only the first message may be a system message)",
            ));
        }
        let expected: &[Role] = match previous {
            None => &[Role::User],
            Some(p) if p.role == Role::User => &[Role::Assistant],
            Some(p) if p.role == Role::Assistant && !p.tool_calls.is_empty() => &[Role::Tool],
            Some(p) if p.role == Role::Assistant => &[Role::User],
            Some(_) => &[Role::Tool, Role::Assistant],
        };
        if !expected.contains(&m.role) {
            let names: Vec<String> = expected.iter().map(|r| format!("`{}`", r.as_str())).collect();
            let why = match m.role {
                Role::Tool => "a tool message answers the assistant's tool call",
                _ if previous.is_some_and(|p| !p.tool_calls.is_empty()) => {
                    "a tool call is answered by a tool message before the conversation goes on"
                }
                _ => "turns alternate user/assistant, starting with user",
            };
            return Err(rejection(
                line,
                &format!("{}.role", name(i)),
                format!(
                    "roles out of order: `{}` where {} was expected ({why})",
                    m.role.as_str(),
                    names.join(" or ")
                ),
            ));
        }
        let may_be_empty = m.role == Role::Tool || !m.tool_calls.is_empty();
        if !may_be_empty && m.content.trim().is_empty() {
            return Err(rejection(
                line,
                &format!("{}.content", name(i)),
                format!("empty {} turn", m.role.as_str()),
            ));
        }
        previous = Some(m);
    }
    match messages.last() {
        Some(m) if m.role == Role::Assistant => Ok(()),
        Some(_) => Err(rejection(
            line,
            field,
            "the conversation does not end with an assistant turn (nothing to train on)",
        )),
        None => Err(rejection(line, field, "empty conversation")),
    }
}

#[cfg(test)]
mod tests;
