//! Where base-model tensors come from. A `WeightSource` hands out tensors by their Hugging Face
//! name (`model.layers.0.self_attn.q_proj.weight`), already in the requested dtype and on the
//! requested device, and checks their shape. Safetensors folders and GGUF files both implement
//! it, so the model code is the same for both.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

pub trait WeightSource {
    /// The tensor named `name` (Hugging Face naming), with shape `shape`. Errors name the file
    /// and the tensor when it is missing, has another shape, or an unsupported dtype.
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// Whether a tensor named `name` exists.
    fn contains(&self, name: &str) -> bool;

    /// The file (or folder) the weights come from, for error messages.
    fn origin(&self) -> &Path;
}
