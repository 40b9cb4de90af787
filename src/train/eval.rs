//! `finch eval`: held-out loss and perplexity (teacher forcing, the trainer's loss on the same
//! tokens it trains), and generation metrics against the reference answers from greedy
//! decoding: exact match (whitespace-trimmed) and ROUGE-L F1 (Lin 2004, as Google's
//! `rouge_score` computes it: lowercased alphanumeric tokens, longest common subsequence).

use std::sync::atomic::AtomicBool;

use serde::Serialize;

use crate::data::tokenize::encode_example;
use crate::data::{Example, LossOn, Role};
use crate::error::{Error, Result};
use crate::generate::{generate, ChatFormat, GenerateOptions};
use crate::lora::ForwardCtx;
use crate::model::transformer::Transformer;
use crate::train::batch::make_batch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Metric {
    #[serde(rename = "loss")]
    Loss,
    #[serde(rename = "exact")]
    Exact,
    #[serde(rename = "rouge-l")]
    RougeL,
}

impl Metric {
    pub fn parse(s: &str) -> Result<Metric> {
        match s.trim().to_ascii_lowercase().as_str() {
            "loss" | "perplexity" => Ok(Metric::Loss),
            "exact" | "exact-match" | "exact_match" => Ok(Metric::Exact),
            "rouge-l" | "rouge_l" | "rougel" => Ok(Metric::RougeL),
            other => Err(Error::config(
                "metric",
                format!("`{other}` is not one of loss, exact, rouge-l"),
            )),
        }
    }
}

/// The summary line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvalSummary {
    pub rows: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
}

/// One row of `--details`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvalRow {
    pub row: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
}

/// Evaluates `model` on `examples`. Loss is the token-weighted mean over assistant tokens (as in
/// training); generation metrics answer each conversation up to its last assistant message
/// greedily and compare with that message. Rows without an assistant answer are errors.
pub fn evaluate(
    model: &Transformer,
    format: &ChatFormat,
    examples: &[Example],
    metrics: &[Metric],
    max_new_tokens: usize,
    cancel: &AtomicBool,
) -> Result<(EvalSummary, Vec<EvalRow>)> {
    if examples.is_empty() {
        return Err(Error::Data("the evaluation file has no rows".into()));
    }
    let context = model.cfg.max_position_embeddings;
    let mut rows: Vec<EvalRow> = (0..examples.len())
        .map(|row| EvalRow {
            row: row + 1,
            ..EvalRow::default()
        })
        .collect();
    let mut summary = EvalSummary {
        rows: examples.len(),
        ..EvalSummary::default()
    };
    if metrics.contains(&Metric::Loss) {
        let (mut sum, mut count) = (0f64, 0usize);
        for (ex, row) in examples.iter().zip(rows.iter_mut()) {
            let t = encode_example(ex, &format.template, &format.tokenizer, LossOn::Assistant, context)?;
            let n = t.trained_tokens();
            if n == 0 {
                continue;
            }
            let batch = make_batch(&[&t], 0, model.device())?;
            let loss = crate::train::batch_loss(model, &batch, &mut ForwardCtx::eval())?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            row.loss = Some(loss);
            row.target_tokens = Some(n);
            sum += loss * n as f64;
            count += n;
        }
        if count == 0 {
            return Err(Error::Data("no row has assistant tokens to compute a loss on".into()));
        }
        let loss = sum / count as f64;
        summary.loss = Some(loss);
        summary.perplexity = Some(loss.exp());
    }
    let want_exact = metrics.contains(&Metric::Exact);
    let want_rouge = metrics.contains(&Metric::RougeL);
    if want_exact || want_rouge {
        let opts = GenerateOptions {
            max_new_tokens,
            ..GenerateOptions::default()
        };
        let (mut exact, mut rouge) = (0usize, 0f64);
        for (i, (ex, row)) in examples.iter().zip(rows.iter_mut()).enumerate() {
            // A preference pair is compared with its chosen answer.
            let Some((messages, _)) = ex.conversation() else {
                return Err(Error::Data(format!(
                    "row {}: generation metrics need a conversation with an assistant answer",
                    i + 1
                )));
            };
            let Some(last) = messages.iter().rposition(|m| m.role == Role::Assistant) else {
                return Err(Error::Data(format!(
                    "row {}: no assistant message to compare with",
                    i + 1
                )));
            };
            let reference = messages[last].content.clone();
            let (prompt, _) = format.fit_prompt(&messages[..last], context, max_new_tokens)?;
            let g = generate(model, format, &prompt, &opts, cancel, &mut |_| {})?;
            if want_exact {
                let hit = g.text.trim() == reference.trim();
                exact += usize::from(hit);
                row.exact = Some(hit);
            }
            if want_rouge {
                let r = rouge_l(&g.text, &reference);
                rouge += r;
                row.rouge_l = Some(r);
            }
            row.finish_reason = Some(g.finish_reason.as_str());
            row.prediction = Some(g.text);
            row.reference = Some(reference);
        }
        let n = examples.len() as f64;
        if want_exact {
            summary.exact_match = Some(exact as f64 / n);
        }
        if want_rouge {
            summary.rouge_l = Some(rouge / n);
        }
    }
    Ok((summary, rows))
}

/// `rouge_score`'s default tokenization: lowercase, runs of ASCII letters and digits.
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// ROUGE-L F1 of `prediction` against `reference` (0 when either has no tokens).
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; r.len() + 1];
    for a in &p {
        let mut cur = vec![0usize; r.len() + 1];
        for (j, b) in r.iter().enumerate() {
            cur[j + 1] = if a == b { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    let lcs = prev[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / p.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rouge_l_matches_rouge_score() {
        // from rouge_score import rouge_scorer
        // s = rouge_scorer.RougeScorer(["rougeL"])
        // s.score("the cat sat on the mat", "The cat was on the mat!")["rougeL"].fmeasure
        //   -> 0.8333333333333334  (LCS "the cat on the mat" = 5 of 6 tokens each way)
        assert!((rouge_l("The cat was on the mat!", "the cat sat on the mat") - 0.833_333_333_333_333_4).abs() < 1e-12);
        // s.score("a b c d", "d c b a")["rougeL"].fmeasure -> 0.25
        assert!((rouge_l("d c b a", "a b c d") - 0.25).abs() < 1e-12);
        assert_eq!(rouge_l("", "x"), 0.0);
        assert_eq!(rouge_l("Paris.", "paris"), 1.0);
        assert!(Metric::parse("bleu")
            .unwrap_err()
            .to_string()
            .contains("loss, exact, rouge-l"));
    }
}
