//! Dataset inspection: the summary `finch data inspect` prints and the studio shows (counts,
//! rejections, token-length statistics under a model's tokenizer) and the loss view of one row
//! (which parts of the rendered text carry loss).

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::data::load::{LoadReport, Rejection};
use crate::data::quality::{near_duplicates, NearDuplicateConfig};
use crate::data::tokenize::{answer_spans, assistant_spans_with_tools, chunk_ranges, encode_example};
use crate::data::{Example, LossOn};
use crate::error::Result;
use crate::template::ChatTemplate;

/// How many rejections a summary lists (the full list stays in the [`LoadReport`]).
pub const MAX_LISTED_REJECTIONS: usize = 20;

/// Token-length distribution of the rows (before truncation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LengthStats {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
}

impl LengthStats {
    /// Nearest-rank percentiles; `None` for no values.
    pub fn from_lengths(lengths: &[usize]) -> Option<Self> {
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let rank = |p: f64| {
            let n = sorted.len();
            let idx = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            sorted[idx]
        };
        Some(LengthStats {
            min: *sorted.first()?,
            median: rank(0.5),
            p95: rank(0.95),
            max: *sorted.last()?,
        })
    }
}

/// The summary of a loaded dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    pub file: Option<String>,
    pub file_type: &'static str,
    pub format: &'static str,
    pub rows_ok: usize,
    pub rows_rejected: usize,
    /// The first [`MAX_LISTED_REJECTIONS`] rejections.
    pub rejected: Vec<Rejection>,
    pub duplicates: usize,
    /// Rows that are near-duplicates (MinHash similarity >= 0.8 after normalizing case,
    /// punctuation and spacing) of an earlier row; exact duplicates were already rejected.
    pub near_duplicates: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenSummary>,
    pub warnings: Vec<String>,
}

/// What tokenizing every row with a model's tokenizer and template showed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenSummary {
    pub seq_len: usize,
    pub loss_on: LossOn,
    pub end_of_turn: Option<String>,
    pub token_lengths: Option<LengthStats>,
    /// Conversations longer than `seq_len` (they would be truncated).
    pub over_seq_len: usize,
    /// Windows of `seq_len` tokens (sharing `text_overlap` tokens) the raw-text rows are cut
    /// into for training; 0 without raw text.
    pub text_windows: usize,
    pub text_overlap: usize,
    /// Tokens that carry loss over all rows, after truncation.
    pub trained_tokens: usize,
    /// Rows whose truncation leaves no token that carries loss (they would teach nothing).
    pub rows_without_trained_tokens: usize,
    /// Rows the template or tokenizer could not encode (first 20), by line.
    pub encode_errors: Vec<Rejection>,
}

/// Summarizes `report`; with a tokenizer and template, also tokenizes every row (raw text as
/// the windows of `seq_len` tokens with `text_overlap` shared tokens that training uses).
pub fn inspect(
    report: &LoadReport,
    model: Option<(&Tokenizer, &ChatTemplate)>,
    loss_on: LossOn,
    seq_len: usize,
    text_overlap: usize,
) -> Result<Inspection> {
    let mut warnings = vec![];
    let tokens = match model {
        None => None,
        Some((tokenizer, template)) => {
            let end_of_turn = template.end_of_turn();
            match &end_of_turn {
                None => warnings.push(
                    "the chat template writes no end-of-turn marker after an assistant turn: \
                     a model tuned on it will not learn to stop"
                        .to_string(),
                ),
                Some(marker) if tokenizer.token_to_id(marker).is_none() => warnings.push(format!(
                    "the end-of-turn marker `{marker}` is not a single token of this tokenizer"
                )),
                Some(_) => {}
            }
            let mut lengths = Vec::with_capacity(report.rows.len());
            let mut summary = TokenSummary {
                seq_len,
                loss_on,
                end_of_turn,
                token_lengths: None,
                over_seq_len: 0,
                text_windows: 0,
                text_overlap,
                trained_tokens: 0,
                rows_without_trained_tokens: 0,
                encode_errors: vec![],
            };
            let mut errors = 0usize;
            for row in &report.rows {
                // Encoded untruncated for the true length; truncation is applied by hand below.
                match encode_example(&row.example, template, tokenizer, loss_on, usize::MAX) {
                    Ok(full) if matches!(row.example, Example::Text { .. }) => {
                        lengths.push(full.len());
                        let windows = chunk_ranges(full.len(), seq_len, text_overlap)?;
                        summary.text_windows += windows.len();
                        // Every token of a window but its first (which has no context) is trained.
                        summary.trained_tokens += windows.iter().map(|w| w.len().saturating_sub(1)).sum::<usize>();
                    }
                    Ok(full) => {
                        lengths.push(full.len());
                        if full.len() > seq_len {
                            summary.over_seq_len += 1;
                        }
                        let trained = full.loss_mask.iter().take(seq_len).skip(1).filter(|m| **m).count();
                        summary.trained_tokens += trained;
                        if trained == 0 {
                            summary.rows_without_trained_tokens += 1;
                        }
                    }
                    Err(err) => {
                        errors += 1;
                        if summary.encode_errors.len() < MAX_LISTED_REJECTIONS {
                            summary.encode_errors.push(Rejection {
                                line: row.line,
                                field: String::new(),
                                reason: match err {
                                    // The row's line already says it is about data.
                                    crate::error::Error::Data(reason) => reason,
                                    other => other.to_string(),
                                },
                            });
                        }
                    }
                }
            }
            if errors > 0 {
                warnings.push(format!("{errors} rows could not be encoded with this template"));
            }
            if summary.over_seq_len > 0 {
                warnings.push(format!(
                    "{} rows are longer than seq_len = {seq_len} tokens and would be truncated",
                    summary.over_seq_len
                ));
            }
            if summary.text_windows > 0 {
                warnings.push(format!(
                    "raw text is cut into {} windows of up to {seq_len} tokens ({text_overlap} tokens of overlap), \
                     loss on every token",
                    summary.text_windows
                ));
            }
            summary.token_lengths = LengthStats::from_lengths(&lengths);
            Some(summary)
        }
    };
    let examples: Vec<Example> = report.examples().cloned().collect();
    Ok(Inspection {
        file: report.path.as_ref().map(|p| p.display().to_string()),
        file_type: report.file_kind.name(),
        format: report.format.name(),
        rows_ok: report.rows.len(),
        rows_rejected: report.rejected.len(),
        rejected: report.rejected.iter().take(MAX_LISTED_REJECTIONS).cloned().collect(),
        duplicates: report.duplicates,
        near_duplicates: near_duplicates(&examples, &NearDuplicateConfig::default())?.len(),
        tokens,
        warnings,
    })
}

/// A stretch of rendered text and whether it carries loss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

/// One example as the model sees it, cut into trained and masked segments. With a tokenizer the
/// segments are runs of tokens (exactly what training uses, after truncation to `seq_len`);
/// without one they are the character spans the mask is built from.
pub fn loss_segments(
    ex: &Example,
    template: &ChatTemplate,
    tokenizer: Option<&Tokenizer>,
    loss_on: LossOn,
    seq_len: usize,
) -> Result<Vec<Segment>> {
    let mut segments: Vec<Segment> = vec![];
    let mut push = |text: &str, trained: bool| match segments.last_mut() {
        Some(last) if last.trained == trained => last.text.push_str(text),
        _ if text.is_empty() => {}
        _ => segments.push(Segment {
            text: text.to_string(),
            trained,
        }),
    };
    match tokenizer {
        Some(tokenizer) => {
            let encoded = encode_example(ex, template, tokenizer, loss_on, seq_len)?;
            let mut run: Vec<u32> = vec![];
            let mut run_trained = false;
            for (i, (&id, &trained)) in encoded.input_ids.iter().zip(&encoded.loss_mask).enumerate() {
                if i > 0 && trained != run_trained {
                    push(&decode(tokenizer, &run)?, run_trained);
                    run.clear();
                }
                run.push(id);
                run_trained = trained;
            }
            push(&decode(tokenizer, &run)?, run_trained);
        }
        None => {
            let spans = match ex {
                Example::Text { text } => {
                    push(text, true);
                    return Ok(segments);
                }
                Example::Chat { messages, tools } => {
                    assistant_spans_with_tools(messages, tools.as_deref(), template, loss_on)?
                }
                // A preference pair shows its prompt and chosen answer.
                Example::Preference {
                    prompt, chosen, tools, ..
                } => answer_spans(prompt, chosen, tools.as_deref(), template, loss_on == LossOn::All)?,
            };
            let mut at = 0;
            for span in &spans.spans {
                push(&spans.rendered[at..span.start], loss_on == LossOn::All);
                push(&spans.rendered[span.clone()], true);
                at = span.end;
            }
            push(&spans.rendered[at..], loss_on == LossOn::All);
        }
    }
    Ok(segments)
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, false)
        .map_err(|e| crate::error::Error::Tokenizer(e.to_string()))
}

/// Marks masked text with `⟦…⟧` (brackets that do not occur in ordinary data, so the marking is
/// unambiguous), or with ANSI colour when `ansi` is set (trained text green, masked text dim).
pub fn mark_segments(segments: &[Segment], ansi: bool) -> String {
    let mut out = String::new();
    for s in segments {
        match (s.trained, ansi) {
            (true, false) => out.push_str(&s.text),
            (false, false) => {
                out.push('⟦');
                out.push_str(&s.text);
                out.push('⟧');
            }
            (true, true) => {
                out.push_str("\x1b[32m");
                out.push_str(&s.text);
                out.push_str("\x1b[0m");
            }
            (false, true) => {
                out.push_str("\x1b[2m");
                out.push_str(&s.text);
                out.push_str("\x1b[0m");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load::{load_bytes, FileKind, LoadOptions};
    use crate::model::config::Family;
    use crate::model::tiny::TinySpec;

    #[test]
    fn length_stats_are_nearest_rank() {
        let v: Vec<usize> = (1..=100).collect();
        assert_eq!(
            LengthStats::from_lengths(&v),
            Some(LengthStats {
                min: 1,
                median: 50,
                p95: 95,
                max: 100
            })
        );
        assert_eq!(LengthStats::from_lengths(&[7]).map(|s| (s.median, s.p95)), Some((7, 7)));
        assert_eq!(LengthStats::from_lengths(&[]), None);
    }

    #[test]
    fn inspection_counts_tokens_and_marks_masks() {
        let dir = tempfile::tempdir().unwrap();
        TinySpec::new(Family::Llama).write(dir.path()).unwrap();
        let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let template = ChatTemplate::from_tokenizer_config(dir.path()).unwrap().unwrap();
        let data = br#"{"instruction": "hi", "output": "yo"}
{"instruction": "a much longer question here", "output": "and a longer answer too"}
{"instruction": "hi", "output": "yo"}
{"instruction": "", "output": "x"}"#;
        let report = load_bytes(data, FileKind::Jsonl, &LoadOptions::default()).unwrap();
        let ins = inspect(&report, Some((&tok, &template)), LossOn::Assistant, 40, 0).unwrap();
        assert_eq!((ins.rows_ok, ins.rows_rejected, ins.duplicates), (2, 2, 1));
        let tokens = ins.tokens.as_ref().unwrap();
        // The tiny tokenizer has one token per byte plus the specials: "<|im_start|>user\nhi<|im_end|>\n
        // <|im_start|>assistant\nyo<|im_end|>" is 4 specials + 20 bytes.
        assert_eq!(tokens.token_lengths.unwrap().min, 24);
        assert_eq!(tokens.over_seq_len, 1);
        assert!(ins.warnings.iter().any(|w| w.contains("truncated")));
        let json = serde_json::to_value(&ins).unwrap();
        assert_eq!(json["format"], "alpaca");
        assert_eq!(json["rejected"][0]["line"], 3);

        let segments = loss_segments(&report.rows[0].example, &template, Some(&tok), LossOn::Assistant, 4096).unwrap();
        assert_eq!(
            mark_segments(&segments, false),
            "⟦<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n⟧yo<|im_end|>"
        );
        // Without a tokenizer the character spans give the same picture.
        let chars = loss_segments(&report.rows[0].example, &template, None, LossOn::Assistant, 4096).unwrap();
        assert_eq!(chars, segments);
    }
}
