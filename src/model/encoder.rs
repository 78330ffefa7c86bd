//! The transformer encoder's forward on packed batches (no padding): embeddings (word +
//! position + type 0) and LayerNorm, then post-LayerNorm layers of attention and GELU FFN.
//! Written once ([`EncoderOps`] and `run`), run on fused kernels for inference and recorded
//! on a tape, with dropout, for training.

use std::sync::Arc;

use super::config::Config;
use super::params::{Encoder, Layer, Linear, Norm, Tree};
use super::weights::{EncoderWeights, LinearWeights};
use crate::autograd::{Tape, Var};
use crate::backend::{Backend, Seqs};
use crate::batch::PackedBatch;
use crate::error::Result;
use crate::tensor::{HostData, Tensor};

/// `x Wᵀ + b` in the activations' dtype.
pub fn linear<B: Backend>(be: &B, x: &Tensor<B>, l: &LinearWeights<B>) -> Result<Tensor<B>> {
    be.matmul(x, false, &l.wt, false, Some(&l.b), x.dtype())
}

/// The operations the encoder is written in, at the granularity of its fused inference
/// kernels. [`run`] is the one definition of the forward; [`forward`] runs it on a backend's
/// fused kernels, [`forward_taped`] records it on a tape (unfused, as the backward needs).
trait EncoderOps {
    /// What a weight is (a tensor, or a tape value).
    type W;
    /// What an activation is.
    type X;
    /// What the attention calls of one batch share of its sequences.
    type S;
    /// The batch's sequences, made ready once for every layer.
    fn seqs(&mut self, batch: &PackedBatch) -> Result<Self::S>;
    /// `LayerNorm(word[ids] + position[positions] + type0)`, then dropout site 0.
    fn embed(&mut self, w: &Encoder<Self::W>, batch: &PackedBatch, eps: f32) -> Result<Self::X>;
    /// `x Wᵀ + b`.
    fn linear(&mut self, x: &Self::X, l: &Linear<Self::W>) -> Result<Self::X>;
    /// `gelu(x Wᵀ + b)`.
    fn linear_gelu(&mut self, x: &Self::X, l: &Linear<Self::W>) -> Result<Self::X>;
    /// Multi-head attention over the packed sequences.
    fn attention(
        &mut self,
        qkv: [&Self::X; 3],
        seqs: &Self::S,
        heads: usize,
        scale: f32,
    ) -> Result<Self::X>;
    /// `LayerNorm(dropout_site(o) + x)`.
    fn residual_norm(
        &mut self,
        o: Self::X,
        x: &Self::X,
        n: &Norm<Self::W>,
        eps: f32,
        site: u64,
    ) -> Result<Self::X>;
}

/// The encoder forward: embeddings, then post-LayerNorm layers of attention and GELU FFN.
fn run<E: EncoderOps>(
    e: &mut E,
    w: &Encoder<E::W>,
    c: &Config,
    batch: &PackedBatch,
) -> Result<E::X> {
    let eps = c.layer_norm_eps;
    let mut x = e.embed(w, batch, eps)?;
    let seqs = e.seqs(batch)?;
    let scale = 1.0 / (c.head_dim() as f32).sqrt();
    for (i, l) in w.layers.iter().enumerate() {
        let site = 1 + 2 * i as u64;
        let q = e.linear(&x, &l.q)?;
        let k = e.linear(&x, &l.k)?;
        let v = e.linear(&x, &l.v)?;
        let a = e.attention([&q, &k, &v], &seqs, c.num_attention_heads, scale)?;
        let o = e.linear(&a, &l.attn_out)?;
        x = e.residual_norm(o, &x, &l.attn_norm, eps, site)?;
        let h = e.linear_gelu(&x, &l.ffn_in)?;
        let o = e.linear(&h, &l.ffn_out)?;
        x = e.residual_norm(o, &x, &l.ffn_norm, eps, site + 1)?;
    }
    Ok(x)
}

/// Inference on a backend's fused kernels (no dropout).
struct Fused<'a, B: Backend>(&'a B);

impl<B: Backend> EncoderOps for Fused<'_, B> {
    type W = Tensor<B>;
    type X = Tensor<B>;
    type S = Seqs<B>;

    fn seqs(&mut self, batch: &PackedBatch) -> Result<Seqs<B>> {
        Seqs::new(self.0, &batch.cu_seqlens)
    }

    fn embed(&mut self, w: &EncoderWeights<B>, batch: &PackedBatch, eps: f32) -> Result<Tensor<B>> {
        let (be, t) = (self.0, batch.tokens());
        let ids = be.upload(HostData::U32(&batch.ids), &[t])?;
        let pos = be.upload(HostData::U32(&batch.positions), &[t])?;
        be.embed_layernorm(
            &w.word,
            &w.position,
            &w.token_type0,
            &ids,
            &pos,
            &w.emb_norm.g,
            &w.emb_norm.b,
            eps,
        )
    }

    fn linear(&mut self, x: &Tensor<B>, l: &LinearWeights<B>) -> Result<Tensor<B>> {
        linear(self.0, x, l)
    }

    fn linear_gelu(&mut self, x: &Tensor<B>, l: &LinearWeights<B>) -> Result<Tensor<B>> {
        self.0.linear_gelu(x, &l.wt, &l.b)
    }

    fn attention(
        &mut self,
        [q, k, v]: [&Tensor<B>; 3],
        seqs: &Seqs<B>,
        heads: usize,
        scale: f32,
    ) -> Result<Tensor<B>> {
        Ok(self.0.attention(q, k, v, seqs, heads, scale)?.0)
    }

    fn residual_norm(
        &mut self,
        o: Tensor<B>,
        x: &Tensor<B>,
        n: &Norm<Tensor<B>>,
        eps: f32,
        _site: u64,
    ) -> Result<Tensor<B>> {
        self.0.add_layernorm(&o, x, &n.g, &n.b, eps)
    }
}

/// Last hidden states `[tokens, hidden]` of a packed batch.
pub fn forward<B: Backend>(
    be: &B,
    w: &EncoderWeights<B>,
    c: &Config,
    batch: &PackedBatch,
) -> Result<Tensor<B>> {
    run(&mut Fused(be), w, c, batch)
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

/// The forward recorded on a tape, with hidden-state dropout.
struct Taped<'t, 'a, B: Backend> {
    t: &'t mut Tape<'a, B>,
    drop: Dropout,
    hidden: usize,
}

impl<B: Backend> EncoderOps for Taped<'_, '_, B> {
    type W = Var;
    type X = Var;
    type S = Arc<Seqs<B>>;

    fn seqs(&mut self, batch: &PackedBatch) -> Result<Arc<Seqs<B>>> {
        Ok(Arc::new(Seqs::new(self.t.backend(), &batch.cu_seqlens)?))
    }

    fn embed(&mut self, w: &EncoderVars, batch: &PackedBatch, eps: f32) -> Result<Var> {
        let (t, n) = (&mut *self.t, batch.tokens());
        let be = t.backend();
        let ids = be.upload(HostData::U32(&batch.ids), &[n])?;
        let pos = be.upload(HostData::U32(&batch.positions), &[n])?;
        let zeros = be.upload(HostData::U32(&vec![0; n]), &[n])?;
        let e = t.embedding(w.word, ids)?;
        let p = t.embedding(w.position, pos)?;
        let ty = t.embedding(w.token_type0, zeros)?;
        let x = t.add(e, p)?;
        let x = t.add(x, ty)?;
        let x = t.layernorm(x, w.emb_norm.g, w.emb_norm.b, eps)?;
        t.dropout(x, self.drop.p, self.drop.site(0, self.hidden))
    }

    fn linear(&mut self, x: &Var, l: &LinearVars) -> Result<Var> {
        self.t.matmul(*x, false, l.wt, false, Some(l.b))
    }

    fn linear_gelu(&mut self, x: &Var, l: &LinearVars) -> Result<Var> {
        let h = self.linear(x, l)?;
        self.t.gelu(h)
    }

    fn attention(
        &mut self,
        [q, k, v]: [&Var; 3],
        seqs: &Arc<Seqs<B>>,
        heads: usize,
        scale: f32,
    ) -> Result<Var> {
        self.t.attention(*q, *k, *v, seqs, heads, scale)
    }

    fn residual_norm(&mut self, o: Var, x: &Var, n: &NormVars, eps: f32, site: u64) -> Result<Var> {
        let o = self
            .t
            .dropout(o, self.drop.p, self.drop.site(site, self.hidden))?;
        let r = self.t.add(o, *x)?;
        self.t.layernorm(r, n.g, n.b, eps)
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
    let mut e = Taped {
        t,
        drop: *drop,
        hidden: c.hidden_size,
    };
    run(&mut e, w, c, batch)
}
