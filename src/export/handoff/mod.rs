//! Handing a Finch run to a distributed trainer and bringing the result back.
//!
//! [`export_run`] writes, for LLaMA-Factory, axolotl or TRL, the run's training and held-out rows
//! in that tool's native dataset layout, a config with the run's settings, a launcher where the
//! tool needs one, DeepSpeed ZeRO-2 / FSDP configs and a README with the command that trains on N
//! GPUs. The rows are exactly the ones Finch trained on (same file, same split, same seed, rows
//! Finch skipped left out), with the template's default system prompt written into each row, and
//! every row is checked before anything is written: the chat template the export hands over
//! (reduced to the text around each message, as [`crate::export::OllamaTemplate`] derives it)
//! must render the row to Finch's own rendering, with the trained spans exactly Finch's (the
//! answer and its end-of-turn marker; never the newline after it). A run whose rows or template
//! cannot be expressed that way is refused with the reason.
//!
//! What the target cannot express is listed in the README under "Not carried over"; the items
//! that change the trained result are also returned as [`Handoff::warnings`] (the CLI prints them
//! on stderr). [`import`] is the way back: a PEFT adapter folder from any of these tools becomes
//! a Finch run.

pub mod axolotl;
pub mod import;
pub mod llamafactory;
pub mod trl;

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::data::tokenize::{assistant_spans, encode_example};
use crate::data::{Example, LossOn, Message, Role, TokenizedExample};
use crate::error::{Error, Result};
use crate::export::OllamaTemplate;
use crate::template::ChatTemplate;
use crate::train::{Duration, Method, Precision, Schedule, TrainConfig};

pub use import::{import_adapter, ImportRequest, Imported};

/// The tools a run can be handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    LlamaFactory,
    Axolotl,
    Trl,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::LlamaFactory, Target::Axolotl, Target::Trl];

    /// The name on the command line (`--to llamafactory`).
    pub fn name(self) -> &'static str {
        match self {
            Target::LlamaFactory => "llamafactory",
            Target::Axolotl => "axolotl",
            Target::Trl => "trl",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        let n = name.trim().to_ascii_lowercase().replace(['-', '_'], "");
        Target::ALL.into_iter().find(|t| t.name() == n)
    }

    /// The name shown in the studio and the README.
    pub fn title(self) -> &'static str {
        match self {
            Target::LlamaFactory => "LLaMA-Factory",
            Target::Axolotl => "axolotl",
            Target::Trl => "TRL (SFTTrainer)",
        }
    }

    /// The default output folder's name.
    pub fn folder_name(self) -> &'static str {
        match self {
            Target::LlamaFactory => "handoff-llamafactory",
            Target::Axolotl => "handoff-axolotl",
            Target::Trl => "handoff-trl",
        }
    }
}

/// One hand-off to write.
#[derive(Debug, Clone, PartialEq)]
pub struct HandoffRequest {
    /// A run folder written by `finch train` (holding `config.toml`).
    pub run: PathBuf,
    pub target: Target,
    /// A new or empty folder.
    pub out: PathBuf,
    /// The base model as the tool should load it (a Hugging Face folder or Hub id); `None`: the
    /// run's own model (a GGUF file there is reported: the tools need safetensors).
    pub base_model: Option<String>,
}

/// A written hand-off.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    pub target: Target,
    pub out: PathBuf,
    /// Every file written, relative to `out`, sorted.
    pub files: Vec<String>,
    pub train_rows: usize,
    pub eval_rows: usize,
    /// The command that trains on N GPUs (also in the README).
    pub command: String,
    /// Everything the target does not reproduce (also in the README).
    pub not_carried: Vec<String>,
    /// The subset of `not_carried` that changes the trained result.
    pub warnings: Vec<String>,
}

/// The text a chat template writes around each message, split so the trained part of an
/// assistant turn (its content and end-of-turn marker) is separate from what follows the marker.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnText {
    /// Written once before everything (a BOS the template itself writes).
    pub prefix: String,
    pub system: (String, String),
    pub user: (String, String),
    /// Before the assistant's content (ChatML: `<|im_start|>assistant\n`).
    pub assistant_pre: String,
    /// After the content, trained (`<|im_end|>`).
    pub eot: String,
    /// After the marker, not trained (`\n`).
    pub after_eot: String,
    /// The system prompt the template adds to a conversation without one.
    pub default_system: Option<String>,
}

impl TurnText {
    /// Derives the pieces of `template` by rendering probe conversations.
    pub fn derive(template: &ChatTemplate) -> Result<TurnText> {
        let t = OllamaTemplate::derive(template).map_err(|e| {
            Error::Data(format!(
                "{e}; a run with this chat template cannot be handed off (its turns are not text around each message)"
            ))
        })?;
        let (eot, after_eot) = match template.end_of_turn() {
            Some(m) if t.assistant.1.starts_with(&m) => (m.clone(), t.assistant.1[m.len()..].to_string()),
            _ => {
                let trimmed = t.assistant.1.trim_end();
                (trimmed.to_string(), t.assistant.1[trimmed.len()..].to_string())
            }
        };
        let mut pieces = TurnText {
            prefix: String::new(),
            system: t.system,
            user: t.user,
            assistant_pre: t.assistant.0,
            eot,
            after_eot,
            default_system: t.default_system,
        };
        // A BOS the template writes (OllamaTemplate leaves it to the runtime) belongs to the text.
        let probe = [
            Message::new(Role::System, "S"),
            Message::new(Role::User, "U"),
            Message::new(Role::Assistant, "A"),
        ];
        let full = template.render(&probe, false)?;
        let ours = pieces.render(&probe, LossOn::Assistant).0;
        if let Some(head) = full.strip_suffix(ours.as_str()) {
            pieces.prefix = head.to_string();
        }
        Ok(pieces)
    }

    /// The whole text of `messages` and the character spans that carry loss: each trained
    /// assistant turn's content and end-of-turn marker ([`LossOn::LastTurn`]: the last one only;
    /// [`LossOn::All`]: the same spans, the caller trains everything).
    pub fn render(&self, messages: &[Message], loss_on: LossOn) -> (String, Vec<Range<usize>>) {
        let last_assistant = messages.iter().rposition(|m| m.role == Role::Assistant);
        let mut text = self.prefix.clone();
        let mut spans = vec![];
        for (i, m) in messages.iter().enumerate() {
            match m.role {
                Role::System => {
                    text += &self.system.0;
                    text += &m.content;
                    text += &self.system.1;
                }
                Role::User | Role::Tool => {
                    text += &self.user.0;
                    text += &m.content;
                    text += &self.user.1;
                }
                Role::Assistant => {
                    text += &self.assistant_pre;
                    let start = text.len();
                    text += &m.content;
                    text += &self.eot;
                    if loss_on != LossOn::LastTurn || Some(i) == last_assistant {
                        spans.push(start..text.len());
                    }
                    text += &self.after_eot;
                }
            }
        }
        (text, spans)
    }

    /// A Jinja chat template writing exactly [`TurnText::render`]'s text, with
    /// `{% generation %}` around each trained span (transformers' `return_assistant_tokens_mask`).
    /// Literal text is written as quoted strings so no whitespace control touches it.
    pub fn jinja(&self, loss_on: LossOn, generation_markers: bool) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let (gen, endgen) = if generation_markers {
            ("{% generation %}", "{% endgeneration %}")
        } else {
            ("", "")
        };
        let mut j = String::new();
        if !self.prefix.is_empty() {
            j += &format!("{{{{ {} }}}}", q(&self.prefix));
        }
        if let Some(d) = &self.default_system {
            j += &format!(
                "{{%- if messages[0]['role'] != 'system' -%}}{{{{ {} + {} + {} }}}}{{%- endif -%}}",
                q(&self.system.0),
                q(d),
                q(&self.system.1)
            );
        }
        if loss_on == LossOn::LastTurn {
            j += "{%- set ns = namespace(last=-1) -%}{%- for message in messages -%}\
                  {%- if message['role'] == 'assistant' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}\
                  {%- endfor -%}";
        }
        let trained = if loss_on == LossOn::LastTurn {
            "loop.index0 == ns.last"
        } else {
            "true"
        };
        j += &format!(
            "{{%- for message in messages -%}}\
             {{%- if message['role'] == 'system' -%}}{{{{ {sp} + message['content'] + {ss} }}}}\
             {{%- elif message['role'] == 'assistant' -%}}{{{{ {ap} }}}}\
             {{%- if {trained} -%}}{gen}{{{{ message['content'] + {eot} }}}}{endgen}\
             {{%- else -%}}{{{{ message['content'] + {eot} }}}}{{%- endif -%}}{{{{ {after} }}}}\
             {{%- else -%}}{{{{ {up} + message['content'] + {us} }}}}\
             {{%- endif -%}}{{%- endfor -%}}\
             {{%- if add_generation_prompt -%}}{{{{ {ap} }}}}{{%- endif -%}}",
            sp = q(&self.system.0),
            ss = q(&self.system.1),
            ap = q(&self.assistant_pre),
            eot = q(&self.eot),
            after = q(&self.after_eot),
            up = q(&self.user.0),
            us = q(&self.user.1),
        );
        j
    }
}

/// A run read back for a hand-off: its settings, the template pieces and the rows it trained
/// on, each checked against Finch's own rendering.
#[derive(Debug, Clone)]
pub struct PreparedRun {
    pub run: PathBuf,
    pub cfg: TrainConfig,
    pub turns: TurnText,
    /// The conversations Finch trained on, the default system prompt written out.
    pub train: Vec<Vec<Message>>,
    pub eval: Vec<Vec<Message>>,
    /// Finch's token ids and loss mask of each training row (written as `finch_tokens.jsonl`, the
    /// reference the tools' tokenization is checked against).
    pub train_tokens: Vec<TokenizedExample>,
    /// The base model as the tool loads it.
    pub base_model: String,
    /// The end-of-sequence / end-of-turn tokens the tools should stop on.
    pub stop_words: Vec<String>,
    pub not_carried: Vec<String>,
    pub warnings: Vec<String>,
}

impl PreparedRun {
    fn note(&mut self, text: impl Into<String>) {
        self.not_carried.push(text.into());
    }

    /// Not carried over and changes the result: also a warning.
    fn warn(&mut self, text: impl Into<String>) {
        let text = text.into();
        self.not_carried.push(format!("**Changes the result:** {text}"));
        self.warnings.push(text);
    }
}

/// Reads the run folder `run` and checks that every row it trained on can be handed off.
pub fn prepare(run: &Path, base_model: Option<&str>) -> Result<PreparedRun> {
    let cfg_path = run.join("config.toml");
    if !cfg_path.is_file() {
        return Err(Error::MissingFile {
            path: run.to_path_buf(),
            file: "config.toml".into(),
            hint: "expected a run folder written by `finch train`".into(),
        });
    }
    let cfg = TrainConfig::from_toml_file(&cfg_path)?;
    for (field, path) in [("data", Some(&cfg.data)), ("eval_data", cfg.eval_data.as_ref())] {
        if let Some(path) = path.filter(|p| !Path::new(p.as_str()).exists()) {
            return Err(Error::invalid(
                &cfg_path,
                format!("field `{field}`"),
                format!(
                    "{path} does not exist here (a relative path is relative to the folder `finch train` ran in: run \
                     export-run from there)"
                ),
            ));
        }
    }
    if cfg.method != Method::Sft {
        return Err(Error::config(
            "method",
            format!(
                "{}: a {} run cannot be handed off yet (only sft runs are); LLaMA-Factory's `stage: {0}`, \
                 TRL's {}Trainer and axolotl's `rl: {0}` are the counterparts",
                cfg_path.display(),
                cfg.method.name(),
                cfg.method.name().to_ascii_uppercase()
            ),
        ));
    }
    let (files, template) = crate::train::run::open_model(&cfg.model)?;
    let template = match cfg.enable_thinking {
        Some(on) => template.with_variable("enable_thinking", serde_json::Value::Bool(on))?,
        None => template,
    };
    let turns = TurnText::derive(&template)?;
    let mut ignore = |_: String| {};
    let data = Path::new(&cfg.data);
    let rows = crate::train::run::load_rows(data, &mut ignore)?;
    let (train_rows, eval_rows) = match &cfg.eval_data {
        Some(p) => (rows, crate::train::run::load_rows(Path::new(p), &mut ignore)?),
        None => {
            let split = crate::data::split::train_validation_split(rows.len(), cfg.eval_split as f32, cfg.seed)?;
            crate::data::split::apply_split(&rows, &split)
        }
    };
    let model_dir = if files.path.is_dir() {
        files.path.clone()
    } else {
        files.path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let has_safetensors = std::fs::read_dir(&model_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        })
        .unwrap_or(false);
    let base = match base_model {
        Some(b) => b.to_string(),
        None if Path::new(&cfg.model).exists() => std::fs::canonicalize(&model_dir)
            .unwrap_or(model_dir.clone())
            .to_string_lossy()
            .into_owned(),
        None => cfg.model.clone(),
    };
    let mut stop_words = vec![];
    if !turns.eot.is_empty() {
        stop_words.push(turns.eot.clone());
    }
    let mut p = PreparedRun {
        run: run.to_path_buf(),
        cfg: cfg.clone(),
        turns,
        train: vec![],
        eval: vec![],
        train_tokens: vec![],
        base_model: base,
        stop_words,
        not_carried: vec![],
        warnings: vec![],
    };
    if base_model.is_none() && Path::new(&cfg.model).exists() && !has_safetensors {
        p.warn(format!(
            "the run's model `{}` has no safetensors weights (a GGUF file); LLaMA-Factory, axolotl and TRL load \
             Hugging Face folders: convert it or export again with --base-model <folder or Hub id> naming the same \
             weights",
            cfg.model
        ));
    }
    let source = cfg.data.clone();
    let (train, train_tokens, skipped, truncated) =
        check_rows(&train_rows, &source, &template, &files.tokenizer, &p.turns, &cfg)?;
    let eval_source = cfg.eval_data.clone().unwrap_or(source);
    let (eval, _, _, _) = check_rows(&eval_rows, &eval_source, &template, &files.tokenizer, &p.turns, &cfg)?;
    p.train = train;
    p.train_tokens = train_tokens;
    p.eval = eval;
    if p.train.is_empty() {
        return Err(Error::Data(format!("{}: no training rows to hand off", cfg.data)));
    }
    if skipped > 0 {
        p.note(format!(
            "{skipped} training rows Finch skipped (no answer token left within seq_len = {}) are left out of the \
             exported data too",
            cfg.seq_len
        ));
    }
    if truncated > 0 {
        p.warn(format!(
            "{truncated} training rows are longer than seq_len = {} tokens; Finch kept their first {0} tokens, the \
             tools truncate in their own way (LLaMA-Factory shares the budget between prompt and answer, axolotl drops \
             long rows, TRL keeps the first max_length tokens)",
            cfg.seq_len
        ));
    }
    common_notes(&mut p);
    Ok(p)
}

/// Conversations, Finch's tokenization of each, rows skipped, rows truncated.
type CheckedRows = (Vec<Vec<Message>>, Vec<TokenizedExample>, usize, usize);

/// The rows of `rows` Finch trained on (as conversations with the default system prompt written
/// out), how many it skipped for having no trained token left, and how many it truncated. Each
/// row's rendering through `turns` must equal Finch's, trained spans included.
fn check_rows(
    rows: &[crate::data::load::Row],
    source: &str,
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    turns: &TurnText,
    cfg: &TrainConfig,
) -> Result<CheckedRows> {
    let mut out = vec![];
    let mut tokens = vec![];
    let (mut skipped, mut truncated) = (0, 0);
    for row in rows {
        let at = |why: String| {
            Error::Data(format!(
                "{source}: line {}: {why}; this run cannot be handed off",
                row.line
            ))
        };
        let (messages, tools) = match &row.example {
            Example::Text { .. } => {
                return Err(at("raw-text rows (continued pre-training) are not handed off".into()));
            }
            ex => ex.conversation().ok_or_else(|| at("not a conversation".into()))?,
        };
        if tools.is_some() {
            return Err(at("rows with tool definitions are not handed off yet".into()));
        }
        if let Some(m) = messages
            .iter()
            .find(|m| !m.tool_calls.is_empty() || m.reasoning_content.is_some() || m.role == Role::Tool)
        {
            let what = if m.reasoning_content.is_some() {
                "reasoning_content"
            } else {
                "tool calls"
            };
            return Err(at(format!("messages with {what} are not handed off yet")));
        }
        let tokenized =
            encode_example(&row.example, template, tokenizer, cfg.loss_on, cfg.seq_len).map_err(|e| match e {
                Error::Data(reason) => at(reason),
                other => other,
            })?;
        if tokenized.trained_tokens() == 0 {
            skipped += 1;
            continue;
        }
        truncated += usize::from(tokenized.truncated);
        let finch = assistant_spans(&messages, template, cfg.loss_on)?;
        let mut explicit = messages.clone();
        if let Some(d) = &turns.default_system {
            if explicit.first().is_none_or(|m| m.role != Role::System) {
                explicit.insert(0, Message::new(Role::System, d.clone()));
            }
        }
        let (text, spans) = turns.render(&explicit, cfg.loss_on);
        if !text.starts_with(&finch.rendered) {
            return Err(at(format!(
                "the chat template renders this row differently from its per-message form (Finch: {:?}, \
                 exported: {:?})",
                finch.rendered.chars().take(120).collect::<String>(),
                text.chars().take(120).collect::<String>()
            )));
        }
        if spans != finch.spans {
            return Err(at(format!(
                "the trained spans differ from Finch's (Finch {:?}, exported {:?})",
                finch.spans, spans
            )));
        }
        out.push(explicit);
        tokens.push(tokenized);
    }
    Ok((out, tokens, skipped, truncated))
}

/// Notes every target shares.
fn common_notes(p: &mut PreparedRun) {
    let cfg = p.cfg.clone();
    match cfg.precision {
        Precision::Q4_1 | Precision::Q8_0 => p.warn(format!(
            "Finch trained on a base kept in {} blocks; the export trains on the unquantized weights (QLoRA's NF4 \
             in these tools is another format), so the adapter will differ slightly",
            cfg.precision.name()
        )),
        Precision::F32 | Precision::Bf16 | Precision::F16 => {}
    }
    if cfg.warmup_steps > 0 {
        p.warn(format!(
            "warm-up: Finch's step s (from 0) uses lr × (s+1)/{w}, Hugging Face's schedulers lr × s/{w} (their first \
             step has lr 0), so the warm-up learning rates run one step behind Finch's",
            w = cfg.warmup_steps
        ));
    }
    if cfg.loss_on == LossOn::All {
        p.warn(
            "loss on every token (`loss_on = all`) is mapped to each tool's nearest setting; the exported masks were \
             only checked for assistant-turn losses",
        );
    }
    if cfg.lora.dropout > 0.0 {
        p.note("LoRA dropout is random: the dropped units differ from Finch's (same rate)");
    }
    p.note(
        "data order and the LoRA A initialisation come from the tool's own random streams (same seed, other numbers)",
    );
    p.note(format!(
        "evaluation: the held-out rows Finch used are exported as the eval set ({} rows); Finch's probe prompts ({}) \
         are not (they only watch the run)",
        p.eval.len(),
        cfg.probe_prompts.len()
    ));
    if cfg.text_overlap > 0 {
        p.note("text_overlap applies to raw-text rows only, which are not handed off");
    }
    if cfg.keep_checkpoints > 0 && cfg.save_every > 0 {
        p.note(format!(
            "keep_checkpoints = {} maps to save_total_limit where the tool has it",
            cfg.keep_checkpoints
        ));
    }
}

/// The step or epoch count as the tools' fields: `(max_steps, num_train_epochs)`.
pub fn duration_fields(cfg: &TrainConfig) -> (i64, f64) {
    match cfg.duration {
        Duration::Steps(n) => (n as i64, 1.0),
        Duration::Epochs(e) => (-1, e),
    }
}

/// Hugging Face's `lr_scheduler_type` for a Finch schedule (the same formulas,
/// `get_{constant,linear,cosine}_schedule_with_warmup`).
pub fn scheduler_name(s: Schedule, warmup: usize) -> &'static str {
    match s {
        Schedule::Constant if warmup > 0 => "constant_with_warmup",
        Schedule::Constant => "constant",
        Schedule::Linear => "linear",
        Schedule::Cosine => "cosine",
    }
}

/// A YAML scalar. Strings are written JSON-quoted, which YAML reads as the same string; Finch
/// writes these few flat configs itself rather than pulling in a YAML crate for them.
pub fn yaml_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => format!("[{}]", items.iter().map(yaml_value).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// `key: value` lines of a flat YAML mapping, with `# comment` lines where the key starts with `#`.
pub fn yaml_lines(entries: &[(&str, serde_json::Value)]) -> String {
    let mut out = String::new();
    for (k, v) in entries {
        if k.starts_with('#') {
            out += &format!("\n{k}\n");
        } else {
            out += &format!("{k}: {}\n", yaml_value(v));
        }
    }
    out
}

/// DeepSpeed ZeRO stage 2, with the batch and optimizer values left to the trainer (`auto`).
pub fn deepspeed_zero2() -> serde_json::Value {
    json!({
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": true,
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": true,
            "allgather_bucket_size": 5e8,
            "overlap_comm": true,
            "reduce_scatter": true,
            "reduce_bucket_size": 5e8,
            "contiguous_gradients": true,
            "round_robin_gradients": true
        }
    })
}

/// The messages of one row as `{role, content}` objects.
pub fn messages_json(messages: &[Message]) -> serde_json::Value {
    serde_json::Value::Array(
        messages
            .iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
            .collect(),
    )
}

/// What a target module writes: files (relative path, contents), the launch command and the
/// README's launch section.
pub struct Written {
    pub files: Vec<(String, Vec<u8>)>,
    pub command: String,
    pub launch: String,
}

/// Writes the hand-off of `request`; refuses an output folder that holds anything.
pub fn export_run(request: &HandoffRequest) -> Result<Handoff> {
    let out = &request.out;
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, "cannot read", e))?
            .next()
            .is_some()
    {
        return Err(Error::config(
            "out",
            format!(
                "{} is not empty; write the hand-off into a new or empty folder",
                out.display()
            ),
        ));
    }
    let mut p = prepare(&request.run, request.base_model.as_deref())?;
    let written = match request.target {
        Target::LlamaFactory => llamafactory::write(&mut p)?,
        Target::Axolotl => axolotl::write(&mut p)?,
        Target::Trl => trl::write(&mut p)?,
    };
    let mut files = written.files;
    let ds = serde_json::to_string_pretty(&deepspeed_zero2()).unwrap_or_default();
    files.push(("ds_z2_config.json".into(), ds.into_bytes()));
    let mut reference = String::new();
    for t in &p.train_tokens {
        let mask: Vec<u8> = t.loss_mask.iter().map(|&m| u8::from(m)).collect();
        reference += &format!("{}\n", json!({"input_ids": t.input_ids, "loss_mask": mask}));
    }
    files.push(("finch_tokens.jsonl".into(), reference.into_bytes()));
    files.push((
        "README.md".into(),
        readme(&p, request.target, &written.launch).into_bytes(),
    ));
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, "cannot create hand-off folder", e))?;
    let mut names = vec![];
    for (name, bytes) in &files {
        crate::fsutil::write_atomic(&out.join(name), bytes)?;
        names.push(name.clone());
    }
    names.sort();
    Ok(Handoff {
        target: request.target,
        out: out.clone(),
        files: names,
        train_rows: p.train.len(),
        eval_rows: p.eval.len(),
        command: written.command,
        not_carried: p.not_carried,
        warnings: p.warnings,
    })
}

fn readme(p: &PreparedRun, target: Target, launch: &str) -> String {
    let cfg = &p.cfg;
    let (steps, epochs) = duration_fields(cfg);
    let duration = if steps > 0 {
        format!("{steps} optimizer steps")
    } else {
        format!("{epochs} epochs")
    };
    let mut r = format!(
        "# Finch run `{run}` handed to {title}\n\n\
         Written by `finch export-run`. The data are the {n} training rows and {m} held-out rows Finch used, \
         rendered with the same chat template and the same loss mask (each answer and its end-of-turn marker \
         `{eot}`; the text after the marker is not trained).\n\n\
         | setting | value |\n|---|---|\n\
         | base model | `{model}` |\n| LoRA | rank {r}, alpha {alpha}, dropout {dropout}, rsLoRA {rs}, targets {targets} |\n\
         | learning rate | {lr} ({sched}, {warm} warm-up steps) |\n| batch | {b} per device × {ga} accumulation |\n\
         | length | {duration}, sequences of up to {seq} tokens, no packing |\n\
         | optimizer | AdamW β=({b1}, {b2}), ε={eps}, weight decay {wd}, gradient clipping {clip} |\n| seed | {seed} |\n\n\
         ## Launch on N GPUs\n\n{launch}\n\
         The batch above is per device: on N GPUs each step sees N times as many rows. To keep Finch's effective \
         batch of {eff} rows, divide the gradient accumulation by N (or the per-device batch) where it divides.\n\n\
         DeepSpeed ZeRO-2: `ds_z2_config.json` (already named in the config; remove that line to run without DeepSpeed).\n\n\
         `finch_tokens.jsonl` holds Finch's token ids and loss mask (1: trained) of each training row, in order: \
         the reference `scripts/check_handoff.py` compares the tool's own tokenization with.\n\n\
         ## Not carried over\n\n",
        run = p.run.display(),
        title = target.title(),
        n = p.train.len(),
        m = p.eval.len(),
        eot = p.turns.eot,
        model = p.base_model,
        r = cfg.lora.r,
        alpha = cfg.lora.alpha,
        dropout = cfg.lora.dropout,
        rs = cfg.lora.use_rslora,
        targets = cfg
            .lora
            .targets
            .iter()
            .map(|t| t.peft_name())
            .collect::<Vec<_>>()
            .join(", "),
        lr = cfg.lr,
        sched = scheduler_name(cfg.schedule, cfg.warmup_steps),
        warm = cfg.warmup_steps,
        b = cfg.batch_size,
        ga = cfg.grad_accum,
        seq = cfg.seq_len,
        b1 = cfg.beta1,
        b2 = cfg.beta2,
        eps = cfg.eps,
        wd = cfg.weight_decay,
        clip = cfg.max_grad_norm,
        seed = cfg.seed,
        eff = cfg.batch_size * cfg.grad_accum,
    );
    for n in &p.not_carried {
        r += &format!("- {n}\n");
    }
    r += "\n## Coming back\n\n\
          The tool writes a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) into its output \
          folder. `finch import-adapter <that folder> --name <name>` turns it into a Finch run (its `trainer_state.json` \
          loss curve included) for the Chat, Compare and Export pages.\n";
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_round_trip() {
        for t in Target::ALL {
            assert_eq!(Target::from_name(t.name()), Some(t));
        }
        assert_eq!(Target::from_name("LLaMA-Factory"), Some(Target::LlamaFactory));
        assert_eq!(Target::from_name("unsloth"), None);
    }

    #[test]
    fn chatml_pieces_render_like_the_template_and_train_answer_and_marker() {
        let t = ChatTemplate::new(crate::model::tiny::CHATML_TEMPLATE, None, None).unwrap();
        let turns = TurnText::derive(&t).unwrap();
        assert_eq!(turns.eot, "<|im_end|>");
        assert_eq!(turns.after_eot, "\n");
        assert_eq!(turns.default_system, None);
        let msgs = [
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "HELLO"),
            Message::new(Role::User, "again"),
            Message::new(Role::Assistant, "AGAIN"),
        ];
        let (text, spans) = turns.render(&msgs, LossOn::Assistant);
        assert_eq!(text, t.render(&msgs, false).unwrap());
        let trained: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(trained, ["HELLO<|im_end|>", "AGAIN<|im_end|>"]);
        let (_, last) = turns.render(&msgs, LossOn::LastTurn);
        assert_eq!(last, spans[1..]);
        // The Jinja written for the tools renders the same text.
        let j = ChatTemplate::new(&turns.jinja(LossOn::Assistant, false), None, None).unwrap();
        assert_eq!(j.render(&msgs, false).unwrap(), text);
        assert_eq!(j.render(&msgs[..1], true).unwrap(), t.render(&msgs[..1], true).unwrap());
    }

    #[test]
    fn yaml_scalars_are_json_quoted() {
        let y = yaml_lines(&[("# model", json!(null)), ("a", json!("x: y")), ("b", json!([1, "q"]))]);
        assert_eq!(y, "\n# model\na: \"x: y\"\nb: [1, \"q\"]\n");
    }
}
