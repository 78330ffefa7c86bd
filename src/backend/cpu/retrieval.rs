//! Training-time retrieval scores on the CPU: colbert max-sim and lexical scatter-max
//! matching between packed query and passage sequences, with their backward passes.

use rayon::prelude::*;

use crate::score::{best_match, merge_shared, LexicalEntries};

fn ranges(cu: &[u32]) -> Vec<std::ops::Range<usize>> {
    cu.windows(2)
        .map(|w| w[0] as usize..w[1] as usize)
        .collect()
}

/// Max-sim scores `[bq, bp]` and arg-max rows `[tq, bp]` (absolute passage row; u32::MAX
/// where the passage is empty).
pub fn maxsim(q: &[f32], q_cu: &[u32], p: &[f32], p_cu: &[u32], d: usize) -> (Vec<f32>, Vec<u32>) {
    let (qs, ps) = (ranges(q_cu), ranges(p_cu));
    let tq = *q_cu.last().unwrap_or(&0) as usize;
    let bp = ps.len();
    // Per query row: best passage row and its similarity, for every passage.
    let per_row: Vec<(Vec<f32>, Vec<u32>)> = (0..tq)
        .into_par_iter()
        .map(|i| {
            let qi = &q[i * d..(i + 1) * d];
            let mut best = vec![0f32; bp];
            let mut arg = vec![u32::MAX; bp];
            for (n, r) in ps.iter().enumerate() {
                let (m, j) = best_match(qi, r.clone().map(|j| &p[j * d..(j + 1) * d]));
                if let Some(j) = j {
                    arg[n] = (r.start + j) as u32;
                }
                best[n] = if r.is_empty() { 0.0 } else { m };
            }
            (best, arg)
        })
        .collect();
    let mut s = vec![0f32; qs.len() * bp];
    for (b, r) in qs.iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        for n in 0..bp {
            let sum: f32 = r.clone().map(|i| per_row[i].0[n]).sum();
            s[b * bp + n] = sum / r.len() as f32;
        }
    }
    let argmax = per_row.into_iter().flat_map(|(_, a)| a).collect();
    (s, argmax)
}

/// Max-sim backward: `(dq, dp)` through the arg-max rows.
#[allow(clippy::too_many_arguments)]
pub fn maxsim_backward(
    ds: &[f32],
    q: &[f32],
    q_cu: &[u32],
    p: &[f32],
    p_cu: &[u32],
    argmax: &[u32],
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let bp = p_cu.len() - 1;
    let mut dq = vec![0f32; q.len()];
    let mut dp = vec![0f32; p.len()];
    for (b, r) in ranges(q_cu).into_iter().enumerate() {
        let inv = 1.0 / r.len().max(1) as f32;
        for i in r {
            for n in 0..bp {
                let j = argmax[i * bp + n];
                if j == u32::MAX {
                    continue;
                }
                let (g, j) = (ds[b * bp + n] * inv, j as usize);
                for c in 0..d {
                    dq[i * d + c] += g * p[j * d + c];
                    dp[j * d + c] += g * q[i * d + c];
                }
            }
        }
    }
    (dq, dp)
}

/// One sequence's lexical vector: `(id, max weight, row of the first occurrence holding
/// it)`, sorted by id. Sorted lists make every score a merge in a fixed order, so sums
/// (and training runs) are bit-reproducible, which hash-map iteration order is not.
type Lexical = Vec<(u32, f32, usize)>;

/// Per sequence: its [`Lexical`] vector.
fn scatter_max(w: &[f32], ids: &[u32], cu: &[u32], excluded: &[u32]) -> Vec<Lexical> {
    let e = LexicalEntries::build(ids, cu, |id| excluded.contains(&id));
    (0..cu.len().saturating_sub(1))
        .map(|b| {
            e.entries_of(b)
                .map(|k| {
                    let rows = e.rows_of(k);
                    let mut best = (w[rows[0] as usize], rows[0] as usize);
                    for &r in &rows[1..] {
                        if w[r as usize] > best.0 {
                            best = (w[r as usize], r as usize);
                        }
                    }
                    (e.ids[k], best.0, best.1)
                })
                .collect()
        })
        .collect()
}

/// Calls `f(wa, row_a, wb, row_b)` for each id two sorted vectors share, in id order.
fn shared(a: &Lexical, b: &Lexical, mut f: impl FnMut(f32, usize, f32, usize)) {
    merge_shared(a, b, |x| x.0, |y| y.0, |x, y| f(x.1, x.2, y.1, y.2));
}

/// One side of a lexical score on the host.
pub struct Side<'a> {
    /// Token weights.
    pub w: &'a [f32],
    /// Token ids.
    pub ids: &'a [u32],
    /// Sequence offsets.
    pub cu: &'a [u32],
    /// Ids counted as 0.
    pub excluded: &'a [u32],
}

/// Lexical scores `[bq, bp]`.
pub fn lexical(q: &Side, p: &Side) -> Vec<f32> {
    let (mq, mp) = (
        scatter_max(q.w, q.ids, q.cu, q.excluded),
        scatter_max(p.w, p.ids, p.cu, p.excluded),
    );
    let mut s = vec![0f32; mq.len() * mp.len()];
    for (b, a) in mq.iter().enumerate() {
        for (n, c) in mp.iter().enumerate() {
            let mut acc = 0f32;
            shared(a, c, |wa, _, wc, _| acc += wa * wc);
            s[b * mp.len() + n] = acc;
        }
    }
    s
}

/// Lexical backward: `(dw_q, dw_p)`, each id's gradient on its arg-max row.
pub fn lexical_backward(ds: &[f32], q: &Side, p: &Side) -> (Vec<f32>, Vec<f32>) {
    let (mq, mp) = (
        scatter_max(q.w, q.ids, q.cu, q.excluded),
        scatter_max(p.w, p.ids, p.cu, p.excluded),
    );
    let mut dq = vec![0f32; q.w.len()];
    let mut dp = vec![0f32; p.w.len()];
    let bp = mp.len();
    for (b, a) in mq.iter().enumerate() {
        for (n, c) in mp.iter().enumerate() {
            let g = ds[b * bp + n];
            shared(a, c, |wa, ra, wc, rc| {
                dq[ra] += g * wc;
                dp[rc] += g * wa;
            });
        }
    }
    (dq, dp)
}
