//! `activation.cu`: dropout (GELU and ReLU are one-line unary launches in `mod.rs`).

use super::*;

pub(super) fn dropout(be: &Cuda, x: &T, p: f32, seed: u64) -> Result<T> {
    check_float("dropout", "x", x)?;
    let f = be.func("activation", &format!("dropout_{}", sfx(x.dtype())))?;
    let mut y = be.alloc(x.shape(), x.dtype())?;
    let n = x.numel() as i64;
    if n > 0 {
        launch!(be, f, grid_1d(n as usize), [x, &mut y, &p, &seed, &n])?;
    }
    Ok(y)
}
