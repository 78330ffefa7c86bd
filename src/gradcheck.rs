//! Finite-difference gradient checks for anything built on the tape.
//!
//! `check` compares the tape's gradients of `Σ r ⊙ f(inputs)` (r a random seed gradient)
//! against central differences. The tests run it on every op under proptest, and
//! `m3 selfcheck` runs it as the model-free self-check.

use crate::autograd::{Tape, Var};
use crate::backend::{Backend, Seqs};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::{DType, HostData, Tensor};

/// A function of recorded inputs, checked as a unit: records ops on the tape and returns
/// the output.
pub type OpFn<B> = dyn Fn(&mut Tape<'_, B>, &[Var]) -> Result<Var>;

/// An input to a checked function.
#[derive(Clone, Debug)]
pub enum Input {
    /// Real values; `grad` says whether the gradient is checked.
    Float {
        /// Shape.
        shape: Vec<usize>,
        /// Row-major values.
        data: Vec<f32>,
        /// Whether to check the gradient of this input.
        grad: bool,
    },
    /// u32 ids or target columns (no gradient).
    Ids {
        /// Shape.
        shape: Vec<usize>,
        /// Values.
        data: Vec<u32>,
    },
}

/// The worst disagreement found for one input.
#[derive(Clone, Debug)]
pub struct InputReport {
    /// Position of the input in the argument list.
    pub input: usize,
    /// Largest `|analytic - numeric| / (atol + rtol·|numeric|)`; at most 1 passes.
    pub worst_ratio: f64,
    /// Largest absolute difference.
    pub max_abs_diff: f64,
    /// Flat index of the worst element.
    pub worst_index: usize,
}

/// Tolerances of a check.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Finite-difference step.
    pub eps: f32,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

impl Default for Tolerance {
    /// f32 central differences with step 1e-2: truncation error ~1e-4, rounding ~1e-5.
    fn default() -> Self {
        Tolerance {
            eps: 1e-2,
            atol: 2e-3,
            rtol: 2e-2,
        }
    }
}

fn upload<B: Backend>(be: &B, input: &Input, dtype: DType) -> Result<Tensor<B>> {
    match input {
        Input::Float { shape, data, .. } => {
            let t = be.upload(HostData::F32(data), shape)?;
            if dtype == DType::F32 {
                Ok(t)
            } else {
                be.cast(&t, dtype)
            }
        }
        Input::Ids { shape, data } => be.upload(HostData::U32(data), shape),
    }
}

/// Records `inputs` on a fresh tape (floats, as `dtype`, with `grad` as parameters) and
/// calls `f`.
fn record<'a, B: Backend>(
    be: &'a B,
    inputs: &[Input],
    f: &OpFn<B>,
    dtype: DType,
) -> Result<(Tape<'a, B>, Var)> {
    let mut tape = Tape::new(be);
    let mut vars = Vec::with_capacity(inputs.len());
    for input in inputs {
        let t = upload(be, input, dtype)?;
        vars.push(match input {
            Input::Float { grad: true, .. } => tape.param_owned(t),
            _ => tape.input(t),
        });
    }
    let out = f(&mut tape, &vars)?;
    Ok((tape, out))
}

/// `Σ r ⊙ f(inputs)` in f64.
fn weighted_sum<B: Backend>(be: &B, inputs: &[Input], f: &OpFn<B>, r: &[f32]) -> Result<f64> {
    let (tape, out) = record(be, inputs, f, DType::F32)?;
    let y = be.to_vec_f32(tape.value(out))?;
    Ok(y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum())
}

/// The seed gradient `r` of a check: uniform in [-1, 1), fixed by `seed`, and exactly
/// representable in bf16 so bf16 runs and their f32 references see the same seed.
fn seed_gradient(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| half::bf16::from_f32(rng.uniform(-1.0, 1.0)).to_f32())
        .collect()
}

/// Output and input gradients of one run of `f`, as f32 on the host.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// The output of `f`.
    pub output: Vec<f32>,
    /// Per input: the gradient of `Σ r ⊙ output`, for float inputs with `grad`.
    pub grads: Vec<Option<Vec<f32>>>,
}

/// Runs `f` forward with float inputs as `dtype`, then backward from the seed gradient
/// fixed by `seed` (cast to the output's dtype). GPU tests compare these across backends.
pub fn evaluate<B: Backend>(
    be: &B,
    inputs: &[Input],
    f: &OpFn<B>,
    dtype: DType,
    seed: u64,
) -> Result<Evaluation> {
    let (tape, out) = record(be, inputs, f, dtype)?;
    let y = tape.value(out);
    let r = seed_gradient(seed, y.numel());
    let seed_t = be.upload(HostData::F32(&r), y.shape())?;
    let seed_t = if y.dtype() == DType::F32 {
        seed_t
    } else {
        be.cast(&seed_t, y.dtype())?
    };
    let output = be.to_vec_f32(y)?;
    let grads = tape.backward_with(out, seed_t)?;
    let grads = (0..inputs.len())
        .map(|i| {
            grads
                .get(Var::from_index(i))
                .map(|g| be.to_vec_f32(g))
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Evaluation { output, grads })
}

/// Runs `f` forward only; no gradients.
pub fn forward_only<B: Backend>(
    be: &B,
    inputs: &[Input],
    f: &OpFn<B>,
    dtype: DType,
) -> Result<Evaluation> {
    let (tape, out) = record(be, inputs, f, dtype)?;
    Ok(Evaluation {
        output: be.to_vec_f32(tape.value(out))?,
        grads: vec![None; inputs.len()],
    })
}

/// Checks the tape's gradients of `f` against central differences at `inputs`.
/// Returns one report per input whose gradient is checked.
pub fn check<B: Backend>(
    be: &B,
    inputs: &[Input],
    f: &OpFn<B>,
    tol: Tolerance,
    seed: u64,
) -> Result<Vec<InputReport>> {
    let eval = evaluate(be, inputs, f, DType::F32, seed)?;
    let r = seed_gradient(seed, eval.output.len());

    let mut reports = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let Input::Float {
            shape,
            data,
            grad: true,
        } = input
        else {
            continue;
        };
        let analytic = eval.grads[i]
            .clone()
            .unwrap_or_else(|| vec![0.0; data.len()]);
        let mut report = InputReport {
            input: i,
            worst_ratio: 0.0,
            max_abs_diff: 0.0,
            worst_index: 0,
        };
        for j in 0..data.len() {
            // Richardson extrapolation of two central differences (steps h and h/2)
            // cancels the h² error term, so sharply curved spots (LayerNorm over two
            // nearly equal values) do not pass for a wrong gradient or fail a right one.
            let mut probe = inputs.to_vec();
            let mut central = |h: f32| -> Result<f64> {
                let mut at = |x: f32| -> Result<f64> {
                    let Input::Float { data: d, .. } = &mut probe[i] else {
                        unreachable!("input {i} is a float input")
                    };
                    d[j] = x;
                    weighted_sum(be, &probe, f, &r)
                };
                let (plus, minus) = (at(data[j] + h)?, at(data[j] - h)?);
                Ok((plus - minus) / (2.0 * h as f64))
            };
            let (d1, d2) = (central(tol.eps)?, central(tol.eps / 2.0)?);
            let numeric = (4.0 * d2 - d1) / 3.0;
            let diff = (analytic[j] as f64 - numeric).abs();
            let ratio = diff / (tol.atol + tol.rtol * numeric.abs());
            report.max_abs_diff = report.max_abs_diff.max(diff);
            if ratio > report.worst_ratio || ratio.is_nan() {
                report.worst_ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
                report.worst_index = j;
            }
        }
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        reports.push(report);
    }
    Ok(reports)
}

/// A boxed [`OpFn`].
pub type CaseFn<B> = Box<OpFn<B>>;

/// One op under test: its inputs and how to record it.
pub struct Case<B: Backend> {
    /// Op name and variant, e.g. `matmul(tA,nB,bias)`.
    pub name: String,
    /// Inputs in argument order.
    pub inputs: Vec<Input>,
    /// Records the op on a tape.
    pub f: CaseFn<B>,
    /// How far device backends implement the op yet.
    pub device: DeviceCheck,
}

/// How much of an op the device backends implement, so cross-checks compare what exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCheck {
    /// Forward and backward.
    Full,
    /// Forward only (the backward kernel is later work).
    Forward,
    /// Neither yet (CPU only).
    Skip,
}

/// Sizes for [`op_cases`]: `rows` × `cols` activations, `inner` the other matmul dimension,
/// `vocab` the embedding table's rows.
#[derive(Clone, Copy, Debug)]
pub struct CaseDims {
    /// Rows of activations.
    pub rows: usize,
    /// Columns of activations.
    pub cols: usize,
    /// Inner matmul dimension.
    pub inner: usize,
    /// Embedding vocabulary.
    pub vocab: usize,
}

fn float(shape: &[usize], data: Vec<f32>) -> Input {
    Input::Float {
        shape: shape.to_vec(),
        data,
        grad: true,
    }
}

/// One case per op and variant of the foundation's op set, with random inputs from `rng`.
/// The same seed gives the same inputs on every backend, so GPU tests compare like with like.
pub fn op_cases<B: Backend + 'static>(rng: &mut Rng, d: CaseDims) -> Vec<Case<B>> {
    let CaseDims {
        rows: m,
        cols: n,
        inner: k,
        vocab,
    } = d;
    let mut cases: Vec<Case<B>> = Vec::new();
    for (ta, tb, bias) in [
        (false, false, false),
        (false, true, true),
        (true, false, true),
        (true, true, false),
    ] {
        let a_shape = if ta { [k, m] } else { [m, k] };
        let b_shape = if tb { [n, k] } else { [k, n] };
        let mut inputs = vec![
            float(&a_shape, rng.vec(m * k, -1.0, 1.0)),
            float(&b_shape, rng.vec(k * n, -1.0, 1.0)),
        ];
        if bias {
            inputs.push(float(&[n], rng.vec(n, -1.0, 1.0)));
        }
        cases.push(Case {
            name: format!(
                "matmul({}A,{}B{})",
                if ta { "t" } else { "n" },
                if tb { "t" } else { "n" },
                if bias { ",bias" } else { "" }
            ),
            inputs,
            f: Box::new(move |t, v| t.matmul(v[0], ta, v[1], tb, v.get(2).copied())),
            device: DeviceCheck::Full,
        });
    }
    cases.push(Case {
        name: "add".into(),
        inputs: vec![
            float(&[m, n], rng.vec(m * n, -1.0, 1.0)),
            float(&[m, n], rng.vec(m * n, -1.0, 1.0)),
        ],
        f: Box::new(|t, v| t.add(v[0], v[1])),
        device: DeviceCheck::Full,
    });
    // LayerNorm varies on the scale of a row's spread; rows whose values nearly coincide
    // (likely with two columns) would put that scale below the finite-difference step.
    let mut ln_in = Vec::with_capacity(m * n);
    for _ in 0..m {
        let row = loop {
            let row = rng.vec(n, -2.0, 2.0);
            let mean = row.iter().sum::<f32>() / n as f32;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32;
            if n < 2 || var.sqrt() >= 0.25 {
                break row;
            }
        };
        ln_in.extend(row);
    }
    cases.push(Case {
        name: "layernorm".into(),
        inputs: vec![
            float(&[m, n], ln_in),
            float(&[n], rng.vec(n, 0.5, 1.5)),
            float(&[n], rng.vec(n, -0.5, 0.5)),
        ],
        f: Box::new(|t, v| t.layernorm(v[0], v[1], v[2], 1e-5)),
        device: DeviceCheck::Full,
    });
    cases.push(Case {
        name: "gelu".into(),
        inputs: vec![float(&[m, n], rng.vec(m * n, -3.0, 3.0))],
        f: Box::new(|t, v| t.gelu(v[0])),
        device: DeviceCheck::Full,
    });
    // Keep ReLU inputs a step away from the kink so central differences are exact.
    let relu_in: Vec<f32> = rng
        .vec(m * n, 0.1, 2.0)
        .into_iter()
        .map(|x| if rng.below(2) == 0 { -x } else { x })
        .collect();
    cases.push(Case {
        name: "relu".into(),
        inputs: vec![float(&[m, n], relu_in)],
        f: Box::new(|t, v| t.relu(v[0])),
        device: DeviceCheck::Full,
    });
    let ids: Vec<u32> = (0..m).map(|_| rng.below(vocab as u32)).collect();
    cases.push(Case {
        name: "embedding".into(),
        inputs: vec![
            float(&[vocab, n], rng.vec(vocab * n, -1.0, 1.0)),
            Input::Ids {
                shape: vec![m],
                data: ids.clone(),
            },
        ],
        f: Box::new(|t, v| {
            let ids = t.value(v[1]).clone_ids(t.backend())?;
            t.embedding(v[0], ids)
        }),
        device: DeviceCheck::Full,
    });
    // x/‖x‖ curves on the scale of ‖x‖ (with one column it is a step at 0): keep row norms
    // well above the finite-difference step.
    let mut l2_in = Vec::with_capacity(m * n);
    for _ in 0..m {
        let row = loop {
            let row = rng.vec(n, -1.0, 1.0);
            if row.iter().map(|x| x * x).sum::<f32>().sqrt() >= 0.5 {
                break row;
            }
        };
        l2_in.extend(row);
    }
    cases.push(Case {
        name: "l2_normalize".into(),
        inputs: vec![float(&[m, n], l2_in)],
        f: Box::new(|t, v| t.l2_normalize(v[0], 1e-12)),
        device: DeviceCheck::Full,
    });
    let targets: Vec<u32> = (0..m).map(|_| rng.below(n as u32)).collect();
    cases.push(Case {
        name: "softmax_cross_entropy".into(),
        inputs: vec![
            float(&[m, n], rng.vec(m * n, -3.0, 3.0)),
            Input::Ids {
                shape: vec![m],
                data: targets,
            },
        ],
        f: Box::new(|t, v| {
            let targets = t.value(v[1]).clone_ids(t.backend())?;
            t.softmax_cross_entropy(v[0], targets)
        }),
        device: DeviceCheck::Full,
    });
    // Attention, the rows split into up to three sequences (an empty one possible): head
    // dims 32, 64 and 128 (the tensor-core kernel's in bf16 on CUDA) and 8 (CUDA's naive
    // kernel, lanes idle).
    for (heads, head_dim) in [(2usize, 32usize), (1, 64), (1, 128), (3, 8)] {
        let hidden = heads * head_dim;
        let cut1 = rng.below(m as u32 + 1);
        let cut2 = cut1 + rng.below(m as u32 - cut1 + 1);
        let cu = vec![0, cut1, cut2, m as u32];
        let qkv = (0..3)
            .map(|_| float(&[m, hidden], rng.vec(m * hidden, -1.0, 1.0)))
            .collect();
        cases.push(Case {
            name: format!("attention({heads}x{head_dim})"),
            inputs: qkv,
            f: Box::new(move |t, v| {
                let seqs = std::sync::Arc::new(Seqs::new(t.backend(), &cu)?);
                t.attention(v[0], v[1], v[2], &seqs, heads, 0.25)
            }),
            device: DeviceCheck::Full,
        });
    }
    cases.push(Case {
        name: "scale".into(),
        inputs: vec![float(&[m, n], rng.vec(m * n, -1.0, 1.0))],
        f: Box::new(|t, v| t.scale(v[0], -0.7)),
        device: DeviceCheck::Full,
    });
    cases.push(Case {
        name: "dropout".into(),
        inputs: vec![float(&[m, n], rng.vec(m * n, -1.0, 1.0))],
        f: Box::new(|t, v| t.dropout(v[0], 0.3, 0xD0D0)),
        device: DeviceCheck::Full,
    });
    cases.push(Case {
        name: "sum_all".into(),
        inputs: vec![float(&[m, n], rng.vec(m * n, -1.0, 1.0))],
        f: Box::new(|t, v| t.sum_all(v[0])),
        device: DeviceCheck::Full,
    });
    // Soft targets: a random distribution per row (a detached teacher).
    let mut teacher = rng.vec(m * n, 0.0, 1.0);
    for row in teacher.chunks_mut(n) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= s);
    }
    cases.push(Case {
        name: "soft_cross_entropy".into(),
        inputs: vec![
            float(&[m, n], rng.vec(m * n, -3.0, 3.0)),
            Input::Float {
                shape: vec![m, n],
                data: teacher,
                grad: false,
            },
        ],
        f: Box::new(|t, v| {
            let targets = t.backend().cast(t.value(v[1]), DType::F32)?;
            t.soft_cross_entropy(v[0], targets)
        }),
        device: DeviceCheck::Full,
    });
    cases.push(maxsim_case(rng, m, k.max(2)));
    cases.push(lexical_case(rng, m, vocab.max(2)));
    cases
}

/// Cut points splitting `rows` into three packed sequences (some possibly empty).
fn three_way(rng: &mut Rng, rows: usize) -> Vec<u32> {
    let a = rng.below(rows as u32 + 1);
    let b = a + rng.below(rows as u32 - a + 1);
    vec![0, a, b, rows as u32]
}

/// Max-sim over random packed queries and passages. Max is piecewise linear: inputs are
/// redrawn until every query row's best passage row leads the runner-up by 0.05, far more
/// than a finite-difference step can move a similarity. Large cases almost never separate;
/// after a few draws they give up (`None`) and are compared forward only (a max is
/// continuous, so near-ties cannot move the forward value).
fn max_sim_inputs(
    rng: &mut Rng,
    tq: usize,
    tp: usize,
    d: usize,
    p_cu: &[u32],
) -> (Vec<f32>, Vec<f32>, bool) {
    for _ in 0..32 {
        let (q, p) = (rng.vec(tq * d, -1.0, 1.0), rng.vec(tp * d, -1.0, 1.0));
        let separated = (0..tq).all(|i| {
            p_cu.windows(2).all(|w| {
                let mut sims: Vec<f32> = (w[0] as usize..w[1] as usize)
                    .map(|j| (0..d).map(|c| q[i * d + c] * p[j * d + c]).sum())
                    .collect();
                sims.sort_by(|a, b| b.total_cmp(a));
                sims.len() < 2 || sims[0] - sims[1] >= 0.05
            })
        });
        if separated {
            return (q, p, true);
        }
    }
    (
        rng.vec(tq * d, -1.0, 1.0),
        rng.vec(tp * d, -1.0, 1.0),
        false,
    )
}

fn maxsim_case<B: Backend + 'static>(rng: &mut Rng, rows: usize, d: usize) -> Case<B> {
    let (tq, tp) = (rows, rows + 1);
    let (q_cu, p_cu) = (three_way(rng, tq), three_way(rng, tp));
    let (q, p, separated) = max_sim_inputs(rng, tq, tp, d, &p_cu);
    Case {
        name: "maxsim".into(),
        inputs: vec![float(&[tq, d], q), float(&[tp, d], p)],
        f: Box::new(move |t, v| t.maxsim(v[0], &q_cu, v[1], &p_cu)),
        device: if separated {
            DeviceCheck::Full
        } else {
            DeviceCheck::Forward
        },
    }
}

/// Lexical scores over random ids from a small vocabulary (so sequences share tokens) and
/// positive weights; id 0 plays a special token. The occurrences of one id in a sequence
/// get weights 0.06 apart (a random order, plus noise under 0.01), so the scatter-max
/// never ties within a finite-difference step, nor after rounding to bf16, at any size.
fn lexical_case<B: Backend + 'static>(rng: &mut Rng, rows: usize, vocab: usize) -> Case<B> {
    let side = |rng: &mut Rng, t: usize| {
        let cu = three_way(rng, t);
        let ids: Vec<u32> = (0..t).map(|_| rng.below(vocab as u32)).collect();
        let mut w = vec![0f32; t];
        for s in cu.windows(2) {
            let mut rows: Vec<usize> = (s[0] as usize..s[1] as usize).collect();
            // A random order of the rows; each id's k-th row in that order gets step k.
            for i in (1..rows.len()).rev() {
                let j = rng.below(i as u32 + 1) as usize;
                rows.swap(i, j);
            }
            let mut seen: std::collections::HashMap<u32, usize> = Default::default();
            for r in rows {
                let k = seen.entry(ids[r]).or_insert(0);
                w[r] = 0.1 + 0.06 * *k as f32 + rng.uniform(0.0, 0.01);
                *k += 1;
            }
        }
        (cu, ids, w)
    };
    let (q_cu, q_ids, qw) = side(rng, rows);
    let (p_cu, p_ids, pw) = side(rng, rows + 2);
    Case {
        name: "lexical_scores".into(),
        inputs: vec![float(&[rows], qw), float(&[rows + 2], pw)],
        f: Box::new(move |t, v| t.lexical_scores(v[0], &q_ids, &q_cu, v[1], &p_ids, &p_cu, &[0])),
        device: DeviceCheck::Full,
    }
}

impl Input {
    /// The same input with float values rounded to bf16, so a reference computed in f32 on
    /// these sees exactly what a bf16 kernel sees.
    pub fn rounded_to_bf16(&self) -> Input {
        match self {
            Input::Float { shape, data, grad } => Input::Float {
                shape: shape.clone(),
                data: data
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
                grad: *grad,
            },
            ids => ids.clone(),
        }
    }
}

/// Relative error `‖got - want‖₂ / ‖want‖₂`; the absolute `‖got - want‖₂` where `want` is
/// exactly zero (a gradient that vanishes identically, such as attention's dQ over a single
/// key: every input here is O(1), and a relative error of rounding residue against 0 would
/// be infinite); infinite when `got` has a NaN or an infinity `want` lacks, or the lengths
/// differ.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() && g.to_bits() != w.to_bits() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        num.sqrt() / den.sqrt()
    }
}

/// How far one evaluation is from a reference: the worst relative error over the output
/// and every gradient, with the part that was worst.
pub fn compare(got: &Evaluation, want: &Evaluation) -> (f64, String) {
    let mut worst = (
        relative_error(&got.output, &want.output),
        "output".to_string(),
    );
    for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
        let e = match (g, w) {
            (Some(g), Some(w)) => relative_error(g, w),
            (None, None) => 0.0,
            _ => f64::INFINITY,
        };
        if e > worst.0 || e.is_nan() {
            worst = (e, format!("grad of input {i}"));
        }
    }
    worst
}

/// One row of a cross-backend comparison.
#[derive(Clone, Debug)]
pub struct CrossCheck {
    /// Case name.
    pub name: String,
    /// Worst relative error against the CPU reference.
    pub error: f64,
    /// Which output or gradient was worst.
    pub worst: String,
}

/// The relative-error bound a backend computing in `dtype` must meet against the f32 CPU
/// reference fed the same (rounded) inputs: f32 differs only in summation order and libm
/// ulps; bf16 stores every intermediate with an 8-bit mantissa.
pub fn cross_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        _ => 1e-5,
    }
}

/// Runs every op case on `dev` with float inputs as `dtype`, and on the CPU reference with
/// the same inputs (rounded to bf16 first when `dtype` is bf16), forward and backward.
pub fn cross_check<D: Backend + 'static>(
    dev: &D,
    dims: CaseDims,
    dtype: DType,
    seed: u64,
) -> Result<Vec<CrossCheck>> {
    cross_check_ops(dev, dims, dtype, seed, |_| true)
}

/// [`cross_check`] restricted to the op cases whose name `keep` accepts (the others are
/// built, for the same random draws, but not evaluated).
pub fn cross_check_ops<D: Backend + 'static>(
    dev: &D,
    dims: CaseDims,
    dtype: DType,
    seed: u64,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<CrossCheck>> {
    let cpu = crate::backend::cpu::Cpu;
    let ref_cases = op_cases::<crate::backend::cpu::Cpu>(&mut Rng::new(seed), dims);
    let dev_cases = op_cases::<D>(&mut Rng::new(seed), dims);
    let mut rows = Vec::new();
    for (rc, dc) in ref_cases.iter().zip(&dev_cases) {
        if !keep(&dc.name) {
            continue;
        }
        let inputs: Vec<Input> = if dtype == DType::BF16 {
            rc.inputs.iter().map(Input::rounded_to_bf16).collect()
        } else {
            rc.inputs.clone()
        };
        let (want, got) = match dc.device {
            DeviceCheck::Full => (
                evaluate(&cpu, &inputs, &*rc.f, DType::F32, seed)?,
                evaluate(dev, &inputs, &*dc.f, dtype, seed)?,
            ),
            DeviceCheck::Forward => (
                forward_only(&cpu, &inputs, &*rc.f, DType::F32)?,
                forward_only(dev, &inputs, &*dc.f, dtype)?,
            ),
            DeviceCheck::Skip => continue,
        };
        let (error, worst) = compare(&got, &want);
        rows.push(CrossCheck {
            name: dc.name.clone(),
            error,
            worst,
        });
    }
    Ok(rows)
}
