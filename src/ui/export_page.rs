//! The Export page: a run's adapter as a PEFT folder, a merged Hugging Face model folder, or
//! GGUF files (f16 and q8_0) with an Ollama `Modelfile`. The export runs on a named thread that
//! reports each stage; Cancel is checked between stages, and a cancelled or failed export
//! removes the partial output folder. At the end the page lists the written files and, for GGUF,
//! the `ollama create` command to run.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use eframe::egui;

use crate::export::handoff::import::{ImportRequest, Imported};
use crate::export::handoff::{Handoff, HandoffRequest, Target as HandoffTarget};
pub use crate::export::ExportFormat;
use crate::export::{ExportError, ExportEvent, ExportRequest, Exported};

use super::shared::Shared;
use super::widgets::format_bytes;
use super::worker::{drain_and_release, PickPurpose, Stream};

/// What the export thread sends.
#[derive(Debug, Clone)]
pub enum ExportMsg {
    Event(ExportEvent),
    Done(Result<Exported, ExportError>),
}

/// State of the Export page.
pub struct ExportPage {
    /// The run or adapter folder to export.
    pub adapter_text: String,
    pub format: ExportFormat,
    pub out_text: String,
    /// Where a merged or GGUF export folds the adapter into the base (`auto`: the first usable GPU).
    pub device: crate::device::DeviceChoice,
    /// The output folder was filled in by the page (and follows the adapter and format).
    out_auto: bool,
    job: Option<Stream<ExportMsg>>,
    cancelling: bool,
    /// The running stage: (index, total, text).
    pub stage: Option<(usize, usize, String)>,
    pub result: Option<Exported>,
    /// The last export's end when it did not succeed ("Cancelled", or the error).
    pub status: String,
    /// Hand-off to a multi-GPU trainer (`finch export-run`): the tool, the running job, the result.
    pub handoff_target: HandoffTarget,
    handoff_job: Option<Stream<Result<Handoff, String>>>,
    pub handoff_result: Option<Handoff>,
    /// Bringing an adapter trained elsewhere back as a run (`finch import-adapter`).
    pub import_text: String,
    import_job: Option<Stream<Result<Imported, String>>>,
    pub import_result: Option<Imported>,
}

impl Default for ExportPage {
    fn default() -> Self {
        ExportPage {
            adapter_text: String::new(),
            format: ExportFormat::Peft,
            out_text: String::new(),
            device: crate::device::DeviceChoice::Auto,
            out_auto: true,
            job: None,
            cancelling: false,
            stage: None,
            result: None,
            status: String::new(),
            handoff_target: HandoffTarget::Trl,
            handoff_job: None,
            handoff_result: None,
            import_text: String::new(),
            import_job: None,
            import_result: None,
        }
    }
}

impl ExportPage {
    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    /// The suggested output folder: next to the adapter, named after the format.
    fn suggested_out(&self) -> Option<PathBuf> {
        let adapter = PathBuf::from(self.adapter_text.trim());
        if adapter.as_os_str().is_empty() {
            return None;
        }
        // A bare adapter folder gets its export beside it, not inside it.
        let home = if adapter.join("adapter_config.json").is_file() {
            adapter.parent().map(Path::to_path_buf).unwrap_or(adapter)
        } else {
            adapter
        };
        Some(home.join(self.format.folder_name()))
    }

    fn refresh_out(&mut self) {
        if self.out_auto {
            if let Some(out) = self.suggested_out() {
                self.out_text = out.display().to_string();
            }
        }
    }
}

impl ExportPage {
    /// Exports this run or adapter folder (the output folder follows it unless typed).
    pub fn set_adapter(&mut self, path: &Path) {
        self.adapter_text = path.display().to_string();
        self.refresh_out();
    }

    /// Writes the export into this folder.
    pub fn set_out(&mut self, path: &Path) {
        self.out_text = path.display().to_string();
        self.out_auto = false;
    }

    fn start(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        if self.is_running() {
            return;
        }
        let format = self.format;
        let adapter = PathBuf::from(self.adapter_text.trim());
        let out = PathBuf::from(self.out_text.trim());
        if adapter.as_os_str().is_empty() || out.as_os_str().is_empty() {
            shared.report(
                "Nothing to export",
                "Export needs an adapter and an output folder.",
                "Pick a run above (or type an adapter folder) and an output folder.",
            );
            return;
        }
        let model = shared.model.as_ref().map(|c| c.path.clone());
        if format.needs_model() && model.is_none() {
            shared.report(
                "No base model is open",
                format!("A {} export folds the adapter into its base model.", format.title()),
                "Open the model the adapter was trained on, on the Models page.",
            );
            return;
        }
        let request = ExportRequest {
            format,
            adapter,
            model: model.map(|m| m.display().to_string()),
            out,
            device: self.device,
        };
        let stream = Stream::spawn("finch-export", ctx, move |send, cancel| {
            let result = crate::export::run(&request, cancel, &mut |event| send(ExportMsg::Event(event)));
            send(ExportMsg::Done(result));
        });
        match stream {
            Ok(stream) => {
                self.job = Some(stream);
                self.cancelling = false;
                self.stage = None;
                self.result = None;
                self.status = "Starting…".into();
            }
            Err(e) => shared.report("Cannot start the export", e, "Restart Finch."),
        }
    }

    pub fn poll(&mut self, shared: &mut Shared) {
        let Some(job) = &mut self.job else {
            return;
        };
        let events = job.drain();
        let finished = job.is_finished();
        for event in events {
            match event {
                ExportMsg::Event(ExportEvent::Stage { index, total, text }) => {
                    self.status.clear();
                    self.stage = Some((index, total, text));
                }
                ExportMsg::Done(Ok(exported)) => {
                    self.stage = None;
                    self.status = "Export finished.".into();
                    self.result = Some(exported);
                }
                ExportMsg::Done(Err(ExportError::Cancelled)) => {
                    self.stage = None;
                    self.status = "Export cancelled; the partial output was removed.".into();
                }
                ExportMsg::Done(Err(ExportError::Failed(e))) => {
                    self.stage = None;
                    self.status = "Export failed; any partial output was removed.".into();
                    shared.report(
                        "Export failed",
                        e,
                        "Check that the adapter was trained on the open model and that the output folder is \
                         writable and new or empty.",
                    );
                }
            }
        }
        if finished {
            self.job = None;
            self.cancelling = false;
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Export");
        ui.add_space(6.0);
        let running = self.is_running();
        ui.add_enabled_ui(!running, |ui| self.inputs_ui(ui, shared));
        ui.add_space(8.0);
        self.start_ui(ui, shared);
        self.progress_ui(ui);
        ui.add_space(12.0);
        self.handoff_ui(ui, shared);
        ui.add_space(12.0);
        self.import_ui(ui, shared);
    }

    /// Imports a PEFT adapter folder trained elsewhere as a run of the runs folder (the engine
    /// `finch import-adapter` calls), on a named thread.
    fn start_import(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        // The model open on the Models page is the base when the adapter's own
        // `base_model_name_or_path` is missing or does not open here (a path on the GPU machine).
        let request = ImportRequest {
            dir: PathBuf::from(self.import_text.trim()),
            name: None,
            runs_dir: shared.settings.runs_dir.clone(),
            model: None,
            fallback_model: shared.model.as_ref().map(|m| m.path.display().to_string()),
        };
        match Stream::spawn("finch-import-adapter", ctx, move |send, _cancel| {
            send(crate::export::handoff::import::import_adapter(&request).map_err(|e| format!("{e:#}")));
        }) {
            Ok(stream) => {
                self.import_job = Some(stream);
                self.import_result = None;
            }
            Err(e) => shared.report("Cannot start the import", e, "Restart Finch."),
        }
    }

    /// The import section: an adapter folder, the Import button, and what the last import made.
    fn import_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        for r in drain_and_release(&mut self.import_job) {
            match r {
                Ok(imported) => {
                    self.import_result = Some(imported);
                    // The new run joins the run lists (Train history, Chat, Compare, Export).
                    shared.requests.rescan_runs = true;
                }
                Err(e) => shared.report(
                    "Import failed",
                    e,
                    "Pick a PEFT adapter folder (adapter_config.json + adapter_model.safetensors); when its base \
                     model is not found here, open that model on the Models page first.",
                ),
            }
        }
        let ctx = ui.ctx().clone();
        ui.group(|ui| {
            ui.label(egui::RichText::new("Bring an adapter back").strong())
                .on_hover_text(
                "Imports a PEFT adapter folder trained by LLaMA-Factory, axolotl, TRL or any PEFT trainer as a run, \
                 with its trainer_state.json loss curve when there is one.",
            );
            ui.horizontal(|ui| {
                let label = ui.label("PEFT folder to import");
                ui.add(
                    egui::TextEdit::singleline(&mut self.import_text)
                        .desired_width(360.0)
                        .hint_text("…/output/checkpoint-500"),
                )
                .labelled_by(label.id);
                let running = self.import_job.is_some();
                let ready = !self.import_text.trim().is_empty() && !running;
                if ui
                    .add_enabled(ready, egui::Button::new("Import as a run"))
                    .on_hover_text("Same as `finch import-adapter DIR`.")
                    .clicked()
                {
                    self.start_import(&ctx, shared);
                }
                if running {
                    ui.spinner();
                }
            });
            if let Some(i) = &self.import_result {
                let steps = if i.logged_steps > 0 {
                    format!("{} logged steps drawn on the Train page", i.logged_steps)
                } else {
                    "no trainer_state.json loss history found".to_string()
                };
                ui.label(format!(
                    "Imported as {} (rank {}, base {}): {steps}",
                    i.run.display(),
                    i.rank,
                    i.model
                ));
            }
        });
    }

    /// Writes the selected run's data, template, mask and settings for LLaMA-Factory, axolotl
    /// or TRL into `<run>/handoff-<tool>` (the engine `finch export-run` calls).
    fn start_handoff(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let run = PathBuf::from(self.adapter_text.trim());
        if !run.join("config.toml").is_file() {
            shared.report(
                "Not a run folder",
                format!("{} holds no config.toml.", run.display()),
                "Pick a run above: a hand-off needs the run's data and settings, not only its adapter.",
            );
            return;
        }
        let request = HandoffRequest {
            out: run.join(self.handoff_target.folder_name()),
            run,
            target: self.handoff_target,
            base_model: None,
        };
        match Stream::spawn("finch-handoff", ctx, move |send, _cancel| {
            send(crate::export::handoff::export_run(&request).map_err(|e| format!("{e:#}")));
        }) {
            Ok(stream) => {
                self.handoff_job = Some(stream);
                self.handoff_result = None;
            }
            Err(e) => shared.report("Cannot start the hand-off", e, "Restart Finch."),
        }
    }

    /// The hand-off section: tool choice, Write button, and the command, warnings and
    /// not-carried-over list of the last hand-off.
    fn handoff_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        for r in drain_and_release(&mut self.handoff_job) {
            match r {
                Ok(h) => self.handoff_result = Some(h),
                Err(e) => shared.report(
                    "Hand-off failed",
                    e,
                    "Check that the run folder's data file still exists and that the output folder is new or empty.",
                ),
            }
        }
        let ctx = ui.ctx().clone();
        ui.group(|ui| {
            ui.label(egui::RichText::new("Hand off to a multi-GPU trainer").strong()).on_hover_text(
                "Writes the selected run's data (same rows, template and loss mask), settings and launch command for \
                 another trainer, into <run>/handoff-<tool>.",
            );
            ui.horizontal(|ui| {
                for t in HandoffTarget::ALL {
                    ui.radio_value(&mut self.handoff_target, t, t.title());
                }
                let running = self.handoff_job.is_some();
                let ready = !self.adapter_text.trim().is_empty() && !running;
                if ui
                    .add_enabled(ready, egui::Button::new("Write hand-off"))
                    .on_hover_text("Same as `finch export-run RUN --to <tool>`.")
                    .clicked()
                {
                    self.start_handoff(&ctx, shared);
                }
                if running {
                    ui.spinner();
                }
            });
            if let Some(h) = &self.handoff_result {
                ui.label(format!(
                    "Wrote {} training and {} held-out rows for {} into {}",
                    h.train_rows,
                    h.eval_rows,
                    h.target.title(),
                    h.out.display()
                ));
                ui.horizontal(|ui| {
                    ui.add(egui::Label::new(egui::RichText::new(&h.command).monospace()).selectable(true));
                    if ui.button("Copy").clicked() {
                        ui.ctx().copy_text(h.command.clone());
                    }
                });
                for w in &h.warnings {
                    ui.colored_label(egui::Color32::from_rgb(220, 120, 40), format!("⚠ {w}"));
                }
                ui.label(format!(
                    "{} items not carried over are listed in README.md there.",
                    h.not_carried.len()
                ));
            }
        });
    }

    /// The base model, the run or adapter folder, the format and the output folder.
    fn inputs_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let runs: Vec<(String, PathBuf)> = shared.adapters().cloned().collect();
        ui.group(|ui| {
            ui.horizontal(|ui| {
                ui.label("Model");
                match &shared.model {
                    Some(card) => ui.label(format!("{} ({})", card.name, card.family)),
                    None => ui.label(
                        egui::RichText::new("none: open one on the Models page (PEFT export does not need it)").weak(),
                    ),
                };
            });
            ui.horizontal_wrapped(|ui| {
                ui.label("Run");
                if runs.is_empty() {
                    ui.label(egui::RichText::new("no finished runs yet: type an adapter folder below").weak());
                }
                for (name, dir) in &runs {
                    let selected = Path::new(self.adapter_text.trim()) == dir.as_path();
                    if ui
                        .radio(selected, name)
                        .on_hover_text(dir.display().to_string())
                        .clicked()
                    {
                        self.set_adapter(dir);
                    }
                }
            });
            egui::Grid::new("export-grid")
                .num_columns(2)
                .spacing([12.0, 8.0])
                .show(ui, |ui| {
                    let label = ui
                        .label("Adapter folder")
                        .on_hover_text("A run folder that finished training, or any PEFT adapter folder.");
                    ui.horizontal(|ui| {
                        let edit = ui
                            .add(
                                egui::TextEdit::singleline(&mut self.adapter_text)
                                    .hint_text("path to a run or adapter folder")
                                    .desired_width(380.0),
                            )
                            .labelled_by(label.id);
                        if edit.changed() {
                            self.refresh_out();
                        }
                        if ui.button("Browse…").clicked() {
                            let start = shared.settings.runs_dir.clone();
                            shared.pick(PickPurpose::ExportAdapter, Some(&start));
                        }
                    });
                    ui.end_row();

                    ui.label("Format")
                        .on_hover_text("Which files to write; hover over a choice for what it is for.");
                    ui.vertical(|ui| {
                        for f in ExportFormat::ALL {
                            if ui
                                .radio_value(&mut self.format, f, f.title())
                                .on_hover_text(f.description())
                                .changed()
                            {
                                self.refresh_out();
                            }
                        }
                    });
                    ui.end_row();

                    if self.format.needs_model() {
                        ui.label("Device").on_hover_text(
                            "Where the adapter is folded into the base model; auto picks the first usable GPU, else the CPU.",
                        );
                        crate::ui::widgets::device_combo(ui, "export-device", &mut self.device);
                        ui.end_row();
                    }

                    let label = ui
                        .label("Output folder")
                        .on_hover_text("A new or empty folder; it is created if missing.");
                    ui.horizontal(|ui| {
                        let edit = ui
                            .add(
                                egui::TextEdit::singleline(&mut self.out_text)
                                    .hint_text("new folder for the exported files")
                                    .desired_width(380.0),
                            )
                            .labelled_by(label.id);
                        if edit.changed() {
                            self.out_auto = false;
                        }
                        if ui.button("Browse…").clicked() {
                            let start = shared.settings.runs_dir.clone();
                            shared.pick(PickPurpose::ExportFolder, Some(&start));
                        }
                    });
                    ui.end_row();
                });
        });
    }

    /// Start export and Cancel.
    fn start_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        let running = self.is_running();
        ui.horizontal(|ui| {
            let ready = !self.adapter_text.trim().is_empty()
                && !self.out_text.trim().is_empty()
                && (!self.format.needs_model() || shared.model.is_some());
            let start = ui
                .add_enabled(
                    ready && !running,
                    egui::Button::new(egui::RichText::new("Start export").size(18.0)),
                )
                .on_hover_text("Writes the chosen format into the output folder.");
            if !ready {
                start.on_disabled_hover_text(
                    "Pick an adapter and an output folder; merged and GGUF exports also need the base model open.",
                );
            } else if start.clicked() {
                self.start(&ctx, shared);
            }
            if running {
                if ui
                    .add_enabled(!self.cancelling, egui::Button::new("Cancel"))
                    .on_hover_text("Stops after the current stage and removes the partial output.")
                    .clicked()
                {
                    if let Some(job) = &self.job {
                        job.cancel.store(true, Ordering::Relaxed);
                    }
                    self.cancelling = true;
                }
                ui.spinner();
            }
        });
    }

    /// The running stage, the last status and the written files.
    fn progress_ui(&mut self, ui: &mut egui::Ui) {
        if let Some((index, total, text)) = &self.stage {
            ui.add(
                egui::ProgressBar::new((*index as f32 - 1.0) / *total as f32)
                    .text(format!("Step {index} of {total}: {text}…")),
            );
            if self.cancelling {
                ui.label("Cancelling after this step…");
            }
        }
        if !self.status.is_empty() {
            ui.label(&self.status);
        }
        if let Some(result) = &self.result {
            ui.add_space(8.0);
            ui.group(|ui| {
                ui.label(egui::RichText::new(format!("Written to {}", result.out.display())).strong());
                egui::Grid::new("export-files").num_columns(2).show(ui, |ui| {
                    for (path, size) in &result.files {
                        let shown = path.strip_prefix(&result.out).unwrap_or(path);
                        ui.label(shown.display().to_string());
                        ui.label(format_bytes(*size));
                        ui.end_row();
                    }
                });
                if let Some(cmd) = &result.ollama_command {
                    ui.add_space(6.0);
                    ui.label("To use it in Ollama, run:");
                    ui.horizontal(|ui| {
                        ui.add(egui::Label::new(egui::RichText::new(cmd).monospace()).selectable(true));
                        if ui
                            .button("Copy")
                            .on_hover_text("Copies the command to the clipboard.")
                            .clicked()
                        {
                            ui.ctx().copy_text(cmd.clone());
                        }
                    });
                }
            });
        }
    }
}
