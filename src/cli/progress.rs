//! A progress line on stderr for training events: a bar, loss, tokens/s and ETA. On a terminal
//! it redraws one line; otherwise (logs, CI) it prints a line every few seconds.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::train::TrainEvent;

pub struct Progress {
    tty: bool,
    last_print: Option<Instant>,
    smoothed_loss: Option<f32>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last_print: None,
            smoothed_loss: None,
        }
    }
}

pub fn format_secs(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Progress {
    pub fn on_event(&mut self, e: &TrainEvent) {
        let mut err = std::io::stderr();
        match e {
            TrainEvent::Started {
                total_steps,
                start_step,
                train_examples,
                eval_examples,
                trainable_params,
            } => {
                let resumed = if *start_step > 0 {
                    format!(", resuming at step {start_step}")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    err,
                    "training {total_steps} steps on {train_examples} examples ({eval_examples} held out), \
                     {:.2}M trainable parameters{resumed}",
                    *trainable_params as f64 / 1e6
                );
            }
            TrainEvent::Step(m) => {
                let s = self.smoothed_loss.map_or(m.loss, |s| 0.9 * s + 0.1 * m.loss);
                self.smoothed_loss = Some(s);
                let width = 24;
                let filled = (m.step * width / m.total_steps.max(1)).min(width);
                let line = format!(
                    "[{}{}] {}/{} loss {:.4} (avg {:.4}) lr {:.2e} | {:.0} tok/s | {} elapsed, ETA {}",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    m.step,
                    m.total_steps,
                    m.loss,
                    s,
                    m.lr,
                    m.tokens_per_sec,
                    format_secs(m.elapsed_secs),
                    format_secs(m.eta_secs)
                );
                if self.tty {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else if self.last_print.is_none_or(|t| t.elapsed().as_secs_f64() > 5.0) || m.step == m.total_steps {
                    let _ = writeln!(err, "{line}");
                    self.last_print = Some(Instant::now());
                }
            }
            TrainEvent::Eval { step, loss, perplexity } => {
                self.newline();
                let _ = writeln!(err, "eval at step {step}: loss {loss:.4}, perplexity {perplexity:.2}");
            }
            TrainEvent::Probe { step, answers } => {
                self.newline();
                for a in answers {
                    let _ = writeln!(err, "probe at step {step}: {:?} -> {:?}", a.prompt, a.text);
                }
            }
            TrainEvent::Checkpoint { step, path } => {
                self.newline();
                let _ = writeln!(err, "checkpoint at step {step}: {}", path.display());
            }
            TrainEvent::Finished(s) => {
                self.newline();
                let what = if s.stopped { "stopped" } else { "finished" };
                let _ = writeln!(err, "{what} after {} steps in {}", s.steps, format_secs(s.elapsed_secs));
            }
            TrainEvent::Failed { step, error } => {
                self.newline();
                let _ = writeln!(err, "failed at step {step}: {error}");
            }
        }
    }

    fn newline(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}
