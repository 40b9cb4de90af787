//! Checkpoints: `checkpoints/step-N/` holds the adapter (PEFT layout), the optimizer moments and
//! the trainer state (step, data cursor, RNG). A checkpoint is written into `step-N.tmp/` and
//! renamed into place, so a crash never leaves a half-written `step-N`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::train::batch::DataCursor;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything besides tensors needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub total_steps: usize,
    pub cursor: DataCursor,
    pub dropout_rng: Rng,
    pub elapsed_secs: f64,
    pub first_loss: Option<f32>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_dir(run_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step}"))
}

/// Complete checkpoints in `run_dir`, oldest first.
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(checkpoints_dir(run_dir))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n: usize = name.strip_prefix("step-")?.parse().ok()?;
                    let p = e.path();
                    p.join(STATE_FILE).is_file().then_some((n, p))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The newest complete checkpoint.
pub fn latest(run_dir: &Path) -> Option<(usize, PathBuf)> {
    list(run_dir).pop()
}

/// Writes a checkpoint via `fill(tmp_dir)` into a uniquely named temporary folder beside it, then
/// moves it into place and prunes old ones. A crash leaves a hidden `.step-N.*.tmp` folder that
/// [`list`] ignores; a failed `fill` removes its folder.
pub fn write(run_dir: &Path, step: usize, keep: usize, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let final_dir = step_dir(run_dir, step);
    let parent = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "cannot create checkpoint folder", e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".step-{step}."))
        .suffix(".tmp")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, "cannot create checkpoint folder", e))?;
    fill(tmp.path())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, "cannot replace checkpoint", e))?;
    }
    crate::fsutil::rename(&tmp.keep(), &final_dir)?;
    let all = list(run_dir);
    if keep > 0 && all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            // Best effort: an old checkpoint that cannot be removed only costs disk space.
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(final_dir)
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, "cannot read checkpoint state", e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(&p, "checkpoint state", e.to_string()))
}

pub fn write_state(dir: &Path, state: &TrainerState) -> Result<()> {
    let p = dir.join(STATE_FILE);
    let text =
        serde_json::to_string_pretty(state).map_err(|e| Error::invalid(&p, "checkpoint state", e.to_string()))?;
    crate::fsutil::write_atomic(&p, text.as_bytes())
}
