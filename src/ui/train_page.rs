//! The Train page: data file, LoRA and trainer settings with presets and one-sentence tooltips,
//! Start / Stop / Resume of a run on a background thread, live curves (loss raw and smoothed,
//! eval loss, learning rate, gradient norm) with tokens/s and ETA, the history of past runs with
//! their curves overlaid, and saving the chart as PNG or SVG. A preflight times a few steps of
//! the configured run before committing to it, and up to three probe prompts are answered at
//! every evaluation, shown on a timeline beside the loss curve (live, and for past runs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints, PlotUi, Points, VLine};

use crate::data::LossOn;
use crate::lora::Target;
use crate::train::config::{DeviceChoice, Precision};
pub use crate::train::history::{ProbeRound, RunHistory};
use crate::train::presets::Preset;
use crate::train::{
    Duration, PreflightProgress, PreflightReport, Schedule, TrainConfig, TrainEvent, TrainSummary, MAX_PROBE_PROMPTS,
};

use super::app::App;
use super::chart::{save_chart, ChartSeries};
use super::widgets::{format_duration, knob_row};
use super::worker::{Job, PickPurpose, Stream};

/// What the training thread sends.
#[derive(Debug, Clone)]
pub enum TrainMsg {
    /// A remark from preparation (truncated examples, resume point).
    Note(String),
    /// Preparation failed; nothing was trained.
    PrepareFailed(String),
    /// The curves already logged in a resumed run, to continue drawing from.
    Resumed(RunHistory),
    Event(TrainEvent),
}

/// What the preflight thread sends.
#[derive(Debug, Clone)]
enum PreflightMsg {
    Progress(PreflightProgress),
    Done(Result<PreflightReport, String>),
}

/// Steps a preflight runs: one warm-up and four timed, enough for a stable median.
pub const PREFLIGHT_STEPS: usize = 5;

/// The curves of the run on screen.
#[derive(Debug, Clone, Default)]
pub struct LiveCurves {
    /// `(step, loss)` of every optimizer step.
    pub loss: Vec<[f64; 2]>,
    /// Exponential moving average of `loss`, bias-corrected like TensorBoard's smoothing.
    pub loss_smoothed: Vec<[f64; 2]>,
    pub eval_loss: Vec<[f64; 2]>,
    pub lr: Vec<[f64; 2]>,
    pub grad_norm: Vec<[f64; 2]>,
    /// The probe answers, oldest first.
    pub probes: Vec<ProbeRound>,
    pub step: usize,
    pub total_steps: usize,
    pub tokens_per_sec: f64,
    pub eta_secs: f64,
    pub elapsed_secs: f64,
    ema: f64,
    ema_weight: f64,
}

/// Smoothing factor of the displayed loss average (0 = none).
const SMOOTHING: f64 = 0.9;

impl LiveCurves {
    fn push_loss(&mut self, step: f64, loss: f64) {
        self.loss.push([step, loss]);
        if loss.is_finite() {
            self.ema = SMOOTHING * self.ema + (1.0 - SMOOTHING) * loss;
            self.ema_weight = SMOOTHING * self.ema_weight + (1.0 - SMOOTHING);
            self.loss_smoothed.push([step, self.ema / self.ema_weight]);
        }
    }

    fn from_history(run: &RunHistory) -> Self {
        let mut live = LiveCurves::default();
        for p in &run.loss {
            live.push_loss(p[0], p[1]);
        }
        live.eval_loss = run.eval_loss.clone();
        live.lr = run.lr.clone();
        live.grad_norm = run.grad_norm.clone();
        live.probes = run.probes.clone();
        live.step = run.last_step;
        live.total_steps = run.planned_steps.unwrap_or(run.last_step);
        live
    }
}

/// At most this many points per curve are drawn; the full log stays on disk.
const MAX_DRAWN_POINTS: usize = 2000;

/// Keeps the newest half of the points at full resolution and thins the older ones evenly, so a
/// 100k-step curve draws as fast as a short one while the recent steps stay exact.
pub fn downsample(points: &[[f64; 2]], max_points: usize) -> Vec<[f64; 2]> {
    if points.len() <= max_points || max_points < 4 {
        return points.to_vec();
    }
    let recent = max_points / 2;
    let (old, new) = points.split_at(points.len() - recent);
    let stride = old.len().div_ceil(max_points - recent);
    old.iter().step_by(stride).chain(new.iter()).copied().collect()
}

const LOSS_PLOT_HEIGHT: f32 = 260.0;

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

/// A training run started from the window.
struct Session {
    stream: Stream<TrainMsg>,
    run_dir: PathBuf,
    stopping: bool,
}

/// State of the Train page.
#[derive(Default)]
pub struct TrainPage {
    /// The data file field.
    pub data_path: String,
    /// Name of the next run's folder under the runs folder.
    pub run_name: String,
    session: Option<Session>,
    /// The curves of the current (or last) run.
    pub live: LiveCurves,
    /// The last summary of a finished or stopped run.
    pub summary: Option<TrainSummary>,
    notes: Vec<String>,
    status: String,
    history: Vec<RunHistory>,
    history_job: Option<Job<Vec<RunHistory>>>,
    /// Set when the runs folder may have changed; the next frame rescans it.
    pub history_stale: bool,
    /// Runs ticked for the comparison chart.
    overlay: BTreeSet<PathBuf>,
    saving_chart: Option<Job<Result<PathBuf, String>>>,
    showing: Option<Job<Option<RunHistory>>>,
    preflight: Option<Stream<PreflightMsg>>,
    /// The preflight's progress line, then its result as a sentence.
    preflight_status: String,
    /// The last finished preflight.
    pub preflight_report: Option<PreflightReport>,
    /// The probe step marked on the loss plot (clicked on the timeline).
    pub highlighted_step: Option<usize>,
    /// The three probe prompt fields as typed (empty ones are left out of the settings).
    probe_inputs: [String; MAX_PROBE_PROMPTS],
}

impl TrainPage {
    pub fn is_running(&self) -> bool {
        self.session.is_some()
    }

    /// Asks the trainer to stop after the current step (it then writes a checkpoint).
    pub fn request_stop(&mut self) {
        if let Some(session) = &mut self.session {
            session.stopping = true;
            session.stream.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Blocks until the training thread has ended or `timeout` passed (used only at exit).
    pub fn wait_for_stop(&mut self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(session) = &mut self.session {
            session.stream.drain();
            if session.stream.is_finished() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn progress_text(&self) -> String {
        format!("step {} / {}", self.live.step, self.live.total_steps)
    }

    /// Past runs as last scanned.
    pub fn history(&self) -> &[RunHistory] {
        &self.history
    }

    /// The status line under the buttons.
    pub fn status(&self) -> &str {
        &self.status
    }

    pub fn is_preflighting(&self) -> bool {
        self.preflight.is_some()
    }

    /// The preflight's progress line or result sentence.
    pub fn preflight_status(&self) -> &str {
        &self.preflight_status
    }
}

/// The non-empty, trimmed probe prompts of the three fields, in order.
fn probe_prompts_of(inputs: &[String]) -> Vec<String> {
    inputs
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// "2.41 s per step, 850 tokens/s, peak memory 1234 MB: about 4 min 10 s for 200 steps
/// (including 8 evaluations and 9 rounds of probe answers)."
pub fn preflight_sentence(report: &PreflightReport) -> String {
    let memory = report
        .peak_rss_mb
        .map(|mb| format!(", peak memory {mb:.0} MB"))
        .unwrap_or_default();
    let mut extras = Vec::new();
    if report.eval_runs > 0 {
        extras.push(format!(
            "{} evaluation{}",
            report.eval_runs,
            if report.eval_runs == 1 { "" } else { "s" }
        ));
    }
    if report.probe_rounds > 0 {
        extras.push(format!("{} rounds of probe answers", report.probe_rounds));
    }
    let extras = if extras.is_empty() {
        String::new()
    } else {
        format!(" (including {})", extras.join(" and "))
    };
    format!(
        "{:.2} s per step, {:.0} tokens/s{memory}: about {} for {} steps{extras}.",
        report.secs_per_step,
        report.tokens_per_sec,
        format_duration(report.estimated_total_secs),
        report.total_steps,
    )
}

/// `base`, or `base-2`, `base-3`… whichever does not exist yet under `dir`.
fn free_run_name(dir: &Path, base: &str) -> String {
    let base = if base.trim().is_empty() { "run" } else { base.trim() };
    if !dir.join(base).exists() {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !dir.join(n).exists())
        .unwrap_or_default()
}

/// A folder-name-safe run name from the model and data names.
fn suggested_run_name(model: Option<&str>, data: &str) -> String {
    let stem = |s: &str| {
        Path::new(s)
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let model = model
        .map(|m| m.rsplit('/').next().unwrap_or(m).to_string())
        .unwrap_or_default();
    let name = format!("{}-{}", model, stem(data));
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    clean.trim_matches('-').to_string()
}

impl App {
    /// Sets the training data file, as the file dialog would (tests call this directly).
    pub fn set_data_path(&mut self, path: &Path) {
        self.train.data_path = path.display().to_string();
        self.settings.last_data = Some(self.train.data_path.clone());
    }

    /// The training-loss points the live plot draws (one per optimizer step).
    pub fn live_loss_points(&self) -> &[[f64; 2]] {
        &self.train.live.loss
    }

    pub fn is_training(&self) -> bool {
        self.train.is_running()
    }

    /// The status line of the Train page ("Finished 10 steps in 3 s", "Saved the chart to …").
    pub fn train_status(&self) -> &str {
        self.train.status()
    }

    /// The data file field of the Train page.
    pub fn data_path(&self) -> &str {
        &self.train.data_path
    }

    /// Asks a running training to stop after the current step, as the Stop button does.
    pub fn stop_training(&mut self) {
        self.train.request_stop();
    }

    /// Shows a past run's curves in the main chart (read on a background thread).
    pub fn show_run(&mut self, ctx: &egui::Context, dir: &Path) {
        if self.train.is_running() {
            return;
        }
        let dir = dir.to_path_buf();
        match Job::spawn("finch-read-run", ctx, move || RunHistory::read(&dir)) {
            Ok(job) => self.train.showing = Some(job),
            Err(e) => self.report("Cannot read the run", e, "Restart Finch."),
        }
    }

    /// Past runs found under the runs folder.
    pub fn run_history(&self) -> &[RunHistory] {
        self.train.history()
    }

    /// The configuration of a new run from the open model, the data field and the settings, in a
    /// fresh folder under the runs folder; `None` (with the error shown) when something is missing.
    fn new_run_config(&mut self) -> Option<TrainConfig> {
        let Some(card) = &self.models.card else {
            self.report(
                "No model is open",
                "Training needs a base model.",
                "Open one on the Models page first.",
            );
            return None;
        };
        let data = self.train.data_path.trim().to_string();
        if data.is_empty() {
            self.report(
                "No training data",
                "Training needs a JSONL file.",
                "Pick a data file above (Alpaca rows with instruction/input/output, or OpenAI messages).",
            );
            return None;
        }
        let mut cfg = self.settings.train.clone();
        cfg.model = card.path.display().to_string();
        cfg.data = data.clone();
        cfg.eval_data = None;
        let base = if self.train.run_name.trim().is_empty() {
            suggested_run_name(Some(&card.name), &data)
        } else {
            self.train.run_name.clone()
        };
        let name = free_run_name(&self.settings.runs_dir, &base);
        cfg.out = self.settings.runs_dir.join(&name).display().to_string();
        self.settings.last_data = Some(data);
        Some(cfg)
    }

    /// Times a few steps of the run Start would begin, on a background thread, writing nothing.
    pub fn start_preflight(&mut self, ctx: &egui::Context) {
        if self.train.is_running() || self.train.is_preflighting() {
            return;
        }
        let Some(cfg) = self.new_run_config() else { return };
        let stream = Stream::spawn("finch-preflight", ctx, move |send, cancel| {
            let result =
                crate::train::preflight_with(&cfg, PREFLIGHT_STEPS, cancel, &mut |p| send(PreflightMsg::Progress(p)));
            send(PreflightMsg::Done(result.map_err(|e| format!("{e:#}"))));
        });
        match stream {
            Ok(stream) => {
                self.train.preflight = Some(stream);
                self.train.preflight_report = None;
                self.train.preflight_status = "Preflight: loading the model and tokenizing the data…".into();
            }
            Err(e) => self.report("Cannot start the preflight", e, "Restart Finch."),
        }
    }

    /// Asks a running preflight to stop after its current step.
    pub fn cancel_preflight(&mut self) {
        if let Some(stream) = &self.train.preflight {
            stream.cancel.store(true, Ordering::Relaxed);
        }
    }

    pub fn is_preflighting(&self) -> bool {
        self.train.is_preflighting()
    }

    /// The preflight's progress line ("Preflight: measuring step 2/5…") or its result sentence.
    pub fn preflight_status(&self) -> &str {
        self.train.preflight_status()
    }

    /// The last finished preflight's figures.
    pub fn preflight_report(&self) -> Option<&PreflightReport> {
        self.train.preflight_report.as_ref()
    }

    /// The probe answers of the run on screen, oldest first.
    pub fn probe_rounds(&self) -> &[ProbeRound] {
        &self.train.live.probes
    }

    /// The probe step marked on the loss plot.
    pub fn highlighted_probe_step(&self) -> Option<usize> {
        self.train.highlighted_step
    }

    fn poll_preflight(&mut self) {
        let Some(stream) = &mut self.train.preflight else {
            return;
        };
        let cancelled = stream.cancel.load(Ordering::Relaxed);
        let mut failure = None;
        for msg in stream.drain() {
            match msg {
                PreflightMsg::Progress(PreflightProgress::Preparing) => {}
                PreflightMsg::Progress(PreflightProgress::Step { step, of }) => {
                    self.train.preflight_status = format!("Preflight: measuring step {step}/{of}…");
                }
                PreflightMsg::Progress(PreflightProgress::Probing) => {
                    self.train.preflight_status = "Preflight: timing the probe answers…".into();
                }
                PreflightMsg::Done(Ok(report)) => {
                    self.train.preflight_status = preflight_sentence(&report);
                    self.train.preflight_report = Some(report);
                }
                PreflightMsg::Done(Err(_)) if cancelled => {
                    self.train.preflight_status = "Preflight cancelled.".into();
                }
                PreflightMsg::Done(Err(e)) => {
                    self.train.preflight_status.clear();
                    failure = Some(e);
                }
            }
        }
        if stream.is_finished() {
            self.train.preflight = None;
        }
        if let Some(e) = failure {
            self.report(
                "Preflight failed",
                e,
                "Check the model, the data file and the settings; the same problem would stop a real run.",
            );
        }
    }

    /// Starts a new run with the current settings, or resumes the run in `resume_dir`.
    pub fn start_training(&mut self, ctx: &egui::Context, resume_dir: Option<&Path>) {
        if self.train.is_running() {
            return;
        }
        let (cfg, resume) = match resume_dir {
            Some(dir) => match TrainConfig::from_toml_file(&dir.join("config.toml")) {
                Ok(mut cfg) => {
                    cfg.out = dir.display().to_string();
                    (cfg, true)
                }
                Err(e) => {
                    self.report(
                        "Cannot resume this run",
                        format!("{e:#}"),
                        "The run folder lacks a readable config.toml; start a new run instead.",
                    );
                    return;
                }
            },
            None => match self.new_run_config() {
                Some(cfg) => (cfg, false),
                None => return,
            },
        };
        let run_dir = PathBuf::from(&cfg.out);
        if let Err(e) = std::fs::create_dir_all(&self.settings.runs_dir) {
            self.report(
                "Cannot create the runs folder",
                format!("{}: {e}", self.settings.runs_dir.display()),
                "Choose another runs folder on the Settings page.",
            );
            return;
        }
        let thread_dir = run_dir.clone();
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
                self.train.live = LiveCurves::default();
                self.train.highlighted_step = None;
                self.train.summary = None;
                self.train.notes.clear();
                self.train.status = if resume {
                    "Loading the model and the checkpoint…".into()
                } else {
                    "Loading the model and tokenizing the data…".into()
                };
                self.settings.last_run = Some(run_dir.clone());
                self.train.session = Some(Session {
                    stream,
                    run_dir,
                    stopping: false,
                });
            }
            Err(e) => self.report("Cannot start training", e, "Restart Finch."),
        }
    }

    pub(crate) fn poll_train(&mut self, ctx: &egui::Context) {
        self.poll_preflight();
        let mut failures = Vec::new();
        let mut ended = false;
        if let Some(session) = &mut self.train.session {
            for msg in session.stream.drain() {
                let live = &mut self.train.live;
                match msg {
                    TrainMsg::Note(n) => self.train.notes.push(n),
                    TrainMsg::PrepareFailed(e) => failures.push(e),
                    TrainMsg::Resumed(history) => *live = LiveCurves::from_history(&history),
                    TrainMsg::Event(TrainEvent::Started {
                        total_steps,
                        start_step,
                        train_examples,
                        eval_examples,
                        trainable_params,
                    }) => {
                        live.total_steps = total_steps;
                        live.step = start_step;
                        self.train.status = format!(
                            "Training on {train_examples} examples ({eval_examples} held out), \
                             {trainable_params} trainable parameters"
                        );
                    }
                    TrainMsg::Event(TrainEvent::Step(m)) => {
                        live.push_loss(m.step as f64, m.loss as f64);
                        live.lr.push([m.step as f64, m.lr]);
                        live.grad_norm.push([m.step as f64, m.grad_norm as f64]);
                        live.step = m.step;
                        live.total_steps = m.total_steps;
                        live.tokens_per_sec = m.tokens_per_sec;
                        live.eta_secs = m.eta_secs;
                        live.elapsed_secs = m.elapsed_secs;
                    }
                    TrainMsg::Event(TrainEvent::Eval { step, loss, .. }) => {
                        live.eval_loss.push([step as f64, loss as f64]);
                    }
                    TrainMsg::Event(TrainEvent::Probe { step, answers }) => {
                        live.probes.push(ProbeRound { step, answers });
                    }
                    TrainMsg::Event(TrainEvent::Checkpoint { step, .. }) => {
                        self.train.status = format!("Checkpoint saved at step {step}");
                    }
                    TrainMsg::Event(TrainEvent::Finished(summary)) => {
                        self.train.status = if summary.stopped {
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
                        self.train.summary = Some(summary);
                    }
                    TrainMsg::Event(TrainEvent::Failed { step, error }) => {
                        failures.push(format!("at step {step}: {error}"));
                    }
                }
            }
            ended = session.stream.is_finished();
        }
        for e in failures {
            self.train.status = "Training failed".into();
            self.report(
                "Training failed",
                e,
                "Check the model and data paths; if the loss exploded, lower the learning rate and resume from \
                 the last checkpoint.",
            );
        }
        if ended {
            self.train.session = None;
            self.train.history_stale = true;
        }
        if self.train.history_stale && self.train.history_job.is_none() {
            self.train.history_stale = false;
            let dir = self.settings.runs_dir.clone();
            match Job::spawn("finch-scan-runs", ctx, move || RunHistory::scan(&dir)) {
                Ok(job) => self.train.history_job = Some(job),
                Err(e) => self.report("Cannot list past runs", e, "Restart Finch."),
            }
        }
        if let Some(job) = &mut self.train.history_job {
            if let Some(history) = job.poll() {
                self.train.history_job = None;
                self.train.overlay.retain(|d| history.iter().any(|r| &r.dir == d));
                self.train.history = history;
            }
        }
        if let Some(job) = &mut self.train.showing {
            if let Some(run) = job.poll() {
                self.train.showing = None;
                match run {
                    Some(run) if !self.train.is_running() => {
                        self.train.live = LiveCurves::from_history(&run);
                        self.train.highlighted_step = None;
                        self.train.summary = None;
                        self.train.status = format!("Showing the run {}", run.name);
                    }
                    Some(_) => {}
                    None => self.report(
                        "Cannot show this run",
                        "its folder holds no readable metrics.jsonl",
                        "Pick a run folder made by Finch.",
                    ),
                }
            }
        }
        if let Some(job) = &mut self.train.saving_chart {
            if let Some(result) = job.poll() {
                self.train.saving_chart = None;
                match result {
                    Ok(path) => self.train.status = format!("Saved the chart to {}", path.display()),
                    Err(e) => self.report(
                        "Cannot save the chart",
                        e,
                        "Pick a writable folder and a name ending in .png or .svg.",
                    ),
                }
            }
        }
    }

    /// The series the saved chart shows: the current run's curves and the ticked past runs.
    fn chart_series(&self) -> Vec<ChartSeries> {
        let mut series = vec![
            ChartSeries {
                name: "training loss".into(),
                points: self.train.live.loss.clone(),
            },
            ChartSeries {
                name: "training loss (smoothed)".into(),
                points: self.train.live.loss_smoothed.clone(),
            },
            ChartSeries {
                name: "eval loss".into(),
                points: self.train.live.eval_loss.clone(),
            },
        ];
        for run in self
            .train
            .history
            .iter()
            .filter(|r| self.train.overlay.contains(&r.dir))
        {
            series.push(ChartSeries {
                name: run.name.clone(),
                points: run.loss.clone(),
            });
        }
        series
    }

    /// Saves the chart to `path` (`.png` or `.svg`) on a background thread, as the Save buttons do.
    pub fn save_chart(&mut self, ctx: &egui::Context, path: &Path) {
        self.save_chart_in(ctx, path);
    }

    pub(crate) fn save_chart_in(&mut self, ctx: &egui::Context, path: &Path) {
        let series = self.chart_series();
        let path = path.to_path_buf();
        let job = Job::spawn("finch-save-chart", ctx, move || {
            save_chart(&path, "Finch training loss", &series)
                .map(|()| path)
                .map_err(|e| e.to_string())
        });
        match job {
            Ok(job) => self.train.saving_chart = Some(job),
            Err(e) => self.report("Cannot save the chart", e, "Restart Finch."),
        }
    }

    pub(crate) fn train_page_ui(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        ui.heading("Train");
        ui.add_space(6.0);
        let running = self.train.is_running();

        ui.group(|ui| {
            egui::Grid::new("train-inputs")
                .num_columns(2)
                .spacing([12.0, 8.0])
                .show(ui, |ui| {
                    ui.label("Model");
                    match &self.models.card {
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
                            egui::TextEdit::singleline(&mut self.train.data_path)
                                .hint_text("path to a .jsonl file")
                                .desired_width(380.0),
                        );
                        edit.labelled_by(data_label.id);
                        if ui.add_enabled(!running, egui::Button::new("Browse…")).clicked() {
                            self.start_pick(&ctx, PickPurpose::DataFile, None);
                        }
                    });
                    ui.end_row();
                    let name_label = ui
                        .label("Run name")
                        .on_hover_text("The run's folder under the runs folder; a number is added if it exists.");
                    let hint = suggested_run_name(
                        self.models.card.as_ref().map(|c| c.name.as_str()),
                        &self.train.data_path,
                    );
                    ui.add_enabled(
                        !running,
                        egui::TextEdit::singleline(&mut self.train.run_name)
                            .hint_text(hint)
                            .desired_width(380.0),
                    )
                    .labelled_by(name_label.id);
                    ui.end_row();
                });
        });
        ui.add_space(8.0);

        let preflighting = self.train.is_preflighting();
        ui.horizontal(|ui| {
            let ready = self.models.card.is_some() && !self.train.data_path.trim().is_empty();
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
                self.start_training(&ctx, None);
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
                    self.start_preflight(&ctx);
                }
            }
            if running {
                let stopping = self.train.session.as_ref().is_some_and(|s| s.stopping);
                let stop = ui
                    .add_enabled(!stopping, egui::Button::new(egui::RichText::new("Stop").size(18.0)))
                    .on_hover_text("Stops after the current step and saves a checkpoint you can resume.");
                if stop.clicked() {
                    self.train.request_stop();
                }
                ui.spinner();
                if stopping {
                    ui.label("Stopping after this step…");
                }
            } else if let Some(dir) = self.resumable_last_run() {
                if ui
                    .button(egui::RichText::new("Resume").size(18.0))
                    .on_hover_text(format!("Continues {} from its newest checkpoint.", dir.display()))
                    .clicked()
                {
                    self.start_training(&ctx, Some(&dir));
                }
            }
        });
        if !self.train.status.is_empty() {
            ui.label(&self.train.status);
        }
        if !self.train.preflight_status.is_empty() {
            ui.label(&self.train.preflight_status);
        }
        for note in &self.train.notes {
            ui.label(egui::RichText::new(note).small().weak());
        }
        ui.add_space(8.0);
        // Curves come before the settings so a running (or shown) run is visible without scrolling.
        self.live_plots_ui(ui);
        ui.add_space(8.0);
        egui::CollapsingHeader::new("Training settings")
            .default_open(true)
            .show(ui, |ui| ui.add_enabled_ui(!running, |ui| self.settings_ui(ui)));
        ui.add_space(12.0);
        self.history_ui(ui, &ctx);
    }

    /// The last run of this window (or of the last launch), when it stopped with steps left.
    fn resumable_last_run(&self) -> Option<PathBuf> {
        let last = self
            .train
            .session
            .as_ref()
            .map(|s| s.run_dir.clone())
            .or_else(|| self.settings.last_run.clone())?;
        self.train
            .history
            .iter()
            .find(|r| r.dir == last && r.resumable())
            .map(|r| r.dir.clone())
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.label("Presets:");
            for preset in Preset::ALL {
                if ui.button(preset.title()).on_hover_text(preset.description()).clicked() {
                    preset.apply(&mut self.settings.train);
                }
            }
        });
        ui.add_space(4.0);
        let cfg = &mut self.settings.train;
        ui.columns(2, |cols| {
            egui::Grid::new("train-knobs-a").num_columns(2).spacing([12.0, 6.0]).show(&mut cols[0], |ui| {
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
                    "Seed",
                    "Fixes every random choice, so the same settings on the same data give the same run.",
                    |ui| ui.add(egui::DragValue::new(&mut cfg.seed)),
                );
            });
            egui::Grid::new("train-knobs-b").num_columns(2).spacing([12.0, 6.0]).show(&mut cols[1], |ui| {
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
                    "Weight decay",
                    "Pulls the adapter weights toward zero every step; a small value like 0.01 can reduce overfitting.",
                    |ui| ui.add(egui::DragValue::new(&mut cfg.weight_decay).range(0.0..=1.0).speed(0.001)),
                );
                knob_row(
                    ui,
                    "Max gradient norm",
                    "Caps the size of each update to protect against sudden loss spikes; 0 turns the cap off.",
                    |ui| ui.add(egui::DragValue::new(&mut cfg.max_grad_norm).range(0.0..=100.0).speed(0.05)),
                );
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
                knob_row(
                    ui,
                    "Precision",
                    "Number format of the frozen base weights; f32 is safest on a CPU, bf16 and f16 halve the memory.",
                    |ui| {
                        egui::ComboBox::from_id_salt("precision")
                            .selected_text(format!("{:?}", cfg.precision).to_lowercase())
                            .show_ui(ui, |ui| {
                                for p in [Precision::F32, Precision::Bf16, Precision::F16] {
                                    ui.selectable_value(&mut cfg.precision, p, format!("{p:?}").to_lowercase());
                                }
                            })
                            .response
                    },
                );
                // Only devices this build can use are offered.
                let mut devices = vec![DeviceChoice::Auto, DeviceChoice::Cpu];
                if cfg!(feature = "cuda") {
                    devices.push(DeviceChoice::Cuda);
                }
                if cfg!(feature = "metal") {
                    devices.push(DeviceChoice::Metal);
                }
                if devices.len() > 2 {
                    knob_row(
                        ui,
                        "Device",
                        "Where training runs; auto picks the GPU when there is one.",
                        |ui| {
                            egui::ComboBox::from_id_salt("device")
                                .selected_text(format!("{:?}", cfg.device).to_lowercase())
                                .show_ui(ui, |ui| {
                                    for d in devices {
                                        ui.selectable_value(&mut cfg.device, d, format!("{d:?}").to_lowercase());
                                    }
                                })
                                .response
                        },
                    );
                }
            });
        });
        ui.add_space(6.0);
        self.probe_settings_ui(ui);
    }

    /// The three probe prompt fields and the answer length.
    fn probe_settings_ui(&mut self, ui: &mut egui::Ui) {
        let inputs = &mut self.train.probe_inputs;
        let cfg = &mut self.settings.train;
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
        let running = self.train.is_running();
        let marked_step = self.train.highlighted_step;
        let highlighted = &mut self.train.highlighted_step;
        let live = &self.train.live;
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
    }

    fn history_ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        ui.horizontal(|ui| {
            ui.heading("Past runs");
            if ui.small_button("Refresh").clicked() {
                self.train.history_stale = true;
            }
            ui.label(
                egui::RichText::new(self.settings.runs_dir.display().to_string())
                    .small()
                    .weak(),
            );
        });
        if self.train.history.is_empty() {
            ui.label(egui::RichText::new("No runs yet in the runs folder.").weak());
        }
        let running = self.train.is_running();
        let mut resume = None;
        let mut show = None;
        egui::Grid::new("run-history")
            .striped(true)
            .num_columns(6)
            .show(ui, |ui| {
                if !self.train.history.is_empty() {
                    for head in ["Compare", "Run", "Steps", "Final loss", "Eval loss", ""] {
                        ui.label(egui::RichText::new(head).strong());
                    }
                    ui.end_row();
                }
                for run in &self.train.history {
                    let mut on = self.train.overlay.contains(&run.dir);
                    if ui
                        .checkbox(&mut on, "")
                        .on_hover_text("Overlay this run's loss curve in the comparison chart.")
                        .changed()
                    {
                        if on {
                            self.train.overlay.insert(run.dir.clone());
                        } else {
                            self.train.overlay.remove(&run.dir);
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
            self.start_training(ctx, Some(&dir));
        }
        if let Some(dir) = show {
            self.show_run(ctx, &dir);
        }
        if !self.train.overlay.is_empty() {
            Plot::new("compare-plot")
                .height(220.0)
                .legend(Legend::default())
                .x_axis_label("step")
                .y_axis_label("training loss")
                .show(ui, |plot| {
                    for run in self
                        .train
                        .history
                        .iter()
                        .filter(|r| self.train.overlay.contains(&r.dir))
                    {
                        plot.line(Line::new(
                            run.name.clone(),
                            PlotPoints::new(downsample(&run.loss, MAX_DRAWN_POINTS)),
                        ));
                    }
                });
        }
        let has_curves = !self.train.live.loss.is_empty() || !self.train.overlay.is_empty();
        if has_curves {
            ui.horizontal(|ui| {
                let saving = self.train.saving_chart.is_some();
                let dir = self.settings.runs_dir.clone();
                if ui
                    .add_enabled(!saving, egui::Button::new("Save chart as PNG…"))
                    .clicked()
                {
                    self.start_pick(ctx, PickPurpose::ChartPng, Some(&dir));
                }
                if ui
                    .add_enabled(!saving, egui::Button::new("Save chart as SVG…"))
                    .clicked()
                {
                    self.start_pick(ctx, PickPurpose::ChartSvg, Some(&dir));
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_keeps_recent_points_exact_and_bounds_the_count() {
        let points: Vec<[f64; 2]> = (0..10_000).map(|i| [i as f64, (i as f64).sin()]).collect();
        let drawn = downsample(&points, 1000);
        assert!(drawn.len() <= 1000, "{} points drawn", drawn.len());
        assert_eq!(&drawn[drawn.len() - 500..], &points[points.len() - 500..]);
        assert_eq!(drawn[0], points[0]);
        assert!(drawn.windows(2).all(|w| w[0][0] < w[1][0]), "steps stay in order");
        assert_eq!(downsample(&points[..10], 1000), points[..10].to_vec());
    }

    #[test]
    fn smoothed_loss_is_bias_corrected() {
        let mut live = LiveCurves::default();
        live.push_loss(1.0, 4.0);
        // Without bias correction the first smoothed value would be 0.4.
        assert!((live.loss_smoothed[0][1] - 4.0).abs() < 1e-9);
        live.push_loss(2.0, 2.0);
        let expected = (0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (1.0 - 0.9f64.powi(2));
        assert!((live.loss_smoothed[1][1] - expected).abs() < 1e-9);
    }

    #[test]
    fn run_names_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(free_run_name(dir.path(), "a"), "a");
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::create_dir_all(dir.path().join("a-2")).unwrap();
        assert_eq!(free_run_name(dir.path(), "a"), "a-3");
        assert_eq!(
            suggested_run_name(Some("HuggingFaceTB/SmolLM2 135M"), "/x/alpaca demo.jsonl"),
            "SmolLM2-135M-alpaca-demo"
        );
    }
}
