//! The autograd tape: a Wengert list of coarse ops, each keeping what its backward needs.
//!
//! Values are indices into the tape ([`Var`]). Recording an op computes its forward on the
//! backend right away and stores the result plus the saved state (LayerNorm's mean/rstd,
//! the log-sum-exp of a cross-entropy, ...). [`Tape::backward`] walks the list in reverse.
//! [`Op`] is matched without a wildcard, so adding an op without its backward does not
//! compile. Inference calls the backend directly and never builds a tape.

use std::sync::Arc;

use crate::backend::{Backend, LexicalSide, Seqs};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, Tensor};

/// A value recorded on a tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Var(usize);

impl Var {
    /// Position on the tape.
    pub fn index(self) -> usize {
        self.0
    }

    /// The value at position `i` of a tape (inputs recorded first are 0, 1, ...).
    pub fn from_index(i: usize) -> Self {
        Var(i)
    }
}

/// A recorded operation and the state its backward needs.
enum Op<B: Backend> {
    /// A value fed in from outside: a parameter (carries a gradient) or an input (does not).
    Leaf,
    /// `op(a) · op(b) (+ bias)`.
    Matmul {
        a: Var,
        trans_a: bool,
        b: Var,
        trans_b: bool,
        bias: Option<Var>,
    },
    /// `a + b`.
    Add { a: Var, b: Var },
    /// Row-wise LayerNorm with its saved statistics.
    LayerNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        mean: Tensor<B>,
        rstd: Tensor<B>,
    },
    /// Exact GELU.
    Gelu { x: Var },
    /// ReLU.
    Relu { x: Var },
    /// Row gather from a table by u32 ids.
    Embedding {
        table: Var,
        ids: Tensor<B>,
        vocab: usize,
    },
    /// Row-wise L2 normalisation with the saved norms.
    L2Normalize { x: Var, norms: Tensor<B>, eps: f32 },
    /// Multi-head attention over a packed batch with the saved log-sum-exp.
    Attention {
        q: Var,
        k: Var,
        v: Var,
        seqs: Arc<Seqs<B>>,
        heads: usize,
        scale: f32,
        lse: Tensor<B>,
    },
    /// `c · x`.
    Scale { x: Var, c: f32 },
    /// The same elements under another shape.
    Reshape { x: Var },
    /// A copy in another float dtype (the gradient is cast back).
    Cast { x: Var },
    /// Inverted dropout with a counter-based mask (recomputed, not stored).
    Dropout { x: Var, p: f32, seed: u64 },
    /// Sum of all elements.
    SumAll { x: Var },
    /// Cross-entropy against soft (detached) targets, with the saved log-sum-exp.
    SoftCrossEntropy {
        logits: Var,
        targets: Tensor<B>,
        lse: Tensor<B>,
    },
    /// Colbert max-sim scores with the saved arg-max rows.
    MaxSim {
        q: Var,
        q_cu: Vec<u32>,
        p: Var,
        p_cu: Vec<u32>,
        argmax: Tensor<B>,
    },
    /// Lexical scatter-max scores (ids and offsets kept on the host).
    Lexical {
        q: Var,
        q_ids: Vec<u32>,
        q_cu: Vec<u32>,
        p: Var,
        p_ids: Vec<u32>,
        p_cu: Vec<u32>,
        excluded: Vec<u32>,
    },
    /// Per-row softmax cross-entropy with the saved log-sum-exp.
    SoftmaxCrossEntropy {
        logits: Var,
        targets: Tensor<B>,
        lse: Tensor<B>,
    },
}

/// A tape value: owned (computed on the tape, or an input) or borrowed (a parameter the
/// model keeps, so recording it copies nothing).
enum Value<'a, B: Backend> {
    Owned(Tensor<B>),
    Borrowed(&'a Tensor<B>),
}

impl<B: Backend> Value<'_, B> {
    fn get(&self) -> &Tensor<B> {
        match self {
            Value::Owned(t) => t,
            Value::Borrowed(t) => t,
        }
    }
}

struct Node<'a, B: Backend> {
    value: Value<'a, B>,
    op: Op<B>,
    needs_grad: bool,
    /// For a leaf: the earliest node that reads it. Walking backward, its gradient is
    /// complete once that node is processed, and can be handed off (into the gradient
    /// arena) without waiting for the end of the walk.
    first_use: usize,
}

/// A weight's gradient handed to the sink of [`Tape::backward_seeds_into`].
pub enum LeafGrad<'a, B: Backend> {
    /// The whole gradient, the weight's shape, f32.
    Dense(Tensor<B>),
    /// Row gradients of an embedding lookup: add row `r` of `dy` to row `ids[r]` of the
    /// `[vocab, D]` table's gradient (the lookup may be one of several reading the table).
    Rows {
        /// `[n, D]` gradients of the looked-up rows.
        dy: &'a Tensor<B>,
        /// `[n]` u32 rows of the table.
        ids: &'a Tensor<B>,
        /// Rows of the table.
        vocab: usize,
    },
}

/// Gradients produced by [`Tape::backward`], indexed by [`Var`].
pub struct Grads<B: Backend> {
    grads: Vec<Option<Tensor<B>>>,
}

impl<B: Backend> Grads<B> {
    /// The gradient of the root with respect to `v`, if `v` needs one and the root depends
    /// on it.
    pub fn get(&self, v: Var) -> Option<&Tensor<B>> {
        self.grads.get(v.0).and_then(Option::as_ref)
    }

    /// Takes ownership of the gradient of `v`.
    pub fn take(&mut self, v: Var) -> Option<Tensor<B>> {
        self.grads.get_mut(v.0).and_then(Option::take)
    }

    /// Sets the gradient of `v` (a collective's backward, done outside the tape).
    pub fn put(&mut self, v: Var, g: Tensor<B>) {
        if let Some(slot) = self.grads.get_mut(v.0) {
            *slot = Some(g);
        }
    }
}

/// A tape recording ops on backend `B`; parameters may be borrowed for `'a`.
pub struct Tape<'a, B: Backend> {
    backend: &'a B,
    nodes: Vec<Node<'a, B>>,
}

impl<'a, B: Backend> Tape<'a, B> {
    /// An empty tape on `backend`.
    pub fn new(backend: &'a B) -> Self {
        Tape {
            backend,
            nodes: Vec::new(),
        }
    }

    /// The backend ops run on.
    pub fn backend(&self) -> &'a B {
        self.backend
    }

    /// Number of recorded values.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The value of `v`.
    pub fn value(&self, v: Var) -> &Tensor<B> {
        self.nodes[v.0].value.get()
    }

    /// Records a borrowed parameter: it receives a gradient.
    pub fn param(&mut self, t: &'a Tensor<B>) -> Var {
        self.push(Value::Borrowed(t), Op::Leaf, true)
    }

    /// Records an owned value that receives a gradient (a parameter or an input whose
    /// gradient is wanted, as in the two-pass sub-batch backward).
    pub fn param_owned(&mut self, t: Tensor<B>) -> Var {
        self.push(Value::Owned(t), Op::Leaf, true)
    }

    /// Records an input that needs no gradient.
    pub fn input(&mut self, t: Tensor<B>) -> Var {
        self.push(Value::Owned(t), Op::Leaf, false)
    }

    fn push(&mut self, value: Value<'a, B>, op: Op<B>, needs_grad: bool) -> Var {
        self.nodes.push(Node {
            value,
            op,
            needs_grad,
            first_use: usize::MAX,
        });
        Var(self.nodes.len() - 1)
    }

    /// Whether a node reading `vars` needs a gradient; also notes the node (the next one
    /// pushed) as a reader of each leaf among them.
    fn needs(&mut self, vars: &[Var]) -> bool {
        let next = self.nodes.len();
        for v in vars {
            let n = &mut self.nodes[v.0];
            if matches!(n.op, Op::Leaf) {
                n.first_use = n.first_use.min(next);
            }
        }
        vars.iter().any(|v| self.nodes[v.0].needs_grad)
    }

    /// Records `op(a) · op(b) (+ bias)`; the output has `a`'s dtype.
    pub fn matmul(
        &mut self,
        a: Var,
        trans_a: bool,
        b: Var,
        trans_b: bool,
        bias: Option<Var>,
    ) -> Result<Var> {
        let out_dtype = self.value(a).dtype();
        let y = self.backend.matmul(
            self.value(a),
            trans_a,
            self.value(b),
            trans_b,
            bias.map(|v| self.value(v)),
            out_dtype,
        )?;
        let mut deps = vec![a, b];
        deps.extend(bias);
        let needs = self.needs(&deps);
        Ok(self.push(
            Value::Owned(y),
            Op::Matmul {
                a,
                trans_a,
                b,
                trans_b,
                bias,
            },
            needs,
        ))
    }

    /// Records a linear layer `x · wᵀ + bias` with `w` stored `[out, in]` as in PyTorch.
    pub fn linear(&mut self, x: Var, w: Var, bias: Option<Var>) -> Result<Var> {
        self.matmul(x, false, w, true, bias)
    }

    /// Records `a + b`.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.backend.add(self.value(a), self.value(b))?;
        let needs = self.needs(&[a, b]);
        Ok(self.push(Value::Owned(y), Op::Add { a, b }, needs))
    }

    /// Records a row-wise LayerNorm.
    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        let out =
            self.backend
                .layernorm(self.value(x), self.value(gamma), self.value(beta), eps)?;
        let needs = self.needs(&[x, gamma, beta]);
        Ok(self.push(
            Value::Owned(out.y),
            Op::LayerNorm {
                x,
                gamma,
                beta,
                mean: out.mean,
                rstd: out.rstd,
            },
            needs,
        ))
    }

    /// Records exact GELU.
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        let y = self.backend.gelu(self.value(x))?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::Gelu { x }, needs))
    }

    /// Records ReLU.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let y = self.backend.relu(self.value(x))?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::Relu { x }, needs))
    }

    /// Records a row gather `table[ids]`.
    pub fn embedding(&mut self, table: Var, ids: Tensor<B>) -> Result<Var> {
        let y = self.backend.embedding(self.value(table), &ids)?;
        let vocab = self.value(table).shape()[0];
        let needs = self.needs(&[table]);
        Ok(self.push(Value::Owned(y), Op::Embedding { table, ids, vocab }, needs))
    }

    /// Records row-wise L2 normalisation.
    pub fn l2_normalize(&mut self, x: Var, eps: f32) -> Result<Var> {
        let (y, norms) = self.backend.l2_normalize(self.value(x), eps)?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::L2Normalize { x, norms, eps }, needs))
    }

    /// Records multi-head attention over a packed batch (see [`Backend::attention`]).
    pub fn attention(
        &mut self,
        q: Var,
        k: Var,
        v: Var,
        seqs: &Arc<Seqs<B>>,
        heads: usize,
        scale: f32,
    ) -> Result<Var> {
        let (out, lse) = self.backend.attention(
            self.value(q),
            self.value(k),
            self.value(v),
            seqs,
            heads,
            scale,
        )?;
        let needs = self.needs(&[q, k, v]);
        Ok(self.push(
            Value::Owned(out),
            Op::Attention {
                q,
                k,
                v,
                seqs: Arc::clone(seqs),
                heads,
                scale,
                lse,
            },
            needs,
        ))
    }

    /// Records `c · x`.
    pub fn scale(&mut self, x: Var, c: f32) -> Result<Var> {
        let y = self.backend.scale(self.value(x), c)?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::Scale { x, c }, needs))
    }

    /// Records inverted dropout with drop probability `p` and mask seed `seed`; `p = 0`
    /// records nothing and returns `x`.
    pub fn dropout(&mut self, x: Var, p: f32, seed: u64) -> Result<Var> {
        if p <= 0.0 {
            return Ok(x);
        }
        let y = self.backend.dropout(self.value(x), p, seed)?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::Dropout { x, p, seed }, needs))
    }

    /// Records a reshape (a copy under the new shape; same element count).
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let v = self.value(x);
        let y = self.backend.cast(v, v.dtype())?.reshape(shape)?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::Reshape { x }, needs))
    }

    /// Records `x` converted to `dtype` (bf16 compute feeding an f32 loss); returns `x`
    /// itself when it already has that dtype.
    pub fn cast(&mut self, x: Var, dtype: crate::tensor::DType) -> Result<Var> {
        if self.value(x).dtype() == dtype {
            return Ok(x);
        }
        let y = self.backend.cast(self.value(x), dtype)?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::Cast { x }, needs))
    }

    /// Records the sum of all elements (f32 `[1]`).
    pub fn sum_all(&mut self, x: Var) -> Result<Var> {
        let y = self.backend.sum_all(self.value(x))?;
        let needs = self.needs(&[x]);
        Ok(self.push(Value::Owned(y), Op::SumAll { x }, needs))
    }

    /// Records the per-row cross-entropy of `logits` against soft `targets` (f32, same
    /// shape, no gradient: a detached teacher).
    pub fn soft_cross_entropy(&mut self, logits: Var, targets: Tensor<B>) -> Result<Var> {
        let (loss, lse) = self
            .backend
            .soft_cross_entropy(self.value(logits), &targets)?;
        let needs = self.needs(&[logits]);
        Ok(self.push(
            Value::Owned(loss),
            Op::SoftCrossEntropy {
                logits,
                targets,
                lse,
            },
            needs,
        ))
    }

    /// Records colbert max-sim scores between packed queries and passages.
    pub fn maxsim(&mut self, q: Var, q_cu: &[u32], p: Var, p_cu: &[u32]) -> Result<Var> {
        let (s, argmax) = self
            .backend
            .maxsim(self.value(q), q_cu, self.value(p), p_cu)?;
        let needs = self.needs(&[q, p]);
        Ok(self.push(
            Value::Owned(s),
            Op::MaxSim {
                q,
                q_cu: q_cu.to_vec(),
                p,
                p_cu: p_cu.to_vec(),
                argmax,
            },
            needs,
        ))
    }

    /// Records lexical scatter-max scores from per-token weights `q` and `p` (f32 `[T]`).
    #[allow(clippy::too_many_arguments)]
    pub fn lexical_scores(
        &mut self,
        q: Var,
        q_ids: &[u32],
        q_cu: &[u32],
        p: Var,
        p_ids: &[u32],
        p_cu: &[u32],
        excluded: &[u32],
    ) -> Result<Var> {
        let s = self.backend.lexical_scores(
            &LexicalSide {
                weights: self.value(q),
                ids: q_ids,
                cu: q_cu,
                excluded,
            },
            &LexicalSide {
                weights: self.value(p),
                ids: p_ids,
                cu: p_cu,
                excluded,
            },
        )?;
        let needs = self.needs(&[q, p]);
        Ok(self.push(
            Value::Owned(s),
            Op::Lexical {
                q,
                q_ids: q_ids.to_vec(),
                q_cu: q_cu.to_vec(),
                p,
                p_ids: p_ids.to_vec(),
                p_cu: p_cu.to_vec(),
                excluded: excluded.to_vec(),
            },
            needs,
        ))
    }

    /// Records the per-row softmax cross-entropy of `logits` against `targets` (u32
    /// column per row); the value is the f32 loss per row.
    pub fn softmax_cross_entropy(&mut self, logits: Var, targets: Tensor<B>) -> Result<Var> {
        let (loss, lse) = self
            .backend
            .softmax_cross_entropy(self.value(logits), &targets)?;
        let needs = self.needs(&[logits]);
        Ok(self.push(
            Value::Owned(loss),
            Op::SoftmaxCrossEntropy {
                logits,
                targets,
                lse,
            },
            needs,
        ))
    }

    /// Backward from a single-element `root`, seeded with 1.
    pub fn backward(&self, root: Var) -> Result<Grads<B>> {
        let t = self.value(root);
        if t.numel() != 1 {
            return Err(Error::Autograd(format!(
                "backward needs a single-element root, got {:?}; use backward_with to seed a gradient",
                t.shape()
            )));
        }
        let seed = self
            .backend
            .upload(HostData::F32(&[1.0]), t.shape())
            .and_then(|s| self.backend.cast(&s, t.dtype()))?;
        self.backward_with(root, seed)
    }

    /// Backward from `root` seeded with `seed` (same shape as the root): the gradients of
    /// `Σ seed ⊙ root`. The two-pass sub-batch backward seeds the encoder's outputs this way.
    pub fn backward_with(&self, root: Var, seed: Tensor<B>) -> Result<Grads<B>> {
        self.backward_seeds(vec![(root, seed)])
    }

    /// Backpropagates several seeded roots at once: the gradient of `Σ_k <seed_k, root_k>`
    /// (the second pass of sub-batching seeds each head output with its loss gradient).
    pub fn backward_seeds(&self, seeds: Vec<(Var, Tensor<B>)>) -> Result<Grads<B>> {
        let be = self.backend;
        let mut leaves: Vec<Option<Tensor<B>>> = (0..self.nodes.len()).map(|_| None).collect();
        self.backward_seeds_into(seeds, &mut |v, g| {
            leaves[v.0] = Some(match (leaves[v.0].take(), g) {
                (None, LeafGrad::Dense(g)) => g,
                (None, LeafGrad::Rows { dy, ids, vocab }) => {
                    be.embedding_backward(dy, ids, vocab)?
                }
                (Some(mut prev), LeafGrad::Dense(g)) => {
                    be.add_assign(&mut prev, &g)?;
                    prev
                }
                (Some(mut prev), LeafGrad::Rows { dy, ids, vocab }) => {
                    be.embedding_backward_at(dy, ids, &mut prev, 0, vocab)?;
                    prev
                }
            });
            Ok(())
        })?;
        Ok(Grads { grads: leaves })
    }

    /// As [`Tape::backward_seeds`], but each leaf's gradient goes to `sink` as soon as it
    /// is complete (after the earliest node that reads the leaf is processed), so the
    /// caller can add it into a gradient arena and free it while the walk goes on. The sink
    /// must sum what it is handed: a dense gradient comes once per backward (twice only if
    /// an op read the leaf without noting it), and an embedding table's rows come from
    /// every lookup as that lookup is reached.
    pub fn backward_seeds_into(
        &self,
        seeds: Vec<(Var, Tensor<B>)>,
        sink: &mut dyn FnMut(Var, LeafGrad<'_, B>) -> Result<()>,
    ) -> Result<()> {
        let be = self.backend;
        let mut release: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if matches!(n.op, Op::Leaf) && n.needs_grad && n.first_use < self.nodes.len() {
                release[n.first_use].push(i);
            }
        }
        let mut grads: Vec<Option<Tensor<B>>> = (0..self.nodes.len()).map(|_| None).collect();
        let mut last = 0;
        for (root, seed) in seeds {
            if root.0 >= self.nodes.len() {
                return Err(Error::Autograd(format!("{root:?} is not on this tape")));
            }
            let rv = self.value(root);
            if seed.shape() != rv.shape() {
                return Err(Error::Autograd(format!(
                    "seed gradient is {:?} but the root is {:?}",
                    seed.shape(),
                    rv.shape()
                )));
            }
            grads[root.0] = Some(match grads[root.0].take() {
                Some(mut g) => {
                    be.add_assign(&mut g, &seed)?;
                    g
                }
                None => seed,
            });
            last = last.max(root.0);
        }
        for i in (0..=last).rev() {
            // Node i + 1 was the last reader of these leaves still to be processed.
            if let Some(ls) = release.get(i + 1) {
                for &l in ls {
                    if let Some(g) = grads[l].take() {
                        sink(Var(l), LeafGrad::Dense(g))?;
                    }
                }
            }
            let node = &self.nodes[i];
            if !node.needs_grad {
                continue;
            }
            let Some(g) = grads[i].take() else { continue };
            let val = |v: Var| self.nodes[v.0].value.get();
            // Each arm returns (input, gradient) pairs; accumulation happens below.
            let contribs: Vec<(Var, Tensor<B>)> = match &node.op {
                Op::Leaf => {
                    grads[i] = Some(g);
                    continue;
                }
                Op::Matmul {
                    a,
                    trans_a,
                    b,
                    trans_b,
                    bias,
                } => {
                    let (a, b, ta, tb) = (*a, *b, *trans_a, *trans_b);
                    let mut out = Vec::new();
                    if self.nodes[a.0].needs_grad {
                        let dt = self.grad_dtype(a);
                        let da = if ta {
                            be.matmul(val(b), tb, &g, true, None, dt)?
                        } else {
                            be.matmul(&g, false, val(b), !tb, None, dt)?
                        };
                        out.push((a, da));
                    }
                    if self.nodes[b.0].needs_grad {
                        let dt = self.grad_dtype(b);
                        let db = if tb {
                            be.matmul(&g, true, val(a), ta, None, dt)?
                        } else {
                            be.matmul(val(a), !ta, &g, false, None, dt)?
                        };
                        out.push((b, db));
                    }
                    if let Some(bias) = bias.filter(|v| self.nodes[v.0].needs_grad) {
                        out.push((bias, be.sum_rows(&g)?));
                    }
                    out
                }
                Op::Add { a, b } => {
                    match (self.nodes[a.0].needs_grad, self.nodes[b.0].needs_grad) {
                        (true, true) => vec![(*a, clone_tensor(be, &g)?), (*b, g)],
                        (true, false) => vec![(*a, g)],
                        (false, _) => vec![(*b, g)],
                    }
                }
                Op::LayerNorm {
                    x,
                    gamma,
                    beta,
                    mean,
                    rstd,
                } => {
                    let r = be.layernorm_backward(&g, val(*x), val(*gamma), mean, rstd)?;
                    vec![(*x, r.dx), (*gamma, r.dgamma), (*beta, r.dbeta)]
                }
                Op::Gelu { x } => vec![(*x, be.gelu_backward(&g, val(*x))?)],
                Op::Relu { x } => vec![(*x, be.relu_backward(&g, val(*x))?)],
                Op::Embedding { table, ids, vocab } => {
                    // A weight table's rows go to the sink as they are (it scatters them
                    // into its own buffer, no vocabulary-sized tensor per lookup). A table
                    // already holding a gradient takes the rows in place. The scatter is
                    // f32, right for parameters; a gather from a bf16 activation (the heads'
                    // CLS and colbert rows under bf16 compute) gets its gradient back in
                    // bf16, as every other op on that path does.
                    if matches!(self.nodes[table.0].op, Op::Leaf) {
                        if self.nodes[table.0].needs_grad {
                            let vocab = *vocab;
                            sink(*table, LeafGrad::Rows { dy: &g, ids, vocab })?;
                        }
                        continue;
                    }
                    let want = self.grad_dtype(*table);
                    match grads[table.0].as_mut() {
                        Some(prev) if prev.dtype() == DType::F32 && want == DType::F32 => {
                            be.embedding_backward_at(&g, ids, prev, 0, *vocab)?;
                            Vec::new()
                        }
                        _ => {
                            let d = be.embedding_backward(&g, ids, *vocab)?;
                            let d = if d.dtype() == want {
                                d
                            } else {
                                be.cast(&d, want)?
                            };
                            vec![(*table, d)]
                        }
                    }
                }
                Op::L2Normalize { x, norms, eps } => {
                    vec![(
                        *x,
                        be.l2_normalize_backward(&g, node.value.get(), norms, *eps)?,
                    )]
                }
                Op::Attention {
                    q,
                    k,
                    v,
                    seqs,
                    heads,
                    scale,
                    lse,
                } => {
                    let (dq, dk, dv) = be.attention_backward(
                        &g,
                        val(*q),
                        val(*k),
                        val(*v),
                        node.value.get(),
                        lse,
                        seqs,
                        *heads,
                        *scale,
                    )?;
                    vec![(*q, dq), (*k, dk), (*v, dv)]
                }
                Op::Scale { x, c } => vec![(*x, be.scale(&g, *c)?)],
                Op::Reshape { x } => vec![(*x, g.reshape(val(*x).shape())?)],
                Op::Cast { x } => vec![(*x, be.cast(&g, self.grad_dtype(*x))?)],
                Op::Dropout { x, p, seed } => vec![(*x, be.dropout(&g, *p, *seed)?)],
                Op::SumAll { x } => {
                    let xv = val(*x);
                    vec![(*x, be.broadcast(g, xv.shape(), xv.dtype())?)]
                }
                Op::SoftCrossEntropy {
                    logits,
                    targets,
                    lse,
                } => {
                    vec![(
                        *logits,
                        be.soft_cross_entropy_backward(&g, val(*logits), lse, targets)?,
                    )]
                }
                Op::MaxSim {
                    q,
                    q_cu,
                    p,
                    p_cu,
                    argmax,
                } => {
                    let (dq, dp) = be.maxsim_backward(&g, val(*q), q_cu, val(*p), p_cu, argmax)?;
                    vec![(*q, dq), (*p, dp)]
                }
                Op::Lexical {
                    q,
                    q_ids,
                    q_cu,
                    p,
                    p_ids,
                    p_cu,
                    excluded,
                } => {
                    let (dq, dp) = be.lexical_scores_backward(
                        &g,
                        &LexicalSide {
                            weights: val(*q),
                            ids: q_ids,
                            cu: q_cu,
                            excluded,
                        },
                        &LexicalSide {
                            weights: val(*p),
                            ids: p_ids,
                            cu: p_cu,
                            excluded,
                        },
                    )?;
                    vec![(*q, dq), (*p, dp)]
                }
                Op::SoftmaxCrossEntropy {
                    logits,
                    targets,
                    lse,
                } => {
                    let g32 = if g.dtype() == DType::F32 {
                        g
                    } else {
                        be.cast(&g, DType::F32)?
                    };
                    vec![(
                        *logits,
                        be.softmax_cross_entropy_backward(&g32, val(*logits), lse, targets)?,
                    )]
                }
            };
            for (v, gv) in contribs {
                if !self.nodes[v.0].needs_grad {
                    continue;
                }
                grads[v.0] = Some(match grads[v.0].take() {
                    None => gv,
                    Some(mut prev) => {
                        let gv = if gv.dtype() == prev.dtype() {
                            gv
                        } else {
                            be.cast(&gv, prev.dtype())?
                        };
                        be.add_assign(&mut prev, &gv)?;
                        prev
                    }
                });
            }
        }
        // Leaves read at index 0 (none: a leaf precedes its readers) or seeded directly.
        for (i, g) in grads.into_iter().enumerate() {
            if let Some(g) = g.filter(|_| matches!(self.nodes[i].op, Op::Leaf)) {
                sink(Var(i), LeafGrad::Dense(g))?;
            }
        }
        Ok(())
    }

    /// Gradients of leaves (parameters) are f32 so they can feed f32 master weights;
    /// intermediate gradients keep the value's dtype.
    fn grad_dtype(&self, v: Var) -> DType {
        match self.nodes[v.0].op {
            Op::Leaf => DType::F32,
            _ => self.value(v).dtype(),
        }
    }
}

/// A device copy of a tensor (the two branches of an add each get their own gradient).
fn clone_tensor<B: Backend>(be: &B, t: &Tensor<B>) -> Result<Tensor<B>> {
    be.cast(t, t.dtype())
}
