//! `elementwise.cu`: row sums, scaling, fills, sums of squares, AdamW and the arena's
//! offset accumulate / read.

use super::*;

pub(super) fn sum_rows(be: &Cuda, x: &T) -> Result<T> {
    check_float("sum_rows", "x", x)?;
    let (rows, cols) = x.rows_cols();
    let mut out = be.alloc(&[cols], DType::F32)?;
    if cols == 0 {
        return Ok(out);
    }
    if rows == 0 {
        be.memset_zero(&mut out)?;
        return Ok(out);
    }
    let f = be.func("elementwise", &format!("sum_rows_{}", sfx(x.dtype())))?;
    let (r, c) = (
        to_i32("sum_rows", "rows", rows)?,
        to_i32("sum_rows", "cols", cols)?,
    );
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(SUM_ROWS_COLS as usize) as u32, 1, 1),
        block_dim: (SUM_ROWS_COLS, SUM_ROWS_STRIDES, 1),
        shared_mem_bytes: 0,
    };
    launch!(be, f, cfg, [x, &mut out, &r, &c])?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adamw(
    be: &Cuda,
    p: &mut T,
    p_at: usize,
    g: &T,
    m: &mut T,
    v: &mut T,
    range: std::ops::Range<usize>,
    s: &AdamWStep,
) -> Result<()> {
    check_adamw(p, p_at, g, m, v, &range)?;
    let n = range.len() as i64;
    if n > 0 {
        let f = be.func("elementwise", &format!("adamw_{}", sfx(g.dtype())))?;
        // Each buffer's first element of the update (the kernel indexes from 0).
        let at = |t: &T, k: usize| be.device_ptr(t) + (k * t.dtype().size()) as u64;
        let (pp, gp, mp, vp) = (
            at(p, p_at),
            at(g, range.start),
            at(m, range.start),
            at(v, range.start),
        );
        launch!(
            be,
            f,
            grid_1d(n as usize),
            [
                &pp,
                &gp,
                &mp,
                &vp,
                &n,
                &s.grad_scale,
                &s.beta1,
                &s.beta2,
                &s.eps,
                &s.step_size,
                &s.bc2_sqrt,
                &s.decay
            ]
        )?;
    }
    Ok(())
}

pub(super) fn add_at(be: &Cuda, dst: &mut T, offset: usize, src: &T) -> Result<()> {
    const OP: &str = "add_at";
    check_at(OP, dst, offset, src)?;
    let n = src.numel() as i64;
    if n > 0 {
        let f = be.func("elementwise", &format!("accumulate_{}", sfx(src.dtype())))?;
        let d = be.device_ptr(dst) + (offset * 4) as u64;
        launch!(be, f, grid_1d(n as usize), [&d, src, &n])?;
    }
    Ok(())
}

pub(super) fn read_at(be: &Cuda, src: &T, offset: usize, dst: &mut T) -> Result<()> {
    const OP: &str = "read_at";
    check_at(OP, src, offset, dst)?;
    let n = dst.numel();
    if n == 0 {
        return Ok(());
    }
    let s = be.device_ptr(src) + (offset * 4) as u64;
    if dst.dtype() == DType::F32 {
        let d = be.device_ptr(dst);
        // SAFETY: both ranges were checked against their tensors' sizes above and lie
        // in different allocations (src is the arena, dst a compute tensor).
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, n * 4, be.stream.cu_stream()) }
            .map_err(|e| cuda_err(OP, e))
    } else {
        let f = be.func("elementwise", "cast_f32_bf16")?;
        let n = n as i64;
        launch!(be, f, grid_1d(n as usize), [&s, dst, &n])
    }
}

pub(super) fn sum_squares(be: &Cuda, x: &T) -> Result<f64> {
    const OP: &str = "sum_squares";
    check_float(OP, "x", x)?;
    let n = x.numel() as i64;
    if n == 0 {
        return Ok(0.0);
    }
    let mut partial = be
        .stream
        .alloc_zeros::<f64>(SUM_SQUARES_BLOCKS as usize)
        .map_err(|e| cuda_err(OP, e))?;
    let f = be.func("elementwise", &format!("sum_squares_{}", sfx(x.dtype())))?;
    let cfg = LaunchConfig {
        grid_dim: (SUM_SQUARES_BLOCKS, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(be, f, cfg, [x, &mut partial, &n])?;
    count_host_sync();
    let host = be
        .stream
        .clone_dtoh(&partial)
        .map_err(|e| cuda_err(OP, e))?;
    Ok(host.iter().sum())
}

pub(super) fn scale(be: &Cuda, x: &T, c: f32) -> Result<T> {
    check_float("scale", "x", x)?;
    let f = be.func("elementwise", &format!("scale_{}", sfx(x.dtype())))?;
    let mut y = be.alloc(x.shape(), x.dtype())?;
    let n = x.numel() as i64;
    if n > 0 {
        launch!(be, f, grid_1d(n as usize), [x, &mut y, &c, &n])?;
    }
    Ok(y)
}

pub(super) fn sum_all(be: &Cuda, x: &T) -> Result<T> {
    check_float("sum_all", "x", x)?;
    let mut out = be.zeros(&[1], DType::F32)?;
    let n = x.numel() as i64;
    if n > 0 {
        let f = be.func("elementwise", &format!("sum_all_{}", sfx(x.dtype())))?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(be, f, cfg, [x, &mut out, &n])?;
    }
    Ok(out)
}

pub(super) fn fill(be: &Cuda, shape: &[usize], value: f32, dtype: DType) -> Result<T> {
    if !dtype.is_float() {
        return dtype_err("fill", "fill makes f32 or bf16 tensors");
    }
    let f = be.func("elementwise", &format!("fill_{}", sfx(dtype)))?;
    let mut y = be.alloc(shape, dtype)?;
    let n = y.numel() as i64;
    if n > 0 {
        launch!(be, f, grid_1d(n as usize), [&mut y, &value, &n])?;
    }
    Ok(y)
}
