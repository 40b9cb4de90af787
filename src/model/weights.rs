//! Where base-model tensors come from. A `WeightSource` hands out tensors by their Hugging Face
//! name (`model.layers.0.self_attn.q_proj.weight`), already in the requested dtype and on the
//! requested device, and checks their shape. Safetensors folders and GGUF files both implement
//! it, so the model code is the same for both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kernels::quant::{QMatrix, QType};

pub trait WeightSource {
    /// The tensor named `name` (Hugging Face naming), with shape `shape`. Errors name the file
    /// and the tensor when it is missing, has another shape, or an unsupported dtype.
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// Whether a tensor named `name` exists.
    fn contains(&self, name: &str) -> bool;

    /// The `[rows, cols]` matrix `name` as `qtype` blocks exactly as the source stores them,
    /// when it stores them so (a GGUF tensor of that type): a quantized training base then
    /// uses the file's own blocks, with no f32 copy and no second rounding. `None` when the
    /// tensor has another type (the caller quantizes [`WeightSource::get`]'s values instead).
    fn blocks(&self, name: &str, shape: &[usize], qtype: QType) -> Result<Option<QMatrix>> {
        let _ = (name, shape, qtype);
        Ok(None)
    }

    /// The file (or folder) the weights come from, for error messages.
    fn origin(&self) -> &Path;
}

/// Weights already in memory, by Hugging Face name (random models, merged adapters).
pub struct TensorMap {
    pub tensors: HashMap<String, Tensor>,
    pub origin: PathBuf,
}

impl WeightSource for TensorMap {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| crate::Error::MissingTensor {
            path: self.origin.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        if t.dims() != shape {
            return Err(crate::Error::ShapeMismatch {
                path: self.origin.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}
