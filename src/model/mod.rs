//! Base models: configuration, weight sources (safetensors folders, GGUF files), and the
//! differentiable transformer used for training.

pub mod config;
pub mod tiny;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use weights::WeightSource;
