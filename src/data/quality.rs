//! Data-quality filters from the instruction-tuning literature, as plain functions the CLI and
//! the studio can run over a dataset: exact and near-duplicate detection (MinHash over word
//! shingles of normalized text, with LSH banding so it stays fast on large files), length
//! filters, and loss-based scoring with "keep the top/bottom K%" selection (the idea behind
//! perplexity / IFD-style data selection; the model-backed scorer implements
//! [`ResponseScorer`]).
//!
//! Every function returns indices into the rows it was given and never reorders or drops rows
//! itself, so the caller can show what a filter would remove before removing it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::Serialize;

use crate::data::{Example, TokenizedExample};
use crate::error::{Error, Result};

/// Text of an example for duplicate detection: all message contents (roles included, so the
/// same words as question and as answer differ), lowercased, punctuation removed, whitespace
/// collapsed.
pub fn normalized_text(ex: &Example) -> String {
    let mut raw = String::new();
    match ex {
        Example::Text { text } => raw.push_str(text),
        Example::Chat { .. } | Example::Preference { .. } => {
            let no_messages: &[crate::data::Message] = &[];
            let (first, chosen, rejected) = match ex {
                Example::Chat { messages, .. } => (messages.as_slice(), no_messages, no_messages),
                Example::Preference {
                    prompt,
                    chosen,
                    rejected,
                    ..
                } => (prompt.as_slice(), chosen.as_slice(), rejected.as_slice()),
                Example::Text { .. } => (no_messages, no_messages, no_messages),
            };
            // The answers are marked, so swapping chosen and rejected makes another row.
            let marked = first
                .iter()
                .map(|m| ("", m))
                .chain(chosen.iter().map(|m| ("chosen ", m)))
                .chain(rejected.iter().map(|m| ("rejected ", m)));
            for (mark, m) in marked {
                raw.push_str(mark);
                raw.push_str(m.role.as_str());
                raw.push(' ');
                raw.push_str(&m.content);
                raw.push(' ');
                // Two rows that call different tools, or with other arguments, differ.
                for call in &m.tool_calls {
                    raw.push_str(&call.name);
                    raw.push(' ');
                    raw.push_str(&call.arguments);
                    raw.push(' ');
                }
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for word in raw.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// Row `index` duplicates the earlier row `of`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Duplicate {
    pub index: usize,
    pub of: usize,
    /// Estimated Jaccard similarity of their shingle sets (1.0 for exact duplicates).
    pub similarity: f32,
}

/// Rows whose normalized text equals an earlier row's (case, punctuation and spacing ignored).
pub fn exact_duplicates(rows: &[Example]) -> Vec<Duplicate> {
    let mut first: HashMap<String, usize> = HashMap::new();
    let mut out = vec![];
    for (index, ex) in rows.iter().enumerate() {
        let text = normalized_text(ex);
        match first.get(&text) {
            Some(&of) => out.push(Duplicate {
                index,
                of,
                similarity: 1.0,
            }),
            None => {
                first.insert(text, index);
            }
        }
    }
    out
}

/// MinHash / LSH settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct NearDuplicateConfig {
    /// Rows at least this similar (estimated Jaccard of word shingles) are near-duplicates.
    pub threshold: f32,
    /// Words per shingle.
    pub shingle_words: usize,
    /// MinHash signature length; `bands * rows_per_band` of it is used for LSH.
    pub num_hashes: usize,
    /// LSH bands: rows sharing one band's hashes become candidates. With 16 bands of 8, pairs at
    /// similarity 0.8 are found with probability 1 - (1 - 0.8^8)^16 > 0.99.
    pub bands: usize,
    pub seed: u64,
}

impl Default for NearDuplicateConfig {
    fn default() -> Self {
        NearDuplicateConfig {
            threshold: 0.8,
            shingle_words: 3,
            num_hashes: 128,
            bands: 16,
            seed: 0x5eed,
        }
    }
}

/// A MinHash signature: for each of `num_hashes` seeded hash functions, the minimum over the
/// text's shingles.
pub fn minhash_signature(text: &str, cfg: &NearDuplicateConfig) -> Vec<u64> {
    let words: Vec<&str> = text.split(' ').filter(|w| !w.is_empty()).collect();
    let k = cfg.shingle_words.max(1);
    let shingle_hashes: Vec<u64> = if words.len() <= k {
        vec![hash_of(&words)]
    } else {
        words.windows(k).map(hash_of).collect()
    };
    (0..cfg.num_hashes)
        .map(|i| {
            let salt = splitmix(cfg.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            shingle_hashes
                .iter()
                .map(|h| splitmix(h ^ salt))
                .min()
                .unwrap_or(u64::MAX)
        })
        .collect()
}

fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    // Deterministic across runs (DefaultHasher::new uses fixed keys); results may differ
    // between Rust releases, which only matters for comparing signatures across builds.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn estimated_similarity(a: &[u64], b: &[u64]) -> f32 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f32 / a.len().max(1) as f32
}

/// Rows that are near-duplicates of an earlier kept row (exact duplicates included). Each row
/// is compared only with LSH candidates, then confirmed by its estimated similarity.
pub fn near_duplicates(rows: &[Example], cfg: &NearDuplicateConfig) -> Result<Vec<Duplicate>> {
    if !(0.0..=1.0).contains(&cfg.threshold) || cfg.bands == 0 || cfg.num_hashes < cfg.bands {
        return Err(Error::config(
            "near_duplicates",
            "threshold must be in [0, 1] and num_hashes at least the number of bands (> 0)",
        ));
    }
    let rows_per_band = cfg.num_hashes / cfg.bands;
    let signatures: Vec<Vec<u64>> = rows
        .iter()
        .map(|ex| minhash_signature(&normalized_text(ex), cfg))
        .collect();
    let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    let mut out = vec![];
    for (index, sig) in signatures.iter().enumerate() {
        let band_keys: Vec<(usize, u64)> = (0..cfg.bands)
            .map(|b| (b, hash_of(&sig[b * rows_per_band..(b + 1) * rows_per_band])))
            .collect();
        let mut best: Option<(usize, f32)> = None;
        for key in &band_keys {
            for &candidate in buckets.get(key).into_iter().flatten() {
                let similarity = estimated_similarity(sig, &signatures[candidate]);
                if similarity >= cfg.threshold && best.is_none_or(|(_, s)| similarity > s) {
                    best = Some((candidate, similarity));
                }
            }
        }
        match best {
            Some((of, similarity)) => out.push(Duplicate { index, of, similarity }),
            // Only kept rows enter the index, so chains of near-duplicates collapse onto the
            // first row rather than drifting away from it.
            None => {
                for key in band_keys {
                    buckets.entry(key).or_default().push(index);
                }
            }
        }
    }
    Ok(out)
}

/// Indices of the rows whose `lengths` lie within `[min, max]` (each bound optional).
pub fn within_length(lengths: &[usize], min: Option<usize>, max: Option<usize>) -> Vec<usize> {
    lengths
        .iter()
        .enumerate()
        .filter(|(_, &n)| min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m))
        .map(|(i, _)| i)
        .collect()
}

/// Characters of the assistant turns (or of the text), for response-length filters.
pub fn response_chars(ex: &Example) -> usize {
    match ex {
        Example::Text { text } => text.chars().count(),
        // A preference pair's response is its chosen answer.
        Example::Chat { messages: turns, .. } | Example::Preference { chosen: turns, .. } => turns
            .iter()
            .filter(|m| m.role == crate::data::Role::Assistant)
            .map(|m| m.content.chars().count())
            .sum(),
    }
}

/// Scores rows by a model's loss on their responses. The model-backed implementation lives with
/// the trainer; [`UnigramScorer`] is a model-free baseline.
pub trait ResponseScorer {
    /// Mean loss (nats per trained token) of each row's trained tokens, one value per row.
    fn response_losses(&mut self, rows: &[TokenizedExample]) -> Result<Vec<f32>>;
}

/// Which end of the score distribution to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// Highest scores: the hardest rows (most informative, or noisy / mislabeled).
    Top,
    /// Lowest scores: the easiest, most typical rows.
    Bottom,
}

/// Indices (ascending) of the `fraction` of rows with the highest or lowest scores. Rows with a
/// non-finite score (no trained token, diverged) are never selected. Ties keep file order.
pub fn select_by_score(scores: &[f32], fraction: f32, keep: Keep) -> Result<Vec<usize>> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::config("fraction", format!("must be in [0, 1], got {fraction}")));
    }
    let mut finite: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_finite()).collect();
    finite.sort_by(|&a, &b| match keep {
        Keep::Top => scores[b].total_cmp(&scores[a]),
        Keep::Bottom => scores[a].total_cmp(&scores[b]),
    });
    let n = (finite.len() as f64 * fraction as f64).round() as usize;
    let mut chosen = finite[..n].to_vec();
    chosen.sort_unstable();
    Ok(chosen)
}

/// Which per-row score ranks rows for keeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    /// The answer's mean loss under the model.
    Loss,
    /// Instruction-following difficulty ([`ifd_scores`]).
    Ifd,
}

impl ScoreKind {
    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::Loss => "answer loss",
            ScoreKind::Ifd => "IFD",
        }
    }
}

/// [`select_by_score`] for a score of `kind`. Rows with IFD >= 1 (the instruction does not
/// help predict the answer) are never kept, whichever end is kept: as in Cherry LLM, they are
/// not instruction data worth training on. The CLI's `data score --keep` and the Data page's
/// "Keep" both choose rows with this.
pub fn select_by(kind: ScoreKind, scores: &[f32], fraction: f32, keep: Keep) -> Result<Vec<usize>> {
    match kind {
        ScoreKind::Loss => select_by_score(scores, fraction, keep),
        ScoreKind::Ifd => {
            let usable: Vec<f32> = scores.iter().map(|&v| if v < 1.0 { v } else { f32::NAN }).collect();
            select_by_score(&usable, fraction, keep)
        }
    }
}

/// Instruction-following difficulty (Li et al., "From Quantity to Quality"): the loss of the
/// response given the instruction divided by its loss alone. Near or above 1 means the
/// instruction does not help predict the answer.
pub fn ifd_scores(conditioned: &[f32], unconditioned: &[f32]) -> Result<Vec<f32>> {
    if conditioned.len() != unconditioned.len() {
        return Err(Error::Data(format!(
            "IFD needs one unconditioned loss per row: {} vs {}",
            conditioned.len(),
            unconditioned.len()
        )));
    }
    Ok(conditioned
        .iter()
        .zip(unconditioned)
        .map(|(c, u)| if *u > 0.0 { c / u } else { f32::NAN })
        .collect())
}

/// A model-free baseline scorer: the mean surprisal of each row's trained tokens under a
/// unigram model of all trained tokens in the rows it is given (add-one smoothing). Rows whose
/// answers use rare tokens (gibberish, another language, a broken encoding) score high.
#[derive(Debug, Clone, Default)]
pub struct UnigramScorer;

impl ResponseScorer for UnigramScorer {
    fn response_losses(&mut self, rows: &[TokenizedExample]) -> Result<Vec<f32>> {
        let mut counts: HashMap<u32, u64> = HashMap::new();
        let mut total = 0u64;
        for row in rows {
            for (id, _) in row.input_ids.iter().zip(&row.loss_mask).filter(|(_, m)| **m) {
                *counts.entry(*id).or_default() += 1;
                total += 1;
            }
        }
        let vocab = counts.len() as f64 + 1.0;
        Ok(rows
            .iter()
            .map(|row| {
                let (sum, n) = row.input_ids.iter().zip(&row.loss_mask).filter(|(_, m)| **m).fold(
                    (0.0f64, 0usize),
                    |(s, n), (id, _)| {
                        let c = counts.get(id).copied().unwrap_or(0) as f64;
                        (s - ((c + 1.0) / (total as f64 + vocab)).ln(), n + 1)
                    },
                );
                if n == 0 {
                    f32::NAN
                } else {
                    (sum / n as f64) as f32
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Message, Role};

    fn qa(q: &str, a: &str) -> Example {
        Example::Chat {
            messages: vec![Message::new(Role::User, q), Message::new(Role::Assistant, a)],
            tools: None,
        }
    }

    #[test]
    fn exact_duplicates_ignore_case_punctuation_and_spacing() {
        let rows = vec![
            qa("What is the capital of France?", "Paris."),
            qa("what is the capital of france", "  PARIS "),
            qa("What is the capital of Spain?", "Madrid."),
            // Same words, but as answer instead of question: not a duplicate.
            qa("Paris.", "What is the capital of France?"),
        ];
        assert_eq!(
            exact_duplicates(&rows),
            vec![Duplicate {
                index: 1,
                of: 0,
                similarity: 1.0
            }]
        );
    }

    #[test]
    fn near_duplicates_find_small_edits_and_spare_different_rows() {
        let base =
            "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn near the river";
        let rows = vec![
            qa("Describe the scene.", base),
            qa(
                "Write a haiku about autumn.",
                "Leaves fall slowly down, the cold wind whispers softly, winter is coming",
            ),
            // One word changed in a 20-word answer: Jaccard of 3-shingles is about 0.75-0.85.
            qa("Describe the scene.", &base.replace("old red", "old")),
            qa("Describe the scene!", base),
            qa(
                "Summarize the plot of Hamlet.",
                "A prince avenges his father and almost everyone dies",
            ),
        ];
        let cfg = NearDuplicateConfig {
            threshold: 0.7,
            ..NearDuplicateConfig::default()
        };
        let dups = near_duplicates(&rows, &cfg).unwrap();
        let pairs: Vec<(usize, usize)> = dups.iter().map(|d| (d.index, d.of)).collect();
        assert_eq!(pairs, vec![(2, 0), (3, 0)]);
        assert!(dups[0].similarity < 1.0 && dups[1].similarity == 1.0);
        // The MinHash estimate tracks the true Jaccard similarity.
        let a = normalized_text(&rows[0]);
        let c = normalized_text(&rows[2]);
        let shingles = |t: &str| -> std::collections::HashSet<String> {
            let w: Vec<&str> = t.split(' ').collect();
            w.windows(3).map(|x| x.join(" ")).collect()
        };
        let (sa, sc) = (shingles(&a), shingles(&c));
        let jaccard = sa.intersection(&sc).count() as f32 / sa.union(&sc).count() as f32;
        assert!(
            (dups[0].similarity - jaccard).abs() < 0.12,
            "{} vs {jaccard}",
            dups[0].similarity
        );
        assert!(near_duplicates(&rows, &NearDuplicateConfig { bands: 0, ..cfg }).is_err());
    }

    #[test]
    fn length_and_score_selection() {
        assert_eq!(within_length(&[5, 10, 15, 20], Some(10), Some(15)), vec![1, 2]);
        assert_eq!(within_length(&[5, 10], None, None), vec![0, 1]);
        assert_eq!(response_chars(&qa("question", "é!")), 2);
        let scores = [0.5, f32::NAN, 3.0, 1.0, 2.0, 3.0];
        assert_eq!(select_by_score(&scores, 0.4, Keep::Top).unwrap(), vec![2, 5]);
        assert_eq!(select_by_score(&scores, 0.4, Keep::Bottom).unwrap(), vec![0, 3]);
        assert_eq!(select_by_score(&scores, 1.0, Keep::Top).unwrap().len(), 5);
        assert!(select_by_score(&scores, 1.5, Keep::Top).is_err());
        assert_eq!(ifd_scores(&[1.0, 2.0], &[2.0, 0.0]).unwrap()[0], 0.5);
        assert!(ifd_scores(&[1.0], &[]).is_err());
        // By IFD, rows at or above 1 are never kept, from either end.
        let ifd = [0.2, 1.0, 0.9, f32::NAN, 1.4, 0.5];
        assert_eq!(select_by(ScoreKind::Ifd, &ifd, 1.0, Keep::Top).unwrap(), vec![0, 2, 5]);
        assert_eq!(select_by(ScoreKind::Ifd, &ifd, 0.34, Keep::Top).unwrap(), vec![2]);
        assert_eq!(select_by(ScoreKind::Ifd, &ifd, 0.34, Keep::Bottom).unwrap(), vec![0]);
        assert_eq!(select_by(ScoreKind::Loss, &ifd, 0.25, Keep::Top).unwrap(), vec![4]);
    }

    #[test]
    fn unigram_scorer_flags_the_odd_answer() {
        let mk = |ids: Vec<u32>| TokenizedExample {
            loss_mask: vec![true; ids.len()],
            input_ids: ids,
            truncated: false,
        };
        let rows = vec![
            mk(vec![1, 2, 3, 1, 2, 3]),
            mk(vec![1, 2, 3, 2, 1]),
            mk(vec![9, 8, 7, 6]),
            mk(vec![3, 2, 1]),
            TokenizedExample::default(),
        ];
        let scores = UnigramScorer.response_losses(&rows).unwrap();
        assert!(scores[4].is_nan());
        assert_eq!(select_by_score(&scores, 0.25, Keep::Top).unwrap(), vec![2]);
    }
}
