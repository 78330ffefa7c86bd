//! The CPU backend: the f32 reference every CUDA kernel is tested against.
//!
//! Plain Rust, parallel over rows with rayon, matmuls through m3's own packed SGEMM
//! (`sgemm.rs`: AVX-512 or AVX2 chosen at run time; the `gemm` crate elsewhere). It computes
//! in f32 only; bf16 tensors exist here so casts and uploads can be tested, and an op handed
//! one answers with a dtype error instead of silently converting.

mod attention;
pub mod fastmath;
pub mod linalg;
mod retrieval;
pub mod sgemm;

use half::bf16;
use linalg::{gemm_epilogue_fresh, Epilogue, View};
use rayon::prelude::*;

use super::{
    adamw_host, attention_dims, check_adamw, check_at, check_embedding_backward_at, check_float,
    check_ids, check_lexical_side, check_range, check_same, check_vec, count_host_sync,
    cross_entropy_dims, embedding_dims, layernorm_backward_dims, layernorm_dims, matmul_dims,
    maxsim_dims, AdamWStep, Backend, LayerNormGrads, LayerNormOut, LexicalSide, Seqs,
};
use crate::error::{dtype_err, shape_err, Result};
use crate::tensor::{DType, Device, HostData, Tensor};

/// Host memory behind a CPU tensor.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// u32 elements.
    U32(Vec<u32>),
    /// An f32 weight `[k, n]` packed into the matrix product's panels once
    /// (`Backend::pack_weight`); read as the right operand of a product, or unpacked.
    Packed(Box<sgemm::PackedB>),
}

/// The CPU reference backend.
#[derive(Clone, Debug, Default)]
pub struct Cpu;

type T = Tensor<Cpu>;

/// Rows below this many elements of work are not worth splitting across threads.
const PAR_MIN: usize = 1 << 14;

fn f32s<'a>(op: &'static str, name: &str, t: &'a T) -> Result<&'a [f32]> {
    match t.storage() {
        CpuStorage::F32(v) => Ok(v),
        CpuStorage::Packed(_) => dtype_err(
            op,
            format!("{name} is a weight packed for products; only matmul's untransposed right operand reads it"),
        ),
        _ => dtype_err(
            op,
            format!("the CPU backend computes in f32; {name} is {}", t.dtype()),
        ),
    }
}

fn u32s<'a>(op: &'static str, name: &str, t: &'a T) -> Result<&'a [u32]> {
    match t.storage() {
        CpuStorage::U32(v) => Ok(v),
        _ => dtype_err(op, format!("{name} must be u32, got {}", t.dtype())),
    }
}

fn tensor(shape: &[usize], v: Vec<f32>) -> T {
    Tensor::from_parts(shape.to_vec(), DType::F32, CpuStorage::F32(v))
}

/// `log Σ exp(row)`, shifted by the row's max and summed in f64.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// `dx[i] = F(dy[i], x[i])` for the pointwise activations' backward passes.
fn pointwise_backward<F: fastmath::Binary>(op: &'static str, dy: &T, x: &T) -> Result<T> {
    check_same(op, ("dy", dy), ("x", x))?;
    let (dyv, xv) = (f32s(op, "dy", dy)?, f32s(op, "x", x)?);
    let mut dx = vec![0.0; xv.len()];
    fastmath::map2_into::<F>(dyv, xv, &mut dx);
    Ok(tensor(x.shape(), dx))
}

/// Applies `f` to each row pair of `out` and `src`, in parallel when the work is large.
fn rows_mut<F>(out: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if cols == 0 {
        return;
    }
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

impl Device for Cpu {
    type Storage = CpuStorage;
}

/// `op(a) op(b) + bias`, then GELU when `gelu` (`Backend::matmul`, `Backend::linear_gelu`):
/// the bias and the activation are applied to each tile of the result as the product
/// finishes it, not in passes of their own.
fn product(
    a: &T,
    trans_a: bool,
    b: &T,
    trans_b: bool,
    bias: Option<&T>,
    out: DType,
    gelu: bool,
) -> Result<T> {
    const OP: &str = "matmul";
    let (m, k, n) = matmul_dims(a, trans_a, b, trans_b, bias, out)?;
    if out != DType::F32 {
        return dtype_err(OP, "the CPU backend computes in f32; output must be f32");
    }
    let av = f32s(OP, "A", a)?;
    let bias = bias.map(|t| f32s(OP, "bias", t)).transpose()?;
    let a_view = View::op(av, m, k, trans_a);
    let mut c = Vec::new();
    let threads = rayon::current_num_threads();
    let act = |row: &mut [f32]| fastmath::map_in_place::<fastmath::Gelu>(row);
    let ep = Epilogue {
        bias,
        map: if gelu { Some(&act) } else { None },
    };
    match b.storage() {
        CpuStorage::Packed(p) if !trans_b => {
            linalg::gemm_epilogue_fresh_packed(&mut c, a_view, p, ep, threads)
        }
        _ => {
            let b_view = View::op(f32s(OP, "B", b)?, k, n, trans_b);
            gemm_epilogue_fresh(&mut c, a_view, b_view, ep, threads)
        }
    }
    Ok(tensor(&[m, n], c))
}

/// A float tensor's values as f32 (a copy).
fn f32_values(t: &T) -> Result<Vec<f32>> {
    match t.storage() {
        CpuStorage::F32(v) => Ok(v.clone()),
        CpuStorage::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        CpuStorage::Packed(p) => Ok(p.unpack()),
        CpuStorage::U32(_) => dtype_err("to_vec_f32", "tensor is u32"),
    }
}

impl Backend for Cpu {
    type SeqsKept = ();

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn keep_seqs(&self, _cu_seqlens: &[u32]) -> Result<()> {
        Ok(())
    }

    fn take_vec_f32(&self, t: T) -> Result<Vec<f32>> {
        count_host_sync();
        let n = t.numel();
        match t.into_storage() {
            CpuStorage::F32(mut v) => {
                v.truncate(n);
                Ok(v)
            }
            CpuStorage::Packed(p) => Ok(p.unpack()),
            _ => dtype_err("take_vec_f32", "the CPU backend computes in f32"),
        }
    }

    fn write_f32(&self, t: &mut T, data: &[f32]) -> Result<()> {
        let n = t.numel();
        match t.storage_mut() {
            CpuStorage::F32(v) if data.len() == n && v.len() >= n => {
                v[..n].copy_from_slice(data);
                Ok(())
            }
            // New values make the packed panels stale: the tensor is plain again.
            s @ CpuStorage::Packed(_) if data.len() == n => {
                *s = CpuStorage::F32(data.to_vec());
                Ok(())
            }
            _ => shape_err(
                "write_f32",
                format!("{} values for a tensor of {n} f32 elements", data.len()),
            ),
        }
    }

    fn upload_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return shape_err(
                "upload",
                format!("{} elements do not fill shape {shape:?}", data.len()),
            );
        }
        Ok(Tensor::from_parts(
            shape.to_vec(),
            DType::F32,
            CpuStorage::F32(data),
        ))
    }

    fn upload(&self, data: HostData<'_>, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return shape_err(
                "upload",
                format!("{} elements do not fill shape {shape:?}", data.len()),
            );
        }
        let storage = match data {
            HostData::F32(v) => CpuStorage::F32(v.to_vec()),
            HostData::BF16(v) => CpuStorage::BF16(v.to_vec()),
            HostData::U32(v) => CpuStorage::U32(v.to_vec()),
        };
        Ok(Tensor::from_parts(shape.to_vec(), data.dtype(), storage))
    }

    fn to_vec_f32(&self, t: &T) -> Result<Vec<f32>> {
        count_host_sync();
        f32_values(t)
    }

    fn to_vec_u32(&self, t: &T) -> Result<Vec<u32>> {
        count_host_sync();
        u32s("to_vec_u32", "tensor", t).map(<[u32]>::to_vec)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n = shape.iter().product();
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            DType::U32 => CpuStorage::U32(vec![0; n]),
        };
        Ok(Tensor::from_parts(shape.to_vec(), dtype, storage))
    }

    fn cast(&self, x: &T, dtype: DType) -> Result<T> {
        check_float("cast", "x", x)?;
        let v = f32_values(x)?;
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
            DType::U32 => return dtype_err("cast", "cannot cast floats to u32"),
        };
        Ok(Tensor::from_parts(x.shape().to_vec(), dtype, storage))
    }

    fn matmul(
        &self,
        a: &T,
        trans_a: bool,
        b: &T,
        trans_b: bool,
        bias: Option<&T>,
        out: DType,
    ) -> Result<T> {
        product(a, trans_a, b, trans_b, bias, out, false)
    }

    fn linear_gelu(&self, x: &T, w: &T, bias: &T) -> Result<T> {
        product(x, false, w, false, Some(bias), x.dtype(), true)
    }

    fn pack_weight(&self, w: &mut T) -> Result<()> {
        let (k, n) = match w.shape() {
            &[k, n] => (k, n),
            s => return shape_err("pack_weight", format!("a weight must be [k, n], got {s:?}")),
        };
        let packed = match w.storage() {
            CpuStorage::F32(v) => {
                linalg::pack_weight(View::rows(v, k, n), rayon::current_num_threads())
            }
            _ => None,
        };
        if let Some(p) = packed {
            *w.storage_mut() = CpuStorage::Packed(Box::new(p));
        }
        Ok(())
    }

    fn add(&self, a: &T, b: &T) -> Result<T> {
        check_same("add", ("a", a), ("b", b))?;
        let av = f32s("add", "a", a)?;
        let bv = f32s("add", "b", b)?;
        Ok(tensor(
            a.shape(),
            av.iter().zip(bv).map(|(x, y)| x + y).collect(),
        ))
    }

    fn adamw(
        &self,
        p: &mut T,
        p_at: usize,
        g: &T,
        m: &mut T,
        v: &mut T,
        range: std::ops::Range<usize>,
        s: &AdamWStep,
    ) -> Result<()> {
        const OP: &str = "adamw";
        check_adamw(p, p_at, g, m, v, &range)?;
        let gv = &f32s(OP, "g", g)?[range.clone()];
        let (CpuStorage::F32(pv), CpuStorage::F32(mv), CpuStorage::F32(vv)) =
            (p.storage_mut(), m.storage_mut(), v.storage_mut())
        else {
            return dtype_err(OP, "the CPU backend computes in f32");
        };
        // Elementwise: chunks across threads give the same bits as one pass.
        const CHUNK: usize = 1 << 16;
        pv[p_at..p_at + range.len()]
            .par_chunks_mut(CHUNK)
            .zip(mv[range.clone()].par_chunks_mut(CHUNK))
            .zip(vv[range].par_chunks_mut(CHUNK))
            .zip(gv.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| adamw_host(p, g, m, v, s));
        Ok(())
    }

    fn zero(&self, t: &mut T) -> Result<()> {
        let n = t.numel();
        match t.storage_mut() {
            CpuStorage::F32(v) => v[..n].par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0)),
            _ => return dtype_err("zero", "the CPU backend computes in f32"),
        }
        Ok(())
    }

    fn add_at(&self, dst: &mut T, offset: usize, src: &T) -> Result<()> {
        const OP: &str = "add_at";
        check_at(OP, dst, offset, src)?;
        let sv = &f32s(OP, "src", src)?[..src.numel()];
        let CpuStorage::F32(dv) = dst.storage_mut() else {
            return dtype_err(OP, "the arena must be f32");
        };
        const CHUNK: usize = 1 << 16;
        dv[offset..offset + sv.len()]
            .par_chunks_mut(CHUNK)
            .zip(sv.par_chunks(CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
        Ok(())
    }

    fn read_at(&self, src: &T, offset: usize, dst: &mut T) -> Result<()> {
        const OP: &str = "read_at";
        check_at(OP, src, offset, dst)?;
        let n = dst.numel();
        let sv = &f32s(OP, "src", src)?[offset..offset + n];
        let CpuStorage::F32(dv) = dst.storage_mut() else {
            return dtype_err(OP, "the CPU backend computes in f32");
        };
        dv[..n].copy_from_slice(sv);
        Ok(())
    }

    fn sum_squares(&self, x: &T) -> Result<f64> {
        count_host_sync();
        let v = f32s("sum_squares", "x", x)?;
        let parts: Vec<f64> = v
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&e| e as f64 * e as f64).sum::<f64>())
            .collect();
        Ok(parts.iter().sum())
    }

    fn add_assign(&self, a: &mut T, b: &T) -> Result<()> {
        check_same("add", ("a", a), ("b", b))?;
        let bv = f32s("add", "b", b)?;
        let n = a.numel();
        match a.storage_mut() {
            CpuStorage::F32(av) => {
                av[..n]
                    .par_iter_mut()
                    .zip(&bv[..n])
                    .for_each(|(x, &y)| *x += y);
                Ok(())
            }
            _ => dtype_err("add", "the CPU backend computes in f32"),
        }
    }

    fn sum_rows(&self, x: &T) -> Result<T> {
        let (rows, cols) = x.rows_cols();
        let v = f32s("sum_rows", "x", x)?;
        // Accumulate in f64 so the reference's rounding does not depend on the row count.
        let mut acc = vec![0f64; cols];
        for r in 0..rows {
            for (a, &e) in acc.iter_mut().zip(&v[r * cols..(r + 1) * cols]) {
                *a += e as f64;
            }
        }
        Ok(tensor(&[cols], acc.into_iter().map(|a| a as f32).collect()))
    }

    fn layernorm(&self, x: &T, gamma: &T, beta: &T, eps: f32) -> Result<LayerNormOut<Self>> {
        const OP: &str = "layernorm";
        let (rows, cols) = layernorm_dims(x, gamma, beta)?;
        let xv = f32s(OP, "x", x)?;
        let g = f32s(OP, "gamma", gamma)?;
        let bt = f32s(OP, "beta", beta)?;
        let stats: Vec<(f32, f32)> = (0..rows)
            .into_par_iter()
            .map(|r| {
                let row = &xv[r * cols..(r + 1) * cols];
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
                (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
            })
            .collect();
        let mut y = vec![0f32; rows * cols];
        rows_mut(&mut y, cols, |r, out| {
            let (mean, rstd) = stats[r];
            let row = &xv[r * cols..(r + 1) * cols];
            for c in 0..cols {
                out[c] = (row[c] - mean) * rstd * g[c] + bt[c];
            }
        });
        Ok(LayerNormOut {
            y: tensor(x.shape(), y),
            mean: tensor(&[rows], stats.iter().map(|s| s.0).collect()),
            rstd: tensor(&[rows], stats.iter().map(|s| s.1).collect()),
        })
    }

    fn layernorm_backward(
        &self,
        dy: &T,
        x: &T,
        gamma: &T,
        mean: &T,
        rstd: &T,
    ) -> Result<LayerNormGrads<Self>> {
        const OP: &str = "layernorm_backward";
        let (rows, cols) = layernorm_backward_dims(dy, x, gamma, mean, rstd)?;
        let dyv = f32s(OP, "dy", dy)?;
        let xv = f32s(OP, "x", x)?;
        let g = f32s(OP, "gamma", gamma)?;
        let mv = f32s(OP, "mean", mean)?;
        let rv = f32s(OP, "rstd", rstd)?;
        let mut dx = vec![0f32; rows * cols];
        rows_mut(&mut dx, cols, |r, out| {
            let (m, s) = (mv[r], rv[r]);
            let xr = &xv[r * cols..(r + 1) * cols];
            let dr = &dyv[r * cols..(r + 1) * cols];
            // dx = rstd · (g·dy - mean(g·dy) - xhat · mean(g·dy·xhat))
            let (mut a, mut b) = (0f64, 0f64);
            for c in 0..cols {
                let xhat = (xr[c] - m) * s;
                let gd = (g[c] * dr[c]) as f64;
                a += gd;
                b += gd * xhat as f64;
            }
            let (a, b) = ((a / cols as f64) as f32, (b / cols as f64) as f32);
            for c in 0..cols {
                let xhat = (xr[c] - m) * s;
                out[c] = s * (g[c] * dr[c] - a - xhat * b);
            }
        });
        let mut dg = vec![0f64; cols];
        let mut db = vec![0f64; cols];
        for r in 0..rows {
            for c in 0..cols {
                let d = dyv[r * cols + c] as f64;
                dg[c] += d * ((xv[r * cols + c] - mv[r]) * rv[r]) as f64;
                db[c] += d;
            }
        }
        Ok(LayerNormGrads {
            dx: tensor(x.shape(), dx),
            dgamma: tensor(&[cols], dg.into_iter().map(|v| v as f32).collect()),
            dbeta: tensor(&[cols], db.into_iter().map(|v| v as f32).collect()),
        })
    }

    fn gelu(&self, x: &T) -> Result<T> {
        let xv = f32s("gelu", "x", x)?;
        let mut y = vec![0.0; xv.len()];
        fastmath::map_into::<fastmath::Gelu>(xv, &mut y);
        Ok(tensor(x.shape(), y))
    }

    fn gelu_backward(&self, dy: &T, x: &T) -> Result<T> {
        pointwise_backward::<fastmath::GeluBackward>("gelu_backward", dy, x)
    }

    fn relu(&self, x: &T) -> Result<T> {
        let xv = f32s("relu", "x", x)?;
        Ok(tensor(x.shape(), xv.iter().map(|&v| v.max(0.0)).collect()))
    }

    fn relu_backward(&self, dy: &T, x: &T) -> Result<T> {
        pointwise_backward::<fastmath::ReluBackward>("relu_backward", dy, x)
    }

    fn embedding(&self, table: &T, ids: &T) -> Result<T> {
        const OP: &str = "embedding";
        let (vocab, dim, n) = embedding_dims(table, ids)?;
        let tv = f32s(OP, "table", table)?;
        let iv = u32s(OP, "ids", ids)?;
        check_ids(OP, iv, vocab)?;
        let mut out = vec![0f32; n * dim];
        rows_mut(&mut out, dim, |r, row| {
            let id = iv[r] as usize;
            row.copy_from_slice(&tv[id * dim..(id + 1) * dim]);
        });
        Ok(tensor(&[n, dim], out))
    }

    fn embedding_backward(&self, dy: &T, ids: &T, vocab: usize) -> Result<T> {
        let dim = dy.rows_cols().1;
        let mut out = tensor(&[vocab, dim], vec![0f32; vocab * dim]);
        self.embedding_backward_at(dy, ids, &mut out, 0, vocab)?;
        Ok(out)
    }

    fn embedding_backward_at(
        &self,
        dy: &T,
        ids: &T,
        grad: &mut T,
        offset: usize,
        vocab: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let (_, dim) = check_embedding_backward_at(dy, ids, grad, offset, vocab)?;
        let dyv = f32s(OP, "dy", dy)?;
        let iv = u32s(OP, "ids", ids)?;
        check_ids(OP, iv, vocab)?;
        let CpuStorage::F32(out) = grad.storage_mut() else {
            return dtype_err(OP, "the CPU backend computes in f32");
        };
        let table = &mut out[offset..offset + vocab * dim];
        for (r, &id) in iv.iter().enumerate() {
            let dst = &mut table[id as usize * dim..(id as usize + 1) * dim];
            for (d, &g) in dst.iter_mut().zip(&dyv[r * dim..(r + 1) * dim]) {
                *d += g;
            }
        }
        Ok(())
    }

    fn zero_at(&self, t: &mut T, offset: usize, len: usize) -> Result<()> {
        check_range("zero_at", t, &(offset..offset + len))?;
        let CpuStorage::F32(d) = t.storage_mut() else {
            return dtype_err("zero_at", "the arena must be f32");
        };
        d[offset..offset + len].fill(0.0);
        Ok(())
    }

    fn ids_on_host(&self, ids: &T) -> Option<Vec<u32>> {
        u32s("ids_on_host", "ids", ids).ok().map(<[u32]>::to_vec)
    }

    fn zero_rows_at(&self, t: &mut T, offset: usize, width: usize, rows: &[u32]) -> Result<()> {
        const OP: &str = "zero_rows_at";
        if let Some(&r) = rows.iter().max() {
            let end = offset + (r as usize + 1) * width;
            check_range(OP, t, &(offset..end))?;
        }
        let CpuStorage::F32(d) = t.storage_mut() else {
            return dtype_err(OP, "the arena must be f32");
        };
        for &r in rows {
            let at = offset + r as usize * width;
            d[at..at + width].fill(0.0);
        }
        Ok(())
    }

    fn l2_normalize(&self, x: &T, eps: f32) -> Result<(T, T)> {
        let xv = f32s("l2_normalize", "x", x)?;
        let (rows, cols) = x.rows_cols();
        let norms: Vec<f32> = (0..rows)
            .map(|r| {
                let s: f64 = xv[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum();
                s.sqrt() as f32
            })
            .collect();
        let mut y = vec![0f32; rows * cols];
        rows_mut(&mut y, cols, |r, out| {
            let d = norms[r].max(eps);
            for (o, &v) in out.iter_mut().zip(&xv[r * cols..(r + 1) * cols]) {
                *o = v / d;
            }
        });
        Ok((tensor(x.shape(), y), tensor(&[rows], norms)))
    }

    fn l2_normalize_backward(&self, dy: &T, y: &T, norms: &T, eps: f32) -> Result<T> {
        const OP: &str = "l2_normalize_backward";
        check_same(OP, ("dy", dy), ("y", y))?;
        let (rows, cols) = y.rows_cols();
        check_vec(OP, "norms", norms, rows)?;
        let dyv = f32s(OP, "dy", dy)?;
        let yv = f32s(OP, "y", y)?;
        let nv = f32s(OP, "norms", norms)?;
        let mut dx = vec![0f32; rows * cols];
        rows_mut(&mut dx, cols, |r, out| {
            let dr = &dyv[r * cols..(r + 1) * cols];
            if nv[r] > eps {
                // y = x/‖x‖: dx = (dy - y·<dy, y>) / ‖x‖
                let yr = &yv[r * cols..(r + 1) * cols];
                let dot: f64 = dr.iter().zip(yr).map(|(&a, &b)| a as f64 * b as f64).sum();
                for c in 0..cols {
                    out[c] = (dr[c] - yr[c] * dot as f32) / nv[r];
                }
            } else {
                // Below eps the denominator is the constant eps.
                for c in 0..cols {
                    out[c] = dr[c] / eps;
                }
            }
        });
        Ok(tensor(y.shape(), dx))
    }

    fn attention(
        &self,
        q: &T,
        k: &T,
        v: &T,
        seqs: &Seqs<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<(T, T)> {
        const OP: &str = "attention";
        let (t, hidden, head_dim) = attention_dims(q, k, v, seqs, heads)?;
        let g = attention::Geometry {
            hidden,
            head_dim,
            heads,
            scale,
        };
        let (out, lse) = attention::forward(
            f32s(OP, "q", q)?,
            f32s(OP, "k", k)?,
            f32s(OP, "v", v)?,
            seqs.cu_seqlens(),
            g,
        );
        Ok((tensor(&[t, hidden], out), tensor(&[t, heads], lse)))
    }

    fn attention_backward(
        &self,
        dout: &T,
        q: &T,
        k: &T,
        v: &T,
        out: &T,
        lse: &T,
        seqs: &Seqs<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<(T, T, T)> {
        const OP: &str = "attention_backward";
        let (t, hidden, head_dim) = attention_dims(q, k, v, seqs, heads)?;
        check_same(OP, ("dout", dout), ("q", q))?;
        check_same(OP, ("out", out), ("q", q))?;
        if lse.shape() != [t, heads] {
            return shape_err(
                OP,
                format!("lse must be [{t}, {heads}], got {:?}", lse.shape()),
            );
        }
        let g = attention::Geometry {
            hidden,
            head_dim,
            heads,
            scale,
        };
        let (dq, dk, dv) = attention::backward(
            f32s(OP, "dout", dout)?,
            f32s(OP, "q", q)?,
            f32s(OP, "k", k)?,
            f32s(OP, "v", v)?,
            f32s(OP, "lse", lse)?,
            seqs.cu_seqlens(),
            g,
        );
        Ok((
            tensor(q.shape(), dq),
            tensor(q.shape(), dk),
            tensor(q.shape(), dv),
        ))
    }

    fn softmax_cross_entropy(&self, logits: &T, targets: &T) -> Result<(T, T)> {
        const OP: &str = "softmax_cross_entropy";
        let (rows, cols) = cross_entropy_dims(logits, targets)?;
        let lv = f32s(OP, "logits", logits)?;
        let tv = u32s(OP, "targets", targets)?;
        check_ids(OP, tv, cols)?;
        let mut loss = vec![0f32; rows];
        let mut lse = vec![0f32; rows];
        for r in 0..rows {
            let row = &lv[r * cols..(r + 1) * cols];
            lse[r] = log_sum_exp(row);
            loss[r] = lse[r] - row[tv[r] as usize];
        }
        Ok((tensor(&[rows], loss), tensor(&[rows], lse)))
    }

    fn softmax_cross_entropy_backward(
        &self,
        dloss: &T,
        logits: &T,
        lse: &T,
        targets: &T,
    ) -> Result<T> {
        const OP: &str = "softmax_cross_entropy_backward";
        let (rows, cols) = cross_entropy_dims(logits, targets)?;
        check_vec(OP, "dloss", dloss, rows)?;
        check_vec(OP, "lse", lse, rows)?;
        let dv = f32s(OP, "dloss", dloss)?;
        let lv = f32s(OP, "logits", logits)?;
        let sv = f32s(OP, "lse", lse)?;
        let tv = u32s(OP, "targets", targets)?;
        check_ids(OP, tv, cols)?;
        let mut out = vec![0f32; rows * cols];
        rows_mut(&mut out, cols, |r, o| {
            for c in 0..cols {
                let p = (lv[r * cols + c] - sv[r]).exp();
                let hot = if c == tv[r] as usize { 1.0 } else { 0.0 };
                o[c] = dv[r] * (p - hot);
            }
        });
        Ok(tensor(logits.shape(), out))
    }
    fn scale(&self, x: &T, c: f32) -> Result<T> {
        let v = f32s("scale", "x", x)?;
        Ok(tensor(x.shape(), v.iter().map(|a| a * c).collect()))
    }

    fn dropout(&self, x: &T, p: f32, seed: u64) -> Result<T> {
        let v = f32s("dropout", "x", x)?;
        Ok(tensor(
            x.shape(),
            v.iter()
                .enumerate()
                .map(|(i, &a)| a * super::dropout_keep(seed, i as u64, p))
                .collect(),
        ))
    }

    fn sum_all(&self, x: &T) -> Result<T> {
        let v = f32s("sum_all", "x", x)?;
        Ok(tensor(
            &[1],
            vec![v.iter().map(|&a| a as f64).sum::<f64>() as f32],
        ))
    }

    fn fill(&self, shape: &[usize], value: f32, dtype: DType) -> Result<T> {
        let t = tensor(shape, vec![value; shape.iter().product()]);
        if dtype == DType::F32 {
            Ok(t)
        } else {
            self.cast(&t, dtype)
        }
    }

    fn soft_cross_entropy(&self, logits: &T, targets: &T) -> Result<(T, T)> {
        const OP: &str = "soft_cross_entropy";
        check_same(OP, ("logits", logits), ("targets", targets))?;
        let (rows, cols) = logits.rows_cols();
        let (lv, tv) = (f32s(OP, "logits", logits)?, f32s(OP, "targets", targets)?);
        let mut loss = vec![0f32; rows];
        let mut lse = vec![0f32; rows];
        for r in 0..rows {
            let row = &lv[r * cols..(r + 1) * cols];
            lse[r] = log_sum_exp(row);
            loss[r] = (0..cols)
                .map(|c| -tv[r * cols + c] * (row[c] - lse[r]))
                .sum();
        }
        Ok((tensor(&[rows], loss), tensor(&[rows], lse)))
    }

    fn soft_cross_entropy_backward(
        &self,
        dloss: &T,
        logits: &T,
        lse: &T,
        targets: &T,
    ) -> Result<T> {
        const OP: &str = "soft_cross_entropy_backward";
        check_same(OP, ("logits", logits), ("targets", targets))?;
        let (rows, cols) = logits.rows_cols();
        check_vec(OP, "dloss", dloss, rows)?;
        check_vec(OP, "lse", lse, rows)?;
        let (dv, lv, sv, tv) = (
            f32s(OP, "dloss", dloss)?,
            f32s(OP, "logits", logits)?,
            f32s(OP, "lse", lse)?,
            f32s(OP, "targets", targets)?,
        );
        let mut out = vec![0f32; rows * cols];
        rows_mut(&mut out, cols, |r, o| {
            let t = &tv[r * cols..(r + 1) * cols];
            let total: f32 = t.iter().sum();
            for c in 0..cols {
                o[c] = dv[r] * ((lv[r * cols + c] - sv[r]).exp() * total - t[c]);
            }
        });
        Ok(tensor(logits.shape(), out))
    }

    fn maxsim(&self, q: &T, q_cu: &[u32], p: &T, p_cu: &[u32]) -> Result<(T, T)> {
        let (tq, d) = maxsim_dims(q, q_cu, p, p_cu)?;
        let (s, arg) = retrieval::maxsim(
            f32s("maxsim", "q", q)?,
            q_cu,
            f32s("maxsim", "p", p)?,
            p_cu,
            d,
        );
        let bp = p_cu.len() - 1;
        Ok((
            tensor(&[q_cu.len() - 1, bp], s),
            Tensor::from_parts(vec![tq, bp], DType::U32, CpuStorage::U32(arg)),
        ))
    }

    fn maxsim_backward(
        &self,
        ds: &T,
        q: &T,
        q_cu: &[u32],
        p: &T,
        p_cu: &[u32],
        argmax: &T,
    ) -> Result<(T, T)> {
        const OP: &str = "maxsim_backward";
        let (tq, d) = maxsim_dims(q, q_cu, p, p_cu)?;
        let bp = p_cu.len() - 1;
        if ds.shape() != [q_cu.len() - 1, bp] || argmax.shape() != [tq, bp] {
            return shape_err(
                OP,
                format!(
                    "ds {:?} / argmax {:?} do not match the sequences",
                    ds.shape(),
                    argmax.shape()
                ),
            );
        }
        let arg = u32s(OP, "argmax", argmax)?;
        let (dq, dp) = retrieval::maxsim_backward(
            f32s(OP, "ds", ds)?,
            f32s(OP, "q", q)?,
            q_cu,
            f32s(OP, "p", p)?,
            p_cu,
            arg,
            d,
        );
        Ok((tensor(q.shape(), dq), tensor(p.shape(), dp)))
    }

    fn lexical_scores(&self, q: &LexicalSide<'_, Self>, p: &LexicalSide<'_, Self>) -> Result<T> {
        let (sq, sp) = (lexical_side(q)?, lexical_side(p)?);
        Ok(tensor(
            &[q.cu.len() - 1, p.cu.len() - 1],
            retrieval::lexical(&sq, &sp),
        ))
    }

    fn lexical_scores_backward(
        &self,
        ds: &T,
        q: &LexicalSide<'_, Self>,
        p: &LexicalSide<'_, Self>,
    ) -> Result<(T, T)> {
        let (sq, sp) = (lexical_side(q)?, lexical_side(p)?);
        if ds.shape() != [q.cu.len() - 1, p.cu.len() - 1] {
            return shape_err(
                "lexical_scores_backward",
                format!(
                    "ds is {:?} for {} x {} sequences",
                    ds.shape(),
                    q.cu.len() - 1,
                    p.cu.len() - 1
                ),
            );
        }
        let (dq, dp) =
            retrieval::lexical_backward(f32s("lexical_scores_backward", "ds", ds)?, &sq, &sp);
        Ok((tensor(q.weights.shape(), dq), tensor(p.weights.shape(), dp)))
    }
}

/// A validated host view of one lexical side.
fn lexical_side<'a>(s: &'a LexicalSide<'a, Cpu>) -> Result<retrieval::Side<'a>> {
    let w = f32s("lexical_scores", "weights", s.weights)?;
    check_lexical_side(s.weights, s.ids, s.cu)?;
    Ok(retrieval::Side {
        w,
        ids: s.ids,
        cu: s.cu,
        excluded: s.excluded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The fused `linear_gelu` (bias and GELU in the product's epilogue) gives the bits of
    /// the trait's reference composition, `gelu(matmul(x, w, bias))`, on a shape with edge
    /// tiles in both dimensions and more than one `KC` slice.
    #[test]
    fn linear_gelu_is_the_composition_bit_for_bit() {
        let (m, k, n) = (37, 300, 70);
        let mut rng = Rng::new(5);
        let up = |v: Vec<f32>, s: &[usize]| Cpu.upload(HostData::F32(&v), s).unwrap();
        let x = up(rng.vec(m * k, -1.0, 1.0), &[m, k]);
        let w = up(rng.vec(k * n, -0.2, 0.2), &[k, n]);
        let b = up(rng.vec(n, -1.0, 1.0), &[n]);
        let fused = Cpu
            .to_vec_f32(&Cpu.linear_gelu(&x, &w, &b).unwrap())
            .unwrap();
        let product = Cpu
            .matmul(&x, false, &w, false, Some(&b), DType::F32)
            .unwrap();
        let composed = Cpu.to_vec_f32(&Cpu.gelu(&product).unwrap()).unwrap();
        assert_eq!(fused.len(), m * n);
        for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
            assert_eq!(f.to_bits(), c.to_bits(), "element {i}: {f} vs {c}");
        }
    }

    /// A weight packed once (`pack_weight`) gives the bits of the plain weight in every
    /// product that reads it (with a bias, with the GELU epilogue, edge tiles, several `KC`
    /// slices), reads back whole, is refused where it would be read transposed, and is
    /// plain again after `write_f32`.
    #[test]
    fn a_packed_weight_gives_the_plain_weight_s_bits() {
        let (m, k, n) = (37, 300, 64);
        let mut rng = Rng::new(6);
        let up = |v: &[f32], s: &[usize]| Cpu.upload(HostData::F32(v), s).unwrap();
        let wv = rng.vec(k * n, -0.2, 0.2);
        let x = up(&rng.vec(m * k, -1.0, 1.0), &[m, k]);
        let b = up(&rng.vec(n, -1.0, 1.0), &[n]);
        let plain = up(&wv, &[k, n]);
        let mut packed = up(&wv, &[k, n]);
        Cpu.pack_weight(&mut packed).unwrap();
        if sgemm::kernels().is_empty() {
            return; // no packed kernel on this CPU: `pack_weight` leaves the weight as it is
        }
        assert!(matches!(packed.storage(), CpuStorage::Packed(_)));
        let bits = |t: T| {
            Cpu.to_vec_f32(&t)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let mm = |w: &T| {
            Cpu.matmul(&x, false, w, false, Some(&b), DType::F32)
                .unwrap()
        };
        assert!(
            bits(mm(&packed)) == bits(mm(&plain)),
            "matmul with a bias differs"
        );
        let gelu = |w: &T| Cpu.linear_gelu(&x, w, &b).unwrap();
        assert!(
            bits(gelu(&packed)) == bits(gelu(&plain)),
            "linear_gelu differs"
        );
        assert!(Cpu.to_vec_f32(&packed).unwrap() == wv, "read back differs");
        let y = up(&rng.vec(m * n, -1.0, 1.0), &[m, n]);
        let err = Cpu
            .matmul(&y, false, &packed, true, None, DType::F32)
            .unwrap_err();
        assert!(err.to_string().contains("packed"), "{err}");
        let new = rng.vec(k * n, -0.2, 0.2);
        Cpu.write_f32(&mut packed, &new).unwrap();
        assert!(matches!(packed.storage(), CpuStorage::F32(_)));
        assert!(Cpu.to_vec_f32(&packed).unwrap() == new);
    }
}
