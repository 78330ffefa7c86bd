//! Launch plumbing: grid geometry, typed kernel arguments, the `launch!` macro and the
//! unary / binary elementwise launches.

use super::*;

/// Threads per block of the 1-D grid-stride kernels (any size works: they stride by
/// blockDim).
const GRID_STRIDE_THREADS: u32 = 256;

/// Suffix of a kernel instantiation for a float dtype.
pub(super) fn sfx(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::U32 => "u32",
    }
}

/// A 1-D grid-stride launch over `n` elements (grid capped; the kernels loop).
pub(super) fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(GRID_STRIDE_THREADS as usize)
        .clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (GRID_STRIDE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a pointwise kernel over n elements: one per 16-byte vector of bf16 (the
/// kernels grid-stride, so f32 and scalar tails are covered too).
pub(super) fn vector_threads(n: i64) -> usize {
    (n as usize).div_ceil(8)
}

/// One warp per row, ROWS_PER_BLOCK rows per block.
pub(super) fn grid_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (ROW_BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel argument: a tensor read, a tensor written, or a scalar.
pub(super) trait KernelArg<'a> {
    fn push(self, b: &mut LaunchArgs<'a>);
}

impl<'a> KernelArg<'a> for &'a T {
    fn push(self, b: &mut LaunchArgs<'a>) {
        match self.storage() {
            CudaStorage::F32(s) => b.arg(s),
            CudaStorage::BF16(s) => b.arg(s),
            CudaStorage::U32(s, _) => b.arg(s),
        };
    }
}

impl<'a> KernelArg<'a> for &'a mut T {
    fn push(self, b: &mut LaunchArgs<'a>) {
        match self.storage_mut() {
            CudaStorage::F32(s) => b.arg(s),
            CudaStorage::BF16(s) => b.arg(s),
            CudaStorage::U32(s, max) => {
                *max = None;
                b.arg(s)
            }
        };
    }
}

impl<'a> KernelArg<'a> for &'a mut CudaSlice<f64> {
    fn push(self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl<'a> KernelArg<'a> for &'a $t {
            fn push(self, b: &mut LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
scalar_arg!(i32, i64, u64, f32);

/// Launches `$f` with config `$cfg` and the listed arguments, in the kernel's order.
/// SAFETY (for every use): the arguments match the kernel's signature and the buffers are
/// sized by shapes validated before the launch.
macro_rules! launch {
    ($self:expr, $f:expr, $cfg:expr, [$($a:expr),* $(,)?]) => {{
        let mut b = $self.stream.launch_builder(&$f);
        $( KernelArg::push($a, &mut b); )*
        unsafe { b.launch($cfg) }
            .map(|_| ())
            .map_err(|e| cuda_err("launch", e))
    }};
}

pub(super) fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).or_else(|_| shape_err(op, format!("{what} = {v} exceeds i32")))
}

impl Cuda {
    /// Unary elementwise kernel `name_{dtype}(x, y, n)`.
    pub(super) fn unary(&self, module: &str, name: &'static str, x: &T) -> Result<T> {
        check_float(name, "x", x)?;
        let f = self.func(module, &format!("{name}_{}", sfx(x.dtype())))?;
        let mut y = self.alloc(x.shape(), x.dtype())?;
        let n = x.numel() as i64;
        if n > 0 {
            launch!(self, f, grid_1d(vector_threads(n)), [x, &mut y, &n])?;
        }
        Ok(y)
    }

    /// Binary elementwise kernel `name_{dtype}(a, b, y, n)`.
    pub(super) fn binary(&self, module: &str, name: &'static str, a: &T, bt: &T) -> Result<T> {
        check_float(name, "a", a)?;
        check_same(name, ("a", a), ("b", bt))?;
        let f = self.func(module, &format!("{name}_{}", sfx(a.dtype())))?;
        let mut y = self.alloc(a.shape(), a.dtype())?;
        let n = a.numel() as i64;
        if n > 0 {
            launch!(self, f, grid_1d(vector_threads(n)), [a, bt, &mut y, &n])?;
        }
        Ok(y)
    }
}
