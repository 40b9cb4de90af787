//! Turning an [`Example`] into token ids and a loss mask.
//!
//! Assistant spans are found by rendering, not by guessing at a template's syntax: for assistant
//! message `i`, the text the template writes for that turn is the difference between the
//! conversation up to message `i` and the conversation up to message `i - 1` with the generation
//! prompt added. That works for any template whose prefixes render as prefixes (all common
//! ones). When a template breaks that (e.g. it rewrites earlier turns once a later one exists),
//! the content string and the end-of-turn marker are located in the full rendering instead, and
//! a conversation that cannot be aligned either way is an error, never a silently wrong mask.
//!
//! What is trained in an assistant turn: its content and its end-of-turn marker (`<|im_end|>`,
//! `<|eot_id|>`, `</s>`, ...), so the tuned model learns to stop. Whitespace the template writes
//! after the marker (ChatML's `\n`) is not trained: the model stops generating at the marker and
//! never produces it. After the last trained turn nothing more is kept (no token there is a
//! target or context for one), so the last token of a chat example is its last end-of-turn
//! marker and the masked tokens of a single-turn example are exactly its prompt.
//!
//! Character spans are mapped to tokens through the tokenizer's offsets. Byte-level tokenizers
//! with `trim_offsets` shrink a whitespace-only token to an empty range at its end, so an empty
//! range at `p` counts as inside a span `(start, end]`; every other token counts when its range
//! overlaps the span.

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::data::{Example, LossOn, Message, Role, TokenizedExample};
use crate::error::{Error, Result};
use crate::template::ChatTemplate;

/// Tokenizes `ex` and marks which tokens carry loss; see the module docs for what is trained.
///
/// Special tokens written by the template are parsed as specials. The tokenizer's own
/// post-processor specials (a BOS that `add_special_tokens` would prepend) are added only when
/// the rendered text does not already start with them. Text examples train every token and end
/// with the template's `eos_token` when the tokenizer knows it. Examples longer than `seq_len`
/// tokens keep their first `seq_len` tokens and are marked `truncated`.
pub fn encode_example(
    ex: &Example,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    loss_on: LossOn,
    seq_len: usize,
) -> Result<TokenizedExample> {
    if seq_len == 0 {
        return Err(Error::config("seq_len", "must be at least 1 token"));
    }
    let mut out = match ex {
        Example::Text { text } => encode_text(text, template, tokenizer)?,
        Example::Chat { messages, tools } => encode_chat(messages, tools.as_deref(), template, tokenizer, loss_on)?,
        Example::Preference { .. } => encode_preference(ex, template, tokenizer, loss_on, usize::MAX)?.0,
    };
    if out.input_ids.len() > seq_len {
        out.input_ids.truncate(seq_len);
        out.loss_mask.truncate(seq_len);
        out.truncated = true;
    }
    Ok(out)
}

/// The training sequences of one example: a conversation is one sequence (cut to `seq_len`, as
/// [`encode_example`] does); raw text is cut into windows of `seq_len` tokens by
/// [`chunk_ranges`], each starting `seq_len - text_overlap` tokens after the previous one, so a
/// document longer than the sequence length is trained on whole. Every token of a text window
/// carries loss.
pub fn encode_for_training(
    ex: &Example,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    loss_on: LossOn,
    seq_len: usize,
    text_overlap: usize,
) -> Result<Vec<TokenizedExample>> {
    match ex {
        Example::Chat { .. } | Example::Preference { .. } => {
            Ok(vec![encode_example(ex, template, tokenizer, loss_on, seq_len)?])
        }
        Example::Text { text } => {
            let whole = encode_text(text, template, tokenizer)?;
            Ok(chunk_ranges(whole.len(), seq_len, text_overlap)?
                .into_iter()
                .map(|range| TokenizedExample {
                    input_ids: whole.input_ids[range.clone()].to_vec(),
                    loss_mask: whole.loss_mask[range].to_vec(),
                    truncated: false,
                })
                .collect())
        }
    }
}

/// The two sequences of a preference pair, `prompt + chosen` and `prompt + rejected`, each
/// rendered whole by the chat template. The loss mask covers the answer's assistant turns only
/// (content and end-of-turn marker, as in supervised training), never an assistant turn of the
/// prompt; [`LossOn::All`] marks every token instead. Each sequence keeps its first `seq_len`
/// tokens. Fails for an example that is not a preference pair.
pub fn encode_preference(
    ex: &Example,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    loss_on: LossOn,
    seq_len: usize,
) -> Result<(TokenizedExample, TokenizedExample)> {
    let Example::Preference {
        prompt,
        chosen,
        rejected,
        tools,
    } = ex
    else {
        return Err(Error::Data(
            "not a preference pair: DPO and ORPO train on rows with `chosen` and `rejected` answers".into(),
        ));
    };
    if seq_len == 0 {
        return Err(Error::config("seq_len", "must be at least 1 token"));
    }
    let side = |answer: &[Message], name: &str| -> Result<TokenizedExample> {
        let spans =
            answer_spans(prompt, answer, tools.as_deref(), template, loss_on == LossOn::All).map_err(|e| match e {
                Error::Data(reason) => Error::Data(format!("{name} answer: {reason}")),
                other => other,
            })?;
        let mut out = encode_spans(spans, tokenizer, loss_on == LossOn::All)?;
        if out.input_ids.len() > seq_len {
            out.input_ids.truncate(seq_len);
            out.loss_mask.truncate(seq_len);
            out.truncated = true;
        }
        Ok(out)
    };
    Ok((side(chosen, "chosen")?, side(rejected, "rejected")?))
}

/// The rendering of `prompt + answer` and the spans of the answer's assistant turns (the
/// prompt's own assistant turns are context), cut after the last one unless `keep_all`.
pub fn answer_spans(
    prompt: &[Message],
    answer: &[Message],
    tools: Option<&str>,
    template: &ChatTemplate,
    keep_all: bool,
) -> Result<AssistantSpans> {
    let messages = [prompt, answer].concat();
    let wanted: Vec<usize> = (prompt.len()..messages.len())
        .filter(|&i| messages[i].role == Role::Assistant)
        .collect();
    spans_of_turns(&messages, tools, template, &wanted, keep_all)
}

/// Windows of at most `seq_len` over `len` tokens, starting every `seq_len - overlap` tokens,
/// the last one ending at `len`: `1 + ceil((len - seq_len) / (seq_len - overlap))` windows when
/// `len > seq_len`, one otherwise.
pub fn chunk_ranges(len: usize, seq_len: usize, overlap: usize) -> Result<Vec<Range<usize>>> {
    if seq_len == 0 {
        return Err(Error::config("seq_len", "must be at least 1 token"));
    }
    if overlap >= seq_len {
        return Err(Error::config(
            "text_overlap",
            format!("{overlap} tokens of overlap must be fewer than seq_len = {seq_len}"),
        ));
    }
    let stride = seq_len - overlap;
    let mut out = vec![];
    let mut start = 0;
    loop {
        let end = (start + seq_len).min(len);
        out.push(start..end);
        if end >= len {
            return Ok(out);
        }
        start += stride;
    }
}

/// The character spans (in `rendered`) of the assistant turns that carry loss, and the rendered
/// text itself cut after the last of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssistantSpans {
    pub rendered: String,
    pub spans: Vec<Range<usize>>,
}

/// Renders `messages` and finds the trained span of each assistant turn (all of them, or only
/// the last for [`LossOn::LastTurn`]). For [`LossOn::All`] the spans are the same as for
/// [`LossOn::Assistant`]; the caller trains everything anyway.
pub fn assistant_spans(messages: &[Message], template: &ChatTemplate, loss_on: LossOn) -> Result<AssistantSpans> {
    assistant_spans_with_tools(messages, None, template, loss_on)
}

/// [`assistant_spans`] of a conversation with tool definitions (JSON text of a list). An
/// assistant turn that calls tools is trained like any other (its calls are what the model must
/// learn to write); tool results are masked like user turns.
pub fn assistant_spans_with_tools(
    messages: &[Message],
    tools: Option<&str>,
    template: &ChatTemplate,
    loss_on: LossOn,
) -> Result<AssistantSpans> {
    let assistant_indices: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::Assistant)
        .map(|(i, _)| i)
        .collect();
    let wanted: Vec<usize> = match loss_on {
        LossOn::LastTurn => assistant_indices.last().copied().into_iter().collect(),
        LossOn::Assistant | LossOn::All => assistant_indices,
    };
    spans_of_turns(messages, tools, template, &wanted, loss_on == LossOn::All)
}

/// The trained spans of the assistant messages `wanted` (indices into `messages`, ascending),
/// and the rendering cut after the last of them (or whole, with `keep_all`).
fn spans_of_turns(
    messages: &[Message],
    tools: Option<&str>,
    template: &ChatTemplate,
    wanted: &[usize],
    keep_all: bool,
) -> Result<AssistantSpans> {
    if messages.is_empty() {
        return Err(Error::Data("conversation has no messages".into()));
    }
    let full = template.render_with_tools(messages, tools, false)?;
    let marker = template.end_of_turn();
    let render =
        |msgs: &[Message], add_generation_prompt: bool| template.render_with_tools(msgs, tools, add_generation_prompt);
    let mut spans = Vec::with_capacity(wanted.len());
    let mut cursor = 0usize;
    for &i in wanted {
        let span = match span_by_prefix(messages, i, &render, &full, marker.as_deref())? {
            Some(span) if span.start >= cursor => span,
            _ if !messages[i].tool_calls.is_empty() => {
                span_by_header(messages, i, &render, &full, cursor, marker.as_deref())?
            }
            _ => span_by_search(&messages[i], i, &full, cursor, marker.as_deref())?,
        };
        cursor = span.end;
        spans.push(span);
    }
    let rendered = match spans.last() {
        Some(last) if !keep_all => full[..last.end].to_string(),
        _ => full,
    };
    Ok(AssistantSpans { rendered, spans })
}

/// Whether a rendered turn shows message `m`: its words, and the name of every tool it calls.
fn shows_message(turn: &str, m: &Message) -> bool {
    turn.contains(m.content.trim()) && m.tool_calls.iter().all(|c| turn.contains(c.name.as_str()))
}

/// The turn of message `i` as the difference of two prefix renderings, cut after its
/// end-of-turn marker. `None` when the template's prefixes are not prefixes of each other.
fn span_by_prefix(
    messages: &[Message],
    i: usize,
    render: &dyn Fn(&[Message], bool) -> Result<String>,
    full: &str,
    marker: Option<&str>,
) -> Result<Option<Range<usize>>> {
    // A template may legitimately refuse a prefix (e.g. one that requires a final assistant
    // turn); that only means this method does not apply.
    let Ok(prompt) = render(&messages[..i], true) else {
        return Ok(None);
    };
    let Ok(with_turn) = render(&messages[..=i], false) else {
        return Ok(None);
    };
    if !with_turn.starts_with(&prompt) || !full.starts_with(&with_turn) {
        return Ok(None);
    }
    let turn = &with_turn[prompt.len()..];
    // The turn must actually contain the words; a template that drops or rewrites them cannot
    // be trained on faithfully, and the fallback will report it.
    if !shows_message(turn, &messages[i]) {
        return Ok(None);
    }
    let end = match marker.and_then(|m| turn.rfind(m).map(|at| at + m.len())) {
        Some(end) => end,
        None => turn.len(),
    };
    Ok(Some(prompt.len()..prompt.len() + end))
}

/// Fallback for a turn that calls tools (and may have no text to search for): the turn starts
/// after the assistant header the generation prompt writes (found after `cursor`) and ends with
/// the end-of-turn marker. Templates that render the last assistant turn differently from the
/// others (Qwen3's empty think block) need this.
fn span_by_header(
    messages: &[Message],
    i: usize,
    render: &dyn Fn(&[Message], bool) -> Result<String>,
    full: &str,
    cursor: usize,
    marker: Option<&str>,
) -> Result<Range<usize>> {
    let not_aligned = |why: &str| {
        Error::Data(format!(
            "cannot align the chat template output with message {} (assistant tool call): {why}",
            i + 1
        ))
    };
    let open = render(&messages[..i], false)?;
    let prompt = render(&messages[..i], true)?;
    let header = prompt
        .strip_prefix(open.as_str())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| not_aligned("the generation prompt does not extend the conversation"))?;
    let start = full[cursor..]
        .find(header)
        .map(|at| cursor + at + header.len())
        .ok_or_else(|| not_aligned("its assistant header does not appear in the rendered text"))?;
    let end = match marker {
        Some(m) => full[start..]
            .find(m)
            .map(|at| start + at + m.len())
            .ok_or_else(|| not_aligned(&format!("no end-of-turn marker `{m}` after it")))?,
        None => full.len(),
    };
    if !shows_message(&full[start..end], &messages[i]) {
        return Err(not_aligned("its tool calls do not appear in its turn"));
    }
    Ok(start..end)
}

/// Fallback: the message's content (as written, or trimmed, as many templates `| trim` it)
/// found in the rendering after `cursor`, followed by the end-of-turn marker.
fn span_by_search(
    message: &Message,
    i: usize,
    full: &str,
    cursor: usize,
    marker: Option<&str>,
) -> Result<Range<usize>> {
    let not_aligned = |why: &str| {
        Error::Data(format!(
            "cannot align the chat template output with message {} (assistant): {why}",
            i + 1
        ))
    };
    let content = if full[cursor..].contains(message.content.as_str()) {
        message.content.as_str()
    } else {
        message.content.trim()
    };
    let start = full[cursor..]
        .find(content)
        .map(|at| cursor + at)
        .ok_or_else(|| not_aligned("its content does not appear in the rendered text"))?;
    let content_end = start + content.len();
    let end = match marker {
        Some(m) => full[content_end..]
            .find(m)
            .map(|at| content_end + at + m.len())
            .ok_or_else(|| not_aligned(&format!("no end-of-turn marker `{m}` after its content")))?,
        None => content_end,
    };
    Ok(start..end)
}

fn encode_chat(
    messages: &[Message],
    tools: Option<&str>,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    loss_on: LossOn,
) -> Result<TokenizedExample> {
    let spans = assistant_spans_with_tools(messages, tools, template, loss_on)?;
    encode_spans(spans, tokenizer, loss_on == LossOn::All)
}

/// Tokens of a rendering and their loss mask: the tokens inside `spans`, or every token
/// when `all`.
fn encode_spans(spans: AssistantSpans, tokenizer: &Tokenizer, all: bool) -> Result<TokenizedExample> {
    let AssistantSpans { rendered, spans } = spans;
    if !all && spans.is_empty() {
        return Err(Error::Data(
            "conversation has no assistant message, so no token would carry loss".into(),
        ));
    }
    let encoding = tokenizer
        .encode(rendered.as_str(), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids = encoding.get_ids();
    let offsets = encoding.get_offsets();
    let mut mask: Vec<bool> = if all {
        vec![true; ids.len()]
    } else {
        offsets
            .iter()
            .map(|&(start, end)| spans.iter().any(|span| token_in_span(start, end, span)))
            .collect()
    };
    let mut input_ids = ids.to_vec();
    let prefix = post_processor_prefix(tokenizer)?;
    if !prefix.is_empty() && !input_ids.starts_with(&prefix) {
        input_ids.splice(0..0, prefix.iter().copied());
        mask.splice(0..0, std::iter::repeat_n(all, prefix.len()));
    }
    Ok(TokenizedExample {
        input_ids,
        loss_mask: mask,
        truncated: false,
    })
}

fn token_in_span(start: usize, end: usize, span: &Range<usize>) -> bool {
    if start == end {
        span.start < start && start <= span.end
    } else {
        start < span.end && end > span.start
    }
}

fn encode_text(text: &str, template: &ChatTemplate, tokenizer: &Tokenizer) -> Result<TokenizedExample> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut input_ids = post_processor_prefix(tokenizer)?;
    input_ids.extend_from_slice(encoding.get_ids());
    if let Some(eos_id) = template.eos_token().and_then(|eos| tokenizer.token_to_id(eos)) {
        input_ids.push(eos_id);
    }
    let loss_mask = vec![true; input_ids.len()];
    Ok(TokenizedExample {
        input_ids,
        loss_mask,
        truncated: false,
    })
}

/// The special tokens the tokenizer's post-processor puts before a sequence when asked to add
/// special tokens (Llama-3's `<|begin_of_text|>`; nothing for byte-level ChatML tokenizers).
pub fn post_processor_prefix(tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let probe = "a";
    let with = tokenizer
        .encode(probe, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let without = tokenizer
        .encode(probe, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let (with, without) = (with.get_ids(), without.get_ids());
    if without.is_empty() || with.len() <= without.len() {
        return Ok(Vec::new());
    }
    Ok(with
        .windows(without.len())
        .position(|w| w == without)
        .map(|at| with[..at].to_vec())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests;
