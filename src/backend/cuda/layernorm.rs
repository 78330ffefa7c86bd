//! `layernorm.cu`: LayerNorm, the fused residual and embedding LayerNorms, the backward.

use super::*;

pub(super) fn layernorm(
    be: &Cuda,
    x: &T,
    gamma: &T,
    beta: &T,
    eps: f32,
) -> Result<LayerNormOut<Cuda>> {
    let (rows, cols) = layernorm_dims(x, gamma, beta)?;
    let mut y = be.alloc(x.shape(), x.dtype())?;
    let mut mean = be.alloc(&[rows], DType::F32)?;
    let mut rstd = be.alloc(&[rows], DType::F32)?;
    if rows > 0 {
        let f = be.func("layernorm", &format!("layernorm_fwd_{}", sfx(x.dtype())))?;
        let (r, c) = (
            to_i32("layernorm", "rows", rows)?,
            to_i32("layernorm", "cols", cols)?,
        );
        launch!(
            be,
            f,
            grid_rows(rows),
            [x, gamma, beta, &mut y, &mut mean, &mut rstd, &r, &c, &eps]
        )?;
    }
    Ok(LayerNormOut { y, mean, rstd })
}

pub(super) fn add_layernorm(be: &Cuda, a: &T, b: &T, gamma: &T, beta: &T, eps: f32) -> Result<T> {
    const OP: &str = "add_layernorm";
    check_same(OP, ("a", a), ("b", b))?;
    let (rows, cols) = layernorm_dims(a, gamma, beta)?;
    let mut y = be.alloc(a.shape(), a.dtype())?;
    if rows > 0 {
        // bf16 rows of 1 to 4 chunks of LN_VEC_COLS columns go to the register-resident
        // kernel with 16-byte loads, when every pointer allows them.
        let aligned = [a, b, gamma, beta, &y]
            .iter()
            .all(|t| be.device_ptr(t).is_multiple_of(16));
        let chunk = LN_VEC_COLS as usize;
        let name = match (a.dtype(), cols % chunk, cols / chunk) {
            (DType::BF16, 0, k @ 1..=4) if aligned => format!("add_layernorm_fwd_vec{k}_bf16"),
            _ => format!("add_layernorm_fwd_{}", sfx(a.dtype())),
        };
        let f = be.func("layernorm", &name)?;
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        launch!(
            be,
            f,
            grid_rows(rows),
            [a, b, gamma, beta, &mut y, &r, &c, &eps]
        )?;
    }
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn embed_layernorm(
    be: &Cuda,
    word: &T,
    position: &T,
    type0: &T,
    ids: &T,
    positions: &T,
    gamma: &T,
    beta: &T,
    eps: f32,
) -> Result<T> {
    const OP: &str = "embed_layernorm";
    let (_, dim, n) = embedding_dims(word, ids)?;
    embedding_dims(position, positions)?;
    check_vec(OP, "positions", positions, n)?;
    check_dtype(OP, "type0", type0, word.dtype())?;
    be.check_ids_device(OP, ids, word.shape()[0])?;
    be.check_ids_device(OP, positions, position.shape()[0])?;
    if type0.shape() != [1, dim] || position.shape()[1] != dim || position.dtype() != word.dtype() {
        return shape_err(
            OP,
            format!(
                "position {:?} and type0 {:?} must have the word table's width {dim}",
                position.shape(),
                type0.shape()
            ),
        );
    }
    let mut y = be.alloc(&[n, dim], word.dtype())?;
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        check_vec(OP, name, t, dim)?;
        check_dtype(OP, name, t, word.dtype())?;
    }
    if n > 0 {
        let f = be.func(
            "layernorm",
            &format!("embed_layernorm_fwd_{}", sfx(word.dtype())),
        )?;
        let (r, c) = (to_i32(OP, "rows", n)?, to_i32(OP, "cols", dim)?);
        launch!(
            be,
            f,
            grid_rows(n),
            [word, position, type0, ids, positions, gamma, beta, &mut y, &r, &c, &eps]
        )?;
    }
    Ok(y)
}

pub(super) fn layernorm_backward(
    be: &Cuda,
    dy: &T,
    x: &T,
    gamma: &T,
    mean: &T,
    rstd: &T,
) -> Result<LayerNormGrads<Cuda>> {
    const OP: &str = "layernorm_backward";
    let (rows, cols) = layernorm_backward_dims(dy, x, gamma, mean, rstd)?;
    let mut dx = be.alloc(x.shape(), x.dtype())?;
    if rows == 0 {
        return Ok(LayerNormGrads {
            dx,
            dgamma: be.zeros(&[cols], DType::F32)?,
            dbeta: be.zeros(&[cols], DType::F32)?,
        });
    }
    let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    let f = be.func("layernorm", &format!("layernorm_bwd_dx_{}", sfx(x.dtype())))?;
    launch!(
        be,
        f,
        grid_rows(rows),
        [dy, x, gamma, mean, rstd, &mut dx, &r, &c]
    )?;
    // Parameter gradients: per-chunk partial sums, then a deterministic column sum.
    let chunk: usize = 64;
    let chunks = rows.div_ceil(chunk);
    let mut pg = be.alloc(&[chunks, cols], DType::F32)?;
    let mut pb = be.alloc(&[chunks, cols], DType::F32)?;
    let f = be.func(
        "layernorm",
        &format!("layernorm_bwd_params_{}", sfx(x.dtype())),
    )?;
    let ch = chunk as i32;
    let cfg = LaunchConfig {
        grid_dim: (
            cols.div_ceil(COL_BLOCK_THREADS as usize) as u32,
            chunks as u32,
            1,
        ),
        block_dim: (COL_BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        be,
        f,
        cfg,
        [dy, x, mean, rstd, &mut pg, &mut pb, &r, &c, &ch]
    )?;
    Ok(LayerNormGrads {
        dx,
        dgamma: be.sum_rows(&pg)?,
        dbeta: be.sum_rows(&pb)?,
    })
}
