//! Drawing the Chat page: the model and adapter choice, the system prompt and sampling knobs, the
//! conversation or the comparison rounds with their vote buttons, and the message box.

use std::path::{Path, PathBuf};

use eframe::egui;

use super::{column_letter, Answer, ChatMode, ChatPage, ChatSettings};
use crate::ui::shared::Shared;
use crate::ui::widgets::knob_row;
use crate::ui::worker::PickPurpose;

impl ChatPage {
    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        if self.is_generating() && ui.input(|i| i.key_pressed(egui::Key::Escape)) {
            self.stop_all();
        }
        ui.heading("Chat");
        ui.add_space(6.0);
        self.model_ui(ui, shared);
        ui.add_space(6.0);
        self.settings_ui(ui, shared);
        ui.add_space(8.0);
        match self.mode {
            ChatMode::Single => self.conversation_ui(ui),
            ChatMode::Compare => self.rounds_ui(ui, shared),
        }
        ui.add_space(8.0);
        self.input_ui(ui, shared);
    }

    fn model_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let generating = self.is_generating();
        ui.group(|ui| {
            ui.horizontal(|ui| {
                ui.label("Model");
                match &shared.model {
                    None => {
                        ui.label(egui::RichText::new("none: open one on the Models page").weak());
                    }
                    Some(card) => {
                        ui.label(format!("{} ({})", card.name, card.family));
                        if self.base_for(&card.path, shared.settings.chat.device).is_some() {
                            ui.label(egui::RichText::new("ready").weak());
                        } else if self.loading.is_some() {
                            ui.spinner();
                            ui.label("Loading the model…");
                        }
                    }
                }
            });
            ui.horizontal(|ui| {
                ui.add_enabled_ui(!generating, |ui| {
                    ui.selectable_value(&mut self.mode, ChatMode::Single, "Chat with one model")
                        .on_hover_text("A conversation with the base model or one adapter.");
                    ui.selectable_value(&mut self.mode, ChatMode::Compare, "Compare models")
                        .on_hover_text("One prompt, answered by the base model and every ticked adapter side by side.");
                });
                if self.mode == ChatMode::Compare {
                    ui.checkbox(&mut shared.settings.chat.blind, "Blind (A/B)")
                        .on_hover_text(
                            "Shuffles the columns and hides the model names until you vote; votes are saved for \
                         preference tuning.",
                        );
                }
            });
            let adapters: Vec<(String, PathBuf)> = shared.adapters().cloned().collect();
            ui.add_enabled_ui(!generating, |ui| match self.mode {
                ChatMode::Single => {
                    ui.horizontal_wrapped(|ui| {
                        ui.label("Talk to");
                        ui.radio_value(&mut self.chat_adapter, None, "Base model")
                            .on_hover_text("The opened model without any adapter.");
                        for (name, dir) in &adapters {
                            ui.radio_value(&mut self.chat_adapter, Some(dir.clone()), name)
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
                            let mut on = self.compare_adapters.contains(dir);
                            if ui
                                .checkbox(&mut on, name)
                                .on_hover_text(dir.display().to_string())
                                .changed()
                            {
                                if on {
                                    self.compare_adapters.insert(dir.clone());
                                } else {
                                    self.compare_adapters.remove(dir);
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
                    egui::TextEdit::singleline(&mut self.adapter_text)
                        .hint_text("path to a run or adapter folder")
                        .desired_width(340.0),
                )
                .labelled_by(label.id);
                if ui.button("Browse…").clicked() {
                    let start = shared.settings.runs_dir.clone();
                    shared.pick(PickPurpose::ChatAdapter, Some(&start));
                }
                let typed = self.adapter_text.trim().to_string();
                if ui
                    .add_enabled(!typed.is_empty(), egui::Button::new("Add"))
                    .on_hover_text("Adds this folder to the models you can talk to or compare.")
                    .clicked()
                {
                    self.add_adapter(shared, Path::new(&typed));
                }
            });
        });
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        // Whether the loaded model can run quantized, or why not.
        let quantized: Option<Result<(), String>> = self
            .base
            .as_ref()
            .map(|b| b.model.quantized.as_ref().map(|_| ()).map_err(Clone::clone));
        let s = &mut shared.settings.chat;
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
            ui.separator();
            let generating = self.is_generating();
            ui.add_enabled_ui(!generating, |ui| {
                ui.label("Device")
                    .on_hover_text("Where the f32 model answers; changing it reloads the model there. The quantized path runs on the CPU.");
                crate::ui::widgets::device_combo(ui, "chat-device", &mut s.device);
            });
            if let Some(b) = &self.base {
                ui.weak(format!("loaded on {}", crate::device::name(b.model.model.device())));
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
            .show(ui, |ui| sampling_ui(ui, s));
    }

    fn conversation_ui(&mut self, ui: &mut egui::Ui) {
        for t in &self.turns {
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

    fn rounds_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        let mut vote = None;
        let saving = self.saving_vote.is_some();
        for (ri, r) in self.rounds.iter().enumerate() {
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
            self.vote(&ctx, shared, round, chosen);
        }
        if let (Some(n), Some(path)) = (self.votes_saved, self.votes_path.clone()) {
            let votes = if n == 1 { "vote" } else { "votes" };
            ui.horizontal(|ui| {
                ui.label(format!("{n} {votes} saved in {}", path.display()));
                if ui
                    .button("Train on my votes")
                    .on_hover_text(
                        "Opens the Train page with the votes file as the data and DPO as the method: the adapter \
                         learns to prefer the answers you chose. Ties are skipped.",
                    )
                    .clicked()
                {
                    self.train_on_votes(shared, &path);
                }
            });
        } else if saving {
            ui.label("Saving the vote…");
        }
    }

    fn input_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        let input_id = egui::Id::unique("finch-chat-input");
        // Enter sends and Shift+Enter adds a newline: take the plain Enter before the text field
        // sees it (it would insert a newline).
        let enter = ui.memory(|m| m.has_focus(input_id))
            && ui.input_mut(|i| !i.modifiers.shift && i.consume_key(egui::Modifiers::NONE, egui::Key::Enter));
        let generating = self.is_generating();
        let ready = self.model_ready(shared);
        if enter && !generating {
            // Sent before the box is drawn, so it shows empty in this same frame.
            self.send_message(&ctx, shared);
        }
        let label = ui
            .label("Message")
            .on_hover_text("Enter sends, Shift+Enter starts a new line, Esc stops the answers being generated.");
        ui.add(
            egui::TextEdit::multiline(&mut self.input)
                .id(input_id)
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text("Type a message; Enter sends, Shift+Enter for a new line"),
        )
        .labelled_by(label.id);
        let generating = self.is_generating();
        let mut send = false;
        ui.horizontal(|ui| {
            let can_send = ready && !generating && !self.input.trim().is_empty();
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
                    self.stop_all();
                }
                ui.spinner();
            }
            if ui
                .add_enabled(!generating, egui::Button::new("New chat"))
                .on_hover_text("Clears the conversation and the comparisons; settings are kept.")
                .clicked()
            {
                self.turns.clear();
                self.rounds.clear();
            }
        });
        if generating {
            // Keep the growing answer and the Stop button in view.
            ui.scroll_to_cursor(Some(egui::Align::BOTTOM));
        }
        if send && ready && !generating {
            self.send_message(&ctx, shared);
        }
    }
}

/// The sampling knobs; temperature and the filters are greyed out while greedy.
fn sampling_ui(ui: &mut egui::Ui, s: &mut ChatSettings) {
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
}

/// An answer with its title and status line.
pub(super) fn answer_ui(ui: &mut egui::Ui, answer: &Answer, title: &str) {
    ui.label(egui::RichText::new(title).small().strong());
    if answer.text.is_empty() && answer.is_streaming() {
        ui.spinner();
    } else {
        let (thinking, reply) = thinking_split(&answer.text);
        if let Some(thinking) = thinking.filter(|t| !t.trim().is_empty()) {
            // A thinking model's `<think>` block (Qwen3), folded away: the answer is what follows.
            egui::CollapsingHeader::new(egui::RichText::new("Thinking").small().weak())
                .id_salt(("thinking", title))
                .default_open(false)
                .show(ui, |ui| {
                    ui.add(
                        egui::Label::new(egui::RichText::new(thinking).weak())
                            .selectable(true)
                            .wrap(),
                    );
                });
        }
        for (is_call, text) in tool_call_segments(reply) {
            if is_call {
                // A tool call the model wrote (Qwen's `<tool_call>` block, or a whole answer that
                // is a Llama 3.1 `{"name", "parameters"}` call) is shown as a call, not as prose.
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.label(egui::RichText::new("Tool call").small().strong());
                    ui.add(
                        egui::Label::new(egui::RichText::new(text).monospace())
                            .selectable(true)
                            .wrap(),
                    );
                });
            } else if !text.trim().is_empty() {
                ui.add(egui::Label::new(text).selectable(true).wrap());
            }
        }
    }
    let status = answer.status_text();
    if answer.error.is_some() {
        ui.label(egui::RichText::new(status).small().color(ui.visuals().error_fg_color));
    } else {
        ui.label(egui::RichText::new(status).small().weak());
    }
}

/// Splits an answer that opens with a `<think>…</think>` block (Qwen3 with thinking on) into the
/// thinking and the reply after it; while the block is still streaming, all of it is thinking.
pub(super) fn thinking_split(text: &str) -> (Option<&str>, &str) {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    let Some(body) = text.trim_start().strip_prefix(OPEN) else {
        return (None, text);
    };
    match body.find(CLOSE) {
        Some(end) => (Some(body[..end].trim()), body[end + CLOSE.len()..].trim_start()),
        None => (Some(body.trim()), ""),
    }
}

/// Cuts an answer into prose and tool calls (`true`): the bodies of `<tool_call>…</tool_call>`
/// blocks (an unclosed block, still streaming, runs to the end), or the whole answer when it is
/// one JSON object with a `name` and `parameters` or `arguments`.
pub(super) fn tool_call_segments(text: &str) -> Vec<(bool, &str)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(trimmed) {
            if map.contains_key("name") && (map.contains_key("parameters") || map.contains_key("arguments")) {
                return vec![(true, trimmed)];
            }
        }
    }
    let mut out = vec![];
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        out.push((false, &rest[..at]));
        let body = &rest[at + OPEN.len()..];
        match body.find(CLOSE) {
            Some(end) => {
                out.push((true, body[..end].trim()));
                rest = &body[end + CLOSE.len()..];
            }
            None => {
                out.push((true, body.trim()));
                rest = "";
            }
        }
    }
    out.push((false, rest));
    out.retain(|(is_call, t)| *is_call || !t.is_empty());
    out
}
