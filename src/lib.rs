//! Finch: instruction-tuning of small language models with LoRA, on CPU, CUDA or Metal.
//!
//! The library holds the whole engine (model loading, trainable transformer, LoRA, trainer,
//! data, hub); `src/main.rs` only parses the command line. Nothing here depends on a GUI.

pub mod bench;
pub mod cli;
pub mod data;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod hub;
pub mod lora;
pub mod model;
pub mod rng;
pub mod system;
pub mod template;
#[doc(hidden)]
pub mod testing;
pub mod train;

pub use error::{Error, Result};
