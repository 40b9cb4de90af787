//! Finding and attaching an adapter given on the command line: a run folder written by
//! `finch train` (which holds `adapter/`) or a PEFT adapter folder (Finch's or Python PEFT's).
//! The adapted model is a clone of the base, so base weights stay in memory once.

use std::path::Path;

use candle_core::Device;

use crate::error::Result;
pub use crate::lora::resolve_adapter_dir;
use crate::model::transformer::Transformer;

/// `base` with the adapter at `path` (run or adapter folder) attached, unmerged. The clone
/// shares every base tensor with `base`.
pub fn with_adapter(base: &Transformer, path: &Path) -> Result<Transformer> {
    let dir = resolve_adapter_dir(path)?;
    let adapter = crate::lora::load_adapter(&dir, &Device::Cpu)?;
    let mut model = base.clone();
    model.set_adapter(&adapter, &dir)?;
    Ok(model)
}
