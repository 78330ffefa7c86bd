//! `crossentropy.cu` / `distill.cu`: softmax and soft-target cross-entropy, forward and
//! backward.

use super::*;

/// Soft cross-entropy geometry: float logits and f32 targets of one 2-D shape.
pub(super) fn soft_ce_dims(op: &'static str, logits: &T, targets: &T) -> Result<(usize, usize)> {
    check_float(op, "logits", logits)?;
    check_dtype(op, "targets", targets, DType::F32)?;
    if logits.shape().len() != 2 || logits.shape() != targets.shape() {
        return shape_err(
            op,
            format!(
                "logits {:?} and targets {:?} must be one [rows, cols] shape",
                logits.shape(),
                targets.shape()
            ),
        );
    }
    Ok(logits.rows_cols())
}

/// Both forwards: per-row loss and log-sum-exp `[rows]` f32, one block per row.
fn row_forward(
    be: &Cuda,
    op: &'static str,
    (module, kernel): (&str, &str),
    logits: &T,
    targets: &T,
    rows: usize,
    cols: usize,
) -> Result<(T, T)> {
    let mut loss = be.alloc(&[rows], DType::F32)?;
    let mut lse = be.alloc(&[rows], DType::F32)?;
    if rows > 0 {
        let f = be.func(module, &format!("{kernel}_{}", sfx(logits.dtype())))?;
        let (r, c) = (to_i32(op, "rows", rows)?, to_i32(op, "cols", cols)?);
        launch!(
            be,
            f,
            grid_rows(rows),
            [logits, targets, &mut loss, &mut lse, &r, &c]
        )?;
    }
    Ok((loss, lse))
}

/// Both backwards take the forward's `[rows]` f32 upstream gradient and log-sum-exp.
fn check_backward_inputs(op: &'static str, dloss: &T, lse: &T, rows: usize) -> Result<()> {
    check_vec(op, "dloss", dloss, rows)?;
    check_vec(op, "lse", lse, rows)?;
    check_dtype(op, "dloss", dloss, DType::F32)?;
    check_dtype(op, "lse", lse, DType::F32)
}

pub(super) fn softmax_cross_entropy(be: &Cuda, logits: &T, targets: &T) -> Result<(T, T)> {
    const OP: &str = "softmax_cross_entropy";
    let (rows, cols) = cross_entropy_dims(logits, targets)?;
    be.check_ids_device(OP, targets, cols)?;
    row_forward(
        be,
        OP,
        ("crossentropy", "softmax_ce_fwd"),
        logits,
        targets,
        rows,
        cols,
    )
}

pub(super) fn softmax_cross_entropy_backward(
    be: &Cuda,
    dloss: &T,
    logits: &T,
    lse: &T,
    targets: &T,
) -> Result<T> {
    const OP: &str = "softmax_cross_entropy_backward";
    let (rows, cols) = cross_entropy_dims(logits, targets)?;
    check_backward_inputs(OP, dloss, lse, rows)?;
    be.check_ids_device(OP, targets, cols)?;
    let mut d = be.alloc(logits.shape(), logits.dtype())?;
    if rows > 0 {
        let f = be.func(
            "crossentropy",
            &format!("softmax_ce_bwd_{}", sfx(logits.dtype())),
        )?;
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        launch!(
            be,
            f,
            grid_1d(rows * cols),
            [dloss, logits, lse, targets, &mut d, &r, &c]
        )?;
    }
    Ok(d)
}

pub(super) fn soft_cross_entropy(be: &Cuda, logits: &T, targets: &T) -> Result<(T, T)> {
    const OP: &str = "soft_cross_entropy";
    let (rows, cols) = soft_ce_dims(OP, logits, targets)?;
    row_forward(
        be,
        OP,
        ("distill", "soft_ce_fwd"),
        logits,
        targets,
        rows,
        cols,
    )
}

pub(super) fn soft_cross_entropy_backward(
    be: &Cuda,
    dloss: &T,
    logits: &T,
    lse: &T,
    targets: &T,
) -> Result<T> {
    const OP: &str = "soft_cross_entropy_backward";
    let (rows, cols) = soft_ce_dims(OP, logits, targets)?;
    check_backward_inputs(OP, dloss, lse, rows)?;
    let mut d = be.alloc(logits.shape(), logits.dtype())?;
    if rows > 0 {
        let f = be.func("distill", &format!("soft_ce_bwd_{}", sfx(logits.dtype())))?;
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        launch!(
            be,
            f,
            grid_rows(rows),
            [dloss, logits, lse, targets, &mut d, &r, &c]
        )?;
    }
    Ok(d)
}
