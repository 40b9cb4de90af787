//! Finding and attaching an adapter given on the command line: a run folder written by
//! `finch train` (which holds `adapter/`) or a PEFT adapter folder (Finch's or Python PEFT's).
//! The adapted model is a clone of the base, so base weights stay in memory once.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::error::{Error, Result};
use crate::model::transformer::Transformer;

/// The PEFT adapter folder that `path` names: `path` itself when it holds
/// `adapter_config.json`, else `path/adapter` (a training run folder).
pub fn resolve_adapter_dir(path: &Path) -> Result<PathBuf> {
    if path.join("adapter_config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let nested = path.join("adapter");
    if nested.join("adapter_config.json").is_file() {
        return Ok(nested);
    }
    let hint = if !path.exists() {
        "no such folder".to_string()
    } else if path.join("checkpoints").is_dir() {
        "this run folder has no adapter/ yet (the run has not finished); pass a checkpoint's adapter folder".to_string()
    } else {
        "expected a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a \
         `finch train` run folder holding adapter/"
            .to_string()
    };
    Err(Error::MissingFile {
        path: path.to_path_buf(),
        file: "adapter_config.json".into(),
        hint,
    })
}

/// `base` with the adapter at `path` (run or adapter folder) attached, unmerged. The clone
/// shares every base tensor with `base`.
pub fn with_adapter(base: &Transformer, path: &Path) -> Result<Transformer> {
    let dir = resolve_adapter_dir(path)?;
    let adapter = crate::lora::load_adapter(&dir, &Device::Cpu)?;
    let mut model = base.clone();
    model.set_adapter(&adapter, &dir)?;
    Ok(model)
}
