//! Probe prompts: a few fixed questions the trainer puts to the model before training, at every
//! evaluation and at the end, so the user can watch the answers change as the loss falls.
//!
//! Answers are greedy and come from the trainer's own model with its adapters unmerged (the
//! KV-cached forward of `generate`), so they show exactly the weights being trained. Greedy
//! decoding draws no random numbers and the cached forward runs without dropout, so probing
//! leaves the training RNG stream, and therefore the loss curve, untouched.

use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::data::{Message, Role};
use crate::error::Result;
use crate::generate::{chat, ChatFormat, FinishReason, GenerateOptions, SamplingParams};
use crate::model::Transformer;

/// The model's answer to one probe prompt at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    pub prompt: String,
    pub text: String,
    /// Generated tokens (without the end token).
    pub tokens: usize,
}

/// Answers every prompt greedily with at most `max_tokens` tokens each. `None` when `cancel` was
/// set during a generation: a cut-off answer would look like a real one on the timeline.
pub fn answer_probes(
    model: &Transformer,
    format: &ChatFormat,
    prompts: &[String],
    max_tokens: usize,
    cancel: &AtomicBool,
) -> Result<Option<Vec<ProbeAnswer>>> {
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: max_tokens,
        stop: vec![],
        ignore_eos: false,
    };
    let mut answers = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let messages = [Message::new(Role::User, prompt.as_str())];
        let generation = chat(model, format, &messages, &opts, cancel, &mut |_| {})?;
        if generation.finish_reason == FinishReason::Cancelled {
            return Ok(None);
        }
        answers.push(ProbeAnswer {
            prompt: prompt.clone(),
            text: generation.text,
            tokens: generation.token_ids.len(),
        });
    }
    Ok(Some(answers))
}
