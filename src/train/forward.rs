//! The training forward and backward of one batch: encoder, the three heads as training
//! uses them (SPEC §3, §5), the unified loss, and the gradient of every weight, either in
//! one pass or by the two-pass sub-batch recompute of DESIGN "The tape" (GradCache style).

use crate::autograd::{LeafGrad, Tape, Var};
use crate::backend::Backend;
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::model::config::Config;
use crate::model::encoder::{forward_taped, Dropout, EncoderVars};
use crate::model::heads::NORM_EPS;
use crate::tensor::{DType, HostData, Tensor};

use super::arena::{GradArena, ParamLayout};
use super::loss::{m3_loss, CrossDevice, LossConfig, LossParts, LossValues, Side};
pub use super::model::HeadVars;
use super::model::{TrainModel, TrainVars};
use crate::collective::{Collective, Solo};

/// Encodes one packed batch and records its three heads: normalised CLS vectors, token
/// weights `relu(sparse_linear(h))` `[T]`, and normalised colbert vectors of every token
/// but the first of each sequence.
pub fn heads<B: Backend>(
    t: &mut Tape<'_, B>,
    enc: &EncoderVars,
    heads: &HeadVars,
    c: &Config,
    batch: &PackedBatch,
    drop: &Dropout,
) -> Result<Side> {
    let h = forward_taped(t, enc, c, batch, drop)?;
    let n = batch.tokens();
    let cls: Vec<u32> = batch.cu_seqlens[..batch.len()].to_vec();
    let cls = t.backend().upload(HostData::U32(&cls), &[batch.len()])?;
    // With bf16 compute the heads' outputs are cast to f32 here, so the scores, the
    // temperature scaling and the softmaxes of the loss run in f32 (a bf16 dense score over
    // τ = 0.02 would carry an error of ~0.2 in the logit).
    let pooled = t.embedding(h, cls)?;
    let pooled = t.cast(pooled, DType::F32)?;
    let dense = t.l2_normalize(pooled, NORM_EPS)?;
    let w = t.matmul(h, false, heads.sparse.wt, false, Some(heads.sparse.b))?;
    let w = t.relu(w)?;
    let w = t.cast(w, DType::F32)?;
    let sparse = t.reshape(w, &[n])?;
    let rows: Vec<u32> = (0..batch.len())
        .flat_map(|i| batch.range(i).skip(1).map(|r| r as u32))
        .collect();
    let all = t.matmul(h, false, heads.colbert.wt, false, Some(heads.colbert.b))?;
    let rows_t = t.backend().upload(HostData::U32(&rows), &[rows.len()])?;
    let picked = t.embedding(all, rows_t)?;
    let picked = t.cast(picked, DType::F32)?;
    let colbert = t.l2_normalize(picked, NORM_EPS)?;
    Ok(Side {
        dense,
        sparse,
        ids: batch.ids.clone(),
        cu: batch.cu_seqlens.clone(),
        colbert,
        colbert_cu: colbert_offsets(batch),
    })
}

/// Offsets of each sequence's colbert rows (every token but the CLS).
fn colbert_offsets(batch: &PackedBatch) -> Vec<u32> {
    let mut cu = vec![0u32];
    for i in 0..batch.len() {
        cu.push(cu[i] + batch.range(i).len().saturating_sub(1) as u32);
    }
    cu
}

/// The unified loss of one batch: queries `q` (B sequences) and passages `p` (B·G, each
/// query's group contiguous, positive first), with dropout `dq` / `dp` on each side.
#[allow(clippy::too_many_arguments)]
pub fn batch_loss<B: Backend>(
    t: &mut Tape<'_, B>,
    enc: &EncoderVars,
    head_vars: &HeadVars,
    c: &Config,
    q: &PackedBatch,
    p: &PackedBatch,
    cfg: &LossConfig,
    drop: [&Dropout; 2],
) -> Result<(Var, LossParts)> {
    let qs = heads(t, enc, head_vars, c, q, drop[0])?;
    let ps = heads(t, enc, head_vars, c, p, drop[1])?;
    let parts = m3_loss(t, &qs, &ps, cfg, None)?;
    Ok((parts.loss, parts))
}

/// One training batch, tokenized and packed: queries and their groups of passages.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// B queries.
    pub q: PackedBatch,
    /// B·G passages, each query's group contiguous, positive first.
    pub p: PackedBatch,
}

/// Dropout of one step: probability and the step's seed (each side derives its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDropout {
    /// Drop probability.
    pub p: f32,
    /// Seed of this step.
    pub seed: u64,
}

impl StepDropout {
    /// Dropout of side `side` (0 queries, 1 passages) for the rows from token `offset` on.
    fn side(&self, side: u64, offset: usize) -> Dropout {
        Dropout {
            p: self.p,
            seed: self.seed ^ side.wrapping_mul(0xA24B_AED4_963E_E407),
            token_offset: offset as u64,
        }
    }
}

/// How this rank's loss joins the other ranks' (SPEC §5, cross-device negatives).
pub struct RankLoss<'c, B: Backend> {
    /// The ranks.
    pub comm: &'c dyn Collective<B>,
    /// Gather every rank's passages for the dense term (`--negatives-cross-device`).
    pub cross_device: bool,
    /// This rank's share of the global mean: `world · B_rank / B_global` (1 on one rank),
    /// so the gradients averaged over ranks are those of the global batch's loss.
    pub weight: f32,
}

impl<B: Backend> RankLoss<'_, B> {
    /// One rank: the loss as it is.
    pub fn solo() -> Self {
        RankLoss {
            comm: &Solo,
            cross_device: false,
            weight: 1.0,
        }
    }
}

/// The loss of one batch, with the gradient of every weight (times `rank.weight`) added
/// into `grads` (slots of `layout`, the model's order; a weight the loss does not reach
/// stays absent). With `sub_batch = Some(n)` the encoder sees at most `n` sequences at a
/// time: pass one encodes every sub-batch and keeps only the heads' outputs, the loss is
/// taken on those, and pass two re-encodes each sub-batch on a fresh tape seeded with the
/// loss gradient of its outputs. Dropout masks are keyed by token position in the whole
/// batch, so both passes and the unsplit batch draw the same mask. With cross-device
/// negatives the loss is taken the same way on the outputs (the gathered passages are a
/// leaf whose gradient is reduce-scattered back to the ranks); without sub-batches the
/// encoder tapes of pass one are kept for pass two instead of re-encoding. Each weight's
/// gradient goes into the arena as soon as the backward walk completes it.
#[allow(clippy::too_many_arguments)]
pub fn step_grads<B: Backend>(
    be: &B,
    model: &TrainModel<B>,
    layout: &ParamLayout,
    batch: &StepBatch,
    cfg: &LossConfig,
    dropout: StepDropout,
    sub_batch: Option<usize>,
    rank: &RankLoss<'_, B>,
    grads: &mut GradArena<B>,
) -> Result<LossValues> {
    let c = &model.config;
    let sides = [&batch.q, &batch.p];
    // Backpropagates `roots` of a tape holding `vars`, adding each weight's gradient into
    // its slot of the arena.
    let sink_into = |t: &Tape<'_, B>,
                     vars: &TrainVars,
                     roots: Vec<(Var, Tensor<B>)>,
                     grads: &mut GradArena<B>|
     -> Result<()> {
        let mut slot = vec![usize::MAX; t.len()];
        for (k, v) in vars.all().into_iter().enumerate() {
            slot[v.index()] = k;
        }
        t.backward_seeds_into(roots, &mut |v, g| match (slot.get(v.index()), g) {
            (Some(&k), LeafGrad::Dense(g)) if k != usize::MAX => grads.add(be, layout, k, &g),
            (Some(&k), LeafGrad::Rows { dy, ids, .. }) if k != usize::MAX => {
                grads.add_rows(be, layout, k, dy, ids)
            }
            _ => Ok(()),
        })
    };
    let gather = rank.cross_device && rank.comm.world() > 1 && cfg.in_batch_neg;
    let split = sub_batch.filter(|&n| sides.iter().any(|b| b.len() > n));
    if split.is_none() && !gather {
        let mut t = Tape::new(be);
        let vars = model.record(&mut t);
        let (dq, dp) = (dropout.side(0, 0), dropout.side(1, 0));
        let (loss, parts) = batch_loss(
            &mut t,
            &vars.encoder,
            &vars.heads,
            c,
            &batch.q,
            &batch.p,
            cfg,
            [&dq, &dp],
        )?;
        let seed = be.fill(t.value(loss).shape(), rank.weight, t.value(loss).dtype())?;
        sink_into(&t, &vars, vec![(loss, seed)], grads)?;
        return parts.values(&t);
    }
    let n = split.map_or(usize::MAX, |n| n.max(1));
    let chunks = |b: &PackedBatch| -> Vec<std::ops::Range<usize>> {
        (0..b.len())
            .step_by(n.min(b.len().max(1)))
            .map(|s| s..s.saturating_add(n).min(b.len()))
            .collect()
    };
    // Pass one: heads' outputs of every sub-batch; without sub-batches the tapes are kept.
    let mut outs: Vec<SideValues> = Vec::new();
    let mut kept: Vec<Vec<KeptTape<'_, B>>> = Vec::new();
    for (k, b) in sides.iter().enumerate() {
        let mut all = SideValues::default();
        let mut tapes = Vec::new();
        for r in chunks(b) {
            let sb = b.slice(r.clone());
            let d = dropout.side(k as u64, b.cu_seqlens[r.start] as usize);
            let mut t = Tape::new(be);
            let vars = model.record(&mut t);
            let s = heads(&mut t, &vars.encoder, &vars.heads, c, &sb, &d)?;
            all.extend(be, &t, &s)?;
            if split.is_none() {
                tapes.push((t, vars, s));
            }
        }
        outs.push(all);
        kept.push(tapes);
    }
    // The loss on the gathered outputs, and its gradient with respect to them.
    let (values, mut seeds) = {
        let mut t = Tape::new(be);
        let q = outs[0].record(be, &mut t, &batch.q)?;
        let p = outs[1].record(be, &mut t, &batch.p)?;
        let cross = if gather {
            Some(gather_passages(be, &mut t, rank.comm, &p, cfg)?)
        } else {
            None
        };
        let parts = m3_loss(&mut t, &q, &p, cfg, cross.as_ref())?;
        let seed = be.fill(&[1], rank.weight, DType::F32)?;
        let mut g = t.backward_with(parts.loss, seed)?;
        if let Some(x) = &cross {
            scatter_back(be, &t, rank.comm, x, &p, &mut g)?;
        }
        let mut seeds = Vec::new();
        for (s, o) in [(&q, &outs[0]), (&p, &outs[1])] {
            seeds.push(o.split_grads(be, &mut g, s)?);
        }
        (parts.values(&t)?, seeds)
    };
    drop(outs);
    // Pass two: backpropagate each sub-batch's output gradients, through the kept tape or
    // a re-encoding.
    for (k, b) in sides.iter().enumerate() {
        let mut tapes = std::mem::take(&mut kept[k]).into_iter();
        for (j, r) in chunks(b).into_iter().enumerate() {
            let (t, vars, s) = match tapes.next() {
                Some(kept) => kept,
                None => {
                    let sb = b.slice(r.clone());
                    let d = dropout.side(k as u64, b.cu_seqlens[r.start] as usize);
                    let mut t = Tape::new(be);
                    let vars = model.record(&mut t);
                    let s = heads(&mut t, &vars.encoder, &vars.heads, c, &sb, &d)?;
                    (t, vars, s)
                }
            };
            let [gd, gs, gc] = std::mem::take(&mut seeds[k][j]);
            let roots: Vec<(Var, Tensor<B>)> = [(s.dense, gd), (s.sparse, gs), (s.colbert, gc)]
                .into_iter()
                .filter_map(|(v, g)| g.map(|g| (v, g)))
                .collect();
            sink_into(&t, &vars, roots, grads)?;
        }
    }
    Ok(values)
}

/// An encoder tape of pass one kept for pass two: the tape, its weights, its outputs.
type KeptTape<'a, B> = (Tape<'a, B>, TrainVars, Side);

/// Gathers every rank's normalised passage vectors onto the loss tape, with where this
/// rank's queries start and every rank's stand-in columns (SPEC §5).
fn gather_passages<B: Backend>(
    be: &B,
    t: &mut Tape<'_, B>,
    comm: &dyn Collective<B>,
    p: &Side,
    cfg: &LossConfig,
) -> Result<CrossDevice> {
    let (all, rows) = comm.all_gather_rows(be, t.value(p.dense))?;
    let g = cfg.group.max(1);
    let r = comm.rank();
    if let Some((bad, n)) = rows.iter().enumerate().find(|(_, n)| !n.is_multiple_of(g)) {
        return Err(crate::error::Error::Collective(format!(
            "rank {bad} has {n} passages, not groups of {g}"
        )));
    }
    let first: usize = rows[..r].iter().sum();
    let mine: Vec<u8> = cfg
        .masked_columns
        .iter()
        .flat_map(|&c| (c as u64).to_le_bytes())
        .collect();
    let mut masked_columns = Vec::new();
    for (s, bytes) in comm.all_gather_bytes(&mine)?.iter().enumerate() {
        let base: usize = rows[..s].iter().sum();
        masked_columns.extend(
            bytes
                .chunks_exact(8)
                .map(|c| base + u64::from_le_bytes(c.try_into().unwrap()) as usize),
        );
    }
    Ok(CrossDevice {
        passages: t.param_owned(all),
        q0: first / g,
        p0: first,
        masked_columns,
    })
}

/// The all-gather's backward: the gradient of the gathered passages summed over ranks
/// (every rank's loss reaches every rank's passages), this rank's rows added to the
/// gradient of its own passage vectors.
fn scatter_back<B: Backend>(
    be: &B,
    t: &Tape<'_, B>,
    comm: &dyn Collective<B>,
    x: &CrossDevice,
    p: &Side,
    g: &mut crate::autograd::Grads<B>,
) -> Result<()> {
    let shape = t.value(x.passages).shape().to_vec();
    let mut all = match g.take(x.passages) {
        Some(a) => a,
        None => be.zeros(&shape, DType::F32)?,
    };
    comm.all_reduce_sum(be, &mut all)?;
    let (rows, d) = t.value(p.dense).rows_cols();
    let mine = piece_of(be, &all, x.p0 * d, &[rows, d])?;
    let total = match g.take(p.dense) {
        Some(mut own) => {
            be.add_assign(&mut own, &mine)?;
            own
        }
        None => mine,
    };
    g.put(p.dense, total);
    Ok(())
}

/// Elements `at..` of the flat f32 `src` as an f32 tensor of `shape`, cut on the device
/// (nothing is read back to the host).
fn piece_of<B: Backend>(be: &B, src: &Tensor<B>, at: usize, shape: &[usize]) -> Result<Tensor<B>> {
    let mut p = be.zeros(shape, DType::F32)?;
    be.read_at(src, at, &mut p)?;
    Ok(p)
}

/// One side's head outputs gathered over its sub-batches (host copies: pass one keeps
/// these and nothing else, so device memory holds one sub-batch's activations at a time;
/// their gradients are cut into sub-batch pieces on the device).
#[derive(Default)]
struct SideValues {
    dense: Vec<f32>,
    sparse: Vec<f32>,
    colbert: Vec<f32>,
    /// Per sub-batch: sequences, tokens, colbert rows.
    parts: Vec<(usize, usize, usize)>,
    /// Dense and colbert widths.
    dims: (usize, usize),
}

type OutputGrads<B> = [Option<Tensor<B>>; 3];

impl SideValues {
    fn extend<B: Backend>(&mut self, be: &B, t: &Tape<'_, B>, s: &Side) -> Result<()> {
        let (d, sp, co) = (t.value(s.dense), t.value(s.sparse), t.value(s.colbert));
        self.dims = (d.shape()[1], co.shape()[1]);
        self.parts
            .push((d.shape()[0], sp.shape()[0], co.shape()[0]));
        self.dense.extend(be.to_vec_f32(d)?);
        self.sparse.extend(be.to_vec_f32(sp)?);
        self.colbert.extend(be.to_vec_f32(co)?);
        Ok(())
    }

    /// The gathered outputs as tape leaves that take a gradient.
    fn record<B: Backend>(&self, be: &B, t: &mut Tape<'_, B>, b: &PackedBatch) -> Result<Side> {
        let (d, dc) = self.dims;
        let rows = self.colbert.len() / dc.max(1);
        Ok(Side {
            dense: t.param_owned(be.upload(HostData::F32(&self.dense), &[b.len(), d])?),
            sparse: t.param_owned(be.upload(HostData::F32(&self.sparse), &[b.tokens()])?),
            colbert: t.param_owned(be.upload(HostData::F32(&self.colbert), &[rows, dc])?),
            ids: b.ids.clone(),
            cu: b.cu_seqlens.clone(),
            colbert_cu: colbert_offsets(b),
        })
    }

    /// The loss gradient of each sub-batch's outputs (`None` where the loss does not use
    /// an output, e.g. `dense_only`, so those heads get no gradient as in PyTorch).
    fn split_grads<B: Backend>(
        &self,
        be: &B,
        g: &mut crate::autograd::Grads<B>,
        s: &Side,
    ) -> Result<Vec<OutputGrads<B>>> {
        let (d, dc) = self.dims;
        let (gd, gs, gc) = (g.take(s.dense), g.take(s.sparse), g.take(s.colbert));
        let mut out = Vec::new();
        let (mut o_d, mut o_s, mut o_c) = (0, 0, 0);
        for &(n, tokens, rows) in &self.parts {
            let piece = |v: &Option<Tensor<B>>, at: usize, shape: &[usize]| {
                v.as_ref().map(|v| piece_of(be, v, at, shape)).transpose()
            };
            out.push([
                piece(&gd, o_d, &[n, d])?,
                piece(&gs, o_s, &[tokens])?,
                piece(&gc, o_c, &[rows, dc])?,
            ]);
            o_d += n * d;
            o_s += tokens;
            o_c += rows * dc;
        }
        Ok(out)
    }
}
