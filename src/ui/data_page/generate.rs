//! The Data page's Generate panel: runs one of the engine's generators
//! ([`crate::data::generate`]) with the model open on the Models page, on a named background
//! thread whose events arrive over a channel; the generated rows are listed live, each with
//! Accept (adds it to the dataset through the editor, with its provenance, so Undo takes it
//! back) and Reject.

use std::path::PathBuf;
use std::time::Instant;

use eframe::egui;

use crate::data::generate::{self as gen, GenEvent, GenSettings, GenSummary, GeneratedRow, LocalModel, Method};
use crate::data::meta::RowMeta;
use crate::data::Example;
use crate::ui::worker::Stream;

/// What the generator thread sends.
pub enum GenMsg {
    Event(GenEvent),
    Done(Result<GenSummary, String>),
}

/// A generated row waiting for the user's decision.
pub struct Candidate {
    pub row: GeneratedRow,
    pub decided: bool,
}

pub struct GeneratePanel {
    pub method: Method,
    /// Seed rows (Self-Instruct), rows to evolve (Evol-Instruct) or documents (back-translation).
    pub input_text: String,
    pub out_text: String,
    pub settings: GenSettings,
    pub count_text: String,
    pub running: Option<Stream<GenMsg>>,
    started: Option<Instant>,
    pub candidates: Vec<Candidate>,
    /// (rows in the output, target, attempts, rejections so far).
    pub progress: (usize, Option<usize>, usize, usize),
    pub status: String,
    /// Last rejection reasons, newest last (a few shown).
    pub rejections: Vec<String>,
    /// A run's (or PEFT) adapter applied to the Models page's model while generating.
    pub adapter: Option<PathBuf>,
    /// Run a Q4_1/Q8_0 GGUF on its own blocks (about 3× faster than f32 on a CPU).
    pub quantized: bool,
}

impl Default for GeneratePanel {
    fn default() -> Self {
        GeneratePanel {
            method: Method::SelfInstruct,
            input_text: String::new(),
            out_text: "generated.jsonl".into(),
            settings: GenSettings::default(),
            count_text: "20".into(),
            running: None,
            started: None,
            candidates: vec![],
            progress: (0, None, 0, 0),
            status: String::new(),
            rejections: vec![],
            adapter: None,
            quantized: false,
        }
    }
}

fn is_gguf(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl GeneratePanel {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts a run with the model at `model` (the Models page's). Errors are put in `status`.
    pub fn start(&mut self, ctx: &egui::Context, model: Option<PathBuf>) {
        let Some(model) = model else {
            self.status = "Open a model on the Models page first: it generates the rows.".into();
            return;
        };
        let input = PathBuf::from(self.input_text.trim());
        if self.input_text.trim().is_empty() {
            self.status = "Choose the input file (or documents folder) first.".into();
            return;
        }
        let mut settings = self.settings.clone();
        settings.count = match self.count_text.trim() {
            "" => None,
            t => match t.parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    self.status = format!("Rows: `{t}` is not a positive whole number.");
                    return;
                }
            },
        };
        if let Err(e) = settings.validate() {
            self.status = e.to_string();
            return;
        }
        let quantized = self.quantized;
        if quantized && !is_gguf(&model) {
            self.status = "Quantized: the model open on the Models page is not a GGUF file.".into();
            return;
        }
        let adapter = self.adapter.clone();
        let out = PathBuf::from(self.out_text.trim());
        let method = self.method;
        let target = settings.count;
        let spawned = Stream::spawn("finch-data-generate", ctx, move |send: &dyn Fn(GenMsg), cancel| {
            let result = (|| -> crate::error::Result<GenSummary> {
                let mut local = LocalModel::open(&model.to_string_lossy(), adapter.as_deref(), quantized)?;
                let mut on_event = |e: GenEvent| send(GenMsg::Event(e));
                let mut run = gen::Run {
                    model: &mut local,
                    settings: &settings,
                    out: &out,
                    cancel,
                    on_event: &mut on_event,
                };
                gen::run(method, &input, &mut run)
            })();
            send(GenMsg::Done(result.map_err(|e| e.to_string())));
        });
        match spawned {
            Ok(stream) => {
                self.running = Some(stream);
                self.started = Some(Instant::now());
                self.candidates.clear();
                self.rejections.clear();
                self.progress = (0, target, 0, 0);
                self.status = format!("Loading the model and generating ({}) ...", method.name());
            }
            Err(e) => self.status = e,
        }
    }

    pub fn cancel(&mut self) {
        if let Some(s) = &self.running {
            s.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            self.status = "Stopping after the current model call ...".into();
        }
    }

    /// Takes what the thread sent; never blocks.
    pub fn poll(&mut self) {
        let Some(stream) = self.running.as_mut() else {
            return;
        };
        for msg in stream.drain() {
            match msg {
                GenMsg::Event(GenEvent::Row { row, .. }) => self.candidates.push(Candidate {
                    row: *row,
                    decided: false,
                }),
                GenMsg::Event(GenEvent::Rejected { reason, detail, .. }) => {
                    self.progress.3 += 1;
                    self.rejections.push(format!("{}: {detail}", reason.name()));
                    if self.rejections.len() > 50 {
                        self.rejections.remove(0);
                    }
                }
                GenMsg::Event(GenEvent::Progress {
                    kept, target, attempts, ..
                }) => {
                    self.progress.0 = kept;
                    self.progress.1 = target;
                    self.progress.2 = attempts;
                }
                GenMsg::Event(GenEvent::Warning { message }) => self.status = message,
                GenMsg::Done(Ok(s)) => {
                    self.status = format!(
                        "{}: {} rows in {} ({} new){}{}; {} tokens generated in {:.0} s ({:.1} tokens/s)",
                        s.method.name(),
                        s.rows,
                        s.out.display(),
                        s.kept,
                        if s.cancelled { ", stopped" } else { "" },
                        if s.gave_up {
                            ", gave up after too many rejections"
                        } else {
                            ""
                        },
                        s.generated_tokens,
                        s.elapsed_secs,
                        s.generated_tokens as f64 / s.elapsed_secs.max(1e-9)
                    );
                }
                GenMsg::Done(Err(e)) => self.status = e,
            }
        }
        if stream.is_finished() {
            self.running = None;
        }
    }

    /// Seconds left at the pace so far (`None` before the first row or without a target).
    pub fn eta_secs(&self) -> Option<f64> {
        let (rows, target, _, _) = self.progress;
        let new = self.candidates.len();
        let elapsed = self.started?.elapsed().as_secs_f64();
        let left = target?.checked_sub(rows)?;
        (new > 0).then(|| elapsed / new as f64 * left as f64)
    }

    /// Draws the panel; returns the rows the user accepted this frame, each with its provenance.
    /// `adapters` are the (name, folder) adapters the runs folder and the Chat page offer.
    pub fn ui(
        &mut self,
        ui: &mut egui::Ui,
        model: Option<PathBuf>,
        adapters: &[(String, PathBuf)],
    ) -> Vec<(Example, RowMeta)> {
        let mut accepted = vec![];
        ui.strong("Generate rows with the local model");
        let running = self.is_running();
        ui.add_enabled_ui(!running, |ui| {
            ui.horizontal(|ui| {
                ui.label("Adapter:");
                let name = |a: &Option<PathBuf>| match a {
                    None => "none (the base model)".to_string(),
                    Some(p) => adapters
                        .iter()
                        .find(|(_, d)| d == p)
                        .map_or_else(|| p.display().to_string(), |(n, _)| n.clone()),
                };
                egui::ComboBox::from_id_salt("generate-adapter")
                    .selected_text(name(&self.adapter))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut self.adapter, None, name(&None));
                        for (n, d) in adapters {
                            ui.selectable_value(&mut self.adapter, Some(d.clone()), n);
                        }
                    });
                let gguf = model.as_deref().is_some_and(is_gguf);
                if !gguf {
                    self.quantized = false;
                }
                ui.add_enabled(gguf, egui::Checkbox::new(&mut self.quantized, "Quantized (GGUF)"))
                    .on_hover_text("Runs the GGUF's Q4_1/Q8_0 blocks as they are: about 3× faster than f32.")
                    .on_disabled_hover_text("The model open on the Models page is not a GGUF file.");
            });
            ui.horizontal(|ui| {
                for m in Method::ALL {
                    ui.radio_value(&mut self.method, m, m.name());
                }
            });
            ui.horizontal(|ui| {
                let label = ui.label(match self.method {
                    Method::SelfInstruct => "Seed rows (≥ 3):",
                    Method::EvolInstruct => "Rows to evolve:",
                    Method::BackTranslation => "Documents (file or folder):",
                });
                ui.text_edit_singleline(&mut self.input_text).labelled_by(label.id);
            });
            ui.horizontal(|ui| {
                let label = ui.label("Output JSONL (continued if it exists):");
                ui.text_edit_singleline(&mut self.out_text).labelled_by(label.id);
            });
            ui.horizontal(|ui| {
                let label = ui.label("Rows:");
                ui.add(egui::TextEdit::singleline(&mut self.count_text).desired_width(50.0))
                    .labelled_by(label.id);
                ui.label("Temperature:");
                ui.add(
                    egui::DragValue::new(&mut self.settings.temperature)
                        .range(0.0..=2.0)
                        .speed(0.05),
                );
                ui.label("Seed:");
                ui.add(egui::DragValue::new(&mut self.settings.seed));
                ui.label("Max new tokens:");
                ui.add(egui::DragValue::new(&mut self.settings.max_new_tokens).range(1..=4096));
                if self.method == Method::BackTranslation {
                    ui.label("Min score:");
                    ui.add(egui::DragValue::new(&mut self.settings.min_score).range(1..=5));
                }
            });
        });
        ui.horizontal(|ui| {
            if running {
                if ui.button("Cancel").clicked() {
                    self.cancel();
                }
            } else if ui.button("Generate").clicked() {
                self.start(ui.ctx(), model);
            }
            let (rows, target, attempts, rejected) = self.progress;
            if running || attempts > 0 {
                let target = target.map_or("—".to_string(), |t| t.to_string());
                let mut text = format!("{rows} / {target} rows, {attempts} prompts, {rejected} rejected");
                if let Some(eta) = self.eta_secs().filter(|_| running) {
                    text.push_str(&format!(", about {eta:.0} s left"));
                }
                ui.label(text);
            }
        });
        if !self.status.is_empty() {
            ui.label(egui::RichText::new(&self.status).italics());
        }
        if !self.candidates.is_empty() {
            let undecided = self.candidates.iter().filter(|c| !c.decided).count();
            ui.horizontal(|ui| {
                ui.label(format!("{undecided} generated rows to review"));
                if undecided > 0 && ui.button("Accept all").clicked() {
                    for c in self.candidates.iter_mut().filter(|c| !c.decided) {
                        c.decided = true;
                        accepted.push((c.row.example(), c.row.meta()));
                    }
                }
            });
            egui::ScrollArea::vertical()
                .id_salt("generated-rows")
                .max_height(220.0)
                .show(ui, |ui| {
                    for (i, c) in self.candidates.iter_mut().enumerate().filter(|(_, c)| !c.decided) {
                        ui.horizontal(|ui| {
                            if ui.small_button("Accept").clicked() {
                                c.decided = true;
                                accepted.push((c.row.example(), c.row.meta()));
                            }
                            if ui.small_button("Reject").clicked() {
                                c.decided = true;
                            }
                            ui.label(format!(
                                "{}. {} — {}",
                                i + 1,
                                super::one_line(&c.row.instruction, 60),
                                super::one_line(&c.row.output, 60)
                            ));
                        });
                    }
                });
        }
        if !self.rejections.is_empty() {
            egui::CollapsingHeader::new(format!("Rejected ({})", self.progress.3))
                .id_salt("generated-rejections")
                .show(ui, |ui| {
                    for r in self.rejections.iter().rev().take(10) {
                        ui.label(r);
                    }
                });
        }
        accepted
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::tiny::TinySpec;
    use crate::model::Family;

    #[test]
    fn the_panel_runs_the_engine_on_a_named_thread_and_reports_the_summary() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        TinySpec::new(Family::Llama).write(&model).unwrap();
        let seeds = dir.path().join("seeds.jsonl");
        let rows: String = [
            "Write a haiku about the sea.",
            "List three uses of copper.",
            "Explain how rain forms.",
        ]
        .iter()
        .map(|s| format!("{}\n", serde_json::json!({"instruction": s, "output": "An answer."})))
        .collect();
        std::fs::write(&seeds, rows).unwrap();
        let ctx = egui::Context::default();
        let mut panel = GeneratePanel::default();
        panel.start(&ctx, Some(model.clone()));
        assert!(panel.status.contains("input file"), "{}", panel.status);
        panel.input_text = seeds.display().to_string();
        panel.out_text = dir.path().join("out.jsonl").display().to_string();
        panel.count_text = "2".into();
        panel.settings.max_new_tokens = 16;
        panel.settings.max_attempts = Some(3);
        panel.start(&ctx, None);
        assert!(panel.status.contains("Models page"), "{}", panel.status);
        // The quantized path needs a GGUF; the tiny model is a folder.
        panel.quantized = true;
        panel.start(&ctx, Some(model.clone()));
        assert!(panel.status.contains("not a GGUF"), "{}", panel.status);
        panel.quantized = false;
        panel.start(&ctx, Some(model));
        assert!(panel.is_running());
        while panel.is_running() {
            std::thread::sleep(std::time::Duration::from_millis(20));
            panel.poll();
        }
        assert!(panel.status.starts_with("self-instruct: "), "{}", panel.status);
        assert_eq!(panel.progress.2, 3);
        assert_eq!(panel.progress.1, Some(2));
    }
}
