//! One training step, the same for `m3 train`, `m3 bench train` and `m3 bench memory`:
//! forward and backward of a packed batch (sub-batched on request), the global gradient
//! norm, a refusal of non-finite values before any weight changes, clipping and AdamW.

use super::forward::{step_grads, StepBatch, StepDropout};
use super::loss::{LossConfig, LossValues};
use super::model::TrainModel;
use super::optimizer::Optimizer;
use crate::backend::Backend;

/// What a step needs besides the model and the optimiser.
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    /// The batch.
    pub batch: &'a StepBatch,
    /// The loss's settings for this batch.
    pub loss: &'a LossConfig,
    /// Dropout probability and this step's seed.
    pub dropout: StepDropout,
    /// Encode at most this many sequences at a time (two-pass recompute).
    pub sub_batch: Option<usize>,
    /// 1-based optimiser step (AdamW's bias correction).
    pub t: u64,
    /// Learning rate of this step.
    pub lr: f32,
}

/// What a step did.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The loss and its parts.
    pub loss: LossValues,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Tokens encoded (queries and passages).
    pub tokens: usize,
}

/// A loss or gradient norm that is NaN or infinite: the step was refused, no weight changed.
#[derive(Debug, thiserror::Error)]
#[error("the loss is {loss} and the gradient norm {grad_norm}")]
pub struct NonFinite {
    /// The loss.
    pub loss: f32,
    /// The gradient norm.
    pub grad_norm: f64,
}

/// Runs one optimiser step on `model`.
pub fn train_step<B: Backend>(
    be: &B,
    model: &mut TrainModel<B>,
    opt: &mut Optimizer<B>,
    s: &StepInput,
) -> anyhow::Result<StepOutcome> {
    let mut grads = opt.zero_grads(be)?;
    let loss = step_grads(
        be,
        model,
        opt.layout(),
        s.batch,
        s.loss,
        s.dropout,
        s.sub_batch,
        &mut grads,
    )?;
    let grad_norm = grads.norm(be)?;
    if !loss.loss.is_finite() || !grad_norm.is_finite() {
        return Err(NonFinite {
            loss: loss.loss,
            grad_norm,
        }
        .into());
    }
    let clip = opt.clip(grad_norm);
    opt.update(be, model, &grads, s.t, s.lr, clip)?;
    Ok(StepOutcome {
        loss,
        grad_norm,
        tokens: s.batch.q.tokens() + s.batch.p.tokens(),
    })
}
