//! The transformer encoder's inference forward on packed batches (no tape, no padding):
//! embeddings (word + position + type 0) and LayerNorm, then post-LayerNorm layers of
//! attention and GELU FFN.

use super::config::Config;
use super::params::{Encoder, Layer, Linear, Norm, Tree};
use super::weights::{EncoderWeights, LinearWeights};
use crate::autograd::{Tape, Var};
use crate::backend::Backend;
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::tensor::{HostData, Tensor};

/// `x Wᵀ + b` in the activations' dtype.
pub fn linear<B: Backend>(be: &B, x: &Tensor<B>, l: &LinearWeights<B>) -> Result<Tensor<B>> {
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
    let eps = c.layer_norm_eps;
    let mut x = be.embed_layernorm(
        &w.word,
        &w.position,
        &w.token_type0,
        &ids,
        &pos,
        &w.emb_norm.g,
        &w.emb_norm.b,
        eps,
    )?;
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    for l in &w.layers {
        let q = linear(be, &x, &l.q)?;
        let k = linear(be, &x, &l.k)?;
        let v = linear(be, &x, &l.v)?;
        let (a, _lse) =
            be.attention(&q, &k, &v, &batch.cu_seqlens, c.num_attention_heads, scale)?;
        let o = linear(be, &a, &l.attn_out)?;
        x = be.add_layernorm(&o, &x, &l.attn_norm.g, &l.attn_norm.b, eps)?;
        let h = be.linear_gelu(&x, &l.ffn_in.wt, &l.ffn_in.b)?;
        let o = linear(be, &h, &l.ffn_out)?;
        x = be.add_layernorm(&o, &x, &l.ffn_norm.g, &l.ffn_norm.b, eps)?;
    }
    Ok(x)
}

/// Tape values of one linear layer: transposed weight `[in, out]` and bias.
pub type LinearVars = Linear<Var>;

/// Tape values of one LayerNorm.
pub type NormVars = Norm<Var>;

/// Tape values of one transformer layer.
pub type LayerVars = Layer<Var>;

/// The encoder's parameters recorded on a tape (for training and gradient checks).
pub type EncoderVars = Encoder<Var>;

impl EncoderVars {
    /// Records every weight of `w` on the tape as a borrowed parameter.
    pub fn record<'a, B: Backend>(t: &mut Tape<'a, B>, w: &'a EncoderWeights<B>) -> Self {
        w.map(|_, x| t.param(x))
    }
}

/// Hidden-state dropout of a taped forward (BERT's sites: after the embedding LayerNorm and
/// on each attention and FFN output before its residual; attention-probability dropout is
/// not applied, SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Drop probability (0 disables).
    pub p: f32,
    /// Mask seed of this forward (one per step and side).
    pub seed: u64,
    /// Tokens before this batch in the batch it is a sub-batch of, so a sub-batch draws the
    /// whole batch's mask for its rows.
    pub token_offset: u64,
}

impl Dropout {
    /// No dropout.
    pub const OFF: Dropout = Dropout {
        p: 0.0,
        seed: 0,
        token_offset: 0,
    };

    /// The mask seed of site `k` for rows of width `hidden`.
    fn site(&self, k: u64, hidden: usize) -> u64 {
        let mut r = crate::rng::Rng::new(self.seed ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03));
        crate::backend::dropout_seed_at(r.next_u64(), self.token_offset * hidden as u64)
    }
}

/// The same forward as [`forward`], recorded on a tape so gradients reach every weight,
/// with hidden-state dropout `drop`.
pub fn forward_taped<B: Backend>(
    t: &mut Tape<'_, B>,
    w: &EncoderVars,
    c: &Config,
    batch: &PackedBatch,
    drop: &Dropout,
) -> Result<Var> {
    let n = batch.tokens();
    let be = t.backend();
    let ids = be.upload(HostData::U32(&batch.ids), &[n])?;
    let pos = be.upload(HostData::U32(&batch.positions), &[n])?;
    let zeros = be.upload(HostData::U32(&vec![0; n]), &[n])?;
    let e = t.embedding(w.word, ids)?;
    let p = t.embedding(w.position, pos)?;
    let ty = t.embedding(w.token_type0, zeros)?;
    let x = t.add(e, p)?;
    let x = t.add(x, ty)?;
    let eps = c.layer_norm_eps;
    let x = t.layernorm(x, w.emb_norm.g, w.emb_norm.b, eps)?;
    let hidden = c.hidden_size;
    let mut x = t.dropout(x, drop.p, drop.site(0, hidden))?;
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    let lin = |t: &mut Tape<'_, B>, x, l: &LinearVars| t.matmul(x, false, l.wt, false, Some(l.b));
    for (i, l) in w.layers.iter().enumerate() {
        let site = 1 + 2 * i as u64;
        let q = lin(t, x, &l.q)?;
        let k = lin(t, x, &l.k)?;
        let v = lin(t, x, &l.v)?;
        let a = t.attention(q, k, v, &batch.cu_seqlens, c.num_attention_heads, scale)?;
        let o = lin(t, a, &l.attn_out)?;
        let o = t.dropout(o, drop.p, drop.site(site, hidden))?;
        let r = t.add(o, x)?;
        x = t.layernorm(r, l.attn_norm.g, l.attn_norm.b, eps)?;
        let h = lin(t, x, &l.ffn_in)?;
        let h = t.gelu(h)?;
        let o = lin(t, h, &l.ffn_out)?;
        let o = t.dropout(o, drop.p, drop.site(site + 1, hidden))?;
        let r = t.add(o, x)?;
        x = t.layernorm(r, l.ffn_norm.g, l.ffn_norm.b, eps)?;
    }
    Ok(x)
}
