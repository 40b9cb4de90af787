//! Preference training: DPO and ORPO over pairs of sequences, `prompt + chosen` and
//! `prompt + rejected`, both in one padded batch (the chosen rows first, then the rejected ones,
//! as TRL concatenates them).
//!
//! The formulas are TRL's (1.16): a sequence's log-probability is the sum (DPO) or the mean
//! (ORPO) of the log-probabilities of its answer tokens, the tokens the loss mask marks (the
//! same mask supervised training uses).
//! - DPO, `sigmoid` loss with cDPO label smoothing ε (TRL's `robust`-free form; ε = 0 is
//!   TRL's `sigmoid`): `z = β·((c − c_ref) − (r − r_ref))`,
//!   `loss = mean(−(1−ε)·log σ(z) − ε·log σ(−z))`. The reference log-probs come from the same
//!   weights with the adapter switched off ([`Transformer::without_adapters`], PEFT's
//!   `disable_adapter()`), computed once per batch with no graph. Rewards are `β·(c − c_ref)`
//!   and `β·(r − r_ref)`.
//! - ORPO (TRL's `ORPOTrainer`): `loss = NLL − λ·mean(log σ(log_odds))`, with
//!   `log_odds = (c − r) − (log(1 − e^c) − log(1 − e^r))` over the mean log-probs and the NLL
//!   the token-mean cross-entropy over every token of the chosen sequences (TRL computes it
//!   "over the full prompt and response"). Rewards are `λ·c` and `λ·r`.
//!
//! The loss is a function of a few per-sequence numbers, so it and its derivative with
//! respect to each sequence's log-prob are computed here in f64, and the backward pass runs
//! through one weighted sum of the per-token losses (`Σ w_k·nll_k` with `w_k = ∂loss/∂nll_k`),
//! whose gradient with respect to the adapters is exactly the loss's. That keeps the fused
//! output-head loss (no `[tokens, vocab]` logits) for preference training too.

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::batch::{make_batch, next_indices, Batch};
use super::config::{Method, TrainConfig};
use super::Trainer;
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::lora::ForwardCtx;
use crate::model::Transformer;

/// The two tokenized sequences of a preference pair.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedPair {
    pub chosen: TokenizedExample,
    pub rejected: TokenizedExample,
}

/// Tokenized training and evaluation pairs.
#[derive(Debug, Clone, Default)]
pub struct PairData {
    pub train: Vec<TokenizedPair>,
    pub eval: Vec<TokenizedPair>,
    pub pad_id: u32,
}

/// The preference objective and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    pub method: Method,
    pub beta: f64,
    pub label_smoothing: f64,
    pub orpo_lambda: f64,
}

impl Objective {
    pub fn from_config(cfg: &TrainConfig) -> Self {
        Objective {
            method: cfg.method,
            beta: cfg.beta,
            label_smoothing: cfg.label_smoothing,
            orpo_lambda: cfg.orpo_lambda,
        }
    }
}

/// Reward statistics of a set of pairs, as TRL logs them (`rewards/margins`,
/// `rewards/accuracies`, `rewards/chosen`, `rewards/rejected`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PreferenceMetrics {
    /// Mean of `chosen reward − rejected reward`.
    pub reward_margin: f32,
    /// Share of pairs whose chosen reward is above the rejected one.
    pub accuracy: f32,
    pub chosen_reward: f32,
    pub rejected_reward: f32,
}

/// The loss of a batch of pairs as a function of its per-sequence log-probs, with the loss's
/// derivative with respect to each of them and the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log σ(x)` without overflow for large |x| (PyTorch's `F.logsigmoid`).
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// `log(1 − e^x)` for x < 0, split at −ln 2 as TRL's `log1mexp` does.
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// DPO's sigmoid loss with label smoothing `eps` over summed answer log-probs of the policy
/// (`chosen`, `rejected`) and the reference model; the mean over the pairs.
pub fn dpo_loss(
    chosen: &[f64],
    rejected: &[f64],
    ref_chosen: &[f64],
    ref_rejected: &[f64],
    beta: f64,
    eps: f64,
) -> PairLoss {
    let n = chosen.len() as f64;
    let mut out = PairLoss {
        loss: 0.0,
        d_chosen: vec![],
        d_rejected: vec![],
        chosen_rewards: vec![],
        rejected_rewards: vec![],
    };
    for i in 0..chosen.len() {
        let (dc, dr) = (chosen[i] - ref_chosen[i], rejected[i] - ref_rejected[i]);
        let z = beta * (dc - dr);
        out.loss += (-(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)) / n;
        let dz = (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)) / n;
        out.d_chosen.push(dz * beta);
        out.d_rejected.push(-dz * beta);
        out.chosen_rewards.push(beta * dc);
        out.rejected_rewards.push(beta * dr);
    }
    out
}

/// ORPO's odds-ratio term `−λ·mean(log σ(log_odds))` over mean answer log-probs (the NLL term
/// is added by the caller).
pub fn orpo_odds_ratio_loss(chosen: &[f64], rejected: &[f64], lambda: f64) -> PairLoss {
    let n = chosen.len() as f64;
    let mut out = PairLoss {
        loss: 0.0,
        d_chosen: vec![],
        d_rejected: vec![],
        chosen_rewards: vec![],
        rejected_rewards: vec![],
    };
    for i in 0..chosen.len() {
        let (c, r) = (chosen[i], rejected[i]);
        let log_odds = (c - r) - (log1mexp(c) - log1mexp(r));
        out.loss -= lambda * log_sigmoid(log_odds) / n;
        // d log σ(x)/dx = σ(−x); d log_odds/dc = 1/(1 − e^c), d log_odds/dr = −1/(1 − e^r).
        let g = -lambda * sigmoid(-log_odds) / n;
        out.d_chosen.push(g / -c.exp_m1());
        out.d_rejected.push(-g / -r.exp_m1());
        out.chosen_rewards.push(lambda * c);
        out.rejected_rewards.push(lambda * r);
    }
    out
}

/// A padded batch of pairs and, for every target token, which sequence it belongs to and
/// whether it is an answer token.
pub struct PairBatch {
    pub batch: Batch,
    /// Per target: its row (chosen rows `0..pairs`, rejected rows `pairs..2·pairs`).
    pub row: Vec<usize>,
    /// Per target: part of the answer (counts in the sequence log-prob).
    pub answer: Vec<bool>,
    /// Per row: its number of answer tokens.
    pub answer_len: Vec<usize>,
    pub pairs: usize,
}

/// Pads the chosen sequences of `pairs` and then their rejected ones into one batch
/// ([`make_batch`]). For ORPO every token of a chosen sequence is a target (its NLL term);
/// otherwise only the answer tokens are.
pub fn pair_batch(
    pairs: &[&TokenizedPair],
    method: Method,
    pad_id: u32,
    device: &candle_core::Device,
) -> Result<PairBatch> {
    let rows: Vec<&TokenizedExample> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let targets_of: Vec<TokenizedExample> = rows
        .iter()
        .enumerate()
        .map(|(i, e)| TokenizedExample {
            input_ids: e.input_ids.clone(),
            loss_mask: if method == Method::Orpo && i < pairs.len() {
                vec![true; e.len()]
            } else {
                e.loss_mask.clone()
            },
            truncated: e.truncated,
        })
        .collect();
    let refs: Vec<&TokenizedExample> = targets_of.iter().collect();
    let batch = make_batch(&refs, pad_id, device)?;
    let mut row = Vec::with_capacity(batch.targets.len());
    let mut answer = Vec::with_capacity(batch.targets.len());
    let mut answer_len = vec![0; rows.len()];
    // The order `make_batch` lists targets in: by row, then by position.
    for (i, (original, used)) in rows.iter().zip(&targets_of).enumerate() {
        for p in 0..used.len().saturating_sub(1) {
            if used.loss_mask[p + 1] {
                row.push(i);
                let in_answer = original.loss_mask[p + 1];
                answer.push(in_answer);
                answer_len[i] += usize::from(in_answer);
            }
        }
    }
    if let Some(i) = answer_len.iter().position(|&n| n == 0) {
        let side = if i < pairs.len() { "chosen" } else { "rejected" };
        return Err(Error::Data(format!(
            "a {side} answer has no trained token (cut off by seq_len?); such pairs are skipped when the data \
             is prepared"
        )));
    }
    Ok(PairBatch {
        batch,
        row,
        answer,
        answer_len,
        pairs: pairs.len(),
    })
}

/// The cross-entropy of every target token of `batch`, `[n]`.
fn token_nll(model: &Transformer, batch: &Batch, ctx: &mut ForwardCtx) -> Result<Tensor> {
    let for_backward = ctx.dropout_rng.is_some();
    let h = model.hidden_states(&batch.input_ids, ctx)?;
    let (b, t, d) = h.dims3()?;
    let h = h.reshape((b * t, d))?.index_select(&batch.target_rows, 0)?;
    Ok(crate::model::loss::linear_token_nll(
        &h,
        model.lm_head_weight(),
        &batch.targets,
        for_backward,
    )?)
}

fn to_f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Summed answer log-probs per row.
fn answer_logps(nll: &[f32], pb: &PairBatch) -> Vec<f64> {
    let mut sums = vec![0f64; 2 * pb.pairs];
    for ((&v, &row), &answer) in nll.iter().zip(&pb.row).zip(&pb.answer) {
        if answer {
            sums[row] -= v as f64;
        }
    }
    sums
}

/// What one batch of pairs gives.
pub struct PairOutcome {
    /// The loss value.
    pub loss: f64,
    /// A scalar whose gradient with respect to the adapters is the loss's.
    pub surrogate: Tensor,
    /// The per-sequence log-probs the loss was computed from: summed (DPO) or mean (ORPO)
    /// answer log-probs of the chosen and the rejected rows, and the reference's (DPO).
    pub chosen_logps: Vec<f64>,
    pub rejected_logps: Vec<f64>,
    pub ref_logps: Option<(Vec<f64>, Vec<f64>)>,
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
    /// Summed NLL of the chosen answers' tokens and their count (for a perplexity).
    pub chosen_answer_nll: f64,
    pub chosen_answer_tokens: usize,
}

/// The loss of a batch of pairs under `objective`; `ctx` is the policy's forward context (a
/// training one carries the dropout stream).
pub fn pair_outcome(
    model: &Transformer,
    pb: &PairBatch,
    objective: &Objective,
    ctx: &mut ForwardCtx,
) -> Result<PairOutcome> {
    let b = pb.pairs;
    // The reference first, so its activations are gone before the policy's graph is built.
    let reference = match objective.method {
        Method::Dpo => {
            let base = model.without_adapters();
            let nll = token_nll(&base, &pb.batch, &mut ForwardCtx::eval())?.detach();
            let sums = answer_logps(&to_f32s(&nll)?, pb);
            Some((sums[..b].to_vec(), sums[b..].to_vec()))
        }
        Method::Orpo => None,
        Method::Sft => {
            return Err(Error::config(
                "method",
                "preference pairs train with dpo or orpo (sft trains on the chosen answers alone)",
            ))
        }
    };
    let nll_t = token_nll(model, &pb.batch, ctx)?;
    let nll = to_f32s(&nll_t)?;
    let sums = answer_logps(&nll, pb);
    let mut weights = vec![0f64; nll.len()];
    let (loss, d_seq, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) = match &reference {
        Some((ref_c, ref_r)) => {
            let pl = dpo_loss(
                &sums[..b],
                &sums[b..],
                ref_c,
                ref_r,
                objective.beta,
                objective.label_smoothing,
            );
            // logp_row = −Σ nll_k, so ∂loss/∂nll_k = −∂loss/∂logp_row.
            let d_seq: Vec<f64> = pl.d_chosen.iter().chain(&pl.d_rejected).copied().collect();
            (
                pl.loss,
                d_seq,
                pl.chosen_rewards,
                pl.rejected_rewards,
                sums[..b].to_vec(),
                sums[b..].to_vec(),
            )
        }
        None => {
            let means: Vec<f64> = sums.iter().zip(&pb.answer_len).map(|(s, &n)| s / n as f64).collect();
            let pl = orpo_odds_ratio_loss(&means[..b], &means[b..], objective.orpo_lambda);
            // The NLL over every token of the chosen rows, averaged over those tokens.
            let chosen_targets = pb.row.iter().filter(|&&r| r < b).count();
            let mut nll_sum = 0f64;
            for (k, (&v, &row)) in nll.iter().zip(&pb.row).enumerate() {
                if row < b {
                    nll_sum += v as f64;
                    weights[k] += 1.0 / chosen_targets as f64;
                }
            }
            // mean = sum / len, so ∂loss/∂sum = ∂loss/∂mean / len.
            let d_seq: Vec<f64> = pl
                .d_chosen
                .iter()
                .chain(&pl.d_rejected)
                .zip(&pb.answer_len)
                .map(|(d, &n)| d / n as f64)
                .collect();
            (
                nll_sum / chosen_targets as f64 + pl.loss,
                d_seq,
                pl.chosen_rewards,
                pl.rejected_rewards,
                means[..b].to_vec(),
                means[b..].to_vec(),
            )
        }
    };
    let mut chosen_answer_nll = 0f64;
    let mut chosen_answer_tokens = 0usize;
    for (k, (&row, &answer)) in pb.row.iter().zip(&pb.answer).enumerate() {
        if answer {
            weights[k] -= d_seq[row];
            if row < b {
                chosen_answer_nll += nll[k] as f64;
                chosen_answer_tokens += 1;
            }
        }
    }
    let w = Tensor::from_vec(
        weights.iter().map(|&w| w as f32).collect::<Vec<f32>>(),
        weights.len(),
        nll_t.device(),
    )?
    .to_dtype(nll_t.dtype())?;
    let surrogate = (nll_t * w)?.sum_all()?;
    Ok(PairOutcome {
        loss,
        surrogate,
        chosen_logps,
        rejected_logps,
        ref_logps: reference,
        chosen_rewards,
        rejected_rewards,
        chosen_answer_nll,
        chosen_answer_tokens,
    })
}

/// Running sums of rewards over pairs.
#[derive(Debug, Default)]
struct RewardSums {
    pairs: usize,
    margin: f64,
    correct: usize,
    chosen: f64,
    rejected: f64,
}

impl RewardSums {
    fn add(&mut self, out: &PairOutcome) {
        for (c, r) in out.chosen_rewards.iter().zip(&out.rejected_rewards) {
            self.pairs += 1;
            self.margin += c - r;
            self.correct += usize::from(c > r);
            self.chosen += c;
            self.rejected += r;
        }
    }

    fn metrics(&self) -> PreferenceMetrics {
        let n = self.pairs.max(1) as f64;
        PreferenceMetrics {
            reward_margin: (self.margin / n) as f32,
            accuracy: (self.correct as f64 / n) as f32,
            chosen_reward: (self.chosen / n) as f32,
            rejected_reward: (self.rejected / n) as f32,
        }
    }
}

/// A preference evaluation: the loss (mean over batches, weighted by their pairs), the
/// perplexity of the chosen answers, and the rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairEval {
    pub loss: f32,
    pub chosen_perplexity: f32,
    pub metrics: PreferenceMetrics,
}

impl Trainer {
    /// One optimizer step of DPO / ORPO over `grad_accum` batches of `batch_size` pairs.
    /// Returns the step's totals like the supervised step, and leaves the step's reward metrics
    /// in `last_preference`.
    pub(super) fn preference_step(&mut self, lr: f64) -> Result<super::StepTotals> {
        let Some(pairs) = &self.pairs else {
            return Err(Error::config("method", "no preference pairs to train on"));
        };
        let objective = Objective::from_config(&self.cfg);
        let accum = self.cfg.grad_accum;
        let mut sums: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        let mut padded_tokens = 0usize;
        let mut rewards = RewardSums::default();
        for _ in 0..accum {
            let idx = next_indices(
                &mut self.state.cursor,
                pairs.train.len(),
                self.cfg.batch_size,
                self.cfg.seed,
            );
            let refs: Vec<&TokenizedPair> = idx.iter().map(|&i| &pairs.train[i]).collect();
            let pb = pair_batch(&refs, objective.method, pairs.pad_id, self.model.device())?;
            tokens += pb.batch.tokens;
            padded_tokens += pb.batch.input_ids.elem_count();
            let mut ctx = ForwardCtx {
                dropout_rng: Some(&mut self.state.dropout_rng),
            };
            let out = pair_outcome(&self.model, &pb, &objective, &mut ctx)?;
            if !out.loss.is_finite() {
                return Err(Error::NonFiniteLoss {
                    step: self.state.step + 1,
                    loss: out.loss as f32,
                    advice: super::advice(lr),
                });
            }
            loss_sum += out.loss;
            rewards.add(&out);
            let grads = (&out.surrogate / accum as f64)?.backward()?;
            super::add_grads(&mut sums, &self.vars, &grads)?;
        }
        self.last_preference = Some(rewards.metrics());
        let grad_norm = self.apply_gradients(sums, lr)?;
        Ok(super::StepTotals {
            loss: (loss_sum / accum as f64) as f32,
            grad_norm,
            tokens,
            padded_tokens,
        })
    }

    /// The held-out pairs' loss, chosen-answer perplexity and rewards; `None` without any.
    pub fn evaluate_pairs(&self) -> Result<Option<PairEval>> {
        let Some(pairs) = self.pairs.as_ref().filter(|p| !p.eval.is_empty()) else {
            return Ok(None);
        };
        let objective = Objective::from_config(&self.cfg);
        let mut loss = 0f64;
        let mut nll = 0f64;
        let mut nll_tokens = 0usize;
        let mut rewards = RewardSums::default();
        for chunk in pairs.eval.chunks(self.cfg.batch_size) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            let pb = pair_batch(&refs, objective.method, pairs.pad_id, self.model.device())?;
            let out = pair_outcome(&self.model, &pb, &objective, &mut ForwardCtx::eval())?;
            loss += out.loss * chunk.len() as f64;
            nll += out.chosen_answer_nll;
            nll_tokens += out.chosen_answer_tokens;
            rewards.add(&out);
        }
        Ok(Some(PairEval {
            loss: (loss / pairs.eval.len() as f64) as f32,
            chosen_perplexity: (nll / nll_tokens.max(1) as f64).exp() as f32,
            metrics: rewards.metrics(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 formulas against finite differences of themselves.
    #[test]
    fn loss_derivatives_match_finite_differences() {
        let c = [-12.0, -30.5, -4.25];
        let r = [-14.0, -29.0, -9.0];
        let rc = [-13.0, -31.0, -5.0];
        let rr = [-13.5, -28.0, -8.0];
        let f = |c: &[f64], r: &[f64]| dpo_loss(c, r, &rc, &rr, 0.3, 0.1).loss;
        let pl = dpo_loss(&c, &r, &rc, &rr, 0.3, 0.1);
        let h = 1e-6;
        for i in 0..3 {
            let mut cp = c;
            cp[i] += h;
            let mut cm = c;
            cm[i] -= h;
            let fd = (f(&cp, &r) - f(&cm, &r)) / (2.0 * h);
            assert!((fd - pl.d_chosen[i]).abs() < 1e-8, "{fd} vs {}", pl.d_chosen[i]);
            let mut rp = r;
            rp[i] += h;
            let mut rm = r;
            rm[i] -= h;
            let fd = (f(&c, &rp) - f(&c, &rm)) / (2.0 * h);
            assert!((fd - pl.d_rejected[i]).abs() < 1e-8);
        }
        // Mean log-probs near 0 exercise the other branch of log1mexp.
        let mc = [-0.2, -1.5, -0.05];
        let mr = [-0.9, -0.6, -3.0];
        let g = |c: &[f64], r: &[f64]| orpo_odds_ratio_loss(c, r, 0.5).loss;
        let pl = orpo_odds_ratio_loss(&mc, &mr, 0.5);
        for i in 0..3 {
            let mut cp = mc;
            cp[i] += h;
            let mut cm = mc;
            cm[i] -= h;
            let fd = (g(&cp, &mr) - g(&cm, &mr)) / (2.0 * h);
            assert!((fd - pl.d_chosen[i]).abs() < 1e-6, "{fd} vs {}", pl.d_chosen[i]);
            let mut rp = mr;
            rp[i] += h;
            let mut rm = mr;
            rm[i] -= h;
            let fd = (g(&mc, &rp) - g(&mc, &rm)) / (2.0 * h);
            assert!((fd - pl.d_rejected[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn log_helpers_are_stable() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
        // log(1 − e^x) on both sides of −ln 2.
        for x in [-5.0, -0.7, -0.69, -1e-3] {
            let direct = (1.0 - f64::exp(x)).ln();
            assert!((log1mexp(x) - direct).abs() < 1e-9, "{x}");
        }
    }
}
