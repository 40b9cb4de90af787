//! The training loop. It emits events (`Started`, `Step`, `Eval`, `Probe`, `Checkpoint`,
//! `Finished`, `Failed`) to whoever listens — the CLI's progress bar or the studio's plots — and never knows
//! which. A stop request is an `AtomicBool` checked between steps.

pub mod batch;
pub mod checkpoint;
pub mod checkpointing;
pub mod config;
pub mod eval;
pub mod history;
pub mod memory;
pub mod optim;
pub mod preference;
pub mod preflight;
pub mod presets;
pub mod probe;
pub mod run;
pub mod schedule;
pub mod score;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::Serialize;

use crate::data::pack::{pack, PackedSequence};
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::generate::ChatFormat;
use crate::lora::{ForwardCtx, PeftConfig};
use crate::model::Transformer;
use crate::rng::Rng;
use batch::{make_batch, make_packed_batch, next_indices, Batch, DataCursor};
use checkpoint::TrainerState;
pub use config::{Duration, Method, Precision, Schedule, TrainConfig, MAX_PROBE_PROMPTS};
use optim::{AdamW, AdamWParams};
pub use preference::{PairData, PreferenceMetrics, TokenizedPair};
pub use preflight::{preflight, preflight_with, PreflightProgress, PreflightReport};
pub use probe::ProbeAnswer;

/// Metrics of one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
    /// Non-padding tokens the step trained on (`tokens_per_sec` counts these).
    pub tokens: usize,
    /// Positions the step computed, padding included (batch × longest row, summed over the
    /// accumulated batches): `1 - tokens / padded_tokens` is the step's padding share.
    pub padded_tokens: usize,
    pub tokens_per_sec: f64,
    pub step_secs: f64,
    pub elapsed_secs: f64,
    pub eta_secs: f64,
    /// DPO / ORPO: the step's reward margin and accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
}

impl StepMetrics {
    /// The step's padding share: 1 − non-padding tokens / positions computed.
    pub fn padding_share(&self) -> f64 {
        PaddingTally::of(self).share()
    }
}

/// Non-padding tokens and positions computed, summed over steps: the padding share of a run so
/// far or of any set of steps. The one place the share is computed; the trainer's summary,
/// `finch train`'s progress line, the Train page and `bench train` all use it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaddingTally {
    pub tokens: usize,
    pub padded_tokens: usize,
}

impl PaddingTally {
    pub fn of(m: &StepMetrics) -> Self {
        PaddingTally {
            tokens: m.tokens,
            padded_tokens: m.padded_tokens,
        }
    }

    pub fn add(&mut self, m: &StepMetrics) {
        self.tokens += m.tokens;
        self.padded_tokens += m.padded_tokens;
    }

    /// 1 − tokens / positions, in 0..=1; 0 before any step.
    pub fn share(&self) -> f64 {
        if self.padded_tokens == 0 {
            return 0.0;
        }
        (1.0 - self.tokens as f64 / self.padded_tokens as f64).clamp(0.0, 1.0)
    }
}

/// A padding share at or above this is worth packing away (the Train page then suggests the
/// Packing checkbox when the run is unpacked SFT).
pub const PACKING_HINT_SHARE: f64 = 0.15;

/// What one optimizer step computed, before it becomes [`StepMetrics`].
struct StepTotals {
    loss: f32,
    grad_norm: f32,
    tokens: usize,
    padded_tokens: usize,
}

/// What a finished (or stopped) run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub stopped: bool,
    pub loss_first: Option<f32>,
    pub loss_last: Option<f32>,
    pub eval_loss: Option<f32>,
    pub tokens_per_sec: f64,
    /// This session's padding share: 1 − non-padding tokens / positions computed.
    pub padding_fraction: f64,
    pub elapsed_secs: f64,
    pub peak_rss_mb: Option<f64>,
    pub run_dir: Option<PathBuf>,
    pub adapter_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        start_step: usize,
        train_examples: usize,
        eval_examples: usize,
        trainable_params: usize,
    },
    Step(StepMetrics),
    /// `perplexity` is the evaluation set's; for DPO / ORPO that of the chosen answers, with
    /// the held-out reward margin and accuracy in `preference`.
    Eval {
        step: usize,
        loss: f32,
        perplexity: f32,
        #[serde(skip_serializing_if = "Option::is_none")]
        preference: Option<PreferenceMetrics>,
    },
    /// The answers to the probe prompts with the weights after `step` steps (0: before training).
    Probe {
        step: usize,
        answers: Vec<ProbeAnswer>,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
    Finished(TrainSummary),
    Failed {
        step: usize,
        error: String,
    },
}

/// Tokenized training and evaluation examples.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    pub train: Vec<TokenizedExample>,
    pub eval: Vec<TokenizedExample>,
    pub pad_id: u32,
}

pub struct Trainer {
    cfg: TrainConfig,
    model: Transformer,
    data: TrainData,
    vars: Vec<Var>,
    opt: AdamW,
    state: TrainerState,
    run_dir: Option<PathBuf>,
    peft: PeftConfig,
    /// Tokenizer and chat template for the probe prompts; required when the config has some.
    chat_format: Option<ChatFormat>,
    /// DPO / ORPO: the preference pairs trained on instead of `data`.
    pairs: Option<PairData>,
    /// The reward metrics of the last preference step.
    last_preference: Option<PreferenceMetrics>,
    /// `pack`: the training examples packed into rows of up to `seq_len` tokens, which the
    /// steps draw from instead of `data.train` (evaluation stays unpacked).
    packed: Option<Vec<PackedSequence>>,
}

/// Mean loss of `batch` (a scalar tensor that backpropagates to the adapters).
///
/// A training context (one carrying the dropout stream) prepares the output head's gradient in
/// the forward pass; an evaluation context skips that work, and a backward pass still works.
pub fn batch_loss(model: &Transformer, batch: &Batch, ctx: &mut ForwardCtx) -> Result<Tensor> {
    let for_backward = ctx.dropout_rng.is_some();
    let h = model.hidden_states_packed(&batch.input_ids, batch.segments.as_ref(), ctx)?;
    head_loss(model, &h, batch, for_backward)
}

/// Mean loss of the final-normed hidden states `h: [b, t, hidden]` at `batch`'s target rows
/// (the output head fused with the cross-entropy).
pub(crate) fn head_loss(model: &Transformer, h: &Tensor, batch: &Batch, for_backward: bool) -> Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    let h = h.reshape((b * t, d))?.index_select(&batch.target_rows, 0)?;
    Ok(crate::model::loss::linear_cross_entropy(
        &h,
        model.lm_head_weight(),
        &batch.targets,
        for_backward,
    )?)
}

/// Adds a backward pass's gradients of `vars` into `sums`.
fn add_grads(sums: &mut [Option<Tensor>], vars: &[Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
    add_grad_list(sums, vars.iter().map(|v| grads.get(v.as_tensor()).cloned()))
}

/// Adds gradients given in the order of the trainable variables (`None`: no gradient) into `sums`.
fn add_grad_list(sums: &mut [Option<Tensor>], grads: impl IntoIterator<Item = Option<Tensor>>) -> Result<()> {
    for (sum, g) in sums.iter_mut().zip(grads) {
        if let Some(g) = g {
            *sum = Some(match sum.take() {
                None => g,
                Some(s) => (s + g)?,
            });
        }
    }
    Ok(())
}

fn grad_norm(grads: &[Tensor]) -> Result<f32> {
    let mut sq = 0f32;
    for g in grads {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
    }
    Ok(sq.sqrt())
}

impl Trainer {
    /// A fresh run: `model` must already carry its adapters (`Transformer::add_lora`).
    pub fn new(cfg: TrainConfig, model: Transformer, data: TrainData, run_dir: Option<PathBuf>) -> Result<Self> {
        if cfg.method.is_preference() {
            return Err(Error::config(
                "method",
                format!("{} trains on preference pairs (Trainer::with_pairs)", cfg.method.name()),
            ));
        }
        Self::build(cfg, model, data, None, run_dir)
    }

    /// A fresh DPO / ORPO run over preference pairs (`cfg.method` says which).
    pub fn with_pairs(cfg: TrainConfig, model: Transformer, pairs: PairData, run_dir: Option<PathBuf>) -> Result<Self> {
        if !cfg.method.is_preference() {
            return Err(Error::config(
                "method",
                "preference pairs train with dpo or orpo (sft trains on the chosen answers alone)",
            ));
        }
        let data = TrainData {
            pad_id: pairs.pad_id,
            ..TrainData::default()
        };
        Self::build(cfg, model, data, Some(pairs), run_dir)
    }

    fn build(
        mut cfg: TrainConfig,
        model: Transformer,
        data: TrainData,
        pairs: Option<PairData>,
        run_dir: Option<PathBuf>,
    ) -> Result<Self> {
        cfg.validate()?;
        // The targets as the model has them (Phi-3: q, k, v are its one `qkv_proj`), which is
        // what the adapter's `target_modules` and a resumed run's check need.
        cfg.lora.targets = model.resolve_targets(&cfg.lora.targets)?;
        if pairs.as_ref().map_or(data.train.len(), |p| p.train.len()) == 0 {
            return Err(Error::Data("no training examples left after tokenization".into()));
        }
        // Deterministic (first-fit decreasing), so a resumed run packs the same rows and its
        // data cursor, which counts packed rows, points where it stopped.
        let packed = match (cfg.pack, &pairs) {
            (true, None) => Some(pack(&data.train, cfg.seq_len)?),
            _ => None,
        };
        let n_train = match (&packed, &pairs) {
            (Some(rows), _) => rows.len(),
            (None, Some(p)) => p.train.len(),
            (None, None) => data.train.len(),
        };
        let vars = model.trainable_vars();
        if vars.is_empty() {
            return Err(Error::config("lora", "the model has no adapters to train"));
        }
        let opt = AdamW::new(
            vars.clone(),
            AdamWParams {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let total_steps = cfg.total_steps(n_train);
        let state = TrainerState {
            step: 0,
            total_steps,
            cursor: DataCursor::default(),
            dropout_rng: Rng::derive(cfg.seed, "dropout"),
            elapsed_secs: 0.0,
            first_loss: None,
        };
        let peft = PeftConfig::from_lora(&cfg.lora, Some(cfg.model.clone()));
        Ok(Trainer {
            cfg,
            model,
            data,
            vars,
            opt,
            state,
            run_dir,
            peft,
            chat_format: None,
            pairs,
            last_preference: None,
            packed,
        })
    }

    /// With `pack`: how many rows the training examples were packed into.
    pub fn packed_rows(&self) -> Option<usize> {
        self.packed.as_ref().map(Vec::len)
    }

    /// Gives the trainer the model's text side, which answering probe prompts needs.
    pub fn set_chat_format(&mut self, format: ChatFormat) {
        self.chat_format = Some(format);
    }

    /// Restores adapter, optimizer and trainer state from checkpoint folder `dir`. The total
    /// number of steps follows the current configuration, so a finished run can be extended.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let adapter = crate::lora::load_adapter(dir, self.model.device())?;
        if adapter.config.r != self.cfg.lora.r || adapter.config.targets != self.cfg.lora.targets {
            return Err(Error::invalid(
                dir,
                "checkpoint",
                "its LoRA rank or targets differ from this run's configuration",
            ));
        }
        self.model.set_adapter(&adapter, dir)?;
        self.vars = self.model.trainable_vars();
        self.opt = AdamW::new(
            self.vars.clone(),
            AdamWParams {
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: self.cfg.weight_decay,
            },
        )?;
        self.opt.load(&dir.join(checkpoint::OPTIMIZER_FILE))?;
        let total = self.state.total_steps;
        self.state = checkpoint::read_state(dir)?;
        self.state.total_steps = total;
        Ok(())
    }

    pub fn model(&self) -> &Transformer {
        &self.model
    }

    pub fn step(&self) -> usize {
        self.state.step
    }

    pub fn total_steps(&self) -> usize {
        self.state.total_steps
    }

    /// Training and held-out examples (pairs for DPO / ORPO).
    fn example_counts(&self) -> (usize, usize) {
        match &self.pairs {
            Some(p) => (p.train.len(), p.eval.len()),
            None => (self.data.train.len(), self.data.eval.len()),
        }
    }

    /// Tokens one evaluation runs through the model (DPO also runs the reference model).
    pub(crate) fn eval_tokens(&self) -> usize {
        match &self.pairs {
            Some(p) => {
                let passes = if self.cfg.method == Method::Dpo { 2 } else { 1 };
                passes * p.eval.iter().map(|p| p.chosen.len() + p.rejected.len()).sum::<usize>()
            }
            None => self.data.eval.iter().map(|e| e.input_ids.len()).sum(),
        }
    }

    fn trainable_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Loss averaged over every target token of the evaluation set.
    /// For DPO / ORPO, the preference loss of the held-out pairs.
    pub fn evaluate(&self) -> Result<Option<f32>> {
        if self.pairs.is_some() {
            return Ok(self.evaluate_pairs()?.map(|e| e.loss));
        }
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        let mut sum = 0f64;
        let mut count = 0usize;
        for chunk in self.data.eval.chunks(self.cfg.batch_size) {
            let refs: Vec<&TokenizedExample> = chunk.iter().collect();
            let batch = make_batch(&refs, self.data.pad_id, self.model.device())?;
            if batch.targets.is_empty() {
                continue;
            }
            let loss = checkpointing::eval_loss(&self.model, &batch)?;
            sum += loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64 * batch.targets.len() as f64;
            count += batch.targets.len();
        }
        Ok((count > 0).then(|| (sum / count as f64) as f32))
    }

    /// Evaluates, logs and emits an `Eval` event; `None` without an evaluation set.
    fn evaluate_and_report(&self, on_event: &mut dyn FnMut(&TrainEvent)) -> Result<Option<f32>> {
        let (loss, perplexity, preference) = if self.pairs.is_some() {
            let Some(e) = self.evaluate_pairs()? else {
                return Ok(None);
            };
            (e.loss, e.chosen_perplexity, Some(e.metrics))
        } else {
            let Some(loss) = self.evaluate()? else { return Ok(None) };
            (loss, loss.exp(), None)
        };
        let ev = TrainEvent::Eval {
            step: self.state.step,
            loss,
            perplexity,
            preference,
        };
        self.log(&ev);
        on_event(&ev);
        Ok(Some(loss))
    }

    /// Answers the probe prompts with the current weights, logs and emits a `Probe` event.
    /// Returns whether it did (not when there are no probes or `stop` cut a generation short).
    fn probe_and_report(&self, stop: &AtomicBool, on_event: &mut dyn FnMut(&TrainEvent)) -> Result<bool> {
        if self.cfg.probe_prompts.is_empty() {
            return Ok(false);
        }
        let Some(format) = &self.chat_format else {
            return Err(Error::config(
                "probe_prompts",
                "the trainer was given no chat format to render the probe prompts with",
            ));
        };
        let answers = probe::answer_probes(
            &self.model,
            format,
            &self.cfg.probe_prompts,
            self.cfg.probe_max_tokens,
            stop,
        )?;
        let Some(answers) = answers else { return Ok(false) };
        let ev = TrainEvent::Probe {
            step: self.state.step,
            answers,
        };
        self.log(&ev);
        on_event(&ev);
        Ok(true)
    }

    fn save_checkpoint(&self) -> Result<PathBuf> {
        let Some(run_dir) = &self.run_dir else {
            return Err(Error::config("out", "no run folder to save checkpoints into"));
        };
        checkpoint::write(run_dir, self.state.step, self.cfg.keep_checkpoints, |dir| {
            crate::lora::save_adapter(dir, &self.peft, &self.model.lora_weights())?;
            self.opt.save(&dir.join(checkpoint::OPTIMIZER_FILE))?;
            checkpoint::write_state(dir, &self.state)
        })
    }

    /// Saves the final adapter into `run_dir/adapter`.
    fn save_adapter(&self) -> Result<Option<PathBuf>> {
        let Some(run_dir) = &self.run_dir else { return Ok(None) };
        let dir = run_dir.join("adapter");
        crate::lora::save_adapter(&dir, &self.peft, &self.model.lora_weights())?;
        Ok(Some(dir))
    }

    /// One optimizer step over `grad_accum` micro-batches.
    fn train_step(&mut self, lr: f64) -> Result<StepTotals> {
        if self.pairs.is_some() {
            return self.preference_step(lr);
        }
        let accum = self.cfg.grad_accum;
        let mut sums: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0f32;
        let mut used = 0usize;
        let mut tokens = 0usize;
        let mut padded_tokens = 0usize;
        for _ in 0..accum {
            let n = self.packed.as_ref().map_or(self.data.train.len(), Vec::len);
            let idx = next_indices(&mut self.state.cursor, n, self.cfg.batch_size, self.cfg.seed);
            let batch = match &self.packed {
                Some(rows) => {
                    let refs: Vec<&PackedSequence> = idx.iter().map(|&i| &rows[i]).collect();
                    make_packed_batch(&refs, self.data.pad_id, self.model.device())?
                }
                None => {
                    let refs: Vec<&TokenizedExample> = idx.iter().map(|&i| &self.data.train[i]).collect();
                    make_batch(&refs, self.data.pad_id, self.model.device())?
                }
            };
            tokens += batch.tokens;
            padded_tokens += batch.input_ids.elem_count();
            if batch.targets.is_empty() {
                continue;
            }
            let mut ctx = ForwardCtx {
                dropout_rng: Some(&mut self.state.dropout_rng),
            };
            let pass = checkpointing::forward(&self.model, &batch, &mut ctx, self.cfg.checkpoint_activations)?;
            let value = pass.loss_value()?;
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    step: self.state.step + 1,
                    loss: value,
                    advice: advice(lr),
                });
            }
            loss_sum += value;
            used += 1;
            let grads = pass.backward(&self.model, 1.0 / accum as f64, &self.vars)?;
            add_grad_list(&mut sums, grads)?;
        }
        if used == 0 {
            return Err(Error::Data(
                "a whole step's examples have no trained tokens; check the loss mask (--loss-on)".into(),
            ));
        }
        let grad_norm = self.apply_gradients(sums, lr)?;
        Ok(StepTotals {
            loss: loss_sum / used as f32,
            grad_norm,
            tokens,
            padded_tokens,
        })
    }

    /// Clips the summed gradients to `max_grad_norm` and updates the adapters; returns the norm
    /// before clipping.
    fn apply_gradients(&mut self, sums: Vec<Option<Tensor>>, lr: f64) -> Result<f32> {
        let grads: Vec<Tensor> = sums
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| g.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let norm = grad_norm(&grads)?;
        if !norm.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: self.state.step + 1,
                loss: norm,
                advice: format!("The gradient norm is not finite. {}", advice(lr)),
            });
        }
        let grads = if self.cfg.max_grad_norm > 0.0 && norm as f64 > self.cfg.max_grad_norm {
            let k = self.cfg.max_grad_norm / (norm as f64 + 1e-6);
            grads.iter().map(|g| g * k).collect::<candle_core::Result<Vec<_>>>()?
        } else {
            grads
        };
        self.opt.update(&grads, lr)?;
        Ok(norm)
    }

    /// Runs until the configured number of steps, a stop request, or an error. Events go to
    /// `on_event`; metrics, checkpoints and the final adapter go to the run folder.
    pub fn run(&mut self, stop: &AtomicBool, on_event: &mut dyn FnMut(&TrainEvent)) -> Result<TrainSummary> {
        match self.run_inner(stop, on_event) {
            Ok(s) => {
                on_event(&TrainEvent::Finished(s.clone()));
                Ok(s)
            }
            Err(e) => {
                let ev = TrainEvent::Failed {
                    step: self.state.step,
                    error: format!("{e:#}"),
                };
                self.log(&ev);
                on_event(&ev);
                Err(e)
            }
        }
    }

    fn log(&self, ev: &TrainEvent) {
        let Some(run_dir) = &self.run_dir else { return };
        let mut line = match ev {
            TrainEvent::Step(m) => serde_json::json!({
                "kind": "train", "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                "tokens": m.tokens, "padded_tokens": m.padded_tokens, "padding_fraction": m.padding_share(),
                "tokens_per_sec": m.tokens_per_sec, "elapsed_secs": m.elapsed_secs,
            }),
            TrainEvent::Eval {
                step, loss, perplexity, ..
            } => serde_json::json!({
                "kind": "eval", "step": step, "eval_loss": loss, "perplexity": perplexity,
                "elapsed_secs": self.state.elapsed_secs,
            }),
            TrainEvent::Probe { step, answers } => serde_json::json!({
                "kind": "probe", "step": step, "probe": answers,
            }),
            TrainEvent::Failed { step, error } => serde_json::json!({"kind": "failed", "step": step, "error": error}),
            _ => return,
        };
        let preference = match ev {
            TrainEvent::Step(m) => m.preference,
            TrainEvent::Eval { preference, .. } => *preference,
            _ => None,
        };
        if let (Some(p), serde_json::Value::Object(o)) = (preference, &mut line) {
            o.insert("reward_margin".into(), p.reward_margin.into());
            o.insert("reward_accuracy".into(), p.accuracy.into());
            o.insert("reward_chosen".into(), p.chosen_reward.into());
            o.insert("reward_rejected".into(), p.rejected_reward.into());
        }
        let path = run_dir.join(METRICS_FILE);
        // Metrics are best effort: a full disk must not kill a run that can still checkpoint.
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = writeln!(f, "{line}");
        }
    }

    fn run_inner(&mut self, stop: &AtomicBool, on_event: &mut dyn FnMut(&TrainEvent)) -> Result<TrainSummary> {
        let total = self.state.total_steps;
        let start_step = self.state.step;
        let (train_examples, eval_examples) = self.example_counts();
        on_event(&TrainEvent::Started {
            total_steps: total,
            start_step,
            train_examples,
            eval_examples,
            trainable_params: self.trainable_params(),
        });
        let session_start = Instant::now();
        let elapsed_before = self.state.elapsed_secs;
        let mut session = PaddingTally::default();
        let mut last_loss = None;
        let mut eval_loss = None;
        let mut last_eval_step = None;
        let mut last_probe_step = None;
        if start_step == 0 && self.probe_and_report(stop, on_event)? {
            last_probe_step = Some(0);
        }
        let mut stopped = false;
        while self.state.step < total {
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break;
            }
            let step_start = Instant::now();
            let lr = schedule::lr_at(
                self.cfg.schedule,
                self.cfg.lr,
                self.cfg.warmup_steps,
                self.state.step,
                total,
            );
            let StepTotals {
                loss,
                grad_norm,
                tokens,
                padded_tokens,
            } = self.train_step(lr)?;
            self.state.step += 1;
            self.state.first_loss.get_or_insert(loss);
            last_loss = Some(loss);
            let step_secs = step_start.elapsed().as_secs_f64();
            let session_secs = session_start.elapsed().as_secs_f64();
            self.state.elapsed_secs = elapsed_before + session_secs;
            let done = self.state.step - start_step;
            let metrics = StepMetrics {
                step: self.state.step,
                total_steps: total,
                loss,
                lr,
                grad_norm,
                tokens,
                padded_tokens,
                tokens_per_sec: tokens as f64 / step_secs.max(1e-9),
                step_secs,
                elapsed_secs: self.state.elapsed_secs,
                eta_secs: session_secs / done as f64 * (total - self.state.step) as f64,
                preference: self.last_preference.take(),
            };
            session.add(&metrics);
            let ev = TrainEvent::Step(metrics);
            self.log(&ev);
            on_event(&ev);
            if self.cfg.eval_every > 0 && self.state.step % self.cfg.eval_every == 0 {
                if let Some(l) = self.evaluate_and_report(on_event)? {
                    eval_loss = Some(l);
                    last_eval_step = Some(self.state.step);
                }
                if self.probe_and_report(stop, on_event)? {
                    last_probe_step = Some(self.state.step);
                }
            }
            if self.run_dir.is_some()
                && self.cfg.save_every > 0
                && self.state.step % self.cfg.save_every == 0
                && self.state.step < total
            {
                let path = self.save_checkpoint()?;
                on_event(&TrainEvent::Checkpoint {
                    step: self.state.step,
                    path,
                });
            }
        }
        if !stopped && last_eval_step != Some(self.state.step) {
            if let Some(l) = self.evaluate_and_report(on_event)? {
                eval_loss = Some(l);
            }
        }
        if !stopped && last_probe_step != Some(self.state.step) {
            self.probe_and_report(stop, on_event)?;
        }
        if self.run_dir.is_some() {
            let path = self.save_checkpoint()?;
            on_event(&TrainEvent::Checkpoint {
                step: self.state.step,
                path,
            });
        }
        let adapter_dir = self.save_adapter()?;
        let session_secs = session_start.elapsed().as_secs_f64();
        Ok(TrainSummary {
            steps: self.state.step,
            total_steps: total,
            stopped,
            loss_first: self.state.first_loss,
            loss_last: last_loss,
            eval_loss,
            tokens_per_sec: session.tokens as f64 / session_secs.max(1e-9),
            padding_fraction: session.share(),
            elapsed_secs: self.state.elapsed_secs,
            peak_rss_mb: crate::system::peak_rss_mb(),
            run_dir: self.run_dir.clone(),
            adapter_dir,
        })
    }
}

pub const METRICS_FILE: &str = "metrics.jsonl";

fn advice(lr: f64) -> String {
    format!(
        "The run was stopped; the last checkpoint is intact. Try a lower learning rate (now {lr:e}), \
         a smaller LoRA alpha, or check the data for empty or garbage rows."
    )
}

/// Drops metric lines after `step` (used when resuming from a checkpoint at `step`), so the
/// log describes one continuous run.
pub fn truncate_metrics(run_dir: &Path, step: usize) -> Result<()> {
    let path = run_dir.join(METRICS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::fsutil::write_atomic(&path, out.as_bytes())
}
