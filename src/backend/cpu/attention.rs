//! Multi-head attention over packed variable-length batches on the CPU, forward and
//! backward, in blocks of query rows so memory is O(block × L) per head, not O(L²).

use rayon::prelude::*;

use super::fastmath::{exp_nonpos, has_avx2};
use super::linalg::{gemm, gemm_rhs, Rhs, View};

/// Query rows per block: the score block is `BLOCK × L` floats.
const BLOCK: usize = 64;

/// Lanes of the row reductions below: independent accumulators the compiler keeps in one
/// vector register (a single running f32 sum or f32::max fold stays scalar).
const LANES: usize = 8;

/// Largest element of a row of finite scores.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// Softmax of each of the first `rows` rows (width `l`) of `s` in place; `lse[r]` gets the
/// row's log-sum-exp.
fn softmax_rows(s: &mut [f32], l: usize, rows: usize, lse: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { softmax_rows_avx2(s, l, rows, lse) };
    }
    softmax_rows_body(s, l, rows, lse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(s: &mut [f32], l: usize, rows: usize, lse: &mut [f32]) {
    softmax_rows_body(s, l, rows, lse)
}

#[inline(always)]
fn softmax_rows_body(s: &mut [f32], l: usize, rows: usize, lse: &mut [f32]) {
    for (r, row) in s.chunks_mut(l).take(rows).enumerate() {
        let m = row_max(row);
        let sum = exp_sum(row, m);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
        lse[r] = m + sum.ln();
    }
}

/// `exp(x - m_r)` in place over the first `rows` rows (width `l`) of `p`, `m_r = lse[r]`:
/// the probabilities again from the saved log-sum-exp.
fn exp_rows(p: &mut [f32], l: usize, rows: usize, lse: impl Fn(usize) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { exp_rows_avx2(p, l, rows, &lse) };
    }
    exp_rows_body(p, l, rows, &lse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_rows_avx2(p: &mut [f32], l: usize, rows: usize, lse: &dyn Fn(usize) -> f32) {
    exp_rows_body(p, l, rows, lse)
}

#[inline(always)]
fn exp_rows_body(p: &mut [f32], l: usize, rows: usize, lse: &dyn Fn(usize) -> f32) {
    for (r, row) in p.chunks_mut(l).take(rows).enumerate() {
        let m = lse(r);
        row.iter_mut().for_each(|x| *x = exp_nonpos(*x - m));
    }
}

/// Replaces each score by `exp(x - m)` and returns their sum, in LANES partial sums.
#[inline(always)]
fn exp_sum(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            c[k] = exp_nonpos(c[k] - m);
            acc[k] += c[k];
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_nonpos(*x - m);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// Geometry shared by every (sequence, head) task.
#[derive(Clone, Copy)]
pub struct Geometry {
    /// Columns of q, k, v, out: heads × head_dim.
    pub hidden: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Number of heads.
    pub heads: usize,
    /// Score scale, usually 1/sqrt(head_dim).
    pub scale: f32,
}

/// One head's columns of the rows `s0..s1` of a `[T, hidden]` matrix.
fn head_view(m: &[f32], g: Geometry, s0: usize, s1: usize, h: usize) -> View<'_> {
    View {
        data: &m[s0 * g.hidden + h * g.head_dim..],
        rows: s1 - s0,
        cols: g.head_dim,
        rs: g.hidden,
        cs: 1,
    }
}

/// Every (sequence start, end, head) of the batch.
fn tasks(cu: &[u32], heads: usize) -> Vec<(usize, usize, usize)> {
    cu.windows(2)
        .flat_map(|w| (0..heads).map(move |h| (w[0] as usize, w[1] as usize, h)))
        .filter(|&(s0, s1, _)| s1 > s0)
        .collect()
}

/// Writes each task's `[L, head_dim]` block back into a `[T, hidden]` matrix.
fn scatter(dst: &mut [f32], g: Geometry, s0: usize, h: usize, block: &[f32]) {
    for (i, row) in block.chunks(g.head_dim).enumerate() {
        let at = (s0 + i) * g.hidden + h * g.head_dim;
        dst[at..at + g.head_dim].copy_from_slice(row);
    }
}

/// `out = softmax(scale · Q Kᵀ) V` per sequence and head; `lse[t, h]` is the row's
/// log-sum-exp of the scaled scores.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], cu: &[u32], g: Geometry) -> (Vec<f32>, Vec<f32>) {
    let t_total = *cu.last().unwrap_or(&0) as usize;
    let results: Vec<_> = tasks(cu, g.heads)
        .into_par_iter()
        .map(|(s0, s1, h)| {
            let l = s1 - s0;
            let (qv, kv, vv) = (
                head_view(q, g, s0, s1, h),
                head_view(k, g, s0, s1, h),
                head_view(v, g, s0, s1, h),
            );
            let mut out = vec![0f32; l * g.head_dim];
            let mut lse = vec![0f32; l];
            let mut s = vec![0f32; BLOCK.min(l) * l];
            // Kᵀ and V are the right operands of every query block: packed once per head.
            let (kt, vr) = (Rhs::new(kv.t()), Rhs::new(vv));
            for i0 in (0..l).step_by(BLOCK) {
                let bl = BLOCK.min(l - i0);
                let qb = View {
                    data: &qv.data[i0 * g.hidden..],
                    rows: bl,
                    ..qv
                };
                gemm_rhs(&mut s, l, qb, &kt, g.scale, false, 1);
                softmax_rows(&mut s, l, bl, &mut lse[i0..]);
                gemm_rhs(
                    &mut out[i0 * g.head_dim..],
                    g.head_dim,
                    View::rows(&s, bl, l),
                    &vr,
                    1.0,
                    false,
                    1,
                );
            }
            (s0, h, out, lse)
        })
        .collect();
    let mut out = vec![0f32; t_total * g.hidden];
    let mut lse = vec![0f32; t_total * g.heads];
    for (s0, h, o, l) in results {
        scatter(&mut out, g, s0, h, &o);
        for (i, x) in l.into_iter().enumerate() {
            lse[(s0 + i) * g.heads + h] = x;
        }
    }
    (out, lse)
}

/// Gradients `(dq, dk, dv)` of attention from `dout`, recomputing the probabilities block by
/// block from the saved log-sum-exp: `dP = dO Vᵀ`, `dS = P ⊙ (dP - rowsum(P ⊙ dP))`,
/// `dQ = scale · dS K`, `dK = scale · dSᵀ Q`, `dV = Pᵀ dO`.
pub fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    cu: &[u32],
    g: Geometry,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t_total = *cu.last().unwrap_or(&0) as usize;
    let d = g.head_dim;
    let results: Vec<_> = tasks(cu, g.heads)
        .into_par_iter()
        .map(|(s0, s1, h)| {
            let l = s1 - s0;
            let qv = head_view(q, g, s0, s1, h);
            let (kv, vv) = (head_view(k, g, s0, s1, h), head_view(v, g, s0, s1, h));
            let dov = head_view(dout, g, s0, s1, h);
            let (mut dq, mut dk, mut dv) =
                (vec![0f32; l * d], vec![0f32; l * d], vec![0f32; l * d]);
            let mut p = vec![0f32; BLOCK.min(l) * l];
            let mut ds = vec![0f32; BLOCK.min(l) * l];
            let (kt, vt, kr) = (Rhs::new(kv.t()), Rhs::new(vv.t()), Rhs::new(kv));
            for i0 in (0..l).step_by(BLOCK) {
                let bl = BLOCK.min(l - i0);
                let qb = View {
                    data: &qv.data[i0 * g.hidden..],
                    rows: bl,
                    ..qv
                };
                let dob = View {
                    data: &dov.data[i0 * g.hidden..],
                    rows: bl,
                    ..dov
                };
                gemm_rhs(&mut p, l, qb, &kt, g.scale, false, 1);
                exp_rows(&mut p, l, bl, |r| lse[(s0 + i0 + r) * g.heads + h]);
                let pb = View::rows(&p, bl, l);
                gemm(&mut dv, d, pb.t(), dob, 1.0, true, 1);
                gemm_rhs(&mut ds, l, dob, &vt, 1.0, false, 1);
                for r in 0..bl {
                    // delta = Σ_j P_ij dP_ij, equal to dout·out in exact arithmetic but
                    // rounded from the same P and dP it is subtracted from: a one-key row
                    // (P = 1) then gets exactly zero dS, as the naive CUDA kernel does (the
                    // flash backward leaves ~1e-7 there: its dP comes from the mma).
                    let delta = (0..l)
                        .map(|c| p[r * l + c] as f64 * ds[r * l + c] as f64)
                        .sum::<f64>() as f32;
                    for c in 0..l {
                        ds[r * l + c] = p[r * l + c] * (ds[r * l + c] - delta);
                    }
                }
                let dsb = View::rows(&ds, bl, l);
                gemm_rhs(&mut dq[i0 * d..], d, dsb, &kr, g.scale, false, 1);
                gemm(&mut dk, d, dsb.t(), qb, g.scale, true, 1);
            }
            (s0, h, dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; t_total * g.hidden];
    let mut dk = vec![0f32; t_total * g.hidden];
    let mut dv = vec![0f32; t_total * g.hidden];
    for (s0, h, a, b, c) in results {
        scatter(&mut dq, g, s0, h, &a);
        scatter(&mut dk, g, s0, h, &b);
        scatter(&mut dv, g, s0, h, &c);
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    #[test]
    fn softmax_rows_match_f64_on_both_code_paths() {
        // Row widths around the 8-lane chunking (1, 7, 8, 9, 67) and a wide one.
        let mut rng = crate::rng::Rng::new(5);
        for l in [1usize, 7, 8, 9, 67, 1000] {
            let rows = 3;
            let x = rng.vec(rows * l, -30.0, 5.0);
            let mut want = vec![0f64; rows * l];
            let mut want_lse = vec![0f64; rows];
            for r in 0..rows {
                let row = &x[r * l..(r + 1) * l];
                let m = row
                    .iter()
                    .map(|&v| v as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                for c in 0..l {
                    want[r * l + c] = (row[c] as f64 - m).exp() / sum;
                }
                want_lse[r] = m + sum.ln();
            }
            type Softmax = fn(&mut [f32], usize, usize, &mut [f32]);
            let paths: [Softmax; 2] = [super::softmax_rows, super::softmax_rows_body];
            for softmax in paths {
                let (mut s, mut lse) = (x.clone(), vec![0f32; rows]);
                softmax(&mut s, l, rows, &mut lse);
                for (g, w) in s.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-6 * w.max(1e-30) + 1e-12,
                        "l {l}: {g} vs {w}"
                    );
                }
                for (g, w) in lse.iter().zip(&want_lse) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "l {l}: lse {g} vs {w}"
                    );
                }
                // exp_rows from the lse gives the probabilities back.
                let mut p = x.clone();
                super::exp_rows(&mut p, l, rows, |r| lse[r]);
                for (g, w) in p.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * w.max(1e-30) + 1e-12,
                        "l {l}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
