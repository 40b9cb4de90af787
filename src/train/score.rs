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
/// rendered with the chat template, generation prompt included) and the answer without the
/// instruction. For a chat model "alone" keeps the template's frame (system message and
/// assistant header, with an empty user turn): on bare text every answer scores worse than
/// in a chat, which makes even an unrelated instruction look helpful (SmolLM2-135M-Instruct:
/// IFD 0.62 and 0.91 for answers unrelated to their question when measured on bare text).
/// Both carry loss on exactly the same answer tokens (the end-of-turn marker is in neither).
/// `None` for raw text, a conversation without an assistant answer after a turn, or one whose
/// instruction leaves no room for the answer in `seq_len`.
pub fn ifd_pair(
    example: &crate::data::Example,
    template: &crate::template::ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    seq_len: usize,
) -> Result<Option<(TokenizedExample, TokenizedExample)>> {
    use crate::data::{Message, Role};
    use crate::error::Error;
    let Some((messages, _tools)) = example.conversation() else {
        return Ok(None);
    };
    let Some(last) = messages.iter().rposition(|m| m.role == Role::Assistant) else {
        return Ok(None);
    };
    if last == 0 || messages[..last].iter().all(|m| m.role == Role::System) {
        return Ok(None);
    }
    let prefix = crate::data::tokenize::post_processor_prefix(tokenizer)?;
    let encode = |text: &str, with_prefix: bool| -> Result<Vec<u32>> {
        let ids = tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        if with_prefix && !prefix.is_empty() && !ids.starts_with(&prefix) {
            return Ok([prefix.as_slice(), &ids].concat());
        }
        Ok(ids)
    };
    let prompt = encode(&template.render(&messages[..last], true)?, true)?;
    let mut frame: Vec<Message> = messages
        .iter()
        .take_while(|m| m.role == Role::System)
        .cloned()
        .collect();
    frame.push(Message::new(Role::User, ""));
    let empty = encode(&template.render(&frame, true)?, true)?;
    let mut answer = encode(&messages[last].content, false)?;
    if prompt.len().max(empty.len()) + 1 >= seq_len || answer.is_empty() {
        return Ok(None);
    }
    answer.truncate(seq_len - prompt.len().max(empty.len()));
    let build = |context: &[u32]| {
        let mut loss_mask = vec![false; context.len()];
        loss_mask.extend(std::iter::repeat_n(true, answer.len()));
        TokenizedExample {
            input_ids: [context, answer.as_slice()].concat(),
            loss_mask,
            truncated: false,
        }
    };
    Ok(Some((build(&prompt), build(&empty))))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::data::{Example, Message, Role};
    use crate::model::tiny::{tiny_tokenizer_json, CHATML_TEMPLATE};

    /// Loss = mean of the trained token ids (so the two forms of a row differ only by context).
    struct Scripted(Vec<f32>);
    impl ResponseScorer for Scripted {
        fn response_losses(&mut self, rows: &[TokenizedExample]) -> Result<Vec<f32>> {
            Ok(rows.iter().map(|_| self.0.remove(0)).collect())
        }
    }

    #[test]
    fn ifd_pairs_score_the_same_answer_tokens_with_and_without_the_instruction() {
        let tok = tokenizers::Tokenizer::from_bytes(tiny_tokenizer_json().to_string()).unwrap();
        let template = crate::template::ChatTemplate::new(CHATML_TEMPLATE, None, None).unwrap();
        let row = Example::chat(vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Name a fruit."),
            Message::new(Role::Assistant, "A pear."),
        ]);
        let (with, alone) = ifd_pair(&row, &template, &tok, 256).unwrap().unwrap();
        let answer = |t: &TokenizedExample| -> Vec<u32> {
            t.input_ids
                .iter()
                .zip(&t.loss_mask)
                .filter(|(_, m)| **m)
                .map(|(i, _)| *i)
                .collect()
        };
        assert_eq!(answer(&with), answer(&alone));
        assert_eq!(tok.decode(&answer(&with), false).unwrap(), "A pear.");
        let text = |t: &TokenizedExample| tok.decode(&t.input_ids, false).unwrap();
        assert!(text(&with).contains("Name a fruit.") && text(&with).contains("Be brief."));
        assert!(!text(&alone).contains("Name a fruit.") && text(&alone).contains("Be brief."));
        // No instruction to compare with, or no room for the answer: not scored.
        assert!(ifd_pair(&Example::Text { text: "x".into() }, &template, &tok, 256)
            .unwrap()
            .is_none());
        assert!(ifd_pair(&row, &template, &tok, 8).unwrap().is_none());

        let pairs = vec![Some((with.clone(), alone.clone())), None, Some((with, alone))];
        let mut scorer = Scripted(vec![1.0, 4.0, 3.0, 2.0]);
        let mut seen = vec![];
        let s = ifd_rows(&mut scorer, &pairs, &mut |n| seen.push(n)).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        assert_eq!(s.ifd[0], 0.25);
        assert!(s.ifd[1].is_nan());
        assert_eq!(s.ifd[2], 1.5);
        assert_eq!((s.conditioned[2], s.alone[2]), (3.0, 2.0));
    }
}
