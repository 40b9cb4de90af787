//! Reading runs back: the curves, probe answers and state of a run folder from its
//! `metrics.jsonl` (written by the trainer in this module's parent) and `config.toml`, and the
//! list of runs under a runs folder. The studio's Train, Chat and Export pages read runs through
//! here; nothing else parses `metrics.jsonl`.

use std::path::{Path, PathBuf};

use super::{Duration, PaddingTally, ProbeAnswer, TrainConfig, METRICS_FILE};

/// The answers to the probe prompts at one step (0: before training).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeRound {
    pub step: usize,
    pub answers: Vec<ProbeAnswer>,
}

/// A run folder as read from its `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunHistory {
    pub name: String,
    pub dir: PathBuf,
    /// `(step, loss)` of every logged optimizer step.
    pub loss: Vec<[f64; 2]>,
    pub eval_loss: Vec<[f64; 2]>,
    pub lr: Vec<[f64; 2]>,
    pub grad_norm: Vec<[f64; 2]>,
    /// DPO / ORPO: `(step, reward margin)` and `(step, reward accuracy)` of the training steps
    /// and of the evaluations (empty for supervised runs).
    pub reward_margin: Vec<[f64; 2]>,
    pub reward_accuracy: Vec<[f64; 2]>,
    pub eval_reward_margin: Vec<[f64; 2]>,
    pub eval_reward_accuracy: Vec<[f64; 2]>,
    /// The probe answers logged by the run, oldest first.
    pub probes: Vec<ProbeRound>,
    /// Non-padding tokens and positions of the logged steps (those that log both: runs before
    /// padding was logged count none), for the run's padding share.
    pub padding: PaddingTally,
    pub last_step: usize,
    /// Steps the run was configured for, when its `config.toml` gives a step count.
    pub planned_steps: Option<usize>,
    /// A checkpoint exists, so the run can be resumed.
    pub has_checkpoint: bool,
    /// The last logged line was a failure.
    pub failed: bool,
}

impl RunHistory {
    /// Reads one run folder; `None` when it holds no `metrics.jsonl`. Malformed lines (a line
    /// cut short by a crash) are skipped: the rest of the curve is still worth showing.
    pub fn read(dir: &Path) -> Option<RunHistory> {
        let text = std::fs::read_to_string(dir.join(METRICS_FILE)).ok()?;
        let mut run = RunHistory {
            name: dir.file_name()?.to_string_lossy().into_owned(),
            dir: dir.to_path_buf(),
            ..RunHistory::default()
        };
        for line in text.lines() {
            run.add_line(line);
        }
        run.has_checkpoint = super::checkpoint::latest(dir).is_some();
        run.planned_steps = TrainConfig::from_toml_file(&dir.join("config.toml"))
            .ok()
            .and_then(|cfg| match cfg.duration {
                Duration::Steps(n) => Some(n),
                Duration::Epochs(_) => None,
            });
        Some(run)
    }

    /// Adds one `metrics.jsonl` line; a line that is not a metrics record is ignored.
    fn add_line(&mut self, line: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let Some(step) = num("step") else { return };
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("train") => {
                self.failed = false;
                self.last_step = self.last_step.max(step as usize);
                if let Some(loss) = num("loss") {
                    self.loss.push([step, loss]);
                }
                if let Some(lr) = num("lr") {
                    self.lr.push([step, lr]);
                }
                if let Some(g) = num("grad_norm") {
                    self.grad_norm.push([step, g]);
                }
                if let Some(m) = num("reward_margin") {
                    self.reward_margin.push([step, m]);
                }
                if let Some(a) = num("reward_accuracy") {
                    self.reward_accuracy.push([step, a]);
                }
                if let (Some(t), Some(p)) = (num("tokens"), num("padded_tokens")) {
                    self.padding.tokens += t as usize;
                    self.padding.padded_tokens += p as usize;
                }
            }
            Some("eval") => {
                if let Some(loss) = num("eval_loss") {
                    self.eval_loss.push([step, loss]);
                }
                if let Some(m) = num("reward_margin") {
                    self.eval_reward_margin.push([step, m]);
                }
                if let Some(a) = num("reward_accuracy") {
                    self.eval_reward_accuracy.push([step, a]);
                }
            }
            Some("probe") => {
                let answers = v.get("probe").cloned().map(serde_json::from_value::<Vec<ProbeAnswer>>);
                if let Some(Ok(answers)) = answers {
                    self.probes.push(ProbeRound {
                        step: step as usize,
                        answers,
                    });
                }
            }
            Some("failed") => self.failed = true,
            _ => {}
        }
    }

    /// Every run folder directly under `runs_dir`, newest first (by `metrics.jsonl` modification
    /// time, then by name). A missing or unreadable runs folder has no runs.
    pub fn scan(runs_dir: &Path) -> Vec<RunHistory> {
        let Ok(entries) = std::fs::read_dir(runs_dir) else {
            return Vec::new();
        };
        let mut runs: Vec<(std::time::SystemTime, RunHistory)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                let modified = e
                    .path()
                    .join(METRICS_FILE)
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((modified, RunHistory::read(&e.path())?))
            })
            .collect();
        runs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.name.cmp(&b.1.name)));
        runs.into_iter().map(|(_, r)| r).collect()
    }

    /// True when a checkpoint exists and the run has steps left (or its length is in epochs).
    pub fn resumable(&self) -> bool {
        self.has_checkpoint && self.planned_steps.is_none_or(|n| self.last_step < n)
    }

    /// True when the run wrote a finished adapter (`adapter/adapter_config.json`).
    pub fn has_adapter(&self) -> bool {
        self.dir.join("adapter").join("adapter_config.json").is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(runs: &Path, name: &str, metrics: &str, steps: Option<usize>) -> PathBuf {
        let run = runs.join(name);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join(METRICS_FILE), metrics).unwrap();
        if let Some(steps) = steps {
            let cfg = TrainConfig {
                duration: Duration::Steps(steps),
                ..TrainConfig::default()
            };
            std::fs::write(run.join("config.toml"), cfg.to_toml().unwrap()).unwrap();
        }
        run
    }

    #[test]
    fn reads_curves_and_skips_broken_lines() {
        let dir = tempfile::tempdir().unwrap();
        write_run(
            dir.path(),
            "demo",
            "{\"kind\":\"train\",\"step\":1,\"loss\":2.5,\"lr\":0.0002,\"grad_norm\":1.5}\n\
             {\"kind\":\"eval\",\"step\":1,\"eval_loss\":2.7,\"perplexity\":14.9}\n\
             {\"kind\":\"train\",\"step\":2,\"lo\n\
             {\"kind\":\"probe\",\"step\":1,\"probe\":[{\"prompt\":\"Hi?\",\"text\":\"Hello\",\"tokens\":2}]}\n\
             {\"kind\":\"train\",\"step\":3,\"loss\":2.0,\"lr\":0.0001,\"grad_norm\":1.0}\n",
            Some(5),
        );
        std::fs::create_dir_all(dir.path().join("not-a-run")).unwrap();
        let runs = RunHistory::scan(dir.path());
        assert_eq!(runs.len(), 1, "a folder without metrics.jsonl is not a run");
        let r = &runs[0];
        assert_eq!(r.name, "demo");
        assert_eq!(r.loss, vec![[1.0, 2.5], [3.0, 2.0]]);
        assert_eq!(r.lr, vec![[1.0, 0.0002], [3.0, 0.0001]]);
        assert_eq!(r.grad_norm, vec![[1.0, 1.5], [3.0, 1.0]]);
        assert_eq!(r.eval_loss, vec![[1.0, 2.7]]);
        assert_eq!(r.probes.len(), 1);
        assert_eq!(r.probes[0].step, 1);
        assert_eq!(r.probes[0].answers[0].text, "Hello");
        assert_eq!(r.last_step, 3);
        assert_eq!(r.planned_steps, Some(5));
        assert!(!r.failed);
        assert!(!r.has_checkpoint && !r.resumable(), "no checkpoint, nothing to resume");
        assert!(!r.has_adapter());
    }

    #[test]
    fn the_padding_share_counts_the_steps_that_log_padding() {
        let dir = tempfile::tempdir().unwrap();
        let run = write_run(
            dir.path(),
            "padded",
            "{\"kind\":\"train\",\"step\":1,\"loss\":3.0,\"tokens\":50}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":2.0,\"tokens\":60,\"padded_tokens\":100}\n\
             {\"kind\":\"train\",\"step\":3,\"loss\":1.0,\"tokens\":90,\"padded_tokens\":100}\n",
            None,
        );
        let r = RunHistory::read(&run).unwrap();
        // Step 1 (logged before padding was) is left out rather than counted as unpadded.
        assert_eq!(
            r.padding,
            PaddingTally {
                tokens: 150,
                padded_tokens: 200
            }
        );
        assert!((r.padding.share() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn a_truncated_last_line_keeps_the_curve_before_it() {
        let dir = tempfile::tempdir().unwrap();
        // A crash mid-write leaves half a line and no newline at the end of the file.
        let run = write_run(
            dir.path(),
            "crashed",
            "{\"kind\":\"train\",\"step\":1,\"loss\":3.0,\"lr\":0.001,\"grad_norm\":2.0}\n\
             {\"kind\":\"train\",\"step\":2,\"loss\":2.8,\"lr\":0.001,\"grad_norm\":1.9}\n\
             {\"kind\":\"train\",\"step\":3,\"loss\":2.",
            None,
        );
        let r = RunHistory::read(&run).expect("a run");
        assert_eq!(r.loss, vec![[1.0, 3.0], [2.0, 2.8]]);
        assert_eq!(r.last_step, 2);
        assert_eq!(r.planned_steps, None, "no config.toml");
    }

    #[test]
    fn a_failure_is_remembered_until_training_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let failed_line = "{\"kind\":\"failed\",\"step\":2,\"error\":\"loss is NaN\"}\n";
        let train_line = "{\"kind\":\"train\",\"step\":3,\"loss\":1.0}\n";
        let run = write_run(dir.path(), "a", failed_line, None);
        assert!(RunHistory::read(&run).unwrap().failed);
        let run = write_run(dir.path(), "b", &format!("{failed_line}{train_line}"), None);
        assert!(!RunHistory::read(&run).unwrap().failed, "a resumed run trained on");
    }

    #[test]
    fn missing_folders_read_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RunHistory::scan(&dir.path().join("absent")).is_empty());
        assert!(RunHistory::read(dir.path()).is_none());
    }
}
