//! The Export page: a run's adapter as a PEFT folder, a merged Hugging Face model folder, or
//! GGUF files (f16 and q8_0) with an Ollama `Modelfile`. The export runs on a named thread that
//! reports each stage; Cancel is checked between stages, and a cancelled or failed export
//! removes the partial output folder. At the end the page lists the written files and, for GGUF,
//! the `ollama create` command to run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use eframe::egui;

use crate::export::{export_gguf, export_merged, export_peft};
use crate::generate::{resolve_adapter_dir, with_adapter, LoadedModel};

use super::app::App;
use super::widgets::format_bytes;
use super::worker::{PickPurpose, Stream};

/// What an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The adapter alone (`adapter_config.json` + `adapter_model.safetensors`), for PEFT.
    Peft,
    /// The base model with the adapter folded in, as a Hugging Face folder.
    Merged,
    /// `model-f16.gguf`, `model-q8_0.gguf` and a `Modelfile` for llama.cpp and Ollama.
    Gguf,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 3] = [ExportFormat::Peft, ExportFormat::Merged, ExportFormat::Gguf];

    pub fn title(self) -> &'static str {
        match self {
            ExportFormat::Peft => "PEFT adapter",
            ExportFormat::Merged => "Merged model (Hugging Face folder)",
            ExportFormat::Gguf => "GGUF f16 + q8_0 with Ollama Modelfile",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            ExportFormat::Peft => {
                "The small adapter files alone; load them on top of the base model with Python PEFT or Finch."
            }
            ExportFormat::Merged => {
                "A standalone model folder (safetensors, config, tokenizer, chat template) for transformers or Finch."
            }
            ExportFormat::Gguf => {
                "Merged weights as GGUF files for llama.cpp, LM Studio and Ollama, with a Modelfile that keeps the \
                 chat template and stop tokens."
            }
        }
    }

    /// The default output folder's name.
    fn folder(self) -> &'static str {
        match self {
            ExportFormat::Peft => "export-peft",
            ExportFormat::Merged => "export-merged",
            ExportFormat::Gguf => "export-gguf",
        }
    }

    fn needs_model(self) -> bool {
        self != ExportFormat::Peft
    }
}

/// What the export thread sends.
#[derive(Debug, Clone)]
pub enum ExportMsg {
    /// Stage `index` (1-based) of `total` started.
    Stage {
        index: usize,
        total: usize,
        text: String,
    },
    /// Every file written, with its size in bytes.
    Done(Vec<(PathBuf, u64)>),
    Failed(String),
    Cancelled,
}

/// A finished export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportResult {
    pub format: ExportFormat,
    pub out: PathBuf,
    pub files: Vec<(PathBuf, u64)>,
    /// For GGUF: the command that makes an Ollama model of it.
    pub ollama_command: Option<String>,
}

/// State of the Export page.
pub struct ExportPage {
    /// The run or adapter folder to export.
    pub adapter_text: String,
    pub format: ExportFormat,
    pub out_text: String,
    /// The output folder was filled in by the page (and follows the adapter and format).
    out_auto: bool,
    job: Option<Stream<ExportMsg>>,
    cancelling: bool,
    /// The running stage: (index, total, text).
    pub stage: Option<(usize, usize, String)>,
    pub result: Option<ExportResult>,
    /// The last export's end when it did not succeed ("Cancelled", or the error).
    pub status: String,
}

impl Default for ExportPage {
    fn default() -> Self {
        ExportPage {
            adapter_text: String::new(),
            format: ExportFormat::Peft,
            out_text: String::new(),
            out_auto: true,
            job: None,
            cancelling: false,
            stage: None,
            result: None,
            status: String::new(),
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
        Some(home.join(self.format.folder()))
    }

    fn refresh_out(&mut self) {
        if self.out_auto {
            if let Some(out) = self.suggested_out() {
                self.out_text = out.display().to_string();
            }
        }
    }
}

/// A model name Ollama accepts: lowercase letters, digits, `-`, `_` and `.`.
fn ollama_name(out: &Path) -> String {
    let source = out
        .parent()
        .and_then(Path::file_name)
        .or_else(|| out.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = source
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.').to_string();
    if name.is_empty() {
        "finch-model".into()
    } else {
        name
    }
}

/// Every file under `dir` (recursively), sorted, with sizes.
fn list_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((p, size));
            }
        }
    }
    out.sort();
    out
}

/// How an export run ended early.
enum Early {
    Cancelled,
    Failed(String),
}

/// Turns an engine error into a failure saying what was being done.
fn failed(what: &'static str) -> impl Fn(crate::Error) -> Early {
    move |e| Early::Failed(format!("{what}: {e:#}"))
}

/// The export itself, on its thread.
fn run_export(
    send: &dyn Fn(ExportMsg),
    cancel: &AtomicBool,
    format: ExportFormat,
    adapter: &Path,
    model: Option<&str>,
    out: &Path,
) -> Result<(), Early> {
    let total = if format.needs_model() { 3 } else { 2 };
    let stage = |index: usize, text: String| -> Result<(), Early> {
        if cancel.load(Ordering::Relaxed) {
            return Err(Early::Cancelled);
        }
        send(ExportMsg::Stage { index, total, text });
        Ok(())
    };
    match format {
        ExportFormat::Peft => {
            stage(1, "Checking the adapter".into())?;
            let dir = resolve_adapter_dir(adapter).map_err(failed("cannot find the adapter"))?;
            // Loading checks that the folder is a complete, readable adapter before copying.
            crate::lora::load_adapter(&dir, &candle_core::Device::Cpu).map_err(failed("cannot read the adapter"))?;
            stage(2, "Writing adapter_config.json and adapter_model.safetensors".into())?;
            export_peft(&dir, out).map_err(failed("cannot write the adapter"))?;
        }
        ExportFormat::Merged | ExportFormat::Gguf => {
            let spec = model.unwrap_or_default();
            stage(1, format!("Loading the base model {spec}"))?;
            let loaded = LoadedModel::open(spec).map_err(failed("cannot load the base model"))?;
            stage(2, "Attaching the adapter".into())?;
            let tuned = with_adapter(&loaded.model, adapter).map_err(failed("cannot load the adapter"))?;
            if format == ExportFormat::Merged {
                stage(
                    3,
                    "Merging and writing model.safetensors, config.json and the tokenizer files".into(),
                )?;
                export_merged(&loaded.files, &loaded.format, &tuned, out).map_err(failed("cannot write the model"))?;
            } else {
                stage(
                    3,
                    "Merging and writing model-f16.gguf, model-q8_0.gguf and Modelfile".into(),
                )?;
                export_gguf(&loaded.files, &loaded.format, &tuned, out)
                    .map_err(failed("cannot write the GGUF files"))?;
            }
        }
    }
    Ok(())
}

impl App {
    /// The Export page's state (tests).
    pub fn export_state(&self) -> &ExportPage {
        &self.export
    }

    pub fn is_exporting(&self) -> bool {
        self.export.is_running()
    }

    pub(crate) fn set_export_adapter(&mut self, path: &Path) {
        self.export.adapter_text = path.display().to_string();
        self.export.refresh_out();
    }

    pub(crate) fn set_export_out(&mut self, path: &Path) {
        self.export.out_text = path.display().to_string();
        self.export.out_auto = false;
    }

    fn start_export(&mut self, ctx: &egui::Context) {
        if self.export.is_running() {
            return;
        }
        let format = self.export.format;
        let adapter = PathBuf::from(self.export.adapter_text.trim());
        let out = PathBuf::from(self.export.out_text.trim());
        if adapter.as_os_str().is_empty() || out.as_os_str().is_empty() {
            self.report(
                "Nothing to export",
                "Export needs an adapter and an output folder.",
                "Pick a run above (or type an adapter folder) and an output folder.",
            );
            return;
        }
        let model = self.models.card.as_ref().map(|c| c.path.clone());
        if format.needs_model() && model.is_none() {
            self.report(
                "No base model is open",
                format!("A {} export folds the adapter into its base model.", format.title()),
                "Open the model the adapter was trained on, on the Models page.",
            );
            return;
        }
        let spec = model.map(|m| m.display().to_string());
        let stream = Stream::spawn("finch-export", ctx, move |send, cancel| {
            // Never write into (or later delete) a folder holding something else.
            let existed = out.exists();
            if existed {
                let empty = std::fs::read_dir(&out).map(|mut d| d.next().is_none());
                match empty {
                    Ok(true) => {}
                    Ok(false) => {
                        send(ExportMsg::Failed(format!(
                            "{} is not empty; export into a new or empty folder",
                            out.display()
                        )));
                        return;
                    }
                    Err(e) => {
                        send(ExportMsg::Failed(format!("cannot read {}: {e}", out.display())));
                        return;
                    }
                }
            }
            match run_export(send, cancel, format, &adapter, spec.as_deref(), &out) {
                Ok(()) => send(ExportMsg::Done(list_files(&out))),
                Err(early) => {
                    // A partial export is worse than none: remove what was written.
                    let _ = std::fs::remove_dir_all(&out);
                    if existed {
                        let _ = std::fs::create_dir_all(&out);
                    }
                    send(match early {
                        Early::Cancelled => ExportMsg::Cancelled,
                        Early::Failed(e) => ExportMsg::Failed(e),
                    });
                }
            }
        });
        match stream {
            Ok(stream) => {
                self.export.job = Some(stream);
                self.export.cancelling = false;
                self.export.stage = None;
                self.export.result = None;
                self.export.status = "Starting…".into();
            }
            Err(e) => self.report("Cannot start the export", e, "Restart Finch."),
        }
    }

    pub(crate) fn poll_export(&mut self) {
        let Some(job) = &mut self.export.job else {
            return;
        };
        let events = job.drain();
        let finished = job.is_finished();
        let out = PathBuf::from(self.export.out_text.trim());
        for event in events {
            match event {
                ExportMsg::Stage { index, total, text } => {
                    self.export.status.clear();
                    self.export.stage = Some((index, total, text));
                }
                ExportMsg::Done(files) => {
                    let format = self.export.format;
                    let ollama_command = (format == ExportFormat::Gguf).then(|| {
                        format!(
                            "cd \"{}\" && ollama create {} -f Modelfile",
                            out.display(),
                            ollama_name(&out)
                        )
                    });
                    self.export.stage = None;
                    self.export.status = "Export finished.".into();
                    self.export.result = Some(ExportResult {
                        format,
                        out: out.clone(),
                        files,
                        ollama_command,
                    });
                }
                ExportMsg::Cancelled => {
                    self.export.stage = None;
                    self.export.status = "Export cancelled; the partial output was removed.".into();
                }
                ExportMsg::Failed(e) => {
                    self.export.stage = None;
                    self.export.status = "Export failed; any partial output was removed.".into();
                    self.report(
                        "Export failed",
                        e,
                        "Check that the adapter was trained on the open model and that the output folder is \
                         writable and new or empty.",
                    );
                }
            }
        }
        if finished {
            self.export.job = None;
            self.export.cancelling = false;
        }
    }

    pub(crate) fn export_page_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        ui.heading("Export");
        ui.add_space(6.0);
        let running = self.export.is_running();
        let runs: Vec<(String, PathBuf)> = self.chat.adapters().cloned().collect();
        ui.add_enabled_ui(!running, |ui| {
            ui.group(|ui| {
                ui.horizontal(|ui| {
                    ui.label("Model");
                    match &self.models.card {
                        Some(card) => ui.label(format!("{} ({})", card.name, card.family)),
                        None => ui.label(
                            egui::RichText::new("none: open one on the Models page (PEFT export does not need it)")
                                .weak(),
                        ),
                    };
                });
                ui.horizontal_wrapped(|ui| {
                    ui.label("Run");
                    if runs.is_empty() {
                        ui.label(egui::RichText::new("no finished runs yet: type an adapter folder below").weak());
                    }
                    for (name, dir) in &runs {
                        let selected = Path::new(self.export.adapter_text.trim()) == dir.as_path();
                        if ui
                            .radio(selected, name)
                            .on_hover_text(dir.display().to_string())
                            .clicked()
                        {
                            self.set_export_adapter(dir);
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
                                    egui::TextEdit::singleline(&mut self.export.adapter_text)
                                        .hint_text("path to a run or adapter folder")
                                        .desired_width(380.0),
                                )
                                .labelled_by(label.id);
                            if edit.changed() {
                                self.export.refresh_out();
                            }
                            if ui.button("Browse…").clicked() {
                                let start = self.settings.runs_dir.clone();
                                self.start_pick(&ctx, PickPurpose::ExportAdapter, Some(&start));
                            }
                        });
                        ui.end_row();

                        ui.label("Format")
                            .on_hover_text("Which files to write; hover over a choice for what it is for.");
                        ui.vertical(|ui| {
                            for f in ExportFormat::ALL {
                                if ui
                                    .radio_value(&mut self.export.format, f, f.title())
                                    .on_hover_text(f.description())
                                    .changed()
                                {
                                    self.export.refresh_out();
                                }
                            }
                        });
                        ui.end_row();

                        let label = ui
                            .label("Output folder")
                            .on_hover_text("A new or empty folder; it is created if missing.");
                        ui.horizontal(|ui| {
                            let edit = ui
                                .add(
                                    egui::TextEdit::singleline(&mut self.export.out_text)
                                        .hint_text("new folder for the exported files")
                                        .desired_width(380.0),
                                )
                                .labelled_by(label.id);
                            if edit.changed() {
                                self.export.out_auto = false;
                            }
                            if ui.button("Browse…").clicked() {
                                let start = self.settings.runs_dir.clone();
                                self.start_pick(&ctx, PickPurpose::ExportFolder, Some(&start));
                            }
                        });
                        ui.end_row();
                    });
            });
        });
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            let ready = !self.export.adapter_text.trim().is_empty()
                && !self.export.out_text.trim().is_empty()
                && (!self.export.format.needs_model() || self.models.card.is_some());
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
                self.start_export(&ctx);
            }
            if running {
                if ui
                    .add_enabled(!self.export.cancelling, egui::Button::new("Cancel"))
                    .on_hover_text("Stops after the current stage and removes the partial output.")
                    .clicked()
                {
                    if let Some(job) = &self.export.job {
                        job.cancel.store(true, Ordering::Relaxed);
                    }
                    self.export.cancelling = true;
                }
                ui.spinner();
            }
        });
        if let Some((index, total, text)) = &self.export.stage {
            ui.add(
                egui::ProgressBar::new((*index as f32 - 1.0) / *total as f32)
                    .text(format!("Step {index} of {total}: {text}…")),
            );
            if self.export.cancelling {
                ui.label("Cancelling after this step…");
            }
        }
        if !self.export.status.is_empty() {
            ui.label(&self.export.status);
        }
        if let Some(result) = &self.export.result {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_names_are_valid() {
        assert_eq!(ollama_name(Path::new("/r/Tiny Llama v2/export-gguf")), "tiny-llama-v2");
        assert_eq!(ollama_name(Path::new("/r/smol.capitals/export-gguf")), "smol.capitals");
        assert_eq!(ollama_name(Path::new("/export-gguf")), "export-gguf");
        assert_eq!(ollama_name(Path::new("/…/export-gguf")), "finch-model");
    }
}
