//! Drawing the Train page: inputs, Start / Stop / Resume / Preflight, the live curves and probe
//! timeline, the settings (one `*_ui` function per section) and the past runs.

use std::path::PathBuf;

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints, PlotUi, Points, VLine};

use crate::data::LossOn;
use crate::lora::Target;
use crate::train::config::Precision;
use crate::train::presets::Preset;
use crate::train::{Duration, Method, Schedule, TrainConfig};

use super::{
    downsample, probe_prompts_of, suggested_run_name, ProbeRound, TrainPage, LOSS_PLOT_HEIGHT, MAX_DRAWN_POINTS,
    PREFLIGHT_STEPS,
};
use crate::ui::shared::Shared;
use crate::ui::widgets::{format_duration, knob_row};
use crate::ui::worker::PickPurpose;

impl TrainPage {
    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let ctx = ui.ctx().clone();
        ui.heading("Train");
        ui.add_space(6.0);
        let running = self.is_running();

        ui.group(|ui| self.inputs_ui(ui, shared, running));
        ui.add_space(8.0);
        self.run_controls_ui(ui, shared, running);
        if !self.status.is_empty() {
            ui.label(&self.status);
        }
        if !self.preflight_status.is_empty() {
            ui.label(&self.preflight_status);
        }
        for note in &self.notes {
            ui.label(egui::RichText::new(note).small().weak());
        }
        ui.add_space(8.0);
        // Curves come before the settings so a running (or shown) run is visible without scrolling.
        self.live_plots_ui(ui);
        ui.add_space(8.0);
        egui::CollapsingHeader::new("Training settings")
            .default_open(true)
            .show(ui, |ui| ui.add_enabled_ui(!running, |ui| self.settings_ui(ui, shared)));
        ui.add_space(12.0);
        self.history_ui(ui, &ctx, shared);
    }

    /// The open model, the data file and the run name.
    fn inputs_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared, running: bool) {
        egui::Grid::new("train-inputs")
            .num_columns(2)
            .spacing([12.0, 8.0])
            .show(ui, |ui| {
                ui.label("Model");
                match &shared.model {
                    Some(card) => ui.label(format!("{} ({})", card.name, card.family)),
                    None => ui.label(egui::RichText::new("none: open one on the Models page").weak()),
                };
                ui.end_row();
                let data_label = ui.label("Data file").on_hover_text(
                    "A JSONL file: one example per line, with Alpaca fields (instruction, input, output) or \
                 OpenAI `messages`.",
                );
                ui.horizontal(|ui| {
                    let edit = ui.add_enabled(
                        !running,
                        egui::TextEdit::singleline(&mut self.data_path)
                            .hint_text("path to a .jsonl file")
                            .desired_width(380.0),
                    );
                    edit.labelled_by(data_label.id);
                    if ui.add_enabled(!running, egui::Button::new("Browse…")).clicked() {
                        shared.pick(PickPurpose::DataFile, None);
                    }
                });
                ui.end_row();
                let name_label = ui
                    .label("Run name")
                    .on_hover_text("The run's folder under the runs folder; a number is added if it exists.");
                let hint = suggested_run_name(shared.model.as_ref().map(|c| c.name.as_str()), &self.data_path);
                ui.add_enabled(
                    !running,
                    egui::TextEdit::singleline(&mut self.run_name)
                        .hint_text(hint)
                        .desired_width(380.0),
                )
                .labelled_by(name_label.id);
                ui.end_row();
            });
    }

    /// Start / Preflight / Stop / Resume.
    fn run_controls_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared, running: bool) {
        let ctx = ui.ctx().clone();
        let preflighting = self.is_preflighting();
        ui.horizontal(|ui| {
            let ready = shared.model.is_some() && !self.data_path.trim().is_empty();
            let can_start = !running && !preflighting && ready;
            let start = ui
                .add_enabled(
                    can_start,
                    egui::Button::new(egui::RichText::new("Start training").size(18.0)),
                )
                .on_hover_text("Trains a LoRA adapter on the data; the base model is not changed.");
            if !can_start && !running {
                start.on_disabled_hover_text(if ready {
                    "Wait for the preflight to finish or cancel it."
                } else {
                    "Open a model and pick a data file first."
                });
            } else if start.clicked() {
                self.start_training(&ctx, shared, None);
            }
            if preflighting {
                if ui
                    .button("Cancel preflight")
                    .on_hover_text("Stops the measurement after the current step.")
                    .clicked()
                {
                    self.cancel_preflight();
                }
                ui.spinner();
            } else if !running {
                let preflight = ui
                    .add_enabled(ready, egui::Button::new("Preflight"))
                    .on_hover_text(format!(
                        "Runs {PREFLIGHT_STEPS} real training steps with these settings, writing nothing, and \
                         reports seconds per step, tokens/s, peak memory and how long the whole run would take."
                    ));
                if preflight.clicked() {
                    self.start_preflight(&ctx, shared);
                }
            }
            if running {
                let stopping = self.session.as_ref().is_some_and(|s| s.stopping);
                let stop = ui
                    .add_enabled(!stopping, egui::Button::new(egui::RichText::new("Stop").size(18.0)))
                    .on_hover_text("Stops after the current step and saves a checkpoint you can resume.");
                if stop.clicked() {
                    self.request_stop();
                }
                ui.spinner();
                if stopping {
                    ui.label("Stopping after this step…");
                }
            } else if let Some(dir) = self.resumable_last_run(shared) {
                if ui
                    .button(egui::RichText::new("Resume").size(18.0))
                    .on_hover_text(format!("Continues {} from its newest checkpoint.", dir.display()))
                    .clicked()
                {
                    self.start_training(&ctx, shared, Some(&dir));
                }
            }
        });
    }

    /// The last run of this window (or of the last launch), when it stopped with steps left.
    fn resumable_last_run(&self, shared: &Shared) -> Option<PathBuf> {
        let last = self
            .session
            .as_ref()
            .map(|s| s.run_dir.clone())
            .or_else(|| shared.settings.last_run.clone())?;
        shared
            .runs()
            .iter()
            .find(|r| r.dir == last && r.resumable())
            .map(|r| r.dir.clone())
    }

    /// Presets, then the trainer settings in two grids of sections, then the probe prompts.
    fn settings_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        presets_ui(ui, &mut shared.settings.train);
        ui.add_space(4.0);
        if self.data_is_preference() {
            egui::Grid::new("train-method")
                .num_columns(2)
                .spacing([12.0, 6.0])
                .show(ui, |ui| method_ui(ui, &mut shared.settings.train));
            ui.add_space(4.0);
        }
        let cfg = &mut shared.settings.train;
        ui.columns(2, |cols| {
            egui::Grid::new("train-knobs-a")
                .num_columns(2)
                .spacing([12.0, 6.0])
                .show(&mut cols[0], |ui| {
                    duration_ui(ui, cfg);
                    lora_ui(ui, cfg);
                    loss_ui(ui, cfg);
                });
            egui::Grid::new("train-knobs-b")
                .num_columns(2)
                .spacing([12.0, 6.0])
                .show(&mut cols[1], |ui| {
                    optimizer_ui(ui, cfg);
                    batch_ui(ui, cfg);
                    regularization_ui(ui, cfg);
                    evaluation_ui(ui, cfg);
                    hardware_ui(ui, cfg, shared.model.as_ref().map(|c| &c.config));
                });
        });
        ui.add_space(6.0);
        self.probe_settings_ui(ui, shared);
    }

    /// The three probe prompt fields and the answer length.
    fn probe_settings_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let inputs = &mut self.probe_inputs;
        let cfg = &mut shared.settings.train;
        // Settings changed elsewhere (a relaunch, a test) refill the fields.
        if probe_prompts_of(inputs) != cfg.probe_prompts {
            *inputs = Default::default();
            for (field, prompt) in inputs.iter_mut().zip(&cfg.probe_prompts) {
                field.clone_from(prompt);
            }
        }
        let mut changed = false;
        egui::Grid::new("train-probes")
            .num_columns(2)
            .spacing([12.0, 6.0])
            .show(ui, |ui| {
                for (i, field) in inputs.iter_mut().enumerate() {
                    knob_row(
                        ui,
                        &format!("Probe prompt {}", i + 1),
                        "A question the model answers before training, at every evaluation and at the end, so you can \
                     watch its answers change beside the loss curve; leave it empty for none.",
                        |ui| {
                            let r = ui.add(
                                egui::TextEdit::singleline(field)
                                    .hint_text("e.g. a question from your data")
                                    .desired_width(480.0),
                            );
                            changed |= r.changed();
                            r
                        },
                    );
                }
                knob_row(
                    ui,
                    "Probe answer length",
                    "The longest probe answer in tokens; longer answers show more but slow every evaluation down.",
                    |ui| ui.add(egui::DragValue::new(&mut cfg.probe_max_tokens).range(1..=1024)),
                );
            });
        if changed {
            cfg.probe_prompts = probe_prompts_of(inputs);
        }
    }

    fn live_plots_ui(&mut self, ui: &mut egui::Ui) {
        let running = self.is_running();
        let marked_step = self.highlighted_step;
        let highlighted = &mut self.highlighted_step;
        let live = &self.live;
        if live.loss.is_empty() && !running {
            return;
        }
        ui.horizontal(|ui| {
            ui.label(egui::RichText::new(format!("Step {} / {}", live.step, live.total_steps)).strong());
            if live.total_steps > 0 {
                ui.add(
                    egui::ProgressBar::new(live.step as f32 / live.total_steps as f32)
                        .desired_width(200.0)
                        .show_percentage(),
                );
            }
            if let Some(last) = live.loss.last() {
                ui.label(format!("loss {:.4}", last[1]));
            }
            if let Some(last) = live.eval_loss.last() {
                ui.label(format!("eval loss {:.4}", last[1]));
            }
            if live.tokens_per_sec > 0.0 {
                ui.label(format!("{:.0} tokens/s", live.tokens_per_sec));
            }
            if let Some((text, hint)) = live.padding_text() {
                let label = if hint {
                    egui::RichText::new(text).color(ui.visuals().warn_fg_color)
                } else {
                    egui::RichText::new(text)
                };
                ui.label(label).on_hover_text(
                    "The share of the positions the steps so far computed that were padding: without packing, \
                     every row of a batch is padded to its longest. Packing (SFT only) fills rows with several \
                     short examples instead.",
                );
            }
            if running && live.step > 0 {
                ui.label(format!("ETA {}", format_duration(live.eta_secs)));
            }
        });
        let draw_loss = |plot: &mut PlotUi| {
            plot.line(
                Line::new(
                    "training loss",
                    PlotPoints::new(downsample(&live.loss, MAX_DRAWN_POINTS)),
                )
                .width(1.0),
            );
            plot.line(
                Line::new(
                    "smoothed",
                    PlotPoints::new(downsample(&live.loss_smoothed, MAX_DRAWN_POINTS)),
                )
                .width(2.5),
            );
            if !live.eval_loss.is_empty() {
                plot.line(Line::new("eval loss", PlotPoints::new(live.eval_loss.clone())).width(2.0));
                plot.points(Points::new("eval loss", PlotPoints::new(live.eval_loss.clone())).radius(4.0));
            }
            if let Some(step) = marked_step {
                plot.vline(
                    VLine::new(format!("probe step {step}"), step as f64)
                        .color(egui::Color32::from_rgb(230, 140, 30))
                        .width(1.5),
                );
            }
        };
        let loss_plot = Plot::new("loss-plot")
            .height(LOSS_PLOT_HEIGHT)
            .legend(Legend::default())
            .x_axis_label("step")
            .y_axis_label("loss");
        if live.probes.is_empty() {
            loss_plot.show(ui, draw_loss);
        } else {
            // The probe timeline sits beside the curve so answers and loss are read together.
            let plot_width = (ui.available_width() * 0.62).max(200.0);
            ui.horizontal_top(|ui| {
                loss_plot.width(plot_width).show(ui, draw_loss);
                ui.vertical(|ui| probe_timeline_ui(ui, &live.probes, highlighted));
            });
        }
        ui.columns(2, |cols| {
            Plot::new("lr-plot")
                .height(140.0)
                .x_axis_label("step")
                .y_axis_label("learning rate")
                .show(&mut cols[0], |plot| {
                    plot.line(Line::new(
                        "learning rate",
                        PlotPoints::new(downsample(&live.lr, MAX_DRAWN_POINTS)),
                    ));
                });
            Plot::new("grad-norm-plot")
                .height(140.0)
                .x_axis_label("step")
                .y_axis_label("gradient norm")
                .show(&mut cols[1], |plot| {
                    plot.line(Line::new(
                        "gradient norm",
                        PlotPoints::new(downsample(&live.grad_norm, MAX_DRAWN_POINTS)),
                    ));
                });
        });
        Self::reward_plots_ui(ui, live);
    }

    /// DPO / ORPO runs: the reward margin and the reward accuracy, training steps and
    /// evaluations.
    fn reward_plots_ui(ui: &mut egui::Ui, live: &super::LiveCurves) {
        if live.reward_margin.is_empty() && live.eval_reward_margin.is_empty() {
            return;
        }
        let series = |plot: &mut PlotUi, name: &str, train: &[[f64; 2]], eval: &[[f64; 2]]| {
            plot.line(Line::new(name.to_string(), PlotPoints::new(downsample(train, MAX_DRAWN_POINTS))).width(1.0));
            if !eval.is_empty() {
                let label = format!("eval {name}");
                plot.line(Line::new(label.clone(), PlotPoints::new(eval.to_vec())).width(2.0));
                plot.points(Points::new(label, PlotPoints::new(eval.to_vec())).radius(4.0));
            }
        };
        ui.columns(2, |cols| {
            Plot::new("reward-margin-plot")
                .height(140.0)
                .legend(Legend::default())
                .x_axis_label("step")
                .y_axis_label("reward margin")
                .show(&mut cols[0], |plot| {
                    series(plot, "reward margin", &live.reward_margin, &live.eval_reward_margin)
                });
            Plot::new("reward-accuracy-plot")
                .height(140.0)
                .legend(Legend::default())
                .x_axis_label("step")
                .y_axis_label("reward accuracy")
                .include_y(0.0)
                .include_y(1.0)
                .show(&mut cols[1], |plot| {
                    series(
                        plot,
                        "reward accuracy",
                        &live.reward_accuracy,
                        &live.eval_reward_accuracy,
                    )
                });
        });
    }

    fn history_ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context, shared: &mut Shared) {
        ui.horizontal(|ui| {
            ui.heading("Past runs");
            if ui.small_button("Refresh").clicked() {
                shared.requests.rescan_runs = true;
            }
            ui.label(
                egui::RichText::new(shared.settings.runs_dir.display().to_string())
                    .small()
                    .weak(),
            );
        });
        if shared.runs().is_empty() {
            ui.label(egui::RichText::new("No runs yet in the runs folder.").weak());
        }
        let running = self.is_running();
        let mut resume = None;
        let mut show = None;
        egui::Grid::new("run-history")
            .striped(true)
            .num_columns(6)
            .show(ui, |ui| {
                if !shared.runs().is_empty() {
                    for head in ["Compare", "Run", "Steps", "Final loss", "Eval loss", ""] {
                        ui.label(egui::RichText::new(head).strong());
                    }
                    ui.end_row();
                }
                for run in shared.runs() {
                    let mut on = self.overlay.contains(&run.dir);
                    if ui
                        .checkbox(&mut on, "")
                        .on_hover_text("Overlay this run's loss curve in the comparison chart.")
                        .changed()
                    {
                        if on {
                            self.overlay.insert(run.dir.clone());
                        } else {
                            self.overlay.remove(&run.dir);
                        }
                    }
                    ui.label(&run.name).on_hover_text(run.dir.display().to_string());
                    ui.label(match run.planned_steps {
                        Some(n) => format!("{} / {n}", run.last_step),
                        None => run.last_step.to_string(),
                    });
                    ui.label(
                        run.loss
                            .last()
                            .map(|p| format!("{:.4}", p[1]))
                            .unwrap_or_else(|| "–".into()),
                    );
                    ui.label(
                        run.eval_loss
                            .last()
                            .map(|p| format!("{:.4}", p[1]))
                            .unwrap_or_else(|| "–".into()),
                    );
                    ui.horizontal(|ui| {
                        if !running
                            && ui
                                .button("Show")
                                .on_hover_text("Show this run's curves above.")
                                .clicked()
                        {
                            show = Some(run.dir.clone());
                        }
                        if run.resumable() && !running {
                            if ui
                                .button("Resume")
                                .on_hover_text("Continue from its newest checkpoint.")
                                .clicked()
                            {
                                resume = Some(run.dir.clone());
                            }
                        } else if run.failed {
                            ui.label(egui::RichText::new("failed").color(ui.visuals().error_fg_color));
                        }
                    });
                    ui.end_row();
                }
            });
        if let Some(dir) = resume {
            self.start_training(ctx, shared, Some(&dir));
        }
        if let Some(dir) = show {
            self.show_run(ctx, shared, &dir);
        }
        if !self.overlay.is_empty() {
            Plot::new("compare-plot")
                .height(220.0)
                .legend(Legend::default())
                .x_axis_label("step")
                .y_axis_label("training loss")
                .show(ui, |plot| {
                    for run in shared.runs().iter().filter(|r| self.overlay.contains(&r.dir)) {
                        plot.line(Line::new(
                            run.name.clone(),
                            PlotPoints::new(downsample(&run.loss, MAX_DRAWN_POINTS)),
                        ));
                    }
                });
        }
        let has_curves = !self.live.loss.is_empty() || !self.overlay.is_empty();
        if has_curves {
            ui.horizontal(|ui| {
                let saving = self.saving_chart.is_some();
                let dir = shared.settings.runs_dir.clone();
                if ui
                    .add_enabled(!saving, egui::Button::new("Save chart as PNG…"))
                    .clicked()
                {
                    shared.pick(PickPurpose::ChartPng, Some(&dir));
                }
                if ui
                    .add_enabled(!saving, egui::Button::new("Save chart as SVG…"))
                    .clicked()
                {
                    shared.pick(PickPurpose::ChartSvg, Some(&dir));
                }
            });
        }
    }
}

/// The probe answers as a vertical strip of steps, newest at the bottom and scrolled into view;
/// clicking a step marks it on the loss plot (clicking it again clears the mark).
fn probe_timeline_ui(ui: &mut egui::Ui, probes: &[ProbeRound], highlighted: &mut Option<usize>) {
    ui.label(egui::RichText::new("Probe answers").strong())
        .on_hover_text("The model's answers to the probe prompts at each evaluation step, newest last.");
    egui::ScrollArea::vertical()
        .id_salt("probe-timeline")
        .max_height(LOSS_PLOT_HEIGHT - 24.0)
        .auto_shrink([false, true])
        .stick_to_bottom(true)
        .show(ui, |ui| {
            for round in probes {
                let selected = *highlighted == Some(round.step);
                let button = ui
                    .selectable_label(selected, egui::RichText::new(format!("Step {}", round.step)).strong())
                    .on_hover_text("Mark this step on the loss plot.");
                if button.clicked() {
                    *highlighted = if selected { None } else { Some(round.step) };
                }
                for answer in &round.answers {
                    ui.label(egui::RichText::new(&answer.prompt).small().weak());
                    let text = if answer.text.trim().is_empty() {
                        "(empty answer)"
                    } else {
                        answer.text.trim()
                    };
                    ui.add(egui::Label::new(text).wrap());
                }
                ui.separator();
            }
        });
}

/// One button per preset; a click sets the knobs the preset is about.
fn presets_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    ui.horizontal(|ui| {
        ui.label("Presets:");
        for preset in Preset::ALL {
            if ui.button(preset.title()).on_hover_text(preset.description()).clicked() {
                preset.apply(cfg);
            }
        }
    });
}

/// How long the run is: a number of steps or of passes over the data.
fn duration_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    let mut by_epochs = matches!(cfg.duration, Duration::Epochs(_));
    knob_row(
        ui,
        "Length",
        "Train for a number of optimizer steps, or for whole passes (epochs) over the data.",
        |ui| {
            let r = ui.horizontal(|ui| {
                ui.selectable_value(&mut by_epochs, false, "Steps");
                ui.selectable_value(&mut by_epochs, true, "Epochs");
            });
            r.response
        },
    );
    match (cfg.duration, by_epochs) {
        (Duration::Steps(_), true) => cfg.duration = Duration::Epochs(1.0),
        (Duration::Epochs(_), false) => cfg.duration = Duration::Steps(100),
        _ => {}
    }
    match &mut cfg.duration {
        Duration::Steps(steps) => knob_row(
            ui,
            "Steps",
            "How many optimizer updates to run; more steps learn more but take longer.",
            |ui| ui.add(egui::DragValue::new(steps).range(1..=1_000_000)),
        ),
        Duration::Epochs(epochs) => knob_row(
            ui,
            "Epochs",
            "How many times to go through the whole training set; 1–3 is typical.",
            |ui| ui.add(egui::DragValue::new(epochs).range(0.1..=100.0).speed(0.1)),
        ),
    }
}

/// The adapter's shape: rank, alpha, dropout, rsLoRA and the adapted projections.
fn lora_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    knob_row(
        ui,
        "LoRA rank",
        "Size of the adapter matrices; higher learns more detail but trains slower and can overfit.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.lora.r).range(1..=256)),
    );
    knob_row(
        ui,
        "LoRA alpha",
        "Scales how strongly the adapter changes the model; twice the rank is a common choice.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.lora.alpha).range(0.5..=1024.0).speed(0.5)),
    );
    knob_row(
        ui,
        "LoRA dropout",
        "Randomly ignores part of the adapter's input while training, which reduces overfitting on small datasets.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.lora.dropout).range(0.0..=0.5).speed(0.01)),
    );
    knob_row(
        ui,
        "rsLoRA",
        "Scales the adapter by alpha/√rank instead of alpha/rank, which keeps large ranks stable.",
        |ui| ui.checkbox(&mut cfg.lora.use_rslora, ""),
    );
    knob_row(
        ui,
        "Adapted layers",
        "Which projections of every layer get an adapter; all seven learn most, q and v alone train fastest.",
        |ui| {
            let r = ui.horizontal_wrapped(|ui| {
                for target in Target::ALL {
                    let mut on = cfg.lora.targets.contains(&target);
                    if ui.toggle_value(&mut on, target.short()).changed() {
                        if on {
                            cfg.lora.targets.push(target);
                            cfg.lora.targets.sort();
                        } else if cfg.lora.targets.len() > 1 {
                            cfg.lora.targets.retain(|t| *t != target);
                        }
                    }
                }
            });
            r.response
        },
    );
}

/// The objective of a run on preference data: DPO, ORPO, or supervised training on the chosen
/// answers, with each method's strength.
fn method_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    let label = |m: Method| match m {
        Method::Sft => "SFT (chosen answers only)",
        Method::Dpo => "DPO",
        Method::Orpo => "ORPO",
    };
    knob_row(
        ui,
        "Method",
        "This data holds preference pairs (a chosen and a rejected answer). DPO teaches the adapter to prefer \
         the chosen answer over the rejected one relative to the base model; ORPO does it without the base model, \
         adding a supervised loss on the chosen answers; SFT trains on the chosen answers alone.",
        |ui| {
            egui::ComboBox::from_id_salt("method")
                .selected_text(label(cfg.method))
                .show_ui(ui, |ui| {
                    for m in Method::ALL {
                        ui.selectable_value(&mut cfg.method, m, label(m));
                    }
                })
                .response
        },
    );
    match cfg.method {
        Method::Dpo => {
            knob_row(
                ui,
                "Beta (β)",
                "How far the adapter may move away from the base model; smaller values allow bigger changes. \
                 0.1 is the usual choice.",
                |ui| ui.add(egui::DragValue::new(&mut cfg.beta).range(0.001..=10.0).speed(0.01)),
            );
            knob_row(
                ui,
                "Label smoothing",
                "The share of votes you expect to be wrong; above 0 the training trusts each vote less. 0 is plain DPO.",
                |ui| ui.add(egui::DragValue::new(&mut cfg.label_smoothing).range(0.0..=0.49).speed(0.01)),
            );
        }
        Method::Orpo => {
            knob_row(
                ui,
                "Lambda (λ)",
                "Weight of the preference term next to the supervised loss on the chosen answers; 0.1 is the usual \
                 choice, higher pushes harder away from the rejected answers.",
                |ui| ui.add(egui::DragValue::new(&mut cfg.orpo_lambda).range(0.0..=10.0).speed(0.01)),
            );
        }
        Method::Sft => {}
    }
}

/// Which tokens are trained, and the seed.
fn loss_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    knob_row(
        ui,
        "Loss on",
        "Which tokens the model learns to predict: the assistant's answers (usual), every token, or only the last answer.",
        |ui| {
            egui::ComboBox::from_id_salt("loss-on")
                .selected_text(match cfg.loss_on {
                    LossOn::Assistant => "assistant answers",
                    LossOn::All => "all tokens",
                    LossOn::LastTurn => "last answer",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut cfg.loss_on, LossOn::Assistant, "assistant answers");
                    ui.selectable_value(&mut cfg.loss_on, LossOn::All, "all tokens");
                    ui.selectable_value(&mut cfg.loss_on, LossOn::LastTurn, "last answer");
                })
                .response
        },
    );
    knob_row(
        ui,
        "Text overlap",
        "Plain-text files are cut into sequence-length windows; this many tokens of each window repeat the end \
         of the previous one, so no sentence is only ever seen cut in two (0: back to back).",
        |ui| {
            let most = cfg.seq_len.saturating_sub(1);
            ui.add(egui::DragValue::new(&mut cfg.text_overlap).range(0..=most))
        },
    );
    knob_row(
        ui,
        "Thinking",
        "The chat template's enable_thinking (Qwen3): off renders every answer with an empty think block, as \
         transformers' apply_chat_template(..., enable_thinking=False). A model whose template does not read it refuses on or off.",
        |ui| {
            let name = |v: Option<bool>| match v {
                None => "template default",
                Some(true) => "on",
                Some(false) => "off",
            };
            egui::ComboBox::from_id_salt("enable-thinking")
                .selected_text(name(cfg.enable_thinking))
                .show_ui(ui, |ui| {
                    for v in [None, Some(true), Some(false)] {
                        ui.selectable_value(&mut cfg.enable_thinking, v, name(v));
                    }
                })
                .response
        },
    );
    knob_row(
        ui,
        "Seed",
        "Fixes every random choice, so the same settings on the same data give the same run.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.seed)),
    );
}

/// The learning rate, its schedule and warm-up.
fn optimizer_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    knob_row(
        ui,
        "Learning rate",
        "How big each update is; too high makes the loss jump or explode, too low learns almost nothing.",
        |ui| {
            ui.add(
                egui::Slider::new(&mut cfg.lr, 1e-6..=1e-2)
                    .logarithmic(true)
                    .custom_formatter(|v, _| format!("{v:.1e}")),
            )
        },
    );
    knob_row(
        ui,
        "Schedule",
        "How the learning rate changes during the run; cosine lowers it smoothly to zero by the end.",
        |ui| {
            egui::ComboBox::from_id_salt("schedule")
                .selected_text(format!("{:?}", cfg.schedule).to_lowercase())
                .show_ui(ui, |ui| {
                    for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
                        ui.selectable_value(&mut cfg.schedule, s, format!("{s:?}").to_lowercase());
                    }
                })
                .response
        },
    );
    knob_row(
        ui,
        "Warm-up steps",
        "Steps at the start during which the learning rate ramps up from zero, which avoids early jumps.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.warmup_steps).range(0..=100_000)),
    );
}

/// Examples per step and their length.
fn batch_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    knob_row(
        ui,
        "Batch size",
        "Examples per step; larger gives smoother updates but needs more memory.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.batch_size).range(1..=256)),
    );
    knob_row(
        ui,
        "Gradient accumulation",
        "Batches added up before each update, for a larger effective batch without more memory.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.grad_accum).range(1..=256)),
    );
    knob_row(
        ui,
        "Sequence length",
        "Longest example in tokens; longer ones are cut, and memory grows with this number.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.seq_len).range(16..=32_768).speed(16)),
    );
    knob_row(
        ui,
        "Packing",
        "Puts several short examples into each sequence-length row, each seeing only itself, so steps spend \
         no time on padding; the loss is the same as unpacked. Fewer, fuller rows: an epoch takes fewer steps.",
        |ui| {
            // Packing covers the SFT loss only; DPO / ORPO refuse it in validation.
            let sft = !cfg.method.is_preference();
            if !sft {
                cfg.pack = false;
            }
            ui.add_enabled(sft, egui::Checkbox::new(&mut cfg.pack, "pack short examples"))
                .on_disabled_hover_text("available for SFT only")
        },
    );
}

/// Weight decay and gradient clipping.
fn regularization_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    knob_row(
        ui,
        "Weight decay",
        "Pulls the adapter weights toward zero every step; a small value like 0.01 can reduce overfitting.",
        |ui| {
            ui.add(
                egui::DragValue::new(&mut cfg.weight_decay)
                    .range(0.0..=1.0)
                    .speed(0.001),
            )
        },
    );
    knob_row(
        ui,
        "Max gradient norm",
        "Caps the size of each update to protect against sudden loss spikes; 0 turns the cap off.",
        |ui| {
            ui.add(
                egui::DragValue::new(&mut cfg.max_grad_norm)
                    .range(0.0..=100.0)
                    .speed(0.05),
            )
        },
    );
}

/// Held-out data, evaluation and checkpoint intervals.
fn evaluation_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig) {
    knob_row(
        ui,
        "Held-out share",
        "Part of the data kept aside to measure the loss on examples the model never trained on.",
        |ui| ui.add(egui::Slider::new(&mut cfg.eval_split, 0.0..=0.5).fixed_decimals(2)),
    );
    knob_row(
        ui,
        "Evaluate every",
        "How often, in steps, to measure the held-out loss; 0 measures only at the end.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.eval_every).range(0..=100_000)),
    );
    knob_row(
        ui,
        "Checkpoint every",
        "How often, in steps, to save a checkpoint you can resume from; 0 saves only at the end or on Stop.",
        |ui| ui.add(egui::DragValue::new(&mut cfg.save_every).range(0..=100_000)),
    );
}

/// Precision of the base weights and, when this build has a GPU backend, the device.
/// Memory the machine has free, read at most every two seconds (the page redraws often).
fn free_memory_mb() -> Option<f64> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static CACHE: Mutex<Option<(Instant, Option<f64>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().ok()?;
    match *cache {
        Some((at, value)) if at.elapsed() < Duration::from_secs(2) => value,
        _ => {
            let value = crate::train::memory::available_mb();
            *cache = Some((Instant::now(), value));
            value
        }
    }
}

fn hardware_ui(ui: &mut egui::Ui, cfg: &mut TrainConfig, model: Option<&crate::model::ModelConfig>) {
    use crate::train::memory::{estimate, gb};
    // The estimated peak memory of this run with each base precision, next to its name.
    let label = |cfg: &TrainConfig, p: Precision| match model {
        Some(m) => format!(
            "{}  ~{}",
            p.name(),
            gb(estimate(
                m,
                &TrainConfig {
                    precision: p,
                    ..cfg.clone()
                }
            )
            .total_mb)
        ),
        None => p.name().to_string(),
    };
    knob_row(
        ui,
        "Precision",
        "Number format of the frozen base weights, with the estimated peak memory of this run for each; f32 is \
         safest on a CPU, bf16 and f16 halve the base's memory (bf16 on a CPU keeps the activations in f32 and is \
         the fastest where the CPU has AVX-512 BF16); q8_0 and q4_1 keep the layers' projections in GGUF blocks \
         (CPU only: about a quarter and a sixth of their f32 memory).",
        |ui| {
            let snapshot = cfg.clone();
            egui::ComboBox::from_id_salt("precision")
                .selected_text(label(&snapshot, cfg.precision))
                .show_ui(ui, |ui| {
                    for p in [
                        Precision::F32,
                        Precision::Bf16,
                        Precision::F16,
                        Precision::Q8_0,
                        Precision::Q4_1,
                    ] {
                        ui.selectable_value(&mut cfg.precision, p, label(&snapshot, p));
                    }
                })
                .response
        },
    );
    knob_row(
        ui,
        "Activation checkpointing",
        "Keeps only each layer's input and recomputes the layer when training goes backward: far less memory \
         for about a third more time per step.",
        |ui| {
            // Checkpointing covers the SFT loss only; DPO / ORPO refuse it in validation.
            let sft = !cfg.method.is_preference();
            if !sft {
                cfg.checkpoint_activations = false;
            }
            ui.add_enabled(
                sft,
                egui::Checkbox::new(&mut cfg.checkpoint_activations, "recompute layers"),
            )
            .on_disabled_hover_text("available for SFT only")
        },
    );
    if let Some(m) = model {
        let need = estimate(m, cfg).total_mb;
        ui.label("Memory");
        match free_memory_mb() {
            Some(free) if need > free => ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("needs ~{}, {} free: more than this machine has", gb(need), gb(free)),
            ),
            Some(free) => ui.label(format!("needs ~{}, {} free", gb(need), gb(free))),
            None => ui.label(format!("needs ~{}", gb(need))),
        };
        ui.end_row();
    }
    // Every device kind is listed; those this build or machine cannot use are shown greyed
    // with the reason ("built without CUDA", "no NVIDIA driver found").
    knob_row(
        ui,
        "Device",
        "Where training runs; auto picks the first usable GPU, else the CPU.",
        |ui| crate::ui::widgets::device_combo(ui, "device", &mut cfg.device),
    );
    // One grid row per device that cannot be used, saying why.
    for offer in crate::ui::widgets::offered_devices() {
        if let Some(why) = &offer.unavailable {
            ui.label("");
            ui.weak(format!("{}: {why}", offer.label));
            ui.end_row();
        }
    }
}
