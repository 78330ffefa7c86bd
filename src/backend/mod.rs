//! The kernel-level operations every backend provides, forward and backward.
//!
//! Model, tape and loss code are written once against [`Backend`]. The CPU backend is the
//! f32 reference; the CUDA backend (feature `cuda`) is tested against it.
//!
//! Conventions shared by all ops: tensors are row-major; an op that works on rows folds all
//! leading dimensions into rows ([`Tensor::rows_cols`]). Float inputs of one op share one
//! dtype `T` (f32 or bf16); statistics (LayerNorm mean/rstd, norms, log-sum-exp, losses) and
//! parameter gradients (bias, LayerNorm gain/shift, embedding table) are f32; input
//! gradients have the input's dtype.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod host_syncs;
mod seqs;

pub(crate) use host_syncs::count_host_sync;
pub use host_syncs::host_syncs;
pub use seqs::Seqs;

use crate::error::{dtype_err, shape_err, Error, Result};
pub use crate::tensor::Device;
use crate::tensor::{DType, HostData, Tensor};

/// LayerNorm forward results: output and the statistics its backward needs.
pub struct LayerNormOut<B: Backend> {
    /// Normalised, scaled and shifted rows, same shape and dtype as the input.
    pub y: Tensor<B>,
    /// Per-row mean, f32 `[rows]`.
    pub mean: Tensor<B>,
    /// Per-row reciprocal standard deviation `1/sqrt(var + eps)`, f32 `[rows]`.
    pub rstd: Tensor<B>,
}

/// LayerNorm backward results.
pub struct LayerNormGrads<B: Backend> {
    /// Gradient with respect to the input, input's dtype.
    pub dx: Tensor<B>,
    /// Gradient with respect to the gain, f32 `[cols]`.
    pub dgamma: Tensor<B>,
    /// Gradient with respect to the shift, f32 `[cols]`.
    pub dbeta: Tensor<B>,
}

/// Kernel-level operations; one implementation per device.
pub trait Backend: Device + Sized + Send + Sync {
    /// What the backend keeps of a batch's sequence offsets for its attention kernels
    /// (`()` on the CPU; the offsets and flash tiles on the device on CUDA).
    type SeqsKept: Send + Sync;

    /// Human-readable device name ("cpu", "cuda:0 NVIDIA H100 ...").
    fn name(&self) -> String;

    /// The backend's part of [`Seqs`] from offsets [`Seqs::new`] has checked.
    fn keep_seqs(&self, cu_seqlens: &[u32]) -> Result<Self::SeqsKept>;

    /// Inference's FFN up-projection: `gelu(x · w + bias)` with exact (erf) GELU, `w`
    /// `[in, out]`. The default is the composition, which is the reference.
    fn linear_gelu(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        self.gelu(&self.matmul(x, false, w, false, Some(bias), x.dtype())?)
    }

    /// Waits until all queued work is done (a no-op where ops run synchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Most device memory in use by tensors since the last [`Backend::reset_peak_memory`]
    /// (bytes); `None` where the backend does not track it (the CPU).
    fn peak_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Starts a new peak-memory measurement from the memory in use now.
    fn reset_peak_memory(&self) -> Result<()> {
        Ok(())
    }

    /// Device memory tensors could use: free memory plus what tensors hold now (bytes);
    /// `None` on the CPU.
    fn memory_available(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Copies host data to the device as a tensor of the given shape.
    fn upload(&self, data: HostData<'_>, shape: &[usize]) -> Result<Tensor<Self>>;
    /// An f32 tensor from host values the caller gives up (the CPU keeps the buffer: no
    /// copy, no second allocation of the model while it loads).
    fn upload_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor<Self>> {
        self.upload(HostData::F32(&data), shape)
    }
    /// Copies a float tensor back to the host as f32.
    fn to_vec_f32(&self, t: &Tensor<Self>) -> Result<Vec<f32>>;
    /// A float tensor's values as f32, consuming it (the CPU hands its buffer over).
    fn take_vec_f32(&self, t: Tensor<Self>) -> Result<Vec<f32>> {
        self.to_vec_f32(&t)
    }
    /// Overwrites a float tensor with f32 values of the same element count, keeping its
    /// shape and dtype (the CPU copies in place, no new allocation).
    fn write_f32(&self, t: &mut Tensor<Self>, data: &[f32]) -> Result<()> {
        let f = self.upload(HostData::F32(data), t.shape())?;
        *t = if t.dtype() == DType::F32 {
            f
        } else {
            self.cast(&f, t.dtype())?
        };
        Ok(())
    }
    /// Copies a u32 tensor back to the host.
    fn to_vec_u32(&self, t: &Tensor<Self>) -> Result<Vec<u32>>;
    /// A tensor of zeros.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;
    /// Makes `w` (`[k, n]`, a weight that many products take as their untransposed right
    /// operand, as inference does) ready for them, in place: the CPU packs it into its
    /// matrix-product panels once instead of once per product. Afterwards `w` is read only
    /// that way or as a whole (`to_vec_f32`), and `write_f32` makes it plain again. Results
    /// are unchanged, bit for bit. The default does nothing.
    fn pack_weight(&self, w: &mut Tensor<Self>) -> Result<()> {
        let _ = w;
        Ok(())
    }

    /// Converts a float tensor to another float dtype (round to nearest even into bf16).
    fn cast(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>>;

    /// `C[M,N] = op(A) · op(B) (+ bias[N])`, where `op(A)` is `A` (`[M,K]`) or, with
    /// `trans_a`, `Aᵀ` of an `A` stored `[K,M]`; likewise `B`. Accumulates in f32; `out` is
    /// C's dtype (a bias, if given, has that dtype too).
    fn matmul(
        &self,
        a: &Tensor<Self>,
        trans_a: bool,
        b: &Tensor<Self>,
        trans_b: bool,
        bias: Option<&Tensor<Self>>,
        out: DType,
    ) -> Result<Tensor<Self>>;
    /// Elementwise `a + b` (residual connections, gradient accumulation).
    fn add(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// `a += b` elementwise; the CPU adds in place (gradient accumulation into a buffer the
    /// size of the vocabulary table would otherwise allocate a third one).
    fn add_assign(&self, a: &mut Tensor<Self>, b: &Tensor<Self>) -> Result<()> {
        *a = self.add(a, b)?;
        Ok(())
    }
    /// Column sums of a `[rows, cols]` matrix, f32 `[cols]` (bias gradients).
    fn sum_rows(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Row-wise LayerNorm `(x - mean) · rstd · gamma + beta`, biased variance.
    fn layernorm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        eps: f32,
    ) -> Result<LayerNormOut<Self>>;
    /// Inference's residual block end: `LayerNorm(a + b)`, no statistics kept. The default
    /// composes [`Backend::add`] and [`Backend::layernorm`] (the reference); CUDA fuses it
    /// into one pass that also skips rounding the sum to bf16.
    fn add_layernorm(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        eps: f32,
    ) -> Result<Tensor<Self>> {
        Ok(self.layernorm(&self.add(a, b)?, gamma, beta, eps)?.y)
    }

    /// Inference's embedding layer: `LayerNorm(word[ids] + position[positions] + type0)`
    /// (`type0` `[1, D]`, every token type 0). The default composes gathers, adds and
    /// [`Backend::layernorm`] (the reference); CUDA fuses it into one kernel.
    #[allow(clippy::too_many_arguments)]
    fn embed_layernorm(
        &self,
        word: &Tensor<Self>,
        position: &Tensor<Self>,
        type0: &Tensor<Self>,
        ids: &Tensor<Self>,
        positions: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        eps: f32,
    ) -> Result<Tensor<Self>> {
        let n = ids.numel();
        let zeros = self.upload(HostData::U32(&vec![0; n]), &[n])?;
        let x = self.add(
            &self.embedding(word, ids)?,
            &self.embedding(position, positions)?,
        )?;
        let x = self.add(&x, &self.embedding(type0, &zeros)?)?;
        Ok(self.layernorm(&x, gamma, beta, eps)?.y)
    }

    /// One AdamW step in place: parameters `p[p_at ..]` (f32) from the elements `range` of
    /// the gradient `g` (times `s.grad_scale`) and moments `m`, `v` (f32, `g`'s shape). With
    /// flat master and moment arenas `p_at == range.start` and one call covers a run of
    /// tensors sharing a weight decay; with a model's own f32 tensor as the master,
    /// `p_at == 0` and `range` is its slot. The default runs [`adamw_host`] through host
    /// copies; the CPU runs it in place and CUDA in a kernel of the same arithmetic.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        p: &mut Tensor<Self>,
        p_at: usize,
        g: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        range: std::ops::Range<usize>,
        s: &AdamWStep,
    ) -> Result<()> {
        check_adamw(p, p_at, g, m, v, &range)?;
        let (mut pv, gv, mut mv, mut vv) = (
            self.to_vec_f32(p)?,
            self.to_vec_f32(g)?,
            self.to_vec_f32(m)?,
            self.to_vec_f32(v)?,
        );
        let n = range.len();
        adamw_host(
            &mut pv[p_at..p_at + n],
            &gv[range.clone()],
            &mut mv[range.clone()],
            &mut vv[range],
            s,
        );
        self.write_f32(p, &pv)?;
        self.write_f32(m, &mv)?;
        self.write_f32(v, &vv)
    }

    /// Sets every element of a float tensor to zero in place (a buffer reused every step:
    /// a fresh one costs page faults on the CPU and an allocation on the device).
    fn zero(&self, t: &mut Tensor<Self>) -> Result<()> {
        let n = t.numel();
        self.write_f32(t, &vec![0.0; n])
    }

    /// `dst[offset..offset + src.numel()] += src` on a flat f32 `dst` (a parameter's
    /// gradient into the gradient arena). The default goes through host copies.
    fn add_at(&self, dst: &mut Tensor<Self>, offset: usize, src: &Tensor<Self>) -> Result<()> {
        check_at("add_at", dst, offset, src)?;
        let mut d = self.to_vec_f32(dst)?;
        for (a, b) in d[offset..].iter_mut().zip(self.to_vec_f32(src)?) {
            *a += b;
        }
        self.write_f32(dst, &d)
    }

    /// `dst = src[offset..offset + dst.numel()]` in `dst`'s dtype, from a flat f32 `src`
    /// (a compute copy refreshed from the master arena). The default goes through host
    /// copies.
    fn read_at(&self, src: &Tensor<Self>, offset: usize, dst: &mut Tensor<Self>) -> Result<()> {
        check_at("read_at", src, offset, dst)?;
        let s = self.to_vec_f32(src)?;
        self.write_f32(dst, &s[offset..offset + dst.numel()])
    }

    /// `Σ x²` of a float tensor in f64 (gradient-norm clipping), summed in a fixed order.
    fn sum_squares(&self, x: &Tensor<Self>) -> Result<f64> {
        Ok(sum_squares_host(&self.to_vec_f32(x)?))
    }

    /// LayerNorm backward from the saved statistics.
    fn layernorm_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
    ) -> Result<LayerNormGrads<Self>>;

    /// Exact GELU, `x · Φ(x)` with the error function (not the tanh approximation).
    fn gelu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// GELU backward: `dy · (Φ(x) + x·φ(x))`.
    fn gelu_backward(&self, dy: &Tensor<Self>, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// `max(x, 0)`.
    fn relu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// ReLU backward: `dy` where `x > 0`, else 0.
    fn relu_backward(&self, dy: &Tensor<Self>, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Row gather: `out[i] = table[ids[i]]`, `table` `[V, D]`, `ids` u32 `[n]`.
    fn embedding(&self, table: &Tensor<Self>, ids: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// Scatter-add of row gradients into a zero f32 `[vocab, D]` table.
    fn embedding_backward(
        &self,
        dy: &Tensor<Self>,
        ids: &Tensor<Self>,
        vocab: usize,
    ) -> Result<Tensor<Self>>;
    /// Scatter-add of row gradients into an f32 `[vocab, D]` table stored at
    /// `grad[offset..offset + vocab·D]`: a gradient that already holds rows (a table used
    /// twice on one tape), or the word-embedding slot of the gradient arena, so no
    /// vocabulary-sized buffer is made per lookup. The default adds a fresh
    /// [`Backend::embedding_backward`].
    fn embedding_backward_at(
        &self,
        dy: &Tensor<Self>,
        ids: &Tensor<Self>,
        grad: &mut Tensor<Self>,
        offset: usize,
        vocab: usize,
    ) -> Result<()> {
        let fresh = self.embedding_backward(dy, ids, vocab)?;
        self.add_at(grad, offset, &fresh)
    }

    /// `t[offset..offset + len] = 0` on a flat f32 tensor. The default goes through host
    /// copies.
    fn zero_at(&self, t: &mut Tensor<Self>, offset: usize, len: usize) -> Result<()> {
        check_dtype("zero_at", "arena", t, DType::F32)?;
        check_range("zero_at", t, &(offset..offset + len))?;
        let mut d = self.to_vec_f32(t)?;
        d[offset..offset + len].fill(0.0);
        self.write_f32(t, &d)
    }

    /// A host copy of the u32 `ids` where that costs no device round trip (the host
    /// backend), else `None`: the gradient arena then remembers which embedding rows a step
    /// wrote and zeroes only those, so a step pages in only the rows it touches.
    fn ids_on_host(&self, _ids: &Tensor<Self>) -> Option<Vec<u32>> {
        None
    }

    /// Zeroes rows `rows` of the f32 table `width` values wide stored at `t[offset..]`
    /// (the rows [`Backend::ids_on_host`] reported). The default goes through host copies.
    fn zero_rows_at(
        &self,
        t: &mut Tensor<Self>,
        offset: usize,
        width: usize,
        rows: &[u32],
    ) -> Result<()> {
        check_dtype("zero_rows_at", "arena", t, DType::F32)?;
        let mut d = self.to_vec_f32(t)?;
        for &r in rows {
            let at = offset + r as usize * width;
            check_range("zero_rows_at", t, &(at..at + width))?;
            d[at..at + width].fill(0.0);
        }
        self.write_f32(t, &d)
    }

    /// Row-wise `x / max(‖x‖₂, eps)` (torch's `F.normalize`); returns the output and the
    /// f32 row norms `[rows]`.
    fn l2_normalize(&self, x: &Tensor<Self>, eps: f32) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// L2-normalise backward from the output `y` and the saved norms.
    fn l2_normalize_backward(
        &self,
        dy: &Tensor<Self>,
        y: &Tensor<Self>,
        norms: &Tensor<Self>,
        eps: f32,
    ) -> Result<Tensor<Self>>;

    /// Multi-head attention over a packed batch: `q`, `k`, `v` are `[T, heads·head_dim]`
    /// (head `h` in columns `h·head_dim..`), sequence `i` is rows `cu_seqlens[i] ..
    /// cu_seqlens[i+1]` of `seqs`, and each row attends to every row of its own sequence
    /// (non-causal): `out = softmax(scale · Q Kᵀ) V`. Returns `out` (q's dtype) and the f32
    /// log-sum-exp of the scaled scores, `[T, heads]`, for the backward pass.
    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        seqs: &Seqs<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// Attention backward from the saved output and log-sum-exp: `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        out: &Tensor<Self>,
        lse: &Tensor<Self>,
        seqs: &Seqs<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)>;

    /// Row-wise softmax cross-entropy against a target column: `loss[r] = lse[r] -
    /// logits[r, targets[r]]`. Returns f32 `loss` and `lse`, both `[rows]`.
    fn softmax_cross_entropy(
        &self,
        logits: &Tensor<Self>,
        targets: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// `dlogits[r,c] = dloss[r] · (softmax[r,c] - [c == targets[r]])`, logits' dtype.
    fn softmax_cross_entropy_backward(
        &self,
        dloss: &Tensor<Self>,
        logits: &Tensor<Self>,
        lse: &Tensor<Self>,
        targets: &Tensor<Self>,
    ) -> Result<Tensor<Self>>;

    /// `y = c · x`.
    fn scale(&self, x: &Tensor<Self>, c: f32) -> Result<Tensor<Self>>;
    /// Inverted dropout with a counter-based mask: element `i` is kept (and scaled by
    /// `1/(1-p)`) unless [`dropout_keep`]`(seed, i, p)` says 0. The mask is a pure function of
    /// `(seed, i)`, identical on every backend and in both passes of a sub-batch, and the
    /// backward pass is the same op applied to the gradient.
    fn dropout(&self, x: &Tensor<Self>, p: f32, seed: u64) -> Result<Tensor<Self>>;
    /// The sum of all elements, f32 `[1]`.
    fn sum_all(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// A tensor of `shape` with every element `value`.
    fn fill(&self, shape: &[usize], value: f32, dtype: DType) -> Result<Tensor<Self>>;
    /// A tensor of `shape` and `dtype` with every element the f32 scalar `value` (one
    /// element), made where `value` lives, without reading it back to the host (a sum's
    /// backward). The default gathers `value`'s one row once per element.
    fn broadcast(
        &self,
        value: Tensor<Self>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        check_dtype("broadcast", "value", &value, DType::F32)?;
        let n: usize = shape.iter().product();
        let row0 = self.upload(HostData::U32(&vec![0; n]), &[n])?;
        let y = self
            .embedding(&value.reshape(&[1, 1])?, &row0)?
            .reshape(shape)?;
        if dtype == DType::F32 {
            Ok(y)
        } else {
            self.cast(&y, dtype)
        }
    }

    /// Row-wise cross-entropy against soft targets: `loss[r] = -Σ_c t[r,c] ·
    /// log_softmax(logits)[r,c]` (f32 `[rows]`), with the f32 log-sum-exp `[rows]` saved.
    /// `targets` is f32 `[rows, cols]` (a detached teacher distribution).
    fn soft_cross_entropy(
        &self,
        logits: &Tensor<Self>,
        targets: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// `dlogits[r,c] = dloss[r] · (softmax[r,c] · Σ_c t[r,c] - t[r,c])`.
    fn soft_cross_entropy_backward(
        &self,
        dloss: &Tensor<Self>,
        logits: &Tensor<Self>,
        lse: &Tensor<Self>,
        targets: &Tensor<Self>,
    ) -> Result<Tensor<Self>>;

    /// Late-interaction (colbert) scores of every query against every passage, both packed:
    /// `s[b,n] = (1/L_b) Σ_{i in query b} max_{j in passage n} <q_i, p_j>` (0 where either
    /// side is empty), f32 `[B_q, B_p]`; also the arg-max row `j` per (query row, passage),
    /// u32 `[T_q, B_p]`, for the backward pass.
    fn maxsim(
        &self,
        q: &Tensor<Self>,
        q_cu: &[u32],
        p: &Tensor<Self>,
        p_cu: &[u32],
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
    /// Max-sim backward through the saved arg-max: `(dq, dp)`.
    fn maxsim_backward(
        &self,
        ds: &Tensor<Self>,
        q: &Tensor<Self>,
        q_cu: &[u32],
        p: &Tensor<Self>,
        p_cu: &[u32],
        argmax: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// Lexical matching scores between packed sequences from per-token weights (SPEC §5):
    /// each sequence's weight for a token id is the max over its occurrences, tokens in
    /// `excluded` (CLS, EOS, PAD, UNK) count 0, and `s[b,n] = Σ_t w_b(t) · w_n(t)`, f32
    /// `[B_q, B_p]`. Scatter-max by id: memory O(tokens), never batch × vocabulary.
    fn lexical_scores(
        &self,
        q: &LexicalSide<'_, Self>,
        p: &LexicalSide<'_, Self>,
    ) -> Result<Tensor<Self>>;
    /// Lexical-score backward, each token id's gradient routed to its arg-max occurrence:
    /// `(dw_q, dw_p)`, f32 `[T]` each.
    fn lexical_scores_backward(
        &self,
        ds: &Tensor<Self>,
        q: &LexicalSide<'_, Self>,
        p: &LexicalSide<'_, Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;
}

/// One side (queries or passages) of a lexical score: token weights on the device and the
/// ids and sequence offsets on the host.
pub struct LexicalSide<'a, B: Backend> {
    /// Token weights, f32 `[T]` (after ReLU).
    pub weights: &'a Tensor<B>,
    /// Token ids `[T]`.
    pub ids: &'a [u32],
    /// Sequence offsets `[B + 1]`.
    pub cu: &'a [u32],
    /// Ids whose weight counts as 0.
    pub excluded: &'a [u32],
}

/// `range` lies within the elements of `t`.
pub(crate) fn check_range<B: Backend>(
    op: &'static str,
    t: &Tensor<B>,
    range: &std::ops::Range<usize>,
) -> Result<()> {
    if range.start > range.end || range.end > t.numel() {
        return shape_err(
            op,
            format!("range {range:?} outside a tensor of {} elements", t.numel()),
        );
    }
    Ok(())
}

/// The operands of [`Backend::adamw`] fit: `p`, `m`, `v` f32, `m` and `v` of `g`'s shape,
/// `range` within `g`, and `p[p_at..]` as long as `range`.
pub(crate) fn check_adamw<B: Backend>(
    p: &Tensor<B>,
    p_at: usize,
    g: &Tensor<B>,
    m: &Tensor<B>,
    v: &Tensor<B>,
    range: &std::ops::Range<usize>,
) -> Result<()> {
    const OP: &str = "adamw";
    for (name, t) in [("p", p), ("m", m), ("v", v)] {
        check_dtype(OP, name, t, DType::F32)?;
    }
    check_float(OP, "g", g)?;
    for (name, t) in [("m", m), ("v", v)] {
        if t.shape() != g.shape() {
            return shape_err(
                OP,
                format!("{name} is {:?} but g is {:?}", t.shape(), g.shape()),
            );
        }
    }
    check_range(OP, g, range)?;
    check_range(OP, p, &(p_at..p_at + range.len()))
}

/// `flat` is f32 and its elements `offset..offset + part.numel()` exist; `part` is float.
pub(crate) fn check_at<B: Backend>(
    op: &'static str,
    flat: &Tensor<B>,
    offset: usize,
    part: &Tensor<B>,
) -> Result<()> {
    check_dtype(op, "arena", flat, DType::F32)?;
    check_float(op, "part", part)?;
    check_range(op, flat, &(offset..offset + part.numel()))
}

/// The operands of [`Backend::embedding_backward_at`] fit: `dy` float `[n, dim]`, `ids` u32
/// `[n]`, and a `[vocab, dim]` f32 table at `offset` within `grad`. Returns `(n, dim)`; the
/// ids' range is checked by the backend, where they live.
pub(crate) fn check_embedding_backward_at<B: Backend>(
    dy: &Tensor<B>,
    ids: &Tensor<B>,
    grad: &Tensor<B>,
    offset: usize,
    vocab: usize,
) -> Result<(usize, usize)> {
    const OP: &str = "embedding_backward";
    check_float(OP, "dy", dy)?;
    check_dtype(OP, "ids", ids, DType::U32)?;
    check_dtype(OP, "gradient", grad, DType::F32)?;
    let (n, dim) = dy.rows_cols();
    check_vec(OP, "ids", ids, n)?;
    check_range(OP, grad, &(offset..offset + vocab * dim))?;
    Ok((n, dim))
}

/// Requires a float tensor (f32 or bf16).
pub(crate) fn check_float<B: Backend>(op: &'static str, name: &str, t: &Tensor<B>) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        dtype_err(op, format!("{name} must be f32 or bf16, got {}", t.dtype()))
    }
}

/// Requires a tensor of an exact dtype.
pub(crate) fn check_dtype<B: Backend>(
    op: &'static str,
    name: &str,
    t: &Tensor<B>,
    want: DType,
) -> Result<()> {
    if t.dtype() == want {
        Ok(())
    } else {
        dtype_err(op, format!("{name} must be {want}, got {}", t.dtype()))
    }
}

/// Requires two tensors of equal shape and dtype.
pub(crate) fn check_same<B: Backend>(
    op: &'static str,
    (na, a): (&str, &Tensor<B>),
    (nb, b): (&str, &Tensor<B>),
) -> Result<()> {
    if a.shape() != b.shape() {
        return shape_err(
            op,
            format!("{na} is {:?} but {nb} is {:?}", a.shape(), b.shape()),
        );
    }
    if a.dtype() != b.dtype() {
        return dtype_err(
            op,
            format!("{na} is {} but {nb} is {}", a.dtype(), b.dtype()),
        );
    }
    Ok(())
}

/// Requires a 1-D tensor of the given length.
pub(crate) fn check_vec<B: Backend>(
    op: &'static str,
    name: &str,
    t: &Tensor<B>,
    len: usize,
) -> Result<()> {
    if t.shape() == [len] {
        Ok(())
    } else {
        shape_err(op, format!("{name} must be [{len}], got {:?}", t.shape()))
    }
}

/// Validated matmul dimensions `(m, k, n)`.
pub(crate) fn matmul_dims<B: Backend>(
    a: &Tensor<B>,
    trans_a: bool,
    b: &Tensor<B>,
    trans_b: bool,
    bias: Option<&Tensor<B>>,
    out: DType,
) -> Result<(usize, usize, usize)> {
    const OP: &str = "matmul";
    check_float(OP, "A", a)?;
    if a.dtype() != b.dtype() {
        return dtype_err(OP, format!("A is {} but B is {}", a.dtype(), b.dtype()));
    }
    if !out.is_float() {
        return dtype_err(OP, format!("output dtype must be f32 or bf16, got {out}"));
    }
    let (Some(&[a0, a1]), Some(&[b0, b1])) = (
        Some(a.shape()).filter(|s| s.len() == 2),
        Some(b.shape()).filter(|s| s.len() == 2),
    ) else {
        return shape_err(
            OP,
            format!(
                "A and B must be 2-D, got {:?} and {:?}",
                a.shape(),
                b.shape()
            ),
        );
    };
    let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    if k != kb {
        return shape_err(
            OP,
            format!(
                "inner dimensions differ: op(A) is [{m}, {k}] (A {:?}, trans {trans_a}), op(B) is [{kb}, {n}] (B {:?}, trans {trans_b})",
                a.shape(),
                b.shape()
            ),
        );
    }
    if let Some(bias) = bias {
        check_vec(OP, "bias", bias, n)?;
        check_dtype(OP, "bias", bias, out)?;
    }
    Ok((m, k, n))
}

/// Validated LayerNorm dimensions `(rows, cols)`.
pub(crate) fn layernorm_dims<B: Backend>(
    x: &Tensor<B>,
    gamma: &Tensor<B>,
    beta: &Tensor<B>,
) -> Result<(usize, usize)> {
    const OP: &str = "layernorm";
    check_float(OP, "x", x)?;
    let (rows, cols) = x.rows_cols();
    check_vec(OP, "gamma", gamma, cols)?;
    check_vec(OP, "beta", beta, cols)?;
    check_dtype(OP, "gamma", gamma, x.dtype())?;
    check_dtype(OP, "beta", beta, x.dtype())?;
    Ok((rows, cols))
}

/// Validated LayerNorm-backward dimensions `(rows, cols)`.
pub(crate) fn layernorm_backward_dims<B: Backend>(
    dy: &Tensor<B>,
    x: &Tensor<B>,
    gamma: &Tensor<B>,
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
) -> Result<(usize, usize)> {
    const OP: &str = "layernorm_backward";
    check_float(OP, "x", x)?;
    check_same(OP, ("dy", dy), ("x", x))?;
    let (rows, cols) = x.rows_cols();
    check_vec(OP, "gamma", gamma, cols)?;
    check_dtype(OP, "gamma", gamma, x.dtype())?;
    check_vec(OP, "mean", mean, rows)?;
    check_vec(OP, "rstd", rstd, rows)?;
    check_dtype(OP, "mean", mean, DType::F32)?;
    check_dtype(OP, "rstd", rstd, DType::F32)?;
    Ok((rows, cols))
}

/// Validated embedding dimensions `(vocab, dim, n_ids)`.
pub(crate) fn embedding_dims<B: Backend>(
    table: &Tensor<B>,
    ids: &Tensor<B>,
) -> Result<(usize, usize, usize)> {
    const OP: &str = "embedding";
    check_float(OP, "table", table)?;
    check_dtype(OP, "ids", ids, DType::U32)?;
    if table.shape().len() != 2 || ids.shape().len() != 1 {
        return shape_err(
            OP,
            format!(
                "table must be [vocab, dim] and ids [n], got {:?} and {:?}",
                table.shape(),
                ids.shape()
            ),
        );
    }
    Ok((table.shape()[0], table.shape()[1], ids.shape()[0]))
}

/// Validated softmax-cross-entropy dimensions `(rows, cols)`.
pub(crate) fn cross_entropy_dims<B: Backend>(
    logits: &Tensor<B>,
    targets: &Tensor<B>,
) -> Result<(usize, usize)> {
    const OP: &str = "softmax_cross_entropy";
    check_float(OP, "logits", logits)?;
    check_dtype(OP, "targets", targets, DType::U32)?;
    if logits.shape().len() != 2 {
        return shape_err(
            OP,
            format!("logits must be [rows, cols], got {:?}", logits.shape()),
        );
    }
    let (rows, cols) = logits.rows_cols();
    check_vec(OP, "targets", targets, rows)?;
    if cols == 0 {
        return shape_err(OP, "logits have no columns");
    }
    Ok((rows, cols))
}

/// Checks host-side ids against the vocabulary (both backends validate before launching).
pub(crate) fn check_ids(op: &'static str, ids: &[u32], limit: usize) -> Result<()> {
    match ids.iter().position(|&i| i as usize >= limit) {
        None => Ok(()),
        Some(p) => Err(Error::Index {
            op,
            detail: format!("id {} at position {p} is not below {limit}", ids[p]),
        }),
    }
}

/// Validated attention geometry `(tokens, hidden, head_dim)`: q, k, v share shape
/// `[T, hidden]` and dtype, `hidden` splits into `heads`, and the sequences cover the T
/// rows (that they rise from 0 [`Seqs::new`] has checked).
pub(crate) fn attention_dims<B: Backend>(
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    seqs: &Seqs<B>,
    heads: usize,
) -> Result<(usize, usize, usize)> {
    const OP: &str = "attention";
    check_float(OP, "q", q)?;
    check_same(OP, ("q", q), ("k", k))?;
    check_same(OP, ("q", q), ("v", v))?;
    if q.shape().len() != 2 {
        return shape_err(
            OP,
            format!("q must be [tokens, hidden], got {:?}", q.shape()),
        );
    }
    let (t, hidden) = (q.shape()[0], q.shape()[1]);
    if heads == 0 || hidden % heads != 0 {
        return shape_err(
            OP,
            format!("hidden {hidden} does not split into {heads} heads"),
        );
    }
    if seqs.tokens() != t {
        return shape_err(
            OP,
            format!(
                "cu_seqlens must rise from 0 to {t} tokens, got {:?}",
                seqs.cu_seqlens()
            ),
        );
    }
    Ok((t, hidden, hidden / heads))
}

/// Checks packed offsets: rising from 0 to `rows`.
fn check_cu(op: &'static str, name: &str, cu: &[u32], rows: usize) -> Result<()> {
    let ok = cu.first() == Some(&0)
        && cu.last().map(|&x| x as usize) == Some(rows)
        && cu.windows(2).all(|w| w[0] <= w[1]);
    if ok {
        Ok(())
    } else {
        shape_err(
            op,
            format!("{name} must rise from 0 to {rows} rows, got {cu:?}"),
        )
    }
}

/// Validated max-sim geometry `(query rows, dim)`.
pub(crate) fn maxsim_dims<B: Backend>(
    q: &Tensor<B>,
    q_cu: &[u32],
    p: &Tensor<B>,
    p_cu: &[u32],
) -> Result<(usize, usize)> {
    const OP: &str = "maxsim";
    check_float(OP, "q", q)?;
    if q.shape().len() != 2
        || p.shape().len() != 2
        || q.shape()[1] != p.shape()[1]
        || q.dtype() != p.dtype()
    {
        return shape_err(
            OP,
            format!(
                "q and p must be [rows, dim] of one dim and dtype, got {:?} {} and {:?} {}",
                q.shape(),
                q.dtype(),
                p.shape(),
                p.dtype()
            ),
        );
    }
    check_cu(OP, "q_cu", q_cu, q.shape()[0])?;
    check_cu(OP, "p_cu", p_cu, p.shape()[0])?;
    Ok((q.shape()[0], q.shape()[1]))
}

/// Validates one lexical side: float weights `[T]` (the CPU reference takes f32 only),
/// ids `[T]`, offsets over T.
pub(crate) fn check_lexical_side<B: Backend>(w: &Tensor<B>, ids: &[u32], cu: &[u32]) -> Result<()> {
    const OP: &str = "lexical_scores";
    check_float(OP, "weights", w)?;
    check_vec(OP, "weights", w, ids.len())?;
    check_cu(OP, "cu", cu, ids.len())
}

/// The scalars of one AdamW step (PyTorch's `torch.optim.AdamW`, see `train::optim`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Multiplier on every gradient element (the clipping factor).
    pub grad_scale: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// `lr / (1 - β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - β2^t)`.
    pub bc2_sqrt: f32,
    /// `lr · weight_decay`, or 0 where the parameter gets no decay.
    pub decay: f32,
}

/// The AdamW update on host slices, the reference every backend's `adamw` matches:
/// `p *= 1 - decay`, moments updated with the scaled gradient, then
/// `p -= step_size · m / (sqrt(v) / bc2_sqrt + eps)`.
pub fn adamw_host(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    assert!(p.len() == g.len() && g.len() == m.len() && g.len() == v.len());
    for i in 0..p.len() {
        let gi = if s.grad_scale == 1.0 {
            g[i]
        } else {
            g[i] * s.grad_scale
        };
        p[i] *= 1.0 - s.decay;
        m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
        v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
        let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
        p[i] -= s.step_size * m[i] / denom;
    }
}

/// `Σ x²` in f64 over chunks of 65536 summed in order (what every backend reproduces).
pub fn sum_squares_host(x: &[f32]) -> f64 {
    x.chunks(1 << 16)
        .map(|c| c.iter().map(|&e| e as f64 * e as f64).sum::<f64>())
        .sum()
}

/// The seed whose mask equals `seed`'s mask shifted by `offset` elements:
/// `dropout_keep(dropout_seed_at(s, o), i, p) == dropout_keep(s, o + i, p)`. A sub-batch
/// starting `o` elements into a batch draws the same mask as the whole batch would.
pub fn dropout_seed_at(seed: u64, offset: u64) -> u64 {
    seed.wrapping_add(offset.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The dropout multiplier of element `i` under `seed`: 0 with probability `p`, else
/// `1/(1-p)`. SplitMix64 of `seed + (i+1)·φ`, top 24 bits as a uniform in [0, 1); the CUDA
/// kernel computes the same bits, so masks agree exactly across backends.
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> f32 {
    let mut z = seed.wrapping_add((i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u32 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

impl<B: Backend> Tensor<B> {
    /// A device copy of a u32 tensor (ids are small; ops that keep ids own a copy).
    pub fn clone_ids(&self, be: &B) -> Result<Self> {
        let v = be.to_vec_u32(self)?;
        be.upload(HostData::U32(&v), self.shape())
    }
}
