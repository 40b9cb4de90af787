//! Choosing the next token from a logits row: repetition penalty, then greedy or temperature
//! sampling restricted by top-k, top-p (nucleus) and min-p, drawn from Finch's seeded RNG so a
//! seed reproduces an answer exactly.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// How tokens are picked. `temperature <= 0` is greedy decoding (the other filters are then
/// irrelevant). Defaults are Hugging Face's neutral values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 keeps all.
    pub min_p: f32,
    /// Hugging Face's (CTRL) penalty on tokens already in the prompt or the answer; 1 is none.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Rejects values that would make sampling meaningless (negative or NaN settings).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(Error::config(field, reason));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", format!("{} must be a number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", format!("{} must be > 0", self.repetition_penalty));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Picks token ids from logits rows; holds the RNG so successive draws continue one stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::derive(params.seed, "sampling");
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for `logits` (one row over the vocabulary), given the tokens seen so far
    /// (for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, seen, p.repetition_penalty);
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && cand.len() > p.top_k {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs[..keep].iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f32() * total;
        for (i, q) in probs[..keep].iter().enumerate() {
            if u < *q {
                return cand[i].0;
            }
            u -= q;
        }
        cand[keep - 1].0
    }
}

/// Index of the largest finite value (the lowest index on ties, as `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Hugging Face's `RepetitionPenaltyLogitsProcessor`: positive logits of seen tokens are divided
/// by the penalty, negative ones multiplied, once per distinct token.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && done.insert(id) {
            let l = logits[i];
            logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_argmax_and_penalty_can_change_it() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        })
        .unwrap();
        // 3.0 / 1.5 = 2.0 < 2.9: the repeated token loses.
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[1]), 2);
        let mut l = [2.0, -2.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, [1.0, -4.0]);
    }

    fn histogram(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params).unwrap();
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[s.sample(&mut logits.to_vec(), &[]) as usize] += 1;
        }
        h
    }

    #[test]
    fn filters_restrict_the_support_and_sampling_follows_the_distribution() {
        // probabilities ∝ e^l: [0.6439, 0.2369, 0.0871, 0.0321]
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let t1 = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..SamplingParams::default()
        };
        let h = histogram(t1.clone(), &logits, 20_000);
        let expected = [0.6439, 0.2369, 0.0871, 0.0321];
        for (c, e) in h.iter().zip(expected) {
            let f = *c as f64 / 20_000.0;
            assert!((f - e).abs() < 0.015, "frequency {f} vs probability {e}");
        }
        let h = histogram(SamplingParams { top_k: 2, ..t1.clone() }, &logits, 2000);
        assert_eq!(&h[2..], &[0, 0]);
        assert!(h[1] > 0);
        // top_p 0.8: 0.6439 + 0.2369 = 0.88 >= 0.8 keeps two tokens.
        let h = histogram(
            SamplingParams {
                top_p: 0.8,
                ..t1.clone()
            },
            &logits,
            2000,
        );
        assert_eq!(&h[2..], &[0, 0]);
        // min_p 0.1: 0.0871 >= 0.0644 stays, 0.0321 goes.
        let h = histogram(
            SamplingParams {
                min_p: 0.1,
                ..t1.clone()
            },
            &logits,
            4000,
        );
        assert_eq!(h[3], 0);
        assert!(h[2] > 0);
        // Same seed, same draws.
        assert_eq!(
            histogram(t1.clone(), &logits, 50),
            histogram(t1, &logits, 50),
            "a seed reproduces the draws"
        );
    }

    #[test]
    fn bad_settings_are_errors() {
        let e = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("top_p"), "{e}");
        assert!(Sampler::new(SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        })
        .is_err());
    }
}
