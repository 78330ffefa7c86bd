//! The three retrieval heads on last hidden states (SPEC §3): dense (CLS, mean or MCLS
//! pooling, then L2 normalisation), lexical weights (`relu(sparse_linear(h))`, max per token
//! id, special tokens dropped) and colbert vectors (`normalize(colbert_linear(h))` for every
//! token but the CLS tokens).

use super::encoder::linear;
use super::weights::LinearWeights;
use crate::backend::Backend;
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::score::LexicalEntries;
use crate::tensor::{HostData, Tensor};

/// torch's `F.normalize` epsilon.
pub const NORM_EPS: f32 = 1e-12;

/// How the dense vector pools a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token (BGE-M3). With MCLS: the mean over every CLS position.
    Cls,
    /// The mean over all tokens, specials included (sentence-transformers models).
    Mean,
}

/// Dense vectors, one per sequence, L2-normalised.
pub fn dense<B: Backend>(
    be: &B,
    hidden: &Tensor<B>,
    batch: &PackedBatch,
    cls_positions: &[Vec<usize>],
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>> {
    let (t, h) = hidden.rows_cols();
    let b = batch.len();
    let single_cls = pooling == Pooling::Cls && cls_positions.iter().all(|c| c.len() == 1);
    let pooled = if single_cls {
        let rows: Vec<u32> = (0..b)
            .map(|i| batch.cu_seqlens[i] + cls_positions[i][0] as u32)
            .collect();
        let rows = be.upload(HostData::U32(&rows), &[b])?;
        be.embedding(hidden, &rows)?
    } else {
        // Pooling as a [B, T] averaging matrix times the hidden states: mean over all rows
        // of the sequence, or over its CLS rows (MCLS).
        let mut p = vec![0f32; b * t];
        for i in 0..b {
            let r = batch.range(i);
            let rows: Vec<usize> = match pooling {
                Pooling::Mean => r.collect(),
                Pooling::Cls => cls_positions[i].iter().map(|&c| r.start + c).collect(),
            };
            let wgt = 1.0 / rows.len().max(1) as f32;
            for row in rows {
                p[i * t + row] = wgt;
            }
        }
        let p = be.upload(HostData::F32(&p), &[b, t])?;
        let p = if hidden.dtype() == crate::DType::F32 {
            p
        } else {
            be.cast(&p, hidden.dtype())?
        };
        be.matmul(&p, false, hidden, false, None, hidden.dtype())?
    };
    let (y, _) = be.l2_normalize(&pooled, NORM_EPS)?;
    let v = be.to_vec_f32(&y)?;
    Ok(v.chunks(h.max(1)).take(b).map(<[f32]>::to_vec).collect())
}

/// Lexical weights per sequence: `(token id, weight)` sorted by id, the max over a token's
/// occurrences, ids for which `unused` holds and weights `<= 0` dropped.
pub fn lexical<B: Backend>(
    be: &B,
    hidden: &Tensor<B>,
    batch: &PackedBatch,
    head: &LinearWeights<B>,
    unused: &dyn Fn(u32) -> bool,
) -> Result<Vec<Vec<(u32, f32)>>> {
    let w = be.to_vec_f32(&be.relu(&linear(be, hidden, head)?)?)?;
    let e = LexicalEntries::build(&batch.ids, &batch.cu_seqlens, unused);
    Ok((0..batch.len())
        .map(|i| {
            e.entries_of(i)
                .filter_map(|k| {
                    let best = e
                        .rows_of(k)
                        .iter()
                        .map(|&r| w[r as usize])
                        .filter(|&x| x > 0.0)
                        .reduce(f32::max)?;
                    Some((e.ids[k], best))
                })
                .collect()
        })
        .collect())
}

/// Colbert vectors per sequence: every row but the CLS rows, normalised.
pub fn colbert<B: Backend>(
    be: &B,
    hidden: &Tensor<B>,
    batch: &PackedBatch,
    cls_positions: &[Vec<usize>],
    head: &LinearWeights<B>,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let (y, _) = be.l2_normalize(&linear(be, hidden, head)?, NORM_EPS)?;
    let d = y.rows_cols().1;
    let v = be.to_vec_f32(&y)?;
    Ok((0..batch.len())
        .map(|i| {
            let r = batch.range(i);
            (r.start..r.end)
                .filter(|row| !cls_positions[i].contains(&(row - r.start)))
                .map(|row| v[row * d..(row + 1) * d].to_vec())
                .collect()
        })
        .collect())
}
