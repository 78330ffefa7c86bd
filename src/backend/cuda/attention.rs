//! `attention.cu`, `flash.cu`, `flash_bwd.cu`: attention over packed sequences, forward
//! and backward, the flash tiles and the kernel choice.

use super::*;

/// The attention kernel instantiation for a head dim: they hold up to 32, 64 or 128 dims per
/// head; smaller heads leave lanes idle.
pub(super) fn attention_instance(op: &'static str, head_dim: usize) -> Result<usize> {
    match head_dim {
        1..=32 => Ok(32),
        33..=64 => Ok(64),
        65..=128 => Ok(128),
        _ => shape_err(
            op,
            format!("head dim {head_dim} is not supported on CUDA (at most 128)"),
        ),
    }
}

/// A batch's sequences on the device, uploaded once per batch ([`Seqs`]): the offsets,
/// and the (sequence, first row) pair of every FLASH_TILE_ROWS-row flash tile.
pub struct DeviceSeqs {
    cu: T,
    tiles: Option<T>,
    ntiles: usize,
}

/// (sequence, first row) of every flash tile of the packed sequences `cu_seqlens`.
fn flash_tiles(cu_seqlens: &[u32]) -> Vec<u32> {
    let mut tiles = Vec::new();
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        for start in (w[0]..w[1]).step_by(FLASH_TILE_ROWS as usize) {
            tiles.extend([s as u32, start]);
        }
    }
    tiles
}

pub(super) fn keep_seqs(be: &Cuda, cu_seqlens: &[u32]) -> Result<DeviceSeqs> {
    let tiles = flash_tiles(cu_seqlens);
    let ntiles = tiles.len() / 2;
    Ok(DeviceSeqs {
        cu: be.upload(HostData::U32(cu_seqlens), &[cu_seqlens.len()])?,
        tiles: if tiles.is_empty() {
            None
        } else {
            Some(be.upload(HostData::U32(&tiles), &[tiles.len()])?)
        },
        ntiles,
    })
}

/// The flash kernels' tiles and grid (tiles, heads) of FLASH_THREADS-thread blocks.
fn flash_launch<'a>(
    op: &'static str,
    seqs: &'a Seqs<Cuda>,
    heads: usize,
) -> Result<(&'a T, LaunchConfig)> {
    let d = seqs.kept();
    let Some(tiles) = &d.tiles else {
        return shape_err(op, "the flash kernels need at least one row");
    };
    let cfg = LaunchConfig {
        grid_dim: (
            to_i32(op, "tiles", d.ntiles)? as u32,
            to_i32(op, "heads", heads)? as u32,
            1,
        ),
        block_dim: (FLASH_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((tiles, cfg))
}

pub(super) fn attention(
    be: &Cuda,
    q: &T,
    k: &T,
    v: &T,
    seqs: &Seqs<Cuda>,
    heads: usize,
    scale: f32,
) -> Result<(T, T)> {
    const OP: &str = "attention";
    let (t, hidden, head_dim) = attention_dims(q, k, v, seqs, heads)?;
    let cu = &seqs.kept().cu;
    let inst = attention_instance(OP, head_dim)?;
    let mut out = be.alloc(&[t, hidden], q.dtype())?;
    let mut lse = be.alloc(&[t, heads], DType::F32)?;
    // bf16 with a whole head dim of 32, 64 or 128: the tensor-core kernel (flash.cu);
    // otherwise, or with M3_ATTENTION=naive, the one-warp-per-row baseline.
    let flash = q.dtype() == DType::BF16 && head_dim == inst && !be.attention_naive;
    if t > 0 && flash {
        let (tiles, cfg) = flash_launch(OP, seqs, heads)?;
        let variant = if be.flash_ldmatrix.load(Ordering::Relaxed) {
            "flash_ldm"
        } else {
            "flash"
        };
        let f = be.func("flash", &format!("attention_fwd_{variant}_d{inst}_bf16"))?;
        let nseq = to_i32(OP, "sequences", seqs.len())?;
        let h = to_i32(OP, "heads", heads)?;
        launch!(
            be,
            f,
            cfg,
            [q, k, v, &mut out, &mut lse, tiles, cu, &nseq, &h, &scale]
        )?;
    } else if t > 0 {
        let f = be.func(
            "attention",
            &format!("attention_fwd_naive_d{inst}_{}", sfx(q.dtype())),
        )?;
        let d = to_i32(OP, "head dim", head_dim)?;
        let nseq = to_i32(OP, "sequences", seqs.len())?;
        let h = to_i32(OP, "heads", heads)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(OP, "tokens", t)? as u32, h as u32, 1),
            block_dim: (WARP, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            be,
            f,
            cfg,
            [q, k, v, &mut out, &mut lse, cu, &nseq, &h, &d, &scale]
        )?;
    }
    Ok((out, lse))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    be: &Cuda,
    dout: &T,
    q: &T,
    k: &T,
    v: &T,
    out: &T,
    lse: &T,
    seqs: &Seqs<Cuda>,
    heads: usize,
    scale: f32,
) -> Result<(T, T, T)> {
    const OP: &str = "attention_backward";
    let (t, hidden, head_dim) = attention_dims(q, k, v, seqs, heads)?;
    let cu = &seqs.kept().cu;
    check_same(OP, ("dout", dout), ("q", q))?;
    check_same(OP, ("out", out), ("q", q))?;
    check_dtype(OP, "lse", lse, DType::F32)?;
    if lse.shape() != [t, heads] {
        return shape_err(
            OP,
            format!("lse must be [{t}, {heads}], got {:?}", lse.shape()),
        );
    }
    let inst = attention_instance(OP, head_dim)?;
    let mut dq = be.alloc(&[t, hidden], q.dtype())?;
    let mut dk = be.alloc(&[t, hidden], q.dtype())?;
    let mut dv = be.alloc(&[t, hidden], q.dtype())?;
    let flash =
        q.dtype() == DType::BF16 && head_dim == inst && be.flash_backward.load(Ordering::Relaxed);
    if t > 0 && flash {
        let mut delta = be.alloc(&[t, heads], DType::F32)?;
        let (rows, h, d) = (
            to_i32(OP, "tokens", t)?,
            to_i32(OP, "heads", heads)?,
            to_i32(OP, "head dim", head_dim)?,
        );
        let f = be.func("flash_bwd", "attention_bwd_delta_bf16")?;
        let pairs = to_i32(OP, "rows x heads", t * heads)? as usize;
        launch!(
            be,
            f,
            grid_rows(pairs),
            [dout, out, &mut delta, &rows, &h, &d]
        )?;
        let (tiles, cfg) = flash_launch(OP, seqs, heads)?;
        let f = be.func(
            "flash_bwd",
            &format!("attention_bwd_dkv_flash_d{inst}_bf16"),
        )?;
        launch!(
            be,
            f,
            cfg,
            [dout, q, k, v, lse, &delta, &mut dk, &mut dv, tiles, cu, &h, &scale]
        )?;
        let f = be.func("flash_bwd", &format!("attention_bwd_dq_flash_d{inst}_bf16"))?;
        launch!(
            be,
            f,
            cfg,
            [dout, q, k, v, lse, &delta, &mut dq, tiles, cu, &h, &scale]
        )?;
    } else if t > 0 {
        let mut delta = be.alloc(&[t, heads], DType::F32)?;
        let d = to_i32(OP, "head dim", head_dim)?;
        let nseq = to_i32(OP, "sequences", seqs.len())?;
        let h = to_i32(OP, "heads", heads)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(OP, "tokens", t)? as u32, h as u32, 1),
            block_dim: (WARP, 1, 1),
            shared_mem_bytes: 0,
        };
        let sf = sfx(q.dtype());
        let f = be.func("attention", &format!("attention_bwd_dq_naive_d{inst}_{sf}"))?;
        launch!(
            be,
            f,
            cfg,
            [dout, q, k, v, out, lse, cu, &mut delta, &mut dq, &nseq, &h, &d, &scale]
        )?;
        let f = be.func(
            "attention",
            &format!("attention_bwd_dkv_naive_d{inst}_{sf}"),
        )?;
        launch!(
            be,
            f,
            cfg,
            [dout, q, k, v, lse, &delta, cu, &mut dk, &mut dv, &nseq, &h, &d, &scale]
        )?;
    }
    Ok((dq, dk, dv))
}
