//! Progress on stderr for long commands, drawn with `indicatif`: training (a bar over the steps
//! with loss, smoothed loss, learning rate, tokens/s, the padding share so far, elapsed time and
//! ETA) and downloads (a bar
//! over the bytes with size, rate, ETA and the current file).
//!
//! On a terminal indicatif redraws one bar and prints other messages above it. When stderr is not
//! a terminal (logs, CI, tests) indicatif draws nothing, so the same information is printed as
//! plain lines instead: a training line every few seconds and at the last step, a download line
//! at every tenth of the bytes.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::hub::DownloadProgress;
use crate::train::{PaddingTally, TrainEvent};

const TRAIN_TEMPLATE: &str = "[{bar:24}] {pos}/{len} {msg}";
const DOWNLOAD_TEMPLATE: &str = "[{bar:24}] {msg}";

/// How often a plain (non-terminal) training line is printed.
const PLAIN_LINE_EVERY: Duration = Duration::from_secs(5);

fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn bar(len: u64, template: &str, chars: &str) -> ProgressBar {
    // The templates are constants of this file; a typo is a bug caught by the tests below.
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars(chars);
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()).with_style(style)
}

/// Renders [`TrainEvent`]s on stderr.
pub struct Progress {
    terminal: bool,
    bar: Option<ProgressBar>,
    last_plain_line: Option<Instant>,
    smoothed_loss: Option<f32>,
    /// The steps seen so far, for their padding share.
    padding: PaddingTally,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new(stderr_is_terminal())
    }
}

/// `42s`, `2m05s`, `1h02m`.
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
    /// `terminal`: draw a live bar (else plain lines).
    pub fn new(terminal: bool) -> Self {
        Progress {
            terminal,
            bar: None,
            last_plain_line: None,
            smoothed_loss: None,
            padding: PaddingTally::default(),
        }
    }

    pub fn on_event(&mut self, e: &TrainEvent) {
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
                self.message(&format!(
                    "training {total_steps} steps on {train_examples} examples ({eval_examples} held out), \
                     {:.2}M trainable parameters{resumed}",
                    *trainable_params as f64 / 1e6
                ));
                if self.terminal {
                    let b = bar(*total_steps as u64, TRAIN_TEMPLATE, "#.");
                    b.set_position(*start_step as u64);
                    self.bar = Some(b);
                }
            }
            TrainEvent::Step(m) => {
                let s = self.smoothed_loss.map_or(m.loss, |s| 0.9 * s + 0.1 * m.loss);
                self.smoothed_loss = Some(s);
                self.padding.add(m);
                let rewards = m
                    .preference
                    .map(|p| format!(" margin {:.3} acc {:.0}%", p.reward_margin, 100.0 * p.accuracy))
                    .unwrap_or_default();
                let figures = format!(
                    "loss {:.4} (avg {:.4}){rewards} lr {:.2e} | {:.0} tok/s, padding {:.0}% | {} elapsed, ETA {}",
                    m.loss,
                    s,
                    m.lr,
                    m.tokens_per_sec,
                    100.0 * self.padding.share(),
                    format_secs(m.elapsed_secs),
                    format_secs(m.eta_secs)
                );
                if let Some(b) = &self.bar {
                    b.set_length(m.total_steps as u64);
                    b.set_position(m.step as u64);
                    b.set_message(figures);
                } else if self.last_plain_line.is_none_or(|t| t.elapsed() > PLAIN_LINE_EVERY) || m.step == m.total_steps
                {
                    eprintln!("{}/{} {figures}", m.step, m.total_steps);
                    self.last_plain_line = Some(Instant::now());
                }
            }
            TrainEvent::Eval {
                step,
                loss,
                perplexity,
                preference,
            } => match preference {
                Some(p) => self.message(&format!(
                    "eval at step {step}: loss {loss:.4}, reward margin {:.4}, accuracy {:.1}%, chosen perplexity \
                     {perplexity:.2}",
                    p.reward_margin,
                    100.0 * p.accuracy
                )),
                None => self.message(&format!(
                    "eval at step {step}: loss {loss:.4}, perplexity {perplexity:.2}"
                )),
            },
            TrainEvent::Probe { step, answers } => {
                for a in answers {
                    self.message(&format!("probe at step {step}: {:?} -> {:?}", a.prompt, a.text));
                }
            }
            TrainEvent::Checkpoint { step, path } => {
                self.message(&format!("checkpoint at step {step}: {}", path.display()));
            }
            TrainEvent::Finished(s) => {
                self.end_bar();
                let what = if s.stopped { "stopped" } else { "finished" };
                eprintln!("{what} after {} steps in {}", s.steps, format_secs(s.elapsed_secs));
            }
            TrainEvent::Failed { step, error } => {
                self.end_bar();
                eprintln!("failed at step {step}: {error}");
            }
        }
    }

    /// A line above the bar (or just a line).
    fn message(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Leaves the last drawn bar on screen; later lines go below it.
    fn end_bar(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end_bar();
    }
}

/// Renders download events on stderr: a bar with bytes, rate and ETA on a terminal, a line per
/// 10% otherwise.
pub struct DownloadBar {
    started: Instant,
    /// Bytes already present when the transfer started (cached or resumed), excluded from the rate.
    start_done_bytes: u64,
    last_logged_tenth: u64,
    terminal: bool,
    bar: Option<ProgressBar>,
    file: String,
}

impl Default for DownloadBar {
    fn default() -> Self {
        Self::new()
    }
}

impl DownloadBar {
    pub fn new() -> Self {
        DownloadBar {
            started: Instant::now(),
            start_done_bytes: 0,
            last_logged_tenth: 0,
            terminal: stderr_is_terminal(),
            bar: None,
            file: String::new(),
        }
    }

    pub fn on_event(&mut self, event: &DownloadProgress) {
        match event {
            DownloadProgress::Planned {
                id,
                commit,
                files,
                total_bytes,
                done_bytes,
            } => {
                self.started = Instant::now();
                self.start_done_bytes = *done_bytes;
                let cached = files.iter().filter(|f| f.cached).count();
                self.message(&format!(
                    "{id} @ {}: {} files, {}{}",
                    commit.chars().take(8).collect::<String>(),
                    files.len(),
                    human_bytes(*total_bytes),
                    if cached > 0 {
                        format!(" ({cached} already cached)")
                    } else {
                        String::new()
                    }
                ));
            }
            DownloadProgress::FileStarted {
                file,
                resume_from_bytes,
                ..
            } => {
                self.file = file.clone();
                if *resume_from_bytes > 0 {
                    self.message(&format!("resuming {file} from {}", human_bytes(*resume_from_bytes)));
                }
            }
            DownloadProgress::Bytes {
                done_bytes,
                total_bytes,
                ..
            } => self.draw(*done_bytes, *total_bytes),
            DownloadProgress::WaitingForLock { file, lock_path } => {
                self.message(&format!(
                    "waiting: another download is writing {file} (lock {})",
                    lock_path.display()
                ));
            }
            DownloadProgress::Verifying { .. } | DownloadProgress::FileDone { .. } => {}
            DownloadProgress::Finished { snapshot, .. } => {
                self.finish_line();
                eprintln!(
                    "done in {:.1} s: {}",
                    self.started.elapsed().as_secs_f64(),
                    snapshot.display()
                );
            }
        }
    }

    fn message(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn draw(&mut self, done_bytes: u64, total_bytes: u64) {
        let fraction = if total_bytes == 0 {
            1.0
        } else {
            done_bytes as f64 / total_bytes as f64
        };
        let elapsed_secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate_bytes_per_sec = done_bytes.saturating_sub(self.start_done_bytes) as f64 / elapsed_secs;
        let eta = if rate_bytes_per_sec > 0.0 {
            format_duration(Duration::from_secs_f64(
                total_bytes.saturating_sub(done_bytes) as f64 / rate_bytes_per_sec,
            ))
        } else {
            "?".to_string()
        };
        let line = format!(
            "{:>3.0}% {} / {}  {}/s  ETA {eta}  {}",
            fraction * 100.0,
            human_bytes(done_bytes),
            human_bytes(total_bytes),
            human_bytes(rate_bytes_per_sec as u64),
            self.file
        );
        if self.terminal {
            let b = self
                .bar
                .get_or_insert_with(|| bar(total_bytes, DOWNLOAD_TEMPLATE, "#-"));
            b.set_length(total_bytes);
            b.set_position(done_bytes);
            b.set_message(line);
        } else {
            let tenth = (fraction * 10.0).floor() as u64;
            if tenth > self.last_logged_tenth {
                self.last_logged_tenth = tenth;
                eprintln!("{line}");
            }
        }
    }

    /// Ends a drawn bar so later messages start on a fresh line below it.
    pub fn finish_line(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

impl Drop for DownloadBar {
    fn drop(&mut self) {
        self.finish_line();
    }
}

/// `512 B`, `270.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `1:15`, `1:02:05`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
    } else {
        format!("{}:{:02}", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_naturally() {
        assert_eq!(format_secs(42.4), "42s");
        assert_eq!(format_secs(125.0), "2m05s");
        assert_eq!(format_secs(3725.0), "1h02m");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(270 * 1024 * 1024), "270.0 MiB");
        assert_eq!(format_duration(Duration::from_secs(3725)), "1:02:05");
        assert_eq!(format_duration(Duration::from_secs(75)), "1:15");
    }

    #[test]
    fn bar_templates_parse() {
        for template in [TRAIN_TEMPLATE, DOWNLOAD_TEMPLATE] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }
}
