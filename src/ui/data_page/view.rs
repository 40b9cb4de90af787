//! Drawing the Data page: the file field, toolbar, row table and editor, rejected rows, the
//! token-length histogram, the template inspector, split and filters. Clicks become [`Action`]s.

use std::path::{Path, PathBuf};

use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot, VLine};

use crate::data::inspect::loss_segments;
use crate::data::load::{describe_rejection, Rejection};
use crate::data::meta::RowMeta;
use crate::data::tokenize::encode_example;
use crate::data::{Example, Message, Role};

use super::choose::ScoreAction;
use super::{
    demo_datasets_dir, preview, split_end_of_turn, split_paths, Action, DataPage, Draft, FilterKind, Inspected,
    DEMO_DATASETS, LIST_HEIGHT, TABLE_HEIGHT,
};
use crate::ui::shared::Shared;
use crate::ui::widgets::{format_count, knob_row};

impl DataPage {
    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        let mut actions = vec![];
        ui.heading("Data");
        ui.add_space(6.0);
        self.file_ui(ui, &mut actions);

        if self.dataset.is_some() {
            // Ctrl+Z / Ctrl+Shift+Z (or Ctrl+Y) when no text field has focus: a focused text
            // field keeps its own undo.
            if ui.memory(|m| m.focused().is_none()) {
                let redo = ui.input_mut(|i| {
                    i.consume_shortcut(&egui::KeyboardShortcut::new(
                        egui::Modifiers::COMMAND | egui::Modifiers::SHIFT,
                        egui::Key::Z,
                    )) || i.consume_shortcut(&egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Y))
                });
                let undo = ui.input_mut(|i| {
                    i.consume_shortcut(&egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::Z))
                });
                if redo {
                    actions.push(Action::Redo);
                } else if undo {
                    actions.push(Action::Undo);
                }
            }
            self.toolbar_ui(ui, &mut actions);
            ui.add_space(6.0);
            ui.columns(2, |cols| {
                self.table_ui(&mut cols[0], &mut actions);
                self.row_editor_ui(&mut cols[1], &mut actions);
            });
            self.problems_ui(ui);
            ui.add_space(10.0);
            self.tokens_ui(ui, shared, &mut actions);
            ui.add_space(10.0);
            self.inspector_ui(ui, shared);
            ui.add_space(10.0);
            self.split_ui(ui, &mut actions);
            ui.add_space(10.0);
            self.filters_ui(ui, &mut actions);
            ui.add_space(10.0);
            fixed_scope(ui, "finch-data-choose", |ui| self.choose_ui(ui, shared, &mut actions));
            ui.add_space(10.0);
            let model = shared.model.as_ref().map(|m| m.path.clone());
            let adapters: Vec<(String, PathBuf)> = shared.adapters().cloned().collect();
            let accepted = fixed_scope(ui, "finch-data-generate", |ui| self.generate.ui(ui, model, &adapters));
            if !accepted.is_empty() {
                if let Some(d) = &mut self.dataset {
                    // Each accepted row is one editor edit, provenance included: Undo takes it back.
                    for (ex, meta) in accepted {
                        d.editor.add_with_meta(ex, meta);
                    }
                }
                self.changed();
            }
        }
        if !self.status.is_empty() {
            ui.add_space(8.0);
            ui.label(egui::RichText::new(&self.status).italics());
        }
        for action in actions {
            self.apply(&ctx, shared, action);
        }
    }

    fn file_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.group(|ui| {
            egui::Grid::new("data-file")
                .num_columns(2)
                .spacing([12.0, 8.0])
                .show(ui, |ui| {
                    let label = ui.label("Dataset file").on_hover_text(
                        "A .jsonl, .json, .csv or .parquet file with Alpaca, ShareGPT, OpenAI messages, \
                         prompt/completion or text rows.",
                    );
                    ui.horizontal(|ui| {
                        let edit = ui.add(
                            egui::TextEdit::singleline(&mut self.path_text)
                                .hint_text("path to a dataset file")
                                .desired_width(420.0),
                        );
                        let edit = edit.labelled_by(label.id);
                        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                        if ui.button("Browse…").on_hover_text("Pick a dataset file.").clicked() {
                            actions.push(Action::BrowseOpen);
                        }
                        let path = self.path_text.trim().to_string();
                        if (ui
                            .add_enabled(!path.is_empty(), egui::Button::new("Open dataset"))
                            .clicked()
                            || enter)
                            && !path.is_empty()
                        {
                            actions.push(Action::Open(PathBuf::from(path)));
                        }
                    });
                    ui.end_row();
                    if let Some(dir) = demo_datasets_dir() {
                        ui.label("Demo datasets")
                            .on_hover_text("Small datasets bundled with Finch that a 135M model learns in minutes.");
                        ui.horizontal(|ui| {
                            for (name, about) in DEMO_DATASETS {
                                let file = dir.join(name).join("train.jsonl");
                                if file.is_file() && ui.button(name).on_hover_text(about).clicked() {
                                    actions.push(Action::Open(file));
                                }
                            }
                        });
                        ui.end_row();
                    }
                });
            if let Some((path, _)) = &self.loading {
                ui.horizontal(|ui| {
                    ui.spinner();
                    let secs = self.load_started.map_or(0.0, |t| t.elapsed().as_secs_f32());
                    ui.label(format!("Reading and checking {} ({secs:.0} s)…", path.display()));
                    if ui
                        .button("Cancel")
                        .on_hover_text("Stop reading this file; the dataset on screen stays.")
                        .clicked()
                    {
                        actions.push(Action::CancelLoad);
                    }
                });
            }
        });
    }

    fn toolbar_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let Some(d) = &self.dataset else { return };
        ui.horizontal_wrapped(|ui| {
            let unsaved = if d.has_unsaved_changes() {
                " · unsaved changes"
            } else {
                ""
            };
            ui.label(
                egui::RichText::new(format!(
                    "{} rows · {} · {} · {} rejected{unsaved}",
                    format_count(d.editor.len() as u64),
                    d.format.name(),
                    d.file_kind.name(),
                    d.rejected.len()
                ))
                .strong(),
            );
            if ui
                .button("Use for training")
                .on_hover_text("Make this file the Train page's data file.")
                .clicked()
            {
                actions.push(Action::UseForTraining);
            }
        });
        let (can_undo, can_redo) = (self.can_undo(), self.can_redo());
        ui.horizontal_wrapped(|ui| {
            let saving = self.saving.is_some();
            let save_label = ui
                .label("Save to")
                .on_hover_text("Where Save writes the rows, as JSONL (OpenAI messages or text records).");
            ui.add(egui::TextEdit::singleline(&mut self.save_text).desired_width(320.0))
                .labelled_by(save_label.id);
            let save_path = self.save_text.trim().to_string();
            let mut save_tip =
                "Write every row to this file atomically (the old file stays intact if it fails).".to_string();
            if !d.rejected.is_empty() && Path::new(&save_path) == d.path {
                save_tip.push_str(&format!(
                    " The {} rejected records are not rows and are not written.",
                    d.rejected.len()
                ));
            }
            if ui
                .add_enabled(!saving && !save_path.is_empty(), egui::Button::new("Save"))
                .on_hover_text(save_tip)
                .clicked()
            {
                actions.push(Action::Save(PathBuf::from(save_path)));
            }
            if ui
                .add_enabled(!saving, egui::Button::new("Save as…"))
                .on_hover_text("Pick a new file to write the rows to.")
                .clicked()
            {
                actions.push(Action::SaveAsDialog);
            }
            if saving {
                ui.spinner();
            }
            ui.separator();
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo"))
                .on_hover_text("Revert the last change (Ctrl+Z).")
                .clicked()
            {
                actions.push(Action::Undo);
            }
            if ui
                .add_enabled(can_redo, egui::Button::new("Redo"))
                .on_hover_text("Re-apply the last undone change (Ctrl+Shift+Z).")
                .clicked()
            {
                actions.push(Action::Redo);
            }
            ui.separator();
            if ui
                .button("Add row")
                .on_hover_text("Append an empty row and edit it on the right.")
                .clicked()
            {
                actions.push(Action::AddRow);
            }
            if ui
                .add_enabled(self.selected.is_some(), egui::Button::new("Delete row"))
                .on_hover_text("Delete the selected row.")
                .clicked()
            {
                actions.push(Action::DeleteRow);
            }
            ui.separator();
            let goto_label = ui.label("Go to row");
            let n = d.editor.len().max(1);
            let goto = ui
                .add(egui::DragValue::new(&mut self.goto_row).range(1..=n))
                .on_hover_text("Scroll the table to this row and select it.")
                .labelled_by(goto_label.id);
            if goto.changed() {
                let index = self.goto_row.clamp(1, n) - 1;
                self.scroll_to = Some(index);
                actions.push(Action::Select(index));
            }
        });
    }

    fn table_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let Some(d) = &self.dataset else { return };
        if self.previews_revision != self.revision {
            self.previews.clear();
            self.previews_revision = self.revision;
        }
        let lengths = self
            .lengths
            .as_ref()
            .filter(|l| l.revision == self.revision)
            .map(|l| &l.per_row);
        let row_height = ui
            .text_style_height(&egui::TextStyle::Body)
            .max(ui.spacing().interact_size.y);
        ui.horizontal(|ui| {
            for (head, width) in [("#", 56.0), ("Prompt", 240.0), ("Answer", 200.0)] {
                ui.add_sized(
                    [width, row_height],
                    egui::Label::new(egui::RichText::new(head).strong()),
                );
            }
            if lengths.is_some() {
                ui.label(egui::RichText::new("Tokens").strong());
            }
        });
        let mut area = egui::ScrollArea::vertical()
            .id_salt("data-table")
            .max_height(TABLE_HEIGHT)
            .auto_shrink([false, true]);
        if let Some(index) = self.scroll_to.take() {
            let spacing = ui.spacing().item_spacing.y;
            area = area.vertical_scroll_offset(index as f32 * (row_height + spacing));
        }
        let rows = d.editor.rows();
        let previews = &mut self.previews;
        let selected = self.selected;
        area.show_rows(ui, row_height, rows.len(), |ui, range| {
            for i in range {
                let (prompt, answer) = previews.entry(i).or_insert_with(|| preview(&rows[i]));
                ui.horizontal(|ui| {
                    let number = ui.add_sized(
                        [56.0, row_height],
                        egui::Button::selectable(selected == Some(i), (i + 1).to_string()),
                    );
                    let prompt_cell = ui.add_sized(
                        [240.0, row_height],
                        egui::Label::new(prompt.as_str()).truncate().sense(egui::Sense::click()),
                    );
                    let answer_cell = ui.add_sized(
                        [200.0, row_height],
                        egui::Label::new(answer.as_str()).truncate().sense(egui::Sense::click()),
                    );
                    if let Some(n) = lengths.and_then(|l| l.get(i).copied().flatten()) {
                        ui.label(n.to_string());
                    }
                    if number.clicked() || prompt_cell.clicked() || answer_cell.clicked() {
                        actions.push(Action::Select(i));
                    }
                });
            }
        });
        if d.editor.is_empty() {
            ui.label(egui::RichText::new("No rows: add one with Add row.").weak());
        }
    }

    fn row_editor_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let Some(d) = &self.dataset else { return };
        let Some(index) = self.selected.filter(|&i| i < d.editor.len()) else {
            ui.label(egui::RichText::new("Select a row to edit it.").weak());
            return;
        };
        let fresh = self
            .draft
            .as_ref()
            .is_some_and(|dr| dr.index == index && dr.revision == self.revision);
        if !fresh {
            self.draft = Some(Draft {
                index,
                revision: self.revision,
                example: d.editor.rows()[index].clone(),
            });
        }
        let Some(draft) = &mut self.draft else { return };
        let changed = draft.example != d.editor.rows()[index];
        ui.label(egui::RichText::new(format!("Row {}", index + 1)).strong());
        if let Some(meta) = d.editor.meta().get(index).filter(|m| !m.is_empty()) {
            meta_ui(ui, meta);
        }
        egui::ScrollArea::vertical()
            .id_salt("data-row-editor")
            .max_height(TABLE_HEIGHT - 40.0)
            .show(ui, |ui| match &mut draft.example {
                Example::Text { text } => {
                    let label = ui
                        .label("Text")
                        .on_hover_text("The raw text; every token of it is trained.");
                    ui.add(
                        egui::TextEdit::multiline(text)
                            .desired_rows(6)
                            .desired_width(f32::INFINITY),
                    )
                    .labelled_by(label.id);
                }
                Example::Chat { messages, .. } => {
                    let mut remove = None;
                    for (m, message) in messages.iter_mut().enumerate() {
                        let role = match message.role {
                            Role::System => "System",
                            Role::User => "User",
                            Role::Assistant => "Assistant",
                            Role::Tool => "Tool result",
                        };
                        let label_id = ui
                            .horizontal(|ui| {
                                let label = ui.label(egui::RichText::new(role).strong());
                                if ui
                                    .small_button("Remove")
                                    .on_hover_text("Remove this message from the row.")
                                    .clicked()
                                {
                                    remove = Some(m);
                                }
                                label.id
                            })
                            .inner;
                        ui.add(
                            egui::TextEdit::multiline(&mut message.content)
                                .desired_rows(2)
                                .desired_width(f32::INFINITY),
                        )
                        .labelled_by(label_id);
                        // Tool calls are shown, not edited here (they are JSON the template prints).
                        for call in &message.tool_calls {
                            ui.label(
                                egui::RichText::new(format!("Tool call: {}({})", call.name, call.arguments))
                                    .monospace(),
                            );
                        }
                    }
                    if let Some(m) = remove {
                        messages.remove(m);
                    }
                    ui.horizontal(|ui| {
                        if ui
                            .small_button("Add user message")
                            .on_hover_text("Append a user turn.")
                            .clicked()
                        {
                            messages.push(Message::new(Role::User, ""));
                        }
                        if ui
                            .small_button("Add assistant message")
                            .on_hover_text("Append an assistant turn (trained by default).")
                            .clicked()
                        {
                            messages.push(Message::new(Role::Assistant, ""));
                        }
                    });
                }
                Example::Preference {
                    prompt,
                    chosen,
                    rejected,
                    ..
                } => {
                    // The texts are edited in place; the shape of a pair (which turns it has) is
                    // the file's.
                    let parts = [("Prompt", prompt), ("Chosen", chosen), ("Rejected", rejected)];
                    for (part, messages) in parts {
                        for message in messages.iter_mut() {
                            let role = match message.role {
                                Role::System => "system",
                                Role::User => "user",
                                Role::Assistant => "assistant",
                                Role::Tool => "tool result",
                            };
                            let label = ui.label(egui::RichText::new(format!("{part} ({role})")).strong());
                            ui.add(
                                egui::TextEdit::multiline(&mut message.content)
                                    .desired_rows(2)
                                    .desired_width(f32::INFINITY),
                            )
                            .labelled_by(label.id);
                        }
                    }
                }
            });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(changed, egui::Button::new("Apply edit"))
                .on_hover_text("Write the changes into the row (undoable).")
                .clicked()
            {
                actions.push(Action::ApplyDraft);
            }
            if ui
                .add_enabled(changed, egui::Button::new("Discard edit"))
                .on_hover_text("Forget the changes typed since the last Apply.")
                .clicked()
            {
                actions.push(Action::DiscardDraft);
            }
        });
    }

    fn problems_ui(&mut self, ui: &mut egui::Ui) {
        let Some(d) = &self.dataset else { return };
        if self.problems_revision != self.revision {
            self.problems = d.editor.problems();
            self.problems_revision = self.revision;
        }
        if !self.problems.is_empty() {
            ui.label(
                egui::RichText::new(format!(
                    "{} rows would be rejected when this file is loaded for training:",
                    self.problems.len()
                ))
                .color(ui.visuals().warn_fg_color),
            );
            list_ui(ui, "data-problems", &self.problems, |r| {
                describe_rejection(r).replacen("line", "row", 1)
            });
        }
        let rejected = &d.rejected;
        egui::CollapsingHeader::new(format!("Rejected records ({})", rejected.len()))
            .id_salt("data-rejected")
            .default_open(!rejected.is_empty())
            .show(ui, |ui| {
                if rejected.is_empty() {
                    ui.label("Every record in the file was loaded.");
                } else {
                    ui.label("These records of the file were skipped; fix them in the file and open it again.");
                    list_ui(ui, "data-rejected-list", rejected, describe_rejection);
                }
            });
    }

    fn tokens_ui(&mut self, ui: &mut egui::Ui, shared: &Shared, actions: &mut Vec<Action>) {
        ui.heading("Token lengths");
        let seq_len = shared.settings.train.seq_len;
        if self.model.is_none() {
            let text = if self.model_job.is_some() {
                "Reading the model's tokenizer…"
            } else {
                "Open a model to see token lengths (Models page)."
            };
            ui.label(egui::RichText::new(text).weak());
            return;
        }
        if let Some(model) = &self.model {
            if let Some(note) = &model.note {
                ui.label(egui::RichText::new(note).color(ui.visuals().warn_fg_color));
            }
        }
        if self.tokenizing.is_some() {
            ui.horizontal(|ui| {
                let (done, total) = self.tokenize_progress;
                ui.add(
                    egui::ProgressBar::new(if total > 0 { done as f32 / total as f32 } else { 0.0 })
                        .desired_width(240.0)
                        .text(format!("tokenizing {done} / {total} rows")),
                );
                if ui
                    .button("Stop counting")
                    .on_hover_text("Stop tokenizing; the histogram waits for the next change.")
                    .clicked()
                {
                    actions.push(Action::CancelTokenize);
                }
            });
        }
        let Some(lengths) = self.current_lengths() else {
            return;
        };
        let over = lengths.per_row.iter().flatten().filter(|&&n| n > seq_len).count();
        ui.horizontal_wrapped(|ui| {
            if let Some(s) = lengths.stats {
                ui.label(format!(
                    "min {} · median {} · p95 {} · max {} tokens",
                    s.min, s.median, s.p95, s.max
                ));
            }
            let text = format!("{over} rows longer than seq_len = {seq_len} would be truncated");
            if over > 0 {
                ui.label(egui::RichText::new(text).color(ui.visuals().warn_fg_color));
            } else {
                ui.label(text);
            }
        })
        .response
        .on_hover_text("seq_len is set on the Train self.");
        if lengths.encode_errors > 0 {
            ui.label(
                egui::RichText::new(format!(
                    "{} rows cannot be encoded with this template (first: {})",
                    lengths.encode_errors,
                    lengths.first_error.as_deref().unwrap_or("")
                ))
                .color(ui.visuals().error_fg_color),
            );
        }
        let bars: Vec<Bar> = lengths
            .bars
            .iter()
            .map(|b| Bar::new(b[0], b[1]).width(lengths.bin_width * 0.95))
            .collect();
        Plot::new("data-token-histogram")
            .height(200.0)
            .legend(Legend::default())
            .x_axis_label("tokens per row")
            .y_axis_label("rows")
            .allow_scroll(false)
            .show(ui, |plot| {
                plot.bar_chart(BarChart::new("rows", bars));
                plot.vline(VLine::new(format!("seq_len = {seq_len}"), seq_len as f64).width(2.0));
            });
    }

    fn inspector_ui(&mut self, ui: &mut egui::Ui, shared: &Shared) {
        ui.heading("Template and loss mask");
        let seq_len = shared.settings.train.seq_len;
        let loss_on = shared.settings.train.loss_on;
        let Some(model) = &self.model else {
            ui.label(egui::RichText::new("Open a model to see a row rendered with its chat template.").weak());
            return;
        };
        let Some(index) = self.selected.filter(|&i| i < self.rows().len()) else {
            ui.label(egui::RichText::new("Select a row to see it as the model sees it.").weak());
            return;
        };
        let key = (index, self.revision, model.path.clone(), seq_len, loss_on);
        if self.inspected.as_ref().map(|i| &i.key) != Some(&key) {
            // One row: fast enough for the UI thread (a render and a tokenization).
            let rows = self.dataset.as_ref().map_or(&[][..], |d| d.editor.rows());
            let ex = &rows[index];
            let end_of_turn = model.template.end_of_turn();
            let encoded = encode_example(ex, &model.template, &model.tokenizer, loss_on, seq_len);
            let result = loss_segments(ex, &model.template, Some(&model.tokenizer), loss_on, seq_len)
                .map(|segments| split_end_of_turn(&segments, end_of_turn.as_deref()))
                .map_err(|e| format!("{e:#}"));
            let (tokens, trained_tokens, truncated) = encoded
                .as_ref()
                .map_or((0, 0, false), |t| (t.len(), t.trained_tokens(), t.truncated));
            self.inspected = Some(Inspected {
                key,
                result,
                end_of_turn,
                tokens,
                trained_tokens,
                truncated,
            });
        }
        let Some(inspected) = &self.inspected else { return };
        let trained_color = egui::Color32::from_rgb(40, 160, 80);
        let masked_color = ui.visuals().weak_text_color();
        let eot_fill = egui::Color32::from_rgb(200, 120, 20);
        ui.horizontal_wrapped(|ui| {
            ui.label(format!("Row {}:", index + 1));
            ui.label(egui::RichText::new("trained").color(trained_color).strong())
                .on_hover_text("Tokens the model learns to predict (the loss is computed on them).");
            ui.label(egui::RichText::new("masked").color(masked_color).strikethrough())
                .on_hover_text("Context tokens the model reads but is not trained to produce.");
            ui.label(
                egui::RichText::new("end of turn")
                    .background_color(eot_fill)
                    .color(egui::Color32::WHITE),
            )
            .on_hover_text(match &inspected.end_of_turn {
                Some(m) => {
                    format!("The template's end-of-turn marker `{m}`: trained, so the tuned model learns to stop.")
                }
                None => "This template writes no end-of-turn marker, so a tuned model will not learn to stop.".into(),
            });
            ui.label(
                egui::RichText::new(format!(
                    "· {} tokens, {} trained{}",
                    inspected.tokens,
                    inspected.trained_tokens,
                    if inspected.truncated {
                        format!(", cut at seq_len = {seq_len}")
                    } else {
                        String::new()
                    }
                ))
                .weak(),
            );
        });
        match &inspected.result {
            Err(e) => {
                ui.label(
                    egui::RichText::new(format!("This row cannot be rendered: {e}")).color(ui.visuals().error_fg_color),
                );
            }
            Ok(pieces) => {
                let mut job = egui::text::LayoutJob::default();
                let font = egui::TextStyle::Monospace.resolve(ui.style());
                for piece in pieces {
                    let mut format = egui::TextFormat::simple(font.clone(), masked_color);
                    if piece.end_of_turn {
                        format.background = eot_fill;
                        format.color = egui::Color32::WHITE;
                        if !piece.trained {
                            // A masked marker (the end of a user turn) keeps the marker colour but is struck through.
                            format.strikethrough = egui::Stroke::new(1.0, egui::Color32::WHITE);
                        }
                    } else if piece.trained {
                        format.color = trained_color;
                    } else {
                        format.strikethrough = egui::Stroke::new(0.5, masked_color);
                    }
                    job.append(&piece.text, 0.0, format);
                }
                job.wrap.max_width = ui.available_width();
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.label(job);
                });
            }
        }
    }

    fn split_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.heading("Train / validation split");
        let Some(d) = &self.dataset else { return };
        egui::Grid::new("data-split")
            .num_columns(2)
            .spacing([12.0, 8.0])
            .show(ui, |ui| {
                knob_row(
                    ui,
                    "Validation share",
                    "Part of the rows written to the validation file, for measuring the loss on unseen examples.",
                    |ui| ui.add(egui::Slider::new(&mut self.split_fraction, 0.0..=0.5).fixed_decimals(2)),
                );
                knob_row(
                    ui,
                    "Split seed",
                    "The same seed and share always pick the same validation rows.",
                    |ui| ui.add(egui::DragValue::new(&mut self.split_seed)),
                );
                let label = ui
                    .label("Split folder")
                    .on_hover_text("Where the two files are written; empty means next to the dataset file.");
                ui.horizontal(|ui| {
                    let hint = d.path.parent().map(|p| p.display().to_string()).unwrap_or_default();
                    ui.add(
                        egui::TextEdit::singleline(&mut self.split_dir_text)
                            .hint_text(hint)
                            .desired_width(320.0),
                    )
                    .labelled_by(label.id);
                    if ui.button("Choose…").on_hover_text("Pick the folder.").clicked() {
                        actions.push(Action::BrowseSplitDir);
                    }
                });
                ui.end_row();
            });
        let (train, validation) = split_paths(
            &d.path,
            Path::new(if self.split_dir_text.trim().is_empty() {
                "…"
            } else {
                self.split_dir_text.trim()
            }),
        );
        let names = format!(
            "{} and {}",
            train.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            validation.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        );
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    self.splitting.is_none() && !d.editor.is_empty(),
                    egui::Button::new("Write split"),
                )
                .on_hover_text(format!("Write the rows as {names}."))
                .clicked()
            {
                actions.push(Action::Split);
            }
            if self.splitting.is_some() {
                ui.spinner();
            }
        });
    }

    fn choose_ui(&mut self, ui: &mut egui::Ui, shared: &Shared, actions: &mut Vec<Action>) {
        let Some(d) = &self.dataset else { return };
        let model_open = shared.model.is_some();
        match self.choose.ui(ui, d.editor.meta(), self.revision, model_open) {
            Some(ScoreAction::Start) => actions.push(Action::Score),
            Some(ScoreAction::Stop) => actions.push(Action::StopScoring),
            Some(ScoreAction::Keep { rows, status }) => actions.push(Action::KeepRows(rows, status)),
            None => {}
        }
    }

    fn filters_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        ui.heading("Quality filters");
        let has_lengths = self.current_lengths().is_some();
        let model_open = self.model.is_some();
        let counts = self.counts.as_ref().filter(|c| c.revision == self.revision);
        egui::Grid::new("data-filters")
            .num_columns(3)
            .spacing([12.0, 8.0])
            .show(ui, |ui| {
                ui.label("Exact duplicates")
                    .on_hover_text("Rows equal to an earlier row after ignoring case, punctuation and spacing.");
                ui.label("");
                filter_result_ui(ui, counts.map(|c| &c.exact), FilterKind::Exact, actions);
                ui.end_row();

                let label = ui.label("Near duplicates").on_hover_text(
                    "Rows whose word 3-grams overlap an earlier row's by at least the threshold (MinHash estimate); \
                     exact duplicates included.",
                );
                ui.add(egui::Slider::new(&mut self.near_threshold, 0.5..=1.0).fixed_decimals(2))
                    .on_hover_text("Similarity from which a row counts as a near-duplicate.")
                    .labelled_by(label.id);
                let stale = counts.is_some_and(|c| c.near_threshold != self.near_threshold);
                filter_result_ui(
                    ui,
                    counts.filter(|_| !stale).map(|c| &c.near),
                    FilterKind::Near,
                    actions,
                );
                ui.end_row();

                if has_lengths {
                    let label = ui
                        .label("Token length")
                        .on_hover_text("Remove rows with fewer or more tokens than these bounds.");
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::DragValue::new(&mut self.min_tokens)
                                .range(0..=1_000_000)
                                .prefix("min "),
                        )
                        .labelled_by(label.id);
                        ui.add(
                            egui::DragValue::new(&mut self.max_tokens)
                                .range(1..=1_000_000)
                                .prefix("max "),
                        );
                    });
                    let bounds = (self.min_tokens, self.max_tokens.max(self.min_tokens));
                    let stale = counts.is_some_and(|c| c.length_bounds != bounds);
                    filter_result_ui(
                        ui,
                        counts.filter(|_| !stale).and_then(|c| c.length.as_ref()),
                        FilterKind::Length,
                        actions,
                    );
                    ui.end_row();
                }
            });
        if !has_lengths {
            let text = if model_open {
                "The token-length filter appears once the tokens are counted."
            } else {
                "Open a model to filter by token length."
            };
            ui.label(egui::RichText::new(text).weak());
        }
        ui.horizontal(|ui| {
            if ui
                .add_enabled(self.counting.is_none(), egui::Button::new("Count rows to remove"))
                .on_hover_text("Run every filter and show how many rows each would remove; nothing is removed yet.")
                .clicked()
            {
                actions.push(Action::Count);
            }
            if self.counting.is_some() {
                ui.spinner();
            }
        });
    }
}

/// Draws `add` with widget ids of its own (a unique `name`): the sections above it grow when
/// background results land (the token histogram), and ids counted on from them would shift,
/// dropping a text field's focus or a click in flight.
fn fixed_scope<R>(ui: &mut egui::Ui, name: &str, add: impl FnOnce(&mut egui::Ui) -> R) -> R {
    ui.scope_builder(egui::UiBuilder::new().scope_id(egui::Id::unique(name)), add)
        .inner
}

/// Where a row came from and its scores, as saved with it.
fn meta_ui(ui: &mut egui::Ui, meta: &RowMeta) {
    if let Some(p) = &meta.provenance {
        let mut head = format!("Generated by {} with {}", p.method.name(), p.model);
        if p.edited {
            head.push_str(", then edited by hand");
        }
        egui::CollapsingHeader::new(head)
            .id_salt("data-row-provenance")
            .default_open(false)
            .show(ui, |ui| {
                let s = &p.settings;
                ui.label(format!(
                    "attempt {} · temperature {} · top-p {} · seed {} · call seed {} · max new tokens {}",
                    p.attempt, s.temperature, s.top_p, s.seed, s.call_seed, s.max_new_tokens
                ));
                if !p.seed_rows.is_empty() {
                    ui.label("Seed rows in the prompt:");
                    for seed in &p.seed_rows {
                        ui.label(format!("- {}", super::one_line(seed, 90)));
                    }
                }
                if let Some(original) = &p.original {
                    ui.label(format!(
                        "Evolved ({}) from: {}",
                        p.evolution.as_deref().unwrap_or("?"),
                        super::one_line(&original.instruction, 90)
                    ));
                }
                if let Some(doc) = &p.document {
                    ui.label(format!(
                        "From {doc}, segment {}{}",
                        p.segment.map_or("?".to_string(), |s| s.to_string()),
                        p.score
                            .map(|s| format!(", self-curation score {s}/5"))
                            .unwrap_or_default()
                    ));
                }
            });
    }
    if let Some(s) = &meta.scores {
        let value = |v: Option<f32>| v.map_or("—".to_string(), |v| format!("{v:.3}"));
        ui.label(format!(
            "Scores: answer loss {} · IFD {} (by {}, {} tokens)",
            value(s.answer_loss),
            value(s.ifd),
            s.model,
            s.seq_len
        ))
        .on_hover_text("IFD ≥ 1: the instruction does not help the model predict the answer.");
    }
}

/// "removes N rows" and its Remove button, or a hint to count first.
fn filter_result_ui(ui: &mut egui::Ui, remove: Option<&Vec<usize>>, kind: FilterKind, actions: &mut Vec<Action>) {
    match remove {
        None => {
            ui.label(egui::RichText::new("not counted").weak());
        }
        Some(rows) => {
            ui.horizontal(|ui| {
                ui.label(format!("removes {} rows", rows.len()));
                let label = match kind {
                    FilterKind::Exact => "Remove exact duplicates",
                    FilterKind::Near => "Remove near duplicates",
                    FilterKind::Length => "Remove rows outside the bounds",
                };
                if !rows.is_empty()
                    && ui
                        .button(label)
                        .on_hover_text("Remove these rows from the table (Undo brings them back).")
                        .clicked()
                {
                    actions.push(Action::ApplyFilter(kind));
                }
            });
        }
    }
}

/// A list of rejections that lays out only its visible lines.
fn list_ui(ui: &mut egui::Ui, id: &str, items: &[Rejection], text: impl Fn(&Rejection) -> String) {
    let row_height = ui.text_style_height(&egui::TextStyle::Body);
    egui::ScrollArea::vertical()
        .id_salt(id)
        .max_height(LIST_HEIGHT)
        .auto_shrink([false, true])
        .show_rows(ui, row_height, items.len(), |ui, range| {
            for r in &items[range] {
                ui.label(text(r));
            }
        });
}
