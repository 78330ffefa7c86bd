//! The unified fine-tuning loss with self-knowledge distillation (SPEC §5), recorded on the
//! tape from the three heads' outputs of a batch of B queries and B·G passages.
//!
//! Done: in-batch negatives with groups, temperature, dense / sparse / colbert / ensemble
//! cross-entropies with their weights, self-distillation from the detached ensemble, and
//! `dense_only`. Not yet: no-in-batch-negative datasets, teacher scores from the data
//! (`kl_div`, `m3_kd_loss`) and cross-device negatives (rest of issue 4).

use crate::autograd::{Tape, Var};
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::HostData;

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

/// Mean over rows of cross-entropy with target column `b·G` for row `b`.
fn ce<B: Backend>(t: &mut Tape<'_, B>, s: Var, group: usize) -> Result<Var> {
    let rows = t.value(s).shape()[0];
    let targets: Vec<u32> = (0..rows as u32).map(|b| b * group as u32).collect();
    let targets = t.backend().upload(HostData::U32(&targets), &[rows])?;
    let per_row = t.softmax_cross_entropy(s, targets)?;
    let total = t.sum_all(per_row)?;
    t.scale(total, 1.0 / rows.max(1) as f32)
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

/// Records the SPEC §5 loss for queries `q` and passages `p`.
pub fn m3_loss<B: Backend>(
    t: &mut Tape<'_, B>,
    q: &Side,
    p: &Side,
    cfg: &LossConfig,
) -> Result<LossParts> {
    let inv_tau = 1.0 / cfg.temperature;
    let dot = t.matmul(q.dense, false, p.dense, true, None)?;
    let s_d = t.scale(dot, inv_tau)?;
    let ce_d = ce(t, s_d, cfg.group)?;
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
    let ms = t.maxsim(q.colbert, &q.colbert_cu, p.colbert, &p.colbert_cu)?;
    let s_m = t.scale(ms, inv_tau)?;
    let s_s3 = t.scale(s_s, 0.3)?;
    let s_e = t.add(s_d, s_s3)?;
    let s_e = t.add(s_e, s_m)?;
    let (ce_s, ce_m, ce_e) = (
        ce(t, s_s, cfg.group)?,
        ce(t, s_m, cfg.group)?,
        ce(t, s_e, cfg.group)?,
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
