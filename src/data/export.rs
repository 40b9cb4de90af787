//! Writing examples back out as records of a chosen format and file type: the inverse of
//! [`crate::data::load`], used to save edited datasets and to convert between formats.

use serde_json::{json, Map, Value};

use crate::data::load::{FieldMap, FileKind, Format};
use crate::data::meta::RowMeta;
use crate::data::{Example, Message, Role, ToolCall};
use crate::error::{Error, Result};

/// The record for `ex` in `format`, or `None` when the format cannot express it (a multi-turn
/// conversation as Alpaca, a conversation as raw text, raw text as a conversation).
pub fn to_record(ex: &Example, format: Format, fields: &FieldMap) -> Option<Value> {
    let (messages, tools) = match ex {
        Example::Text { text } => {
            return (format == Format::Text).then(|| single(&fields.text, Value::String(text.clone())));
        }
        Example::Chat { messages, tools } => (messages, tools),
        Example::Preference { .. } => {
            return if format == Format::Preference {
                preference_record(ex, fields)
            } else {
                None
            }
        }
    };
    // Only the messages layout has a place for an assistant's `reasoning_content`.
    if format != Format::Messages && messages.iter().any(|m| m.reasoning_content.is_some()) {
        return None;
    }
    let uses_tools = tools.is_some() || messages.iter().any(|m| m.role == Role::Tool);
    // Tool calls keep their arguments as the JSON text they were read as (key order intact).
    let call_text = |c: &ToolCall| {
        format!(
            "{{\"name\": {}, \"arguments\": {}}}",
            Value::String(c.name.clone()),
            c.arguments
        )
    };
    let sharegpt_message = |m: &Message| -> Option<Value> {
        let (from, value) = match (m.role, m.tool_calls.as_slice()) {
            (Role::System, _) => ("system", m.content.clone()),
            (Role::User, _) => ("human", m.content.clone()),
            (Role::Assistant, []) => ("gpt", m.content.clone()),
            // ShareGPT has no place for text next to a call.
            (Role::Assistant, _) if !m.content.is_empty() => return None,
            (Role::Assistant, [call]) => ("function_call", call_text(call)),
            (Role::Assistant, calls) => (
                "function_call",
                format!("[{}]", calls.iter().map(call_text).collect::<Vec<_>>().join(", ")),
            ),
            (Role::Tool, _) => ("observation", m.content.clone()),
        };
        Some(json!({"from": from, "value": value}))
    };
    let openai_message = |m: &Message| openai_message(m, fields);
    let message_objects = |msgs: &[Message], sharegpt: bool| -> Option<Value> {
        if sharegpt {
            msgs.iter()
                .map(sharegpt_message)
                .collect::<Option<Vec<_>>>()
                .map(Value::Array)
        } else {
            Some(Value::Array(msgs.iter().map(openai_message).collect()))
        }
    };
    let with_tools = |mut record: Value| {
        if let (Some(tools), Value::Object(o)) = (tools, &mut record) {
            o.insert(fields.tools.clone(), Value::String(tools.clone()));
        }
        record
    };
    if uses_tools && matches!(format, Format::Alpaca | Format::PromptCompletion) {
        return None;
    }
    match format {
        Format::Text | Format::Preference => None,
        Format::Messages => Some(with_tools(single(&fields.messages, message_objects(messages, false)?))),
        Format::ShareGpt => Some(with_tools(single(
            &fields.conversations,
            message_objects(messages, true)?,
        ))),
        Format::Alpaca => {
            let (system, rest) = match messages.split_first() {
                Some((first, rest)) if first.role == Role::System => (Some(first), rest),
                _ => (None, messages.as_slice()),
            };
            let [user, assistant] = rest else { return None };
            if user.role != Role::User || assistant.role != Role::Assistant {
                return None;
            }
            let mut o = Map::new();
            if let Some(system) = system {
                o.insert(fields.system.clone(), Value::String(system.content.clone()));
            }
            o.insert(fields.instruction.clone(), Value::String(user.content.clone()));
            o.insert(fields.output.clone(), Value::String(assistant.content.clone()));
            Some(Value::Object(o))
        }
        Format::PromptCompletion => {
            let (last, prompt) = messages.split_last()?;
            if last.role != Role::Assistant {
                return None;
            }
            let mut o = Map::new();
            match prompt {
                [user] if user.role == Role::User => {
                    o.insert(fields.prompt.clone(), Value::String(user.content.clone()));
                    o.insert(fields.completion.clone(), Value::String(last.content.clone()));
                }
                // TRL's conversational prompt/completion.
                _ => {
                    o.insert(fields.prompt.clone(), message_objects(prompt, false)?);
                    o.insert(
                        fields.completion.clone(),
                        message_objects(std::slice::from_ref(last), false)?,
                    );
                }
            }
            Some(Value::Object(o))
        }
    }
}

/// A preference pair as a record: plain strings (`system`, `prompt`, `chosen`, `rejected`, the
/// layout of `votes.jsonl`) when it is one user turn answered by one plain assistant turn, TRL's
/// conversational lists of messages otherwise.
fn preference_record(ex: &Example, fields: &FieldMap) -> Option<Value> {
    let Example::Preference {
        prompt,
        chosen,
        rejected,
        tools,
    } = ex
    else {
        return None;
    };
    let mut o = Map::new();
    let plain = |m: &[Message], role: Role| match m {
        [one] if one.role == role && one.tool_calls.is_empty() => Some(one.content.clone()),
        _ => None,
    };
    let (system, turns) = match prompt.split_first() {
        Some((first, rest)) if first.role == Role::System => (Some(first), rest),
        _ => (None, prompt.as_slice()),
    };
    let as_strings = (
        plain(turns, Role::User),
        plain(chosen, Role::Assistant),
        plain(rejected, Role::Assistant),
    );
    let list = |msgs: &[Message]| Value::Array(msgs.iter().map(|m| openai_message(m, fields)).collect());
    match as_strings {
        (Some(p), Some(c), Some(r)) if tools.is_none() => {
            if let Some(system) = system {
                o.insert(fields.system.clone(), Value::String(system.content.clone()));
            }
            o.insert(fields.prompt.clone(), Value::String(p));
            o.insert(fields.chosen.clone(), Value::String(c));
            o.insert(fields.rejected.clone(), Value::String(r));
        }
        _ => {
            o.insert(fields.prompt.clone(), list(prompt));
            o.insert(fields.chosen.clone(), list(chosen));
            o.insert(fields.rejected.clone(), list(rejected));
            if let Some(tools) = tools {
                o.insert(fields.tools.clone(), Value::String(tools.clone()));
            }
        }
    }
    Some(Value::Object(o))
}

/// One OpenAI / TRL `{role, content}` message, with its tool calls.
fn openai_message(m: &Message, fields: &FieldMap) -> Value {
    let mut o = Map::new();
    o.insert(fields.role.clone(), Value::String(m.role.as_str().into()));
    o.insert(fields.content.clone(), Value::String(m.content.clone()));
    if !m.tool_calls.is_empty() {
        let calls = m
            .tool_calls
            .iter()
            .map(|c| {
                let mut call = Map::new();
                if let Some(id) = &c.id {
                    call.insert("id".into(), Value::String(id.clone()));
                }
                call.insert("type".into(), Value::String("function".into()));
                call.insert("function".into(), json!({"name": c.name, "arguments": c.arguments}));
                Value::Object(call)
            })
            .collect();
        o.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &m.tool_call_id {
        o.insert("tool_call_id".into(), Value::String(id.clone()));
    }
    if let Some(r) = &m.reasoning_content {
        o.insert("reasoning_content".into(), Value::String(r.clone()));
    }
    Value::Object(o)
}

fn single(key: &str, value: Value) -> Value {
    let mut o = Map::new();
    o.insert(key.to_string(), value);
    Value::Object(o)
}

/// Serializes records as a file of `kind`. CSV gets a header with every key in first-seen order;
/// values that are not strings (message lists) are written as JSON text, which the loader reads
/// back. Parquet output is not supported.
pub fn write_records(records: &[Value], kind: FileKind) -> Result<Vec<u8>> {
    match kind {
        FileKind::Jsonl => {
            let mut out = Vec::new();
            for r in records {
                out.extend_from_slice(r.to_string().as_bytes());
                out.push(b'\n');
            }
            Ok(out)
        }
        FileKind::Json => {
            serde_json::to_vec_pretty(records).map_err(|e| Error::Data(format!("cannot write JSON: {e}")))
        }
        FileKind::Csv => {
            let mut header: Vec<String> = vec![];
            for r in records {
                if let Value::Object(o) = r {
                    for k in o.keys() {
                        if !header.contains(k) {
                            header.push(k.clone());
                        }
                    }
                }
            }
            let mut writer = csv::Writer::from_writer(Vec::new());
            let csv_err = |e: csv::Error| Error::Data(format!("cannot write CSV: {e}"));
            writer.write_record(&header).map_err(csv_err)?;
            for r in records {
                let cells: Vec<String> = header
                    .iter()
                    .map(|k| match r.get(k) {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                    })
                    .collect();
                writer.write_record(&cells).map_err(csv_err)?;
            }
            writer
                .into_inner()
                .map_err(|e| Error::Data(format!("cannot write CSV: {e}")))
        }
        FileKind::Parquet => Err(Error::Data("writing Parquet is not supported; save as JSONL".into())),
        FileKind::Text => Err(Error::Data(
            "writing raw text files is not supported; save as JSONL (the text format)".into(),
        )),
    }
}

/// Examples as a file of `kind` in `format`; fails naming the first example the format cannot
/// express.
pub fn write_examples<'a>(
    examples: impl IntoIterator<Item = &'a Example>,
    format: Format,
    kind: FileKind,
    fields: &FieldMap,
) -> Result<Vec<u8>> {
    let none = RowMeta::default();
    write_rows(examples.into_iter().map(|ex| (ex, &none)), format, kind, fields)
}

/// [`write_examples`] with each row's provenance and scores written beside its fields.
pub fn write_rows<'a>(
    rows: impl IntoIterator<Item = (&'a Example, &'a RowMeta)>,
    format: Format,
    kind: FileKind,
    fields: &FieldMap,
) -> Result<Vec<u8>> {
    let mut records = vec![];
    for (i, (ex, meta)) in rows.into_iter().enumerate() {
        let mut record = to_record(ex, format, fields).ok_or_else(|| {
            Error::Data(format!(
                "row {} cannot be written as {}: {}",
                i + 1,
                format.name(),
                match (ex, format) {
                    (Example::Text { .. }, _) => "it is raw text (use the text format)",
                    (Example::Preference { .. }, _) => "it is a preference pair (use the preference format)",
                    (_, Format::Preference) => "it is not a preference pair (it has no rejected answer)",
                    (_, Format::Text) => "it is a conversation (raw text holds no roles)",
                    (_, Format::Alpaca) => "Alpaca holds one user turn and one answer",
                    _ => "the conversation must end with an assistant turn",
                }
            ))
        })?;
        meta.write_into(&mut record);
        records.push(record);
    }
    write_records(&records, kind)
}
