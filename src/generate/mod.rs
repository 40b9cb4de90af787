//! Text generation for chat, comparison and evaluation: a KV-cached forward over the same
//! weights the trainer uses (adapters stay unmerged, so one base in memory serves the base model
//! and any number of adapters), sampling, streaming, stop handling and context-length policy.
//!
//! A generation stops on the first of: an end token (the template's end-of-turn marker, the
//! template's `eos_token`, the config's EOS ids) → `eos`; a stop string → `stop` (the text is
//! cut before it); `max_new_tokens` or the model's context length → `length`; the cancel flag,
//! checked between tokens → `cancelled`.

pub mod adapter;
pub mod sampling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::{Message, Role};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::transformer::Transformer;
use crate::model::ModelFiles;
use crate::template::ChatTemplate;

pub use crate::model::decoder::{CachedTransformer, Decoder};
pub use adapter::{resolve_adapter_dir, with_adapter};
pub use sampling::{Sampler, SamplingParams};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Settings of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Keep going through end tokens (benchmarks that need a fixed answer length).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            stop: vec![],
            ignore_eos: false,
        }
    }
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    pub text: String,
    /// Generated token ids, without the end token that stopped the answer.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Time to run the prompt and produce the first token's logits.
    pub prefill_secs: f64,
    /// Time spent in the forwards of the generated tokens after the first.
    pub decode_secs: f64,
}

impl Generation {
    /// Decoding speed, the one tokens/s Finch reports for an answer: the tokens generated after
    /// the first, over the time their forwards took. The prompt's prefill (which yields the first
    /// token) is left out, so a long conversation does not make decoding look slower, and the
    /// figure matches `finch bench generate`'s `decode_tokens_per_sec`.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.token_ids.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// The text side of a model: tokenizer, chat template and which tokens end an answer.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub stop_token_ids: Vec<u32>,
    /// End markers that are not single tokens in this vocabulary.
    pub stop_strings: Vec<String>,
    /// Specials the tokenizer's post-processor puts first (Llama 3's BOS).
    prefix: Vec<u32>,
}

impl ChatFormat {
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate, cfg: &ModelConfig) -> Result<Self> {
        let mut stop_token_ids = cfg.eos_token_ids.clone();
        let mut stop_strings = vec![];
        for marker in [template.end_of_turn(), template.eos_token().map(str::to_string)]
            .into_iter()
            .flatten()
        {
            match tokenizer.token_to_id(&marker) {
                Some(id) => stop_token_ids.push(id),
                None => stop_strings.push(marker),
            }
        }
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        let prefix = crate::data::tokenize::post_processor_prefix(&tokenizer)?;
        Ok(ChatFormat {
            tokenizer,
            template,
            stop_token_ids,
            stop_strings,
            prefix,
        })
    }

    /// Tokenizer and template of opened model files; a model without a chat template is an error.
    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        let template = files.chat_template()?.ok_or_else(|| {
            Error::invalid(
                &files.path,
                "model",
                "it has no chat template (tokenizer_config.json `chat_template` or GGUF metadata)",
            )
        })?;
        Self::new(files.tokenizer.clone(), template, &files.config)
    }

    /// Token ids of `text` as the model sees them (template specials parsed as specials).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids();
        if !self.prefix.is_empty() && !ids.starts_with(&self.prefix) {
            return Ok([self.prefix.as_slice(), ids].concat());
        }
        Ok(ids.to_vec())
    }

    /// The prompt for the next assistant turn after `messages`.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.template.render(messages, true)?)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The prompt for `messages`, dropping the oldest turns (never the system message or the
    /// last message) until it leaves `reserve_tokens` of the `context_tokens` free. Returns the
    /// prompt and how many messages were dropped; errors when the last message alone is too long.
    pub fn fit_prompt(
        &self,
        messages: &[Message],
        context_tokens: usize,
        reserve_tokens: usize,
    ) -> Result<(Vec<u32>, usize)> {
        let budget = context_tokens
            .saturating_sub(reserve_tokens.min(context_tokens / 2))
            .max(1);
        let system: Vec<Message> = messages
            .iter()
            .take_while(|m| m.role == Role::System)
            .cloned()
            .collect();
        let rest = &messages[system.len()..];
        for drop in 0..rest.len().max(1) {
            let kept: Vec<Message> = system
                .iter()
                .chain(rest[drop.min(rest.len())..].iter())
                .cloned()
                .collect();
            // Keep a conversation starting with a user turn, as templates expect.
            if kept.len() > system.len() && kept[system.len()].role != Role::User && drop + 1 < rest.len() {
                continue;
            }
            let ids = self.encode_prompt(&kept)?;
            if ids.len() <= budget {
                return Ok((ids, drop));
            }
        }
        Err(Error::config(
            "prompt",
            format!(
                "the last message does not fit in the model's context of {context_tokens} tokens \
                 (with {} kept free for the answer); shorten it",
                reserve_tokens.min(context_tokens / 2)
            ),
        ))
    }
}

/// A base model (and its text side) loaded for generation, in f32 on the CPU.
pub struct LoadedModel {
    pub files: ModelFiles,
    pub model: Transformer,
    pub format: ChatFormat,
}

impl LoadedModel {
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_on(spec, &Device::Cpu)
    }

    /// The model in f32 on `device`.
    pub fn open_on(spec: &str, device: &Device) -> Result<Self> {
        let files = crate::hub::open_model(spec)?;
        let format = ChatFormat::from_files(&files)?;
        let model = files.load(DType::F32, device)?;
        Ok(LoadedModel { files, model, format })
    }
}

/// Runs `f` (a one-token decode step) with its matrix-vector products (Finch's own gemv,
/// `kernels::gemv`) split over [`crate::kernels::spin`]'s pool, whose workers spin between a
/// token's ~200 products instead of sleeping; the step's ~900 small ops stay on one thread (a
/// one-thread rayon pool, so no rayon worker wakes to compete for the cores). Measured on a
/// 2-core AMD EPYC (SmolLM2-135M f32, `bench generate`): 27.8 decode tokens/s on one thread, 46.5
/// on two with a rayon pool; on a 2-core Intel Xeon VM, where a sleeping rayon worker takes ~90 µs
/// to wake, the rayon pool gave 18–24 tokens/s on two threads (20.5 on one).
pub fn on_decode_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    crate::kernels::spin::without_rayon(f)
}

/// Generates an answer to `prompt` (token ids) with the f32 model. `on_text` receives the answer as it grows, in
/// pieces that never split a UTF-8 character and never show (part of) a stop string.
pub fn generate(
    model: &Transformer,
    format: &ChatFormat,
    prompt: &[u32],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    generate_with(
        &mut CachedTransformer::new(model),
        format,
        prompt,
        opts,
        cancel,
        on_text,
    )
}

/// [`generate`] for any [`Decoder`].
pub fn generate_with(
    model: &mut (dyn Decoder + Send),
    format: &ChatFormat,
    prompt: &[u32],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let context = model.context_len();
    if prompt.is_empty() {
        return Err(Error::config("prompt", "is empty"));
    }
    if prompt.len() >= context {
        return Err(Error::config(
            "prompt",
            format!(
                "{} tokens leave no room for an answer in the model's context of {context} tokens",
                prompt.len()
            ),
        ));
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let stops: Vec<&str> = opts
        .stop
        .iter()
        .chain(format.stop_strings.iter())
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    model.reset()?;
    let start = Instant::now();
    let mut logits = model.step(prompt)?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let mut decode_secs = 0.0;
    let mut seen = prompt.to_vec();
    let mut ids: Vec<u32> = vec![];
    let mut text = String::new();
    let mut emitted = 0;
    let finish = loop {
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        if ids.len() >= opts.max_new_tokens {
            break FinishReason::Length;
        }
        let mut row = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let token = sampler.sample(&mut row, &seen);
        if !opts.ignore_eos && format.stop_token_ids.contains(&token) {
            break FinishReason::Eos;
        }
        ids.push(token);
        seen.push(token);
        text = format.decode(&ids)?;
        if let Some(at) = stops.iter().filter_map(|s| text.find(s)).min() {
            text.truncate(at);
            if at > emitted {
                on_text(&text[emitted..]);
            }
            emitted = text.len();
            break FinishReason::Stop;
        }
        let safe = safe_prefix_len(&text, &stops);
        if safe > emitted {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        // The whole sequence (prompt + answer) stays within the context length.
        if ids.len() >= opts.max_new_tokens || prompt.len() + ids.len() >= context {
            break FinishReason::Length;
        }
        let t = Instant::now();
        logits = on_decode_pool(|| model.step(&[token]))?;
        decode_secs += t.elapsed().as_secs_f64();
    };
    if emitted < text.len() && finish != FinishReason::Stop {
        // Held back only because it might have become a stop string or a longer character.
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        text,
        token_ids: ids,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs,
    })
}

/// Answers the conversation `messages` (rendered with the chat template, oldest turns dropped
/// when it does not fit the context).
pub fn chat(
    model: &Transformer,
    format: &ChatFormat,
    messages: &[Message],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    chat_with(
        &mut CachedTransformer::new(model),
        format,
        messages,
        opts,
        cancel,
        on_text,
    )
}

/// [`chat`] for any [`Decoder`].
pub fn chat_with(
    model: &mut (dyn Decoder + Send),
    format: &ChatFormat,
    messages: &[Message],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let reserve = opts.max_new_tokens.max(1);
    let (prompt, _dropped) = format.fit_prompt(messages, model.context_len(), reserve)?;
    generate_with(model, format, &prompt, opts, cancel, on_text)
}

/// How much of `text` can be shown: not a trailing partial UTF-8 character (decoded as U+FFFD)
/// and not a suffix that could still grow into a stop string.
fn safe_prefix_len(text: &str, stops: &[&str]) -> usize {
    let mut end = text.len();
    while text[..end].ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text[..end].ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    end - hold
}

#[cfg(test)]
mod tests;
