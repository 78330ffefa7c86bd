//! The transformer encoder's inference forward on packed batches (no tape, no padding):
//! embeddings (word + position + type 0) and LayerNorm, then post-LayerNorm layers of
//! attention and GELU FFN.

use super::config::Config;
use super::weights::{EncoderWeights, Linear};
use crate::backend::Backend;
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::tensor::{HostData, Tensor};

/// `x Wᵀ + b` in the activations' dtype.
pub fn linear<B: Backend>(be: &B, x: &Tensor<B>, l: &Linear<B>) -> Result<Tensor<B>> {
    be.matmul(x, false, &l.wt, false, Some(&l.b), x.dtype())
}

/// Last hidden states `[tokens, hidden]` of a packed batch.
pub fn forward<B: Backend>(
    be: &B,
    w: &EncoderWeights<B>,
    c: &Config,
    batch: &PackedBatch,
) -> Result<Tensor<B>> {
    let t = batch.tokens();
    let ids = be.upload(HostData::U32(&batch.ids), &[t])?;
    let pos = be.upload(HostData::U32(&batch.positions), &[t])?;
    let zeros = be.upload(HostData::U32(&vec![0; t]), &[t])?;
    let x = be.add(
        &be.embedding(&w.word, &ids)?,
        &be.embedding(&w.position, &pos)?,
    )?;
    let x = be.add(&x, &be.embedding(&w.token_type0, &zeros)?)?;
    let eps = c.layer_norm_eps;
    let mut x = be.layernorm(&x, &w.emb_norm.g, &w.emb_norm.b, eps)?.y;
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    for l in &w.layers {
        let q = linear(be, &x, &l.q)?;
        let k = linear(be, &x, &l.k)?;
        let v = linear(be, &x, &l.v)?;
        let (a, _lse) =
            be.attention(&q, &k, &v, &batch.cu_seqlens, c.num_attention_heads, scale)?;
        let o = linear(be, &a, &l.attn_out)?;
        x = be
            .layernorm(&be.add(&o, &x)?, &l.attn_norm.g, &l.attn_norm.b, eps)?
            .y;
        let h = be.gelu(&linear(be, &x, &l.ffn_in)?)?;
        let o = linear(be, &h, &l.ffn_out)?;
        x = be
            .layernorm(&be.add(&o, &x)?, &l.ffn_norm.g, &l.ffn_norm.b, eps)?
            .y;
    }
    Ok(x)
}
