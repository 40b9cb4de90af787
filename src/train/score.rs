//! Per-row loss scoring with a model (the data-selection idea behind perplexity / IFD filters):
//! the mean loss of each row's trained tokens under the base model (or base + adapter).

use crate::data::quality::ResponseScorer;
use crate::data::TokenizedExample;
use crate::error::Result;
use crate::lora::ForwardCtx;
use crate::model::Transformer;
use crate::train::batch::make_batch;

pub struct ModelScorer<'a> {
    pub model: &'a Transformer,
    pub pad_id: u32,
}

impl ResponseScorer for ModelScorer<'_> {
    /// One forward pass per row (rows differ in length; padding would not change the result
    /// but batching short rows with long ones wastes more than it saves on a CPU).
    fn response_losses(&mut self, rows: &[TokenizedExample]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let batch = make_batch(&[row], self.pad_id, self.model.device())?;
            if batch.targets.is_empty() {
                out.push(f32::NAN);
                continue;
            }
            let loss = crate::train::batch_loss(self.model, &batch, &mut ForwardCtx::eval())?;
            out.push(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        }
        Ok(out)
    }
}
