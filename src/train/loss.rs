//! The unified fine-tuning loss with self-knowledge distillation (SPEC §5), recorded on the
//! tape from the three heads' outputs of a batch of B queries and B·G passages.
//!
//! In-batch negatives with groups (or, for datasets without them, each query's own group
//! only), temperature, dense / sparse / colbert / ensemble cross-entropies with their
//! weights, self-distillation from the detached ensemble, `dense_only`, and teacher scores
//! from the data (`kl_div`, `m3_kd_loss`), and the dense term of cross-device negatives
//! ([`CrossDevice`]: this rank's queries against every rank's passages).
//!
//! Restricting a row to some columns is done by adding [`MASKED`] to the others: `exp` of it
//! underflows to exactly 0 in f32, so the softmax, the cross-entropy and their gradients
//! equal those over the kept columns alone, and a zero teacher weight times the masked
//! log-probability stays 0 (with `-inf` it would be NaN). It is far below any score yet
//! finite when a few masks add up (FlagEmbedding adds `finfo.min`, which overflows then).

use crate::autograd::{Tape, Var};
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::{DType, HostData};

/// One side's head outputs, recorded on the tape.
pub struct Side {
    /// Normalised dense vectors `[B, d]`.
    pub dense: Var,
    /// Per-token weights `relu(sparse_linear(h))`, f32 `[T]`.
    pub sparse: Var,
    /// Token ids `[T]` of the packed sequences.
    pub ids: Vec<u32>,
    /// Sequence offsets `[B + 1]` over the tokens.
    pub cu: Vec<u32>,
    /// Normalised colbert vectors `[R, d]` (every token but the CLS).
    pub colbert: Var,
    /// Sequence offsets `[B + 1]` over the colbert rows.
    pub colbert_cu: Vec<u32>,
}

/// Added to a score to take its column out of a row's softmax (see the module doc).
pub const MASKED: f32 = -1.0e30;

/// How teacher scores in the data enter the loss (FlagEmbedding's `--kd_loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KdLoss {
    /// Hard-label CE plus cross-entropy against the teacher's softmax over the group.
    KlDiv,
    /// BGE-M3's: for each passage i of the group, CE with target i over the row with the
    /// group's earlier passages masked, weighted by the teacher's probability of i.
    M3KdLoss,
}

/// Loss settings.
#[derive(Debug, Clone)]
pub struct LossConfig {
    /// Temperature τ; every score is divided by it.
    pub temperature: f32,
    /// Passages per query G (positive first).
    pub group: usize,
    /// Only the dense cross-entropy.
    pub dense_only: bool,
    /// Add the self-distillation term (SPEC: on steps after `self_distill_start_step`).
    pub self_distill: bool,
    /// Token ids whose lexical weight counts 0 (CLS, EOS, PAD, UNK).
    pub excluded: Vec<u32>,
    /// Score each query against every passage of the batch (false: its own group only).
    pub in_batch_neg: bool,
    /// Teacher scores per passage `[B·G]` from the data, and how to use them.
    pub teacher: Option<(Vec<f32>, KdLoss)>,
    /// Passage columns taken out of every row (stand-ins filling a short group).
    pub masked_columns: Vec<usize>,
}

impl LossConfig {
    /// The SPEC defaults for a group size: τ 0.02, unified with self-distillation, in-batch
    /// negatives, no teacher.
    pub fn new(group: usize, excluded: Vec<u32>) -> Self {
        LossConfig {
            temperature: 0.02,
            group,
            dense_only: false,
            self_distill: true,
            excluded,
            in_batch_neg: true,
            teacher: None,
            masked_columns: Vec::new(),
        }
    }
}

/// The loss and its parts (each a scalar `[1]` on the tape).
pub struct LossParts {
    /// The total.
    pub loss: Var,
    /// `CE(S_d)`.
    pub dense: Var,
    /// `CE(S_s)`, `CE(S_m)`, `CE(S_e)` when unified.
    pub unified: Option<[Var; 3]>,
    /// `(KD(S_d) + 0.1·KD(S_s) + KD(S_m)) / 3` when self-distilling.
    pub distill: Option<Var>,
}

/// The loss and its parts as numbers (the metrics of one step).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossValues {
    /// The total.
    pub loss: f32,
    /// Dense term.
    pub dense: f32,
    /// Sparse, colbert and ensemble terms when unified.
    pub unified: Option<[f32; 3]>,
    /// Self-distillation term.
    pub distill: Option<f32>,
}

impl LossParts {
    /// Reads the parts back from the tape, in one read (each read waits for the device):
    /// they are added into one zeroed buffer first.
    pub fn values<B: Backend>(&self, t: &Tape<'_, B>) -> Result<LossValues> {
        let be = t.backend();
        let vars: Vec<Var> = [self.loss, self.dense]
            .into_iter()
            .chain(self.unified.into_iter().flatten())
            .chain(self.distill)
            .collect();
        let mut all = be.zeros(&[vars.len()], DType::F32)?;
        for (i, &v) in vars.iter().enumerate() {
            be.add_at(&mut all, i, t.value(v))?;
        }
        let mut got = be.take_vec_f32(all)?.into_iter();
        let mut next = || got.next().expect("one value per part");
        Ok(LossValues {
            loss: next(),
            dense: next(),
            unified: self.unified.map(|_| [next(), next(), next()]),
            distill: self.distill.map(|_| next()),
        })
    }
}

/// The dense term's columns when passages come from every rank: the gathered passage
/// vectors `[P_all, d]` (a leaf whose gradient the caller reduce-scatters), where this
/// rank's queries start in the global batch, and the stand-in columns of all ranks.
pub struct CrossDevice {
    /// Every rank's passages, rank order.
    pub passages: Var,
    /// Global index of this rank's first query (its group starts at column `q0·G`).
    pub q0: usize,
    /// Row of this rank's first passage among the gathered ones (`q0·G`).
    pub p0: usize,
    /// Stand-in columns of the gathered passages.
    pub masked_columns: Vec<usize>,
}

/// Mean over rows of cross-entropy with target column `(q0 + b)·G + i` for row `b`.
fn ce<B: Backend>(t: &mut Tape<'_, B>, s: Var, group: usize, q0: usize, i: usize) -> Result<Var> {
    let rows = t.value(s).shape()[0];
    let targets: Vec<u32> = (0..rows).map(|b| ((q0 + b) * group + i) as u32).collect();
    let targets = t.backend().upload(HostData::U32(&targets), &[rows])?;
    let per_row = t.softmax_cross_entropy(s, targets)?;
    let total = t.sum_all(per_row)?;
    t.scale(total, 1.0 / rows.max(1) as f32)
}

/// `s` plus a constant `[rows, cols]` mask: [`MASKED`] where `keep(b, c)` is false.
fn masked<B: Backend>(
    t: &mut Tape<'_, B>,
    s: Var,
    keep: impl Fn(usize, usize) -> bool,
) -> Result<Var> {
    let (rows, cols) = t.value(s).rows_cols();
    let m: Vec<f32> = (0..rows * cols)
        .map(|k| {
            if keep(k / cols, k % cols) {
                0.0
            } else {
                MASKED
            }
        })
        .collect();
    let m = t.backend().upload(HostData::F32(&m), &[rows, cols])?;
    let m = t.input(m);
    t.add(s, m)
}

/// The loss of one score matrix `[B, cols]` against its labels, query `b`'s group at
/// columns `(q0 + b)·G ..`: hard-label CE, and the teacher's terms when the data has
/// teacher scores (SPEC §5).
fn labelled<B: Backend>(t: &mut Tape<'_, B>, s: Var, cfg: &LossConfig, q0: usize) -> Result<Var> {
    let g = cfg.group;
    let Some((scores, kind)) = &cfg.teacher else {
        return ce(t, s, g, q0, 0);
    };
    let (rows, cols) = t.value(s).rows_cols();
    // The teacher's distribution over each query's own group, stand-ins excluded.
    let mut scores = scores.clone();
    for &c in &cfg.masked_columns {
        scores[c] = f32::NEG_INFINITY;
    }
    let probs = softmax_rows(&scores, g);
    match kind {
        KdLoss::KlDiv => {
            let hard = ce(t, s, g, q0, 0)?;
            let local = masked(t, s, |b, c| c / g == q0 + b)?;
            let mut target = vec![0f32; rows * cols];
            for b in 0..rows {
                for i in 0..g {
                    target[b * cols + (q0 + b) * g + i] = probs[b * g + i];
                }
            }
            let soft = kd(t, local, &target)?;
            t.add(hard, soft)
        }
        KdLoss::M3KdLoss => {
            let mut total: Option<Var> = None;
            for i in 0..g {
                let si = masked(t, s, |b, c| {
                    let start = (q0 + b) * g;
                    !(c >= start && c < start + i)
                })?;
                let mut target = vec![0f32; rows * cols];
                for b in 0..rows {
                    target[b * cols + (q0 + b) * g + i] = probs[b * g + i];
                }
                let term = kd(t, si, &target)?;
                total = Some(match total {
                    Some(acc) => t.add(acc, term)?,
                    None => term,
                });
            }
            Ok(total.expect("group size is at least 1"))
        }
    }
}

/// `-mean_b Σ_c T[b,c] · log_softmax(S)[b,c]` against a detached teacher.
fn kd<B: Backend>(t: &mut Tape<'_, B>, s: Var, teacher: &[f32]) -> Result<Var> {
    let shape = t.value(s).shape().to_vec();
    let teacher = t.backend().upload(HostData::F32(teacher), &shape)?;
    let per_row = t.soft_cross_entropy(s, teacher)?;
    let total = t.sum_all(per_row)?;
    t.scale(total, 1.0 / shape[0].max(1) as f32)
}

/// Row-wise softmax of a host matrix (the detached ensemble teacher).
fn softmax_rows(v: &[f32], cols: usize) -> Vec<f32> {
    v.chunks(cols)
        .flat_map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row.iter().map(|&x| ((x - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |x| (x / s) as f32)
        })
        .collect()
}

/// Records the SPEC §5 loss for queries `q` and passages `p`; with `cross`, the dense
/// cross-entropy is over every rank's passages, while the ensemble, self-distillation,
/// sparse and colbert terms use this rank's block.
pub fn m3_loss<B: Backend>(
    t: &mut Tape<'_, B>,
    q: &Side,
    p: &Side,
    cfg: &LossConfig,
    cross: Option<&CrossDevice>,
) -> Result<LossParts> {
    let inv_tau = 1.0 / cfg.temperature;
    let dot = t.matmul(q.dense, false, p.dense, true, None)?;
    let g = cfg.group;
    let own_group = |t: &mut Tape<'_, B>, s: Var| -> Result<Var> {
        if cfg.in_batch_neg && cfg.masked_columns.is_empty() {
            Ok(s)
        } else {
            masked(t, s, |b, c| {
                (cfg.in_batch_neg || c / g == b) && !cfg.masked_columns.contains(&c)
            })
        }
    };
    let s_d = t.scale(dot, inv_tau)?;
    let s_d = own_group(t, s_d)?;
    let ce_d = match cross {
        None => labelled(t, s_d, cfg, 0)?,
        Some(x) => {
            let all = t.matmul(q.dense, false, x.passages, true, None)?;
            let mut s_all = t.scale(all, inv_tau)?;
            if !x.masked_columns.is_empty() {
                s_all = masked(t, s_all, |_, c| !x.masked_columns.contains(&c))?;
            }
            labelled(t, s_all, cfg, x.q0)?
        }
    };
    if cfg.dense_only {
        return Ok(LossParts {
            loss: ce_d,
            dense: ce_d,
            unified: None,
            distill: None,
        });
    }
    let lex = t.lexical_scores(
        q.sparse,
        &q.ids,
        &q.cu,
        p.sparse,
        &p.ids,
        &p.cu,
        &cfg.excluded,
    )?;
    let s_s = t.scale(lex, inv_tau)?;
    let s_s = own_group(t, s_s)?;
    let ms = t.maxsim(q.colbert, &q.colbert_cu, p.colbert, &p.colbert_cu)?;
    let s_m = t.scale(ms, inv_tau)?;
    let s_m = own_group(t, s_m)?;
    let s_s3 = t.scale(s_s, 0.3)?;
    let s_e = t.add(s_d, s_s3)?;
    let s_e = t.add(s_e, s_m)?;
    let (ce_s, ce_m, ce_e) = (
        labelled(t, s_s, cfg, 0)?,
        labelled(t, s_m, cfg, 0)?,
        labelled(t, s_e, cfg, 0)?,
    );
    let ce_s1 = t.scale(ce_s, 0.1)?;
    let a = t.add(ce_d, ce_e)?;
    let b = t.add(ce_s1, ce_m)?;
    let sum = t.add(a, b)?;
    let mut loss = t.scale(sum, 0.25)?;
    let mut distill = None;
    if cfg.self_distill {
        let cols = t.value(s_e).shape()[1];
        let teacher = softmax_rows(&t.backend().to_vec_f32(t.value(s_e))?, cols);
        let (kd_d, kd_s, kd_m) = (
            kd(t, s_d, &teacher)?,
            kd(t, s_s, &teacher)?,
            kd(t, s_m, &teacher)?,
        );
        let kd_s1 = t.scale(kd_s, 0.1)?;
        let x = t.add(kd_d, kd_s1)?;
        let x = t.add(x, kd_m)?;
        let d = t.scale(x, 1.0 / 3.0)?;
        let total = t.add(loss, d)?;
        loss = t.scale(total, 0.5)?;
        distill = Some(d);
    }
    Ok(LossParts {
        loss,
        dense: ce_d,
        unified: Some([ce_s, ce_m, ce_e]),
        distill,
    })
}
