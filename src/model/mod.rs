//! Base models: configuration, weight sources (safetensors folders, GGUF files), and the
//! differentiable transformer used for training.

pub mod config;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod tiny;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use gguf::GgufModel;
pub use weights::WeightSource;
