//! Chat templates: rendering a conversation into the exact text a model was trained on.
//!
//! Models ship a Jinja `chat_template` in `tokenizer_config.json`; Hugging Face renders it with
//! Python's `jinja2` (`trim_blocks`, `lstrip_blocks`, the `loop_controls` extension, and the
//! globals `raise_exception` and `strftime_now` plus a `tojson` filter that wraps `json.dumps`).
//! This module reproduces that environment with `minijinja`, byte for byte on the templates in
//! `tests/fixtures/templates/`, and adds the built-in fallbacks (ChatML, Llama-3, Alpaca, none)
//! for models without a template.
//!
//! Templates come from downloaded files, so they are untrusted: minijinja has no file or network
//! access, every render runs on a fuel budget (a bound on executed instructions, so a template
//! cannot loop forever) and writes into a buffer that refuses to grow past a size limit.

mod message;
pub use message::{Message, Role, ToolCall};
pub use ordered_json::OrderedJson;

pub mod ordered_json;
mod pyjson;
mod pyrepr;
pub(crate) mod strftime;

use std::io::Write;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

/// Name under which the template is registered in its environment (appears in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may execute. Real templates (Llama-3.1 with tools, Qwen3) need a few
/// hundred per message; this allows thousands of turns and still stops a hostile loop in well
/// under a second.
const RENDER_FUEL: u64 = 20_000_000;

/// Output a render may produce beyond the size of the messages themselves.
const OUTPUT_SLACK_BYTES: usize = 1 << 20;

/// Output may be this many times the size of the message contents (templates repeat a system
/// prompt or tool list, never the whole conversation many times over).
const OUTPUT_CONTENT_FACTOR: usize = 8;

/// Nesting depth for macros / includes / recursive loops.
const RECURSION_LIMIT: usize = 64;

/// The built-in templates, for models that ship none or when the user picks one explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2.5 without the default system prompt).
    ChatMl,
    /// Llama-3 Instruct headers with `<|eot_id|>`.
    Llama3,
    /// Stanford Alpaca's `### Instruction:` / `### Response:` layout; each response is followed by
    /// `eos_token`, which the model supplies (see [`ChatTemplate::with_special_tokens`]).
    Alpaca,
    /// No template: message contents joined with a newline, `eos_token` after assistant turns.
    None,
}

impl BuiltinTemplate {
    pub const ALL: [BuiltinTemplate; 4] = [
        BuiltinTemplate::ChatMl,
        BuiltinTemplate::Llama3,
        BuiltinTemplate::Alpaca,
        BuiltinTemplate::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinTemplate::ChatMl => "chatml",
            BuiltinTemplate::Llama3 => "llama3",
            BuiltinTemplate::Alpaca => "alpaca",
            BuiltinTemplate::None => "none",
        }
    }

    /// Parses a name as the command line and config files spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "chatml" => Some(BuiltinTemplate::ChatMl),
            "llama3" | "llama-3" => Some(BuiltinTemplate::Llama3),
            "alpaca" => Some(BuiltinTemplate::Alpaca),
            "none" | "raw" => Some(BuiltinTemplate::None),
            _ => None,
        }
    }

    /// The Jinja source, written in the style Hugging Face templates use.
    pub fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::ChatMl => concat!(
                "{% for message in messages %}",
                "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
            ),
            BuiltinTemplate::Llama3 => concat!(
                "{% for message in messages %}",
                "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'",
                " + message['content'] | trim + '<|eot_id|>' %}",
                "{% if loop.index0 == 0 and bos_token is defined %}{% set content = bos_token + content %}{% endif %}",
                "{{ content }}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
            ),
            BuiltinTemplate::Alpaca => concat!(
                "{% if messages and messages[0]['role'] != 'system' %}",
                "{{ 'Below is an instruction that describes a task. ",
                "Write a response that appropriately completes the request.\\n\\n' }}",
                "{% endif %}",
                "{% for message in messages %}",
                "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}",
                "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}",
                "{% else %}{{ '### Response:\\n' + message['content'] }}",
                "{% if eos_token is defined %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}",
                "{% endif %}",
                "{% endfor %}",
                "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
            ),
            BuiltinTemplate::None => concat!(
                "{% for message in messages %}",
                "{% if not loop.first %}{{ '\\n' }}{% endif %}",
                "{{ message['content'] }}",
                "{% if message['role'] == 'assistant' and eos_token is defined %}{{ eos_token }}{% endif %}",
                "{% endfor %}",
                "{% if add_generation_prompt and messages %}{{ '\\n' }}{% endif %}"
            ),
        }
    }

    /// Special tokens the template assumes when the model supplies none.
    fn default_tokens(self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            BuiltinTemplate::ChatMl => (None, Some("<|im_end|>")),
            BuiltinTemplate::Llama3 => (Some("<|begin_of_text|>"), Some("<|eot_id|>")),
            BuiltinTemplate::Alpaca | BuiltinTemplate::None => (None, None),
        }
    }
}

/// A compiled chat template plus the special tokens it may reference.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    end_of_turn: Option<String>,
    builtin: Option<BuiltinTemplate>,
    /// Extra variables the template reads, as `apply_chat_template(..., **kwargs)` passes them
    /// (Qwen3's `enable_thinking`, Llama 3.2's `date_string`).
    variables: Vec<(String, serde_json::Value)>,
    /// The moment `strftime_now` formats (Unix seconds, UTC), when pinned with
    /// [`ChatTemplate::with_clock`]; `None` is the current time.
    clock: Option<i64>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("builtin", &self.builtin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("end_of_turn", &self.end_of_turn)
            .field("source_bytes", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. A syntax error names the template line.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let env = sandboxed_environment(source, None)?;
        let mut template = ChatTemplate {
            source: source.to_string(),
            env,
            bos_token,
            eos_token,
            end_of_turn: None,
            builtin: None,
            variables: Vec::new(),
            clock: None,
        };
        template.end_of_turn = template.detect_end_of_turn();
        Ok(template)
    }

    /// The same template rendered with variable `name` set to `value`, as transformers'
    /// `apply_chat_template(messages, name=value)` passes extra keyword arguments: Qwen3's
    /// `enable_thinking=False`, or Llama 3.2's `date_string` (which otherwise is today's date).
    /// Setting a name again replaces its value; the names the renderer itself passes
    /// (`messages`, `tools`, `add_generation_prompt`, `bos_token`, `eos_token`) are refused.
    pub fn with_variable(mut self, name: &str, value: serde_json::Value) -> Result<Self> {
        const RESERVED: [&str; 6] = [
            "messages",
            "tools",
            "documents",
            "add_generation_prompt",
            "bos_token",
            "eos_token",
        ];
        if RESERVED.contains(&name) || name.is_empty() {
            return Err(Error::config(
                "template variable",
                format!("`{name}` cannot be set: the renderer passes it itself"),
            ));
        }
        self.variables.retain(|(n, _)| n != name);
        self.variables.push((name.to_string(), value));
        self.end_of_turn = self.detect_end_of_turn();
        Ok(self)
    }

    /// The same template with `strftime_now` formatting the moment `unix_secs` (UTC) instead of
    /// the current time. Templates that print today's date with it and take no `date_string`
    /// (SmolLM3's "Today Date: ") otherwise render a different prompt every day, so a dataset
    /// encoded twice would differ; pinning the clock makes the rendering reproducible, as
    /// passing `strftime_now` to transformers' `apply_chat_template` does.
    pub fn with_clock(mut self, unix_secs: i64) -> Result<Self> {
        self.env = sandboxed_environment(&self.source, Some(unix_secs))?;
        self.clock = Some(unix_secs);
        self.end_of_turn = self.detect_end_of_turn();
        Ok(self)
    }

    /// The moment set with [`ChatTemplate::with_clock`], if any.
    pub fn clock(&self) -> Option<i64> {
        self.clock
    }

    /// The extra variables set with [`ChatTemplate::with_variable`].
    pub fn variables(&self) -> &[(String, serde_json::Value)] {
        &self.variables
    }

    /// One of the built-in templates with its default special tokens.
    pub fn builtin(kind: BuiltinTemplate) -> Self {
        let (bos, eos) = kind.default_tokens();
        match ChatTemplate::new(kind.source(), bos.map(String::from), eos.map(String::from)) {
            Ok(mut template) => {
                template.builtin = Some(kind);
                template
            }
            // The built-in sources are constants covered by tests; a failure here is a bug in
            // this file, not bad input.
            Err(err) => unreachable!("built-in template {} does not compile: {err}", kind.name()),
        }
    }

    /// Reads the template of a model folder (or of a `tokenizer_config.json` path directly).
    ///
    /// `chat_template` may be a string or a list of `{name, template}` (the one named `default`
    /// is used); newer `transformers` save it as `chat_template.jinja` next to the config, which
    /// is used when the config has none. `bos_token`/`eos_token` may be strings or AddedToken
    /// objects `{"content": ..}`. Returns `Ok(None)` when the model ships no template.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let (dir, config_path) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer_config.json"))
        } else {
            (
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
                path.to_path_buf(),
            )
        };
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, "cannot read", e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(&config_path, "tokenizer config", format!("not valid JSON: {e}")))?;
        let bos = special_token(&config, "bos_token");
        let eos = special_token(&config, "eos_token");
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, "cannot read", e))?)
                } else {
                    None
                }
            }
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |want: &str| {
                    list.iter().find_map(|entry| {
                        let name = entry.get("name")?.as_str()?;
                        (name == want).then(|| entry.get("template")?.as_str().map(String::from))?
                    })
                };
                match named("default") {
                    Some(s) => Some(s),
                    None => {
                        return Err(Error::invalid(
                            &config_path,
                            "chat_template",
                            "a list of named templates without one named `default`",
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(Error::invalid(
                    &config_path,
                    "chat_template",
                    format!(
                        "expected a string or a list of {{name, template}}, found {}",
                        json_kind(other)
                    ),
                ))
            }
        };
        match source {
            None => Ok(None),
            Some(source) => ChatTemplate::new(&source, bos, eos)
                .map(Some)
                .map_err(|e| Error::invalid(&config_path, "chat_template", format!("{e}"))),
        }
    }

    /// The same template with other special tokens (e.g. a built-in template adopting the
    /// model's `eos_token`). `None` keeps the current value.
    pub fn with_special_tokens(mut self, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        if bos_token.is_some() {
            self.bos_token = bos_token;
        }
        if eos_token.is_some() {
            self.eos_token = eos_token;
        }
        self.end_of_turn = self.detect_end_of_turn();
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Which built-in template this is, if any.
    pub fn builtin_kind(&self) -> Option<BuiltinTemplate> {
        self.builtin
    }

    /// Renders a conversation. `add_generation_prompt` appends the header that starts an
    /// assistant turn, as Hugging Face's `apply_chat_template` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template reads the tool definitions (`tools`) and an assistant's
    /// `tool_calls`. A template that never mentions them would render a tool-calling
    /// conversation without its calls, so such conversations are refused instead.
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tool_calls") && self.source.contains("tools")
    }

    /// [`render`](Self::render) with tool definitions (JSON text of a list, as
    /// `apply_chat_template(messages, tools=tools)` receives it) and the messages' tool calls,
    /// passed the way transformers passes them: `tools` (`none` without definitions), and per
    /// assistant message `tool_calls: [{"id"?, "type": "function", "function": {"name",
    /// "arguments": {…}}}]`. Fails when the conversation uses tools and the template cannot show
    /// them ([`supports_tools`](Self::supports_tools)).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&str>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Data(describe_error("chat template", &e)))?;
        let uses_tools = tools.is_some() || messages.iter().any(|m| !m.tool_calls.is_empty());
        if uses_tools && !self.supports_tools() {
            return Err(Error::Data(
                "the chat template does not support tool calls (it never reads `tools` and `tool_calls`), \
                 so the calls would be lost; use a model whose template does (Qwen2.5, Qwen3, Llama 3.1)"
                    .into(),
            ));
        }
        let tools_value = match tools {
            Some(text) => json_value("tools", text)?,
            None => Value::from(()),
        };
        let content_bytes: usize = messages
            .iter()
            .map(|m| {
                m.content.len()
                    + m.reasoning_content.as_ref().map_or(0, String::len)
                    + m.tool_calls.iter().map(|c| c.arguments.len()).sum::<usize>()
            })
            .sum::<usize>()
            + tools.map_or(0, str::len);
        let limit_bytes = OUTPUT_SLACK_BYTES.saturating_add(content_bytes.saturating_mul(OUTPUT_CONTENT_FACTOR));
        let mut message_values: Vec<Value> = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let mut pairs = vec![
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(&m.content)),
            ];
            if !m.tool_calls.is_empty() {
                let mut calls = Vec::with_capacity(m.tool_calls.len());
                for call in &m.tool_calls {
                    let arguments = json_value(&format!("message {} tool call arguments", i + 1), &call.arguments)?;
                    let function = Value::from_pairs([("name", Value::from(&call.name)), ("arguments", arguments)]);
                    let mut call_pairs = vec![];
                    if let Some(id) = &call.id {
                        call_pairs.push(("id", Value::from(id)));
                    }
                    call_pairs.push(("type", Value::from("function")));
                    call_pairs.push(("function", function));
                    calls.push(Value::from_pairs(call_pairs));
                }
                pairs.push(("tool_calls", Value::from(calls)));
            }
            if let Some(id) = &m.tool_call_id {
                pairs.push(("tool_call_id", Value::from(id)));
            }
            if let Some(r) = &m.reasoning_content {
                pairs.push(("reasoning_content", Value::from(r)));
            }
            message_values.push(Value::from_pairs(pairs));
        }
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(message_values)),
            ("tools", tools_value),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token", Value::from(bos)));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token", Value::from(eos)));
        }
        for (name, value) in &self.variables {
            ctx.push((name.as_str(), json_value("template variable", &value.to_string())?));
        }
        let mut out = LimitedBuffer {
            bytes: Vec::new(),
            limit_bytes,
            exceeded: false,
        };
        let result = template.render_captured_to(Value::from_pairs(ctx), &mut out);
        if out.exceeded {
            return Err(Error::Data(format!(
                "chat template output exceeds {limit_bytes} bytes (the limit for {content_bytes} bytes of messages); \
                 the template is broken or hostile"
            )));
        }
        if let Err(err) = result {
            return Err(Error::Data(describe_error("chat template", &err)));
        }
        String::from_utf8(out.bytes).map_err(|_| Error::Data("chat template produced invalid UTF-8".into()))
    }

    /// The end-of-turn marker after an assistant message (`<|im_end|>`, `<|eot_id|>`, `</s>`,
    /// `<end_of_turn>`), found by rendering a probe conversation: it is whatever the template
    /// writes between the assistant's content and the end of the turn, without trailing
    /// whitespace. `None` when the template writes nothing there (e.g. Alpaca without an
    /// `eos_token`), in which case a tuned model will not learn to stop.
    pub fn end_of_turn(&self) -> Option<String> {
        self.end_of_turn.clone()
    }

    fn detect_end_of_turn(&self) -> Option<String> {
        const USER: &str = "FinchProbeQuestion";
        const ANSWER: &str = "FinchProbeAnswer";
        let probes = [
            vec![Message::new(Role::User, USER), Message::new(Role::Assistant, ANSWER)],
            vec![
                Message::new(Role::System, "FinchProbeSystem"),
                Message::new(Role::User, USER),
                Message::new(Role::Assistant, ANSWER),
            ],
        ];
        for probe in &probes {
            let Ok(text) = self.render(probe, false) else { continue };
            let Some(at) = text.rfind(ANSWER) else { continue };
            let mut after = text[at + ANSWER.len()..].trim_end();
            // Phi-3's templates close every conversation with `eos_token` whatever its last
            // turn: that token ends the text, not the assistant's turn (`<|end|>` does), so it is
            // not part of the marker when a conversation ending with a user turn gets it too.
            if let Some(eos) = self.eos_token().filter(|e| !e.is_empty()) {
                let user_only = self.render(&probe[..probe.len() - 1], false).unwrap_or_default();
                if let Some(rest) = after.strip_suffix(eos) {
                    if !rest.trim_end().is_empty() && user_only.trim_end().ends_with(eos) {
                        after = rest.trim_end();
                    }
                }
            }
            // A marker is what closes the turn, not the start of something else the template
            // appends (no real template appends text after the last assistant turn).
            return (!after.is_empty()).then(|| after.to_string());
        }
        None
    }
}

/// JSON text (tool definitions, call arguments) as a template value, keys in their written order.
fn json_value(what: &str, text: &str) -> Result<Value> {
    OrderedJson::parse(text)
        .map(|json| json.to_value())
        .map_err(|e| Error::Data(format!("{what}: not valid JSON: {e}")))
}

/// `bos_token` and `eos_token` of a model folder's `tokenizer_config.json` (or of that file
/// given directly), for giving a built-in template the model's own tokens. A missing file gives
/// `(None, None)`.
pub fn special_tokens_from_config(path: &Path) -> Result<(Option<String>, Option<String>)> {
    let config_path = if path.is_dir() {
        path.join("tokenizer_config.json")
    } else {
        path.to_path_buf()
    };
    if !config_path.is_file() {
        return Ok((None, None));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, "cannot read", e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(&config_path, "tokenizer config", format!("not valid JSON: {e}")))?;
    Ok((special_token(&config, "bos_token"), special_token(&config, "eos_token")))
}

/// Reads a special token that may be a plain string or an AddedToken object.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A minijinja environment configured like transformers' `ImmutableSandboxedEnvironment`.
/// `clock` pins the moment `strftime_now` formats (Unix seconds); `None` is the current time.
fn sandboxed_environment(source: &str, clock: Option<i64>) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    // minijinja's debug mode defaults to `cfg!(debug_assertions)`: without it a release build's
    // render errors (`raise_exception`, undefined values) carry no line, and the message cannot
    // point the user at the template line to fix.
    env.set_debug(true);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Data(describe_error("chat template syntax", &e)))?;
    env.set_syntax(syntax);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(pyrepr::python_formatter);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {message}"),
            ))
        },
    );
    env.add_function("strftime_now", move |format: String| -> String {
        match clock {
            Some(secs) => strftime::strftime_utc(&format, secs),
            None => strftime::strftime_now(&format),
        }
    });
    env.add_filter("tojson", |value: Value, kwargs: Kwargs| pyjson::tojson(&value, &kwargs));
    env.add_template_owned(TEMPLATE_NAME, source.to_string())
        .map_err(|e| Error::Data(describe_error("chat template does not compile", &e)))?;
    Ok(env)
}

/// "what: line N: detail" from a minijinja error, for compile and render failures alike.
fn describe_error(what: &str, err: &minijinja::Error) -> String {
    let detail = err.detail().map(String::from).unwrap_or_else(|| err.kind().to_string());
    let detail = match err.kind() {
        ErrorKind::OutOfFuel => format!("{detail} (the template ran too long: it loops or is hostile)"),
        _ => detail,
    };
    let line_text = err.line().and_then(|line| {
        err.template_source()
            .and_then(|src| src.lines().nth(line.saturating_sub(1)))
            .map(|text| (line, text.trim().chars().take(120).collect::<String>()))
    });
    match line_text {
        Some((line, text)) if !text.is_empty() => format!("{what}: line {line}: {detail} (near `{text}`)"),
        Some((line, _)) => format!("{what}: line {line}: {detail}"),
        None => format!("{what}: {detail}"),
    }
}

/// A writer that fails once it would grow past `limit_bytes`, so a template cannot exhaust
/// memory through its output.
struct LimitedBuffer {
    bytes: Vec<u8>,
    limit_bytes: usize,
    exceeded: bool,
}

impl Write for LimitedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit_bytes {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output limit reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
