//! Per-row loss scoring with a model (the data-selection idea behind perplexity / IFD filters):
//! the mean loss of each row's trained tokens under the base model (or base + adapter), and
//! IFD beside it. [`DataScorer::score`] is the one implementation `finch data score` and the
//! Data page's Score rows both run.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::data::meta::RowScores;
use crate::data::quality::ResponseScorer;
use crate::data::{Example, LossOn, TokenizedExample};
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
/// Also returns both losses. `on_row` is called after each row (progress); `None` when
/// `cancel` was set (checked between rows).
pub fn ifd_rows(
    scorer: &mut dyn ResponseScorer,
    pairs: &[Option<(TokenizedExample, TokenizedExample)>],
    cancel: &AtomicBool,
    on_row: &mut dyn FnMut(usize),
) -> Result<Option<IfdScores>> {
    let mut out = IfdScores::default();
    for (i, pair) in pairs.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
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
    Ok(Some(out))
}

/// Per-row IFD and the two losses it divides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IfdScores {
    pub conditioned: Vec<f32>,
    pub alone: Vec<f32>,
    pub ifd: Vec<f32>,
}

/// A model opened to score rows: its f32 weights on the CPU, tokenizer and chat template.
pub struct DataScorer {
    model: Transformer,
    template: crate::template::ChatTemplate,
    tokenizer: tokenizers::Tokenizer,
    pad_id: u32,
    /// What the scores record as the model.
    pub label: String,
    /// Why the template is not the model's own, when it is not.
    pub template_note: Option<String>,
}

/// How far a scoring run is: `done` of `total` rows of the current pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreProgress {
    /// The answer loss of each row.
    Loss { done: usize, total: usize },
    /// The two forward passes per row that IFD divides.
    Ifd { done: usize, total: usize },
}

/// Scores of every row, in row order; NaN where a row has nothing to score.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreTable {
    pub loss: Vec<f32>,
    pub ifd: Option<IfdScores>,
    /// Rows the template or tokenizer could not encode (0-based index, reason); their scores
    /// are NaN and no selection keeps them.
    pub unscored: Vec<(usize, String)>,
    pub model: String,
    pub seq_len: usize,
}

impl ScoreTable {
    /// Row `i`'s scores as the dataset keeps them (NaN becomes "none").
    pub fn row(&self, i: usize) -> RowScores {
        let finite = |v: Option<f32>| v.filter(|v| v.is_finite());
        RowScores {
            answer_loss: finite(self.loss.get(i).copied()),
            ifd: finite(self.ifd.as_ref().and_then(|s| s.ifd.get(i).copied())),
            model: self.model.clone(),
            seq_len: self.seq_len,
        }
    }
}

impl DataScorer {
    /// Opens `spec` (folder, GGUF or Hub id) with f32 weights on the CPU.
    pub fn open(spec: &str) -> Result<Self> {
        let files = crate::hub::open_model(spec)?;
        let choice = crate::model::template_choice::choose_template(Some(&files), None);
        let model = files.load(candle_core::DType::F32, &candle_core::Device::Cpu)?;
        Ok(DataScorer {
            model,
            template: choice.template,
            pad_id: files.config.eos_token_ids.first().copied().unwrap_or(0),
            tokenizer: files.tokenizer,
            label: spec.to_string(),
            template_note: choice.note,
        })
    }

    /// The answer loss of every row and, with `with_ifd`, its IFD ([`ifd_pair`], [`ifd_rows`]).
    /// Rows are cut to `seq_len` tokens. Stops between rows once `cancel` is set (`Ok(None)`).
    pub fn score(
        &self,
        rows: &[Example],
        seq_len: usize,
        with_ifd: bool,
        cancel: &AtomicBool,
        on_progress: &mut dyn FnMut(ScoreProgress),
    ) -> Result<Option<ScoreTable>> {
        use crate::data::tokenize::encode_example;
        let total = rows.len();
        let mut scorer = ModelScorer {
            model: &self.model,
            pad_id: self.pad_id,
        };
        let mut unscored = vec![];
        let mut loss = Vec::with_capacity(total);
        for (i, row) in rows.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            match encode_example(row, &self.template, &self.tokenizer, LossOn::Assistant, seq_len) {
                Ok(t) => loss.extend(scorer.response_losses(&[t])?),
                Err(e) => {
                    unscored.push((i, e.to_string()));
                    loss.push(f32::NAN);
                }
            }
            on_progress(ScoreProgress::Loss { done: i + 1, total });
        }
        let ifd = if with_ifd {
            let mut pairs = Vec::with_capacity(total);
            for (i, row) in rows.iter().enumerate() {
                match ifd_pair(row, &self.template, &self.tokenizer, seq_len) {
                    Ok(pair) => pairs.push(pair),
                    Err(e) => {
                        if !unscored.iter().any(|(j, _)| *j == i) {
                            unscored.push((i, e.to_string()));
                        }
                        pairs.push(None);
                    }
                }
            }
            let scores = ifd_rows(&mut scorer, &pairs, cancel, &mut |done| {
                on_progress(ScoreProgress::Ifd { done, total })
            })?;
            match scores {
                Some(scores) => Some(scores),
                None => return Ok(None),
            }
        } else {
            None
        };
        Ok(Some(ScoreTable {
            loss,
            ifd,
            unscored,
            model: self.label.clone(),
            seq_len,
        }))
    }
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
        let s = ifd_rows(&mut scorer, &pairs, &AtomicBool::new(false), &mut |n| seen.push(n))
            .unwrap()
            .unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        assert_eq!(s.ifd[0], 0.25);
        assert!(s.ifd[1].is_nan());
        assert_eq!(s.ifd[2], 1.5);
        assert_eq!((s.conditioned[2], s.alone[2]), (3.0, 2.0));
    }

    #[test]
    fn data_scorer_reports_progress_stops_on_cancel_and_leaves_raw_text_unscored() {
        let dir = tempfile::tempdir().unwrap();
        crate::model::tiny::TinySpec::new(crate::model::Family::Llama)
            .write(dir.path())
            .unwrap();
        let scorer = DataScorer::open(&dir.path().display().to_string()).unwrap();
        let rows = vec![
            Example::chat(vec![
                Message::new(Role::User, "Add 1 and 2."),
                Message::new(Role::Assistant, "3"),
            ]),
            Example::Text {
                text: "plain text".into(),
            },
        ];
        let mut seen = vec![];
        let table = scorer
            .score(&rows, 64, true, &AtomicBool::new(false), &mut |p| seen.push(p))
            .unwrap()
            .unwrap();
        assert_eq!(
            seen,
            vec![
                ScoreProgress::Loss { done: 1, total: 2 },
                ScoreProgress::Loss { done: 2, total: 2 },
                ScoreProgress::Ifd { done: 1, total: 2 },
                ScoreProgress::Ifd { done: 2, total: 2 },
            ]
        );
        assert!(table.loss[0].is_finite() && table.loss[0] > 0.0);
        let ifd = table.ifd.as_ref().unwrap();
        assert!(ifd.ifd[0].is_finite());
        assert!(ifd.ifd[1].is_nan(), "raw text has no instruction");
        let row = table.row(1);
        assert_eq!(row.ifd, None);
        assert_eq!(row.seq_len, 64);
        // The loss alone, and a run stopped before it starts.
        let loss_only = scorer
            .score(&rows, 64, false, &AtomicBool::new(false), &mut |_| {})
            .unwrap()
            .unwrap();
        assert!(loss_only.ifd.is_none());
        assert_eq!(loss_only.loss[0], table.loss[0]);
        assert!(scorer
            .score(&rows, 64, true, &AtomicBool::new(true), &mut |_| {})
            .unwrap()
            .is_none());
    }
}
