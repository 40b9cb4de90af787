//! The Chat page: streaming chat with the base model or a run's adapter (system prompt, sampling
//! controls, Stop / Esc), and Compare mode, where one prompt goes to the base model and every
//! selected adapter at once and the answers stream side by side. Compare can be blind (columns
//! shuffled and labelled A, B, … until the user votes); each vote is appended to
//! `<runs folder>/votes.jsonl` as (prompt, chosen, rejected) pairs ready for preference tuning.
//!
//! The base model is loaded once per opened model on a named thread and shared through an `Arc`;
//! adapter models are built from it on first use (unmerged, so they share the base weights) and
//! cached. Every answer streams on its own named thread and checks its cancel flag between tokens.
//! For a Q4_1/Q8_0 GGUF the quantized model is loaded too; with "Quantized (GGUF)" ticked each
//! answer forks it (shared weights, its own cache) and applies its adapter unmerged.

//!
//! `state.rs` holds the model load, the answer threads, sending and voting; `view.rs` draws the
//! page.

mod state;
mod view;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::generate::{ChatFormat, FinishReason, GenerateOptions, SamplingParams};
use crate::model::quantized::QuantizedModel;
use crate::model::transformer::Transformer;
use crate::rng::Rng;

use super::worker::{Job, Stream};

/// The chat settings that persist between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatSettings {
    pub system: String,
    /// Always pick the most likely token (temperature and the filters are then unused).
    pub greedy: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Strings that end an answer, separated by `|`.
    pub stop: String,
    /// Compare mode hides which model wrote which answer until the user votes.
    pub blind: bool,
    /// Answer from the GGUF's own Q4_1/Q8_0 blocks (integer kernels: ~3x faster decoding, the
    /// same answers); only for such GGUF models.
    pub quantized: bool,
    /// Where the f32 model answers (`auto`: the first usable GPU, else the CPU); the quantized
    /// path always runs on the CPU.
    pub device: crate::device::DeviceChoice,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            system: String::new(),
            greedy: true,
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_new_tokens: 256,
            seed: 0,
            stop: String::new(),
            blind: false,
            quantized: false,
            device: crate::device::DeviceChoice::Auto,
        }
    }
}

impl ChatSettings {
    /// The engine's options for these settings (greedy means temperature 0).
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            sampling: SamplingParams {
                temperature: if self.greedy { 0.0 } else { self.temperature },
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            max_new_tokens: self.max_new_tokens.max(1),
            stop: self
                .stop
                .split('|')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            ignore_eos: false,
        }
    }
}

/// What an answer thread sends.
#[derive(Debug, Clone)]
pub enum AnswerEvent {
    /// The next piece of the answer's text.
    Text(String),
    Done {
        finish: FinishReason,
        tokens: usize,
        prompt_tokens: usize,
        tokens_per_sec: f64,
        /// Whether the GGUF's quantized blocks answered (else the f32 weights).
        quantized: bool,
    },
    Failed(String),
}

/// One model's answer, streaming or done.
pub struct Answer {
    /// "base" or the adapter's run name.
    pub model: String,
    /// `None` for the base model.
    pub adapter: Option<PathBuf>,
    pub text: String,
    /// Set once the answer ended (eos, stop, length or cancelled).
    pub finish: Option<FinishReason>,
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub tokens_per_sec: f64,
    /// Answered by the quantized path.
    pub quantized: bool,
    pub error: Option<String>,
    stream: Option<Stream<AnswerEvent>>,
}

impl Answer {
    fn new(model: String, adapter: Option<PathBuf>) -> Self {
        Answer {
            model,
            adapter,
            text: String::new(),
            finish: None,
            tokens: 0,
            prompt_tokens: 0,
            tokens_per_sec: 0.0,
            quantized: false,
            error: None,
            stream: None,
        }
    }

    pub fn is_streaming(&self) -> bool {
        self.stream.is_some()
    }

    fn cancel(&self) {
        if let Some(s) = &self.stream {
            s.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Applies the events that arrived; true when the answer just ended.
    fn poll(&mut self) -> bool {
        let Some(stream) = &mut self.stream else {
            return false;
        };
        for event in stream.drain() {
            match event {
                AnswerEvent::Text(piece) => self.text.push_str(&piece),
                AnswerEvent::Done {
                    finish,
                    tokens,
                    prompt_tokens,
                    tokens_per_sec,
                    quantized,
                } => {
                    self.finish = Some(finish);
                    self.tokens = tokens;
                    self.prompt_tokens = prompt_tokens;
                    self.tokens_per_sec = tokens_per_sec;
                    self.quantized = quantized;
                }
                AnswerEvent::Failed(e) => self.error = Some(e),
            }
        }
        if stream.is_finished() {
            self.stream = None;
            if self.finish.is_none() && self.error.is_none() {
                self.error = Some("the generation thread ended without an answer".into());
            }
            return true;
        }
        false
    }

    /// One line under the answer: why it ended, its length and speed.
    pub fn status_text(&self) -> String {
        if let Some(e) = &self.error {
            return format!("failed: {e}");
        }
        match self.finish {
            None => "generating…".into(),
            Some(f) => {
                let why = match f {
                    FinishReason::Eos => "finished (end of turn)",
                    FinishReason::Stop => "finished (stop string)",
                    FinishReason::Length => "finished (token limit)",
                    FinishReason::Cancelled => "stopped",
                };
                let path = if self.quantized { " · quantized" } else { "" };
                format!(
                    "{why} · {} tokens · {:.1} tokens/s{path}",
                    self.tokens, self.tokens_per_sec
                )
            }
        }
    }
}

/// One exchange of the single-model chat.
pub struct ChatTurn {
    pub user: String,
    pub answer: Answer,
}

/// One prompt answered by several models side by side.
pub struct CompareRound {
    pub prompt: String,
    pub system: String,
    /// Base first, then the selected adapters.
    pub answers: Vec<Answer>,
    /// Display order: column `i` shows `answers[order[i]]`.
    pub order: Vec<usize>,
    pub blind: bool,
    /// The answer (index into `answers`) the user voted for.
    pub vote: Option<usize>,
}

impl CompareRound {
    /// The title of display column `col`: the model's name, or its letter while blind.
    pub fn column_title(&self, col: usize) -> String {
        let answer = &self.answers[self.order[col]];
        if !self.blind {
            return answer.model.clone();
        }
        let letter = column_letter(col);
        match self.vote {
            None => letter,
            Some(v) if v == self.order[col] => format!("{letter}: {} (chosen)", answer.model),
            Some(_) => format!("{letter}: {}", answer.model),
        }
    }

    pub fn is_streaming(&self) -> bool {
        self.answers.iter().any(Answer::is_streaming)
    }

    /// Votes make sense once every answer is complete.
    fn can_vote(&self) -> bool {
        self.blind
            && self.vote.is_none()
            && self.answers.len() >= 2
            && self.answers.iter().all(|a| a.finish.is_some() && a.error.is_none())
    }
}

/// `0` → "A", `25` → "Z", `26` → "AA".
fn column_letter(col: usize) -> String {
    let mut n = col;
    let mut s = String::new();
    loop {
        s.insert(0, (b'A' + (n % 26) as u8) as char);
        if n < 26 {
            return s;
        }
        n = n / 26 - 1;
    }
}

/// The blind column order for a prompt: a shuffle seeded by the prompt and the round's number,
/// so a replay of the same session shows the same order.
pub fn blind_order(prompt: &str, round: usize, columns: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..columns).collect();
    Rng::derive(round as u64, prompt).shuffle(&mut order);
    order
}

/// Single-model chat or side-by-side comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatMode {
    Single,
    Compare,
}

/// What generation needs of a loaded model. (`LoadedModel` also holds the open weight files,
/// which cannot move between threads; only these two parts do.)
pub struct ChatModel {
    pub model: Transformer,
    pub format: ChatFormat,
    /// The same GGUF run by the integer kernels, or why it cannot be (not a GGUF, unsupported
    /// layout). Answers fork it: weights are shared, each answer has its own cache.
    pub quantized: std::result::Result<QuantizedModel, String>,
}

/// The base model as loaded for generation, and which model path it came from.
struct LoadedBase {
    path: PathBuf,
    /// The device choice it was loaded for: another choice reloads it.
    device: crate::device::DeviceChoice,
    model: Arc<ChatModel>,
}

/// A model load in flight: for which path, on which device choice.
type Loading = (PathBuf, crate::device::DeviceChoice, Job<Result<ChatModel, String>>);

type AdapterCache = Arc<Mutex<HashMap<PathBuf, Arc<Transformer>>>>;

/// State of the Chat page.
pub struct ChatPage {
    pub mode: ChatMode,
    /// The message being typed.
    pub input: String,
    /// The adapter the single-model chat talks to (`None`: the base model).
    pub chat_adapter: Option<PathBuf>,
    /// Adapters compared with the base model.
    pub compare_adapters: BTreeSet<PathBuf>,
    /// An adapter folder typed or browsed, before it is added to the list.
    pub adapter_text: String,
    base: Option<LoadedBase>,
    loading: Option<Loading>,
    /// A model path whose load failed: not retried until another model is opened.
    failed_path: Option<(PathBuf, crate::device::DeviceChoice)>,
    cache: AdapterCache,
    pub turns: Vec<ChatTurn>,
    pub rounds: Vec<CompareRound>,
    saving_vote: Option<Job<Result<usize, String>>>,
    /// Votes in the votes file after the last save (or found there from earlier sessions).
    pub votes_saved: Option<usize>,
    pub votes_path: Option<PathBuf>,
    /// The votes file of the runs folder being counted on a background thread, and the one
    /// counted last: votes from earlier sessions offer "Train on my votes" too.
    counting_votes: Option<Job<Result<usize, String>>>,
    votes_counted_for: Option<PathBuf>,
}

impl Default for ChatPage {
    fn default() -> Self {
        ChatPage {
            mode: ChatMode::Single,
            input: String::new(),
            chat_adapter: None,
            compare_adapters: BTreeSet::new(),
            adapter_text: String::new(),
            base: None,
            loading: None,
            failed_path: None,
            cache: Arc::new(Mutex::new(HashMap::new())),
            turns: Vec::new(),
            rounds: Vec::new(),
            saving_vote: None,
            votes_saved: None,
            votes_path: None,
            counting_votes: None,
            votes_counted_for: None,
        }
    }
}

impl ChatPage {
    /// True while any answer streams.
    pub fn is_generating(&self) -> bool {
        self.turns.iter().any(|t| t.answer.is_streaming()) || self.rounds.iter().any(CompareRound::is_streaming)
    }

    /// Asks every streaming answer to stop after its current token.
    pub fn stop_all(&self) {
        for t in &self.turns {
            t.answer.cancel();
        }
        for r in &self.rounds {
            r.answers.iter().for_each(Answer::cancel);
        }
    }

    /// The loaded base model for `path`, if it is loaded.
    /// The loaded model for `path` on the device `device` asks for (after a device change the
    /// previous one no longer answers: the model is reloaded there first).
    pub(crate) fn base_for(&self, path: &Path, device: crate::device::DeviceChoice) -> Option<Arc<ChatModel>> {
        self.base
            .as_ref()
            .filter(|b| b.path == path && b.device == device)
            .map(|b| b.model.clone())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn thinking_blocks_are_split_from_the_reply() {
        use super::view::thinking_split;
        assert_eq!(
            thinking_split("<think>\n6*8 = 48\n</think>\n\n48"),
            (Some("6*8 = 48"), "48")
        );
        assert_eq!(thinking_split("<think>\nstill going"), (Some("still going"), ""));
        assert_eq!(thinking_split("<think>\n\n</think>\n\nHi"), (Some(""), "Hi"));
        assert_eq!(thinking_split("No <think> here"), (None, "No <think> here"));
    }

    // egui_kittest is not there under `--cfg finch_qemu` (Cargo.toml).
    #[cfg(not(finch_qemu))]
    #[test]
    fn a_thinking_block_is_folded_away_until_opened() {
        use egui_kittest::kittest::Queryable;
        let mut answer = super::Answer::new("base".into(), None);
        answer.text = "<think>\nsix times eight is forty-eight\n</think>\n\nThe answer is 48.".into();
        answer.finish = Some(crate::generate::FinishReason::Eos);
        let mut harness = egui_kittest::Harness::new_ui(move |ui| super::view::answer_ui(ui, &answer, "Base"));
        harness.run();
        assert!(harness.query_by_label("The answer is 48.").is_some());
        assert!(harness.query_by_label_contains("forty-eight").is_none());
        harness.get_by_label("Thinking").click();
        harness.run();
        assert!(harness.query_by_label_contains("forty-eight").is_some());
        assert!(harness.query_by_label_contains("<think>").is_none());
    }

    #[test]
    fn tool_calls_in_answers_are_found() {
        use super::view::tool_call_segments;
        let qwen = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        assert_eq!(
            tool_call_segments(qwen),
            [
                (false, "Let me check.\n"),
                (true, "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}")
            ]
        );
        let llama = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        assert_eq!(tool_call_segments(llama), [(true, llama)]);
        assert_eq!(tool_call_segments("<tool_call>\n{\"na"), [(true, "{\"na")]);
        assert_eq!(tool_call_segments("Just {words}."), [(false, "Just {words}.")]);
        assert_eq!(tool_call_segments("{\"a\": 1}"), [(false, "{\"a\": 1}")]);
    }

    use super::*;

    #[test]
    fn letters_and_blind_orders() {
        assert_eq!(column_letter(0), "A");
        assert_eq!(column_letter(25), "Z");
        assert_eq!(column_letter(26), "AA");
        let order = blind_order("What is 2+2?", 0, 4);
        assert_eq!(order, blind_order("What is 2+2?", 0, 4), "seeded by the prompt");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3], "a permutation");
        let differs = (0..8).any(|r| blind_order("What is 2+2?", r, 4) != order);
        assert!(differs, "later rounds get other orders");
    }

    #[test]
    fn settings_map_to_engine_options() {
        let mut s = ChatSettings {
            stop: " END | ### |".into(),
            ..ChatSettings::default()
        };
        let o = s.options();
        assert!(o.sampling.is_greedy());
        assert_eq!(o.stop, ["END", "###"]);
        s.greedy = false;
        assert_eq!(s.options().sampling.temperature, 0.7);
    }
}
