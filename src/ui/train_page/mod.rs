//! The Train page: data file, LoRA and trainer settings with presets and one-sentence tooltips,
//! Start / Stop / Resume of a run on a background thread, live curves (loss raw and smoothed,
//! eval loss, learning rate, gradient norm) with tokens/s, the padding share (and a hint to tick
//! Packing when an unpacked run wastes much of each step on padding) and ETA, the history of past runs with
//! their curves overlaid, and saving the chart as PNG or SVG. A preflight times a few steps of
//! the configured run before committing to it, and up to three probe prompts are answered at
//! every evaluation, shown on a timeline beside the loss curve (live, and for past runs).

//!
//! `state.rs` holds the training, preflight, run-scan and chart jobs and their polling;
//! `view.rs` draws the page, one `*_ui` function per settings section.

mod state;
mod view;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub use crate::train::history::{ProbeRound, RunHistory};
use crate::train::{
    PaddingTally, PreflightProgress, PreflightReport, TrainEvent, TrainSummary, MAX_PROBE_PROMPTS, PACKING_HINT_SHARE,
};

use super::widgets::format_duration;
use super::worker::{Job, Stream};

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
    /// DPO / ORPO: reward margin and accuracy of the training steps and of the evaluations.
    pub reward_margin: Vec<[f64; 2]>,
    pub reward_accuracy: Vec<[f64; 2]>,
    pub eval_reward_margin: Vec<[f64; 2]>,
    pub eval_reward_accuracy: Vec<[f64; 2]>,
    /// The probe answers, oldest first.
    pub probes: Vec<ProbeRound>,
    pub step: usize,
    pub total_steps: usize,
    pub tokens_per_sec: f64,
    pub eta_secs: f64,
    pub elapsed_secs: f64,
    /// Non-padding tokens and positions computed by the steps shown (a resumed run's logged
    /// steps included), as the trainer reported them.
    pub padding: PaddingTally,
    /// How the run on screen packs, for the padding hint: `Some(pack)` for SFT, `None` where
    /// packing is not offered (DPO / ORPO) or not known (a past run shown from its folder).
    pub packing: Option<bool>,
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
        live.reward_margin = run.reward_margin.clone();
        live.reward_accuracy = run.reward_accuracy.clone();
        live.eval_reward_margin = run.eval_reward_margin.clone();
        live.eval_reward_accuracy = run.eval_reward_accuracy.clone();
        live.probes = run.probes.clone();
        live.padding = run.padding;
        live.step = run.last_step;
        live.total_steps = run.planned_steps.unwrap_or(run.last_step);
        live
    }
}

impl LiveCurves {
    /// "padding 46% of positions — tick Packing to cut it" for an unpacked SFT run with a large
    /// share, else the plain share; `None` before any step. The bool: whether it is the hint.
    pub fn padding_text(&self) -> Option<(String, bool)> {
        if self.padding.padded_tokens == 0 {
            return None;
        }
        let share = self.padding.share();
        let plain = format!("padding {:.0}% of positions", 100.0 * share);
        Some(if self.packing == Some(false) && share >= PACKING_HINT_SHARE {
            (format!("{plain} — tick Packing to cut it"), true)
        } else {
            (plain, false)
        })
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
    /// The scan of the runs folder in progress; its result goes to [`Shared::set_runs`].
    history_job: Option<Job<Vec<RunHistory>>>,
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
    /// Whether the data file holds preference pairs, as last read: (path, answer). The method
    /// choice is offered only for preference data.
    data_kind: Option<(String, bool)>,
    data_kind_job: Option<(String, Job<bool>)>,
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

    /// The status line under the buttons.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Whether the data file is known to hold preference pairs (DPO / ORPO data).
    pub fn data_is_preference(&self) -> bool {
        self.data_kind
            .as_ref()
            .is_some_and(|(path, preference)| *preference && path == self.data_path.trim())
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
    fn the_packing_hint_needs_an_unpacked_sft_run_with_much_padding() {
        let mut live = LiveCurves::default();
        assert_eq!(live.padding_text(), None, "no step yet");
        live.padding = PaddingTally {
            tokens: 54,
            padded_tokens: 100,
        };
        live.packing = Some(false);
        assert_eq!(
            live.padding_text(),
            Some(("padding 46% of positions — tick Packing to cut it".into(), true))
        );
        for packing in [Some(true), None] {
            live.packing = packing;
            assert_eq!(live.padding_text(), Some(("padding 46% of positions".into(), false)));
        }
        live.packing = Some(false);
        live.padding.tokens = 90;
        assert_eq!(
            live.padding_text(),
            Some(("padding 10% of positions".into(), false)),
            "below the threshold"
        );
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
