//! `normalize.cu`: L2 normalisation and its backward.

use super::*;

pub(super) fn l2_normalize(be: &Cuda, x: &T, eps: f32) -> Result<(T, T)> {
    const OP: &str = "l2_normalize";
    check_float(OP, "x", x)?;
    let (rows, cols) = x.rows_cols();
    let mut y = be.alloc(x.shape(), x.dtype())?;
    let mut norms = be.alloc(&[rows], DType::F32)?;
    if rows > 0 {
        let f = be.func("normalize", &format!("l2norm_fwd_{}", sfx(x.dtype())))?;
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        launch!(
            be,
            f,
            grid_rows(rows),
            [x, &mut y, &mut norms, &r, &c, &eps]
        )?;
    }
    Ok((y, norms))
}

pub(super) fn l2_normalize_backward(be: &Cuda, dy: &T, y: &T, norms: &T, eps: f32) -> Result<T> {
    const OP: &str = "l2_normalize_backward";
    check_float(OP, "y", y)?;
    check_same(OP, ("dy", dy), ("y", y))?;
    let (rows, cols) = y.rows_cols();
    check_vec(OP, "norms", norms, rows)?;
    check_dtype(OP, "norms", norms, DType::F32)?;
    let mut dx = be.alloc(y.shape(), y.dtype())?;
    if rows > 0 {
        let f = be.func("normalize", &format!("l2norm_bwd_{}", sfx(y.dtype())))?;
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        launch!(
            be,
            f,
            grid_rows(rows),
            [dy, y, norms, &mut dx, &r, &c, &eps]
        )?;
    }
    Ok(dx)
}
