//! Finch: instruction-tuning of small language models with LoRA, on CPU, CUDA or Metal.
//!
//! The library holds the whole engine (model loading, trainable transformer, LoRA, trainer,
//! data, hub); `src/main.rs` only parses the command line. Only `ui` (the desktop studio)
//! depends on a GUI; the engine never imports it. `ui` exists with the `studio` feature (a
//! default one); without it Finch builds headless, CLI only.

pub mod alloc;
pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod fsutil;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod rng;
pub mod system;
pub mod template;
#[doc(hidden)]
pub mod testing;
pub mod train;
#[cfg(feature = "studio")]
pub mod ui;

pub use error::{Error, Result};
