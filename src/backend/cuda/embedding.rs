//! `embedding.cu`: row gathers and their scatter-add backward.

use super::*;

pub(super) fn embedding(be: &Cuda, table: &T, ids: &T) -> Result<T> {
    const OP: &str = "embedding";
    let (vocab, dim, n) = embedding_dims(table, ids)?;
    be.check_ids_device(OP, ids, vocab)?;
    let mut out = be.alloc(&[n, dim], table.dtype())?;
    if n * dim > 0 {
        let f = be.func(
            "embedding",
            &format!("embedding_fwd_{}", sfx(table.dtype())),
        )?;
        let (ni, di) = (to_i32(OP, "ids", n)?, to_i32(OP, "dim", dim)?);
        launch!(be, f, grid_1d(n * dim), [table, ids, &mut out, &ni, &di])?;
    }
    Ok(out)
}

pub(super) fn embedding_backward_at(
    be: &Cuda,
    dy: &T,
    ids: &T,
    grad: &mut T,
    offset: usize,
    vocab: usize,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    let (n, dim) = check_embedding_backward_at(dy, ids, grad, offset, vocab)?;
    be.check_ids_device(OP, ids, vocab)?;
    if n * dim > 0 {
        let f = be.func("embedding", &format!("embedding_bwd_{}", sfx(dy.dtype())))?;
        let (ni, di) = (to_i32(OP, "ids", n)?, to_i32(OP, "dim", dim)?);
        let table = be.device_ptr(grad) + (offset * 4) as u64;
        launch!(be, f, grid_1d(n * dim), [dy, ids, &table, &ni, &di])?;
    }
    Ok(())
}
