//! The training forward on the tape: encoder, the three heads as training uses them
//! (SPEC §3, §5), and the unified loss for one batch of packed queries and passages.

use crate::autograd::{Tape, Var};
use crate::backend::Backend;
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::model::config::Config;
use crate::model::encoder::{forward_taped, EncoderVars, LinearVars};
use crate::model::heads::NORM_EPS;
use crate::tensor::HostData;

use super::loss::{m3_loss, LossConfig, LossParts, Side};

/// The heads' weights on the tape.
#[derive(Debug, Clone, Copy)]
pub struct HeadVars {
    /// `sparse_linear` (`[hidden, 1]` transposed weight).
    pub sparse: LinearVars,
    /// `colbert_linear` (`[hidden, d]` transposed weight).
    pub colbert: LinearVars,
}

/// Encodes one packed batch and records its three heads: normalised CLS vectors, token
/// weights `relu(sparse_linear(h))` `[T]`, and normalised colbert vectors of every token
/// but the first of each sequence.
pub fn heads<B: Backend>(
    t: &mut Tape<'_, B>,
    enc: &EncoderVars,
    heads: &HeadVars,
    c: &Config,
    batch: &PackedBatch,
) -> Result<Side> {
    let h = forward_taped(t, enc, c, batch)?;
    let n = batch.tokens();
    let cls: Vec<u32> = batch.cu_seqlens[..batch.len()].to_vec();
    let cls = t.backend().upload(HostData::U32(&cls), &[batch.len()])?;
    let pooled = t.embedding(h, cls)?;
    let dense = t.l2_normalize(pooled, NORM_EPS)?;
    let w = t.matmul(h, false, heads.sparse.wt, false, Some(heads.sparse.b))?;
    let w = t.relu(w)?;
    let sparse = t.reshape(w, &[n])?;
    let rows: Vec<u32> = (0..batch.len())
        .flat_map(|i| batch.range(i).skip(1).map(|r| r as u32))
        .collect();
    let mut colbert_cu = vec![0u32];
    for i in 0..batch.len() {
        colbert_cu.push(colbert_cu[i] + batch.range(i).len().saturating_sub(1) as u32);
    }
    let all = t.matmul(h, false, heads.colbert.wt, false, Some(heads.colbert.b))?;
    let rows_t = t.backend().upload(HostData::U32(&rows), &[rows.len()])?;
    let picked = t.embedding(all, rows_t)?;
    let colbert = t.l2_normalize(picked, NORM_EPS)?;
    Ok(Side {
        dense,
        sparse,
        ids: batch.ids.clone(),
        cu: batch.cu_seqlens.clone(),
        colbert,
        colbert_cu,
    })
}

/// The unified loss of one batch: queries `q` (B sequences) and passages `p` (B·G, each
/// query's group contiguous, positive first).
pub fn batch_loss<B: Backend>(
    t: &mut Tape<'_, B>,
    enc: &EncoderVars,
    head_vars: &HeadVars,
    c: &Config,
    q: &PackedBatch,
    p: &PackedBatch,
    cfg: &LossConfig,
) -> Result<(Var, LossParts)> {
    let qs = heads(t, enc, head_vars, c, q)?;
    let ps = heads(t, enc, head_vars, c, p)?;
    let parts = m3_loss(t, &qs, &ps, cfg)?;
    Ok((parts.loss, parts))
}
