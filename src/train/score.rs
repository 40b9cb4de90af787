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

/// The two tokenized forms IFD compares for one row (Li et al. 2023, "From Quantity to
/// Quality"): the answer after its instruction (everything before the last assistant turn,
/// rendered with the chat template, generation prompt included) and the answer alone. Both
/// carry loss on exactly the same answer tokens (the template's end-of-turn marker is not part
/// of either), so their mean losses divide cleanly. `None` for raw text, a conversation without
/// an assistant answer, or one whose instruction leaves no room for the answer in `seq_len`.
pub fn ifd_pair(
    example: &crate::data::Example,
    template: &crate::template::ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    seq_len: usize,
) -> Result<Option<(TokenizedExample, TokenizedExample)>> {
    use crate::data::Role;
    use crate::error::Error;
    let Some((messages, _tools)) = example.conversation() else {
        return Ok(None);
    };
    let Some(last) = messages.iter().rposition(|m| m.role == Role::Assistant) else {
        return Ok(None);
    };
    if last == 0 {
        return Ok(None);
    }
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    };
    let prefix = crate::data::tokenize::post_processor_prefix(tokenizer)?;
    let mut prompt = encode(&template.render(&messages[..last], true)?)?;
    if !prefix.is_empty() && !prompt.starts_with(&prefix) {
        prompt = [prefix.as_slice(), &prompt].concat();
    }
    let mut answer = encode(&messages[last].content)?;
    if prompt.len() + 1 >= seq_len || answer.is_empty() {
        return Ok(None);
    }
    answer.truncate(seq_len - prompt.len());
    let conditioned_ids = [prompt.as_slice(), &answer].concat();
    let mut conditioned_mask = vec![false; prompt.len()];
    conditioned_mask.extend(std::iter::repeat_n(true, answer.len()));
    let alone_ids = [prefix.as_slice(), &answer].concat();
    let mut alone_mask = vec![false; prefix.len()];
    alone_mask.extend(std::iter::repeat_n(true, answer.len()));
    if prefix.is_empty() {
        // Alone, the first answer token has nothing to be predicted from: leave it out of both.
        conditioned_mask[prompt.len()] = false;
    }
    Ok(Some((
        TokenizedExample {
            input_ids: conditioned_ids,
            loss_mask: conditioned_mask,
            truncated: false,
        },
        TokenizedExample {
            input_ids: alone_ids,
            loss_mask: alone_mask,
            truncated: false,
        },
    )))
}

/// IFD of every row: answer loss given the instruction ÷ answer loss alone
/// ([`crate::data::quality::ifd_scores`]); NaN where [`ifd_pair`] has nothing to score.
/// Also returns both losses. `on_row` is called after each row (progress).
pub fn ifd_rows(
    scorer: &mut dyn ResponseScorer,
    pairs: &[Option<(TokenizedExample, TokenizedExample)>],
    on_row: &mut dyn FnMut(usize),
) -> Result<IfdScores> {
    let mut out = IfdScores::default();
    for (i, pair) in pairs.iter().enumerate() {
        let (c, a) = match pair {
            Some((c, a)) => {
                let l = scorer.response_losses(&[c.clone(), a.clone()])?;
                (l[0], l[1])
            }
            None => (f32::NAN, f32::NAN),
        };
        out.conditioned.push(c);
        out.alone.push(a);
        on_row(i + 1);
    }
    out.ifd = crate::data::quality::ifd_scores(&out.conditioned, &out.alone)?;
    Ok(out)
}

/// Per-row IFD and the two losses it divides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IfdScores {
    pub conditioned: Vec<f32>,
    pub alone: Vec<f32>,
    pub ifd: Vec<f32>,
}
