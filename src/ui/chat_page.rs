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

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use eframe::egui;
use serde::{Deserialize, Serialize};

use crate::data::votes;
use crate::data::{Message, Role};
use crate::generate::{
    chat, chat_with, with_adapter, ChatFormat, FinishReason, GenerateOptions, LoadedModel, SamplingParams,
};
use crate::model::quantized::QuantizedModel;
use crate::model::transformer::Transformer;
use crate::rng::Rng;

use super::app::App;
use super::widgets::knob_row;
use super::worker::{Job, PickPurpose, Stream};

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
    model: Arc<ChatModel>,
}

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
    /// Run folders with a finished adapter (from the Train page's history), plus added folders.
    adapters: Vec<(String, PathBuf)>,
    added: Vec<(String, PathBuf)>,
    history_seen: Vec<PathBuf>,
    base: Option<LoadedBase>,
    loading: Option<(PathBuf, Job<Result<ChatModel, String>>)>,
    /// A model path whose load failed: not retried until another model is opened.
    failed_path: Option<PathBuf>,
    cache: AdapterCache,
    pub turns: Vec<ChatTurn>,
    pub rounds: Vec<CompareRound>,
    saving_vote: Option<Job<Result<usize, String>>>,
    /// Votes in the votes file after the last save.
    pub votes_saved: Option<usize>,
    pub votes_path: Option<PathBuf>,
}

impl Default for ChatPage {
    fn default() -> Self {
        ChatPage {
            mode: ChatMode::Single,
            input: String::new(),
            chat_adapter: None,
            compare_adapters: BTreeSet::new(),
            adapter_text: String::new(),
            adapters: Vec::new(),
            added: Vec::new(),
            history_seen: Vec::new(),
            base: None,
            loading: None,
            failed_path: None,
            cache: Arc::new(Mutex::new(HashMap::new())),
            turns: Vec::new(),
            rounds: Vec::new(),
            saving_vote: None,
            votes_saved: None,
            votes_path: None,
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

    /// Runs with an adapter and added adapter folders: (name, folder).
    pub fn adapters(&self) -> impl Iterator<Item = &(String, PathBuf)> {
        self.adapters.iter().chain(self.added.iter())
    }

    fn adapter_name(&self, dir: &Path) -> String {
        self.adapters()
            .find(|(_, d)| d == dir)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| folder_name(dir))
    }

    /// The loaded base model for `path`, if it is loaded.
    pub(crate) fn base_for(&self, path: &Path) -> Option<Arc<ChatModel>> {
        self.base.as_ref().filter(|b| b.path == path).map(|b| b.model.clone())
    }
}

fn folder_name(dir: &Path) -> String {
    // A run's adapter folder is named `adapter`: the run's name says more.
    let named = if dir.file_name().is_some_and(|n| n == "adapter") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    named
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Starts one answer on its own thread: builds (or reuses) the adapter model, then streams.
fn spawn_answer(
    ctx: &egui::Context,
    base: Arc<ChatModel>,
    cache: AdapterCache,
    adapter: Option<PathBuf>,
    messages: Vec<Message>,
    opts: GenerateOptions,
    quantized: bool,
) -> Result<Stream<AnswerEvent>, String> {
    Stream::spawn("finch-chat-answer", ctx, move |send, cancel| {
        let done = |result: crate::error::Result<crate::generate::Generation>, quantized: bool| match result {
            Ok(g) => AnswerEvent::Done {
                finish: g.finish_reason,
                tokens: g.token_ids.len(),
                prompt_tokens: g.prompt_tokens,
                tokens_per_sec: g.decode_tokens_per_sec(),
                quantized,
            },
            Err(e) => AnswerEvent::Failed(format!("{e:#}")),
        };
        if let (true, Ok(q)) = (quantized, &base.quantized) {
            let mut q = q.fork();
            if let Some(path) = &adapter {
                if let Err(e) = q.set_adapter(path) {
                    send(AnswerEvent::Failed(format!(
                        "cannot load the adapter {}: {e:#}",
                        path.display()
                    )));
                    return;
                }
            }
            let result = chat_with(&mut q, &base.format, &messages, &opts, cancel, &mut |piece: &str| {
                send(AnswerEvent::Text(piece.to_string()))
            });
            send(done(result, true));
            return;
        }
        let adapted = match &adapter {
            None => None,
            Some(path) => {
                let cached = cache.lock().ok().and_then(|c| c.get(path).cloned());
                match cached {
                    Some(m) => Some(m),
                    None => match with_adapter(&base.model, path) {
                        Ok(m) => {
                            let m = Arc::new(m);
                            if let Ok(mut c) = cache.lock() {
                                c.insert(path.clone(), m.clone());
                            }
                            Some(m)
                        }
                        Err(e) => {
                            send(AnswerEvent::Failed(format!(
                                "cannot load the adapter {}: {e:#}",
                                path.display()
                            )));
                            return;
                        }
                    },
                }
            }
        };
        let model: &Transformer = adapted.as_deref().unwrap_or(&base.model);
        let result = chat(model, &base.format, &messages, &opts, cancel, &mut |piece: &str| {
            send(AnswerEvent::Text(piece.to_string()))
        });
        send(done(result, false));
    })
}

impl App {
    /// The single-model conversation (tests and the nav bar).
    pub fn chat_turns(&self) -> &[ChatTurn] {
        &self.chat.turns
    }

    /// The comparison rounds, oldest first.
    pub fn compare_rounds(&self) -> &[CompareRound] {
        &self.chat.rounds
    }

    pub fn is_generating(&self) -> bool {
        self.chat.is_generating()
    }

    /// True once the opened model is loaded for generation.
    pub fn chat_model_ready(&self) -> bool {
        self.models
            .card
            .as_ref()
            .is_some_and(|c| self.chat.base_for(&c.path).is_some())
    }

    /// (votes in the file, the file) after the last saved vote.
    pub fn votes_saved(&self) -> Option<(usize, &Path)> {
        Some((self.chat.votes_saved?, self.chat.votes_path.as_deref()?))
    }

    pub(crate) fn add_chat_adapter(&mut self, path: &Path) {
        self.chat.adapter_text = path.display().to_string();
        match crate::generate::resolve_adapter_dir(path) {
            Ok(_) => {
                let dir = path.to_path_buf();
                if !self.chat.adapters().any(|(_, d)| *d == dir) {
                    self.chat.added.push((folder_name(&dir), dir.clone()));
                }
                match self.chat.mode {
                    ChatMode::Single => self.chat.chat_adapter = Some(dir),
                    ChatMode::Compare => {
                        self.chat.compare_adapters.insert(dir);
                    }
                }
            }
            Err(e) => self.report(
                "Not an adapter folder",
                format!("{e:#}"),
                "Pick a run folder that finished training (it holds adapter/) or a PEFT adapter folder.",
            ),
        }
    }

    pub(crate) fn poll_chat(&mut self, ctx: &egui::Context) {
        self.refresh_adapter_list();
        // Load the opened model for generation when the Chat page needs it.
        if self.settings.page == super::app::Page::Chat {
            if let Some(card) = &self.models.card {
                let path = card.path.clone();
                let loaded = self.chat.base.as_ref().is_some_and(|b| b.path == path);
                let loading = self.chat.loading.as_ref().is_some_and(|(p, _)| *p == path);
                if !loaded && !loading && self.chat.failed_path.as_ref() != Some(&path) {
                    let spec = path.display().to_string();
                    let job = Job::spawn("finch-chat-load", ctx, move || {
                        LoadedModel::open(&spec)
                            .map(|m| {
                                let quantized =
                                    QuantizedModel::open(&m.files.path, &m.files.config).map_err(|e| format!("{e:#}"));
                                ChatModel {
                                    model: m.model,
                                    format: m.format,
                                    quantized,
                                }
                            })
                            .map_err(|e| format!("{e:#}"))
                    });
                    match job {
                        Ok(job) => self.chat.loading = Some((path, job)),
                        Err(e) => self.report("Cannot load the model for chat", e, "Restart Finch."),
                    }
                }
            }
        }
        if let Some((path, job)) = &mut self.chat.loading {
            if let Some(result) = job.poll() {
                let path = path.clone();
                self.chat.loading = None;
                match result {
                    Ok(model) => {
                        self.chat.base = Some(LoadedBase {
                            path,
                            model: Arc::new(model),
                        });
                        // Adapters built on the previous base must not be mixed with this one.
                        if let Ok(mut c) = self.chat.cache.lock() {
                            c.clear();
                        }
                    }
                    Err(e) => {
                        self.chat.failed_path = Some(path);
                        self.report(
                            "Cannot load the model for chat",
                            e,
                            "Chat needs a model with a chat template; open another model on the Models page.",
                        );
                    }
                }
            }
        }
        for t in &mut self.chat.turns {
            t.answer.poll();
        }
        for r in &mut self.chat.rounds {
            for a in &mut r.answers {
                a.poll();
            }
        }
        if let Some(job) = &mut self.chat.saving_vote {
            if let Some(result) = job.poll() {
                self.chat.saving_vote = None;
                match result {
                    Ok(n) => self.chat.votes_saved = Some(n),
                    Err(e) => self.report(
                        "Cannot save the vote",
                        e,
                        "Check that the runs folder (Settings page) is writable, then vote again.",
                    ),
                }
            }
        }
    }

    /// Keeps the adapter list in step with the Train page's run history (checked only when the
    /// history changes, so the UI thread does not touch the disk every frame).
    fn refresh_adapter_list(&mut self) {
        let dirs: Vec<PathBuf> = self.train.history().iter().map(|r| r.dir.clone()).collect();
        if dirs == self.chat.history_seen {
            return;
        }
        self.chat.adapters = self
            .train
            .history()
            .iter()
            .filter(|r| r.dir.join("adapter").join("adapter_config.json").is_file())
            .map(|r| (r.name.clone(), r.dir.clone()))
            .collect();
        self.chat.history_seen = dirs;
    }

    /// The conversation sent for the next answer: system prompt, earlier turns, the new message.
    fn conversation(&self, user: &str) -> Vec<Message> {
        let mut messages = vec![];
        let system = self.settings.chat.system.trim();
        if !system.is_empty() {
            messages.push(Message::new(Role::System, system.to_string()));
        }
        for t in &self.chat.turns {
            // A failed answer left nothing the model said.
            if t.answer.error.is_none() && t.answer.finish.is_some() {
                messages.push(Message::new(Role::User, t.user.clone()));
                messages.push(Message::new(Role::Assistant, t.answer.text.clone()));
            }
        }
        messages.push(Message::new(Role::User, user.to_string()));
        messages
    }

    /// Sends the typed message to the chosen model (or to every compared model).
    pub(crate) fn send_message(&mut self, ctx: &egui::Context) {
        let text = self.chat.input.trim().to_string();
        if text.is_empty() || self.chat.is_generating() {
            return;
        }
        let Some(card) = &self.models.card else {
            self.report(
                "No model is open",
                "Chat needs a base model.",
                "Open one on the Models page first.",
            );
            return;
        };
        let Some(base) = self.chat.base_for(&card.path) else {
            self.report(
                "The model is still loading",
                "The message was not sent.",
                "Wait until the page says the model is ready, then press Enter again.",
            );
            return;
        };
        let opts = self.settings.chat.options();
        if let Err(e) = opts.sampling.validate() {
            self.report(
                "Invalid sampling settings",
                format!("{e:#}"),
                "Fix the value in Sampling settings.",
            );
            return;
        }
        match self.chat.mode {
            ChatMode::Single => {
                let adapter = self.chat.chat_adapter.clone();
                let name = adapter
                    .as_deref()
                    .map(|a| self.chat.adapter_name(a))
                    .unwrap_or_else(|| "base".into());
                let messages = self.conversation(&text);
                let mut answer = Answer::new(name, adapter.clone());
                let quantized = self.settings.chat.quantized;
                match spawn_answer(ctx, base, self.chat.cache.clone(), adapter, messages, opts, quantized) {
                    Ok(stream) => answer.stream = Some(stream),
                    Err(e) => answer.error = Some(e),
                }
                self.chat.turns.push(ChatTurn { user: text, answer });
            }
            ChatMode::Compare => {
                let system = self.settings.chat.system.trim().to_string();
                let mut messages = vec![];
                if !system.is_empty() {
                    messages.push(Message::new(Role::System, system.clone()));
                }
                messages.push(Message::new(Role::User, text.clone()));
                let mut models: Vec<(String, Option<PathBuf>)> = vec![("base".into(), None)];
                for dir in &self.chat.compare_adapters {
                    models.push((self.chat.adapter_name(dir), Some(dir.clone())));
                }
                if models.len() < 2 {
                    self.report(
                        "Nothing to compare with",
                        "Compare needs at least one adapter next to the base model.",
                        "Tick a run below (or add an adapter folder), then send again.",
                    );
                    return;
                }
                let mut answers = vec![];
                for (name, adapter) in models {
                    let mut answer = Answer::new(name, adapter.clone());
                    let stream = spawn_answer(
                        ctx,
                        base.clone(),
                        self.chat.cache.clone(),
                        adapter,
                        messages.clone(),
                        opts.clone(),
                        self.settings.chat.quantized,
                    );
                    match stream {
                        Ok(stream) => answer.stream = Some(stream),
                        Err(e) => answer.error = Some(e),
                    }
                    answers.push(answer);
                }
                let blind = self.settings.chat.blind;
                let order = if blind {
                    blind_order(&text, self.chat.rounds.len(), answers.len())
                } else {
                    (0..answers.len()).collect()
                };
                self.chat.rounds.push(CompareRound {
                    prompt: text,
                    system,
                    answers,
                    order,
                    blind,
                    vote: None,
                });
            }
        }
        self.chat.input.clear();
    }

    /// Records a blind vote for `answers[chosen]` of the last round: one JSONL line per
    /// (chosen, rejected) pair, then the names are shown.
    pub(crate) fn vote(&mut self, ctx: &egui::Context, round: usize, chosen: usize) {
        let Some(r) = self.chat.rounds.get_mut(round) else {
            return;
        };
        if !r.can_vote() || self.chat.saving_vote.is_some() {
            return;
        }
        r.vote = Some(chosen);
        let answers: Vec<(&str, &str)> = r.answers.iter().map(|a| (a.model.as_str(), a.text.as_str())).collect();
        let records = votes::vote_records(&r.prompt, &r.system, &answers, chosen, &votes::now_rfc3339());
        let path = self.settings.runs_dir.join(votes::VOTES_FILE);
        self.chat.votes_path = Some(path.clone());
        let save = move || votes::append(&path, &records).map_err(|e| format!("{e:#}"));
        match Job::spawn("finch-save-votes", ctx, save) {
            Ok(job) => self.chat.saving_vote = Some(job),
            Err(e) => self.report("Cannot save the vote", e, "Restart Finch."),
        }
    }

    pub(crate) fn chat_page_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        if self.chat.is_generating() && ui.input(|i| i.key_pressed(egui::Key::Escape)) {
            self.chat.stop_all();
        }
        ui.heading("Chat");
        ui.add_space(6.0);
        self.chat_model_ui(ui, &ctx);
        ui.add_space(6.0);
        self.chat_settings_ui(ui);
        ui.add_space(8.0);
        match self.chat.mode {
            ChatMode::Single => self.conversation_ui(ui),
            ChatMode::Compare => self.rounds_ui(ui, &ctx),
        }
        ui.add_space(8.0);
        self.chat_input_ui(ui, &ctx);
    }

    fn chat_model_ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        let generating = self.chat.is_generating();
        ui.group(|ui| {
            ui.horizontal(|ui| {
                ui.label("Model");
                match &self.models.card {
                    None => {
                        ui.label(egui::RichText::new("none: open one on the Models page").weak());
                    }
                    Some(card) => {
                        ui.label(format!("{} ({})", card.name, card.family));
                        if self.chat.base_for(&card.path).is_some() {
                            ui.label(egui::RichText::new("ready").weak());
                        } else if self.chat.loading.is_some() {
                            ui.spinner();
                            ui.label("Loading the model…");
                        }
                    }
                }
            });
            ui.horizontal(|ui| {
                ui.add_enabled_ui(!generating, |ui| {
                    ui.selectable_value(&mut self.chat.mode, ChatMode::Single, "Chat with one model")
                        .on_hover_text("A conversation with the base model or one adapter.");
                    ui.selectable_value(&mut self.chat.mode, ChatMode::Compare, "Compare models")
                        .on_hover_text("One prompt, answered by the base model and every ticked adapter side by side.");
                });
                if self.chat.mode == ChatMode::Compare {
                    ui.checkbox(&mut self.settings.chat.blind, "Blind (A/B)").on_hover_text(
                        "Shuffles the columns and hides the model names until you vote; votes are saved for \
                         preference tuning.",
                    );
                }
            });
            let adapters: Vec<(String, PathBuf)> = self.chat.adapters().cloned().collect();
            ui.add_enabled_ui(!generating, |ui| match self.chat.mode {
                ChatMode::Single => {
                    ui.horizontal_wrapped(|ui| {
                        ui.label("Talk to");
                        ui.radio_value(&mut self.chat.chat_adapter, None, "Base model")
                            .on_hover_text("The opened model without any adapter.");
                        for (name, dir) in &adapters {
                            ui.radio_value(&mut self.chat.chat_adapter, Some(dir.clone()), name)
                                .on_hover_text(dir.display().to_string());
                        }
                    });
                }
                ChatMode::Compare => {
                    ui.horizontal_wrapped(|ui| {
                        ui.label("Compare the base model with");
                        if adapters.is_empty() {
                            ui.label(egui::RichText::new("no adapters yet: train a run or add a folder").weak());
                        }
                        for (name, dir) in &adapters {
                            let mut on = self.chat.compare_adapters.contains(dir);
                            if ui
                                .checkbox(&mut on, name)
                                .on_hover_text(dir.display().to_string())
                                .changed()
                            {
                                if on {
                                    self.chat.compare_adapters.insert(dir.clone());
                                } else {
                                    self.chat.compare_adapters.remove(dir);
                                }
                            }
                        }
                    });
                }
            });
            ui.horizontal(|ui| {
                let label = ui
                    .label("Adapter folder")
                    .on_hover_text("Any PEFT adapter folder or run folder, to add to the list above.");
                ui.add(
                    egui::TextEdit::singleline(&mut self.chat.adapter_text)
                        .hint_text("path to a run or adapter folder")
                        .desired_width(340.0),
                )
                .labelled_by(label.id);
                if ui.button("Browse…").clicked() {
                    let start = self.settings.runs_dir.clone();
                    self.start_pick(ctx, PickPurpose::ChatAdapter, Some(&start));
                }
                let typed = self.chat.adapter_text.trim().to_string();
                if ui
                    .add_enabled(!typed.is_empty(), egui::Button::new("Add"))
                    .on_hover_text("Adds this folder to the models you can talk to or compare.")
                    .clicked()
                {
                    self.add_chat_adapter(Path::new(&typed));
                }
            });
        });
    }

    fn chat_settings_ui(&mut self, ui: &mut egui::Ui) {
        // Whether the loaded model can run quantized, or why not.
        let quantized: Option<Result<(), String>> = self
            .chat
            .base
            .as_ref()
            .map(|b| b.model.quantized.as_ref().map(|_| ()).map_err(Clone::clone));
        let s = &mut self.settings.chat;
        ui.horizontal(|ui| {
            let available = matches!(quantized, Some(Ok(())));
            let tip = "Answer from the GGUF's own Q4_1/Q8_0 blocks with Finch's integer kernels: about 3x \
                       faster decoding and less memory, the same answers as the dequantized model. \
                       Adapters are applied unmerged.";
            ui.add_enabled(available, egui::Checkbox::new(&mut s.quantized, "Quantized (GGUF)"))
                .on_hover_text(tip)
                .on_disabled_hover_text(match &quantized {
                    Some(Err(e)) => format!("Not for this model: {e}"),
                    _ => "Available once a Q4_1/Q8_0 GGUF model is loaded.".to_string(),
                });
            if s.quantized && !available {
                ui.weak("(this model runs in f32)");
            }
        });
        let label = ui
            .label("System prompt")
            .on_hover_text("Instructions the model sees before the conversation; leave empty for none.");
        ui.add(
            egui::TextEdit::multiline(&mut s.system)
                .desired_rows(2)
                .desired_width(f32::INFINITY)
                .hint_text("e.g. You are a concise assistant."),
        )
        .labelled_by(label.id);
        egui::CollapsingHeader::new("Sampling settings")
            .id_salt("chat-sampling")
            .show(ui, |ui| {
                egui::Grid::new("chat-sampling-grid")
                    .num_columns(2)
                    .spacing([12.0, 6.0])
                    .show(ui, |ui| {
                        knob_row(
                            ui,
                            "Greedy",
                            "Always pick the most likely next token: the same answer every time.",
                            |ui| ui.checkbox(&mut s.greedy, ""),
                        );
                        let sampling = !s.greedy;
                        knob_row(
                            ui,
                            "Temperature",
                            "Higher values make unlikely words more likely: more varied, less focused answers.",
                            |ui| {
                                ui.add_enabled(
                                    sampling,
                                    egui::DragValue::new(&mut s.temperature).range(0.01..=2.0).speed(0.01),
                                )
                            },
                        );
                        knob_row(
                            ui,
                            "Top-p",
                            "Sample only from the most likely tokens whose probabilities add up to this.",
                            |ui| {
                                ui.add_enabled(
                                    sampling,
                                    egui::DragValue::new(&mut s.top_p).range(0.01..=1.0).speed(0.01),
                                )
                            },
                        );
                        knob_row(
                            ui,
                            "Top-k",
                            "Sample only from this many most likely tokens; 0 keeps all.",
                            |ui| ui.add_enabled(sampling, egui::DragValue::new(&mut s.top_k).range(0..=1000)),
                        );
                        knob_row(
                            ui,
                            "Min-p",
                            "Drop tokens less likely than this fraction of the most likely one; 0 keeps all.",
                            |ui| {
                                ui.add_enabled(
                                    sampling,
                                    egui::DragValue::new(&mut s.min_p).range(0.0..=1.0).speed(0.01),
                                )
                            },
                        );
                        knob_row(
                            ui,
                            "Repetition penalty",
                            "Above 1 discourages repeating tokens already in the conversation; 1 is off.",
                            |ui| {
                                ui.add(
                                    egui::DragValue::new(&mut s.repetition_penalty)
                                        .range(0.5..=2.0)
                                        .speed(0.01),
                                )
                            },
                        );
                        knob_row(
                            ui,
                            "Max new tokens",
                            "The longest answer, in tokens; generation stops there.",
                            |ui| ui.add(egui::DragValue::new(&mut s.max_new_tokens).range(1..=8192)),
                        );
                        knob_row(
                            ui,
                            "Seed",
                            "The same seed and settings reproduce the same sampled answer.",
                            |ui| ui.add_enabled(sampling, egui::DragValue::new(&mut s.seed)),
                        );
                        knob_row(
                            ui,
                            "Stop strings",
                            "Text that ends an answer when the model writes it; separate several with |.",
                            |ui| ui.add(egui::TextEdit::singleline(&mut s.stop).desired_width(240.0)),
                        );
                    });
            });
    }

    fn conversation_ui(&mut self, ui: &mut egui::Ui) {
        for t in &self.chat.turns {
            egui::Frame::new()
                .fill(ui.visuals().faint_bg_color)
                .inner_margin(8.0)
                .corner_radius(4.0)
                .show(ui, |ui| {
                    ui.label(egui::RichText::new("You").small().strong());
                    ui.label(&t.user);
                });
            ui.add_space(4.0);
            answer_ui(ui, &t.answer, &t.answer.model);
            ui.add_space(8.0);
        }
    }

    fn rounds_ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        let mut vote = None;
        let saving = self.chat.saving_vote.is_some();
        for (ri, r) in self.chat.rounds.iter().enumerate() {
            egui::Frame::new()
                .fill(ui.visuals().faint_bg_color)
                .inner_margin(8.0)
                .corner_radius(4.0)
                .show(ui, |ui| {
                    ui.label(egui::RichText::new("Prompt").small().strong());
                    ui.label(&r.prompt);
                });
            ui.add_space(4.0);
            ui.columns(r.order.len(), |cols| {
                for (col, ui) in cols.iter_mut().enumerate() {
                    answer_ui(ui, &r.answers[r.order[col]], &r.column_title(col));
                }
            });
            if r.can_vote() {
                ui.horizontal(|ui| {
                    for col in 0..r.order.len() {
                        let letter = column_letter(col);
                        let text = if r.order.len() == 2 {
                            format!("{letter} is better")
                        } else {
                            format!("{letter} is best")
                        };
                        if ui
                            .add_enabled(!saving, egui::Button::new(text))
                            .on_hover_text("Reveals the names and saves the preference to votes.jsonl.")
                            .clicked()
                        {
                            vote = Some((ri, r.order[col]));
                        }
                    }
                });
            }
            ui.add_space(8.0);
        }
        if let Some((round, chosen)) = vote {
            self.vote(ctx, round, chosen);
        }
        if let (Some(n), Some(path)) = (self.chat.votes_saved, &self.chat.votes_path) {
            let votes = if n == 1 { "vote" } else { "votes" };
            ui.label(format!("{n} {votes} saved in {}", path.display()));
        } else if saving {
            ui.label("Saving the vote…");
        }
    }

    fn chat_input_ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        let input_id = egui::Id::unique("finch-chat-input");
        // Enter sends and Shift+Enter adds a newline: take the plain Enter before the text field
        // sees it (it would insert a newline).
        let enter = ui.memory(|m| m.has_focus(input_id))
            && ui.input_mut(|i| !i.modifiers.shift && i.consume_key(egui::Modifiers::NONE, egui::Key::Enter));
        let generating = self.chat.is_generating();
        let ready = self.chat_model_ready();
        if enter && !generating {
            // Sent before the box is drawn, so it shows empty in this same frame.
            self.send_message(ctx);
        }
        let label = ui
            .label("Message")
            .on_hover_text("Enter sends, Shift+Enter starts a new line, Esc stops the answers being generated.");
        ui.add(
            egui::TextEdit::multiline(&mut self.chat.input)
                .id(input_id)
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text("Type a message; Enter sends, Shift+Enter for a new line"),
        )
        .labelled_by(label.id);
        let generating = self.chat.is_generating();
        let mut send = false;
        ui.horizontal(|ui| {
            let can_send = ready && !generating && !self.chat.input.trim().is_empty();
            let button = ui
                .add_enabled(can_send, egui::Button::new(egui::RichText::new("Send").size(16.0)))
                .on_hover_text("Sends the message (Enter).");
            if !ready {
                button.on_disabled_hover_text("Open a model on the Models page and wait until it is loaded.");
            } else if button.clicked() {
                send = true;
            }
            if generating {
                if ui
                    .button(egui::RichText::new("Stop").size(16.0))
                    .on_hover_text("Stops every answer being generated (Esc).")
                    .clicked()
                {
                    self.chat.stop_all();
                }
                ui.spinner();
            }
            if ui
                .add_enabled(!generating, egui::Button::new("New chat"))
                .on_hover_text("Clears the conversation and the comparisons; settings are kept.")
                .clicked()
            {
                self.chat.turns.clear();
                self.chat.rounds.clear();
            }
        });
        if generating {
            // Keep the growing answer and the Stop button in view.
            ui.scroll_to_cursor(Some(egui::Align::BOTTOM));
        }
        if send && ready && !generating {
            self.send_message(ctx);
        }
    }
}

/// An answer with its title and status line.
fn answer_ui(ui: &mut egui::Ui, answer: &Answer, title: &str) {
    ui.label(egui::RichText::new(title).small().strong());
    if answer.text.is_empty() && answer.is_streaming() {
        ui.spinner();
    } else {
        ui.add(egui::Label::new(&answer.text).selectable(true).wrap());
    }
    let status = answer.status_text();
    if answer.error.is_some() {
        ui.label(egui::RichText::new(status).small().color(ui.visuals().error_fg_color));
    } else {
        ui.label(egui::RichText::new(status).small().weak());
    }
}

#[cfg(test)]
mod tests {
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
