//! `maxsim.cu`, `sparse.cu`: colbert max-sim and lexical scores between packed sides,
//! forward and backward (the grouping is `score::LexicalEntries`).

use super::*;

/// One lexical side on the device: entry ids, sequences and segments, and each entry's max
/// weight and arg-max row.
pub(super) struct LexicalDevice {
    ids: T,
    seq: T,
    seg: T,
    wmax: T,
    warg: T,
}

impl Cuda {
    /// Groups a side by token id on the host and reduces each entry's max weight on the
    /// device.
    pub(super) fn lexical_side(
        &self,
        op: &'static str,
        side: &LexicalSide<'_, Self>,
    ) -> Result<(LexicalEntries, LexicalDevice)> {
        let e = LexicalEntries::build(side.ids, side.cu, |id| side.excluded.contains(&id));
        let u = e.ids.len();
        let up = |v: &[u32]| self.upload(HostData::U32(v), &[v.len()]);
        let mut dev = LexicalDevice {
            ids: up(&e.ids)?,
            seq: up(&e.seq)?,
            seg: up(&e.seg)?,
            wmax: self.alloc(&[u], DType::F32)?,
            warg: self.alloc(&[u], DType::U32)?,
        };
        if u > 0 {
            let rows = up(&e.rows)?;
            let start = up(&e.start)?;
            let f = self.func(
                "sparse",
                &format!("lexical_reduce_{}", sfx(side.weights.dtype())),
            )?;
            let ui = to_i32(op, "entries", u)?;
            launch!(
                self,
                f,
                grid_1d(u),
                [
                    side.weights,
                    &rows,
                    &start,
                    &mut dev.wmax,
                    &mut dev.warg,
                    &ui
                ]
            )?;
        }
        Ok((e, dev))
    }
}

impl Cuda {
    /// Max-sim's best match per (query row, passage) through GEMMs: passages in chunks of
    /// at most ~64M score elements (256 MB of f32), S = Q P_chunk^T by cuBLASLt, then
    /// `maxsim_segmax` per passage.
    pub(super) fn maxsim_rows_gemm(
        &self,
        q: &T,
        p: &T,
        p_cu: &[u32],
        best: &mut T,
        arg: &mut T,
    ) -> Result<()> {
        const OP: &str = "maxsim";
        let (tq, d) = (q.shape()[0], q.shape()[1]);
        let bp = p_cu.len() - 1;
        let budget = ((64usize << 20) / tq.max(1)).max(1);
        let pc = self.upload(HostData::U32(p_cu), &[p_cu.len()])?;
        let f = self.func("maxsim", "maxsim_segmax")?;
        let elem = q.dtype().size() as u64;
        let mut n0 = 0;
        while n0 < bp {
            // At least one passage per chunk, however long.
            let j0 = p_cu[n0] as usize;
            let mut n1 = n0 + 1;
            while n1 < bp && p_cu[n1 + 1] as usize - j0 <= budget {
                n1 += 1;
            }
            let cols = p_cu[n1] as usize - j0;
            // With only empty passages there is nothing to multiply; the kernel still
            // writes their 0 / NO_ROW entries.
            let scores = self.alloc(&[tq, cols.max(1)], DType::F32)?;
            if cols > 0 {
                let args = blas::MatmulArgs {
                    m: tq,
                    n: cols,
                    k: d,
                    a: self.device_ptr(q),
                    trans_a: false,
                    b: self.device_ptr(p) + j0 as u64 * d as u64 * elem,
                    trans_b: true,
                    c: self.device_ptr(&scores),
                    in_type: q.dtype(),
                    out_type: DType::F32,
                    bias: None,
                    gelu: false,
                };
                // SAFETY: rows j0 .. j0 + cols of p lie inside p (maxsim_dims checked p_cu
                // against p's rows); scores is [tq, cols].
                unsafe { self.blas.lock().unwrap().matmul(&args)? };
            }
            let cfg = LaunchConfig {
                grid_dim: (
                    (n1 - n0) as u32,
                    tq.div_ceil(ROWS_PER_BLOCK as usize) as u32,
                    1,
                ),
                block_dim: (ROW_BLOCK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (ti, bi, ni, ji, ci) = (
                to_i32(OP, "query rows", tq)?,
                to_i32(OP, "passages", bp)?,
                to_i32(OP, "passages", n0)?,
                to_i32(OP, "passage rows", j0)?,
                to_i32(OP, "chunk rows", cols)?,
            );
            launch!(
                self,
                f,
                cfg,
                [&scores, &pc, &mut *best, &mut *arg, &ti, &bi, &ni, &ji, &ci]
            )?;
            n0 = n1;
        }
        Ok(())
    }
}

pub(super) fn maxsim(be: &Cuda, q: &T, q_cu: &[u32], p: &T, p_cu: &[u32]) -> Result<(T, T)> {
    const OP: &str = "maxsim";
    let (tq, d) = maxsim_dims(q, q_cu, p, p_cu)?;
    let (bq, bp) = (q_cu.len() - 1, p_cu.len() - 1);
    let mut best = be.alloc(&[tq, bp], DType::F32)?;
    let mut arg = be.alloc(&[tq, bp], DType::U32)?;
    let mut s = be.alloc(&[bq, bp], DType::F32)?;
    if tq * bp > 0 && d > 0 && be.maxsim_gemm.load(Ordering::Relaxed) {
        be.maxsim_rows_gemm(q, p, p_cu, &mut best, &mut arg)?;
    } else if tq * bp > 0 {
        let pc = be.upload(HostData::U32(p_cu), &[p_cu.len()])?;
        let f = be.func("maxsim", &format!("maxsim_rows_{}", sfx(q.dtype())))?;
        let (ti, bi, di) = (
            to_i32(OP, "query rows", tq)?,
            to_i32(OP, "passages", bp)?,
            to_i32(OP, "dim", d)?,
        );
        let cfg = LaunchConfig {
            grid_dim: (bp as u32, tq.div_ceil(ROWS_PER_BLOCK as usize) as u32, 1),
            block_dim: (ROW_BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(be, f, cfg, [q, p, &pc, &mut best, &mut arg, &ti, &bi, &di])?;
    }
    if bq * bp > 0 {
        let qc = be.upload(HostData::U32(q_cu), &[q_cu.len()])?;
        let f = be.func("maxsim", "maxsim_reduce")?;
        let (b1, b2) = (to_i32(OP, "queries", bq)?, to_i32(OP, "passages", bp)?);
        launch!(be, f, grid_1d(bq * bp), [&best, &qc, &mut s, &b1, &b2])?;
    }
    Ok((s, arg))
}

pub(super) fn maxsim_backward(
    be: &Cuda,
    ds: &T,
    q: &T,
    q_cu: &[u32],
    p: &T,
    p_cu: &[u32],
    argmax: &T,
) -> Result<(T, T)> {
    const OP: &str = "maxsim_backward";
    let (tq, d) = maxsim_dims(q, q_cu, p, p_cu)?;
    let (bq, bp) = (q_cu.len() - 1, p_cu.len() - 1);
    let tp = p.shape()[0];
    if ds.shape() != [bq, bp] || argmax.shape() != [tq, bp] {
        return shape_err(
            OP,
            format!(
                "ds {:?} / argmax {:?} do not match the sequences",
                ds.shape(),
                argmax.shape()
            ),
        );
    }
    check_dtype(OP, "ds", ds, DType::F32)?;
    check_dtype(OP, "argmax", argmax, DType::U32)?;
    let mut dq = be.zeros(q.shape(), q.dtype())?;
    let mut dp = be.zeros(p.shape(), p.dtype())?;
    if tq * bp * d == 0 {
        return Ok((dq, dp));
    }
    let seq_of = |cu: &[u32]| -> Vec<u32> {
        cu.windows(2)
            .enumerate()
            .flat_map(|(b, w)| (w[0]..w[1]).map(move |_| b as u32))
            .collect()
    };
    let qc = be.upload(HostData::U32(q_cu), &[q_cu.len()])?;
    let q_seq = seq_of(q_cu);
    let qs = be.upload(HostData::U32(&q_seq), &[tq])?;
    let (ti, bi, di) = (
        to_i32(OP, "query rows", tq)?,
        to_i32(OP, "passages", bp)?,
        to_i32(OP, "dim", d)?,
    );
    let sf = sfx(q.dtype());
    let f = be.func("maxsim", &format!("maxsim_bwd_q_{sf}"))?;
    launch!(
        be,
        f,
        grid_1d(tq * d),
        [ds, p, argmax, &qc, &qs, &mut dq, &ti, &bi, &di]
    )?;
    if tp > 0 {
        let p_seq = seq_of(p_cu);
        let ps = be.upload(HostData::U32(&p_seq), &[tp])?;
        let f = be.func("maxsim", &format!("maxsim_bwd_p_{sf}"))?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(OP, "passage rows", tp)? as u32, 1, 1),
            block_dim: (COL_BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            be,
            f,
            cfg,
            [ds, q, argmax, &qc, &qs, &ps, &mut dp, &ti, &bi, &di]
        )?;
    }
    Ok((dq, dp))
}

pub(super) fn lexical_scores(
    be: &Cuda,
    q: &LexicalSide<'_, Cuda>,
    p: &LexicalSide<'_, Cuda>,
) -> Result<T> {
    const OP: &str = "lexical_scores";
    check_lexical_side(q.weights, q.ids, q.cu)?;
    check_lexical_side(p.weights, p.ids, p.cu)?;
    let (bq, bp) = (q.cu.len() - 1, p.cu.len() - 1);
    let mut s = be.zeros(&[bq, bp], DType::F32)?;
    if bq * bp == 0 {
        return Ok(s);
    }
    let (_, qd) = be.lexical_side(OP, q)?;
    let (_, pd) = be.lexical_side(OP, p)?;
    let f = be.func("sparse", "lexical_scores")?;
    let cfg = LaunchConfig {
        grid_dim: (bp as u32, bq.div_ceil(ROWS_PER_BLOCK as usize) as u32, 1),
        block_dim: (ROW_BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (b1, b2) = (to_i32(OP, "queries", bq)?, to_i32(OP, "passages", bp)?);
    launch!(
        be,
        f,
        cfg,
        [&qd.ids, &qd.wmax, &qd.seg, &pd.ids, &pd.wmax, &pd.seg, &mut s, &b1, &b2]
    )?;
    Ok(s)
}

pub(super) fn lexical_scores_backward(
    be: &Cuda,
    ds: &T,
    q: &LexicalSide<'_, Cuda>,
    p: &LexicalSide<'_, Cuda>,
) -> Result<(T, T)> {
    const OP: &str = "lexical_scores_backward";
    check_lexical_side(q.weights, q.ids, q.cu)?;
    check_lexical_side(p.weights, p.ids, p.cu)?;
    let (bq, bp) = (q.cu.len() - 1, p.cu.len() - 1);
    if ds.shape() != [bq, bp] {
        return shape_err(OP, format!("ds is {:?}, expected [{bq}, {bp}]", ds.shape()));
    }
    check_dtype(OP, "ds", ds, DType::F32)?;
    let mut dq = be.zeros(q.weights.shape(), q.weights.dtype())?;
    let mut dp = be.zeros(p.weights.shape(), p.weights.dtype())?;
    if bq * bp == 0 {
        return Ok((dq, dp));
    }
    let (qe, qd) = be.lexical_side(OP, q)?;
    let (pe, pd) = be.lexical_side(OP, p)?;
    let (b1, b2) = (to_i32(OP, "queries", bq)?, to_i32(OP, "passages", bp)?);
    let one = 1i32;
    for (mine, md, other, od, dw, n_other, stride_self, stride_other) in [
        (&qe, &qd, &pe, &pd, &mut dq, b2, b2, one),
        (&pe, &pd, &qe, &qd, &mut dp, b1, one, b2),
    ] {
        let u = mine.ids.len();
        if u == 0 || other.ids.is_empty() {
            continue;
        }
        let f = be.func("sparse", &format!("lexical_bwd_{}", sfx(dw.dtype())))?;
        let ui = to_i32(OP, "entries", u)?;
        launch!(
            be,
            f,
            grid_1d(u),
            [
                ds,
                &md.ids,
                &md.seq,
                &md.warg,
                &od.ids,
                &od.wmax,
                &od.seg,
                dw,
                &ui,
                &n_other,
                &stride_self,
                &stride_other
            ]
        )?;
    }
    Ok((dq, dp))
}
