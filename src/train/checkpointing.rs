//! Activation (gradient) checkpointing: a training step that keeps only each decoder block's
//! input instead of every activation of every block, and recomputes one block at a time during
//! the backward pass. Memory for activations drops from `layers × (a block's saved tensors)` to
//! `layers × [b, t, hidden] + one block's saved tensors`, for one extra forward pass of the blocks.
//!
//! candle's autograd is graph based (a tensor holds the ops that made it), so the step is built
//! from graphs that are cut on purpose:
//! - forward: block `l` runs on a detached input `x_l` (saved) and its output is detached, so the
//!   block's graph and activations are freed when the next block starts; the dropout stream's
//!   state before each block is saved too;
//! - head: the final norm and the loss run on a leaf copy of the last block's output, and its
//!   backward gives `∂loss/∂x_L`;
//! - backward, blocks `L-1..0`: block `l` is rerun from `x_l` (a leaf that tracks its gradient)
//!   with the dropout stream rewound to the same state, so it draws the same masks, and
//!   `sum(out_l ⊙ ∂loss/∂out_l)` is backpropagated: its gradient with respect to `out_l` is
//!   exactly `∂loss/∂out_l`, so the adapters of block `l` and `x_l` receive the gradients the
//!   whole-graph backward gives them. The embedding is frozen, so block 0's input needs none.
//!
//! Each adapter belongs to one block, so its gradient comes whole from that block's backward.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::lora::ForwardCtx;
use crate::model::transformer::RopeTables;
use crate::model::Transformer;
use crate::rng::Rng;
use crate::train::batch::Batch;

/// The forward half of one micro-batch's training step, ready for its backward half.
pub enum TrainingPass {
    /// The whole graph, from the loss back to the adapters (no checkpointing).
    Whole(Tensor),
    /// Block inputs and dropout states; the head's graph from the loss to the last block's output.
    Checkpointed(Checkpointed),
}

pub struct Checkpointed {
    /// Each block's input `x_l` (detached).
    inputs: Vec<Tensor>,
    /// The dropout stream's state before each block (`None`: no dropout stream, evaluation-like).
    rng_states: Vec<Option<Rng>>,
    tables: RopeTables,
    /// Leaf copy of the last block's output, where the head's backward stops.
    head_input: Var,
    loss: Tensor,
}

/// Runs the forward pass of `batch` for training: the whole graph, or with `checkpoint` only
/// the block inputs. `ctx` carries the dropout stream, advanced as a plain forward would.
pub fn forward(model: &Transformer, batch: &Batch, ctx: &mut ForwardCtx, checkpoint: bool) -> Result<TrainingPass> {
    if !checkpoint {
        return Ok(TrainingPass::Whole(super::batch_loss(model, batch, ctx)?));
    }
    let (x0, tables) = model.embed_for_training(&batch.input_ids, batch.segments.as_ref())?;
    let layers = model.num_layers();
    let mut inputs = Vec::with_capacity(layers);
    let mut rng_states = Vec::with_capacity(layers);
    let mut x = x0.detach();
    for l in 0..layers {
        rng_states.push(ctx.dropout_rng.as_deref().copied());
        let out = model.block_forward(l, &x, &tables, ctx)?.detach();
        inputs.push(std::mem::replace(&mut x, out));
    }
    let head_input = Var::from_tensor(&x)?;
    drop(x);
    let h = model.final_norm(head_input.as_tensor())?;
    let loss = super::head_loss(model, &h, batch, ctx.dropout_rng.is_some())?;
    Ok(TrainingPass::Checkpointed(Checkpointed {
        inputs,
        rng_states,
        tables,
        head_input,
        loss,
    }))
}

impl TrainingPass {
    /// The mean loss of the micro-batch.
    pub fn loss_value(&self) -> Result<f32> {
        let loss = match self {
            TrainingPass::Whole(l) => l,
            TrainingPass::Checkpointed(c) => &c.loss,
        };
        Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    }

    /// Gradients of `scale × loss` for `vars`, in their order (`None`: the loss does not depend
    /// on that variable).
    pub fn backward(self, model: &Transformer, scale: f64, vars: &[Var]) -> Result<Vec<Option<Tensor>>> {
        match self {
            TrainingPass::Whole(loss) => {
                let grads = (loss * scale)?.backward()?;
                Ok(vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect())
            }
            TrainingPass::Checkpointed(c) => c.backward(model, scale, vars),
        }
    }
}

impl Checkpointed {
    fn backward(self, model: &Transformer, scale: f64, vars: &[Var]) -> Result<Vec<Option<Tensor>>> {
        let Checkpointed {
            mut inputs,
            mut rng_states,
            tables,
            head_input,
            loss,
        } = self;
        let head_grads = (loss * scale)?.backward()?;
        let mut grad_out = head_grads
            .get(head_input.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Data("the loss does not depend on the last block's output".into()))?;
        drop(head_grads);
        drop(head_input);
        let mut out: Vec<Option<Tensor>> = vec![None; vars.len()];
        for l in (0..inputs.len()).rev() {
            let (Some(x), Some(rng)) = (inputs.pop(), rng_states.pop()) else {
                break;
            };
            // Block 0's input comes from the frozen embedding: no gradient to compute for it.
            let leaf = if l > 0 { Some(Var::from_tensor(&x)?) } else { None };
            let x = leaf.as_ref().map_or(x, |v| v.as_tensor().clone());
            let mut rng = rng;
            let mut ctx = ForwardCtx {
                dropout_rng: rng.as_mut(),
            };
            let y = model.block_forward(l, &x, &tables, &mut ctx)?;
            let grads = (y * &grad_out)?.sum_all()?.backward()?;
            for (slot, v) in out.iter_mut().zip(vars) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        None => g.clone(),
                        Some(s) => (s + g)?,
                    });
                }
            }
            if let Some(leaf) = leaf {
                grad_out = grads
                    .get(leaf.as_tensor())
                    .cloned()
                    .ok_or_else(|| Error::Data(format!("block {l} passed no gradient to its input")))?;
            }
        }
        Ok(out)
    }
}

/// Mean loss of `batch` for evaluation, keeping no graph between blocks: each block's
/// activations are freed before the next block runs, so evaluating needs no more memory than a
/// checkpointed training step.
pub fn eval_loss(model: &Transformer, batch: &Batch) -> Result<Tensor> {
    let ctx = &mut ForwardCtx::eval();
    let (mut x, tables) = model.embed_for_training(&batch.input_ids, batch.segments.as_ref())?;
    for l in 0..model.num_layers() {
        x = model.block_forward(l, &x, &tables, ctx)?.detach();
    }
    let h = model.final_norm(&x)?;
    super::head_loss(model, &h, batch, false)
}
