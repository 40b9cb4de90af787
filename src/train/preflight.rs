//! The preflight: a few real optimizer steps of the run a configuration describes, timed, so the
//! user sees seconds per step, tokens/s, peak memory and the estimated length of the whole run
//! before committing to it.
//!
//! It builds exactly the trainer a real run would (same model, adapters, data, batches and
//! learning-rate schedule) but without a run folder: nothing is written to `cfg.out` and the
//! trained adapter is dropped at the end.
//!
//! The estimate is `secs_per_step × total_steps + evals + probe rounds`, where
//! - an evaluation is a forward pass over the held-out tokens; a forward costs about a third of
//!   the forward + backward of a training step per token, so one evaluation is estimated at
//!   `eval_tokens / tokens_per_sec / 3`;
//! - one round of probe answers is timed for real (the probes are answered once);
//! - checkpoint writes (adapter + optimizer state, a few MB) are left out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::{probe, run, schedule, Trainer};

use super::TrainConfig;

/// What the preflight measured and what it predicts for the whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreflightReport {
    /// Optimizer steps run (the first one is a warm-up and not timed, unless it is the only one).
    pub steps_run: usize,
    /// Median wall time of the timed steps.
    pub secs_per_step: f64,
    /// Batch tokens (padding included, as the trainer counts them) per second over the timed steps.
    pub tokens_per_sec: f64,
    /// Peak resident memory of this process so far, in MiB (`None` where the OS does not say).
    pub peak_rss_mb: Option<f64>,
    /// The run's estimated peak memory ([`crate::train::memory::estimate`]), in MiB.
    pub estimated_peak_mb: f64,
    /// Steps the configured run will take.
    pub total_steps: usize,
    /// Evaluations the run will do (every `eval_every` steps and at the end; 0 without held-out data).
    pub eval_runs: usize,
    /// Estimated seconds of one evaluation.
    pub eval_secs_each: f64,
    /// Rounds of probe answers the run will produce (before training, at every evaluation step,
    /// at the end).
    pub probe_rounds: usize,
    /// Measured seconds of one round of probe answers (0 without probes).
    pub probe_secs_each: f64,
    /// `secs_per_step × total_steps + eval_runs × eval_secs_each + probe_rounds × probe_secs_each`.
    pub estimated_total_secs: f64,
    /// Remarks from preparing the data (truncated or skipped examples).
    pub notes: Vec<String>,
}

/// How far a preflight got, for a progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreflightProgress {
    /// Opening the model and tokenizing the data.
    Preparing,
    /// Running step `step` of `of` (1-based).
    Step { step: usize, of: usize },
    /// Answering the probe prompts once, to time them.
    Probing,
}

/// Runs `steps` steps (at most the run's own length) of the run `cfg` describes and reports
/// timings and the estimated total time. Writes nothing. `cancel` is checked between steps.
pub fn preflight(cfg: &TrainConfig, steps: usize, cancel: &AtomicBool) -> Result<PreflightReport> {
    preflight_with(cfg, steps, cancel, &mut |_| {})
}

/// [`preflight`] with progress reports.
pub fn preflight_with(
    cfg: &TrainConfig,
    steps: usize,
    cancel: &AtomicBool,
    on_progress: &mut dyn FnMut(PreflightProgress),
) -> Result<PreflightReport> {
    if steps == 0 {
        return Err(Error::config("preflight", "must run at least 1 step"));
    }
    on_progress(PreflightProgress::Preparing);
    let mut notes = Vec::new();
    let mut trainer = run::build(cfg, None, &mut |n| notes.push(n))?;
    let total_steps = trainer.total_steps();
    let steps = steps.min(total_steps);
    let mut step_secs = Vec::with_capacity(steps);
    let mut step_tokens = Vec::with_capacity(steps);
    for i in 0..steps {
        check_cancel(cancel)?;
        on_progress(PreflightProgress::Step { step: i + 1, of: steps });
        let lr = schedule::lr_at(cfg.schedule, cfg.lr, cfg.warmup_steps, trainer.state.step, total_steps);
        let start = Instant::now();
        let tokens = trainer.train_step(lr)?.tokens;
        step_secs.push(start.elapsed().as_secs_f64());
        step_tokens.push(tokens);
        trainer.state.step += 1;
    }
    // The first step pays for lazy allocations and cold caches.
    let warm_up = usize::from(steps > 1);
    let timed_secs = &step_secs[warm_up..];
    let timed_tokens: usize = step_tokens[warm_up..].iter().sum();
    let secs_per_step = median(timed_secs);
    let tokens_per_sec = timed_tokens as f64 / timed_secs.iter().sum::<f64>().max(1e-9);

    let probe_secs_each = if cfg.probe_prompts.is_empty() {
        0.0
    } else {
        check_cancel(cancel)?;
        on_progress(PreflightProgress::Probing);
        time_probes(&trainer, cancel)?
    };
    check_cancel(cancel)?;

    let eval_tokens = trainer.eval_tokens();
    let eval_runs = if eval_tokens == 0 {
        0
    } else {
        scheduled_rounds(total_steps, cfg.eval_every)
    };
    let eval_secs_each = eval_tokens as f64 / tokens_per_sec.max(1e-9) / 3.0;
    let probe_rounds = if cfg.probe_prompts.is_empty() {
        0
    } else {
        1 + scheduled_rounds(total_steps, cfg.eval_every)
    };
    let estimated_total_secs =
        secs_per_step * total_steps as f64 + eval_runs as f64 * eval_secs_each + probe_rounds as f64 * probe_secs_each;
    Ok(PreflightReport {
        steps_run: steps,
        secs_per_step,
        tokens_per_sec,
        peak_rss_mb: crate::system::peak_rss_mb(),
        estimated_peak_mb: crate::train::memory::estimate(&trainer.model.cfg, cfg).total_mb,
        total_steps,
        eval_runs,
        eval_secs_each,
        probe_rounds,
        probe_secs_each,
        estimated_total_secs,
        notes,
    })
}

fn time_probes(trainer: &Trainer, cancel: &AtomicBool) -> Result<f64> {
    let Some(format) = &trainer.chat_format else {
        return Err(Error::config(
            "probe_prompts",
            "the trainer was given no chat format to render the probe prompts with",
        ));
    };
    let start = Instant::now();
    let answers = probe::answer_probes(
        &trainer.model,
        format,
        &trainer.cfg.probe_prompts,
        trainer.cfg.probe_max_tokens,
        cancel,
    )?;
    if answers.is_none() {
        return Err(cancelled());
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Evaluations (or probe rounds after step 0) in a run of `total_steps`: one every `every` steps
/// plus one at the end unless the last step is already one.
fn scheduled_rounds(total_steps: usize, every: usize) -> usize {
    if every == 0 {
        return 1;
    }
    total_steps / every + usize::from(total_steps % every != 0)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn cancelled() -> Error {
    Error::config("preflight", "cancelled before it finished")
}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(cancelled())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_count_the_end_once() {
        assert_eq!(scheduled_rounds(10, 5), 2);
        assert_eq!(scheduled_rounds(12, 5), 3);
        assert_eq!(scheduled_rounds(3, 0), 1);
        assert_eq!(scheduled_rounds(3, 5), 1);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }
}
