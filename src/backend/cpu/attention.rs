//! Multi-head attention over packed variable-length batches on the CPU, forward and
//! backward, in blocks of query rows so memory is O(block × L) per head, not O(L²).

use rayon::prelude::*;

use super::linalg::{gemm, View};

/// Query rows per block: the score block is `BLOCK × L` floats.
const BLOCK: usize = 64;

/// `exp(x)` for `x <= 0` (scores minus their row max), Cephes' expf: relative error about
/// 1e-7, and straight-line code the compiler vectorises, unlike a libm call per element.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round x·log2(e) to the nearest integer n with the 1.5·2^23 trick (no SSE4.1 needed).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
            for i0 in (0..l).step_by(BLOCK) {
                let bl = BLOCK.min(l - i0);
                let qb = View {
                    data: &qv.data[i0 * g.hidden..],
                    rows: bl,
                    ..qv
                };
                gemm(&mut s, l, qb, kv.t(), g.scale, false, 1);
                for (r, row) in s.chunks_mut(l).take(bl).enumerate() {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row.iter_mut().for_each(|x| *x = exp_nonpos(*x - m));
                    let sum: f32 = row.iter().sum();
                    row.iter_mut().for_each(|x| *x /= sum);
                    lse[i0 + r] = m + sum.ln();
                }
                gemm(
                    &mut out[i0 * g.head_dim..],
                    g.head_dim,
                    View::rows(&s, bl, l),
                    vv,
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
                gemm(&mut p, l, qb, kv.t(), g.scale, false, 1);
                for (r, row) in p.chunks_mut(l).take(bl).enumerate() {
                    let m = lse[(s0 + i0 + r) * g.heads + h];
                    row.iter_mut().for_each(|x| *x = exp_nonpos(*x - m));
                }
                let pb = View::rows(&p, bl, l);
                gemm(&mut dv, d, pb.t(), dob, 1.0, true, 1);
                gemm(&mut ds, l, dob, vv.t(), 1.0, false, 1);
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
                gemm(&mut dq[i0 * d..], d, dsb, kv, g.scale, false, 1);
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
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (super::exp_nonpos(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }
}
