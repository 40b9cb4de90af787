//! A model that runs one sequence incrementally, token by token: what generation drives.

use crate::error::Result;
use crate::model::transformer::{KvCache, Transformer};

/// A model that runs one sequence incrementally: the f32 [`Transformer`] with a [`KvCache`]
/// (adapters unmerged) or the quantized GGUF path ([`super::quantized::QuantizedModel`]).
pub trait Decoder {
    /// Starts a new sequence.
    fn reset(&mut self) -> Result<()>;
    /// Runs `ids` after the tokens already seen; returns the last position's logits `[vocab]`.
    fn step(&mut self, ids: &[u32]) -> Result<candle_core::Tensor>;
    /// Longest sequence (prompt + answer) the model handles.
    fn context_len(&self) -> usize;
}

/// The f32 transformer with its cache.
pub struct CachedTransformer<'a> {
    pub model: &'a Transformer,
    pub cache: KvCache,
}

impl<'a> CachedTransformer<'a> {
    pub fn new(model: &'a Transformer) -> Self {
        CachedTransformer {
            model,
            cache: KvCache::new(),
        }
    }
}

impl Decoder for CachedTransformer<'_> {
    fn reset(&mut self) -> Result<()> {
        self.cache.clear();
        Ok(())
    }

    fn step(&mut self, ids: &[u32]) -> Result<candle_core::Tensor> {
        self.model.forward_last_with_cache(ids, &mut self.cache)
    }

    fn context_len(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }
}
