//! One training step, the same for `m3 train`, `m3 bench train` and `m3 bench memory`:
//! forward and backward of a packed batch (sub-batched on request), the global gradient
//! norm, a refusal of non-finite values before any weight changes, clipping and AdamW.

use super::forward::{step_grads, RankLoss, StepBatch, StepDropout};
use super::loss::{LossConfig, LossValues};
use super::model::TrainModel;
use super::optimizer::Optimizer;
use crate::backend::Backend;
use crate::collective::Collective;
use crate::tensor::HostData;

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
    /// Tokens encoded (queries and passages), all ranks together.
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

/// Runs one optimiser step on `model`. With several ranks (`rank.comm`), the gradients are
/// summed over ranks and averaged (folded into AdamW's gradient scale), the norm and the
/// reported loss are those of the average, and every rank takes the same update.
pub fn train_step<B: Backend>(
    be: &B,
    model: &mut TrainModel<B>,
    opt: &mut Optimizer<B>,
    s: &StepInput,
    rank: &RankLoss<'_, B>,
) -> anyhow::Result<StepOutcome> {
    let (layout, grads) = opt.zero_grads(be)?;
    let mut loss = step_grads(
        be,
        model,
        layout,
        s.batch,
        s.loss,
        s.dropout,
        s.sub_batch,
        rank,
        grads,
    )?;
    let comm = rank.comm;
    let world = comm.world();
    if world > 1 {
        comm.all_reduce_sum(be, grads.flat_mut())?;
        let mine: Vec<u8> = grads.present.iter().map(|&p| p as u8).collect();
        for other in comm.all_gather_bytes(&mine)? {
            for (p, o) in grads.present.iter_mut().zip(other) {
                *p |= o != 0;
            }
        }
        loss = mean_over_ranks(be, comm, &loss, rank.weight)?;
    }
    let grad_norm = grads.norm(be)? / world as f64;
    if !loss.loss.is_finite() || !grad_norm.is_finite() {
        return Err(NonFinite {
            loss: loss.loss,
            grad_norm,
        }
        .into());
    }
    let scale = opt.clip(grad_norm) / world as f32;
    opt.update(be, model, s.t, s.lr, scale)?;
    let mut tokens = [(s.batch.q.tokens() + s.batch.p.tokens()) as f32];
    if world > 1 {
        let mut t = be.upload(HostData::F32(&tokens), &[1])?;
        comm.all_reduce_sum(be, &mut t)?;
        tokens[0] = be.to_vec_f32(&t)?[0];
    }
    Ok(StepOutcome {
        loss,
        grad_norm,
        tokens: tokens[0] as usize,
    })
}

/// The loss parts averaged over ranks, each rank's weighted by its share of the batch.
fn mean_over_ranks<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    l: &LossValues,
    weight: f32,
) -> anyhow::Result<LossValues> {
    let u = l.unified.unwrap_or_default();
    let v = [l.loss, l.dense, u[0], u[1], u[2], l.distill.unwrap_or(0.0)].map(|x| x * weight);
    let mut t = be.upload(HostData::F32(&v), &[v.len()])?;
    comm.all_reduce_sum(be, &mut t)?;
    let m: Vec<f32> = be
        .to_vec_f32(&t)?
        .into_iter()
        .map(|x| x / comm.world() as f32)
        .collect();
    Ok(LossValues {
        loss: m[0],
        dense: m[1],
        unified: l.unified.map(|_| [m[2], m[3], m[4]]),
        distill: l.distill.map(|_| m[5]),
    })
}
