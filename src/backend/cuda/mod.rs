//! The CUDA backend: cudarc context and stream, the kernels build.rs embedded, and the
//! `Backend` impl, whose ops live one file per kernel family (mirroring `cuda/*.cu`), with
//! device memory in `device.rs` and launch plumbing in `launch.rs`. Compiled with feature
//! `cuda`; libcuda and cuBLASLt are loaded at run time, so a binary built on a machine
//! without a GPU runs on one with it.

#[macro_use]
mod launch;
mod activation;
mod attention;
mod blas;
mod crossentropy;
mod device;
mod elementwise;
mod embedding;
mod layernorm;
mod matmul;
mod normalize;
mod retrieval;

use device::*;
use embedded::geometry::*;
use launch::*;

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
    check_ids, check_lexical_side, check_range, check_same, check_vec, count_host_sync,
    cross_entropy_dims, embedding_dims, layernorm_backward_dims, layernorm_dims, matmul_dims,
    maxsim_dims, AdamWStep, Backend, LayerNormGrads, LayerNormOut, LexicalSide, Seqs,
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
    /// u32 elements (ids, offsets), and their largest value where it is known from the
    /// host values they were uploaded from: ops that index with them then skip the
    /// download that checks them (an out-of-range id would read out of bounds). A kernel
    /// writing into the tensor forgets it.
    U32(CudaSlice<u32>, Option<u32>),
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

type T = Tensor<Cuda>;

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
}

impl Device for Cuda {
    type Storage = CudaStorage;
}

impl Backend for Cuda {
    type SeqsKept = attention::DeviceSeqs;

    fn name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown".into());
        format!("cuda:{} {name}", self.ctx.ordinal())
    }

    fn keep_seqs(&self, cu_seqlens: &[u32]) -> Result<attention::DeviceSeqs> {
        attention::keep_seqs(self, cu_seqlens)
    }

    /// Waits for all queued work; reports asynchronous kernel faults.
    fn synchronize(&self) -> Result<()> {
        count_host_sync();
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    fn peak_memory(&self) -> Result<Option<u64>> {
        device::peak_memory(self)
    }

    fn reset_peak_memory(&self) -> Result<()> {
        device::reset_peak_memory(self)
    }

    fn memory_available(&self) -> Result<Option<u64>> {
        device::memory_available(self)
    }

    fn upload(&self, data: HostData<'_>, shape: &[usize]) -> Result<T> {
        device::upload(self, data, shape)
    }

    fn to_vec_f32(&self, t: &T) -> Result<Vec<f32>> {
        device::to_vec_f32(self, t)
    }

    fn to_vec_u32(&self, t: &T) -> Result<Vec<u32>> {
        device::to_vec_u32(self, t)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let mut t = self.alloc(shape, dtype)?;
        self.memset_zero(&mut t)?;
        Ok(t)
    }

    fn cast(&self, x: &T, dtype: DType) -> Result<T> {
        device::cast(self, x, dtype)
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
        matmul::linear_gelu(self, x, w, bias)
    }

    fn add(&self, a: &T, b: &T) -> Result<T> {
        self.binary("elementwise", "add", a, b)
    }

    fn sum_rows(&self, x: &T) -> Result<T> {
        elementwise::sum_rows(self, x)
    }

    fn layernorm(&self, x: &T, gamma: &T, beta: &T, eps: f32) -> Result<LayerNormOut<Self>> {
        layernorm::layernorm(self, x, gamma, beta, eps)
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
        elementwise::adamw(self, p, p_at, g, m, v, range, s)
    }

    fn zero(&self, t: &mut T) -> Result<()> {
        self.memset_zero(t)
    }

    fn add_at(&self, dst: &mut T, offset: usize, src: &T) -> Result<()> {
        elementwise::add_at(self, dst, offset, src)
    }

    fn read_at(&self, src: &T, offset: usize, dst: &mut T) -> Result<()> {
        elementwise::read_at(self, src, offset, dst)
    }

    fn sum_squares(&self, x: &T) -> Result<f64> {
        elementwise::sum_squares(self, x)
    }

    fn add_layernorm(&self, a: &T, b: &T, gamma: &T, beta: &T, eps: f32) -> Result<T> {
        layernorm::add_layernorm(self, a, b, gamma, beta, eps)
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
        layernorm::embed_layernorm(
            self, word, position, type0, ids, positions, gamma, beta, eps,
        )
    }

    fn layernorm_backward(
        &self,
        dy: &T,
        x: &T,
        gamma: &T,
        mean: &T,
        rstd: &T,
    ) -> Result<LayerNormGrads<Self>> {
        layernorm::layernorm_backward(self, dy, x, gamma, mean, rstd)
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
        embedding::embedding(self, table, ids)
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
        embedding::embedding_backward_at(self, dy, ids, grad, offset, vocab)
    }

    fn zero_at(&self, t: &mut T, offset: usize, len: usize) -> Result<()> {
        device::zero_at(self, t, offset, len)
    }

    fn l2_normalize(&self, x: &T, eps: f32) -> Result<(T, T)> {
        normalize::l2_normalize(self, x, eps)
    }

    fn l2_normalize_backward(&self, dy: &T, y: &T, norms: &T, eps: f32) -> Result<T> {
        normalize::l2_normalize_backward(self, dy, y, norms, eps)
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
        attention::attention(self, q, k, v, seqs, heads, scale)
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
        attention::attention_backward(self, dout, q, k, v, out, lse, seqs, heads, scale)
    }

    fn softmax_cross_entropy(&self, logits: &T, targets: &T) -> Result<(T, T)> {
        crossentropy::softmax_cross_entropy(self, logits, targets)
    }

    fn softmax_cross_entropy_backward(
        &self,
        dloss: &T,
        logits: &T,
        lse: &T,
        targets: &T,
    ) -> Result<T> {
        crossentropy::softmax_cross_entropy_backward(self, dloss, logits, lse, targets)
    }

    fn scale(&self, x: &T, c: f32) -> Result<T> {
        elementwise::scale(self, x, c)
    }

    fn dropout(&self, x: &T, p: f32, seed: u64) -> Result<T> {
        activation::dropout(self, x, p, seed)
    }

    fn sum_all(&self, x: &T) -> Result<T> {
        elementwise::sum_all(self, x)
    }

    fn fill(&self, shape: &[usize], value: f32, dtype: DType) -> Result<T> {
        elementwise::fill(self, shape, value, dtype)
    }

    fn soft_cross_entropy(&self, logits: &T, targets: &T) -> Result<(T, T)> {
        crossentropy::soft_cross_entropy(self, logits, targets)
    }

    fn soft_cross_entropy_backward(
        &self,
        dloss: &T,
        logits: &T,
        lse: &T,
        targets: &T,
    ) -> Result<T> {
        crossentropy::soft_cross_entropy_backward(self, dloss, logits, lse, targets)
    }

    fn maxsim(&self, q: &T, q_cu: &[u32], p: &T, p_cu: &[u32]) -> Result<(T, T)> {
        retrieval::maxsim(self, q, q_cu, p, p_cu)
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
        retrieval::maxsim_backward(self, ds, q, q_cu, p, p_cu, argmax)
    }

    fn lexical_scores(&self, q: &LexicalSide<'_, Self>, p: &LexicalSide<'_, Self>) -> Result<T> {
        retrieval::lexical_scores(self, q, p)
    }

    fn lexical_scores_backward(
        &self,
        ds: &T,
        q: &LexicalSide<'_, Self>,
        p: &LexicalSide<'_, Self>,
    ) -> Result<(T, T)> {
        retrieval::lexical_scores_backward(self, ds, q, p)
    }
}
