//! Base models: configuration, weight sources (safetensors folders, GGUF files), and the
//! differentiable transformer used for training.

pub mod attention;
pub mod cached_attention;
pub mod config;
pub mod decoder;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod load;
pub mod loss;
pub mod quantized;
pub mod safetensors;
pub mod template_choice;
pub mod tiny;
pub mod transformer;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use gguf::GgufModel;
pub use load::ModelFiles;
pub use transformer::Transformer;
pub use weights::WeightSource;
