//! The CUDA backend: cudarc context and stream, the kernels build.rs embedded, launch
//! helpers and cuBLASLt matmuls. Compiled with feature `cuda`; libcuda and cuBLASLt are
//! loaded at run time, so a binary built on a machine without a GPU runs on one with it.

mod blas;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchArgs, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use half::bf16;

use super::{
    attention_dims, check_adamw, check_at, check_dtype, check_embedding_backward_at, check_float,
    check_ids, check_lexical_side, check_range, check_same, check_vec, cross_entropy_dims,
    embedding_dims, layernorm_backward_dims, layernorm_dims, matmul_dims, maxsim_dims, AdamWStep,
    Backend, LayerNormGrads, LayerNormOut, LexicalSide,
};
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::score::LexicalEntries;
use crate::tensor::{DType, Device, HostData, Tensor};

/// ptxas's report for one kernel and architecture, recorded by build.rs.
#[derive(Debug, Clone, Copy)]
pub struct KernelResources {
    /// Source file stem in `cuda/`.
    pub module: &'static str,
    /// Kernel (entry function) name.
    pub kernel: &'static str,
    /// Target architecture (`sm_80`, `sm_90`).
    pub arch: &'static str,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Stack frame, bytes.
    pub stack_bytes: u32,
    /// Spill stores, bytes.
    pub spill_stores: u32,
    /// Spill loads, bytes.
    pub spill_loads: u32,
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The per-kernel resource report of every embedded kernel.
pub fn kernel_resources() -> &'static [KernelResources] {
    embedded::RESOURCES
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Device memory behind a CUDA tensor. Buffers hold at least one element (the driver
/// rejects empty allocations); the tensor's shape says how many are meaningful.
pub enum CudaStorage {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// bf16 elements.
    BF16(CudaSlice<bf16>),
    /// u32 elements.
    U32(CudaSlice<u32>),
}

/// Which kernel runs where there is a choice: the validated default, the naive baseline,
/// or a variant that is compiled but not yet run on a GPU. Given to [`Cuda::with_kernels`];
/// the CLI fills it from `M3_ATTENTION`, `M3_ATTENTION_BWD`, `M3_MAXSIM` and `M3_GELU`
/// (the library reads no environment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelChoices {
    /// bf16 attention backward through `flash_bwd.cu` instead of the naive kernels.
    pub flash_backward: bool,
    /// bf16 attention forward through the ldmatrix variant of `flash.cu`.
    pub flash_ldmatrix: bool,
    /// Attention through the naive one-warp-per-row kernels even where flash applies.
    pub attention_naive: bool,
    /// Max-sim through cuBLASLt GEMMs and a segmented arg-max.
    pub maxsim_gemm: bool,
    /// The FFN GELU in cuBLASLt's GEMM epilogue (bf16 inference).
    pub gelu_epilogue: bool,
}

/// The CUDA backend on one device, one stream.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: Mutex<blas::Blas>,
    poison: AtomicBool,
    staging: Mutex<Staging>,
    flash_backward: AtomicBool,
    flash_ldmatrix: AtomicBool,
    attention_naive: bool,
    maxsim_gemm: AtomicBool,
    gelu_epilogue: AtomicBool,
}

/// Page-locked host buffers for large downloads, grown on demand and reused: on an H100
/// host, reading a 16k x 1024 bf16 tensor into a fresh pageable Vec and converting it on
/// one thread took about three times as long as the forward pass that made it.
#[derive(Default)]
struct Staging {
    f32: Option<PinnedHostSlice<f32>>,
    bf16: Option<PinnedHostSlice<bf16>>,
}

/// Downloads at least this many elements go through `Staging` and a parallel conversion.
const STAGED_DOWNLOAD: usize = 1 << 16;

/// Copies `src` into the pinned buffer in `slot` (grown to fit) and converts its first `n`
/// elements to f32 on all cores.
fn download_staged<E>(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    slot: &mut Option<PinnedHostSlice<E>>,
    src: &CudaSlice<E>,
    n: usize,
    convert: impl Fn(E) -> f32 + Sync + Send,
) -> Result<Vec<f32>>
where
    E: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Send + Sync,
{
    use rayon::prelude::*;
    let e = |e| cuda_err("download", e);
    if slot.as_ref().is_none_or(|p| p.len() < src.len()) {
        *slot = None;
        // SAFETY: the buffer is written by the copy below before anything reads it. No
        // write-combining flag: the host reads this memory.
        *slot = Some(unsafe { ctx.alloc_pinned_with_flags::<E>(src.len(), 0) }.map_err(e)?);
    }
    let pinned = slot.as_mut().expect("allocated above");
    stream.memcpy_dtoh(src, pinned).map_err(e)?;
    // A copy into pinned memory is asynchronous, and with event tracking off (Cuda::new)
    // cudarc records no event on the slice, so as_slice() would not wait: wait here.
    stream.synchronize().map_err(e)?;
    let host = pinned.as_slice().map_err(e)?;
    let mut out = Vec::with_capacity(n);
    host[..n]
        .par_iter()
        .map(|&x| convert(x))
        .collect_into_vec(&mut out);
    Ok(out)
}

type T = Tensor<Cuda>;

/// Threads per block for the 1-D grid-stride and warp-per-row kernels.
const BLOCK: u32 = 256;

/// Suffix of a kernel instantiation for a float dtype.
fn sfx(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::U32 => "u32",
    }
}

/// A 1-D grid-stride launch over `n` elements (grid capped; the kernels loop).
fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a pointwise kernel over n elements: one per 16-byte vector of bf16 (the
/// kernels grid-stride, so f32 and scalar tails are covered too).
fn vector_threads(n: i64) -> usize {
    (n as usize).div_ceil(8)
}

/// One warp per row, 8 rows per 256-thread block.
fn grid_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel argument: a tensor read, a tensor written, or a scalar.
trait KernelArg<'a> {
    fn push(self, b: &mut LaunchArgs<'a>);
}

impl<'a> KernelArg<'a> for &'a T {
    fn push(self, b: &mut LaunchArgs<'a>) {
        match self.storage() {
            CudaStorage::F32(s) => b.arg(s),
            CudaStorage::BF16(s) => b.arg(s),
            CudaStorage::U32(s) => b.arg(s),
        };
    }
}

impl<'a> KernelArg<'a> for &'a mut T {
    fn push(self, b: &mut LaunchArgs<'a>) {
        match self.storage_mut() {
            CudaStorage::F32(s) => b.arg(s),
            CudaStorage::BF16(s) => b.arg(s),
            CudaStorage::U32(s) => b.arg(s),
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

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).or_else(|_| shape_err(op, format!("{what} = {v} exceeds i32")))
}

impl Cuda {
    /// Whether libcuda and cuBLASLt can be loaded and at least one device is present.
    /// Never panics (cudarc panics on first use when libcuda is missing, so probe first).
    pub fn available() -> bool {
        // SAFETY: these only try dlopen on the candidate library names.
        let libs = unsafe {
            cudarc::driver::sys::is_culib_present() && cudarc::cublaslt::sys::is_culib_present()
        };
        libs && CudaContext::device_count().is_ok_and(|n| n > 0)
    }

    /// Number of CUDA devices (call after [`Cuda::available`]).
    pub fn device_count() -> Result<usize> {
        CudaContext::device_count()
            .map(|n| n as usize)
            .map_err(|e| cuda_err("device count", e))
    }

    /// Opens device `ordinal` with the default kernels (see [`Cuda::with_kernels`]).
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_kernels(ordinal, KernelChoices::default())
    }

    /// Opens device `ordinal`, loads every embedded module and creates the cuBLASLt handle;
    /// `k` picks the kernel variants.
    pub fn with_kernels(ordinal: usize, k: KernelChoices) -> Result<Self> {
        // SAFETY: dlopen probes only.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcuda not found: no NVIDIA driver on this machine (or not on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        // SAFETY: dlopen probe only.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcublasLt not found: put the CUDA 13 libraries (e.g. python's nvidia/*/lib) on LD_LIBRARY_PATH".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("open device", e))?;
        // One stream: ordering is program order, so cudarc's per-buffer events are overhead.
        // SAFETY: every buffer is used only on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let mut modules = HashMap::new();
        for (name, image) in embedded::MODULES {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| cuda_err(&format!("load module {name}"), e))?;
            modules.insert(*name, m);
        }
        let (major, _) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        let blas = blas::Blas::new(stream.clone(), major)?;
        Ok(Cuda {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            poison: AtomicBool::new(false),
            staging: Mutex::new(Staging::default()),
            flash_backward: AtomicBool::new(k.flash_backward),
            flash_ldmatrix: AtomicBool::new(k.flash_ldmatrix),
            attention_naive: k.attention_naive,
            maxsim_gemm: AtomicBool::new(k.maxsim_gemm),
            gelu_epilogue: AtomicBool::new(k.gelu_epilogue),
        })
    }

    /// Fills every newly allocated output with NaN bytes (0xFF) before kernels write it,
    /// so tests catch elements a kernel forgot to write.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Routes bf16 attention backward (head dims 32, 64, 128) to the tensor-core kernels
    /// of `flash_bwd.cu` instead of the naive two-pass kernels. Off by default until those
    /// kernels have passed on a GPU ([`KernelChoices::flash_backward`] at start).
    pub fn set_flash_backward(&self, on: bool) {
        self.flash_backward.store(on, Ordering::Relaxed);
    }

    /// Routes the bf16 attention forward to the ldmatrix variant of `flash.cu` (K and V
    /// fragments through ldmatrix, exp2). Off by default until it has passed on a GPU
    /// ([`KernelChoices::flash_ldmatrix`] at start).
    pub fn set_flash_ldmatrix(&self, on: bool) {
        self.flash_ldmatrix.store(on, Ordering::Relaxed);
    }

    /// Computes max-sim through cuBLASLt (S = Q P^T per chunk of passages, then a segmented
    /// arg-max kernel) instead of the one-warp-per-pair kernel. Off by default until it has
    /// passed on a GPU ([`KernelChoices::maxsim_gemm`] at start).
    pub fn set_maxsim_gemm(&self, on: bool) {
        self.maxsim_gemm.store(on, Ordering::Relaxed);
    }

    /// Max-sim's best match per (query row, passage) through GEMMs: passages in chunks of
    /// at most ~64M score elements (256 MB of f32), S = Q P_chunk^T by cuBLASLt, then
    /// `maxsim_segmax` per passage.
    fn maxsim_rows_gemm(
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
                grid_dim: ((n1 - n0) as u32, tq.div_ceil(8) as u32, 1),
                block_dim: (BLOCK, 1, 1),
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

    /// Fuses inference's FFN GELU into the up-projection GEMM (cuBLASLt's GELU_BIAS epilogue,
    /// bf16 only). That epilogue is the tanh approximation of GELU, which differs from erf
    /// GELU by at most ~1e-3, below bf16's resolution for most outputs; off by default until
    /// the whole-encoder GPU test has passed with it. [`KernelChoices::gelu_epilogue`] at start.
    pub fn set_gelu_epilogue(&self, on: bool) {
        self.gelu_epilogue.store(on, Ordering::Relaxed);
    }

    /// The stream every op is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Runs `f` `warmup` times, then `iters` times each between two device events;
    /// returns the per-run milliseconds (callers take the median).
    pub fn time_ms(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f32>> {
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |what| move |e| cuda_err(what, e);
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = self.ctx.new_event(flags).map_err(ev("event"))?;
            let end = self.ctx.new_event(flags).map_err(ev("event"))?;
            start.record(&self.stream).map_err(ev("record"))?;
            f()?;
            end.record(&self.stream).map_err(ev("record"))?;
            end.synchronize().map_err(ev("event sync"))?;
            times.push(start.elapsed_ms(&end).map_err(ev("elapsed"))?);
        }
        Ok(times)
    }

    fn func(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap();
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::Cuda(format!("module {module} is not embedded")))?;
        let f = m
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name} in {module}"), e))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Allocates an output tensor (poisoned when requested), contents otherwise undefined.
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: every op writes its whole output before anything reads it; poisoning
        // makes a violation visible in tests.
        let mut storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::F32(
                    self.stream
                        .alloc::<f32>(n)
                        .map_err(|e| cuda_err("alloc", e))?,
                ),
                DType::BF16 => CudaStorage::BF16(
                    self.stream
                        .alloc::<bf16>(n)
                        .map_err(|e| cuda_err("alloc", e))?,
                ),
                DType::U32 => CudaStorage::U32(
                    self.stream
                        .alloc::<u32>(n)
                        .map_err(|e| cuda_err("alloc", e))?,
                ),
            }
        };
        if self.poison.load(Ordering::Relaxed) {
            let (ptr, bytes) = match &mut storage {
                CudaStorage::F32(s) => (s.device_ptr_mut(&self.stream).0, n * 4),
                CudaStorage::BF16(s) => (s.device_ptr_mut(&self.stream).0, n * 2),
                CudaStorage::U32(s) => (s.device_ptr_mut(&self.stream).0, n * 4),
            };
            // SAFETY: ptr addresses `bytes` bytes just allocated on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream())
            }
            .map_err(|e| cuda_err("poison", e))?;
        }
        Ok(Tensor::from_parts(shape.to_vec(), dtype, storage))
    }

    /// Unary elementwise kernel `name_{dtype}(x, y, n)`.
    fn unary(&self, module: &str, name: &'static str, x: &T) -> Result<T> {
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
    fn binary(&self, module: &str, name: &'static str, a: &T, bt: &T) -> Result<T> {
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

    /// `op(a) · op(b) (+ bias)` through cuBLASLt, with its GELU epilogue when `gelu`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_epilogue(
        &self,
        a: &T,
        trans_a: bool,
        b: &T,
        trans_b: bool,
        bias: Option<&T>,
        out: DType,
        gelu: bool,
    ) -> Result<T> {
        let (m, k, n) = matmul_dims(a, trans_a, b, trans_b, bias, out)?;
        if k == 0 {
            if bias.is_some() {
                return shape_err("matmul", "k = 0 with a bias is not supported on CUDA");
            }
            return self.zeros(&[m, n], out);
        }
        let c = self.alloc(&[m, n], out)?;
        if m == 0 || n == 0 {
            return Ok(c);
        }
        let args = blas::MatmulArgs {
            m,
            n,
            k,
            a: self.device_ptr(a),
            trans_a,
            b: self.device_ptr(b),
            trans_b,
            c: self.device_ptr(&c),
            in_type: a.dtype(),
            out_type: out,
            bias: bias.map(|t| self.device_ptr(t)),
            gelu,
        };
        // SAFETY: pointers come from live tensors whose shapes matmul_dims validated.
        unsafe { self.blas.lock().unwrap().matmul(&args)? };
        Ok(c)
    }

    /// The device's default memory pool (where cuMemAllocAsync takes tensors from).
    fn default_pool(&self) -> Result<sys::CUmemoryPool> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("memory pool", e))?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: writes one pool handle for this context's device.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) }
            .result()
            .map_err(|e| cuda_err("memory pool", e))?;
        Ok(pool)
    }

    /// A u64 attribute of the default memory pool.
    fn pool_attribute(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let pool = self.default_pool()?;
        let mut v = 0u64;
        // SAFETY: the USED_MEM_* / RESERVED_MEM_* attributes are u64.
        unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
        }
        .result()
        .map_err(|e| cuda_err("memory pool", e))?;
        Ok(v)
    }

    /// The launch of the flash attention kernels (flash.cu, flash_bwd.cu): (sequence, first
    /// row) of every 64-row tile of a packed batch, uploaded, and the grid (tiles, heads) of
    /// 128-thread blocks.
    fn flash_launch(
        &self,
        op: &'static str,
        cu_seqlens: &[u32],
        heads: usize,
    ) -> Result<(T, LaunchConfig)> {
        let mut tiles = Vec::new();
        for (s, w) in cu_seqlens.windows(2).enumerate() {
            for start in (w[0]..w[1]).step_by(64) {
                tiles.extend([s as u32, start]);
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (
                to_i32(op, "tiles", tiles.len() / 2)? as u32,
                to_i32(op, "heads", heads)? as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((self.upload(HostData::U32(&tiles), &[tiles.len()])?, cfg))
    }

    fn device_ptr(&self, t: &T) -> u64 {
        match t.storage() {
            CudaStorage::F32(s) => s.device_ptr(&self.stream).0,
            CudaStorage::BF16(s) => s.device_ptr(&self.stream).0,
            CudaStorage::U32(s) => s.device_ptr(&self.stream).0,
        }
    }

    fn memset_zero(&self, t: &mut T) -> Result<()> {
        let r = match t.storage_mut() {
            CudaStorage::F32(s) => self.stream.memset_zeros(s),
            CudaStorage::BF16(s) => self.stream.memset_zeros(s),
            CudaStorage::U32(s) => self.stream.memset_zeros(s),
        };
        r.map_err(|e| cuda_err("memset", e))
    }

    /// Ids are validated on the host: an out-of-range id would read or write out of bounds.
    fn check_ids_device(&self, op: &'static str, ids: &T, limit: usize) -> Result<()> {
        check_ids(op, &self.to_vec_u32(ids)?, limit)
    }
}

impl Device for Cuda {
    type Storage = CudaStorage;
}

impl Backend for Cuda {
    fn name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown".into());
        format!("cuda:{} {name}", self.ctx.ordinal())
    }

    /// Waits for all queued work; reports asynchronous kernel faults.
    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    /// The default memory pool's high-water mark of used bytes (every tensor comes from
    /// that pool through cuMemAllocAsync).
    fn peak_memory(&self) -> Result<Option<u64>> {
        // Without stream-ordered allocation cudarc falls back to cuMemAlloc and the pool
        // sees nothing.
        if !self.ctx.has_async_alloc() {
            return Ok(None);
        }
        self.pool_attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
            .map(Some)
    }

    fn reset_peak_memory(&self) -> Result<()> {
        let pool = self.default_pool()?;
        let mut zero = 0u64;
        // SAFETY: setting USED_MEM_HIGH (to 0: reset to the current use) takes a u64.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        }
        .result()
        .map_err(|e| cuda_err("memory pool", e))
    }

    fn memory_available(&self) -> Result<Option<u64>> {
        if !self.ctx.has_async_alloc() {
            return Ok(None);
        }
        // Queued frees first; then what the driver has free plus all the pool holds (in use
        // or kept for reuse: RESERVED includes USED).
        self.synchronize()?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("memory", e))?;
        let (free, _) =
            cudarc::driver::result::mem_get_info().map_err(|e| cuda_err("memory", e))?;
        let held =
            self.pool_attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        Ok(Some(free as u64 + held))
    }

    fn upload(&self, data: HostData<'_>, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return shape_err(
                "upload",
                format!("{} elements do not fill shape {shape:?}", data.len()),
            );
        }
        if data.is_empty() {
            return self.zeros(shape, data.dtype());
        }
        let e = |e| cuda_err("upload", e);
        let storage = match data {
            HostData::F32(v) => CudaStorage::F32(self.stream.clone_htod(v).map_err(e)?),
            HostData::BF16(v) => CudaStorage::BF16(self.stream.clone_htod(v).map_err(e)?),
            HostData::U32(v) => CudaStorage::U32(self.stream.clone_htod(v).map_err(e)?),
        };
        Ok(Tensor::from_parts(shape.to_vec(), data.dtype(), storage))
    }

    fn to_vec_f32(&self, t: &T) -> Result<Vec<f32>> {
        let n = t.numel();
        let e = |e| cuda_err("download", e);
        if n >= STAGED_DOWNLOAD {
            let mut staging = self.staging.lock().unwrap();
            let (ctx, stream) = (&self.ctx, &self.stream);
            return match t.storage() {
                CudaStorage::F32(s) => download_staged(ctx, stream, &mut staging.f32, s, n, |x| x),
                CudaStorage::BF16(s) => {
                    download_staged(ctx, stream, &mut staging.bf16, s, n, |x| x.to_f32())
                }
                CudaStorage::U32(_) => dtype_err("to_vec_f32", "tensor is u32"),
            };
        }
        match t.storage() {
            CudaStorage::F32(s) => {
                let mut v = self.stream.clone_dtoh(s).map_err(e)?;
                v.truncate(n);
                Ok(v)
            }
            CudaStorage::BF16(s) => {
                let v = self.stream.clone_dtoh(s).map_err(e)?;
                Ok(v[..n].iter().map(|x| x.to_f32()).collect())
            }
            CudaStorage::U32(_) => dtype_err("to_vec_f32", "tensor is u32"),
        }
    }

    fn to_vec_u32(&self, t: &T) -> Result<Vec<u32>> {
        match t.storage() {
            CudaStorage::U32(s) => {
                let mut v = self
                    .stream
                    .clone_dtoh(s)
                    .map_err(|e| cuda_err("download", e))?;
                v.truncate(t.numel());
                Ok(v)
            }
            _ => dtype_err("to_vec_u32", format!("tensor is {}", t.dtype())),
        }
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let mut t = self.alloc(shape, dtype)?;
        self.memset_zero(&mut t)?;
        Ok(t)
    }

    fn cast(&self, x: &T, dtype: DType) -> Result<T> {
        check_float("cast", "x", x)?;
        if !dtype.is_float() {
            return dtype_err("cast", "cannot cast floats to u32");
        }
        let mut y = self.alloc(x.shape(), dtype)?;
        let n = x.numel();
        if n == 0 {
            return Ok(y);
        }
        if x.dtype() == dtype {
            let e = |e| cuda_err("copy", e);
            match (x.storage(), y.storage_mut()) {
                (CudaStorage::F32(s), CudaStorage::F32(d)) => {
                    self.stream.memcpy_dtod(s, d).map_err(e)?
                }
                (CudaStorage::BF16(s), CudaStorage::BF16(d)) => {
                    self.stream.memcpy_dtod(s, d).map_err(e)?
                }
                _ => unreachable!("same dtype, same storage variant"),
            }
            return Ok(y);
        }
        let f = self.func(
            "elementwise",
            &format!("cast_{}_{}", sfx(x.dtype()), sfx(dtype)),
        )?;
        let n = n as i64;
        launch!(self, f, grid_1d(n as usize), [x, &mut y, &n])?;
        Ok(y)
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
        self.matmul_epilogue(a, trans_a, b, trans_b, bias, out, false)
    }

    fn linear_gelu(&self, x: &T, w: &T, bias: &T) -> Result<T> {
        if x.dtype() == DType::BF16 && self.gelu_epilogue.load(Ordering::Relaxed) {
            self.matmul_epilogue(x, false, w, false, Some(bias), DType::BF16, true)
        } else {
            self.gelu(&self.matmul(x, false, w, false, Some(bias), x.dtype())?)
        }
    }

    fn add(&self, a: &T, b: &T) -> Result<T> {
        self.binary("elementwise", "add", a, b)
    }

    fn sum_rows(&self, x: &T) -> Result<T> {
        check_float("sum_rows", "x", x)?;
        let (rows, cols) = x.rows_cols();
        let mut out = self.alloc(&[cols], DType::F32)?;
        if cols == 0 {
            return Ok(out);
        }
        if rows == 0 {
            self.memset_zero(&mut out)?;
            return Ok(out);
        }
        let f = self.func("elementwise", &format!("sum_rows_{}", sfx(x.dtype())))?;
        let (r, c) = (
            to_i32("sum_rows", "rows", rows)?,
            to_i32("sum_rows", "cols", cols)?,
        );
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, f, cfg, [x, &mut out, &r, &c])?;
        Ok(out)
    }

    fn layernorm(&self, x: &T, gamma: &T, beta: &T, eps: f32) -> Result<LayerNormOut<Self>> {
        let (rows, cols) = layernorm_dims(x, gamma, beta)?;
        let mut y = self.alloc(x.shape(), x.dtype())?;
        let mut mean = self.alloc(&[rows], DType::F32)?;
        let mut rstd = self.alloc(&[rows], DType::F32)?;
        if rows > 0 {
            let f = self.func("layernorm", &format!("layernorm_fwd_{}", sfx(x.dtype())))?;
            let (r, c) = (
                to_i32("layernorm", "rows", rows)?,
                to_i32("layernorm", "cols", cols)?,
            );
            launch!(
                self,
                f,
                grid_rows(rows),
                [x, gamma, beta, &mut y, &mut mean, &mut rstd, &r, &c, &eps]
            )?;
        }
        Ok(LayerNormOut { y, mean, rstd })
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
        check_adamw(p, p_at, g, m, v, &range)?;
        let n = range.len() as i64;
        if n > 0 {
            let f = self.func("elementwise", &format!("adamw_{}", sfx(g.dtype())))?;
            // Each buffer's first element of the update (the kernel indexes from 0).
            let at = |t: &T, k: usize| self.device_ptr(t) + (k * t.dtype().size()) as u64;
            let (pp, gp, mp, vp) = (
                at(p, p_at),
                at(g, range.start),
                at(m, range.start),
                at(v, range.start),
            );
            launch!(
                self,
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

    fn zero(&self, t: &mut T) -> Result<()> {
        self.memset_zero(t)
    }

    fn add_at(&self, dst: &mut T, offset: usize, src: &T) -> Result<()> {
        const OP: &str = "add_at";
        check_at(OP, dst, offset, src)?;
        let n = src.numel() as i64;
        if n > 0 {
            let f = self.func("elementwise", &format!("accumulate_{}", sfx(src.dtype())))?;
            let d = self.device_ptr(dst) + (offset * 4) as u64;
            launch!(self, f, grid_1d(n as usize), [&d, src, &n])?;
        }
        Ok(())
    }

    fn read_at(&self, src: &T, offset: usize, dst: &mut T) -> Result<()> {
        const OP: &str = "read_at";
        check_at(OP, src, offset, dst)?;
        let n = dst.numel();
        if n == 0 {
            return Ok(());
        }
        let s = self.device_ptr(src) + (offset * 4) as u64;
        if dst.dtype() == DType::F32 {
            let d = self.device_ptr(dst);
            // SAFETY: both ranges were checked against their tensors' sizes above and lie
            // in different allocations (src is the arena, dst a compute tensor).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(d, s, n * 4, self.stream.cu_stream())
            }
            .map_err(|e| cuda_err(OP, e))
        } else {
            let f = self.func("elementwise", "cast_f32_bf16")?;
            let n = n as i64;
            launch!(self, f, grid_1d(n as usize), [&s, dst, &n])
        }
    }

    fn sum_squares(&self, x: &T) -> Result<f64> {
        const OP: &str = "sum_squares";
        check_float(OP, "x", x)?;
        let n = x.numel() as i64;
        if n == 0 {
            return Ok(0.0);
        }
        let mut partial = self
            .stream
            .alloc_zeros::<f64>(256)
            .map_err(|e| cuda_err(OP, e))?;
        let f = self.func("elementwise", &format!("sum_squares_{}", sfx(x.dtype())))?;
        let cfg = LaunchConfig {
            grid_dim: (256, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, f, cfg, [x, &mut partial, &n])?;
        let host = self
            .stream
            .clone_dtoh(&partial)
            .map_err(|e| cuda_err(OP, e))?;
        Ok(host.iter().sum())
    }

    fn add_layernorm(&self, a: &T, b: &T, gamma: &T, beta: &T, eps: f32) -> Result<T> {
        const OP: &str = "add_layernorm";
        check_same(OP, ("a", a), ("b", b))?;
        let (rows, cols) = layernorm_dims(a, gamma, beta)?;
        let mut y = self.alloc(a.shape(), a.dtype())?;
        if rows > 0 {
            // bf16 rows of 256..1024 columns (a multiple of 256) go to the register-resident
            // kernel with 16-byte loads, when every pointer allows them.
            let aligned = [a, b, gamma, beta, &y]
                .iter()
                .all(|t| self.device_ptr(t).is_multiple_of(16));
            let name = match (a.dtype(), cols % 256, cols / 256) {
                (DType::BF16, 0, k @ 1..=4) if aligned => format!("add_layernorm_fwd_vec{k}_bf16"),
                _ => format!("add_layernorm_fwd_{}", sfx(a.dtype())),
            };
            let f = self.func("layernorm", &name)?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_rows(rows),
                [a, b, gamma, beta, &mut y, &r, &c, &eps]
            )?;
        }
        Ok(y)
    }

    fn embed_layernorm(
        &self,
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
        self.check_ids_device(OP, ids, word.shape()[0])?;
        self.check_ids_device(OP, positions, position.shape()[0])?;
        if type0.shape() != [1, dim]
            || position.shape()[1] != dim
            || position.dtype() != word.dtype()
        {
            return shape_err(
                OP,
                format!(
                    "position {:?} and type0 {:?} must have the word table's width {dim}",
                    position.shape(),
                    type0.shape()
                ),
            );
        }
        let mut y = self.alloc(&[n, dim], word.dtype())?;
        for (name, t) in [("gamma", gamma), ("beta", beta)] {
            check_vec(OP, name, t, dim)?;
            check_dtype(OP, name, t, word.dtype())?;
        }
        if n > 0 {
            let f = self.func(
                "layernorm",
                &format!("embed_layernorm_fwd_{}", sfx(word.dtype())),
            )?;
            let (r, c) = (to_i32(OP, "rows", n)?, to_i32(OP, "cols", dim)?);
            launch!(
                self,
                f,
                grid_rows(n),
                [word, position, type0, ids, positions, gamma, beta, &mut y, &r, &c, &eps]
            )?;
        }
        Ok(y)
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
        let mut dx = self.alloc(x.shape(), x.dtype())?;
        if rows == 0 {
            return Ok(LayerNormGrads {
                dx,
                dgamma: self.zeros(&[cols], DType::F32)?,
                dbeta: self.zeros(&[cols], DType::F32)?,
            });
        }
        let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        let f = self.func("layernorm", &format!("layernorm_bwd_dx_{}", sfx(x.dtype())))?;
        launch!(
            self,
            f,
            grid_rows(rows),
            [dy, x, gamma, mean, rstd, &mut dx, &r, &c]
        )?;
        // Parameter gradients: per-chunk partial sums, then a deterministic column sum.
        let chunk: usize = 64;
        let chunks = rows.div_ceil(chunk);
        let mut pg = self.alloc(&[chunks, cols], DType::F32)?;
        let mut pb = self.alloc(&[chunks, cols], DType::F32)?;
        let f = self.func(
            "layernorm",
            &format!("layernorm_bwd_params_{}", sfx(x.dtype())),
        )?;
        let ch = chunk as i32;
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(BLOCK as usize) as u32, chunks as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            f,
            cfg,
            [dy, x, mean, rstd, &mut pg, &mut pb, &r, &c, &ch]
        )?;
        Ok(LayerNormGrads {
            dx,
            dgamma: self.sum_rows(&pg)?,
            dbeta: self.sum_rows(&pb)?,
        })
    }

    fn gelu(&self, x: &T) -> Result<T> {
        self.unary("activation", "gelu_fwd", x)
    }

    fn gelu_backward(&self, dy: &T, x: &T) -> Result<T> {
        self.binary("activation", "gelu_bwd", dy, x)
    }

    fn relu(&self, x: &T) -> Result<T> {
        self.unary("activation", "relu_fwd", x)
    }

    fn relu_backward(&self, dy: &T, x: &T) -> Result<T> {
        self.binary("activation", "relu_bwd", dy, x)
    }

    fn embedding(&self, table: &T, ids: &T) -> Result<T> {
        const OP: &str = "embedding";
        let (vocab, dim, n) = embedding_dims(table, ids)?;
        self.check_ids_device(OP, ids, vocab)?;
        let mut out = self.alloc(&[n, dim], table.dtype())?;
        if n * dim > 0 {
            let f = self.func(
                "embedding",
                &format!("embedding_fwd_{}", sfx(table.dtype())),
            )?;
            let (ni, di) = (to_i32(OP, "ids", n)?, to_i32(OP, "dim", dim)?);
            launch!(self, f, grid_1d(n * dim), [table, ids, &mut out, &ni, &di])?;
        }
        Ok(out)
    }

    fn embedding_backward(&self, dy: &T, ids: &T, vocab: usize) -> Result<T> {
        let mut out = self.zeros(&[vocab, dy.rows_cols().1], DType::F32)?;
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
        let (n, dim) = check_embedding_backward_at(dy, ids, grad, offset, vocab)?;
        self.check_ids_device(OP, ids, vocab)?;
        if n * dim > 0 {
            let f = self.func("embedding", &format!("embedding_bwd_{}", sfx(dy.dtype())))?;
            let (ni, di) = (to_i32(OP, "ids", n)?, to_i32(OP, "dim", dim)?);
            let table = self.device_ptr(grad) + (offset * 4) as u64;
            launch!(self, f, grid_1d(n * dim), [dy, ids, &table, &ni, &di])?;
        }
        Ok(())
    }

    fn zero_at(&self, t: &mut T, offset: usize, len: usize) -> Result<()> {
        const OP: &str = "zero_at";
        check_dtype(OP, "arena", t, DType::F32)?;
        check_range(OP, t, &(offset..offset + len))?;
        if len == 0 {
            return Ok(());
        }
        let d = self.device_ptr(t) + (offset * 4) as u64;
        // SAFETY: the range was checked against the tensor's size above.
        unsafe { cudarc::driver::result::memset_d8_async(d, 0, len * 4, self.stream.cu_stream()) }
            .map_err(|e| cuda_err(OP, e))
    }

    fn l2_normalize(&self, x: &T, eps: f32) -> Result<(T, T)> {
        const OP: &str = "l2_normalize";
        check_float(OP, "x", x)?;
        let (rows, cols) = x.rows_cols();
        let mut y = self.alloc(x.shape(), x.dtype())?;
        let mut norms = self.alloc(&[rows], DType::F32)?;
        if rows > 0 {
            let f = self.func("normalize", &format!("l2norm_fwd_{}", sfx(x.dtype())))?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_rows(rows),
                [x, &mut y, &mut norms, &r, &c, &eps]
            )?;
        }
        Ok((y, norms))
    }

    fn l2_normalize_backward(&self, dy: &T, y: &T, norms: &T, eps: f32) -> Result<T> {
        const OP: &str = "l2_normalize_backward";
        check_float(OP, "y", y)?;
        check_same(OP, ("dy", dy), ("y", y))?;
        let (rows, cols) = y.rows_cols();
        check_vec(OP, "norms", norms, rows)?;
        check_dtype(OP, "norms", norms, DType::F32)?;
        let mut dx = self.alloc(y.shape(), y.dtype())?;
        if rows > 0 {
            let f = self.func("normalize", &format!("l2norm_bwd_{}", sfx(y.dtype())))?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_rows(rows),
                [dy, y, norms, &mut dx, &r, &c, &eps]
            )?;
        }
        Ok(dx)
    }

    fn attention(
        &self,
        q: &T,
        k: &T,
        v: &T,
        cu_seqlens: &[u32],
        heads: usize,
        scale: f32,
    ) -> Result<(T, T)> {
        const OP: &str = "attention";
        let (t, hidden, head_dim) = attention_dims(q, k, v, cu_seqlens, heads)?;
        let inst = attention_instance(OP, head_dim)?;
        let mut out = self.alloc(&[t, hidden], q.dtype())?;
        let mut lse = self.alloc(&[t, heads], DType::F32)?;
        // bf16 with a whole head dim of 32, 64 or 128: the tensor-core kernel (flash.cu);
        // otherwise, or with M3_ATTENTION=naive, the one-warp-per-row baseline.
        let flash = q.dtype() == DType::BF16 && head_dim == inst && !self.attention_naive;
        if t > 0 && flash {
            let cu = self.upload(HostData::U32(cu_seqlens), &[cu_seqlens.len()])?;
            let (tiles, cfg) = self.flash_launch(OP, cu_seqlens, heads)?;
            let variant = if self.flash_ldmatrix.load(Ordering::Relaxed) {
                "flash_ldm"
            } else {
                "flash"
            };
            let f = self.func("flash", &format!("attention_fwd_{variant}_d{inst}_bf16"))?;
            let nseq = to_i32(OP, "sequences", cu_seqlens.len() - 1)?;
            let h = to_i32(OP, "heads", heads)?;
            launch!(
                self,
                f,
                cfg,
                [q, k, v, &mut out, &mut lse, &tiles, &cu, &nseq, &h, &scale]
            )?;
        } else if t > 0 {
            let cu = self.upload(HostData::U32(cu_seqlens), &[cu_seqlens.len()])?;
            let f = self.func(
                "attention",
                &format!("attention_fwd_naive_d{inst}_{}", sfx(q.dtype())),
            )?;
            let d = to_i32(OP, "head dim", head_dim)?;
            let nseq = to_i32(OP, "sequences", cu_seqlens.len() - 1)?;
            let h = to_i32(OP, "heads", heads)?;
            let cfg = LaunchConfig {
                grid_dim: (to_i32(OP, "tokens", t)? as u32, h as u32, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self,
                f,
                cfg,
                [q, k, v, &mut out, &mut lse, &cu, &nseq, &h, &d, &scale]
            )?;
        }
        Ok((out, lse))
    }

    fn attention_backward(
        &self,
        dout: &T,
        q: &T,
        k: &T,
        v: &T,
        out: &T,
        lse: &T,
        cu_seqlens: &[u32],
        heads: usize,
        scale: f32,
    ) -> Result<(T, T, T)> {
        const OP: &str = "attention_backward";
        let (t, hidden, head_dim) = attention_dims(q, k, v, cu_seqlens, heads)?;
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
        let mut dq = self.alloc(&[t, hidden], q.dtype())?;
        let mut dk = self.alloc(&[t, hidden], q.dtype())?;
        let mut dv = self.alloc(&[t, hidden], q.dtype())?;
        let flash = q.dtype() == DType::BF16
            && head_dim == inst
            && self.flash_backward.load(Ordering::Relaxed);
        if t > 0 && flash {
            let cu = self.upload(HostData::U32(cu_seqlens), &[cu_seqlens.len()])?;
            let mut delta = self.alloc(&[t, heads], DType::F32)?;
            let (rows, h, d) = (
                to_i32(OP, "tokens", t)?,
                to_i32(OP, "heads", heads)?,
                to_i32(OP, "head dim", head_dim)?,
            );
            let f = self.func("flash_bwd", "attention_bwd_delta_bf16")?;
            let pairs = to_i32(OP, "rows x heads", t * heads)? as usize;
            launch!(
                self,
                f,
                grid_rows(pairs),
                [dout, out, &mut delta, &rows, &h, &d]
            )?;
            let (tiles, cfg) = self.flash_launch(OP, cu_seqlens, heads)?;
            let f = self.func(
                "flash_bwd",
                &format!("attention_bwd_dkv_flash_d{inst}_bf16"),
            )?;
            launch!(
                self,
                f,
                cfg,
                [dout, q, k, v, lse, &delta, &mut dk, &mut dv, &tiles, &cu, &h, &scale]
            )?;
            let f = self.func("flash_bwd", &format!("attention_bwd_dq_flash_d{inst}_bf16"))?;
            launch!(
                self,
                f,
                cfg,
                [dout, q, k, v, lse, &delta, &mut dq, &tiles, &cu, &h, &scale]
            )?;
        } else if t > 0 {
            let cu = self.upload(HostData::U32(cu_seqlens), &[cu_seqlens.len()])?;
            let mut delta = self.alloc(&[t, heads], DType::F32)?;
            let d = to_i32(OP, "head dim", head_dim)?;
            let nseq = to_i32(OP, "sequences", cu_seqlens.len() - 1)?;
            let h = to_i32(OP, "heads", heads)?;
            let cfg = LaunchConfig {
                grid_dim: (to_i32(OP, "tokens", t)? as u32, h as u32, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            let sf = sfx(q.dtype());
            let f = self.func("attention", &format!("attention_bwd_dq_naive_d{inst}_{sf}"))?;
            launch!(
                self,
                f,
                cfg,
                [dout, q, k, v, out, lse, &cu, &mut delta, &mut dq, &nseq, &h, &d, &scale]
            )?;
            let f = self.func(
                "attention",
                &format!("attention_bwd_dkv_naive_d{inst}_{sf}"),
            )?;
            launch!(
                self,
                f,
                cfg,
                [dout, q, k, v, lse, &delta, &cu, &mut dk, &mut dv, &nseq, &h, &d, &scale]
            )?;
        }
        Ok((dq, dk, dv))
    }

    fn softmax_cross_entropy(&self, logits: &T, targets: &T) -> Result<(T, T)> {
        const OP: &str = "softmax_cross_entropy";
        let (rows, cols) = cross_entropy_dims(logits, targets)?;
        self.check_ids_device(OP, targets, cols)?;
        let mut loss = self.alloc(&[rows], DType::F32)?;
        let mut lse = self.alloc(&[rows], DType::F32)?;
        if rows > 0 {
            let f = self.func(
                "crossentropy",
                &format!("softmax_ce_fwd_{}", sfx(logits.dtype())),
            )?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_rows(rows),
                [logits, targets, &mut loss, &mut lse, &r, &c]
            )?;
        }
        Ok((loss, lse))
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
        check_dtype(OP, "dloss", dloss, DType::F32)?;
        check_dtype(OP, "lse", lse, DType::F32)?;
        self.check_ids_device(OP, targets, cols)?;
        let mut d = self.alloc(logits.shape(), logits.dtype())?;
        if rows > 0 {
            let f = self.func(
                "crossentropy",
                &format!("softmax_ce_bwd_{}", sfx(logits.dtype())),
            )?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_1d(rows * cols),
                [dloss, logits, lse, targets, &mut d, &r, &c]
            )?;
        }
        Ok(d)
    }
    fn scale(&self, x: &T, c: f32) -> Result<T> {
        check_float("scale", "x", x)?;
        let f = self.func("elementwise", &format!("scale_{}", sfx(x.dtype())))?;
        let mut y = self.alloc(x.shape(), x.dtype())?;
        let n = x.numel() as i64;
        if n > 0 {
            launch!(self, f, grid_1d(n as usize), [x, &mut y, &c, &n])?;
        }
        Ok(y)
    }

    fn dropout(&self, x: &T, p: f32, seed: u64) -> Result<T> {
        check_float("dropout", "x", x)?;
        let f = self.func("activation", &format!("dropout_{}", sfx(x.dtype())))?;
        let mut y = self.alloc(x.shape(), x.dtype())?;
        let n = x.numel() as i64;
        if n > 0 {
            launch!(self, f, grid_1d(n as usize), [x, &mut y, &p, &seed, &n])?;
        }
        Ok(y)
    }

    fn sum_all(&self, x: &T) -> Result<T> {
        check_float("sum_all", "x", x)?;
        let mut out = self.zeros(&[1], DType::F32)?;
        let n = x.numel() as i64;
        if n > 0 {
            let f = self.func("elementwise", &format!("sum_all_{}", sfx(x.dtype())))?;
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, f, cfg, [x, &mut out, &n])?;
        }
        Ok(out)
    }

    fn fill(&self, shape: &[usize], value: f32, dtype: DType) -> Result<T> {
        if !dtype.is_float() {
            return dtype_err("fill", "fill makes f32 or bf16 tensors");
        }
        let f = self.func("elementwise", &format!("fill_{}", sfx(dtype)))?;
        let mut y = self.alloc(shape, dtype)?;
        let n = y.numel() as i64;
        if n > 0 {
            launch!(self, f, grid_1d(n as usize), [&mut y, &value, &n])?;
        }
        Ok(y)
    }

    fn soft_cross_entropy(&self, logits: &T, targets: &T) -> Result<(T, T)> {
        const OP: &str = "soft_cross_entropy";
        let (rows, cols) = soft_ce_dims(OP, logits, targets)?;
        let mut loss = self.alloc(&[rows], DType::F32)?;
        let mut lse = self.alloc(&[rows], DType::F32)?;
        if rows > 0 {
            let f = self.func("distill", &format!("soft_ce_fwd_{}", sfx(logits.dtype())))?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_rows(rows),
                [logits, targets, &mut loss, &mut lse, &r, &c]
            )?;
        }
        Ok((loss, lse))
    }

    fn soft_cross_entropy_backward(
        &self,
        dloss: &T,
        logits: &T,
        lse: &T,
        targets: &T,
    ) -> Result<T> {
        const OP: &str = "soft_cross_entropy_backward";
        let (rows, cols) = soft_ce_dims(OP, logits, targets)?;
        check_vec(OP, "dloss", dloss, rows)?;
        check_vec(OP, "lse", lse, rows)?;
        check_dtype(OP, "dloss", dloss, DType::F32)?;
        check_dtype(OP, "lse", lse, DType::F32)?;
        let mut d = self.alloc(logits.shape(), logits.dtype())?;
        if rows > 0 {
            let f = self.func("distill", &format!("soft_ce_bwd_{}", sfx(logits.dtype())))?;
            let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
            launch!(
                self,
                f,
                grid_rows(rows),
                [dloss, logits, lse, targets, &mut d, &r, &c]
            )?;
        }
        Ok(d)
    }

    fn maxsim(&self, q: &T, q_cu: &[u32], p: &T, p_cu: &[u32]) -> Result<(T, T)> {
        const OP: &str = "maxsim";
        let (tq, d) = maxsim_dims(q, q_cu, p, p_cu)?;
        let (bq, bp) = (q_cu.len() - 1, p_cu.len() - 1);
        let mut best = self.alloc(&[tq, bp], DType::F32)?;
        let mut arg = self.alloc(&[tq, bp], DType::U32)?;
        let mut s = self.alloc(&[bq, bp], DType::F32)?;
        if tq * bp > 0 && d > 0 && self.maxsim_gemm.load(Ordering::Relaxed) {
            self.maxsim_rows_gemm(q, p, p_cu, &mut best, &mut arg)?;
        } else if tq * bp > 0 {
            let pc = self.upload(HostData::U32(p_cu), &[p_cu.len()])?;
            let f = self.func("maxsim", &format!("maxsim_rows_{}", sfx(q.dtype())))?;
            let (ti, bi, di) = (
                to_i32(OP, "query rows", tq)?,
                to_i32(OP, "passages", bp)?,
                to_i32(OP, "dim", d)?,
            );
            let cfg = LaunchConfig {
                grid_dim: (bp as u32, tq.div_ceil(8) as u32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self,
                f,
                cfg,
                [q, p, &pc, &mut best, &mut arg, &ti, &bi, &di]
            )?;
        }
        if bq * bp > 0 {
            let qc = self.upload(HostData::U32(q_cu), &[q_cu.len()])?;
            let f = self.func("maxsim", "maxsim_reduce")?;
            let (b1, b2) = (to_i32(OP, "queries", bq)?, to_i32(OP, "passages", bp)?);
            launch!(self, f, grid_1d(bq * bp), [&best, &qc, &mut s, &b1, &b2])?;
        }
        Ok((s, arg))
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
        let mut dq = self.zeros(q.shape(), q.dtype())?;
        let mut dp = self.zeros(p.shape(), p.dtype())?;
        if tq * bp * d == 0 {
            return Ok((dq, dp));
        }
        let seq_of = |cu: &[u32]| -> Vec<u32> {
            cu.windows(2)
                .enumerate()
                .flat_map(|(b, w)| (w[0]..w[1]).map(move |_| b as u32))
                .collect()
        };
        let qc = self.upload(HostData::U32(q_cu), &[q_cu.len()])?;
        let q_seq = seq_of(q_cu);
        let qs = self.upload(HostData::U32(&q_seq), &[tq])?;
        let (ti, bi, di) = (
            to_i32(OP, "query rows", tq)?,
            to_i32(OP, "passages", bp)?,
            to_i32(OP, "dim", d)?,
        );
        let sf = sfx(q.dtype());
        let f = self.func("maxsim", &format!("maxsim_bwd_q_{sf}"))?;
        launch!(
            self,
            f,
            grid_1d(tq * d),
            [ds, p, argmax, &qc, &qs, &mut dq, &ti, &bi, &di]
        )?;
        if tp > 0 {
            let p_seq = seq_of(p_cu);
            let ps = self.upload(HostData::U32(&p_seq), &[tp])?;
            let f = self.func("maxsim", &format!("maxsim_bwd_p_{sf}"))?;
            let cfg = LaunchConfig {
                grid_dim: (to_i32(OP, "passage rows", tp)? as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self,
                f,
                cfg,
                [ds, q, argmax, &qc, &qs, &ps, &mut dp, &ti, &bi, &di]
            )?;
        }
        Ok((dq, dp))
    }

    fn lexical_scores(&self, q: &LexicalSide<'_, Self>, p: &LexicalSide<'_, Self>) -> Result<T> {
        const OP: &str = "lexical_scores";
        check_lexical_side(q.weights, q.ids, q.cu)?;
        check_lexical_side(p.weights, p.ids, p.cu)?;
        let (bq, bp) = (q.cu.len() - 1, p.cu.len() - 1);
        let mut s = self.zeros(&[bq, bp], DType::F32)?;
        if bq * bp == 0 {
            return Ok(s);
        }
        let (_, qd) = self.lexical_side(OP, q)?;
        let (_, pd) = self.lexical_side(OP, p)?;
        let f = self.func("sparse", "lexical_scores")?;
        let cfg = LaunchConfig {
            grid_dim: (bp as u32, bq.div_ceil(8) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b1, b2) = (to_i32(OP, "queries", bq)?, to_i32(OP, "passages", bp)?);
        launch!(
            self,
            f,
            cfg,
            [&qd.ids, &qd.wmax, &qd.seg, &pd.ids, &pd.wmax, &pd.seg, &mut s, &b1, &b2]
        )?;
        Ok(s)
    }

    fn lexical_scores_backward(
        &self,
        ds: &T,
        q: &LexicalSide<'_, Self>,
        p: &LexicalSide<'_, Self>,
    ) -> Result<(T, T)> {
        const OP: &str = "lexical_scores_backward";
        check_lexical_side(q.weights, q.ids, q.cu)?;
        check_lexical_side(p.weights, p.ids, p.cu)?;
        let (bq, bp) = (q.cu.len() - 1, p.cu.len() - 1);
        if ds.shape() != [bq, bp] {
            return shape_err(OP, format!("ds is {:?}, expected [{bq}, {bp}]", ds.shape()));
        }
        check_dtype(OP, "ds", ds, DType::F32)?;
        let mut dq = self.zeros(q.weights.shape(), q.weights.dtype())?;
        let mut dp = self.zeros(p.weights.shape(), p.weights.dtype())?;
        if bq * bp == 0 {
            return Ok((dq, dp));
        }
        let (qe, qd) = self.lexical_side(OP, q)?;
        let (pe, pd) = self.lexical_side(OP, p)?;
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
            let f = self.func("sparse", &format!("lexical_bwd_{}", sfx(dw.dtype())))?;
            let ui = to_i32(OP, "entries", u)?;
            launch!(
                self,
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
}

/// One lexical side on the device: entry ids, sequences and segments, and each entry's max
/// weight and arg-max row.
struct LexicalDevice {
    ids: T,
    seq: T,
    seg: T,
    wmax: T,
    warg: T,
}

impl Cuda {
    /// Groups a side by token id on the host and reduces each entry's max weight on the
    /// device.
    fn lexical_side(
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

/// The attention kernel instantiation for a head dim: they hold up to 32, 64 or 128 dims per
/// head; smaller heads leave lanes idle.
fn attention_instance(op: &'static str, head_dim: usize) -> Result<usize> {
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

/// Soft cross-entropy geometry: float logits and f32 targets of one 2-D shape.
fn soft_ce_dims(op: &'static str, logits: &T, targets: &T) -> Result<(usize, usize)> {
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
