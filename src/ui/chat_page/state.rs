//! The Chat page's work: loading the open model for generation, one named thread per answer,
//! sending the typed message, and saving blind votes through [`crate::data::votes`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eframe::egui;

use crate::data::votes;
use crate::data::{Message, Role};
use crate::generate::{chat, chat_with, with_adapter, GenerateOptions, LoadedModel};
use crate::model::quantized::QuantizedModel;
use crate::model::transformer::Transformer;

use super::{
    blind_order, AdapterCache, Answer, AnswerEvent, ChatMode, ChatModel, ChatPage, ChatTurn, CompareRound, LoadedBase,
};
use crate::ui::shared::{adapter_folder_name, Page, Shared};
use crate::ui::worker::{Job, Stream};

impl ChatPage {
    /// The single-model conversation (tests and the nav bar).
    pub fn turns(&self) -> &[ChatTurn] {
        &self.turns
    }

    /// The comparison rounds, oldest first.
    pub fn rounds(&self) -> &[CompareRound] {
        &self.rounds
    }

    /// True once the model open on the Models page is loaded for generation.
    pub fn model_ready(&self, shared: &Shared) -> bool {
        shared
            .model
            .as_ref()
            .is_some_and(|c| self.base_for(&c.path, shared.settings.chat.device).is_some())
    }

    /// (votes in the file, the file) after the last saved vote.
    pub fn votes_saved(&self) -> Option<(usize, &Path)> {
        Some((self.votes_saved?, self.votes_path.as_deref()?))
    }

    /// Adds an adapter folder (typed or picked) to the models to talk to or compare.
    pub fn add_adapter(&mut self, shared: &mut Shared, path: &Path) {
        self.adapter_text = path.display().to_string();
        match crate::generate::resolve_adapter_dir(path) {
            Ok(_) => {
                let dir = path.to_path_buf();
                shared.add_adapter(adapter_folder_name(&dir), dir.clone());
                match self.mode {
                    ChatMode::Single => self.chat_adapter = Some(dir),
                    ChatMode::Compare => {
                        self.compare_adapters.insert(dir);
                    }
                }
            }
            Err(e) => shared.report(
                "Not an adapter folder",
                format!("{e:#}"),
                "Pick a run folder that finished training (it holds adapter/) or a PEFT adapter folder.",
            ),
        }
    }

    pub fn poll(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        // Load the opened model for generation when the Chat page needs it.
        if shared.settings.page == Page::Chat {
            if let Some(card) = &shared.model {
                let path = card.path.clone();
                let device = shared.settings.chat.device;
                let loaded = self.base.as_ref().is_some_and(|b| b.path == path && b.device == device);
                let loading = self
                    .loading
                    .as_ref()
                    .is_some_and(|(p, d, _)| *p == path && *d == device);
                let failed = self
                    .failed_path
                    .as_ref()
                    .is_some_and(|(p, d)| *p == path && *d == device);
                if !loaded && !loading && !failed && !self.is_generating() {
                    let spec = path.display().to_string();
                    let job = Job::spawn("finch-chat-load", ctx, move || {
                        let on = device.open().map_err(|e| format!("{e:#}"))?;
                        LoadedModel::open_on(&spec, &on)
                            .map(|m| {
                                // Finch's integer kernels run on the CPU whatever the f32 model's device.
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
                        Ok(job) => self.loading = Some((path, device, job)),
                        Err(e) => shared.report("Cannot load the model for chat", e, "Restart Finch."),
                    }
                }
            }
        }
        if let Some((path, device, job)) = &mut self.loading {
            if let Some(result) = job.poll() {
                let (path, device) = (path.clone(), *device);
                self.loading = None;
                match result {
                    Ok(model) => {
                        self.base = Some(LoadedBase {
                            path,
                            device,
                            model: Arc::new(model),
                        });
                        // Adapters built on the previous base must not be mixed with this one.
                        if let Ok(mut c) = self.cache.lock() {
                            c.clear();
                        }
                    }
                    Err(e) => {
                        self.failed_path = Some((path, device));
                        shared.report(
                            "Cannot load the model for chat",
                            e,
                            "Chat needs a model with a chat template on a usable device: pick another device or open another model on the Models page.",
                        );
                    }
                }
            }
        }
        for t in &mut self.turns {
            t.answer.poll();
        }
        for r in &mut self.rounds {
            for a in &mut r.answers {
                a.poll();
            }
        }
        self.poll_earlier_votes(ctx, shared);
        if let Some(job) = &mut self.saving_vote {
            if let Some(result) = job.poll() {
                self.saving_vote = None;
                match result {
                    Ok(n) => self.votes_saved = Some(n),
                    Err(e) => shared.report(
                        "Cannot save the vote",
                        e,
                        "Check that the runs folder (Settings page) is writable, then vote again.",
                    ),
                }
            }
        }
    }

    /// The conversation sent for the next answer: system prompt, earlier turns, the new message.
    fn conversation(&self, shared: &Shared, user: &str) -> Vec<Message> {
        let mut messages = vec![];
        let system = shared.settings.chat.system.trim();
        if !system.is_empty() {
            messages.push(Message::new(Role::System, system.to_string()));
        }
        for t in &self.turns {
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
    pub fn send_message(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let text = self.input.trim().to_string();
        if text.is_empty() || self.is_generating() {
            return;
        }
        let Some(card) = &shared.model else {
            shared.report(
                "No model is open",
                "Chat needs a base model.",
                "Open one on the Models page first.",
            );
            return;
        };
        let Some(base) = self.base_for(&card.path, shared.settings.chat.device) else {
            shared.report(
                "The model is still loading",
                "The message was not sent.",
                "Wait until the page says the model is ready, then press Enter again.",
            );
            return;
        };
        let opts = shared.settings.chat.options();
        if let Err(e) = opts.sampling.validate() {
            shared.report(
                "Invalid sampling settings",
                format!("{e:#}"),
                "Fix the value in Sampling settings.",
            );
            return;
        }
        match self.mode {
            ChatMode::Single => {
                let adapter = self.chat_adapter.clone();
                let name = adapter
                    .as_deref()
                    .map(|a| shared.adapter_name(a))
                    .unwrap_or_else(|| "base".into());
                let messages = self.conversation(shared, &text);
                let mut answer = Answer::new(name, adapter.clone());
                let quantized = shared.settings.chat.quantized;
                match spawn_answer(ctx, base, self.cache.clone(), adapter, messages, opts, quantized) {
                    Ok(stream) => answer.stream = Some(stream),
                    Err(e) => answer.error = Some(e),
                }
                self.turns.push(ChatTurn { user: text, answer });
            }
            ChatMode::Compare => {
                let system = shared.settings.chat.system.trim().to_string();
                let mut messages = vec![];
                if !system.is_empty() {
                    messages.push(Message::new(Role::System, system.clone()));
                }
                messages.push(Message::new(Role::User, text.clone()));
                let mut models: Vec<(String, Option<PathBuf>)> = vec![("base".into(), None)];
                for dir in &self.compare_adapters {
                    models.push((shared.adapter_name(dir), Some(dir.clone())));
                }
                if models.len() < 2 {
                    shared.report(
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
                        self.cache.clone(),
                        adapter,
                        messages.clone(),
                        opts.clone(),
                        shared.settings.chat.quantized,
                    );
                    match stream {
                        Ok(stream) => answer.stream = Some(stream),
                        Err(e) => answer.error = Some(e),
                    }
                    answers.push(answer);
                }
                let blind = shared.settings.chat.blind;
                let order = if blind {
                    blind_order(&text, self.rounds.len(), answers.len())
                } else {
                    (0..answers.len()).collect()
                };
                self.rounds.push(CompareRound {
                    prompt: text,
                    system,
                    answers,
                    order,
                    blind,
                    vote: None,
                });
            }
        }
        self.input.clear();
    }

    /// Counts the votes a runs folder's votes file already holds (earlier sessions), once per
    /// runs folder, on a named thread; a file with votes offers "Train on my votes".
    fn poll_earlier_votes(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let path = shared.settings.runs_dir.join(votes::VOTES_FILE);
        if let Some(job) = &mut self.counting_votes {
            if let Some(result) = job.poll() {
                self.counting_votes = None;
                match result {
                    Ok(n) if n > 0 && self.votes_saved.is_none() => {
                        self.votes_saved = Some(n);
                        self.votes_path = self.votes_counted_for.clone();
                    }
                    Ok(_) => {}
                    Err(e) => shared.report(
                        "Cannot read the votes file",
                        e,
                        "Fix or move the file named, then open the Chat page again.",
                    ),
                }
            }
            return;
        }
        if self.votes_counted_for.as_ref() == Some(&path) || self.saving_vote.is_some() {
            return;
        }
        if self.votes_path.as_ref() != Some(&path) {
            // Another runs folder: its own votes, if any.
            self.votes_saved = None;
            self.votes_path = None;
        }
        self.votes_counted_for = Some(path.clone());
        let count = move || match path.try_exists() {
            Ok(false) => Ok(0),
            _ => votes::read(&path).map(|v| v.len()).map_err(|e| format!("{e:#}")),
        };
        match Job::spawn("finch-count-votes", ctx, count) {
            Ok(job) => self.counting_votes = Some(job),
            Err(e) => shared.report("Cannot read the votes file", e, "Restart Finch."),
        }
    }

    /// "Train on my votes": the votes file becomes the Train page's data, with DPO preselected,
    /// and the Train page opens.
    pub fn train_on_votes(&mut self, shared: &mut Shared, votes_path: &Path) {
        shared.requests.train_on = Some(votes_path.to_path_buf());
        shared.requests.train_method = Some(crate::train::Method::Dpo);
        shared.settings.page = crate::ui::shared::Page::Train;
    }

    /// Records a blind vote for `answers[chosen]` of the last round: one JSONL line per
    /// (chosen, rejected) pair, then the names are shown.
    pub fn vote(&mut self, ctx: &egui::Context, shared: &mut Shared, round: usize, chosen: usize) {
        let Some(r) = self.rounds.get_mut(round) else {
            return;
        };
        if !r.can_vote() || self.saving_vote.is_some() {
            return;
        }
        r.vote = Some(chosen);
        let answers: Vec<(&str, &str)> = r.answers.iter().map(|a| (a.model.as_str(), a.text.as_str())).collect();
        let records = votes::vote_records(&r.prompt, &r.system, &answers, chosen, &votes::now_rfc3339());
        let path = shared.settings.runs_dir.join(votes::VOTES_FILE);
        self.votes_path = Some(path.clone());
        let save = move || votes::append(&path, &records).map_err(|e| format!("{e:#}"));
        match Job::spawn("finch-save-votes", ctx, save) {
            Ok(job) => self.saving_vote = Some(job),
            Err(e) => shared.report("Cannot save the vote", e, "Restart Finch."),
        }
    }
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
