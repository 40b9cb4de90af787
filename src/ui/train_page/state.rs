//! The Train page's work: starting, stopping and resuming runs and preflights on named threads,
//! turning their events into curves, scanning the runs folder, and saving the chart.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use eframe::egui;

use crate::train::{PreflightProgress, TrainConfig, TrainEvent};

use super::{
    free_run_name, preflight_sentence, suggested_run_name, LiveCurves, PreflightMsg, ProbeRound, RunHistory, Session,
    TrainMsg, TrainPage, PREFLIGHT_STEPS,
};
use crate::ui::chart::{save_chart, ChartSeries};
use crate::ui::shared::Shared;
use crate::ui::widgets::format_duration;
use crate::ui::worker::{Job, Stream};

impl TrainPage {
    /// Sets the training data file, as the file dialog would (tests call this directly).
    pub fn set_data_path(&mut self, shared: &mut Shared, path: &Path) {
        self.data_path = path.display().to_string();
        shared.settings.last_data = Some(self.data_path.clone());
    }

    /// Shows a past run's curves in the main chart (read on a background thread).
    pub fn show_run(&mut self, ctx: &egui::Context, shared: &mut Shared, dir: &Path) {
        if self.is_running() {
            return;
        }
        let dir = dir.to_path_buf();
        match Job::spawn("finch-read-run", ctx, move || RunHistory::read(&dir)) {
            Ok(job) => self.showing = Some(job),
            Err(e) => shared.report("Cannot read the run", e, "Restart Finch."),
        }
    }

    /// The configuration of a new run from the open model, the data field and the settings, in a
    /// fresh folder under the runs folder; `None` (with the error shown) when something is missing.
    fn new_run_config(&mut self, shared: &mut Shared) -> Option<TrainConfig> {
        let Some(card) = &shared.model else {
            shared.report(
                "No model is open",
                "Training needs a base model.",
                "Open one on the Models page first.",
            );
            return None;
        };
        let data = self.data_path.trim().to_string();
        if data.is_empty() {
            shared.report(
                "No training data",
                "Training needs a JSONL file.",
                "Pick a data file above (Alpaca rows with instruction/input/output, or OpenAI messages).",
            );
            return None;
        }
        let mut cfg = shared.settings.train.clone();
        if !self.data_is_preference() {
            // The method choice is only offered for preference data.
            cfg.method = crate::train::Method::Sft;
        }
        cfg.model = card.path.display().to_string();
        cfg.data = data.clone();
        cfg.eval_data = None;
        let base = if self.run_name.trim().is_empty() {
            suggested_run_name(Some(&card.name), &data)
        } else {
            self.run_name.clone()
        };
        let name = free_run_name(&shared.settings.runs_dir, &base);
        cfg.out = shared.settings.runs_dir.join(&name).display().to_string();
        shared.settings.last_data = Some(data);
        Some(cfg)
    }

    /// Times a few steps of the run Start would begin, on a background thread, writing nothing.
    pub fn start_preflight(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        if self.is_running() || self.is_preflighting() {
            return;
        }
        let Some(cfg) = self.new_run_config(shared) else { return };
        let stream = Stream::spawn("finch-preflight", ctx, move |send, cancel| {
            let result =
                crate::train::preflight_with(&cfg, PREFLIGHT_STEPS, cancel, &mut |p| send(PreflightMsg::Progress(p)));
            send(PreflightMsg::Done(result.map_err(|e| format!("{e:#}"))));
        });
        match stream {
            Ok(stream) => {
                self.preflight = Some(stream);
                self.preflight_report = None;
                self.preflight_status = "Preflight: loading the model and tokenizing the data…".into();
            }
            Err(e) => shared.report("Cannot start the preflight", e, "Restart Finch."),
        }
    }

    /// Asks a running preflight to stop after its current step.
    pub fn cancel_preflight(&mut self) {
        if let Some(stream) = &self.preflight {
            stream.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// The probe answers of the run on screen, oldest first.
    pub fn probes(&self) -> &[ProbeRound] {
        &self.live.probes
    }

    fn poll_preflight(&mut self, shared: &mut Shared) {
        let Some(stream) = &mut self.preflight else {
            return;
        };
        let cancelled = stream.cancel.load(Ordering::Relaxed);
        let mut failure = None;
        for msg in stream.drain() {
            match msg {
                PreflightMsg::Progress(PreflightProgress::Preparing) => {}
                PreflightMsg::Progress(PreflightProgress::Step { step, of }) => {
                    self.preflight_status = format!("Preflight: measuring step {step}/{of}…");
                }
                PreflightMsg::Progress(PreflightProgress::Probing) => {
                    self.preflight_status = "Preflight: timing the probe answers…".into();
                }
                PreflightMsg::Done(Ok(report)) => {
                    self.preflight_status = preflight_sentence(&report);
                    self.preflight_report = Some(report);
                }
                PreflightMsg::Done(Err(_)) if cancelled => {
                    self.preflight_status = "Preflight cancelled.".into();
                }
                PreflightMsg::Done(Err(e)) => {
                    self.preflight_status.clear();
                    failure = Some(e);
                }
            }
        }
        if stream.is_finished() {
            self.preflight = None;
        }
        if let Some(e) = failure {
            shared.report(
                "Preflight failed",
                e,
                "Check the model, the data file and the settings; the same problem would stop a real run.",
            );
        }
    }

    /// Starts a new run with the current settings, or resumes the run in `resume_dir`.
    pub fn start_training(&mut self, ctx: &egui::Context, shared: &mut Shared, resume_dir: Option<&Path>) {
        if self.is_running() {
            return;
        }
        let (cfg, resume) = match resume_dir {
            Some(dir) => match TrainConfig::from_toml_file(&dir.join("config.toml")) {
                Ok(mut cfg) => {
                    cfg.out = dir.display().to_string();
                    (cfg, true)
                }
                Err(e) => {
                    shared.report(
                        "Cannot resume this run",
                        format!("{e:#}"),
                        "The run folder lacks a readable config.toml; start a new run instead.",
                    );
                    return;
                }
            },
            None => match self.new_run_config(shared) {
                Some(cfg) => (cfg, false),
                None => return,
            },
        };
        let run_dir = PathBuf::from(&cfg.out);
        if let Err(e) = std::fs::create_dir_all(&shared.settings.runs_dir) {
            shared.report(
                "Cannot create the runs folder",
                format!("{}: {e}", shared.settings.runs_dir.display()),
                "Choose another runs folder on the Settings page.",
            );
            return;
        }
        let thread_dir = run_dir.clone();
        let packing = (!cfg.method.is_preference()).then_some(cfg.pack);
        let stream = Stream::spawn("finch-train", ctx, move |send, stop| {
            let mut note = |n: String| send(TrainMsg::Note(n));
            let mut trainer = match crate::train::run::prepare(&cfg, resume, &mut note) {
                Ok(t) => t,
                Err(e) => {
                    send(TrainMsg::PrepareFailed(format!("{e:#}")));
                    return;
                }
            };
            if resume {
                if let Some(history) = RunHistory::read(&thread_dir) {
                    send(TrainMsg::Resumed(history));
                }
            }
            // Failures arrive as `TrainEvent::Failed` too, so the returned error is not needed here.
            let _ = trainer.run(stop, &mut |event| send(TrainMsg::Event(event.clone())));
        });
        match stream {
            Ok(stream) => {
                self.live = LiveCurves {
                    packing,
                    ..LiveCurves::default()
                };
                self.highlighted_step = None;
                self.summary = None;
                self.notes.clear();
                self.status = if resume {
                    "Loading the model and the checkpoint…".into()
                } else {
                    "Loading the model and tokenizing the data…".into()
                };
                shared.settings.last_run = Some(run_dir.clone());
                self.session = Some(Session {
                    stream,
                    run_dir,
                    stopping: false,
                });
            }
            Err(e) => shared.report("Cannot start training", e, "Restart Finch."),
        }
    }

    pub fn poll(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        if let Some(path) = shared.requests.train_on.take() {
            self.set_data_path(shared, &path);
        }
        if let Some(method) = shared.requests.train_method.take() {
            shared.settings.train.method = method;
        }
        self.poll_data_kind(ctx, shared);
        self.poll_preflight(shared);
        let mut failures = Vec::new();
        let mut ended = false;
        if let Some(session) = &mut self.session {
            for msg in session.stream.drain() {
                let live = &mut self.live;
                match msg {
                    TrainMsg::Note(n) => self.notes.push(n),
                    TrainMsg::PrepareFailed(e) => failures.push(e),
                    TrainMsg::Resumed(history) => {
                        *live = LiveCurves {
                            packing: live.packing,
                            ..LiveCurves::from_history(&history)
                        }
                    }
                    TrainMsg::Event(TrainEvent::Started {
                        total_steps,
                        start_step,
                        train_examples,
                        eval_examples,
                        trainable_params,
                    }) => {
                        live.total_steps = total_steps;
                        live.step = start_step;
                        self.status = format!(
                            "Training on {train_examples} examples ({eval_examples} held out), \
                             {trainable_params} trainable parameters"
                        );
                    }
                    TrainMsg::Event(TrainEvent::Step(m)) => {
                        live.push_loss(m.step as f64, m.loss as f64);
                        if let Some(p) = m.preference {
                            live.reward_margin.push([m.step as f64, p.reward_margin as f64]);
                            live.reward_accuracy.push([m.step as f64, p.accuracy as f64]);
                        }
                        live.lr.push([m.step as f64, m.lr]);
                        live.grad_norm.push([m.step as f64, m.grad_norm as f64]);
                        live.step = m.step;
                        live.total_steps = m.total_steps;
                        live.tokens_per_sec = m.tokens_per_sec;
                        live.padding.add(&m);
                        live.eta_secs = m.eta_secs;
                        live.elapsed_secs = m.elapsed_secs;
                    }
                    TrainMsg::Event(TrainEvent::Eval {
                        step, loss, preference, ..
                    }) => {
                        live.eval_loss.push([step as f64, loss as f64]);
                        if let Some(p) = preference {
                            live.eval_reward_margin.push([step as f64, p.reward_margin as f64]);
                            live.eval_reward_accuracy.push([step as f64, p.accuracy as f64]);
                        }
                    }
                    TrainMsg::Event(TrainEvent::Probe { step, answers }) => {
                        live.probes.push(ProbeRound { step, answers });
                    }
                    TrainMsg::Event(TrainEvent::Checkpoint { step, .. }) => {
                        self.status = format!("Checkpoint saved at step {step}");
                    }
                    TrainMsg::Event(TrainEvent::Finished(summary)) => {
                        self.status = if summary.stopped {
                            format!(
                                "Stopped at step {}; a checkpoint was saved, press Resume to continue",
                                summary.steps
                            )
                        } else {
                            format!(
                                "Finished {} steps in {}",
                                summary.steps,
                                format_duration(summary.elapsed_secs)
                            )
                        };
                        self.summary = Some(summary);
                    }
                    TrainMsg::Event(TrainEvent::Failed { step, error }) => {
                        failures.push(format!("at step {step}: {error}"));
                    }
                }
            }
            ended = session.stream.is_finished();
        }
        for e in failures {
            self.status = "Training failed".into();
            shared.report(
                "Training failed",
                e,
                "Check the model and data paths; if the loss exploded, lower the learning rate and resume from \
                 the last checkpoint.",
            );
        }
        if ended {
            self.session = None;
            shared.requests.rescan_runs = true;
        }
        if shared.requests.rescan_runs && self.history_job.is_none() {
            shared.requests.rescan_runs = false;
            let dir = shared.settings.runs_dir.clone();
            match Job::spawn("finch-scan-runs", ctx, move || RunHistory::scan(&dir)) {
                Ok(job) => self.history_job = Some(job),
                Err(e) => shared.report("Cannot list past runs", e, "Restart Finch."),
            }
        }
        if let Some(job) = &mut self.history_job {
            if let Some(history) = job.poll() {
                self.history_job = None;
                self.overlay.retain(|d| history.iter().any(|r| &r.dir == d));
                shared.set_runs(history);
            }
        }
        if let Some(job) = &mut self.showing {
            if let Some(run) = job.poll() {
                self.showing = None;
                match run {
                    Some(run) if !self.is_running() => {
                        self.live = LiveCurves::from_history(&run);
                        self.highlighted_step = None;
                        self.summary = None;
                        self.status = format!("Showing the run {}", run.name);
                    }
                    Some(_) => {}
                    None => shared.report(
                        "Cannot show this run",
                        "its folder holds no readable metrics.jsonl",
                        "Pick a run folder made by Finch.",
                    ),
                }
            }
        }
        if let Some(job) = &mut self.saving_chart {
            if let Some(result) = job.poll() {
                self.saving_chart = None;
                match result {
                    Ok(path) => self.status = format!("Saved the chart to {}", path.display()),
                    Err(e) => shared.report(
                        "Cannot save the chart",
                        e,
                        "Pick a writable folder and a name ending in .png or .svg.",
                    ),
                }
            }
        }
    }

    /// Reads (on a thread) whether a new data file holds preference pairs, so the settings can
    /// offer DPO / ORPO for it and only for it.
    fn poll_data_kind(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        if let Some((path, job)) = &mut self.data_kind_job {
            if let Some(preference) = job.poll() {
                self.data_kind = Some((path.clone(), preference));
                self.data_kind_job = None;
            }
        }
        let path = self.data_path.trim().to_string();
        let known = self.data_kind.as_ref().is_some_and(|(p, _)| *p == path)
            || self.data_kind_job.as_ref().is_some_and(|(p, _)| *p == path);
        if known || path.is_empty() || self.is_running() {
            return;
        }
        let file = PathBuf::from(&path);
        // A file that does not load is not preference data; the run reports why it fails.
        let job = Job::spawn("finch-data-kind", ctx, move || {
            crate::data::load::load_file(&file, &crate::data::load::LoadOptions::default())
                .is_ok_and(|r| r.format == crate::data::load::Format::Preference)
        });
        match job {
            Ok(job) => self.data_kind_job = Some((path, job)),
            Err(e) => shared.report("Cannot read the data file", e, "Restart Finch."),
        }
    }

    /// The series the saved chart shows: the current run's curves and the ticked past runs.
    fn chart_series(&self, shared: &Shared) -> Vec<ChartSeries> {
        let mut series = vec![
            ChartSeries {
                name: "training loss".into(),
                points: self.live.loss.clone(),
            },
            ChartSeries {
                name: "training loss (smoothed)".into(),
                points: self.live.loss_smoothed.clone(),
            },
            ChartSeries {
                name: "eval loss".into(),
                points: self.live.eval_loss.clone(),
            },
        ];
        for run in shared.runs().iter().filter(|r| self.overlay.contains(&r.dir)) {
            series.push(ChartSeries {
                name: run.name.clone(),
                points: run.loss.clone(),
            });
        }
        series
    }

    /// Saves the chart to `path` (`.png` or `.svg`) on a background thread, as the Save buttons do.
    pub fn save_chart(&mut self, ctx: &egui::Context, shared: &mut Shared, path: &Path) {
        let series = self.chart_series(shared);
        let path = path.to_path_buf();
        let job = Job::spawn("finch-save-chart", ctx, move || {
            save_chart(&path, "Finch training loss", &series)
                .map(|()| path)
                .map_err(|e| e.to_string())
        });
        match job {
            Ok(job) => self.saving_chart = Some(job),
            Err(e) => shared.report("Cannot save the chart", e, "Restart Finch."),
        }
    }
}
